"""Drop-in replacement for diffusers' ``Attention`` backed by :func:`fastdiff.ops.attention`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.nn.group_norm import GroupNorm
from fastdiff.ops.attention import attention


class SpatialNorm(nn.Module):
    """diffusers' ``SpatialNorm`` (MoVQ decoders): GroupNorm(f) * conv_y(zq) + conv_b(zq),
    with zq resized (nearest) to f's spatial size. Same parameter names."""

    def __init__(self, f_channels: int, zq_channels: int) -> None:
        super().__init__()
        self.norm_layer = GroupNorm(num_channels=f_channels, num_groups=32, eps=1e-6, affine=True)
        self.conv_y = nn.Conv2d(zq_channels, f_channels, kernel_size=1, stride=1, padding=0)
        self.conv_b = nn.Conv2d(zq_channels, f_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class Attention(nn.Module):
    """Multi-head attention with diffusers' constructor arguments and state_dict keys.

    Parameters: ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (Linear), ``to_out.1``
    (Dropout), ``group_norm`` when ``norm_num_groups`` is set (a
    :class:`fastdiff.nn.GroupNorm`, so it runs on ``fastdiff.ops.group_norm``)
    and ``spatial_norm`` when ``spatial_norm_dim`` is set. A diffusers
    ``Attention`` state_dict loads unchanged.

    ``forward`` follows diffusers' ``AttnProcessor2_0``: (B, L, C) or
    (B, C, H, W) inputs, optional group norm, projections, attention through
    :func:`fastdiff.ops.attention` (which picks the backend), output projection,
    residual and rescale. The softmax is always computed in fp32, so
    ``upcast_attention`` and ``upcast_softmax`` are kept for compatibility only.

    diffusers options this module does not implement (``qk_norm``,
    ``added_kv_proj_dim``, ``cross_attention_norm``, ``kv_heads``, custom
    processors) are not accepted as arguments.

    :meth:`fuse_projections` runs the q/k/v projections of self-attention (or the
    k/v projections of cross-attention) as one GEMM. ``to_q``/``to_k``/``to_v``
    stay the parameters of record, so state_dict keys never change; the fused
    weight is a non-persistent buffer rebuilt whenever those parameters change.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: Optional[int] = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        norm_num_groups: Optional[int] = None,
        spatial_norm_dim: Optional[int] = None,
        out_bias: bool = True,
        scale_qk: bool = True,
        only_cross_attention: bool = False,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        _from_deprecated_attn_block: bool = False,
        out_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if only_cross_attention:
            raise ValueError("Attention: only_cross_attention=True needs added_kv_proj_dim, which fastdiff does not implement")
        if out_dim is not None and out_dim % dim_head != 0:
            raise ValueError(f"Attention: out_dim ({out_dim}) must be a multiple of dim_head ({dim_head})")
        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.query_dim = query_dim
        self.use_bias = bias
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.upcast_attention = upcast_attention
        self.upcast_softmax = upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.dropout = dropout
        self.out_dim = out_dim if out_dim is not None else query_dim
        self.only_cross_attention = only_cross_attention
        self._from_deprecated_attn_block = _from_deprecated_attn_block
        self.scale_qk = scale_qk
        self.scale = dim_head**-0.5 if scale_qk else 1.0
        self.heads = out_dim // dim_head if out_dim is not None else heads

        self.group_norm = GroupNorm(num_groups=norm_num_groups, num_channels=query_dim, eps=eps, affine=True) if norm_num_groups is not None else None
        self.spatial_norm = SpatialNorm(f_channels=query_dim, zq_channels=spatial_norm_dim) if spatial_norm_dim is not None else None

        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        self.to_k = nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_v = nn.Linear(self.cross_attention_dim, self.inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, self.out_dim, bias=out_bias), nn.Dropout(dropout)])

        self.fused_projections = False
        self._fused_versions: Optional[Tuple[int, ...]] = None

    # -- fused projections ---------------------------------------------------

    def _fused_sources(self) -> Tuple[nn.Linear, ...]:
        """The projections that share an input: q, k, v for self-attention; k, v for cross-attention."""
        return (self.to_k, self.to_v) if self.is_cross_attention else (self.to_q, self.to_k, self.to_v)

    def _source_versions(self) -> Tuple[int, ...]:
        tensors = [p for lin in self._fused_sources() for p in (lin.weight, lin.bias) if p is not None]
        return tuple(v for t in tensors for v in (t._version, t.data_ptr()))

    def _fused_weight_and_bias(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        sources = self._fused_sources()
        if torch.is_grad_enabled() and any(p.requires_grad for lin in sources for p in lin.parameters()):
            # Training: concatenate inside autograd so gradients reach to_q/to_k/to_v.
            weight = torch.cat([lin.weight for lin in sources])
            bias = torch.cat([lin.bias for lin in sources]) if self.use_bias else None
            return weight, bias
        versions = self._source_versions()
        if versions != self._fused_versions:
            with torch.no_grad():
                self.fused_weight = torch.cat([lin.weight for lin in sources])
                self.fused_bias = torch.cat([lin.bias for lin in sources]) if self.use_bias else None
            self._fused_versions = versions
        return self.fused_weight, self.fused_bias

    def fuse_projections(self) -> None:
        """Run the projections that share an input as one GEMM (state_dict keys are unchanged)."""
        if not self.fused_projections:
            self.register_buffer("fused_weight", None, persistent=False)
            self.register_buffer("fused_bias", None, persistent=False)
            self._fused_versions = None
            self.fused_projections = True

    def unfuse_projections(self) -> None:
        """Back to separate q/k/v projections; drops the fused buffer."""
        if self.fused_projections:
            del self.fused_weight
            del self.fused_bias
            self._fused_versions = None
            self.fused_projections = False

    # -- forward -------------------------------------------------------------

    def prepare_attention_mask(self, attention_mask: torch.Tensor, target_length: int, batch_size: int) -> torch.Tensor:
        """A diffusers-style mask as a (B, heads or 1, Lq or 1, Lk) view, without copies.

        Accepts (B, Lk), (B, Lq or 1, Lk), (B * heads, Lq or 1, Lk) and masks
        already broadcastable to (B, heads, Lq, Lk).
        """
        if attention_mask.shape[-1] != target_length:
            raise ValueError(f"Attention: attention_mask's last dim is {attention_mask.shape[-1]}, expected the key length {target_length}")
        if attention_mask.dim() == 2:
            return attention_mask[:, None, None, :]
        if attention_mask.dim() == 3:
            if attention_mask.shape[0] == batch_size * self.heads and self.heads > 1:
                return attention_mask.view(batch_size, self.heads, -1, target_length)
            if attention_mask.shape[0] in (batch_size, 1):
                return attention_mask.unsqueeze(1)
            raise ValueError(
                f"Attention: attention_mask of shape {tuple(attention_mask.shape)} must have a first dim of "
                f"batch ({batch_size}) or batch * heads ({batch_size * self.heads})"
            )
        if attention_mask.dim() == 4:
            return attention_mask
        raise ValueError(f"Attention: attention_mask must have 2, 3 or 4 dims, got shape {tuple(attention_mask.shape)}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        **cross_attention_kwargs,
    ) -> torch.Tensor:
        """hidden_states: (B, L, query_dim) or (B, query_dim, H, W);
        encoder_hidden_states: (B, Lk, cross_attention_dim) or None (self-attention);
        attention_mask: see :meth:`prepare_attention_mask`; temb: the ``zq`` of
        ``spatial_norm``. ``cross_attention_kwargs`` are accepted and ignored, as
        diffusers' ``AttnProcessor2_0`` does. Returns hidden_states' shape."""
        residual = hidden_states
        if self.spatial_norm is not None:
            hidden_states = self.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.dim()
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            if self.group_norm is not None:
                hidden_states = self.group_norm(hidden_states)
            hidden_states = hidden_states.reshape(batch_size, channel, height * width).transpose(1, 2)
        elif input_ndim == 3:
            if self.group_norm is not None:
                hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        else:
            raise ValueError(f"Attention: hidden_states must be (B, L, C) or (B, C, H, W), got shape {tuple(hidden_states.shape)}")

        batch_size, query_length, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if not self.is_cross_attention and encoder_hidden_states is not None and self.fused_projections:
            raise ValueError("Attention: fused self-attention projections cannot take encoder_hidden_states; call unfuse_projections()")
        query, key, value = self._project(hidden_states, context)

        if attention_mask is not None:
            attention_mask = self.prepare_attention_mask(attention_mask, key.shape[1], batch_size)

        head_dim = self.inner_dim // self.heads
        # (B, L, heads * D) -> (B, heads, L, D): strided views, no copies.
        query = query.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)

        hidden_states = attention(query, key, value, attn_mask=attention_mask, scale=self.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, query_length, self.heads * head_dim)

        hidden_states = self.to_out[0](hidden_states)
        hidden_states = self.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if self.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / self.rescale_output_factor

    def _project(self, hidden_states: torch.Tensor, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (B, L, inner_dim) tensors; with fused projections they are
        strided views into one GEMM's output."""
        if not self.fused_projections:
            return self.to_q(hidden_states), self.to_k(context), self.to_v(context)
        weight, bias = self._fused_weight_and_bias()
        if self.is_cross_attention:
            kv = F.linear(context, weight, bias)
            key, value = kv.split(self.inner_dim, dim=-1)
            return self.to_q(hidden_states), key, value
        qkv = F.linear(hidden_states, weight, bias)
        return qkv.split(self.inner_dim, dim=-1)
