"""Down, mid and up blocks of the UNets and the VAE, with diffusers' names, wiring and state_dict keys.

Every block type that diffusers' ``get_down_block``, ``get_mid_block`` and ``get_up_block``
accept by name is listed in ``DOWN_BLOCK_TYPES``, ``MID_BLOCK_TYPES`` and ``UP_BLOCK_TYPES``
(a ``UNetRes`` prefix is stripped, as in diffusers), each built with diffusers' wiring and
state_dict keys. Any other name raises a ValueError that lists them; no name is ever
replaced by another block.

* plain UNets and the VAE: ``DownBlock2D``, ``AttnDownBlock2D``, ``CrossAttnDownBlock2D``,
  ``DownEncoderBlock2D``, ``AttnDownEncoderBlock2D`` and their up twins, ``UNetMidBlock2D``,
  ``UNetMidBlock2DCrossAttn``;
* resnet resampling (unCLIP, DeepFloyd IF): ``ResnetDownsampleBlock2D``, ``ResnetUpsampleBlock2D``,
  ``SimpleCrossAttnDownBlock2D``, ``SimpleCrossAttnUpBlock2D``, ``UNetMidBlock2DSimpleCrossAttn``;
* score-SDE / NCSN++ (FIR resampling and an image skip path): ``SkipDownBlock2D``,
  ``AttnSkipDownBlock2D``, ``SkipUpBlock2D``, ``AttnSkipUpBlock2D``;
* the K-upscaler: ``KDownBlock2D``, ``KCrossAttnDownBlock2D``, ``KUpBlock2D``, ``KCrossAttnUpBlock2D``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastdiff.models.modeling_utils import call_maybe_checkpointed
from fastdiff.models.resnet import (
    Downsample2D,
    FirDownsample2D,
    FirUpsample2D,
    KDownsample2D,
    KUpsample2D,
    ResnetBlock2D,
    ResnetBlockCondNorm2D,
    Upsample2D,
)
from fastdiff.models.transformer_2d import Transformer2DModel
from fastdiff.nn import Attention, GroupNorm

DOWN_BLOCK_TYPES = (
    "DownBlock2D",
    "ResnetDownsampleBlock2D",
    "AttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D",
    "SkipDownBlock2D",
    "AttnSkipDownBlock2D",
    "DownEncoderBlock2D",
    "AttnDownEncoderBlock2D",
    "KDownBlock2D",
    "KCrossAttnDownBlock2D",
)
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D")
UP_BLOCK_TYPES = (
    "UpBlock2D",
    "ResnetUpsampleBlock2D",
    "CrossAttnUpBlock2D",
    "SimpleCrossAttnUpBlock2D",
    "AttnUpBlock2D",
    "SkipUpBlock2D",
    "AttnSkipUpBlock2D",
    "UpDecoderBlock2D",
    "AttnUpDecoderBlock2D",
    "KUpBlock2D",
    "KCrossAttnUpBlock2D",
)

#: NCSN++ blocks scale every residual sum by 1/sqrt(2).
_SKIP_SCALE = math.sqrt(2.0)


def spatial_attention(
    channels: int,
    head_dim: Optional[int],
    eps: float,
    groups: Optional[int],
    rescale: float,
    legacy_names: bool = True,
    spatial_norm_dim: Optional[int] = None,
) -> Attention:
    """The GroupNorm + single self-attention block of UNet2DModel and the VAE, applied to (B, C, H, W)
    with its own residual. Old checkpoints name its projections query/key/value/proj_attn;
    the loader renames them (see ``ModelMixin._rename_legacy_keys``) where diffusers does
    (``legacy_names``). ``head_dim=None`` means one head over all channels, as in diffusers."""
    head_dim = head_dim or channels
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        rescale_output_factor=rescale,
        eps=eps,
        norm_num_groups=groups,
        spatial_norm_dim=spatial_norm_dim,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=legacy_names,
    )


def _resnet(time_scale_shift: str = "default", conditioned_norms: bool = False, **kwargs) -> nn.Module:
    """A ResnetBlock2D, or, in the blocks where diffusers builds one for ``"spatial"`` (the VAE-style
    decoder and mid blocks: ``conditioned_norms``), a ResnetBlockCondNorm2D. Elsewhere ResnetBlock2D
    refuses ``"spatial"``/``"ada_group"`` with a ValueError, as diffusers does."""
    if conditioned_norms and time_scale_shift == "spatial":
        kwargs.pop("skip_time_act", None)
        return ResnetBlockCondNorm2D(time_embedding_norm=time_scale_shift, **kwargs)
    return ResnetBlock2D(time_embedding_norm=time_scale_shift, **kwargs)


def _resnets(in_channels: int, out_channels: int, num_layers: int, **resnet_kwargs) -> nn.ModuleList:
    """``resnet_kwargs`` are ResnetBlock2D's (``conditioned_norms`` as in :func:`_resnet`)."""
    kind = resnet_kwargs.pop("time_embedding_norm", "default")
    return nn.ModuleList(
        [
            _resnet(kind, in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, **resnet_kwargs)
            for i in range(num_layers)
        ]
    )


def _up_resnets(
    in_channels: int, prev_output_channel: int, out_channels: int, num_layers: int, **resnet_kwargs
) -> nn.ModuleList:
    """Up-block resnets take the previous output concatenated with a skip connection."""
    kind = resnet_kwargs.pop("time_embedding_norm", "default")
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        resnet_in = prev_output_channel if i == 0 else out_channels
        resnets.append(_resnet(kind, in_channels=resnet_in + skip_channels, out_channels=out_channels, **resnet_kwargs))
    return nn.ModuleList(resnets)


def _no_temb_conditioning(time_scale_shift: str, block: str) -> None:
    """Encoder blocks get no temb, so diffusers' conditioned norms cannot be built there either."""
    if time_scale_shift not in ("default", "scale_shift"):
        raise ValueError(
            f"resnet_time_scale_shift: {block} has no time embedding, so it takes 'default', got {time_scale_shift!r}"
        )


def _pop_skip(hidden_states: torch.Tensor, skips: Tuple[torch.Tensor, ...]):
    return torch.cat([hidden_states, skips[-1]], dim=1), skips[:-1]


def _transformers(
    channels: int,
    num_layers: int,
    transformer_layers_per_block: Union[int, Sequence[int]],
    num_attention_heads: int,
    **transformer_kwargs,
) -> nn.ModuleList:
    """One Transformer2DModel per resnet of a cross-attention block; ``transformer_layers_per_block``
    is one depth for all of them or one per resnet."""
    if isinstance(transformer_layers_per_block, int):
        transformer_layers_per_block = [transformer_layers_per_block] * num_layers
    return nn.ModuleList(
        [
            Transformer2DModel(
                num_attention_heads,
                channels // num_attention_heads,
                in_channels=channels,
                num_layers=transformer_layers_per_block[i],
                **transformer_kwargs,
            )
            for i in range(num_layers)
        ]
    )


