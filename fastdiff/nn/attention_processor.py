"""Attention processors, and the attention-processor API that diffusers' models expose.

A processor is what :class:`fastdiff.nn.Attention` runs in ``forward``:
``processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs)``,
exactly diffusers' protocol, so diffusers' own processors (``AttnProcessor``,
``AttnProcessor2_0``, ``AttnAddedKVProcessor``, ``SlicedAttnProcessor``, ...) and
users' custom ones run on fastdiff's ``Attention`` unchanged. fastdiff's processors:

* :class:`FastdiffAttnProcessor`, the default: diffusers' ``AttnProcessor2_0`` steps,
  with attention through :func:`fastdiff.ops.attention` (which picks the backend), masks
  passed as broadcast views (no per-head copies) and, after ``fuse_projections()``,
  q/k/v from one GEMM.
* :class:`FastdiffAttnAddedKVProcessor`, the default of modules with
  ``added_kv_proj_dim`` (UnCLIP / SimpleCrossAttn blocks): diffusers'
  ``AttnAddedKVProcessor`` steps on :func:`fastdiff.ops.attention`.
* :class:`SlicedAttnProcessor` and :class:`SlicedAttnAddedKVProcessor`, what
  ``set_attention_slice`` installs: the same math, attention computed ``slice_size``
  (batch * heads) rows at a time, each slice through :func:`fastdiff.ops.attention`.

Which processor ran is recorded by :func:`fastdiff.trace_dispatch` as
``("attention_processor", <class name>)``, just before the ops it calls record theirs.

:class:`AttentionProcessorMixin` is a base of :class:`fastdiff.models.ModelMixin`, so
every model has ``attn_processors``, ``set_attn_processor``,
``set_default_attn_processor`` and ``set_attention_slice``. They walk the module tree
and talk to every submodule that has ``get_processor``/``set_processor``
(``fastdiff.nn.Attention``), keyed by module path as in diffusers
(``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops.attention import attention

#: the op name under which :func:`fastdiff.trace_dispatch` records the processor that ran.
PROCESSOR_TRACE_NAME = "attention_processor"


# ---------------------------------------------------------------------------
# Shared steps
# ---------------------------------------------------------------------------


def _heads_view(t: torch.Tensor, batch_size: int, heads: int) -> torch.Tensor:
    """(B, L, heads * D) -> (B, heads, L, D) as a strided view (no copy)."""
    return t.view(batch_size, -1, heads, t.shape[-1] // heads).transpose(1, 2)


def _tokens(attn, hidden_states: torch.Tensor, temb: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[Tuple[int, int, int, int]]]:
    """AttnProcessor2_0's prelude: spatial norm, (B, C, H, W) -> (B, H * W, C), group norm.
    Returns the (B, L, C) tokens and the 4-D input shape (None for a 3-D input)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.dim() == 4:
        shape4 = tuple(hidden_states.shape)
        batch_size, channel, height, width = shape4
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states)
        return hidden_states.reshape(batch_size, channel, height * width).transpose(1, 2), shape4
    if hidden_states.dim() == 3:
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        return hidden_states, None
    raise ValueError(f"Attention: hidden_states must be (B, L, C) or (B, C, H, W), got shape {tuple(hidden_states.shape)}")


def _context(attn, tokens: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor]) -> torch.Tensor:
    """The keys' and values' input: the tokens themselves, or the (cross-normed) encoder states."""
    if encoder_hidden_states is None:
        return tokens
    if not attn.is_cross_attention and attn.fused_projections:
        raise ValueError("Attention: fused self-attention projections cannot take encoder_hidden_states; call unfuse_projections()")
    if attn.norm_cross is not None:
        return attn.norm_encoder_hidden_states(encoder_hidden_states)
    return encoder_hidden_states


