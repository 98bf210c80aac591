"""Drop-in replacement for diffusers' ``Attention`` backed by :func:`fastdiff.ops.attention`."""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Dict, FrozenSet, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff import backends
from fastdiff.nn.attention_processor import (
    PROCESSOR_TRACE_NAME,
    FastdiffAttnAddedKVProcessor,
    FastdiffAttnProcessor,
    SlicedAttnAddedKVProcessor,
    SlicedAttnProcessor,
)
from fastdiff.nn.group_norm import GroupNorm
from fastdiff.ops.attention import attention

logger = logging.getLogger(__name__)

# Keywords diffusers drops without a warning when a processor does not take them.
_QUIET_KWARGS = frozenset({"ip_adapter_masks", "ip_hidden_states"})
_CALL_PARAMETERS: Dict[type, FrozenSet[str]] = {}


def _call_parameters(processor: Callable) -> FrozenSet[str]:
    """The keyword names ``processor.__call__`` takes (cached per class; plain functions are inspected each time)."""
    cls = type(processor)
    if inspect.isfunction(processor) or inspect.ismethod(processor):
        return frozenset(inspect.signature(processor).parameters)
    names = _CALL_PARAMETERS.get(cls)
    if names is None:
        names = _CALL_PARAMETERS[cls] = frozenset(inspect.signature(processor.__call__).parameters)
    return names