# ---------------------------------------------------------------------------
# Down blocks: forward returns (hidden_states, skip states for the up path)
# ---------------------------------------------------------------------------


class DownBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: Optional[int],
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups,
            dropout=dropout, time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
            if add_downsample
            else None
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states, temb=None):
        output_states = ()
        for resnet in self.resnets:
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class AttnDownBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: Optional[int],
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: Optional[int] = 1,
        output_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        downsample_type: Optional[str] = "conv",
    ):
        super().__init__()
        if downsample_type not in ("conv", "resnet", None):
            raise ValueError(f"downsample_type: expected 'conv', 'resnet' or None, got {downsample_type!r}")
        self.downsample_type = downsample_type
        resnet_kwargs = dict(
            temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
        )
        self.resnets = _resnets(in_channels, out_channels, num_layers, **resnet_kwargs)
        self.attentions = nn.ModuleList(
            [
                spatial_attention(out_channels, attention_head_dim, resnet_eps, resnet_groups, output_scale_factor)
                for _ in range(num_layers)
            ]
        )
        if downsample_type == "conv":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
        elif downsample_type == "resnet":
            self.downsamplers = nn.ModuleList(
                [ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, down=True, **resnet_kwargs)]
            )
        else:
            self.downsamplers = None
        self.gradient_checkpointing = False

    def forward(self, hidden_states, temb=None):
        output_states = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            if self.downsample_type == "resnet":
                hidden_states = self.downsamplers[0](hidden_states, temb)
            else:
                hidden_states = self.downsamplers[0](hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class CrossAttnDownBlock2D(nn.Module):
    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        transformer_layers_per_block: Union[int, Sequence[int]] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        downsample_padding: int = 1,
        add_downsample: bool = True,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups,
            dropout=dropout, time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
        )
        self.attentions = _transformers(
            out_channels, num_layers, transformer_layers_per_block, num_attention_heads,
            cross_attention_dim=cross_attention_dim, norm_num_groups=resnet_groups,
            use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention,
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
            if add_downsample
            else None
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states,
        temb=None,
        encoder_hidden_states=None,
        attention_mask=None,
        encoder_attention_mask=None,
        additional_residuals=None,
        cross_attention_kwargs=None,
    ):
        """``additional_residuals`` (a T2I-Adapter feature) is added after the last attention."""
        output_states = ()
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs)
            if additional_residuals is not None and i == len(self.resnets) - 1:
                hidden_states = hidden_states + additional_residuals
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
            output_states += (hidden_states,)
        return hidden_states, output_states


class DownEncoderBlock2D(nn.Module):
    """VAE encoder block: resnets without a time embedding, then an optional downsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        _no_temb_conditioning(resnet_time_scale_shift, "DownEncoderBlock2D")
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, temb_channels=None, eps=resnet_eps, groups=resnet_groups,
            dropout=dropout, non_linearity=resnet_act_fn, time_embedding_norm=resnet_time_scale_shift,
            output_scale_factor=output_scale_factor,
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(self, hidden_states):
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class AttnDownEncoderBlock2D(nn.Module):
    """VAE encoder block with a spatial self-attention after each resnet."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: Optional[int] = 1,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        _no_temb_conditioning(resnet_time_scale_shift, "AttnDownEncoderBlock2D")
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, temb_channels=None, eps=resnet_eps, groups=resnet_groups,
            dropout=dropout, non_linearity=resnet_act_fn, time_embedding_norm=resnet_time_scale_shift,
            output_scale_factor=output_scale_factor,
        )
        self.attentions = nn.ModuleList(
            [
                spatial_attention(out_channels, attention_head_dim, resnet_eps, resnet_groups, output_scale_factor)
                for _ in range(num_layers)
            ]
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
            if add_downsample
            else None
        )

    def forward(self, hidden_states):
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states))
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states


