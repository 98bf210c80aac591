"""UNet2DConditionModel: the text-conditioned UNet of Stable Diffusion 1.x, 2.x and SDXL.

Constructor arguments and config keys are diffusers', so a diffusers ``unet``
folder loads unchanged. What each family uses:

* SD1.x: ``attention_head_dim`` is the number of heads per block (diffusers'
  naming quirk, kept for config compatibility); 1x1-conv projections.
* SD2.x: ``use_linear_projection``, ``upcast_attention``, per-block
  ``attention_head_dim`` lists.
* SDXL: ``transformer_layers_per_block`` lists and ``addition_embed_type="text_time"``,
  fed through ``added_cond_kwargs={"text_embeds", "time_ids"}``.
* LCM-style guidance embedding: ``time_cond_proj_dim`` with ``timestep_cond``.

Block types are built by ``fastdiff.models.unet_2d_blocks``' factories under diffusers'
names. Config values that select diffusers features fastdiff does not implement
(image/text addition embeddings, dual cross-attention, GLIGEN, block types listed there
as not implemented) raise an error naming the key; they are never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastdiff.models.configuration_utils import ConfigMixin, register_to_config
from fastdiff.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps, get_activation
from fastdiff.models.modeling_utils import BaseOutput, ModelMixin
from fastdiff.models.resnet import ProjectedTimeEmbedding, ResnetBlock2D
from fastdiff.models.unet_2d import timesteps_for_batch
from fastdiff.models.unet_2d_blocks import get_down_block, get_mid_block, get_up_block
from fastdiff.nn import GroupNorm

#: ``cross_attention_kwargs`` entries handled here rather than passed on. ``scale`` is the
#: LoRA scale; fastdiff models carry no LoRA layers, so, as in diffusers without LoRA, it
#: changes nothing. Every other entry goes to each attention processor as a keyword, as in
#: diffusers (``kv_cache``, a :class:`fastdiff.nn.CrossAttentionKVCache`, is one).
CROSS_ATTENTION_KWARGS = ("scale",)
#: entries diffusers understands that fastdiff does not implement (an error, not ignored).
UNSUPPORTED_CROSS_ATTENTION_KWARGS = ("gligen",)


@dataclass
class UNet2DConditionOutput(BaseOutput):
    sample: torch.Tensor


#: Blocks that hand ``temb`` to their ResnetBlock2Ds only, so a ProjectedTimeEmbedding can go down them.
_TIME_PROJECTION_BLOCKS = frozenset(
    {"CrossAttnDownBlock2D", "DownBlock2D", "UNetMidBlock2DCrossAttn", "UpBlock2D", "CrossAttnUpBlock2D"}
)


class _TimeProjections:
    """Every ResnetBlock2D's ``time_emb_proj(act(emb))`` as one GEMM over the projections'
    weights concatenated along the output dim (22 GEMMs -> 1 in SD1.5).

    The concatenation is a cache of the modules' own parameters (the state_dict keys do
    not change): it is rebuilt whenever any of them is replaced or changed in place (by
    identity and ``tensor._version``), e.g. after ``load_state_dict``, ``to()`` or a LoRA
    fused into the weights. Used without autograd only (inference); training projects
    per block as before.
    """

    def __init__(self, resnets):
        self.resnets = list(resnets)
        self.activation = self.resnets[0].nonlinearity
        self._key = None
        self._weight = self._bias = None

    @classmethod
    def for_model(cls, model) -> Optional["_TimeProjections"]:
        blocks = [*model.down_blocks, *model.up_blocks] + ([model.mid_block] if model.mid_block is not None else [])
        if any(type(block).__name__ not in _TIME_PROJECTION_BLOCKS for block in blocks):
            return None
        resnets = [m for block in blocks for m in block.modules() if isinstance(m, ResnetBlock2D)]
        if not resnets or any(r.time_emb_proj is None or r.skip_time_act or r.time_emb_proj.bias is None for r in resnets):
            return None
        if len({type(r.nonlinearity) for r in resnets}) != 1:
            return None
        return cls(resnets)

    def _weights(self):
        params = [t for r in self.resnets for t in (r.time_emb_proj.weight, r.time_emb_proj.bias)]
        key = tuple((id(t), t._version) for t in params)
        if key != self._key:
            self._weight = torch.cat([r.time_emb_proj.weight for r in self.resnets])
            self._bias = torch.cat([r.time_emb_proj.bias for r in self.resnets])
            self._key = key
        return self._weight, self._bias

    def __call__(self, emb: torch.Tensor) -> ProjectedTimeEmbedding:
        weight, bias = self._weights()
        projected = torch.nn.functional.linear(self.activation(emb), weight, bias)
        sizes = [r.time_emb_proj.out_features for r in self.resnets]
        return ProjectedTimeEmbedding(emb, dict(zip(self.resnets, projected.split(sizes, dim=1))))


def _per_block(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: expected one entry per down block ({n}), got {len(value)}: {list(value)}")
        return list(value)
    return [value] * n


class UNet2DConditionModel(ModelMixin, ConfigMixin):
    """Conditional UNet for latent diffusion; see the module docstring for the supported configs."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[Union[int, Sequence[int]]] = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: Sequence[str] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn",
        up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        only_cross_attention: Union[bool, Sequence[bool]] = False,
        block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
        layers_per_block: Union[int, Sequence[int]] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: Optional[int] = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: Union[int, Sequence[int]] = 1280,
        transformer_layers_per_block: Union[int, Sequence[int], Sequence[Sequence[int]]] = 1,
        reverse_transformer_layers_per_block: Optional[Sequence[Sequence[int]]] = None,
        encoder_hid_dim: Optional[int] = None,
        encoder_hid_dim_type: Optional[str] = None,
        attention_head_dim: Union[int, Sequence[int]] = 8,
        num_attention_heads: Optional[Union[int, Sequence[int]]] = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: Optional[str] = None,
        addition_embed_type: Optional[str] = None,
        addition_time_embed_dim: Optional[int] = None,
        num_class_embeds: Optional[int] = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: Optional[int] = None,
        time_embedding_act_fn: Optional[str] = None,
        timestep_post_act: Optional[str] = None,
        time_cond_proj_dim: Optional[int] = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: Optional[int] = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: Optional[bool] = None,
        cross_attention_norm: Optional[str] = None,
        addition_embed_type_num_heads: int = 64,
    ):
        super().__init__()
        # addition_embed_type_num_heads only affects diffusers' text addition embedding,
        # which is rejected below; it is accepted so that every diffusers config loads.
        get_activation(act_fn)  # an unknown name raises here, naming act_fn
        n = len(down_block_types)
        if num_attention_heads is not None:
            raise ValueError(
                "num_attention_heads: must be None; as in diffusers, the number of heads is given by "
                "attention_head_dim (see huggingface/diffusers#2011)"
            )
        if len(up_block_types) != n or len(block_out_channels) != n:
            raise ValueError(
                f"down_block_types, up_block_types and block_out_channels must have the same length, got "
                f"{n}, {len(up_block_types)} and {len(block_out_channels)}"
            )
        if dual_cross_attention:
            raise ValueError("dual_cross_attention: not supported by fastdiff")
        if attention_type != "default":
            raise ValueError(f"attention_type: only 'default' is supported, got {attention_type!r}")
        heads = _per_block(attention_head_dim, n, "attention_head_dim")
        only_cross = _per_block(only_cross_attention, n, "only_cross_attention")
        cross_dims = _per_block(cross_attention_dim, n, "cross_attention_dim")
        layers = _per_block(layers_per_block, n, "layers_per_block")
        transformer_layers = _per_block(transformer_layers_per_block, n, "transformer_layers_per_block")
        if reverse_transformer_layers_per_block is None:
            if any(isinstance(t, (list, tuple)) for t in transformer_layers):
                raise ValueError(
                    "reverse_transformer_layers_per_block: required when transformer_layers_per_block "
                    "holds per-layer lists (an asymmetrical UNet)"
                )
            reverse_transformer_layers = list(reversed(transformer_layers))
        else:
            reverse_transformer_layers = list(reverse_transformer_layers_per_block)

        self.sample_size = sample_size
        conv_in_padding = (conv_in_kernel - 1) // 2
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=conv_in_kernel, padding=conv_in_padding)

        # -- time embedding
        if time_embedding_type == "fourier":
            time_embed_dim = time_embedding_dim or block_out_channels[0] * 2
            if time_embed_dim % 2:
                raise ValueError(f"time_embedding_dim: must be even for Fourier embeddings, got {time_embed_dim}")
            self.time_proj = GaussianFourierProjection(time_embed_dim // 2, log=False, flip_sin_to_cos=flip_sin_to_cos)
            timestep_input_dim = time_embed_dim
        elif time_embedding_type == "positional":
            time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
            self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
            timestep_input_dim = block_out_channels[0]
        else:
            raise ValueError(f"time_embedding_type: expected 'positional' or 'fourier', got {time_embedding_type!r}")
        self.time_embedding = TimestepEmbedding(
            timestep_input_dim, time_embed_dim, act_fn=act_fn, post_act_fn=timestep_post_act,
            cond_proj_dim=time_cond_proj_dim,
        )

        # -- encoder hidden state projection
        if encoder_hid_dim_type is None and encoder_hid_dim is not None:
            encoder_hid_dim_type = "text_proj"
            self.register_to_config(encoder_hid_dim_type=encoder_hid_dim_type)
        if encoder_hid_dim_type == "text_proj":
            if encoder_hid_dim is None:
                raise ValueError("encoder_hid_dim: required when encoder_hid_dim_type is set")
            self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_attention_dim)
        elif encoder_hid_dim_type is None:
            self.encoder_hid_proj = None
        else:
            raise ValueError(f"encoder_hid_dim_type: only None or 'text_proj' are supported, got {encoder_hid_dim_type!r}")

        # -- class embedding
        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(timestep_input_dim, time_embed_dim, act_fn=act_fn)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type in ("projection", "simple_projection"):
            if projection_class_embeddings_input_dim is None:
                raise ValueError(
                    f"projection_class_embeddings_input_dim: required when class_embed_type={class_embed_type!r}"
                )
            if class_embed_type == "projection":
                self.class_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
            else:
                self.class_embedding = nn.Linear(projection_class_embeddings_input_dim, time_embed_dim)
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise ValueError(f"class_embed_type: unsupported value {class_embed_type!r}")

        # -- additional embeddings (SDXL micro-conditioning)
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ValueError(
                    "addition_time_embed_dim and projection_class_embeddings_input_dim: both required when "
                    "addition_embed_type='text_time'"
                )
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        elif addition_embed_type is not None:
            raise ValueError(f"addition_embed_type: only None or 'text_time' are supported, got {addition_embed_type!r}")

        self.time_embed_act = get_activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None
        blocks_time_embed_dim = time_embed_dim * 2 if class_embeddings_concat else time_embed_dim

        # -- down path
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
                    num_layers=layers[i],
                    transformer_layers_per_block=transformer_layers[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=blocks_time_embed_dim,
                    add_downsample=i < n - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_dims[i],
                    num_attention_heads=heads[i],
                    attention_head_dim=heads[i] if heads[i] is not None else output_channel,
                    downsample_padding=downsample_padding,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross[i],
                    upcast_attention=upcast_attention,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    resnet_skip_time_act=resnet_skip_time_act,
                    resnet_out_scale_factor=resnet_out_scale_factor,
                    cross_attention_norm=cross_attention_norm,
                    dropout=dropout,
                )
            )

        # -- mid
        if mid_block_only_cross_attention is None:
            mid_block_only_cross_attention = only_cross_attention if isinstance(only_cross_attention, bool) else False
        self.mid_block = get_mid_block(
            mid_block_type,
            temb_channels=blocks_time_embed_dim,
            in_channels=block_out_channels[-1],
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=transformer_layers[-1],
            num_attention_heads=heads[-1],
            cross_attention_dim=cross_dims[-1],
            use_linear_projection=use_linear_projection,
            mid_block_only_cross_attention=mid_block_only_cross_attention,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            resnet_skip_time_act=resnet_skip_time_act,
            cross_attention_norm=cross_attention_norm,
            attention_head_dim=heads[-1],
            dropout=dropout,
        )

        # -- up path
        self.num_upsamplers = n - 1
        reversed_channels = list(reversed(block_out_channels))
        reversed_heads = list(reversed(heads))
        reversed_layers = list(reversed(layers))
        reversed_cross_dims = list(reversed(cross_dims))
        reversed_only_cross = list(reversed(only_cross))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=reversed_layers[i] + 1,
                    transformer_layers_per_block=reverse_transformer_layers[i],
                    in_channels=reversed_channels[min(i + 1, n - 1)],
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=blocks_time_embed_dim,
                    add_upsample=i < n - 1,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=reversed_cross_dims[i],
                    num_attention_heads=reversed_heads[i],
                    attention_head_dim=heads[i] if heads[i] is not None else output_channel,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=reversed_only_cross[i],
                    upcast_attention=upcast_attention,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    resnet_skip_time_act=resnet_skip_time_act,
                    resnet_out_scale_factor=resnet_out_scale_factor,
                    cross_attention_norm=cross_attention_norm,
                    resolution_idx=i,
                    dropout=dropout,
                )
            )

        # -- out: diffusers' conv_norm_out + conv_act, one fused module when the activation is SiLU
        self.conv_act = None
        if norm_num_groups is not None:
            fused = act_fn in ("silu", "swish")
            self.conv_norm_out = GroupNorm(
                norm_num_groups, block_out_channels[0], eps=norm_eps, activation="silu" if fused else None
            )
            self.conv_act = None if fused else get_activation(act_fn)
        else:
            self.conv_norm_out = None
        conv_out_padding = (conv_out_kernel - 1) // 2
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, kernel_size=conv_out_kernel, padding=conv_out_padding)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        encoder_hidden_states: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        timestep_cond: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
        down_block_additional_residuals: Optional[Tuple[torch.Tensor, ...]] = None,
        mid_block_additional_residual: Optional[torch.Tensor] = None,
        down_intrablock_additional_residuals: Optional[Tuple[torch.Tensor, ...]] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[UNet2DConditionOutput, Tuple]:
        """One denoising step.

        Args:
            sample: (B, in_channels, H, W) noisy latents.
            timestep: a number, or a tensor of shape (), (1,) or (B,).
            encoder_hidden_states: (B, L, cross_attention_dim) text embeddings.
            class_labels: (B,) labels or (B, D) vectors, for class-conditioned configs.
            timestep_cond: (B, time_cond_proj_dim) guidance embedding, for configs with
                ``time_cond_proj_dim``.
            attention_mask: (B, H*W) mask for self-attention (1 keep, 0 drop).
            cross_attention_kwargs: keywords for every attention processor, as in diffusers;
                ``"scale"`` (the LoRA scale) has no effect on a model without LoRA layers
                and is not passed on. ``{"kv_cache": fastdiff.nn.CrossAttentionKVCache(text)}``
                reuses the text's cross-attention keys and values across steps.
            added_cond_kwargs: ``{"text_embeds": (B, D), "time_ids": (B, k)}`` for SDXL.
            down_block_additional_residuals, mid_block_additional_residual: ControlNet residuals
                (both together), added to the skip connections and the mid-block output.
            down_intrablock_additional_residuals: T2I-Adapter features, one per down block,
                added inside the down path (and the last one after the mid block when its
                shape matches), as diffusers does.
            encoder_attention_mask: (B, L) mask over the text tokens (1 keep, 0 drop).
        Returns:
            ``UNet2DConditionOutput(sample)`` with sample shaped (B, out_channels, H, W),
            or ``(sample,)`` when ``return_dict`` is False.
        """
        self._check_inputs(sample, encoder_hidden_states, cross_attention_kwargs)
        # What the attention processors receive as keywords ("scale" stays here).
        kwargs = {k: v for k, v in (cross_attention_kwargs or {}).items() if k not in CROSS_ATTENTION_KWARGS} or None
        forward_upsample_size = any(dim % (2**self.num_upsamplers) for dim in sample.shape[-2:])

        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self._time_embedding(sample, timestep, timestep_cond, class_labels)
        if self.config.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(emb, added_cond_kwargs, sample.shape[0])
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        if self.encoder_hid_proj is not None:
            encoder_hidden_states = self.encoder_hid_proj(encoder_hidden_states)
        # What the blocks get as temb: the embedding, or (inference, after
        # fuse_time_projections()) with every resnet's projection computed in one GEMM.
        block_temb = emb
        if not torch.is_grad_enabled():
            projections = self._time_projections()
            if projections is not None:
                block_temb = projections(emb)

        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError(
                "down_block_additional_residuals and mid_block_additional_residual: ControlNet passes both; "
                "for T2I-Adapter features use down_intrablock_additional_residuals"
            )
        adapter = list(down_intrablock_additional_residuals) if down_intrablock_additional_residuals is not None else []

        sample = self.conv_in(sample)
        skips = (sample,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                extra = adapter.pop(0) if adapter else None
                sample, res = block(
                    sample, block_temb, encoder_hidden_states, attention_mask, encoder_attention_mask, extra, cross_attention_kwargs=kwargs
                )
            else:
                sample, res = block(sample, block_temb)
                if adapter:
                    # In place, as diffusers does: the block's last skip state is this same
                    # tensor and carries the adapter feature too.
                    sample.add_(adapter.pop(0))
            skips += res

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals: expected {len(skips)} tensors, "
                    f"got {len(down_block_additional_residuals)}"
                )
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))

        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                sample = self.mid_block(
                    sample, block_temb, encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs=kwargs
                )
            else:
                sample = self.mid_block(sample, block_temb)
            if adapter and adapter[0].shape == sample.shape:
                sample = sample + adapter.pop(0)
        if mid_block_additional_residual is not None:
            sample = sample + mid_block_additional_residual

        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            # With sizes not divisible by the total downsampling, upsample to the skip's size.
            upsample_size = skips[-1].shape[2:] if forward_upsample_size and i < len(self.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    sample,
                    res,
                    block_temb,
                    encoder_hidden_states,
                    upsample_size,
                    attention_mask,
                    encoder_attention_mask,
                    cross_attention_kwargs=kwargs,
                )
            else:
                sample = block(sample, res, block_temb, upsample_size)

        if self.conv_norm_out is not None:
            sample = self.conv_norm_out(sample)
            if self.conv_act is not None:
                sample = self.conv_act(sample)
        sample = self.conv_out(sample)
        if not return_dict:
            return (sample,)
        return UNet2DConditionOutput(sample=sample)

    def fuse_time_projections(self) -> bool:
        """Compute every ResnetBlock2D's ``time_emb_proj(act(temb))`` as one GEMM at inference
        (22 GEMMs -> 1 in SD1.5). Returns False, changing nothing, when a block type or
        resnet setting rules it out. The concatenated weights follow parameter changes in
        eager mode (identity + version); a captured CUDA graph does not re-run that check,
        so unfuse (or recapture) before changing weights in place under a graph runner."""
        projections = _TimeProjections.for_model(self)
        self.__dict__["_fused_time_projections"] = projections
        return projections is not None

    def unfuse_time_projections(self) -> None:
        """Back to one projection per resnet (the default)."""
        self.__dict__.pop("_fused_time_projections", None)

    def _time_projections(self) -> Optional[_TimeProjections]:
        return self.__dict__.get("_fused_time_projections")

    def _time_embedding(self, sample, timestep, timestep_cond, class_labels) -> torch.Tensor:
        t_emb = self.time_proj(timesteps_for_batch(timestep, sample)).to(dtype=sample.dtype)
        cond_dim = self.config.time_cond_proj_dim
        if timestep_cond is not None:
            if cond_dim is None:
                raise ValueError("timestep_cond: this model has no time_cond_proj_dim, so it takes no timestep_cond")
            if timestep_cond.dim() != 2 or timestep_cond.shape[1] != cond_dim:
                raise ValueError(f"timestep_cond: expected (B, {cond_dim}), got {tuple(timestep_cond.shape)}")
        emb = self.time_embedding(t_emb, timestep_cond)
        if self.class_embedding is None:
            if class_labels is not None:
                raise ValueError("class_labels: this model is not class-conditioned (no class embedding)")
            return emb
        if class_labels is None:
            raise ValueError("class_labels: required, this model is class-conditioned")
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels).to(dtype=sample.dtype)
        class_emb = self.class_embedding(class_labels).to(dtype=sample.dtype)
        if self.config.class_embeddings_concat:
            return torch.cat([emb, class_emb], dim=-1)
        return emb + class_emb

    def _text_time_embedding(self, emb, added_cond_kwargs, batch: int) -> torch.Tensor:
        if added_cond_kwargs is None:
            raise ValueError(
                "added_cond_kwargs: required for this UNet (addition_embed_type='text_time'): "
                "pass {'text_embeds': (B, D), 'time_ids': (B, k)}"
            )
        for key in ("text_embeds", "time_ids"):
            if key not in added_cond_kwargs:
                raise ValueError(f"added_cond_kwargs: missing {key!r} (addition_embed_type='text_time')")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        if text_embeds.dim() != 2 or text_embeds.shape[0] != batch:
            raise ValueError(f"added_cond_kwargs['text_embeds']: expected ({batch}, D), got {tuple(text_embeds.shape)}")
        if time_ids.shape[0] != batch:
            raise ValueError(f"added_cond_kwargs['time_ids']: expected {batch} rows, got {tuple(time_ids.shape)}")
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(batch, -1)
        add_embeds = torch.cat([text_embeds, time_embeds], dim=-1)
        expected = self.config.projection_class_embeddings_input_dim
        if add_embeds.shape[1] != expected:
            raise ValueError(
                f"added_cond_kwargs: text_embeds width + time_ids count x addition_time_embed_dim = "
                f"{add_embeds.shape[1]}, expected projection_class_embeddings_input_dim = {expected}"
            )
        return self.add_embedding(add_embeds.to(emb.dtype))

    def _check_inputs(self, sample, encoder_hidden_states, cross_attention_kwargs) -> None:
        channels = self.config.in_channels
        if sample.dim() != 4 or sample.shape[1] != channels:
            raise ValueError(f"sample: expected a (B, {channels}, H, W) tensor, got shape {tuple(sample.shape)}")
        if encoder_hidden_states is None or encoder_hidden_states.dim() != 3:
            shape = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"encoder_hidden_states: expected a (B, L, D) tensor, got {shape}")
        width = self.config.encoder_hid_dim or self.config.cross_attention_dim
        if isinstance(width, (list, tuple)) and len(set(width)) == 1:
            width = width[0]
        if isinstance(width, int) and encoder_hidden_states.shape[2] != width:
            raise ValueError(
                f"encoder_hidden_states: expected last dim {width}, got shape {tuple(encoder_hidden_states.shape)}"
            )
        if encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(
                f"encoder_hidden_states: batch {encoder_hidden_states.shape[0]} does not match sample's {sample.shape[0]}"
            )
        if cross_attention_kwargs:
            unknown = set(cross_attention_kwargs) & set(UNSUPPORTED_CROSS_ATTENTION_KWARGS)
            if unknown:
                raise ValueError(
                    f"cross_attention_kwargs: unsupported keys {sorted(unknown)} (fastdiff does not implement them)"
                )
