"""Triton GEGLU: ``y = hidden * gelu(gate)`` straight from the projection's output.

Public launchers (called by the custom ops in ``fastdiff/ops/geglu.py``, which
owns validation):

* :func:`layout_reasons` -- why the kernels cannot read ``x`` in place ([] if they can);
* :func:`geglu_forward` -- ``y`` of shape (..., D);
* :func:`geglu_backward` -- ``dx`` of shape (..., 2D), both halves in one tensor;
* :func:`launch_config` -- the one launch heuristic (tile shape and warps).

Layout. ``x`` is (..., 2D) with a unit last-dim stride: row r holds the hidden
half in columns [0, D) and the gate half in columns [D, 2D) (diffusers'
``proj(x).chunk(2, dim=-1)`` order). Its leading dims are collapsed to at most
two (size, stride) pairs (:func:`_collapse_rows`), so row r (of M rows) starts at::

    (r // R1) * stride_outer + (r % R1) * stride_inner   # TWO_D
    r * stride_inner                                      # otherwise

A contiguous tensor, or the rows of a wider one (``big[..., :2D]``), collapses
to one pair; ``x[:, ::2]`` needs the TWO_D form. Nothing is copied. The outputs
(y, and dx in the backward) are allocated contiguous.

Forward, one launch: program (pid_m, pid_d) owns the [BLOCK_M rows, BLOCK_D
columns] tile of y; it loads the matching tiles of both halves of x, computes in
fp32 and stores y once. Traffic: read 2D + write D per row (the floor), against
eager's chunk + gelu + mul which also writes and re-reads gelu(gate).

Backward, one launch over the same tiles, with Phi the standard normal CDF and
phi its density::

    gelu(g)   = g * Phi(g) = 0.5 * g * (1 + erf(g / sqrt(2)))
    gelu'(g)  = Phi(g) + g * phi(g),  phi(g) = exp(-g^2 / 2) / sqrt(2 * pi)
    dhidden   = dy * gelu(g)
    dgate     = dy * hidden * gelu'(g)

gelu(g) is recomputed from the saved x (nothing else is stored by the forward);
both gradients are written into one (..., 2D) tensor in x's layout order.

All arithmetic is fp32: every load is cast with ``.to(tl.float32)`` right away
and every store rounds to nearest (even) in the output's dtype.
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastdiff.kernels._common import _to_dtype, cdiv, next_pow2

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW_DIMS = 2  # collapsed (size, stride) pairs of leading dims the kernels index

# ---------------------------------------------------------------------------
# Launch heuristics (the one place that picks tile shapes and warps).
# ---------------------------------------------------------------------------

# Columns per tile: 256 fp16 columns is 512 contiguous bytes of each half per
# row, and divides every SD1.5/SDXL feed-forward width (D = 1280, 2560, 5120),
# so no lanes idle on the last column block.
MAX_BLOCK_D = 256
# Elements of y per program: 2048 with 4 warps is 16 per thread, i.e. two
# 16-byte fp16 vectors per thread for each half of x and for y.
TILE_ELEMS = 2048
MAX_NUM_WARPS = 4
ELEMS_PER_WARP = 512  # fewer warps for small tiles (e.g. a handful of rows)


@dataclasses.dataclass(frozen=True)
class GegluConfig:
    """How one GEGLU launch tiles y: [block_m rows, block_d columns] per program
    (powers of two), with num_warps warps."""

    block_m: int
    block_d: int
    num_warps: int


def launch_config(n_rows: int, d: int) -> GegluConfig:
    """The tile for M = ``n_rows`` rows of D = ``d`` output columns (forward and backward)."""
    block_d = min(MAX_BLOCK_D, next_pow2(d))
    block_m = min(next_pow2(n_rows), max(1, TILE_ELEMS // block_d))
    num_warps = max(1, min(MAX_NUM_WARPS, (block_m * block_d) // ELEMS_PER_WARP))
    return GegluConfig(block_m, block_d, num_warps)


# ---------------------------------------------------------------------------
# Layout: collapse the leading dims to at most two (size, stride) pairs.
# ---------------------------------------------------------------------------


def _collapse_rows(sizes: Sequence[int], strides: Sequence[int]) -> List[Tuple[int, int]]:
    """Merge adjacent leading dims where ``stride[i] == size[i+1] * stride[i+1]``.

    Dims of size 1 are dropped. Returns ``[(size, stride), ...]``, outermost
    first, never empty.
    """
    out: List[Tuple[int, int]] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue
        if out and out[-1][1] == size * stride:
            out[-1] = (out[-1][0] * size, stride)
        else:
            out.append((size, stride))
    return out or [(1, 0)]


def _row_args(x: torch.Tensor) -> Tuple[int, int, int, bool]:
    """(R1, stride_outer, stride_inner, TWO_D) for x's collapsed leading dims."""
    dims = _collapse_rows(x.shape[:-1], x.stride()[:-1])
    if len(dims) == 1:
        return dims[0][0], 0, dims[0][1], False
    return dims[1][0], dims[0][1], dims[1][1], True


def layout_reasons(x: torch.Tensor) -> List[str]:
    """Why the Triton kernels cannot read ``x`` in place; [] when they can."""
    reasons = []
    if x.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {x.dtype} not supported (expected one of fp32, fp16, bf16)")
    if x.dim() >= 1 and x.shape[-1] > 1 and x.stride(-1) != 1:
        reasons.append(f"the last dim of x must have stride 1, got {x.stride(-1)}")
    dims = _collapse_rows(x.shape[:-1], x.stride()[:-1])
    if len(dims) > MAX_ROW_DIMS:
        reasons.append(f"x's leading dims collapse to {len(dims)} strided dims (at most {MAX_ROW_DIMS})")
    if x.numel() >= 2**31:
        reasons.append("more than 2**31 - 1 elements in x")
    return reasons


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------

