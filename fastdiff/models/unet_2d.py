"""UNet2DModel: the unconditional (DDPM-style) UNet, diffusers-compatible.

Supports positional, Fourier and learned time embeddings, class conditioning
(``num_class_embeds`` or ``class_embed_type`` "timestep"/"identity"), and every
down/up block type of ``fastdiff.models.unet_2d_blocks`` that diffusers' UNet2DModel
builds, including the score-SDE (NCSN++) ``Skip*`` blocks with their image skip path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastdiff.models.configuration_utils import ConfigMixin, register_to_config
from fastdiff.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps, get_activation
from fastdiff.models.modeling_utils import BaseOutput, ModelMixin
from fastdiff.models.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from fastdiff.nn import GroupNorm


@dataclass
class UNet2DOutput(BaseOutput):
    sample: torch.Tensor


def timesteps_for_batch(timestep: Union[torch.Tensor, float, int], sample: torch.Tensor) -> torch.Tensor:
    """A (B,) timesteps tensor on ``sample``'s device from a number, a 0-d or a (B,) / (1,) tensor."""
    batch = sample.shape[0]
    if not torch.is_tensor(timestep):
        dtype = torch.float32 if isinstance(timestep, float) else torch.long
        return torch.full((batch,), timestep, dtype=dtype, device=sample.device)
    if timestep.dim() == 0:
        timestep = timestep[None]
    if timestep.dim() != 1 or timestep.shape[0] not in (1, batch):
        raise ValueError(f"timestep: expected a number or a tensor of shape (), (1,) or ({batch},), got {tuple(timestep.shape)}")
    return timestep.to(sample.device).expand(batch)


class UNet2DModel(ModelMixin, ConfigMixin):
    """Unconditional image UNet. Constructor arguments and config keys are diffusers'."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[Union[int, Sequence[int]]] = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: Optional[int] = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: Optional[str] = "UNetMidBlock2D",
        up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: Sequence[int] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: Optional[int] = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: Optional[int] = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: Optional[str] = None,
        num_class_embeds: Optional[int] = None,
        num_train_timesteps: Optional[int] = None,
    ):
        super().__init__()
        get_activation(act_fn)  # an unknown name raises here, naming act_fn
        if len(down_block_types) != len(up_block_types) or len(block_out_channels) != len(down_block_types):
            raise ValueError(
                f"down_block_types, up_block_types and block_out_channels must have the same length, got "
                f"{len(down_block_types)}, {len(up_block_types)} and {len(block_out_channels)}"
            )
        if mid_block_type not in ("UNetMidBlock2D", None):
            raise ValueError(f"mid_block_type: expected 'UNetMidBlock2D' or None, got {mid_block_type!r}")
        self.sample_size = sample_size
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        if time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(embedding_size=block_out_channels[0], scale=16)
            timestep_input_dim = 2 * block_out_channels[0]
        elif time_embedding_type == "positional":
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
            timestep_input_dim = block_out_channels[0]
        elif time_embedding_type == "learned":
            if num_train_timesteps is None:
                raise ValueError("num_train_timesteps: required when time_embedding_type='learned'")
            self.time_proj = nn.Embedding(num_train_timesteps, block_out_channels[0])
            timestep_input_dim = block_out_channels[0]
        else:
            raise ValueError(
                f"time_embedding_type: expected 'positional', 'fourier' or 'learned', got {time_embedding_type!r}"
            )
        self.time_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)

        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ValueError(f"class_embed_type: expected None, 'timestep' or 'identity', got {class_embed_type!r}")

        # Registered before mid_block, as diffusers does: attn_processors (and a list
        # given to set_attention_slice) follow the order down, up, mid.
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=i < len(block_out_channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim if attention_head_dim is not None else output_channel,
                    downsample_padding=downsample_padding,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    downsample_type=downsample_type,
                    dropout=dropout,
                )
            )

        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                in_channels=block_out_channels[-1],
                temb_channels=time_embed_dim,
                dropout=dropout,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift,
                attention_head_dim=attention_head_dim if attention_head_dim is not None else block_out_channels[-1],
                resnet_groups=norm_num_groups,
                attn_groups=attn_norm_num_groups,
                add_attention=add_attention,
            )

        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=layers_per_block + 1,
                    in_channels=reversed_channels[min(i + 1, len(block_out_channels) - 1)],
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=time_embed_dim,
                    add_upsample=i < len(block_out_channels) - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim if attention_head_dim is not None else output_channel,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    upsample_type=upsample_type,
                    dropout=dropout,
                )
            )

        num_groups_out = norm_num_groups if norm_num_groups is not None else min(block_out_channels[0] // 4, 32)
        # diffusers: conv_norm_out then conv_act (SiLU); one fused module here.
        self.conv_norm_out = GroupNorm(num_groups_out, block_out_channels[0], eps=norm_eps, activation="silu")
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=3, padding=1)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[UNet2DOutput, Tuple]:
        """sample: (B, in_channels, H, W), H and W divisible by 2**(len(block_out_channels) - 1).
        timestep: a number, or a tensor of shape (), (1,) or (B,). class_labels: (B,) when class-conditioned."""
        self._check_sample(sample)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = timesteps_for_batch(timestep, sample)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))

        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels: required, this model is class-conditioned")
            if self.config.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels)
            emb = emb + self.class_embedding(class_labels).to(dtype=self.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels: this model is not class-conditioned (no class embedding)")

        # The NCSN++ blocks (Skip*) carry a second, image-space path alongside the features.
        skip_sample = sample
        sample = self.conv_in(sample)
        skips = (sample,)
        for block in self.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, res, skip_sample = block(sample, emb, skip_sample)
            else:
                sample, res = block(sample, emb)
            skips += res
        if self.mid_block is not None:
            sample = self.mid_block(sample, emb)
        skip_sample = None
        for block in self.up_blocks:
            n = len(block.resnets)
            if hasattr(block, "skip_conv"):
                sample, skip_sample = block(sample, skips[-n:], emb, skip_sample)
            else:
                sample = block(sample, skips[-n:], emb)
            skips = skips[:-n]
        sample = self.conv_out(self.conv_norm_out(sample))
        if skip_sample is not None:
            sample = sample + skip_sample

        if self.config.time_embedding_type == "fourier":
            sample = sample / timesteps.reshape(-1, 1, 1, 1)
        if not return_dict:
            return (sample,)
        return UNet2DOutput(sample=sample)

    def _check_sample(self, sample: torch.Tensor) -> None:
        channels = self.config.in_channels
        if sample.dim() != 4 or sample.shape[1] != channels:
            raise ValueError(f"sample: expected a (B, {channels}, H, W) tensor, got shape {tuple(sample.shape)}")
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(
                f"sample: height and width must be multiples of {factor} for this UNet, got {tuple(sample.shape[2:])}"
            )