def _epilogue(attn, hidden_states: torch.Tensor, residual: torch.Tensor, shape4) -> torch.Tensor:
    """Output projection, dropout, back to (B, C, H, W), residual and rescale.

    ``rescale_output_factor`` 1.0 (every SD model) costs nothing: the division is
    skipped, not run as a full-tensor kernel. Another factor r is folded into
    ``to_out``'s GEMM where nothing stands between them (tokens layout, no residual,
    inactive dropout): ``addmm(b, x, W^T, beta=1/r, alpha=1/r)``; elsewhere the fresh
    output is divided in place.
    """
    rescale = attn.rescale_output_factor
    projection, dropout = attn.to_out[0], attn.to_out[1]
    if rescale != 1.0 and shape4 is None and not attn.residual_connection and _folds_into_linear(projection, dropout, hidden_states):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        scale = 1.0 / rescale
        if projection.bias is None:
            out = torch.mm(flat, projection.weight.t()).mul_(scale)
        else:
            out = torch.addmm(projection.bias, flat, projection.weight.t(), beta=scale, alpha=scale)
        return out.view(*hidden_states.shape[:-1], out.shape[-1])
    hidden_states = dropout(projection(hidden_states))
    if shape4 is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape4)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    if rescale == 1.0:
        return hidden_states
    # A fresh tensor here (the projection's or the residual add's output): divide in place,
    # unless autograd needs it (the division's backward does not, the add's does not).
    return hidden_states.div_(rescale) if not hidden_states.requires_grad else hidden_states / rescale


def _folds_into_linear(projection, dropout, hidden_states: torch.Tensor) -> bool:
    return (
        type(projection) is nn.Linear
        and (not dropout.training or dropout.p == 0)
        and hidden_states.dim() >= 2
        and hidden_states.dtype == projection.weight.dtype
    )


def _added_kv_inputs(attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor]):
    """diffusers' AttnAddedKVProcessor up to the attention. hidden_states is channels-first,
    (B, C, H, W) or (B, C, L). Keys and values are the added projections of the
    encoder states followed (unless ``only_cross_attention``) by the projections of
    the tokens themselves. Returns query, key, value as (B, L, inner_dim) and the mask
    as (B, heads, Lq or 1, Lk) or None."""
    batch_size, channels = hidden_states.shape[:2]
    hidden_states = hidden_states.reshape(batch_size, channels, -1)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, hidden_states.shape[2], batch_size, out_dim=4)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states.transpose(1, 2)
    elif attn.norm_cross is not None:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states)
    tokens = hidden_states.transpose(1, 2)
    query = attn.to_q(tokens)
    key = attn.add_k_proj(encoder_hidden_states)
    value = attn.add_v_proj(encoder_hidden_states)
    if not attn.only_cross_attention:
        key = torch.cat([key, attn.to_k(tokens)], dim=1)
        value = torch.cat([value, attn.to_v(tokens)], dim=1)
    return query, key, value, attention_mask


def _sliced_attention(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor], slice_size: int) -> torch.Tensor:
    """Attention over (B, L, heads * D) inputs, ``slice_size`` of the B * heads rows at a
    time. ``mask`` broadcasts to (B, heads, Lq, Lk). Returns (B, Lq, heads * D)."""
    batch_size, query_length, inner_dim = query.shape
    heads = attn.heads
    head_dim = inner_dim // heads
    q, k, v = (_heads_view(t, batch_size, heads).reshape(batch_size * heads, -1, head_dim) for t in (query, key, value))
    if mask is not None:
        mask = mask.expand(batch_size, heads, *mask.shape[2:]).reshape(batch_size * heads, *mask.shape[2:])
    pieces = []
    for start in range(0, batch_size * heads, slice_size):
        rows = slice(start, start + slice_size)
        piece_mask = None if mask is None else mask[None, rows]
        pieces.append(attention(q[None, rows], k[None, rows], v[None, rows], attn_mask=piece_mask, scale=attn.scale)[0])
    out = torch.cat(pieces)
    return out.view(batch_size, heads, query_length, head_dim).transpose(1, 2).reshape(batch_size, query_length, inner_dim)


def _empty_heads(like: torch.Tensor, batch_size: int, length: int, heads: int, head_dim: int) -> torch.Tensor:
    """An uninitialised (B, heads, L, D) view of a (B, L, heads * D) buffer: what a
    projection's output looks like to the attention op (for ``explain``)."""
    return like.new_empty((batch_size, length, heads, head_dim)).transpose(1, 2)


# ---------------------------------------------------------------------------
# fastdiff's processors
# ---------------------------------------------------------------------------