class ResnetDownsampleBlock2D(nn.Module):
    """DownBlock2D whose downsampler is a resnet with ``down=True`` (unCLIP, DeepFloyd IF)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        skip_time_act: bool = False,
    ):
        super().__init__()
        resnet_kwargs = dict(
            temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor, skip_time_act=skip_time_act,
        )
        self.resnets = _resnets(in_channels, out_channels, num_layers, **resnet_kwargs)
        self.downsamplers = (
            nn.ModuleList([ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, down=True, **resnet_kwargs)])
            if add_downsample
            else None
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states, temb=None):
        output_states = ()
        for resnet in self.resnets:
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, temb)
            output_states += (hidden_states,)
        return hidden_states, output_states


class SkipDownBlock2D(nn.Module):
    """NCSN++ down block: resnets, then a FIR-downsampling resnet; the image skip path is
    FIR-downsampled and added through a 1x1 ``skip_conv``. ``forward`` returns
    ``(hidden_states, skip states, skip_sample)``. GroupNorm groups are ``min(channels // 4, 32)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_pre_norm: bool = True,
        output_scale_factor: float = _SKIP_SCALE,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        self.resnets = _skip_down_resnets(
            in_channels, out_channels, num_layers, temb_channels, resnet_eps, dropout, resnet_time_scale_shift,
            resnet_act_fn, output_scale_factor,
        )
        self._build_downsampling(
            add_downsample, out_channels, temb_channels, resnet_eps, dropout, resnet_time_scale_shift,
            resnet_act_fn, output_scale_factor,
        )

    def _build_downsampling(self, add_downsample, out_channels, temb_channels, eps, dropout, shift, act, scale):
        if add_downsample:
            self.resnet_down = ResnetBlock2D(
                in_channels=out_channels, out_channels=out_channels, temb_channels=temb_channels, eps=eps,
                groups=min(out_channels // 4, 32), dropout=dropout, time_embedding_norm=shift, non_linearity=act,
                output_scale_factor=scale, use_in_shortcut=True, down=True, kernel="fir",
            )
            self.downsamplers = nn.ModuleList([FirDownsample2D(out_channels, out_channels=out_channels)])
            self.skip_conv = nn.Conv2d(3, out_channels, kernel_size=1)
        else:
            self.resnet_down = None
            self.downsamplers = None
            self.skip_conv = None

    def _downsample(self, hidden_states, temb, skip_sample, output_states):
        if self.downsamplers is not None:
            if skip_sample is None:
                raise ValueError(f"skip_sample: {type(self).__name__} needs the (B, 3, H, W) image skip path")
            hidden_states = self.resnet_down(hidden_states, temb)
            skip_sample = self.downsamplers[0](skip_sample)
            hidden_states = self.skip_conv(skip_sample) + hidden_states
            output_states += (hidden_states,)
        return hidden_states, output_states, skip_sample

    def forward(self, hidden_states, temb=None, skip_sample=None):
        output_states = ()
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
            output_states += (hidden_states,)
        return self._downsample(hidden_states, temb, skip_sample, output_states)


class AttnSkipDownBlock2D(SkipDownBlock2D):
    """SkipDownBlock2D with a spatial self-attention (32 groups, as in diffusers) after each resnet."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_pre_norm: bool = True,
        attention_head_dim: Optional[int] = 1,
        output_scale_factor: float = _SKIP_SCALE,
        add_downsample: bool = True,
    ):
        nn.Module.__init__(self)
        self.resnets = _skip_down_resnets(
            in_channels, out_channels, num_layers, temb_channels, resnet_eps, dropout, resnet_time_scale_shift,
            resnet_act_fn, output_scale_factor,
        )
        self.attentions = nn.ModuleList(
            [
                spatial_attention(out_channels, attention_head_dim, resnet_eps, 32, output_scale_factor)
                for _ in range(num_layers)
            ]
        )
        self._build_downsampling(
            add_downsample, out_channels, temb_channels, resnet_eps, dropout, resnet_time_scale_shift,
            resnet_act_fn, output_scale_factor,
        )

    def forward(self, hidden_states, temb=None, skip_sample=None):
        output_states = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = attn(resnet(hidden_states, temb))
            output_states += (hidden_states,)
        return self._downsample(hidden_states, temb, skip_sample, output_states)


def _skip_down_resnets(in_channels, out_channels, num_layers, temb_channels, eps, dropout, shift, act, scale):
    resnets = []
    for i in range(num_layers):
        block_in = in_channels if i == 0 else out_channels
        resnets.append(
            ResnetBlock2D(
                in_channels=block_in, out_channels=out_channels, temb_channels=temb_channels, eps=eps,
                groups=min(block_in // 4, 32), groups_out=min(out_channels // 4, 32), dropout=dropout,
                time_embedding_norm=shift, non_linearity=act, output_scale_factor=scale,
            )
        )
    return nn.ModuleList(resnets)


# ---------------------------------------------------------------------------
# Mid blocks
# ---------------------------------------------------------------------------


class UNetMidBlock2D(nn.Module):
    """resnet, then ``num_layers`` x (spatial attention, resnet). Used by UNet2DModel and the VAE.

    ``resnet_time_scale_shift="spatial"`` (MoVQ decoders) conditions the norms of the resnets
    and attentions on ``temb``, a feature map."""

    def __init__(
        self,
        in_channels: int,
        temb_channels: Optional[int],
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: Optional[int] = 32,
        attn_groups: Optional[int] = None,
        resnet_pre_norm: bool = True,
        add_attention: bool = True,
        attention_head_dim: Optional[int] = 1,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        if attn_groups is None:
            attn_groups = resnet_groups if resnet_time_scale_shift == "default" else None
        spatial = resnet_time_scale_shift == "spatial"
        resnet_kwargs = dict(
            in_channels=in_channels, out_channels=in_channels, temb_channels=temb_channels, eps=resnet_eps,
            groups=resnet_groups, dropout=dropout, non_linearity=resnet_act_fn, output_scale_factor=output_scale_factor,
        )
        self.add_attention = add_attention
        self.resnets = nn.ModuleList(
            [_resnet(resnet_time_scale_shift, conditioned_norms=True, **resnet_kwargs) for _ in range(num_layers + 1)]
        )
        self.attentions = nn.ModuleList(
            [
                spatial_attention(
                    in_channels, attention_head_dim, resnet_eps, attn_groups, output_scale_factor,
                    spatial_norm_dim=temb_channels if spatial else None,
                )
                if add_attention
                else None
                for _ in range(num_layers)
            ]
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states, temb=None):
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            if attn is not None:
                hidden_states = attn(hidden_states, temb=temb)
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
        return hidden_states


class UNetMidBlock2DCrossAttn(nn.Module):
    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        transformer_layers_per_block: Union[int, Sequence[int]] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        output_scale_factor: float = 1.0,
        cross_attention_dim: int = 1280,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        resnet_kwargs = dict(
            in_channels=in_channels, out_channels=in_channels, temb_channels=temb_channels, eps=resnet_eps,
            groups=resnet_groups, dropout=dropout, time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn, output_scale_factor=output_scale_factor,
        )
        self.resnets = nn.ModuleList([ResnetBlock2D(**resnet_kwargs) for _ in range(num_layers + 1)])
        self.attentions = _transformers(
            in_channels, num_layers, transformer_layers_per_block, num_attention_heads,
            cross_attention_dim=cross_attention_dim, norm_num_groups=resnet_groups,
            use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states,
        temb=None,
        encoder_hidden_states=None,
        attention_mask=None,
        encoder_attention_mask=None,
        cross_attention_kwargs=None,
    ):
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs)
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
        return hidden_states


# ---------------------------------------------------------------------------
# Up blocks: forward consumes skip states from the end of ``res_hidden_states_tuple``
# ---------------------------------------------------------------------------


class UpBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        add_upsample: bool = True,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx
        self.resnets = _up_resnets(
            in_channels, prev_output_channel, out_channels, num_layers, temb_channels=temb_channels, eps=resnet_eps,
            groups=resnet_groups, dropout=dropout, time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None
        self.gradient_checkpointing = False

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        for resnet in self.resnets:
            hidden_states, res_hidden_states_tuple = _pop_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class AttnUpBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: Optional[int] = 1,
        output_scale_factor: float = 1.0,
        upsample_type: Optional[str] = "conv",
    ):
        super().__init__()
        if upsample_type not in ("conv", "resnet", None):
            raise ValueError(f"upsample_type: expected 'conv', 'resnet' or None, got {upsample_type!r}")
        self.upsample_type = upsample_type
        self.resolution_idx = resolution_idx
        resnet_kwargs = dict(
            temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor,
        )
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, num_layers, **resnet_kwargs)
        self.attentions = nn.ModuleList(
            [
                spatial_attention(out_channels, attention_head_dim, resnet_eps, resnet_groups, output_scale_factor)
                for _ in range(num_layers)
            ]
        )
        if upsample_type == "conv":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)])
        elif upsample_type == "resnet":
            self.upsamplers = nn.ModuleList(
                [ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, up=True, **resnet_kwargs)]
            )
        else:
            self.upsamplers = None
        self.gradient_checkpointing = False

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states, res_hidden_states_tuple = _pop_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states)
        if self.upsamplers is not None:
            # diffusers' AttnUpBlock2D always doubles, ignoring upsample_size.
            if self.upsample_type == "resnet":
                hidden_states = self.upsamplers[0](hidden_states, temb)
            else:
                hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class CrossAttnUpBlock2D(nn.Module):
    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channel: int,
        temb_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        transformer_layers_per_block: Union[int, Sequence[int]] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        add_upsample: bool = True,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx
        self.resnets = _up_resnets(
            in_channels, prev_output_channel, out_channels, num_layers, temb_channels=temb_channels, eps=resnet_eps,
            groups=resnet_groups, dropout=dropout, time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
        )
        self.attentions = _transformers(
            out_channels, num_layers, transformer_layers_per_block, num_attention_heads,
            cross_attention_dim=cross_attention_dim, norm_num_groups=resnet_groups,
            use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention,
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states,
        res_hidden_states_tuple,
        temb=None,
        encoder_hidden_states=None,
        upsample_size=None,
        attention_mask=None,
        encoder_attention_mask=None,
        cross_attention_kwargs=None,
    ):
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states, res_hidden_states_tuple = _pop_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """VAE decoder block: resnets without skips, then an optional upsampler. ``temb`` is only
    used with ``resnet_time_scale_shift="spatial"`` (MoVQ), where it is the conditioning map."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        temb_channels: Optional[int] = None,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups,
            dropout=dropout, non_linearity=resnet_act_fn, time_embedding_norm=resnet_time_scale_shift,
            output_scale_factor=output_scale_factor, conditioned_norms=True,
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None

    def forward(self, hidden_states, temb=None):
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class AttnUpDecoderBlock2D(nn.Module):
    """VAE decoder block with a spatial self-attention after each resnet."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: Optional[int] = 1,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        temb_channels: Optional[int] = None,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx
        spatial = resnet_time_scale_shift == "spatial"
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups,
            dropout=dropout, non_linearity=resnet_act_fn, time_embedding_norm=resnet_time_scale_shift,
            output_scale_factor=output_scale_factor, conditioned_norms=True,
        )
        self.attentions = nn.ModuleList(
            [
                spatial_attention(
                    out_channels, attention_head_dim, resnet_eps, None if spatial else resnet_groups,
                    output_scale_factor, legacy_names=False, spatial_norm_dim=temb_channels if spatial else None,
                )
                for _ in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None

    def forward(self, hidden_states, temb=None):
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = resnet(hidden_states, temb)
            hidden_states = attn(hidden_states, temb=temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class ResnetUpsampleBlock2D(nn.Module):
    """UpBlock2D whose upsampler is a resnet with ``up=True`` (unCLIP, DeepFloyd IF).
    As in diffusers, the resnet upsampler always doubles (``upsample_size`` is not used)."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        skip_time_act: bool = False,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx
        resnet_kwargs = dict(
            temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor, skip_time_act=skip_time_act,
        )
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, num_layers, **resnet_kwargs)
        self.upsamplers = (
            nn.ModuleList([ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, up=True, **resnet_kwargs)])
            if add_upsample
            else None
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        for resnet in self.resnets:
            hidden_states, res_hidden_states_tuple = _pop_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states


class SkipUpBlock2D(nn.Module):
    """NCSN++ up block: resnets on the concatenated skips, then the image skip path (FIR-upsampled,
    plus ``skip_conv(act(skip_norm(h)))``) and a FIR-upsampling resnet. ``forward`` returns
    ``(hidden_states, skip_sample)``."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_pre_norm: bool = True,
        output_scale_factor: float = _SKIP_SCALE,
        add_upsample: bool = True,
        upsample_padding: int = 1,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx
        self.resnets = _skip_up_resnets(
            in_channels, prev_output_channel, out_channels, num_layers, temb_channels, resnet_eps, dropout,
            resnet_time_scale_shift, resnet_act_fn, output_scale_factor, attention_groups_quirk=False,
        )
        self._build_upsampling(
            add_upsample, in_channels, out_channels, temb_channels, resnet_eps, dropout, resnet_time_scale_shift,
            resnet_act_fn, output_scale_factor,
        )

    def _build_upsampling(self, add_upsample, in_channels, out_channels, temb_channels, eps, dropout, shift, act, scale):
        self.upsampler = FirUpsample2D(in_channels, out_channels=out_channels)
        if add_upsample:
            groups = min(out_channels // 4, 32)
            self.resnet_up = ResnetBlock2D(
                in_channels=out_channels, out_channels=out_channels, temb_channels=temb_channels, eps=eps,
                groups=groups, groups_out=groups, dropout=dropout, time_embedding_norm=shift, non_linearity=act,
                output_scale_factor=scale, use_in_shortcut=True, up=True, kernel="fir",
            )
            self.skip_conv = nn.Conv2d(out_channels, 3, kernel_size=3, padding=1)
            # diffusers: skip_norm then a SiLU (``act``); one fused module here, same keys.
            self.skip_norm = GroupNorm(groups, out_channels, eps=eps, activation="silu")
        else:
            self.resnet_up = None
            self.skip_conv = None
            self.skip_norm = None

    def _upsample(self, hidden_states, temb, skip_sample):
        skip_sample = self.upsampler(skip_sample) if skip_sample is not None else 0
        if self.resnet_up is not None:
            skip_sample = skip_sample + self.skip_conv(self.skip_norm(hidden_states))
            hidden_states = self.resnet_up(hidden_states, temb)
        return hidden_states, skip_sample

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, skip_sample=None):
        for resnet in self.resnets:
            hidden_states, res_hidden_states_tuple = _pop_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = resnet(hidden_states, temb)
        return self._upsample(hidden_states, temb, skip_sample)


class AttnSkipUpBlock2D(SkipUpBlock2D):
    """SkipUpBlock2D with one spatial self-attention (32 groups) after the last resnet."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_pre_norm: bool = True,
        attention_head_dim: Optional[int] = 1,
        output_scale_factor: float = _SKIP_SCALE,
        add_upsample: bool = True,
    ):
        nn.Module.__init__(self)
        self.resolution_idx = resolution_idx
        self.resnets = _skip_up_resnets(
            in_channels, prev_output_channel, out_channels, num_layers, temb_channels, resnet_eps, dropout,
            resnet_time_scale_shift, resnet_act_fn, output_scale_factor, attention_groups_quirk=True,
        )
        self.attentions = nn.ModuleList(
            [spatial_attention(out_channels, attention_head_dim, resnet_eps, 32, output_scale_factor, legacy_names=False)]
        )
        self._build_upsampling(
            add_upsample, in_channels, out_channels, temb_channels, resnet_eps, dropout, resnet_time_scale_shift,
            resnet_act_fn, output_scale_factor,
        )

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, skip_sample=None):
        for resnet in self.resnets:
            hidden_states, res_hidden_states_tuple = _pop_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = resnet(hidden_states, temb)
        hidden_states = self.attentions[0](hidden_states)
        return self._upsample(hidden_states, temb, skip_sample)