def _kwargs_for(processor: Callable, kwargs: Mapping[str, object]) -> Dict[str, object]:
    """The cross_attention_kwargs that ``processor`` takes; the rest are dropped with a
    warning, as diffusers' ``Attention.forward`` does."""
    accepted = _call_parameters(processor)
    unused = [key for key in kwargs if key not in accepted and key not in _QUIET_KWARGS]
    if unused:
        logger.warning("cross_attention_kwargs %s are not expected by %s and will be ignored.", unused, type(processor).__name__)
    return {key: value for key, value in kwargs.items() if key in accepted}


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
    """Multi-head attention with diffusers' constructor arguments, state_dict keys and
    attention-processor API.

    Parameters: ``to_q``, ``to_k``, ``to_v`` (absent with ``only_cross_attention``),
    ``to_out.0`` (Linear), ``to_out.1`` (Dropout), ``group_norm`` when
    ``norm_num_groups`` is set (a :class:`fastdiff.nn.GroupNorm`, so it runs on
    ``fastdiff.ops.group_norm``), ``spatial_norm`` when ``spatial_norm_dim`` is set,
    ``norm_cross`` with ``cross_attention_norm`` ("layer_norm" or "group_norm") and
    ``add_k_proj``/``add_v_proj`` with ``added_kv_proj_dim``. A diffusers
    ``Attention`` state_dict loads unchanged.

    ``forward`` hands its inputs to ``self.processor``, as diffusers' does:
    ``processor(attn, hidden_states, encoder_hidden_states=..., attention_mask=...,
    **cross_attention_kwargs)``, keyword arguments the processor's ``__call__`` does
    not take being dropped with a warning. The default is fastdiff's fused
    processor, :class:`~fastdiff.nn.attention_processor.FastdiffAttnProcessor`
    (:class:`~fastdiff.nn.attention_processor.FastdiffAttnAddedKVProcessor` when
    ``added_kv_proj_dim`` is set), which runs attention through
    :func:`fastdiff.ops.attention` (that op picks the backend). Any diffusers
    processor (``AttnProcessor``, ``AttnProcessor2_0``, ``AttnAddedKVProcessor``,
    ``SlicedAttnProcessor``, ...) or a user's own runs unchanged through
    :meth:`set_processor`, using the helper methods diffusers' processors call
    (:meth:`prepare_attention_mask`, :meth:`head_to_batch_dim`,
    :meth:`batch_to_head_dim`, :meth:`get_attention_scores`,
    :meth:`norm_encoder_hidden_states`), which follow diffusers' semantics exactly.
    Every call records ``("attention_processor", <processor class name>)`` in
    :func:`fastdiff.trace_dispatch`; :meth:`explain` says which processor and
    which attention backend would run.

    fastdiff's processors compute the softmax in fp32 whatever the dtype, so
    ``upcast_attention`` and ``upcast_softmax`` change nothing for them (they are
    read by diffusers' processors). diffusers options this module does not
    implement (``qk_norm``, ``kv_heads`` other than ``heads``, the SD3/Flux joint
    attention options) are not accepted.

    :meth:`fuse_projections` runs the q/k/v projections of self-attention (or the
    k/v projections of cross-attention) as one GEMM in the fused processor.
    ``to_q``/``to_k``/``to_v`` stay the parameters of record, so state_dict keys
    never change; the fused weight is a non-persistent buffer rebuilt whenever
    those parameters change.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: Optional[int] = None,
        heads: int = 8,
        kv_heads: Optional[int] = None,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        upcast_attention: bool = False,
        upcast_softmax: bool = False,
        cross_attention_norm: Optional[str] = None,
        cross_attention_norm_num_groups: int = 32,
        qk_norm: Optional[str] = None,
        added_kv_proj_dim: Optional[int] = None,
        added_proj_bias: Optional[bool] = True,
        norm_num_groups: Optional[int] = None,
        spatial_norm_dim: Optional[int] = None,
        out_bias: bool = True,
        scale_qk: bool = True,
        only_cross_attention: bool = False,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
        residual_connection: bool = False,
        _from_deprecated_attn_block: bool = False,
        processor: Optional[Callable] = None,
        out_dim: Optional[int] = None,
    ) -> None:
        super().__init__()
        if kv_heads is not None and kv_heads != heads:
            raise ValueError(f"Attention: kv_heads={kv_heads} (grouped-query attention) is not implemented; pass None or heads ({heads})")
        if qk_norm is not None:
            raise ValueError(f"Attention: qk_norm={qk_norm!r} is not implemented; pass None")
        if added_kv_proj_dim is None and only_cross_attention:
            raise ValueError(
                "Attention: only_cross_attention=True needs added_kv_proj_dim (the added key/value projections "
                "are then the only keys and values); set added_kv_proj_dim or only_cross_attention=False"
            )
        if cross_attention_norm not in (None, "layer_norm", "group_norm"):
            raise ValueError(f"Attention: cross_attention_norm must be None, 'layer_norm' or 'group_norm', got {cross_attention_norm!r}")
        if out_dim is not None and out_dim % dim_head != 0:
            raise ValueError(f"Attention: out_dim ({out_dim}) must be a multiple of dim_head ({dim_head})")
        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.inner_kv_dim = self.inner_dim
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
        self.out_context_dim = query_dim
        self.context_pre_only = None
        self.pre_only = False
        self.is_causal = False
        self.only_cross_attention = only_cross_attention
        self.added_kv_proj_dim = added_kv_proj_dim
        self.added_proj_bias = added_proj_bias
        self._from_deprecated_attn_block = _from_deprecated_attn_block
        self.scale_qk = scale_qk
        self.scale = dim_head**-0.5 if scale_qk else 1.0
        self.heads = out_dim // dim_head if out_dim is not None else heads
        # set_attention_slice cuts the batch * heads rows of attention into slices of at most this many heads' worth.
        self.sliceable_head_dim = heads

        self.group_norm = GroupNorm(num_groups=norm_num_groups, num_channels=query_dim, eps=eps, affine=True) if norm_num_groups is not None else None
        self.spatial_norm = SpatialNorm(f_channels=query_dim, zq_channels=spatial_norm_dim) if spatial_norm_dim is not None else None
        self.norm_q = None
        self.norm_k = None
        self.norm_added_q = None
        self.norm_added_k = None
        if cross_attention_norm == "layer_norm":
            self.norm_cross = nn.LayerNorm(self.cross_attention_dim)
        elif cross_attention_norm == "group_norm":
            # Applied to encoder_hidden_states before any projection: with added
            # key/value projections those have added_kv_proj_dim channels.
            channels = added_kv_proj_dim if added_kv_proj_dim is not None else self.cross_attention_dim
            self.norm_cross = GroupNorm(num_groups=cross_attention_norm_num_groups, num_channels=channels, eps=1e-5, affine=True)
        else:
            self.norm_cross = None

        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        if only_cross_attention:
            self.to_k = None
            self.to_v = None
        else:
            self.to_k = nn.Linear(self.cross_attention_dim, self.inner_kv_dim, bias=bias)
            self.to_v = nn.Linear(self.cross_attention_dim, self.inner_kv_dim, bias=bias)
        self.add_q_proj = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, self.inner_kv_dim, bias=added_proj_bias)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, self.inner_kv_dim, bias=added_proj_bias)
        else:
            self.add_k_proj = None
            self.add_v_proj = None
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, self.out_dim, bias=out_bias), nn.Dropout(dropout)])
        self.to_add_out = None

        self.fused_projections = False
        self._fused_versions: Optional[Tuple[int, ...]] = None
        self.set_processor(processor if processor is not None else self.default_processor())

    # -- processors ------------------------------------------------------------

    def default_processor(self) -> Callable:
        """A new instance of the processor this module starts with: fastdiff's fused
        :class:`FastdiffAttnProcessor`, or :class:`FastdiffAttnAddedKVProcessor` when
        ``added_kv_proj_dim`` is set."""
        return FastdiffAttnAddedKVProcessor() if self.added_kv_proj_dim is not None else FastdiffAttnProcessor()

    def set_processor(self, processor: Callable) -> None:
        """Use ``processor`` (any callable with diffusers' processor signature) from now on.

        A processor that is an ``nn.Module`` becomes a submodule (its parameters
        join the state_dict under ``processor.``), as in diffusers."""
        if not callable(processor):
            raise ValueError(f"Attention.set_processor: processor must be callable as processor(attn, hidden_states, ...), got {type(processor).__name__}")
        if isinstance(getattr(self, "processor", None), nn.Module) and not isinstance(processor, nn.Module):
            logger.info("Attention: replacing processor %s, and any weights it had, with %s", type(self.processor).__name__, type(processor).__name__)
            self._modules.pop("processor")
        self.processor = processor

    def get_processor(self, return_deprecated_lora: bool = False) -> Callable:
        """The processor in use (``return_deprecated_lora=True`` returns None, as in diffusers)."""
        return None if return_deprecated_lora else self.processor

    def set_attention_slice(self, slice_size: Optional[int]) -> None:
        """Compute attention in slices of ``slice_size`` (batch * heads) rows to save memory
        (:class:`SlicedAttnProcessor`, or :class:`SlicedAttnAddedKVProcessor` with added
        key/value projections); None goes back to :meth:`default_processor`."""
        if slice_size is not None:
            if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
                raise ValueError(f"Attention.set_attention_slice: slice_size must be a positive int or None, got {slice_size!r}")
            if slice_size > self.sliceable_head_dim:
                raise ValueError(f"slice_size {slice_size} has to be smaller or equal to {self.sliceable_head_dim}.")
        if slice_size is None:
            processor = self.default_processor()
        elif self.added_kv_proj_dim is not None:
            processor = SlicedAttnAddedKVProcessor(slice_size)
        else:
            processor = SlicedAttnProcessor(slice_size)
        self.set_processor(processor)

    def explain(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> str:
        """Which processor would run on these inputs and, for fastdiff's processors, what
        :func:`fastdiff.ops.attention` would do with the q/k/v they would pass it
        (every backend's reasons). Computes nothing but shapes."""
        processor = self.processor
        name = type(processor).__name__
        default = type(self.default_processor()).__name__
        header = f"Attention processor: {name}" + (" (fastdiff's default)" if name == default else f" (the default is {default})")
        shapes = getattr(processor, "attention_shapes", None)
        if shapes is None:
            return header + "\n  (not a fastdiff processor: which attention it computes is up to the processor)"
        q, k, v, mask = shapes(self, hidden_states, encoder_hidden_states, attention_mask)
        return header + "\n" + attention.explain(q, k, v, attn_mask=mask, scale=self.scale)

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
        """Run the projections that share an input as one GEMM in the fused processor
        (state_dict keys are unchanged). Modules with added key/value projections
        (``added_kv_proj_dim``) keep separate projections: this does nothing there."""
        if self.added_kv_proj_dim is not None:
            return
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

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        **cross_attention_kwargs,
    ) -> torch.Tensor:
        """Run ``self.processor``. hidden_states: (B, L, query_dim) or (B, query_dim, H, W);
        encoder_hidden_states: (B, Lk, cross_attention_dim) or None (self-attention);
        attention_mask: see :meth:`prepare_attention_mask`; ``temb`` (the ``zq`` of
        ``spatial_norm``) and any other keyword go to the processor if its ``__call__``
        takes them (others are dropped with a warning, as in diffusers).
        Returns hidden_states' shape."""
        processor = self.processor
        if not backends._is_compiling():
            backends._record(PROCESSOR_TRACE_NAME, type(processor).__name__)
        if cross_attention_kwargs:
            cross_attention_kwargs = _kwargs_for(processor, cross_attention_kwargs)
        return processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **cross_attention_kwargs)

    # -- helpers that diffusers' processors call (diffusers' semantics) --------

    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B * heads, L, D) -> (B, L, heads * D)."""
        heads = self.heads
        batch_heads, seq_len, dim = tensor.shape
        tensor = tensor.reshape(batch_heads // heads, heads, seq_len, dim)
        return tensor.permute(0, 2, 1, 3).reshape(batch_heads // heads, seq_len, dim * heads)

    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        """(B, L, heads * D) -> (B * heads, L, D) with ``out_dim=3``, or (B, heads, L, D)
        with ``out_dim=4``. A 4-D (B, E, L, C) input is read as (B, E * L, C)."""
        heads = self.heads
        if tensor.ndim == 3:
            batch_size, seq_len, dim = tensor.shape
            extra_dim = 1
        else:
            batch_size, extra_dim, seq_len, dim = tensor.shape
        tensor = tensor.reshape(batch_size, seq_len * extra_dim, heads, dim // heads).permute(0, 2, 1, 3)
        if out_dim == 3:
            tensor = tensor.reshape(batch_size * heads, seq_len * extra_dim, dim // heads)
        return tensor

    def get_attention_scores(self, query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(scale * query @ key^T + attention_mask) for (B * heads, L, D) inputs, in
        query's dtype; ``upcast_attention`` computes the scores in fp32 and
        ``upcast_softmax`` the softmax (diffusers' plain-math path)."""
        dtype = query.dtype
        if self.upcast_attention:
            query = query.float()
            key = key.float()
        if attention_mask is None:
            scores = torch.baddbmm(
                torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device),
                query,
                key.transpose(-1, -2),
                beta=0,
                alpha=self.scale,
            )
        else:
            scores = torch.baddbmm(attention_mask, query, key.transpose(-1, -2), beta=1, alpha=self.scale)
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)

    def prepare_attention_mask(self, attention_mask: Optional[torch.Tensor], target_length: int, batch_size: int, out_dim: int = 3) -> Optional[torch.Tensor]:
        """diffusers' mask preparation, for diffusers-style processors: a mask whose last
        dim is not ``target_length`` is padded with ``target_length`` zeros (diffusers'
        behaviour, which the added-KV processors rely on: their keys are the encoder's
        tokens followed by ``target_length`` of the query's own); then heads are
        repeated: (B * heads, ..., Lk) with ``out_dim=3`` unless already that large,
        (B, heads, ..., Lk) with ``out_dim=4``. fastdiff's fused processor uses
        :meth:`_attention_mask_view` instead, which makes no copies."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != target_length:
            attention_mask = F.pad(attention_mask, (0, target_length), value=0.0)
        if out_dim == 3:
            if attention_mask.shape[0] < batch_size * self.heads:
                attention_mask = attention_mask.repeat_interleave(self.heads, dim=0, output_size=attention_mask.shape[0] * self.heads)
        elif out_dim == 4:
            attention_mask = attention_mask.unsqueeze(1)
            attention_mask = attention_mask.repeat_interleave(self.heads, dim=1, output_size=attention_mask.shape[1] * self.heads)
        return attention_mask

    def norm_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """``norm_cross`` applied to (B, Lk, C) encoder states (a GroupNorm over C)."""
        if self.norm_cross is None:
            raise ValueError("Attention.norm_encoder_hidden_states: this module has no norm_cross (set cross_attention_norm)")
        if isinstance(self.norm_cross, nn.GroupNorm):
            return self.norm_cross(encoder_hidden_states.transpose(1, 2)).transpose(1, 2)
        return self.norm_cross(encoder_hidden_states)

    def _attention_mask_view(self, attention_mask: torch.Tensor, target_length: int, batch_size: int) -> torch.Tensor:
        """A diffusers-style mask as a (B, heads or 1, Lq or 1, Lk) view, without copies
        (the fused processor's :meth:`prepare_attention_mask`).

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