class CrossAttentionKVCache:
    """The cross-attention keys and values of one text embedding, computed once per generation.

    Build it from the ``encoder_hidden_states`` the UNet will get every step and pass it
    in ``cross_attention_kwargs={"kv_cache": cache}``; :class:`FastdiffAttnProcessor`
    then projects the embedding once per cross-attention module (on first use) and
    reuses the result, which is the uncached result bitwise (the same projection code).
    Nothing is global: the cache lives as long as the caller keeps it.

    It can never serve a stale result: it answers only for the very tensor it was
    built from (identity) at the version it had then (an in-place change bumps
    ``tensor._version``); anything else raises. A module whose K/V weights (or cross
    norm) changed since, by identity or version, is recomputed. Entries are kept only
    for results that need no gradient (inference); with autograd on, each call projects.
    """

    def __init__(self, encoder_hidden_states: torch.Tensor):
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3:
            raise ValueError(f"CrossAttentionKVCache: encoder_hidden_states must be a (B, L, D) tensor, got {getattr(encoder_hidden_states, 'shape', encoder_hidden_states)!r}")
        self.encoder_hidden_states = encoder_hidden_states
        self._version = encoder_hidden_states._version
        self._entries: Dict[nn.Module, Tuple[Tuple[Tuple[int, int], ...], torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, encoder_hidden_states: torch.Tensor) -> None:
        """Raise unless ``encoder_hidden_states`` is the unchanged tensor this cache was built from."""
        if encoder_hidden_states is not self.encoder_hidden_states:
            raise ValueError(
                "kv_cache: built from a different encoder_hidden_states tensor than this call's; "
                "build a new CrossAttentionKVCache for a new embedding"
            )
        if encoder_hidden_states._version != self._version:
            raise ValueError("kv_cache: encoder_hidden_states was modified in place since the cache was built; build a new cache")

    def key_value(self, attn, encoder_hidden_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``attn``'s (key, value) of the cached embedding, (B, Lk, inner_dim) each."""
        self.check(encoder_hidden_states)
        sources = _kv_sources(attn)
        entry = self._entries.get(attn)
        if entry is not None and entry[0] == sources:
            self.hits += 1
            return entry[1], entry[2]
        self.misses += 1
        key, value = _key_value(attn, _context(attn, encoder_hidden_states, encoder_hidden_states))
        if not (key.requires_grad or value.requires_grad):
            self._entries[attn] = (sources, key, value)
        return key, value


def _kv_sources(attn) -> Tuple[Tuple[int, int], ...]:
    """(id, version) of every tensor the keys and values are computed from."""
    modules = [attn.to_k, attn.to_v] + ([attn.norm_cross] if attn.norm_cross is not None else [])
    return tuple((id(t), t._version) for m in modules for t in m.parameters()) + (("fused", int(attn.fused_projections)),)


def _key_value(attn, context: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The keys and values of ``context``, computed exactly as ``Attention._project`` does."""
    if attn.fused_projections and attn.is_cross_attention:
        weight, bias = attn._fused_weight_and_bias()
        return F.linear(context, weight, bias).split(attn.inner_dim, dim=-1)
    return attn.to_k(context), attn.to_v(context)


class FastdiffAttnProcessor:
    """fastdiff's default processor: diffusers' ``AttnProcessor2_0`` steps (spatial norm,
    group norm, cross norm, projections, attention, output projection, residual,
    rescale) with attention through :func:`fastdiff.ops.attention`, the mask as a
    broadcast view, and the fused q/k/v GEMM when the module's projections are fused.
    Same outputs as diffusers' ``Attention`` to fp32 rounding."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        kv_cache: Optional[CrossAttentionKVCache] = None,
    ) -> torch.Tensor:
        """``kv_cache`` (a :class:`CrossAttentionKVCache` of ``encoder_hidden_states``) serves the
        cross-attention keys and values; self-attention ignores it."""
        residual = hidden_states
        tokens, shape4 = _tokens(attn, hidden_states, temb)
        batch_size, query_length, _ = tokens.shape
        if kv_cache is not None and encoder_hidden_states is not None and attn.is_cross_attention:
            key, value = kv_cache.key_value(attn, encoder_hidden_states)
            query = attn.to_q(tokens)
        else:
            query, key, value = attn._project(tokens, _context(attn, tokens, encoder_hidden_states))
        if attention_mask is not None:
            attention_mask = attn._attention_mask_view(attention_mask, key.shape[1], batch_size)
        heads = attn.heads
        hidden_states = attention(
            _heads_view(query, batch_size, heads), _heads_view(key, batch_size, heads), _heads_view(value, batch_size, heads), attn_mask=attention_mask, scale=attn.scale
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, query_length, attn.inner_dim)
        return _epilogue(attn, hidden_states, residual, shape4)

    def attention_shapes(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        """(q, k, v, mask) with the shapes, dtype, device and layout this processor would
        pass to :func:`fastdiff.ops.attention` (uninitialised; for ``Attention.explain``)."""
        batch_size = hidden_states.shape[0]
        query_length = hidden_states.shape[2] * hidden_states.shape[3] if hidden_states.dim() == 4 else hidden_states.shape[1]
        key_length = query_length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads
        q = _empty_heads(hidden_states, batch_size, query_length, attn.heads, head_dim)
        k, v = (_empty_heads(hidden_states, batch_size, key_length, attn.heads, head_dim) for _ in range(2))
        mask = None if attention_mask is None else attn._attention_mask_view(attention_mask, key_length, batch_size)
        return q, k, v, mask


class FastdiffAttnAddedKVProcessor:
    """The default processor of modules with ``added_kv_proj_dim``: diffusers'
    ``AttnAddedKVProcessor`` on :func:`fastdiff.ops.attention`. Takes channels-first
    hidden_states ((B, C, H, W) or (B, C, L)); the keys and values are the encoder
    states' added projections followed by the tokens' own (only the former with
    ``only_cross_attention``); the output always adds the input (diffusers' residual,
    with no ``rescale_output_factor``)."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        residual = hidden_states
        query, key, value, attention_mask = _added_kv_inputs(attn, hidden_states, encoder_hidden_states, attention_mask)
        batch_size, query_length, _ = query.shape
        heads = attn.heads
        hidden_states = attention(
            _heads_view(query, batch_size, heads), _heads_view(key, batch_size, heads), _heads_view(value, batch_size, heads), attn_mask=attention_mask, scale=attn.scale
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, query_length, attn.inner_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states.transpose(-1, -2).reshape(residual.shape) + residual

    def attention_shapes(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        """As :meth:`FastdiffAttnProcessor.attention_shapes`."""
        batch_size = hidden_states.shape[0]
        query_length = hidden_states[0, 0].numel()
        encoder_length = query_length if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        key_length = encoder_length + (0 if attn.only_cross_attention else query_length)
        head_dim = attn.inner_dim // attn.heads
        q = _empty_heads(hidden_states, batch_size, query_length, attn.heads, head_dim)
        k, v = (_empty_heads(hidden_states, batch_size, key_length, attn.heads, head_dim) for _ in range(2))
        mask = None if attention_mask is None else attn.prepare_attention_mask(attention_mask, query_length, batch_size, out_dim=4)
        return q, k, v, mask


def _check_slice_size(slice_size) -> int:
    if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
        raise ValueError(f"slice_size must be a positive int, got {slice_size!r}")
    return slice_size


class SlicedAttnProcessor:
    """:class:`FastdiffAttnProcessor`'s math with attention computed ``slice_size`` rows of
    the batch * heads at a time (diffusers' ``SlicedAttnProcessor``: less memory for
    the scores, more launches). Separate projections; fused ones are not used."""

    def __init__(self, slice_size: int):
        self.slice_size = _check_slice_size(slice_size)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        residual = hidden_states
        tokens, shape4 = _tokens(attn, hidden_states, temb)
        context = tokens if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = attn.to_q(tokens), attn.to_k(context), attn.to_v(context)
        if attention_mask is not None:
            attention_mask = attn._attention_mask_view(attention_mask, key.shape[1], tokens.shape[0])
        hidden_states = _sliced_attention(attn, query, key, value, attention_mask, self.slice_size)
        return _epilogue(attn, hidden_states, residual, shape4)


class SlicedAttnAddedKVProcessor:
    """:class:`FastdiffAttnAddedKVProcessor` with attention computed ``slice_size`` rows of
    the batch * heads at a time (diffusers' ``SlicedAttnAddedKVProcessor``)."""

    def __init__(self, slice_size: int):
        self.slice_size = _check_slice_size(slice_size)

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        residual = hidden_states
        query, key, value, attention_mask = _added_kv_inputs(attn, hidden_states, encoder_hidden_states, attention_mask)
        hidden_states = _sliced_attention(attn, query, key, value, attention_mask, self.slice_size)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states.transpose(-1, -2).reshape(residual.shape) + residual


# ---------------------------------------------------------------------------
# Model level
# ---------------------------------------------------------------------------


def _processor_modules(root: nn.Module):
    """(key, module) for every submodule with a processor, keyed ``"<module path>.processor"``."""
    for name, module in root.named_modules():
        if module is not root and hasattr(module, "set_processor") and hasattr(module, "get_processor"):
            yield f"{name}.processor", module


def _sliceable_modules(root: nn.Module) -> List[nn.Module]:
    """Every attention layer that can be sliced, in diffusers' order (depth-first, children in order)."""
    return [m for m in root.modules() if m is not root and hasattr(m, "set_attention_slice") and hasattr(m, "sliceable_head_dim")]


class AttentionProcessorMixin:
    """Model-level access to the attention processors of every ``Attention`` inside."""

    @property
    def attn_processors(self) -> Dict[str, object]:
        """Every attention processor in the model, keyed by ``"<module path>.processor"``."""
        return {key: module.get_processor() for key, module in _processor_modules(self)}

    def set_attn_processor(self, processor: Union[object, Dict[str, object]]) -> None:
        """Set one processor on every attention layer, or a dict keyed as ``attn_processors`` is.

        A dict must name every attention layer of the model, and nothing else.
        """
        modules = dict(_processor_modules(self))
        if isinstance(processor, dict):
            missing = sorted(set(modules) - set(processor))
            unknown = sorted(set(processor) - set(modules))
            if missing or unknown:
                raise ValueError(
                    f"set_attn_processor: the dict of processors must have one entry per attention layer "
                    f"({len(modules)}); missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unknown {unknown[:5]}{'...' if len(unknown) > 5 else ''}"
                )
            for key, module in modules.items():
                module.set_processor(processor[key])
        else:
            for module in modules.values():
                module.set_processor(processor)

    def set_default_attn_processor(self) -> None:
        """Give every attention layer its default processor back: fastdiff's fused
        :class:`FastdiffAttnProcessor` (:class:`FastdiffAttnAddedKVProcessor` for layers
        with added key/value projections), undoing ``set_attn_processor`` and
        ``set_attention_slice``.

        diffusers installs its plain-math ``AttnProcessor`` here; fastdiff restores the
        processor the model was built with (the same outputs to fp32 rounding). To run
        diffusers' plain math, pass ``diffusers.models.attention_processor.AttnProcessor()``
        to :meth:`set_attn_processor`.
        """
        for _, module in _processor_modules(self):
            module.set_processor(module.default_processor())

    def set_attention_slice(self, slice_size: Union[str, int, List[Optional[int]], None] = "auto") -> None:
        """Compute attention in slices to save memory, with diffusers' semantics.

        Args:
            slice_size: ``"auto"`` halves each layer's heads (``sliceable_head_dim // 2``
                rows of batch * heads per slice, at least 1), ``"max"`` runs one row
                at a time, an int is used for every layer, and a list gives one entry
                per attention layer in module order (None leaves that layer on its
                default processor). An entry larger than a layer's
                ``sliceable_head_dim`` (its head count) is an error, as in diffusers.

        Layers get :class:`SlicedAttnProcessor` (or :class:`SlicedAttnAddedKVProcessor`).
        diffusers' ``"auto"`` gives a single-head layer a slice of 0, which fails at the
        first forward (ZeroDivisionError); fastdiff uses 1 there.
        """
        modules = _sliceable_modules(self)
        head_dims = [m.sliceable_head_dim for m in modules]
        if slice_size == "auto":
            slice_size = [max(dim // 2, 1) for dim in head_dims]
        elif slice_size == "max":
            slice_size = [1] * len(modules)
        elif isinstance(slice_size, str):
            raise ValueError(f"set_attention_slice: slice_size must be 'auto', 'max', an int or a list of ints, got {slice_size!r}")
        sizes = list(slice_size) if isinstance(slice_size, list) else [slice_size] * len(modules)
        if len(sizes) != len(head_dims):
            raise ValueError(
                f"You have provided {len(sizes)}, but {type(self).__name__} has {len(head_dims)} different"
                f" attention layers. Make sure to match `len(slice_size)` to be {len(head_dims)}."
            )
        for size, dim in zip(sizes, head_dims):
            if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
                raise ValueError(f"set_attention_slice: every slice size must be a positive int or None, got {size!r}")
            if size is not None and size > dim:
                raise ValueError(f"size {size} has to be smaller or equal to {dim}.")
        for module, size in zip(modules, sizes):
            module.set_attention_slice(size)
