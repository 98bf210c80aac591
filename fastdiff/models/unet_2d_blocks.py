"""Down, mid and up blocks of the UNets and the VAE, with diffusers' names and wiring.

Supported block types (what SD1/SD2/SDXL, DDPM-style UNet2DModel and AutoencoderKL use):

* down: ``DownBlock2D``, ``AttnDownBlock2D``, ``CrossAttnDownBlock2D``, ``DownEncoderBlock2D``
* mid:  ``UNetMidBlock2D``, ``UNetMidBlock2DCrossAttn``
* up:   ``UpBlock2D``, ``AttnUpBlock2D``, ``CrossAttnUpBlock2D``, ``UpDecoderBlock2D``

Any other type name raises a ValueError that lists these.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastdiff.models.modeling_utils import call_maybe_checkpointed
from fastdiff.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from fastdiff.models.transformer_2d import Transformer2DModel
from fastdiff.nn import Attention

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D", "DownEncoderBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D", "UpDecoderBlock2D")


def spatial_attention(channels: int, head_dim: int, eps: float, groups: Optional[int], rescale: float) -> Attention:
    """The GroupNorm + single self-attention block of UNet2DModel and the VAE, applied to (B, C, H, W)
    with its own residual. Old checkpoints name its projections query/key/value/proj_attn;
    the loader renames them (see ``ModelMixin._rename_legacy_keys``)."""
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        rescale_output_factor=rescale,
        eps=eps,
        norm_num_groups=groups,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )


def _resnets(in_channels: int, out_channels: int, num_layers: int, **resnet_kwargs) -> nn.ModuleList:
    return nn.ModuleList(
        [
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels, **resnet_kwargs)
            for i in range(num_layers)
        ]
    )


def _up_resnets(
    in_channels: int, prev_output_channel: int, out_channels: int, num_layers: int, **resnet_kwargs
) -> nn.ModuleList:
    """Up-block resnets take the previous output concatenated with a skip connection."""
    resnets = []
    for i in range(num_layers):
        skip_channels = in_channels if i == num_layers - 1 else out_channels
        resnet_in = prev_output_channel if i == 0 else out_channels
        resnets.append(ResnetBlock2D(in_channels=resnet_in + skip_channels, out_channels=out_channels, **resnet_kwargs))
    return nn.ModuleList(resnets)


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
        attention_head_dim: int = 1,
        downsample_padding: int = 1,
        downsample_type: Optional[str] = "conv",
    ):
        super().__init__()
        if downsample_type not in ("conv", None):
            raise ValueError(f"downsample_type: only 'conv' is supported, got {downsample_type!r}")
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, temb_channels=temb_channels, eps=resnet_eps, groups=resnet_groups,
            dropout=dropout, time_embedding_norm=resnet_time_scale_shift, non_linearity=resnet_act_fn,
        )
        self.attentions = nn.ModuleList(
            [spatial_attention(out_channels, attention_head_dim, resnet_eps, resnet_groups, 1.0) for _ in range(num_layers)]
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, use_conv=True, padding=downsample_padding)])
            if downsample_type == "conv"
            else None
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states, temb=None):
        output_states = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
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
    ):
        """``additional_residuals`` (a T2I-Adapter feature) is added after the last attention."""
        output_states = ()
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)
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
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, temb_channels=None, eps=resnet_eps, groups=resnet_groups,
            dropout=dropout, non_linearity=resnet_act_fn,
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


# ---------------------------------------------------------------------------
# Mid blocks
# ---------------------------------------------------------------------------


class UNetMidBlock2D(nn.Module):
    """resnet, then ``num_layers`` x (spatial attention, resnet). Used by UNet2DModel and the VAE."""

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
        add_attention: bool = True,
        attention_head_dim: Optional[int] = 1,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        resnet_groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        if attn_groups is None:
            attn_groups = resnet_groups if resnet_time_scale_shift == "default" else None
        attention_head_dim = attention_head_dim or in_channels
        resnet_kwargs = dict(
            in_channels=in_channels, out_channels=in_channels, temb_channels=temb_channels, eps=resnet_eps,
            groups=resnet_groups, dropout=dropout, time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn, output_scale_factor=output_scale_factor,
        )
        self.add_attention = add_attention
        self.resnets = nn.ModuleList([ResnetBlock2D(**resnet_kwargs) for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList(
            [
                spatial_attention(in_channels, attention_head_dim, resnet_eps, attn_groups, output_scale_factor)
                if add_attention
                else nn.Identity()
                for _ in range(num_layers)
            ]
        )
        self.gradient_checkpointing = False

    def forward(self, hidden_states, temb=None):
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states)
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
        self, hidden_states, temb=None, encoder_hidden_states=None, attention_mask=None, encoder_attention_mask=None
    ):
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = attn(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)
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
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        add_upsample: bool = True,
    ):
        super().__init__()
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
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        attention_head_dim: int = 1,
        upsample_type: Optional[str] = "conv",
    ):
        super().__init__()
        if upsample_type not in ("conv", None):
            raise ValueError(f"upsample_type: only 'conv' is supported, got {upsample_type!r}")
        self.resnets = _up_resnets(
            in_channels, prev_output_channel, out_channels, num_layers, temb_channels=temb_channels, eps=resnet_eps,
            groups=resnet_groups, dropout=dropout, time_embedding_norm=resnet_time_scale_shift,
            non_linearity=resnet_act_fn,
        )
        self.attentions = nn.ModuleList(
            [spatial_attention(out_channels, attention_head_dim, resnet_eps, resnet_groups, 1.0) for _ in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if upsample_type == "conv" else None
        self.gradient_checkpointing = False

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None, upsample_size=None):
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states, res_hidden_states_tuple = _pop_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states)
        if self.upsamplers is not None:
            # diffusers' AttnUpBlock2D always doubles, ignoring upsample_size.
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
    ):
        for resnet, attn in zip(self.resnets, self.attentions):
            hidden_states, res_hidden_states_tuple = _pop_skip(hidden_states, res_hidden_states_tuple)
            hidden_states = call_maybe_checkpointed(resnet, self, hidden_states, temb)
            hidden_states = attn(hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states, upsample_size)
        return hidden_states


class UpDecoderBlock2D(nn.Module):
    """VAE decoder block: resnets without a time embedding or skips, then an optional upsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        add_upsample: bool = True,
    ):
        super().__init__()
        self.resnets = _resnets(
            in_channels, out_channels, num_layers, temb_channels=None, eps=resnet_eps, groups=resnet_groups,
            dropout=dropout, non_linearity=resnet_act_fn,
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True)]) if add_upsample else None

    def forward(self, hidden_states):
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        if self.upsamplers is not None:
            hidden_states = self.upsamplers[0](hidden_states)
        return hidden_states