def _skip_up_resnets(
    in_channels, prev_output_channel, out_channels, num_layers, temb_channels, eps, dropout, shift, act, scale,
    attention_groups_quirk: bool,
):
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        resnet_in = prev_output_channel if i == 0 else out_channels
        # diffusers' AttnSkipUpBlock2D computes min(resnet_in + skip // 4, 32) (operator
        # precedence); SkipUpBlock2D min((resnet_in + skip) // 4, 32). Kept, so weights match.
        groups = min(resnet_in + skip_channels // 4, 32) if attention_groups_quirk else min((resnet_in + skip_channels) // 4, 32)
        resnets.append(
            ResnetBlock2D(
                in_channels=resnet_in + skip_channels, out_channels=out_channels, temb_channels=temb_channels, eps=eps,
                groups=groups, groups_out=min(out_channels // 4, 32), dropout=dropout, time_embedding_norm=shift,
                non_linearity=act, output_scale_factor=scale,
            )
        )
    return nn.ModuleList(resnets)


# ---------------------------------------------------------------------------
# Blocks with added-KV attention (unCLIP, DeepFloyd IF): the encoder states are
# projected to extra keys/values of a spatial self-attention (``added_kv_proj_dim``)
# ---------------------------------------------------------------------------


def _added_kv_attention(channels, head_dim, cross_attention_dim, groups, only_cross_attention, cross_attention_norm):
    return Attention(
        query_dim=channels,
        cross_attention_dim=channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        added_kv_proj_dim=cross_attention_dim,
        norm_num_groups=groups,
        bias=True,
        upcast_softmax=True,
        only_cross_attention=only_cross_attention,
        cross_attention_norm=cross_attention_norm,
    )


def _simple_mask(attention_mask, encoder_hidden_states, encoder_attention_mask):
    """diffusers' rule: ``attention_mask`` when given (unCLIP passes its cross-attention mask
    there), else the encoder mask when attending to encoder states."""
    if attention_mask is not None:
        return attention_mask
    return None if encoder_hidden_states is None else encoder_attention_mask


class SimpleCrossAttnDownBlock2D(nn.Module):
    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        skip_time_act: bool = False,
        only_cross_attention: bool = False,
        cross_attention_norm: Optional[str] = None,
    ):
        super().__init__()
        self.attention_head_dim = attention_head_dim
        self.num_heads = out_channels // attention_head_dim
        resnet_kwargs = dict(
            temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor, skip_time_act=skip_time_act,
        )
        self.resnets = _resnets(in_channels, out_channels, num_layers, **resnet_kwargs)
        self.attentions = nn.ModuleList(
            [
                _added_kv_attention(
                    out_channels, attention_head_dim, cross_attention_dim, resnet_groups, only_cross_attention,
                    cross_attention_norm,
                )
                for _ in range(num_layers)
            ]
        )
        self.downsamplers = (
            nn.ModuleList([ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, down=True, **resnet_kwargs)])
            if add_downsample
            else None
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states,
        temb=None,
        encoder_hidden_states=None,
        attention_mask=None,
        encoder_attention_mask=None,
        additional_residuals=None,
        cross_attention_kwargs=None,
    ):
        if additional_residuals is not None:
            raise ValueError("additional_residuals: T2I-Adapter features go to CrossAttnDownBlock2D only, as in diffusers")
        mask = _simple_mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        output_states = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=mask, **(cross_attention_kwargs or {}))
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states, temb)
            output_states += (hidden_states,)
        return hidden_states, output_states


