"""ResnetBlock2D and the 2x down/upsamplers, with diffusers' parameter names.

Every GroupNorm followed by SiLU is one fused ``fastdiff.nn.GroupNorm(...,
activation="silu")``; the module keeps diffusers' name (``norm1``, ``norm2``), so
state_dict keys are unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn import GroupNorm

_SILU_NAMES = ("silu", "swish")


def check_silu(act_fn: str, what: str = "act_fn") -> None:
    """The fused GroupNorm only fuses SiLU, which is what every diffusers UNet and VAE uses."""
    if act_fn not in _SILU_NAMES:
        raise ValueError(f"{what}: only 'silu' (or its alias 'swish') is supported, got {act_fn!r}")


class ResnetBlock2D(nn.Module):
    """``x + conv2(drop(act(norm2(conv1(act(norm1(x))) + proj(act(temb))))))``, with a 1x1 shortcut
    when the channel count changes.

    ``time_embedding_norm``: ``"default"`` adds the projected time embedding before
    ``norm2``; ``"scale_shift"`` applies it as ``norm2(h) * (1 + scale) + shift``.
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
        eps: float = 1e-6,
        non_linearity: str = "swish",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        use_in_shortcut: Optional[bool] = None,
        conv_shortcut_bias: bool = True,
        conv_2d_out_channels: Optional[int] = None,
    ):
        super().__init__()
        check_silu(non_linearity)
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

        self.norm1 = GroupNorm(groups, in_channels, eps=eps, activation="silu")
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_out)
        # With scale_shift the affine modulation sits between the norm and the SiLU,
        # so only the default path can fuse the activation.
        norm2_act = "silu" if time_embedding_norm == "default" else None
        self.norm2 = GroupNorm(groups_out or groups, out_channels, eps=eps, activation=norm2_act)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, kernel_size=3, padding=1)

        use_in_shortcut = in_channels != conv_2d_out_channels if use_in_shortcut is None else use_in_shortcut
        self.conv_shortcut = (
            nn.Conv2d(in_channels, conv_2d_out_channels, kernel_size=1, bias=conv_shortcut_bias)
            if use_in_shortcut
            else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.conv1(self.norm1(input_tensor))
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("temb: this ResnetBlock2D projects a time embedding, but temb is None")
            temb = self.time_emb_proj(F.silu(temb))[:, :, None, None]
            if self.time_embedding_norm == "default":
                hidden = self.norm2(hidden + temb)
            else:
                scale, shift = temb.chunk(2, dim=1)
                hidden = F.silu(self.norm2(hidden) * (1 + scale) + shift)
        elif self.time_embedding_norm == "scale_shift":
            raise ValueError("temb: time_embedding_norm='scale_shift' needs temb_channels and a temb")
        else:
            hidden = self.norm2(hidden)
        hidden = self.conv2(self.dropout(hidden))
        shortcut = self.conv_shortcut(input_tensor) if self.conv_shortcut is not None else input_tensor
        # In place on conv2's fresh output (its backward does not need it): one full-size
        # activation less than diffusers' ``input + hidden``.
        out = hidden.add_(shortcut)
        if self.output_scale_factor != 1.0:
            out = out.div_(self.output_scale_factor)
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution (or 2x2 average pool without ``use_conv``).

    ``padding=0`` pads one row and column at the bottom/right first, as the
    original LDM VAE encoder does.
    """

    def __init__(self, channels: int, use_conv: bool = False, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
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