# tl.constexpr: the Triton compiler refuses plain Python globals inside @triton.jit
# ("Cannot access global variable"), which the interpreter allows.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 * pi)


@triton.jit
def _row_starts(rows, rows_inner, stride_outer, stride_inner, TWO_D: tl.constexpr):
    """Offset (in elements, int64) of the first element of each row in ``rows``."""
    rows = rows.to(tl.int64)
    if TWO_D:
        return (rows // rows_inner) * stride_outer + (rows % rows_inner) * stride_inner
    else:
        return rows * stride_inner


@triton.jit
def _geglu_fwd_kernel(
    x_ptr,  # x: (..., 2D), unit column stride; hidden at columns [0, D), gate at [D, 2D)
    y_ptr,  # y: (M, D) contiguous, written
    n_rows,  # M: rows of x (product of its leading dims)
    D,  # columns of each half (and of y)
    rows_inner,  # R1: size of x's inner collapsed leading dim (TWO_D only)
    stride_outer,  # x: elements from row r to row r + R1 (TWO_D only)
    stride_inner,  # x: elements from row r to row r + 1 within the inner dim
    TWO_D: tl.constexpr,  # x's leading dims collapse to two (size, stride) pairs
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per program
):
    tl.static_assert(BLOCK_D >= 1 and (BLOCK_D & (BLOCK_D - 1)) == 0)
    # Program (pid_m, pid_d) owns rows [pid_m * BLOCK_M, +BLOCK_M) and columns
    # [pid_d * BLOCK_D, +BLOCK_D) of y, i.e. the same columns of both halves of x.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x_offs = _row_starts(rows, rows_inner, stride_outer, stride_inner, TWO_D)[:, None] + cols[None, :]

    h = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + x_offs + D, mask=mask, other=0.0).to(tl.float32)
    y = h * (0.5 * g * (1.0 + tl.math.erf(g * _INV_SQRT2)))

    y_offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(y_ptr + y_offs, _to_dtype(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    x_ptr,  # x: the forward's input, (..., 2D), read through the same row strides
    dy_ptr,  # dy: (M, D) contiguous, the gradient of y
    dx_ptr,  # dx: (M, 2D) contiguous, written: dhidden in [0, D), dgate in [D, 2D)
    n_rows,  # M
    D,  # columns of each half
    rows_inner,  # R1 of x (TWO_D only)
    stride_outer,  # x: elements from row r to row r + R1 (TWO_D only)
    stride_inner,  # x: elements from row r to row r + 1 within the inner dim
    TWO_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Same tiling as the forward: program (pid_m, pid_d) owns a [BLOCK_M, BLOCK_D]
    # tile of dy and writes the matching tiles of both halves of dx.
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    x_offs = _row_starts(rows, rows_inner, stride_outer, stride_inner, TWO_D)[:, None] + cols[None, :]
    dy_offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    dx_offs = rows.to(tl.int64)[:, None] * (2 * D) + cols[None, :]

    h = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + x_offs + D, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)

    cdf = 0.5 * (1.0 + tl.math.erf(g * _INV_SQRT2))  # Phi(g)
    pdf = _INV_SQRT_2PI * tl.exp(-0.5 * g * g)  # phi(g)
    dh = dy * (g * cdf)  # dy * gelu(g)
    dg = dy * h * (cdf + g * pdf)  # dy * hidden * gelu'(g)

    out_ty = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + dx_offs, _to_dtype(dh, out_ty), mask=mask)
    tl.store(dx_ptr + dx_offs + D, _to_dtype(dg, out_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _grid(n_rows: int, d: int, config: GegluConfig) -> Tuple[int, int]:
    return cdiv(n_rows, config.block_m), cdiv(d, config.block_d)


def geglu_forward(x: torch.Tensor) -> torch.Tensor:
    """``hidden * gelu(gate)`` of x (..., 2D) as a new contiguous (..., D) tensor in x's dtype.

    x must pass :func:`layout_reasons`; the op validates everything else.
    """
    d = x.shape[-1] // 2
    y = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    n_rows = y.numel() // d
    rows_inner, stride_outer, stride_inner, two_d = _row_args(x)
    config = launch_config(n_rows, d)
    _geglu_fwd_kernel[_grid(n_rows, d, config)](
        x, y, n_rows, d, rows_inner, stride_outer, stride_inner,
        TWO_D=two_d, BLOCK_M=config.block_m, BLOCK_D=config.block_d, num_warps=config.num_warps,
    )
    return y


def geglu_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`geglu_forward` w.r.t. x: a contiguous (..., 2D) tensor in x's dtype.

    ``dy`` (..., D) is made contiguous first (autograd hands the forward's
    contiguous layout back in the usual case, so this is normally no copy).
    """
    d = x.shape[-1] // 2
    dy = dy.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = dy.numel() // d
    rows_inner, stride_outer, stride_inner, two_d = _row_args(x)
    config = launch_config(n_rows, d)
    _geglu_bwd_kernel[_grid(n_rows, d, config)](
        x, dy, dx, n_rows, d, rows_inner, stride_outer, stride_inner,
        TWO_D=two_d, BLOCK_M=config.block_m, BLOCK_D=config.block_d, num_warps=config.num_warps,
    )
    return dx