class UNetMidBlock2DSimpleCrossAttn(nn.Module):
    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: Optional[int] = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: int = 1,
        output_scale_factor: float = 1.0,
        cross_attention_dim: int = 1280,
        skip_time_act: bool = False,
        only_cross_attention: bool = False,
        cross_attention_norm: Optional[str] = None,
    ):
        super().__init__()
        self.attention_head_dim = attention_head_dim
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        self.num_heads = in_channels // attention_head_dim
        resnet_kwargs = dict(
            in_channels=in_channels, out_channels=in_channels, temb_channels=temb_channels, eps=resnet_eps,
            groups=resnet_groups, dropout=dropout, non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor, skip_time_act=skip_time_act,
        )
        self.resnets = nn.ModuleList([_resnet(resnet_time_scale_shift, **resnet_kwargs) for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList(
            [
                _added_kv_attention(
                    in_channels, attention_head_dim, cross_attention_dim, resnet_groups, only_cross_attention,
                    cross_attention_norm,
                )
                for _ in range(num_layers)
            ]
        )

    def forward(
        self,
        hidden_states,
        temb=None,
        encoder_hidden_states=None,
        attention_mask=None,
        encoder_attention_mask=None,
        cross_attention_kwargs=None,
    ):
        mask = _simple_mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=mask, **(cross_attention_kwargs or {}))
            hidden_states = resnet(hidden_states, temb)
        return hidden_states


class SimpleCrossAttnUpBlock2D(nn.Module):
    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channel: int,
        temb_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        skip_time_act: bool = False,
        only_cross_attention: bool = False,
        cross_attention_norm: Optional[str] = None,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx
        self.attention_head_dim = attention_head_dim
        self.num_heads = out_channels // attention_head_dim
        resnet_kwargs = dict(
            temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups, dropout=dropout,
            time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
            output_scale_factor=output_scale_factor, skip_time_act=skip_time_act,
        )
        self.resnets = _up_resnets(in_channels, prev_output_channel, out_channels, num_layers, **resnet_kwargs)
        self.attentions = nn.ModuleList(
            [
                _added_kv_attention(
                    out_channels, attention_head_dim, cross_attention_dim, resnet_groups, only_cross_attention,
                    cross_attention_norm,
                )
                for _ in range(num_layers)
            ]
        )
        self.upsamplers = (
            nn.ModuleList([ResnetBlock2D(in_channels=out_channels, out_channels=out_channels, up=True, **resnet_kwargs)])
            if add_upsample
            else None
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states,
        res_hidden_states_tuple,
        temb=None,
        encoder_hidden_states=None,
        upsample_size=None,
        attention_mask=None,
        encoder_attention_mask=None,
        cross_attention_kwargs=None,
    ):
        mask = _simple_mask(attention_mask, encoder_hidden_states, encoder_attention_mask)
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states, res_hidden_states_tuple = _pop_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=mask, **(cross_attention_kwargs or {}))
        if self.upsamplers is not None:
            # As in diffusers, the resnet upsampler always doubles.
            hidden_states = self.upsamplers[0](hidden_states, temb)
        return hidden_states


# ---------------------------------------------------------------------------
# K-upscaler blocks: AdaGroupNorm resnets (GELU), KAttentionBlock, fixed-filter resampling
# ---------------------------------------------------------------------------


def _k_resnet(in_channels, out_channels, temb_channels, group_size, eps, act, dropout, conv_2d_out_channels=None):
    return ResnetBlockCondNorm2D(
        in_channels=in_channels, out_channels=out_channels, conv_2d_out_channels=conv_2d_out_channels,
        temb_channels=temb_channels, eps=eps, groups=in_channels // group_size,
        groups_out=out_channels // group_size, dropout=dropout, non_linearity=act, time_embedding_norm="ada_group",
        conv_shortcut_bias=False,
    )


def _no_k_block_kwargs(cross_attention_kwargs) -> None:
    if cross_attention_kwargs:
        raise ValueError(
            f"cross_attention_kwargs: the K-diffusion blocks do not pass keywords to their processors, got {sorted(cross_attention_kwargs)}"
        )


