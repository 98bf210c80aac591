"""GEGLU's gate product, ``hidden * gelu(gate)``: the op, its reference twin, and its backends.

Public entry point: :func:`geglu`, applied to the (..., 2D) output of the
feed-forward's projection: the hidden half first, the gate half second
(diffusers' ``hidden_states, gate = proj(x).chunk(2, dim=-1)``), GELU exact
(erf, diffusers' default ``approximate="none"``).

Backends, in ``auto`` order:

======================  =====================================================
every device            ``reference`` (``triton`` only when forced: on CUDA,
                        or on the CPU under TRITON_INTERPRET=1)
======================  =====================================================

Why this order: see :func:`_priority`.

The reference twin :func:`geglu_ref` is plain PyTorch: the test oracle (with
``upcast``) and, without it, exactly diffusers' eager sequence, which is what
the ``reference`` backend runs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F

from fastdiff import backends

OP_NAME = "geglu"


# ---------------------------------------------------------------------------
# Reference twin (plain PyTorch): the oracle and the CPU path.
# ---------------------------------------------------------------------------


def geglu_ref(x: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """``hidden * gelu(gate)`` with ``hidden, gate = x.chunk(2, dim=-1)``, in plain PyTorch.

    With ``upcast`` (the default) fp16/bf16 inputs are computed in fp32 and the
    result cast back once, which is what the Triton kernel does. With
    ``upcast=False`` it is diffusers' eager sequence in x's dtype (PyTorch's
    half-precision gelu computes in fp32 internally, but rounds before the
    product): the "plain PyTorch in the same dtype" that low-precision tests
    measure against. Without autograd recording, the product is taken in place
    in gelu's output, so no third (..., D) tensor is allocated.
    """
    compute_dtype = torch.float32 if upcast and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    hidden, gate = x.to(compute_dtype).chunk(2, dim=-1)
    if torch.is_grad_enabled() and x.requires_grad:
        y = hidden * F.gelu(gate)
    else:
        y = F.gelu(gate).mul_(hidden)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------
# Input validation: concise errors naming the argument.
# ---------------------------------------------------------------------------


def _check_inputs(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"geglu: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("geglu: x must have at least one dim (..., 2 * D), got a 0-dim tensor")
    if not x.is_floating_point():
        raise ValueError(f"geglu: x must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"geglu: x is empty (shape {tuple(x.shape)})")
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: the last dim of x must be even (hidden and gate halves), got {x.shape[-1]}")


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


def _reference_reasons(inputs: Mapping[str, Any]) -> List[str]:
    return []


def _reference_run(inputs: Mapping[str, Any]) -> torch.Tensor:
    return geglu_ref(inputs["x"], upcast=False)


def _triton_reasons(inputs: Mapping[str, Any]) -> List[str]:
    if not backends.triton_available():
        return ["triton is not installed"]
    x = inputs["x"]
    reasons = backends.device_reasons([x], allow_cpu_interpret=True)
    from fastdiff.kernels.geglu import layout_reasons

    return reasons + layout_reasons(x)


def _triton_run(inputs: Mapping[str, Any]) -> torch.Tensor:
    return _geglu_fwd_triton(inputs["x"])


def _priority(inputs: Mapping[str, Any]) -> List[str]:
    # ``reference`` on every device for now: the Triton kernel is tested under
    # the interpreter but has not been timed on a GPU. benchmarks/bench_geglu.py
    # against eager (chunk + gelu + mul) and torch.compile decides whether CUDA
    # tensors get ``triton`` first; until then it runs only when forced.
    return ["reference"]


_DISPATCHER = backends.register_dispatcher(
    backends.Dispatcher(
        OP_NAME,
        [
            backends.Backend("reference", _reference_reasons, _reference_run, "plain PyTorch: chunk, F.gelu, mul in x's dtype"),
            backends.Backend("triton", _triton_reasons, _triton_run, "kernels/geglu.py: one-pass forward and backward, fp32 math"),
        ],
        _priority,
    )
)


# ---------------------------------------------------------------------------
# Custom ops (torch.library), so torch.compile and CUDA graphs see through them.
# ---------------------------------------------------------------------------


@torch.library.custom_op("fastdiff::geglu_fwd_triton", mutates_args=())
def _geglu_fwd_triton(x: torch.Tensor) -> torch.Tensor:
    from fastdiff.kernels.geglu import geglu_forward

    return geglu_forward(x)


@_geglu_fwd_triton.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.custom_op("fastdiff::geglu_bwd_triton", mutates_args=())
def _geglu_bwd_triton(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    from fastdiff.kernels.geglu import geglu_backward

    return geglu_backward(dy, x)


@_geglu_bwd_triton.register_fake
def _(dy, x):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward_triton(ctx, dy):
    (x,) = ctx.saved_tensors
    return _geglu_bwd_triton(dy, x)


torch.library.register_autograd("fastdiff::geglu_fwd_triton", _backward_triton, setup_context=_setup_context)


# ---------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------


def geglu(x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """``hidden * gelu(gate)`` of a projection's output, without the chunk.

    Args:
        x: (..., 2 * D): hidden in ``x[..., :D]``, gate in ``x[..., D:]``;
            floating point (the ``triton`` backend takes fp32, fp16 and bf16).
            May be a strided view, e.g. the rows of a wider tensor: the
            ``triton`` backend reads any unit-last-stride view whose leading
            dims collapse to two strided dims, without a copy.
        backend: "auto", "reference" or "triton"; None follows
            ``fastdiff.use_backend`` / FASTDIFF_BACKEND, else auto.

    Returns:
        (..., D) in x's dtype, contiguous, with exact (erf) GELU. ``triton``
        computes in fp32 and rounds once; ``reference`` is diffusers' eager
        sequence in x's dtype.

    Gradients flow to x on both backends: ``reference`` through PyTorch's
    autograd, ``triton`` through its Triton backward, which writes both
    halves' gradients into one (..., 2 * D) tensor.
    """
    _check_inputs(x)
    return _DISPATCHER(_inputs(x), backend)


def _inputs(x) -> Dict[str, Any]:
    return {"x": x}


def explain(x, backend=None) -> str:
    """Which backend :func:`geglu` would run on these inputs, and every backend's reasons."""
    _check_inputs(x)
    return _DISPATCHER.explain(_inputs(x), backend)


geglu.explain = explain
