"""Scaled dot-product attention: the op, its reference twin, and its backends.

Public entry point: :func:`attention` (layout (B, H, L, D), like
``torch.nn.functional.scaled_dot_product_attention``). Backends:

* ``reference``: :func:`attention_ref`, plain PyTorch math in fp32 (fp64 stays
  fp64). The test oracle; never picked by ``auto``.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, the vendor
  baseline and the CPU path.
* ``triton``: ``kernels/attention.py`` (fastdiff.kernels.attention), a flash
  attention forward and an FA2-style Triton backward, wrapped in the custom ops
  ``fastdiff::attention_fwd_triton`` / ``fastdiff::attention_bwd_triton``.
* ``triton_tma``: the same forward reading q/k/v through Hopper TMA tensor
  descriptors (``fastdiff::attention_fwd_triton_tma``; Triton >= 3.4, sm_90+),
  with the same backward. Not in the auto order until a device run measures it.

The ``auto`` priority table is :func:`_priority`; the reason for each entry is
written next to it.

Fully-masked rows (a query whose every key is masked out, by ``False`` or by
``-inf``) produce zeros, and zero gradients. That is what torch >= 2.5's SDPA
returns on every backend we checked (torch 2.13 CPU: flash and math), and all
our backends do the same.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from fastdiff import backends

OP_NAME = "attention"
#: dtypes the op accepts; fp64 runs on ``reference`` and ``sdpa`` only.
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Head dims: every backend takes any D >= 1 up to its limit. ``reference`` and
# ``sdpa`` have none; the Triton kernels pad D up to their tile width (a multiple
# of 16, split into at most two power-of-two chunks; the padded columns are
# masked) and decline D > 256 (the SD VAE's single 512-wide head runs on sdpa).


# ---------------------------------------------------------------------------
# Reference twin (plain PyTorch): the oracle.
# ---------------------------------------------------------------------------


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(q @ k^T * scale + mask) @ v in plain PyTorch.

    With ``upcast`` (the default) fp16/bf16 inputs are computed in fp32 and the
    result is cast back: the math the fused kernel does. ``upcast=False``
    computes in the inputs' dtype. A boolean ``attn_mask`` keeps the positions
    where it is True; a floating one is added to the scores. Fully-masked rows
    give zeros (see the module docstring). Returns (B, H, Lq, D) in q's dtype.
    """
    compute = torch.float32 if upcast and q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    scores = torch.matmul(qc, kc.transpose(-2, -1)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(compute)
    row_max = scores.amax(dim=-1, keepdim=True)
    # A fully-masked row has max -inf; shift it by 0 instead so exp() gives 0, not NaN.
    row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.matmul(probs, vc).to(q.dtype)


# ---------------------------------------------------------------------------
# Input validation: concise errors naming the argument.
# ---------------------------------------------------------------------------


def _check_inputs(q, k, v, attn_mask, scale) -> None:
    for arg_name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention: {arg_name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {arg_name} must have shape (B, H, L, D), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"attention: {arg_name} is empty (shape {tuple(t.shape)})")
        if t.dtype not in DTYPES:
            raise ValueError(f"attention: {arg_name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")
    for arg_name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"attention: {arg_name} dtype {t.dtype} does not match q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {arg_name} is on {t.device} but q is on {q.device}")
        for dim, what in ((0, "batch size B"), (1, "head count H"), (3, "head dim D")):
            if t.shape[dim] != q.shape[dim]:
                raise ValueError(
                    f"attention: {arg_name} has {what} {t.shape[dim]} but q has {q.shape[dim]} "
                    f"(q {tuple(q.shape)}, {arg_name} {tuple(t.shape)})"
                )
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"attention: v has length {v.shape[2]} but k has {k.shape[2]}; they must match (Lk)")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise ValueError(f"attention: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise ValueError(f"attention: attn_mask must be bool or q's dtype {q.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attention: attn_mask is on {attn_mask.device} but q is on {q.device}")
        target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if not _broadcastable(tuple(attn_mask.shape), target):
            raise ValueError(f"attention: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Lq, Lk) = {target}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale):
        raise ValueError(f"attention: scale must be a float or None, got {scale!r}")


def _broadcastable(shape: tuple, target: tuple) -> bool:
    """True when ``shape`` broadcasts to exactly ``target`` (not merely with it)."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


# ---------------------------------------------------------------------------
# Backends. ``inputs`` is the dict built by :func:`_inputs`:
# q, k, v (B, H, L, D), attn_mask (broadcastable to (B, H, Lq, Lk)) or None,
# scale (a float; None already resolved to D ** -0.5).
# ---------------------------------------------------------------------------


def _reference_reasons(inputs: Mapping[str, Any]) -> List[str]:
    return []


def _reference_run(inputs: Mapping[str, Any]) -> torch.Tensor:
    return attention_ref(inputs["q"], inputs["k"], inputs["v"], inputs["attn_mask"], inputs["scale"])


def _sdpa_reasons(inputs: Mapping[str, Any]) -> List[str]:
    return []


def _sdpa_run(inputs: Mapping[str, Any]) -> torch.Tensor:
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["attn_mask"], scale=inputs["scale"])


def _triton_reasons(inputs: Mapping[str, Any], tma: bool = False) -> List[str]:
    """Why ``triton`` (or, with ``tma``, ``triton_tma``) cannot run ``inputs``. The
    kernels' reasons read the device through fastdiff.backends' description
    (``use_target`` or the visible GPU), so they also decide on fake CUDA tensors."""
    if not backends.triton_available():
        return ["triton is not installed"]
    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["attn_mask"]
    reasons = backends.device_reasons([q, k, v, mask], allow_cpu_interpret=True)
    from fastdiff.kernels import attention as kernels

    return reasons + (kernels.tma_reasons if tma else kernels.layout_reasons)(q, k, v, mask)


def _needs_autograd_graph(inputs: Mapping[str, Any]) -> bool:
    """Whether the call must go through the custom op: under torch.compile (which
    traces the op), inside a TorchDispatchMode (fake tensors take the op's fake
    implementation; a census sees one op), or when autograd has to record it (grad
    mode on and an input that requires grad). Otherwise the launcher is called
    directly, which skips the torch.library dispatch (several microseconds per call)."""
    if backends._is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return True  # traced, or seen by a dispatch mode (FakeTensorMode, an op census): one op
    return torch.is_grad_enabled() and (inputs["q"].requires_grad or inputs["k"].requires_grad or inputs["v"].requires_grad)


def _triton_run(inputs: Mapping[str, Any]) -> torch.Tensor:
    if not _needs_autograd_graph(inputs):
        from fastdiff.kernels.attention import attention_forward

        return attention_forward(inputs["q"], inputs["k"], inputs["v"], inputs["attn_mask"], inputs["scale"])[0]
    out, _ = _attention_fwd_triton(inputs["q"], inputs["k"], inputs["v"], inputs["attn_mask"], inputs["scale"])
    return out


def _triton_tma_reasons(inputs: Mapping[str, Any]) -> List[str]:
    return _triton_reasons(inputs, tma=True)


def _triton_tma_run(inputs: Mapping[str, Any]) -> torch.Tensor:
    if not _needs_autograd_graph(inputs):
        from fastdiff.kernels.attention import attention_forward_tma

        return attention_forward_tma(inputs["q"], inputs["k"], inputs["v"], inputs["attn_mask"], inputs["scale"])[0]
    out, _ = _attention_fwd_triton_tma(inputs["q"], inputs["k"], inputs["v"], inputs["attn_mask"], inputs["scale"])
    return out


def _priority(inputs: Mapping[str, Any]) -> List[str]:
    """The ``auto`` order, best first; the first backend with no reasons runs.

    * CUDA tensors -> ``triton``, then ``sdpa``. Triton goes first as the issue
      sets out, until a device run of benchmarks/bench_attention.py (results in
      benchmarks/results/) shows per shape and architecture where SDPA is
      faster; no GPU figures exist yet. ``sdpa`` takes what Triton declines
      (head dims above 256, fp64, an attn_mask that requires grad,
      B * H > 65535). ``triton_tma`` is left out until the same benchmark
      has measured it against ``triton`` on a Hopper card.
    * CPU tensors -> ``sdpa``: torch's CPU flash kernel is the fastest CPU path
      we have. ``triton`` runs on the CPU only when forced, under
      TRITON_INTERPRET=1 (for tests). ``reference`` is the oracle and never auto.
    """
    if inputs["q"].device.type == "cuda":
        return ["triton", "sdpa"]
    return ["sdpa"]


_DISPATCHER = backends.register_dispatcher(
    backends.Dispatcher(
        OP_NAME,
        [
            backends.Backend("reference", _reference_reasons, _reference_run, "plain PyTorch math in fp32 (the oracle)"),
            backends.Backend("sdpa", _sdpa_reasons, _sdpa_run, "torch.nn.functional.scaled_dot_product_attention"),
            backends.Backend("triton", _triton_reasons, _triton_run, "kernels/attention.py: flash-attention forward, FA2-style Triton backward"),
            backends.Backend("triton_tma", _triton_tma_reasons, _triton_tma_run, "the Triton forward with TMA tensor descriptors (Hopper); same backward"),
        ],
        _priority,
    )
)


# ---------------------------------------------------------------------------
# Custom ops (torch.library), so torch.compile and CUDA graphs see through them.
# ---------------------------------------------------------------------------


@torch.library.custom_op("fastdiff::attention_fwd_triton", mutates_args=())
def _attention_fwd_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): out (B, H, Lq, D), a view of a (B, Lq, H, D) buffer; lse (B, H, Lq) fp32, log2 units."""
    from fastdiff.kernels.attention import attention_forward

    return attention_forward(q, k, v, attn_mask, scale)


@_attention_fwd_triton.register_fake
def _attention_fwd_fake(q, k, v, attn_mask, scale):
    b, h, lq, d = q.shape
    out = q.new_empty((b, lq, h, d)).transpose(1, 2)
    return out, q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("fastdiff::attention_bwd_triton", mutates_args=())
def _attention_bwd_triton(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastdiff.kernels.attention import attention_backward

    return attention_backward(dout, q, k, v, attn_mask, out, lse, scale)


@_attention_bwd_triton.register_fake
def _(dout, q, k, v, attn_mask, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("fastdiff::attention_fwd_triton_tma", mutates_args=())
def _attention_fwd_triton_tma(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """As ``fastdiff::attention_fwd_triton``, reading q/k/v through TMA descriptors."""
    from fastdiff.kernels.attention import attention_forward_tma

    return attention_forward_tma(q, k, v, attn_mask, scale)


_attention_fwd_triton_tma.register_fake(_attention_fwd_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, attn_mask, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k, v, attn_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_triton(dout, q, k, v, attn_mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


torch.library.register_autograd("fastdiff::attention_fwd_triton", _backward, setup_context=_setup_context)
torch.library.register_autograd("fastdiff::attention_fwd_triton_tma", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------


def _as_4d_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """Leading size-1 dims, as a view: every backend then sees a 4-D mask (SDPA rejects a 1-D one)."""
    if attn_mask.dim() < 4:
        return attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    return attn_mask


def _inputs(q, k, v, attn_mask, scale) -> Dict[str, Any]:
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if attn_mask is not None:
        attn_mask = _as_4d_mask(attn_mask)
    return {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "scale": scale}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """softmax(q @ k^T * scale + attn_mask) @ v, non-causal, no dropout.

    Args:
        q: (B, H, Lq, D) queries; fp16, bf16 or fp32 (fp64 on ``reference``
            and ``sdpa``). Any head dim D: the Triton backends pad it to their
            tile width and take D up to 256 (larger head dims, like the SD VAE's
            512, run on ``sdpa``); ``triton_tma`` also needs 16-byte rows and
            says so in its reasons.
        k: (B, H, Lk, D) keys, same dtype and device as q. Lk may differ from Lq.
        v: (B, H, Lk, D) values.
        attn_mask: None, or a mask broadcastable to (B, H, Lq, Lk): boolean
            (True = attend) or additive in q's dtype.
        scale: multiplies q @ k^T; None means D ** -0.5.
        backend: "auto", "reference", "sdpa", "triton" or "triton_tma"; None follows
            ``fastdiff.use_backend`` / FASTDIFF_BACKEND, else auto.

    Returns:
        (B, H, Lq, D) in q's dtype. Fully-masked rows are zeros.

    Gradients flow to q, k and v on every backend: ``reference`` and ``sdpa``
    through PyTorch's autograd (which also gives an additive attn_mask its
    gradient), ``triton`` through its own Triton backward kernels (dK/dV and
    dQ from the saved logsumexp; no SDPA recompute). ``triton`` declines an
    attn_mask that requires grad.
    """
    scale_to_use = _cpu_auto_scale(q, k, v, attn_mask, scale, backend)
    if scale_to_use is not None:
        # CPU fast path: auto would choose ``sdpa`` and every check would pass. The same SDPA
        # call as the ``sdpa`` backend's, with positional arguments (keywords cost ~0.5 us each).
        backends._record(OP_NAME, "sdpa")
        args = (q, k, v) if attn_mask is None else (q, k, v, _as_4d_mask(attn_mask))
        if scale_to_use is _SDPA_DEFAULT:
            return _scaled_dot_product_attention(*args)
        return _scaled_dot_product_attention(*args, scale=scale_to_use)
    # A repeat call with the same layout reuses the backend chosen before (the
    # dispatcher's plan cache) and skips the argument checks and every reason.
    # Under torch.compile the checked path runs once, at trace time.
    key = None if backends._is_compiling() else _plan_key(q, k, v, attn_mask, scale)
    chosen = _DISPATCHER.lookup(key, backend) if key is not None else None
    if chosen is None:
        _check_inputs(q, k, v, attn_mask, scale)
        inputs = _inputs(q, k, v, attn_mask, scale)
        chosen = _DISPATCHER.select(inputs, backend, cache_key=key)
    else:
        inputs = _inputs(q, k, v, attn_mask, scale)
    return chosen.run(inputs)


def _cpu_auto_scale(q, k, v, attn_mask, scale, backend) -> Any:
    """The scale for :func:`attention`'s CPU fast path (straight to SDPA, no plan key, no
    dispatch): a float, or :data:`_SDPA_DEFAULT` for SDPA's own default; None when the call
    must take the checked, dispatched path.

    A float only when the dispatcher would choose ``sdpa`` by ``auto`` (CPU tensors; the
    request is ``auto``: ``backend=None``/``"auto"`` with neither ``use_backend`` nor
    FASTDIFF_BACKEND naming a backend; auto's CPU order is ``sdpa`` alone, under
    TRITON_INTERPRET too) and :func:`_check_inputs` would pass. Anything else (a forced
    backend, ``sdpa`` included, torch.compile tracing, a tensor subclass such as a FakeTensor,
    an argument the checks might reject, a dispatcher whose select/lookup/backends are being
    watched or replaced, as pipeline explain and the step census do) gives None: the call is
    then checked and dispatched exactly as before, with the same errors and choice. Written
    as straight-line attribute checks: on a small problem SDPA itself takes ~15 us."""
    if _is_compiling() or (backend is not None and backend != "auto"):
        return None
    if type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor:
        return None
    if not (q.is_cpu and k.is_cpu and v.is_cpu) or (backend is None and not backends.context_requests_auto()):
        return None
    if not _DISPATCHER.untouched("sdpa", _sdpa_run, _sdpa_reasons, _priority):
        return None
    q_shape, k_shape = q.shape, k.shape
    if len(q_shape) != 4 or v.shape != k_shape or len(k_shape) != 4 or 0 in q_shape or 0 in k_shape:
        return None
    if k_shape[0] != q_shape[0] or k_shape[1] != q_shape[1] or k_shape[3] != q_shape[3]:
        return None
    dtype = q.dtype
    if dtype not in _DTYPE_SET or k.dtype != dtype or v.dtype != dtype:
        return None
    if attn_mask is not None:
        if type(attn_mask) is not _Tensor or not attn_mask.is_cpu:
            return None
        if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
            return None
        if not _broadcastable(tuple(attn_mask.shape), (q_shape[0], q_shape[1], q_shape[2], k_shape[2])):
            return None
    if scale is None:
        head_dim = q_shape[3]
        return _SDPA_DEFAULT if head_dim in _SDPA_SAME_DEFAULT_SCALE else head_dim ** -0.5
    if type(scale) is float and scale == scale:
        return scale
    return None


# Bound once: attribute lookups through the torch module cost ~0.1 us each on the CPU path.
_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
_scaled_dot_product_attention = F.scaled_dot_product_attention
_DTYPE_SET = frozenset(DTYPES)

#: Returned by :func:`_cpu_auto_scale` for "call SDPA without ``scale=``". The ``sdpa`` backend
#: passes ``D ** -0.5``; SDPA's own default is ``1.0 / sqrt(D)`` (ATen's calculate_scale, in
#: double). For the head dims listed here the two doubles are equal, so leaving ``scale`` out
#: gives the very same call; for the others (8, 32, 128, ...: they differ in the last bit)
#: the fast path passes ``D ** -0.5`` as the backend does.
_SDPA_DEFAULT = object()
_SDPA_SAME_DEFAULT_SCALE = frozenset(d for d in range(1, 1025) if d ** -0.5 == 1.0 / math.sqrt(d))


def _plan_key(q, k, v, attn_mask, scale) -> Optional[tuple]:
    """A cheap summary of everything :func:`_check_inputs` and every backend's reasons
    read (shapes, strides, dtypes, devices, whether q/k/v are 16-byte aligned (TMA),
    the mask's layout and requires_grad, the scale) for the dispatcher's plan cache;
    None when an argument is not a tensor or a float (the checked path then names it).
    Only the backend choice is cached: the run reads the live tensors. Whether Triton
    runs interpreted is fixed when the kernels are defined; after changing
    TRITON_INTERPRET in a running process, call fastdiff.backends.clear_plans()."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    if scale is not None and type(scale) is not float:
        return None
    if isinstance(q, FakeTensor) or isinstance(k, FakeTensor) or isinstance(v, FakeTensor):
        misaligned = False  # no storage; the kernels' reasons take fake tensors as aligned
    else:
        misaligned = bool((q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15)
    key = (
        q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
        v.shape, v.stride(), v.dtype, v.device, misaligned, scale,
    )
    if attn_mask is None:
        return key
    if not isinstance(attn_mask, torch.Tensor):
        return None
    return key + (attn_mask.shape, attn_mask.stride(), attn_mask.dtype, attn_mask.device, attn_mask.requires_grad)


def explain(q, k, v, attn_mask=None, scale=None, backend=None) -> str:
    """Which backend :func:`attention` would run on these inputs, and every backend's reasons."""
    _check_inputs(q, k, v, attn_mask, scale)
    return _DISPATCHER.explain(_inputs(q, k, v, attn_mask, scale), backend)


attention.explain = explain