class KAttentionBlock(nn.Module):
    """AdaGroupNorm then (optional) self-attention, AdaGroupNorm then cross-attention, each
    with a residual, on (B, C, H, W) features."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        dropout: float = 0.0,
        cross_attention_dim: Optional[int] = None,
        attention_bias: bool = False,
        upcast_attention: bool = False,
        temb_channels: int = 768,
        add_self_attention: bool = False,
        cross_attention_norm: Optional[str] = None,
        group_size: int = 32,
    ):
        super().__init__()
        from fastdiff.models.resnet import AdaGroupNorm

        self.add_self_attention = add_self_attention
        groups = max(1, dim // group_size)
        if add_self_attention:
            self.norm1 = AdaGroupNorm(temb_channels, dim, groups)
            self.attn1 = Attention(
                query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
                bias=attention_bias,
            )
        self.norm2 = AdaGroupNorm(temb_channels, dim, groups)
        self.attn2 = Attention(
            query_dim=dim, cross_attention_dim=cross_attention_dim, heads=num_attention_heads,
            dim_head=attention_head_dim, dropout=dropout, bias=attention_bias, upcast_attention=upcast_attention,
            cross_attention_norm=cross_attention_norm,
        )

    @staticmethod
    def _attend(attn, normed, encoder_hidden_states, mask):
        batch, channels, height, width = normed.shape
        tokens = normed.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        out = attn(tokens, encoder_hidden_states=encoder_hidden_states, attention_mask=mask)
        return out.permute(0, 2, 1).reshape(batch, -1, height, width)

    def forward(self, hidden_states, encoder_hidden_states=None, emb=None, attention_mask=None, encoder_attention_mask=None):
        if self.add_self_attention:
            hidden_states = self._attend(self.attn1, self.norm1(hidden_states, emb), None, attention_mask) + hidden_states
        mask = attention_mask if encoder_hidden_states is None else encoder_attention_mask
        return self._attend(self.attn2, self.norm2(hidden_states, emb), encoder_hidden_states, mask) + hidden_states


class KDownBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        dropout: float = 0.0,
        num_layers: int = 4,
        resnet_eps: float = 1e-5,
        resnet_act_fn: str = "gelu",
        resnet_group_size: int = 32,
        add_downsample: bool = False,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                _k_resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_group_size,
                          resnet_eps, resnet_act_fn, dropout)
                for i in range(num_layers)
            ]
        )
        self.downsamplers = nn.ModuleList([KDownsample2D()]) if add_downsample else None
        self.gradient_checkpointing = False

    def forward(self, hidden_states, temb=None):
        output_states = ()
        for resnet in self.resnets:
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states, output_states


class KCrossAttnDownBlock2D(nn.Module):
    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        cross_attention_dim: int,
        dropout: float = 0.0,
        num_layers: int = 4,
        resnet_group_size: int = 32,
        add_downsample: bool = True,
        attention_head_dim: int = 64,
        add_self_attention: bool = False,
        resnet_eps: float = 1e-5,
        resnet_act_fn: str = "gelu",
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                _k_resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_group_size,
                          resnet_eps, resnet_act_fn, dropout)
                for i in range(num_layers)
            ]
        )
        self.attentions = nn.ModuleList(
            [
                KAttentionBlock(
                    out_channels, out_channels // attention_head_dim, attention_head_dim,
                    cross_attention_dim=cross_attention_dim, temb_channels=temb_channels, attention_bias=True,
                    add_self_attention=add_self_attention, cross_attention_norm="layer_norm",
                    group_size=resnet_group_size,
                )
                for _ in range(num_layers)
            ]
        )
        self.downsamplers = nn.ModuleList([KDownsample2D()]) if add_downsample else None
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states,
        temb=None,
        encoder_hidden_states=None,
        attention_mask=None,
        encoder_attention_mask=None,
        additional_residuals=None,
        cross_attention_kwargs=None,
    ):
        if additional_residuals is not None:
            raise ValueError("additional_residuals: T2I-Adapter features go to CrossAttnDownBlock2D only, as in diffusers")
        _no_k_block_kwargs(cross_attention_kwargs)
        output_states = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states, temb, attention_mask, encoder_attention_mask)
            # As in diffusers: the last block (no downsampler) hands the up path no skip states.
            output_states += (None if self.downsamplers is None else hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.downsamplers[0](hidden_states)
        return hidden_states, output_states


class KUpBlock2D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 5,
        resnet_eps: float = 1e-5,
        resnet_act_fn: str = "gelu",
        resnet_group_size: int = 32,
        add_upsample: bool = True,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx
        num_layers -= 1
        self.resnets = nn.ModuleList(
            [
                _k_resnet(2 * out_channels if i == 0 else out_channels,
                          in_channels if i == num_layers - 1 else out_channels, temb_channels, resnet_group_size,
                          resnet_eps, resnet_act_fn, dropout)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nn.ModuleList([KUpsample2D()]) if add_upsample else None
        self.gradient_checkpointing = False

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        # Only the last skip state is used, concatenated once (diffusers' K-UNet wiring).
        skip = res_hidden_states_tuple[-1]
        if skip is not None:
            hidden_states = torch.cat([hidden_states, skip], dim=1)
        for resnet in self.resnets:
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


class KCrossAttnUpBlock2D(nn.Module):
    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        resolution_idx: Optional[int] = None,
        dropout: float = 0.0,
        num_layers: int = 4,
        resnet_eps: float = 1e-5,
        resnet_act_fn: str = "gelu",
        resnet_group_size: int = 32,
        attention_head_dim: int = 1,
        cross_attention_dim: int = 768,
        add_upsample: bool = True,
        upcast_attention: bool = False,
    ):
        super().__init__()
        self.resolution_idx = resolution_idx
        self.attention_head_dim = attention_head_dim
        is_first_block = in_channels == out_channels == temb_channels
        is_middle_block = in_channels != out_channels
        k_in_channels = out_channels if is_first_block else 2 * out_channels
        k_out_channels = in_channels
        num_layers -= 1
        resnets, attentions = [], []
        for i in range(num_layers):
            last = i == num_layers - 1
            resnets.append(
                _k_resnet(k_in_channels if i == 0 else out_channels, out_channels, temb_channels, resnet_group_size,
                          resnet_eps, resnet_act_fn, dropout,
                          conv_2d_out_channels=k_out_channels if is_middle_block and last else None)
            )
            dim = k_out_channels if last else out_channels
            attentions.append(
                KAttentionBlock(
                    dim, dim // attention_head_dim, attention_head_dim, cross_attention_dim=cross_attention_dim,
                    temb_channels=temb_channels, attention_bias=True, add_self_attention=is_first_block,
                    cross_attention_norm="layer_norm", upcast_attention=upcast_attention,
                )
            )
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsamplers = nn.ModuleList([KUpsample2D()]) if add_upsample else None
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states,
        res_hidden_states_tuple,
        temb=None,
        encoder_hidden_states=None,
        upsample_size=None,
        attention_mask=None,
        encoder_attention_mask=None,
        cross_attention_kwargs=None,
    ):
        _no_k_block_kwargs(cross_attention_kwargs)
        skip = res_hidden_states_tuple[-1]
        if skip is not None:
            hidden_states = torch.cat([hidden_states, skip], dim=1)
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states, temb, attention_mask, encoder_attention_mask)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


# ---------------------------------------------------------------------------
# Factories keyed by diffusers' block type names
# ---------------------------------------------------------------------------


def _strip_unet_res(name: str) -> str:
    return name[7:] if isinstance(name, str) and name.startswith("UNetRes") else name


def _needs_cross_attention_dim(kind: str, cross_attention_dim) -> None:
    if cross_attention_dim is None:
        raise ValueError(f"cross_attention_dim must be specified for {kind}")


def _check_plain_attention(kind: str, dual_cross_attention: bool, attention_type: str) -> None:
    if dual_cross_attention:
        raise ValueError(f"dual_cross_attention: {kind} with DualTransformer2DModel is not supported by fastdiff")
    if attention_type != "default":
        raise ValueError(f"attention_type: {kind} supports only 'default' in fastdiff, got {attention_type!r}")


def get_down_block(down_block_type: str, *, num_layers, in_channels, out_channels, temb_channels, add_downsample,
                   resnet_eps, resnet_act_fn, transformer_layers_per_block=1, num_attention_heads=None,
                   resnet_groups=None, cross_attention_dim=None, downsample_padding=1, dual_cross_attention=False,
                   use_linear_projection=False, only_cross_attention=False, upcast_attention=False,
                   resnet_time_scale_shift="default", attention_type="default", resnet_skip_time_act=False,
                   resnet_out_scale_factor=1.0, cross_attention_norm=None, attention_head_dim=None,
                   downsample_type=None, dropout=0.0) -> nn.Module:
    """diffusers' ``get_down_block``: the block named ``down_block_type`` (see ``DOWN_BLOCK_TYPES``)."""
    kind = _strip_unet_res(down_block_type)
    if attention_head_dim is None:
        attention_head_dim = num_attention_heads
    if downsample_padding is None:
        downsample_padding = 1
    common = dict(
        num_layers=num_layers, in_channels=in_channels, out_channels=out_channels, dropout=dropout,
        resnet_eps=resnet_eps, resnet_act_fn=resnet_act_fn,
    )
    if kind == "DownBlock2D":
        return DownBlock2D(
            temb_channels=temb_channels, add_downsample=add_downsample, downsample_padding=downsample_padding,
            resnet_time_scale_shift=resnet_time_scale_shift, resnet_groups=resnet_groups, **common,
        )
    if kind == "ResnetDownsampleBlock2D":
        return ResnetDownsampleBlock2D(
            temb_channels=temb_channels, add_downsample=add_downsample, resnet_groups=resnet_groups,
            resnet_time_scale_shift=resnet_time_scale_shift, skip_time_act=resnet_skip_time_act,
            output_scale_factor=resnet_out_scale_factor, **common,
        )
    if kind == "AttnDownBlock2D":
        return AttnDownBlock2D(
            temb_channels=temb_channels, downsample_padding=downsample_padding, resnet_groups=resnet_groups,
            attention_head_dim=attention_head_dim, resnet_time_scale_shift=resnet_time_scale_shift,
            downsample_type=(downsample_type or "conv") if add_downsample else None, **common,
        )
    if kind == "CrossAttnDownBlock2D":
        _needs_cross_attention_dim(kind, cross_attention_dim)
        _check_plain_attention(kind, dual_cross_attention, attention_type)
        return CrossAttnDownBlock2D(
            temb_channels=temb_channels, transformer_layers_per_block=transformer_layers_per_block,
            add_downsample=add_downsample, downsample_padding=downsample_padding, resnet_groups=resnet_groups,
            cross_attention_dim=cross_attention_dim, num_attention_heads=num_attention_heads,
            use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention, resnet_time_scale_shift=resnet_time_scale_shift, **common,
        )
    if kind == "SimpleCrossAttnDownBlock2D":
        _needs_cross_attention_dim(kind, cross_attention_dim)
        return SimpleCrossAttnDownBlock2D(
            temb_channels=temb_channels, add_downsample=add_downsample, resnet_groups=resnet_groups,
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
            resnet_time_scale_shift=resnet_time_scale_shift, skip_time_act=resnet_skip_time_act,
            output_scale_factor=resnet_out_scale_factor, only_cross_attention=only_cross_attention,
            cross_attention_norm=cross_attention_norm, **common,
        )
    if kind == "SkipDownBlock2D":
        return SkipDownBlock2D(
            temb_channels=temb_channels, add_downsample=add_downsample, downsample_padding=downsample_padding,
            resnet_time_scale_shift=resnet_time_scale_shift, **common,
        )
    if kind == "AttnSkipDownBlock2D":
        return AttnSkipDownBlock2D(
            temb_channels=temb_channels, add_downsample=add_downsample, attention_head_dim=attention_head_dim,
            resnet_time_scale_shift=resnet_time_scale_shift, **common,
        )
    if kind == "DownEncoderBlock2D":
        return DownEncoderBlock2D(
            add_downsample=add_downsample, downsample_padding=downsample_padding, resnet_groups=resnet_groups,
            resnet_time_scale_shift=resnet_time_scale_shift, **common,
        )
    if kind == "AttnDownEncoderBlock2D":
        return AttnDownEncoderBlock2D(
            add_downsample=add_downsample, downsample_padding=downsample_padding, resnet_groups=resnet_groups,
            attention_head_dim=attention_head_dim, resnet_time_scale_shift=resnet_time_scale_shift, **common,
        )
    if kind == "KDownBlock2D":
        return KDownBlock2D(temb_channels=temb_channels, add_downsample=add_downsample, **common)
    if kind == "KCrossAttnDownBlock2D":
        return KCrossAttnDownBlock2D(
            temb_channels=temb_channels, add_downsample=add_downsample, cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim, add_self_attention=not add_downsample, **common,
        )
    raise ValueError(f"down_block_types: unknown block {down_block_type!r}; expected one of {list(DOWN_BLOCK_TYPES)}")


