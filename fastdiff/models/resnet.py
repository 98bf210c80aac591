"""ResnetBlock2D, ResnetBlockCondNorm2D and the 2x down/upsamplers, with diffusers' parameter names.

Every GroupNorm followed by SiLU is one fused ``fastdiff.nn.GroupNorm(...,
activation="silu")``; the module keeps diffusers' name (``norm1``, ``norm2``), so
state_dict keys are unchanged. Other activations (the K-UNet's GELU, for instance) run
after a plain ``fastdiff.nn.GroupNorm``.

The FIR resamplers of the score-SDE (NCSN++) UNets and the K-upscaler's resamplers hold
no parameters besides diffusers' ``Conv2d_0``; their filters are built in ``forward``
from constants, so a model built on the meta device needs nothing but its state_dict.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models.embeddings import get_activation
from fastdiff.nn import GroupNorm
from fastdiff.ops import group_norm

_SILU_NAMES = ("silu", "swish")
_FIR_KERNEL = (1, 3, 3, 1)


def _norm_then_act(groups: int, channels: int, eps: float, act_fn: str) -> Tuple[GroupNorm, Optional[nn.Module]]:
    """A GroupNorm with SiLU fused in, or a plain one and the activation to apply after it."""
    if act_fn in _SILU_NAMES:
        return GroupNorm(groups, channels, eps=eps, activation="silu"), None
    return GroupNorm(groups, channels, eps=eps), get_activation(act_fn)


# ---------------------------------------------------------------------------
# FIR resampling (score-SDE / NCSN++), after diffusers' upfirdn2d_native
# ---------------------------------------------------------------------------


def _fir_filter(kernel: Sequence[float], gain: float, like: torch.Tensor) -> torch.Tensor:
    """The normalised 2-D filter (outer product of a 1-D one), scaled by ``gain``."""
    k = torch.tensor(kernel, dtype=torch.float32)
    if k.ndim == 1:
        k = torch.outer(k, k)
    k = k / k.sum() * gain
    return k.to(device=like.device, dtype=like.dtype)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad: Tuple[int, int] = (0, 0)):
    """Upsample by zero insertion, pad (negative pads crop), convolve with ``kernel``, keep every ``down``-th pixel.

    x: (N, C, H, W); kernel: (kh, kw), applied to every channel (a true convolution, so
    the kernel is flipped, as in diffusers' ``upfirdn2d_native``).
    """
    n, c, h, w = x.shape
    if up > 1:
        spread = x.new_zeros(n, c, h, up, w, up)
        spread[:, :, :, 0, :, 0] = x
        x = spread.reshape(n, c, h * up, w * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = torch.flip(kernel, [0, 1])[None, None].expand(c, 1, *kernel.shape)
    x = F.conv2d(x, weight, groups=c)
    return x[:, :, ::down, ::down]


def upsample_2d(x: torch.Tensor, kernel: Sequence[float] = _FIR_KERNEL, factor: int = 2, gain: float = 1.0):
    """FIR upsampling by ``factor`` (diffusers' ``upsample_2d``)."""
    k = _fir_filter(kernel, gain * factor**2, x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: torch.Tensor, kernel: Sequence[float] = _FIR_KERNEL, factor: int = 2, gain: float = 1.0):
    """FIR downsampling by ``factor`` (diffusers' ``downsample_2d``)."""
    k = _fir_filter(kernel, gain, x)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


class FirUpsample2D(nn.Module):
    """2x FIR upsampling, optionally fused with a 3x3 convolution (``Conv2d_0``, as in diffusers)."""

    def __init__(
        self,
        channels: Optional[int] = None,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        fir_kernel: Sequence[int] = _FIR_KERNEL,
    ):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.Conv2d_0 = nn.Conv2d(channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.use_conv = use_conv
        self.fir_kernel = tuple(fir_kernel)
        self.out_channels = out_channels

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return upsample_2d(hidden_states, self.fir_kernel)
        # Transposed stride-2 convolution with the flipped 3x3 weight, then the FIR filter.
        factor, weight = 2, self.Conv2d_0.weight
        k = _fir_filter(self.fir_kernel, factor**2, hidden_states)
        p = (k.shape[0] - factor) - (weight.shape[3] - 1)
        flipped = torch.flip(weight, dims=[2, 3]).transpose(0, 1)
        out = F.conv_transpose2d(hidden_states, flipped, stride=factor)
        out = upfirdn2d(out, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))
        return out + self.Conv2d_0.bias.reshape(1, -1, 1, 1)


class FirDownsample2D(nn.Module):
    """2x FIR downsampling, optionally fused with a 3x3 convolution (``Conv2d_0``, as in diffusers)."""

    def __init__(
        self,
        channels: Optional[int] = None,
        out_channels: Optional[int] = None,
        use_conv: bool = False,
        fir_kernel: Sequence[int] = _FIR_KERNEL,
    ):
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.Conv2d_0 = nn.Conv2d(channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.fir_kernel = tuple(fir_kernel)
        self.use_conv = use_conv
        self.out_channels = out_channels

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.use_conv:
            return downsample_2d(hidden_states, self.fir_kernel)
        factor, weight = 2, self.Conv2d_0.weight
        k = _fir_filter(self.fir_kernel, 1.0, hidden_states)
        p = (k.shape[0] - factor) + (weight.shape[3] - 1)
        out = upfirdn2d(hidden_states, k, pad=((p + 1) // 2, p // 2))
        return F.conv2d(out, weight, stride=factor) + self.Conv2d_0.bias.reshape(1, -1, 1, 1)


# ---------------------------------------------------------------------------
# K-upscaler resampling: a fixed separable [1, 3, 3, 1] / 8 filter per channel
# ---------------------------------------------------------------------------


def _k_filter(like: torch.Tensor, scale: float) -> torch.Tensor:
    k = torch.tensor([1 / 8, 3 / 8, 3 / 8, 1 / 8], dtype=torch.float32) * scale
    k = torch.outer(k, k).to(device=like.device, dtype=like.dtype)
    return k[None, None].expand(like.shape[1], 1, 4, 4)


class KDownsample2D(nn.Module):
    """Reflect-pad by 1, then a stride-2 per-channel [1, 3, 3, 1] / 8 filter."""

    def __init__(self, pad_mode: str = "reflect"):
        super().__init__()
        self.pad_mode = pad_mode
        self.pad = 1

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = F.pad(inputs, (self.pad,) * 4, self.pad_mode)
        return F.conv2d(inputs, _k_filter(inputs, 1.0), stride=2, groups=inputs.shape[1])


class KUpsample2D(nn.Module):
    """Reflect-pad by 1, then a stride-2 transposed per-channel [1, 3, 3, 1] / 4 filter."""

    def __init__(self, pad_mode: str = "reflect"):
        super().__init__()
        self.pad_mode = pad_mode
        self.pad = 1

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = F.pad(inputs, ((self.pad + 1) // 2,) * 4, self.pad_mode)
        weight = _k_filter(inputs, 2.0)
        return F.conv_transpose2d(inputs, weight, stride=2, padding=self.pad * 2 + 1, groups=inputs.shape[1])


# ---------------------------------------------------------------------------
# Resnet blocks
# ---------------------------------------------------------------------------


def _nearest_2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _avg_pool_2x(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def _resampler(up: bool, down: bool, kernel: Optional[str], channels: int):
    """The parameter-free 2x resampling a resnet applies to both branches (diffusers' choices)."""
    if kernel not in (None, "fir", "sde_vp"):
        raise ValueError(f"kernel: expected None, 'fir' or 'sde_vp', got {kernel!r}")
    if up:
        if kernel == "fir":
            return upsample_2d, None
        if kernel == "sde_vp":
            return _nearest_2x, None
        return None, Upsample2D(channels, use_conv=False)
    if down:
        if kernel == "fir":
            return downsample_2d, None
        if kernel == "sde_vp":
            return _avg_pool_2x, None
        return None, Downsample2D(channels, use_conv=False)
    return None, None


class ProjectedTimeEmbedding:
    """The time embedding with every ResnetBlock2D's ``time_emb_proj(act(emb))`` already
    computed (one GEMM over concatenated weights, see
    ``UNet2DConditionModel``): what the UNet passes down its blocks as ``temb``. A
    block finds its own projection with :meth:`projection`."""

    __slots__ = ("emb", "projections")

    def __init__(self, emb: torch.Tensor, projections: dict):
        self.emb = emb
        self.projections = projections

    def projection(self, block: nn.Module) -> Optional[torch.Tensor]:
        return self.projections.get(block)


class ResnetBlock2D(nn.Module):
    """``(shortcut(x) + conv2(drop(act(norm2(conv1(act(norm1(x))) + proj(act(temb)))))) / output_scale_factor``,
    with a 1x1 shortcut when the channel count changes.

    ``time_embedding_norm``: ``"default"`` adds the projected time embedding before
    ``norm2`` (as the GroupNorm's ``input_bias``, fused into its loads); ``"scale_shift"`` applies it as ``norm2(h) * (1 + scale) + shift``
    (``"ada_group"`` and ``"spatial"`` are :class:`ResnetBlockCondNorm2D`'s).
    ``up``/``down`` resample both branches by 2 after ``norm1`` (``kernel``: None for
    nearest/average pooling, ``"fir"`` for the [1, 3, 3, 1] FIR filter, ``"sde_vp"``).
    ``skip_time_act`` feeds ``temb`` to the projection without the activation.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: Optional[int] = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: Optional[int] = 512,
        groups: int = 32,
        groups_out: Optional[int] = None,
        pre_norm: bool = True,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        skip_time_act: bool = False,
        time_embedding_norm: str = "default",
        kernel: Optional[str] = None,
        output_scale_factor: float = 1.0,
        use_in_shortcut: Optional[bool] = None,
        up: bool = False,
        down: bool = False,
        conv_shortcut_bias: bool = True,
        conv_2d_out_channels: Optional[int] = None,
    ):
        super().__init__()
        if time_embedding_norm in ("ada_group", "spatial"):
            raise ValueError(
                f"time_embedding_norm: {time_embedding_norm!r} belongs to ResnetBlockCondNorm2D, not ResnetBlock2D"
            )
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                f"time_embedding_norm: expected 'default' or 'scale_shift', got {time_embedding_norm!r}"
            )
        if conv_shortcut:
            raise ValueError("conv_shortcut: the 3x3 shortcut convolution is not supported; expected False (a 1x1 shortcut)")
        out_channels = out_channels or in_channels
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.skip_time_act = skip_time_act
        self.up, self.down = up, down

        self.norm1, self.act1 = _norm_then_act(groups, in_channels, eps, non_linearity)
        self.nonlinearity = get_activation(non_linearity)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_out)
        # With scale_shift the affine modulation sits between the norm and the activation,
        # so only the default path can fuse it.
        if time_embedding_norm == "default":
            self.norm2, self.act2 = _norm_then_act(groups_out or groups, out_channels, eps, non_linearity)
        else:
            self.norm2, self.act2 = GroupNorm(groups_out or groups, out_channels, eps=eps), self.nonlinearity
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, padding=1)

        self._resample, resample_module = _resampler(up, down, kernel, in_channels)
        self.upsample = resample_module if up else None
        self.downsample = resample_module if down and not up else None

        use_in_shortcut = in_channels != conv_2d_out_channels if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = (
            nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, bias=conv_shortcut_bias)
            if use_in_shortcut
            else None
        )

    def _resample_both(self, input_tensor, hidden):
        resample = self._resample or self.upsample or self.downsample
        if resample is None:
            return input_tensor, hidden
        return resample(input_tensor), resample(hidden)

    def _norm2_plus_time(self, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``norm2(hidden + temb[:, :, None, None])``, with the time embedding passed to the
        GroupNorm as its input bias (added on load, no separate full-size add) whenever it is
        a per-(N, C) tensor of hidden's dtype and device; else the explicit broadcast add."""
        if (
            isinstance(self.norm2, GroupNorm)
            and temb.dim() == 2
            and temb.shape == hidden.shape[:2]
            and temb.dtype == hidden.dtype
            and temb.device == hidden.device
        ):
            return self.norm2(hidden, input_bias=temb)
        return self.norm2(hidden + temb[:, :, None, None])

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.norm1(input_tensor)
        if self.act1 is not None:
            hidden = self.act1(hidden)
        input_tensor, hidden = self._resample_both(input_tensor, hidden)
        hidden = self.conv1(hidden)
        projected = temb.projection(self) if isinstance(temb, ProjectedTimeEmbedding) else None
        if isinstance(temb, ProjectedTimeEmbedding) and projected is None:
            temb = temb.emb
        if self.time_emb_proj is not None:
            if projected is not None:
                temb = projected
            else:
                if temb is None:
                    raise ValueError("temb: this ResnetBlock2D projects a time embedding, but temb is None")
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)
                temb = self.time_emb_proj(temb)
            if self.time_embedding_norm == "default":
                hidden = self._norm2_plus_time(hidden, temb)
            else:
                temb = temb[:, :, None, None]
                scale, shift = temb.chunk(2, dim=1)
                hidden = self.norm2(hidden) * (1 + scale) + shift
        elif self.time_embedding_norm == "scale_shift":
            raise ValueError("temb: time_embedding_norm='scale_shift' needs temb_channels and a temb")
        else:
            hidden = self.norm2(hidden)
        if self.act2 is not None:
            hidden = self.act2(hidden)
        hidden = self.conv2(self.dropout(hidden))
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        # In place on conv2's fresh output (its backward does not need it): one full-size
        # activation less than diffusers' ``input + hidden``.
        out = hidden.add_(shortcut)
        if self.output_scale_factor != 1.0:
            out = out.div_(self.output_scale_factor)
        return out


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine parameters, modulated by the embedding: ``norm(x) * (1 + scale) + shift``."""

    def __init__(self, embedding_dim: int, out_dim: int, num_groups: int, act_fn: Optional[str] = None, eps: float = 1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.act = None if act_fn is None else get_activation(act_fn)
        self.linear = nn.Linear(embedding_dim, out_dim * 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            emb = self.act(emb)
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
        return group_norm(x, self.num_groups, eps=self.eps) * (1 + scale) + shift


class ResnetBlockCondNorm2D(nn.Module):
    """A resnet block whose norms take the conditioning: ``"ada_group"`` (:class:`AdaGroupNorm`
    on ``temb``, the K-UNet's) or ``"spatial"`` (``SpatialNorm`` on a feature map, MoVQ's)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: Optional[int] = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 512,
        groups: int = 32,
        groups_out: Optional[int] = None,
        eps: float = 1e-6,
        non_linearity: str = "swish",
        time_embedding_norm: str = "ada_group",
        output_scale_factor: float = 1.0,
        use_in_shortcut: Optional[bool] = None,
        up: bool = False,
        down: bool = False,
        conv_shortcut_bias: bool = True,
        conv_2d_out_channels: Optional[int] = None,
    ):
        super().__init__()
        if conv_shortcut:
            raise ValueError("conv_shortcut: the 3x3 shortcut convolution is not supported; expected False (a 1x1 shortcut)")
        out_channels = out_channels or in_channels
        groups_out = groups_out or groups
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.up, self.down = up, down
        if time_embedding_norm == "ada_group":
            self.norm1 = AdaGroupNorm(temb_channels, in_channels, groups, eps=eps)
            self.norm2 = AdaGroupNorm(temb_channels, out_channels, groups_out, eps=eps)
        elif time_embedding_norm == "spatial":
            from fastdiff.nn.attention import SpatialNorm

            self.norm1 = SpatialNorm(in_channels, temb_channels)
            self.norm2 = SpatialNorm(out_channels, temb_channels)
        else:
            raise ValueError(f"time_embedding_norm: expected 'ada_group' or 'spatial', got {time_embedding_norm!r}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(dropout)
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, padding=1)
        self.nonlinearity = get_activation(non_linearity)
        self.upsample = Upsample2D(in_channels, use_conv=False) if up else None
        self.downsample = Downsample2D(in_channels, use_conv=False) if down and not up else None
        use_in_shortcut = in_channels != conv_2d_out_channels if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = (
            nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, bias=conv_shortcut_bias)
            if use_in_shortcut
            else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if temb is None:
            raise ValueError(f"temb: ResnetBlockCondNorm2D ({self.time_embedding_norm}) needs the conditioning tensor")
        hidden = self.nonlinearity(self.norm1(input_tensor, temb))
        resample = self.upsample or self.downsample
        if resample is not None:
            input_tensor, hidden = resample(input_tensor), resample(hidden)
        hidden = self.nonlinearity(self.norm2(self.conv1(hidden), temb))
        hidden = self.conv2(self.dropout(hidden))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden) / self.output_scale_factor


# ---------------------------------------------------------------------------
# 2x down/upsamplers of the plain UNets and the VAE
# ---------------------------------------------------------------------------


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution (or 2x2 average pool without ``use_conv``).

    ``padding=0`` pads one row and column at the bottom/right first, as the
    original LDM VAE encoder does.
    """

    def __init__(
        self, channels: int, use_conv: bool = False, out_channels: Optional[int] = None, padding: int = 1, name: str = "conv"
    ):
        super().__init__()
        if name != "conv":
            raise ValueError(f"name: only 'conv' (diffusers' parameter name) is supported, got {name!r}")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.padding = padding
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError("out_channels: average-pool downsampling cannot change the channel count")
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            hidden_states = F.pad(hidden_states, (0, 1, 0, 1))
        return self.conv(hidden_states)


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (or to ``output_size``), then an optional 3x3 convolution."""

    def __init__(self, channels: int, use_conv: bool = False, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.conv = nn.Conv2d(channels, self.out_channels, kernel_size=3, padding=1) if use_conv else None

    def forward(self, hidden_states: torch.Tensor, output_size: Optional[Sequence[int]] = None) -> torch.Tensor:
        if output_size is None:
            hidden_states = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
        else:
            hidden_states = F.interpolate(hidden_states, size=tuple(output_size), mode="nearest")
        if self.conv is not None:
            hidden_states = self.conv(hidden_states)
        return hidden_states
