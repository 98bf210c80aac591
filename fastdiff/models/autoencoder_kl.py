"""AutoencoderKL: the KL-regularised VAE of Stable Diffusion (Rombach et al. 2022), diffusers-compatible.

``encode`` returns a :class:`DiagonalGaussianDistribution` over latents; ``decode``
maps latents back to images. Tiling (``enable_tiling``) encodes/decodes
overlapping tiles and blends the seams, so large images fit in memory; slicing
(``enable_slicing``) runs a batch one sample at a time. Both follow diffusers'
algorithms exactly, so the outputs match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastdiff.models.configuration_utils import ConfigMixin, register_to_config
from fastdiff.models.modeling_utils import BaseOutput, ModelMixin, call_maybe_checkpointed
from fastdiff.models.embeddings import get_activation
from fastdiff.models.unet_2d_blocks import UNetMidBlock2D, get_down_block, get_up_block
from fastdiff.nn import GroupNorm


class DiagonalGaussianDistribution:
    """A Gaussian with diagonal covariance; ``parameters`` holds (mean, logvar) stacked on dim 1."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``mean + std * eps``; ``eps`` is drawn on the generator's device, then moved (as diffusers does)."""
        device = generator.device if generator is not None else self.parameters.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.parameters.dtype)
        return self.mean + self.std * noise.to(self.parameters.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> torch.Tensor:
        """KL divergence to ``other`` (default: the standard normal), summed over C, H, W."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )


@dataclass
class AutoencoderKLOutput(BaseOutput):
    latent_dist: DiagonalGaussianDistribution


@dataclass
class DecoderOutput(BaseOutput):
    sample: torch.Tensor


class Encoder(nn.Module):
    """conv_in -> DownEncoderBlock2Ds -> mid block -> GroupNorm+SiLU -> conv_out (2x channels when double_z)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=None,
                    add_downsample=i < len(block_out_channels) - 1,
                    resnet_eps=1e-6,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    downsample_padding=0,
                    attention_head_dim=output_channel,
                )
            )
        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1],
            temb_channels=None,
            resnet_eps=1e-6,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            attention_head_dim=block_out_channels[-1],
            add_attention=mid_block_add_attention,
        )
        # diffusers: conv_norm_out then conv_act (SiLU); here one fused module under the norm's name.
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[-1], eps=1e-6, activation="silu")
        self.conv_out = nn.Conv2d(block_out_channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        for down_block in self.down_blocks:
            sample = call_maybe_checkpointed(down_block, self, sample)
        sample = call_maybe_checkpointed(self.mid_block, self, sample)
        return self.conv_out(self.conv_norm_out(sample))


class Decoder(nn.Module):
    """conv_in -> mid block -> UpDecoderBlock2Ds -> GroupNorm+SiLU -> conv_out."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[-1], kernel_size=3, padding=1)
        self.mid_block = UNetMidBlock2D(
            in_channels=block_out_channels[-1],
            temb_channels=None,
            resnet_eps=1e-6,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            attention_head_dim=block_out_channels[-1],
            add_attention=mid_block_add_attention,
        )
        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(up_block_types):
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    num_layers=layers_per_block + 1,
                    in_channels=prev_output_channel,
                    out_channels=output_channel,
                    prev_output_channel=prev_output_channel,
                    temb_channels=None,
                    add_upsample=i < len(block_out_channels) - 1,
                    resnet_eps=1e-6,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    attention_head_dim=output_channel,
                )
            )
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0], eps=1e-6, activation="silu")
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        sample = self.conv_in(sample)
        sample = call_maybe_checkpointed(self.mid_block, self, sample)
        for up_block in self.up_blocks:
            sample = call_maybe_checkpointed(up_block, self, sample)
        return self.conv_out(self.conv_norm_out(sample))


class AutoencoderKL(ModelMixin, ConfigMixin):
    """The Stable Diffusion VAE. Constructor arguments and config keys are diffusers'.

    ``scaling_factor`` (and ``shift_factor``) are stored for pipelines, which
    multiply latents by it after ``encode`` and divide before ``decode``.
    ``force_upcast`` tells pipelines to run this VAE in float32 when the rest is fp16.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: Union[int, Sequence[int]] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: Optional[float] = None,
        latents_mean: Optional[Sequence[float]] = None,
        latents_std: Optional[Sequence[float]] = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        get_activation(act_fn)  # an unknown name raises here, naming act_fn
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise ValueError(
                f"down_block_types, up_block_types and block_out_channels must have the same length, got "
                f"{len(down_block_types)}, {len(up_block_types)} and {len(block_out_channels)}"
            )
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=down_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn=act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

        self.use_slicing = False
        self.use_tiling = False
        tile = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = tile
        self.tile_latent_min_size = int(tile / (2 ** (len(block_out_channels) - 1)))
        self.tile_overlap_factor = 0.25

    # ------------------------------------------------------------ tiling, slicing

    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode/decode in overlapping tiles of ``sample_size`` pixels when an input is larger."""
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode/decode a batch one sample at a time."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # --------------------------------------------------------------- encode

    def _check_input(self, x: torch.Tensor, name: str, channels: int) -> None:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{name}: expected a (B, {channels}, H, W) tensor, got shape {tuple(x.shape)}")

    def _run_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """encoder then quant_conv, on a whole batch or on one tile."""
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (x.shape[-1] > self.tile_sample_min_size or x.shape[-2] > self.tile_sample_min_size):
            return self._tiles(x, self.tile_sample_min_size, self.tile_latent_min_size, self._run_encoder)
        return self._run_encoder(x)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Union[AutoencoderKLOutput, Tuple]:
        """x: (B, in_channels, H, W) images in [-1, 1]. Returns the latent distribution."""
        self._check_input(x, "x", self.config.in_channels)
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(piece) for piece in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    # --------------------------------------------------------------- decode

    def _run_decoder(self, z: torch.Tensor) -> torch.Tensor:
        """post_quant_conv then decoder, on a whole batch or on one tile."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and (z.shape[-1] > self.tile_latent_min_size or z.shape[-2] > self.tile_latent_min_size):
            return self._tiles(z, self.tile_latent_min_size, self.tile_sample_min_size, self._run_decoder)
        return self._run_decoder(z)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Union[DecoderOutput, Tuple]:
        """z: (B, latent_channels, h, w) latents (already divided by ``scaling_factor``)."""
        self._check_input(z, "z", self.config.latent_channels)
        if self.use_slicing and z.shape[0] > 1:
            decoded = torch.cat([self._decode(piece) for piece in z.split(1)])
        else:
            decoded = self._decode(z)
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> Union[DecoderOutput, Tuple]:
        """Encode then decode, through the posterior's mode (or a sample of it)."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        decoded = self.decode(z).sample
        if not return_dict:
            return (decoded,)
        return DecoderOutput(sample=decoded)

    # --------------------------------------------------------------- tiles

    @staticmethod
    def _blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
        """Linear cross-fade of the bottom rows of ``a`` into the top rows of ``b`` (in place on b)."""
        extent = min(a.shape[2], b.shape[2], extent)
        for y in range(extent):
            b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
        return b

    @staticmethod
    def _blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
        """Linear cross-fade of the right columns of ``a`` into the left columns of ``b`` (in place on b)."""
        extent = min(a.shape[3], b.shape[3], extent)
        for x in range(extent):
            b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
        return b

    def _tiles(self, x: torch.Tensor, tile_in: int, tile_out: int, run) -> torch.Tensor:
        """Run ``run`` on overlapping ``tile_in`` tiles of ``x`` and stitch the ``tile_out``-sized results."""
        stride = int(tile_in * (1 - self.tile_overlap_factor))
        blend = int(tile_out * self.tile_overlap_factor)
        keep = tile_out - blend
        rows = [
            [run(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)
        ]
        out_rows = []
        for i, row in enumerate(rows):
            out_row = []
            for j, tile in enumerate(row):
                if i > 0:
                    tile = self._blend_v(rows[i - 1][j], tile, blend)
                if j > 0:
                    tile = self._blend_h(row[j - 1], tile, blend)
                out_row.append(tile[:, :, :keep, :keep])
            out_rows.append(torch.cat(out_row, dim=3))
        return torch.cat(out_rows, dim=2)