# ---------------------------------------------------------------------------
# Factories keyed by diffusers' block type names
# ---------------------------------------------------------------------------


def _strip_unet_res(name: str) -> str:
    return name[7:] if name.startswith("UNetRes") else name


def get_down_block(down_block_type: str, *, num_layers, in_channels, out_channels, temb_channels, add_downsample,
                   resnet_eps, resnet_act_fn, resnet_groups, downsample_padding=1, dropout=0.0,
                   resnet_time_scale_shift="default", attention_head_dim=None, num_attention_heads=None,
                   transformer_layers_per_block=1, cross_attention_dim=None, use_linear_projection=False,
                   only_cross_attention=False, upcast_attention=False, downsample_type=None) -> nn.Module:
    kind = _strip_unet_res(down_block_type)
    common = dict(
        num_layers=num_layers, in_channels=in_channels, out_channels=out_channels, dropout=dropout,
        resnet_eps=resnet_eps, resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
    )
    if kind == "DownBlock2D":
        return DownBlock2D(
            temb_channels=temb_channels, add_downsample=add_downsample, downsample_padding=downsample_padding,
            resnet_time_scale_shift=resnet_time_scale_shift, **common,
        )
    if kind == "AttnDownBlock2D":
        return AttnDownBlock2D(
            temb_channels=temb_channels, downsample_padding=downsample_padding,
            attention_head_dim=attention_head_dim or num_attention_heads,
            resnet_time_scale_shift=resnet_time_scale_shift,
            downsample_type=(downsample_type or "conv") if add_downsample else None, **common,
        )
    if kind == "CrossAttnDownBlock2D":
        if cross_attention_dim is None:
            raise ValueError("cross_attention_dim must be specified for CrossAttnDownBlock2D")
        return CrossAttnDownBlock2D(
            temb_channels=temb_channels, transformer_layers_per_block=transformer_layers_per_block,
            add_downsample=add_downsample, downsample_padding=downsample_padding,
            cross_attention_dim=cross_attention_dim, num_attention_heads=num_attention_heads,
            use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention, resnet_time_scale_shift=resnet_time_scale_shift, **common,
        )
    if kind == "DownEncoderBlock2D":
        return DownEncoderBlock2D(add_downsample=add_downsample, downsample_padding=downsample_padding, **common)
    raise ValueError(f"down_block_types: unsupported block {down_block_type!r}; supported: {list(DOWN_BLOCK_TYPES)}")