def get_mid_block(mid_block_type: Optional[str], *, temb_channels, in_channels, resnet_eps, resnet_act_fn,
                  resnet_groups, output_scale_factor=1.0, transformer_layers_per_block=1, num_attention_heads=None,
                  cross_attention_dim=None, dual_cross_attention=False, use_linear_projection=False,
                  mid_block_only_cross_attention=False, upcast_attention=False, resnet_time_scale_shift="default",
                  attention_type="default", resnet_skip_time_act=False, cross_attention_norm=None,
                  attention_head_dim=1, dropout=0.0) -> Optional[nn.Module]:
    """diffusers' ``get_mid_block``: the block named ``mid_block_type`` (see ``MID_BLOCK_TYPES``), or None."""
    if mid_block_type is None:
        return None
    if mid_block_type == "UNetMidBlock2DCrossAttn":
        _check_plain_attention(mid_block_type, dual_cross_attention, attention_type)
        return UNetMidBlock2DCrossAttn(
            in_channels=in_channels, temb_channels=temb_channels, dropout=dropout,
            transformer_layers_per_block=transformer_layers_per_block, resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn, output_scale_factor=output_scale_factor,
            resnet_time_scale_shift=resnet_time_scale_shift, cross_attention_dim=cross_attention_dim,
            num_attention_heads=num_attention_heads, resnet_groups=resnet_groups,
            use_linear_projection=use_linear_projection, upcast_attention=upcast_attention,
        )
    if mid_block_type == "UNetMidBlock2DSimpleCrossAttn":
        return UNetMidBlock2DSimpleCrossAttn(
            in_channels=in_channels, temb_channels=temb_channels, dropout=dropout, resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn, output_scale_factor=output_scale_factor,
            cross_attention_dim=cross_attention_dim, attention_head_dim=attention_head_dim,
            resnet_groups=resnet_groups, resnet_time_scale_shift=resnet_time_scale_shift,
            skip_time_act=resnet_skip_time_act, only_cross_attention=mid_block_only_cross_attention,
            cross_attention_norm=cross_attention_norm,
        )
    if mid_block_type == "UNetMidBlock2D":
        return UNetMidBlock2D(
            in_channels=in_channels, temb_channels=temb_channels, dropout=dropout, num_layers=0,
            resnet_eps=resnet_eps, resnet_act_fn=resnet_act_fn, output_scale_factor=output_scale_factor,
            resnet_groups=resnet_groups, resnet_time_scale_shift=resnet_time_scale_shift, add_attention=False,
        )
    raise ValueError(f"mid_block_type: unknown block {mid_block_type!r}; expected one of {list(MID_BLOCK_TYPES)} or None")