def get_up_block(up_block_type: str, *, num_layers, in_channels, out_channels, prev_output_channel, temb_channels,
                 add_upsample, resnet_eps, resnet_act_fn, resnet_groups, dropout=0.0,
                 resnet_time_scale_shift="default", attention_head_dim=None, num_attention_heads=None,
                 transformer_layers_per_block=1, cross_attention_dim=None, use_linear_projection=False,
                 only_cross_attention=False, upcast_attention=False, upsample_type=None) -> nn.Module:
    kind = _strip_unet_res(up_block_type)
    common = dict(
        num_layers=num_layers, out_channels=out_channels, dropout=dropout, resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn, resnet_groups=resnet_groups,
    )
    if kind == "UpBlock2D":
        return UpBlock2D(
            in_channels=in_channels, prev_output_channel=prev_output_channel, temb_channels=temb_channels,
            add_upsample=add_upsample, resnet_time_scale_shift=resnet_time_scale_shift, **common,
        )
    if kind == "AttnUpBlock2D":
        return AttnUpBlock2D(
            in_channels=in_channels, prev_output_channel=prev_output_channel, temb_channels=temb_channels,
            attention_head_dim=attention_head_dim or num_attention_heads,
            resnet_time_scale_shift=resnet_time_scale_shift,
            upsample_type=(upsample_type or "conv") if add_upsample else None, **common,
        )
    if kind == "CrossAttnUpBlock2D":
        if cross_attention_dim is None:
            raise ValueError("cross_attention_dim must be specified for CrossAttnUpBlock2D")
        return CrossAttnUpBlock2D(
            in_channels=in_channels, prev_output_channel=prev_output_channel, temb_channels=temb_channels,
            transformer_layers_per_block=transformer_layers_per_block, add_upsample=add_upsample,
            cross_attention_dim=cross_attention_dim, num_attention_heads=num_attention_heads,
            use_linear_projection=use_linear_projection, only_cross_attention=only_cross_attention,
            upcast_attention=upcast_attention, resnet_time_scale_shift=resnet_time_scale_shift, **common,
        )
    if kind == "UpDecoderBlock2D":
        return UpDecoderBlock2D(in_channels=in_channels, add_upsample=add_upsample, **common)
    raise ValueError(f"up_block_types: unsupported block {up_block_type!r}; supported: {list(UP_BLOCK_TYPES)}")