def get_up_block(up_block_type: str, *, num_layers, in_channels, out_channels, prev_output_channel, temb_channels,
                 add_upsample, resnet_eps, resnet_act_fn, resolution_idx=None, transformer_layers_per_block=1,
                 num_attention_heads=None, resnet_groups=None, cross_attention_dim=None, dual_cross_attention=False,
                 use_linear_projection=False, only_cross_attention=False, upcast_attention=False,
                 resnet_time_scale_shift="default", attention_type="default", resnet_skip_time_act=False,
                 resnet_out_scale_factor=1.0, cross_attention_norm=None, attention_head_dim=None,
                 upsample_type=None, dropout=0.0) -> nn.Module:
    """diffusers' ``get_up_block``: the block named ``up_block_type`` (see ``UP_BLOCK_TYPES``)."""
    kind = _strip_unet_res(up_block_type)
    if attention_head_dim is None:
        attention_head_dim = num_attention_heads
    common = dict(
        num_layers=num_layers, in_channels=in_channels, out_channels=out_channels, dropout=dropout,
        resnet_eps=resnet_eps, resnet_act_fn=resnet_act_fn, resolution_idx=resolution_idx,
    )
    with_skips = dict(prev_output_channel=prev_output_channel, temb_channels=temb_channels)
    if kind == "UpBlock2D":
        return UpBlock2D(
            add_upsample=add_upsample, resnet_groups=resnet_groups, resnet_time_scale_shift=resnet_time_scale_shift,
            **with_skips, **common,
        )
    if kind == "ResnetUpsampleBlock2D":
        return ResnetUpsampleBlock2D(
            add_upsample=add_upsample, resnet_groups=resnet_groups, resnet_time_scale_shift=resnet_time_scale_shift,
            skip_time_act=resnet_skip_time_act, output_scale_factor=resnet_out_scale_factor, **with_skips, **common,
        )
    if kind == "CrossAttnUpBlock2D":
        _needs_cross_attention_dim(kind, cross_attention_dim)
        _check_plain_attention(kind, dual_cross_attention, attention_type)
        return CrossAttnUpBlock2D(
            transformer_layers_per_block=transformer_layers_per_block, add_upsample=add_upsample,
            resnet_groups=resnet_groups, cross_attention_dim=cross_attention_dim,
            num_attention_heads=num_attention_heads, use_linear_projection=use_linear_projection,
            only_cross_attention=only_cross_attention, upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift, **with_skips, **common,
        )
    if kind == "SimpleCrossAttnUpBlock2D":
        _needs_cross_attention_dim(kind, cross_attention_dim)
        return SimpleCrossAttnUpBlock2D(
            add_upsample=add_upsample, resnet_groups=resnet_groups, cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim, resnet_time_scale_shift=resnet_time_scale_shift,
            skip_time_act=resnet_skip_time_act, output_scale_factor=resnet_out_scale_factor,
            only_cross_attention=only_cross_attention, cross_attention_norm=cross_attention_norm,
            **with_skips, **common,
        )
    if kind == "AttnUpBlock2D":
        return AttnUpBlock2D(
            resnet_groups=resnet_groups, attention_head_dim=attention_head_dim,
            resnet_time_scale_shift=resnet_time_scale_shift,
            upsample_type=(upsample_type or "conv") if add_upsample else None, **with_skips, **common,
        )
    if kind == "SkipUpBlock2D":
        return SkipUpBlock2D(
            add_upsample=add_upsample, resnet_time_scale_shift=resnet_time_scale_shift, **with_skips, **common,
        )
    if kind == "AttnSkipUpBlock2D":
        return AttnSkipUpBlock2D(
            add_upsample=add_upsample, attention_head_dim=attention_head_dim,
            resnet_time_scale_shift=resnet_time_scale_shift, **with_skips, **common,
        )
    if kind == "UpDecoderBlock2D":
        return UpDecoderBlock2D(
            add_upsample=add_upsample, resnet_groups=resnet_groups, resnet_time_scale_shift=resnet_time_scale_shift,
            temb_channels=temb_channels, **common,
        )
    if kind == "AttnUpDecoderBlock2D":
        return AttnUpDecoderBlock2D(
            add_upsample=add_upsample, resnet_groups=resnet_groups, attention_head_dim=attention_head_dim,
            resnet_time_scale_shift=resnet_time_scale_shift, temb_channels=temb_channels, **common,
        )
    if kind == "KUpBlock2D":
        return KUpBlock2D(temb_channels=temb_channels, add_upsample=add_upsample, **common)
    if kind == "KCrossAttnUpBlock2D":
        return KCrossAttnUpBlock2D(
            temb_channels=temb_channels, add_upsample=add_upsample, cross_attention_dim=cross_attention_dim,
            attention_head_dim=attention_head_dim, **common,
        )
    raise ValueError(f"up_block_types: unknown block {up_block_type!r}; expected one of {list(UP_BLOCK_TYPES)}")
