"""Triton GroupNorm (+SiLU): forward and fused backward, NCHW and NHWC without copies.

Public launchers (called by the custom ops in ``fastdiff/ops/group_norm.py``):

* :func:`layout_reasons` -- why the kernels cannot read ``x`` in place ([] if they can);
* :func:`group_norm_forward` -- ``(y, mean, rstd)``;
* :func:`group_norm_backward` -- ``(dx, dw, db)``;
* :func:`launch_config` -- the one launch heuristic (block sizes, warps, split).

Indexing. ``x`` is (N, C, *spatial). The spatial dims are collapsed to at most
two ``(size, stride)`` pairs (:func:`_collapse_spatial`), so element ``(n, c, s)``
with flat spatial index ``s`` lives at::

    n * stride_n + c * stride_c + (s // S1) * stride_s0 + (s % S1) * stride_s1   # TWO_D
    n * stride_n + c * stride_c + s * stride_s1                                  # otherwise

Contiguous NCHW collapses to one dim with stride 1, channels_last (NHWC/NDHWC)
to one dim with stride C, a channel slice or batch-strided view keeps its
strides, and ``x[..., ::2]`` with an odd last dim needs the TWO_D form. Every
kernel loads 2-D ``[BLOCK_C, BLOCK_S]`` tiles through these explicit strides;
Triton specialises integer arguments equal to 1, so the contiguous axis (s for
NCHW, c for NHWC) is known at compile time and its loads are vectorised.

Forward, two paths (chosen by :func:`launch_config`):

* **single pass** (a group fits in one tile, ``BLOCK_C * BLOCK_S <= 4096``):
  one program per (n, group) loads the group once, computes mean and variance
  in registers (two-pass over the registers, exact) and writes y. Traffic:
  1 read + 1 write.
* **split** (larger groups): at batch 2 with 32 groups there are only 64
  (n, group) pairs, far under a wave of 132 SMs, so each program owns a
  (n, channel block, spatial chunk) tile instead:

  1. ``_stats_kernel``: per-channel (mean, M2) of its chunk: a Welford
     update per tile lane inside the loop, then one reduction across lanes
     with Chan's merge (no naive sum / sum-of-squares);
  2. ``_combine_kernel``: tiny programs merge each (n, group)'s channel x
     chunk partials into its mean and rstd;
  3. ``_apply_kernel``: normalise, affine, optional SiLU, store in x's dtype.

  Traffic: 1 read for the statistics + 1 read + 1 write. Step 2 never takes
  a launch of its own (:func:`launch_config`), so the split forward is 2 launches:

  * when the partials are few (typical for NCHW), each normalise program merges
    its own groups' partials (``fused_combine``);
  * otherwise (NHWC: wide channel blocks, many chunks) the last program of
    ``_stats_kernel`` to finish a group merges that group's partials
    (``last_program_combine``). Each program, after storing its partials,
    increments an int32 arrival counter per group it touched (atomic, acq_rel,
    after a CTA barrier so that all its threads' stores are released); the one
    that sees ``arrivals - 1`` merges the group's partials in their fixed
    (channel, chunk) order, so the result does not depend on which program came
    last (deterministic), writes mean/rstd and resets the counter to 0. The
    counters live in a buffer kept per (device, stream) and zeroed once, so it is
    reused launch after launch and inside CUDA graphs (:func:`_group_counters`).

  ``_combine_kernel`` (the separate merge launch) runs only for a config that
  asks for neither, so that benchmarks can compare the three.

Backward (``_bwd_reduce_kernel``, ``_bwd_combine_kernel``, ``_bwd_dx_kernel``), with
x_hat = (x - mean) * rstd, z = x_hat * w + b, y = act(z)::

    dz        = dy * act'(z)          silu'(z) = s * (1 + z * (1 - s)),  s = sigmoid(z)
    dw[c]     = sum_{n,s} dz * x_hat        db[c] = sum_{n,s} dz
    A[n,g]    = mean_{c in g, s} (dz * w)   B[n,g] = mean_{c in g, s} (dz * w * x_hat)
    dx        = rstd * (dz * w - A - x_hat * B)

The reduce kernel writes per-(n, c, chunk) partial sums of ``dz * x_hat`` and
``dz`` (z is recomputed from x, never stored); ``_bwd_combine_kernel``, one
tiny program per group, turns them into dw, db, A and B; the dx kernel then
reads x and dy once more. Three launches in all.

Input bias (``input_bias``, (N, C)): every kernel that reads x adds
``input_bias[n, c]`` on load, rounding the sum to x's dtype exactly like the
reference's ``x + input_bias[:, :, None, None]``; the statistics, x_hat and the
backward all see the biased input. Its gradient is dx summed over space, which
``_bwd_combine_kernel`` writes in closed form from one more partial sum,
xh[n, c] = sum_s x_hat::

    d input_bias[n, c] = rstd * (w[c] * sum_s dz - S * A[n, g] - B[n, g] * xh[n, c])

All arithmetic is fp32: every load is cast with ``.to(tl.float32)`` right away
and every store casts back to the output's dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastdiff.kernels._common import cdiv, next_pow2

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SPATIAL_DIMS = 2  # collapsed (size, stride) pairs the kernels index
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------
# Launch heuristics (the one place that picks block sizes, warps and split).
# ---------------------------------------------------------------------------

# A group of at most this many tile elements (padded to powers of two) is held
# in registers by one program: 4096 fp32 values over 8 warps is 16 per thread
# for x plus as many for the centred copy, comfortably without spills.
SINGLE_PASS_MAX_ELEMS = 4096
# Split-path tile: 2048 elements (4 KiB of fp16) per load with 4 warps is 16
# elements (32 B) per thread, two 16-byte vector loads along the contiguous axis.
SPLIT_TILE_ELEMS = 2048
SPLIT_NUM_WARPS = 4
# VAE-sized tensors: tiles of 4096 elements (8 KiB of fp16/bf16, 16 KiB of fp32) over
# 8 warps, the same 16 elements per thread, so that each program keeps twice the bytes
# in flight per load. Taken when even these tiles leave every SM at least
# LARGE_TILE_MIN_TILES_PER_SM of them (programs loop over several), i.e. when the
# tensor, not the launch, decides the time.
LARGE_TILE_ELEMS = 4096
LARGE_NUM_WARPS = 8
LARGE_TILE_MIN_TILES_PER_SM = 16
# NHWC: a channel block wide enough for 128-byte fp16 rows along the contiguous
# channel axis. NCHW: rows along the contiguous spatial axis of up to 1 KiB fp16.
SPLIT_MAX_BLOCK_C_NHWC = 64
SPLIT_MAX_BLOCK_S_NCHW = 512
# Aim for this many programs per SM on the split path: with 4-warp programs
# several are resident per SM, so 4 per SM is at least two full waves and keeps
# enough bytes in flight to cover DRAM latency.
PROGRAMS_PER_SM = 4
# Under TRITON_INTERPRET=1 there is no GPU; pretend to have a few SMs so the
# heuristic still splits moderately large groups in tests.
INTERPRET_NUM_SMS = 4
COMBINE_BLOCK = 256  # partials merged per step by _combine_kernel
# The split path's normalise kernel merges the partials of its channels' groups
# itself (one launch fewer) when that is at most this many loads per program:
# block_c * (C / G) * n_chunks. Typical for NCHW (e.g. SD 320x64x64: 4 x 10 x 4);
# NHWC tiles are wide in channels and deep in chunks (64 x 10 x 64), so those
# keep the separate _combine_kernel.
FUSED_COMBINE_MAX_PARTIALS = 1024
# Partials merged per step (rows x partials) by the last-arriving program's merge.
LAST_COMBINE_TILE = 1024  # 2048 spilled 4 B on sm_90 (NHWC 2x1280x16x16)


# Spills that fastdiff.tools.aot_check finds in configs the launch plan keeps for SD shapes,
# allowed with their reason: {(kernel, regex on "sm_XX <variant> <tile> wN"): reason}.
AOT_SPILL_ALLOWANCES = {
    ("_bwd_dx_kernel", r"^sm_90 fp32 SILU=True .* 8x256 w4"): (
        "4 B of spill at 80 registers on sm_90 (Triton 3.9), fp32 NCHW with SiLU (2x1280x16x16): "
        "there before the input bias; fp32 is the precision path (SD runs fp16/bf16). A fix: open"
    ),
    ("_bwd_dx_kernel", r"^sm_90 fp16 SILU=True TWO_D=False HAS_IB=True 4x512 w4"): (
        "4 B of spill at 56 registers on sm_90 (Triton 3.9) with the input bias and SiLU (2x320x64x64 NCHW): "
        "one 4-byte stack slot, not register pressure; a fix: open"
    ),
}


@dataclasses.dataclass(frozen=True)
class GroupNormConfig:
    """How one GroupNorm call is launched.

    single_pass: one program per (n, group) holds the whole group
        (needs block_c >= C / num_groups and block_s >= spatial size).
    block_c, block_s: tile shape [block_c channels, block_s spatial positions],
        powers of two.
    num_warps: warps per program.
    split: number of spatial chunks per (n, channel block) on the split path
        (1 on the single-pass path). The launcher rounds each chunk down to a
        multiple of block_s, so at least ``split`` chunks run when the spatial
        size allows it (possibly a few more).
    fused_combine: split path only: the normalise kernel merges its groups'
        partial statistics itself, so the forward is 2 launches instead of 3.
    last_program_combine: split path only: the statistics kernel's last program
        to finish each group merges that group's partials (2 launches). With
        neither flag the separate ``_combine_kernel`` runs (3 launches).
    """

    single_pass: bool
    block_c: int
    block_s: int
    num_warps: int
    split: int = 1
    fused_combine: bool = False
    last_program_combine: bool = False


def _next_pow2(v: int) -> int:
    return max(2, next_pow2(v))


def launch_config(
    n: int,
    c: int,
    s: int,
    num_groups: int,
    channels_contiguous: bool,
    num_sms: int,
    allow_single_pass: bool = True,
    *,
    tile_elems: Optional[int] = None,
    num_warps: Optional[int] = None,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> GroupNormConfig:
    """Pick the launch for x of shape (n, c, s) with ``num_groups`` groups.

    ``channels_contiguous`` is True for NHWC-like strides (the channel stride is
    1), which makes the channel axis the wide one of the tile. ``num_sms`` is the
    device's multiprocessor count (132 on an H100/H200). The backward passes
    ``allow_single_pass=False``: it always reduces through per-chunk partials.
    The keyword-only knobs default to the module constants above (``tile_elems`` and
    ``num_warps``: SPLIT_* or, for VAE-sized tensors, LARGE_*); the benchmark sweeps
    them (``bench_group_norm.py --sweep``) to re-tune those constants.
    """
    cpg = c // num_groups
    group_tile = _next_pow2(cpg) * _next_pow2(s)
    if allow_single_pass and group_tile <= SINGLE_PASS_MAX_ELEMS:
        return GroupNormConfig(True, _next_pow2(cpg), _next_pow2(s), max(1, min(8, group_tile // 512)), 1)
    if tile_elems is None:
        large = n * c * s >= LARGE_TILE_MIN_TILES_PER_SM * num_sms * LARGE_TILE_ELEMS
        tile_elems = LARGE_TILE_ELEMS if large else SPLIT_TILE_ELEMS
        num_warps = num_warps or (LARGE_NUM_WARPS if large else SPLIT_NUM_WARPS)
    num_warps = num_warps or SPLIT_NUM_WARPS
    if channels_contiguous:
        block_c = min(_next_pow2(c), SPLIT_MAX_BLOCK_C_NHWC, tile_elems // 2)
        block_s = min(_next_pow2(s), tile_elems // block_c)
    else:
        block_s = min(_next_pow2(s), SPLIT_MAX_BLOCK_S_NCHW, tile_elems // 2)
        block_c = min(_next_pow2(c), tile_elems // block_s)
    base_programs = n * cdiv(c, block_c)
    want = cdiv(programs_per_sm * num_sms, base_programs)
    split = max(1, min(want, cdiv(s, block_s)))
    config = GroupNormConfig(False, block_c, block_s, num_warps, split)
    _, n_chunks = _chunking(s, config)
    fused = block_c * cpg * n_chunks <= FUSED_COMBINE_MAX_PARTIALS
    return dataclasses.replace(config, fused_combine=fused, last_program_combine=not fused)


def forward_launches(config: GroupNormConfig) -> int:
    """Kernel launches of the forward under ``config``."""
    if config.single_pass:
        return 1
    return 2 if config.fused_combine or config.last_program_combine else 3


def _chunking(s: int, config: GroupNormConfig) -> Tuple[int, int]:
    """(chunk, n_chunks): spatial positions per program and programs along s.

    The chunk is a multiple of block_s, rounded down from s / split so that at
    least ``split`` chunks are launched whenever s allows it.
    """
    chunk = max(config.block_s, (cdiv(s, config.split) // config.block_s) * config.block_s)
    return chunk, cdiv(s, chunk)


# SM count assumed for a CUDA device nobody can describe (fake CUDA tensors without a
# ``use_target``): an H100's.
DEFAULT_NUM_SMS = 132


def _num_sms(device: torch.device) -> int:
    """The SM count the launch heuristic plans for: :func:`fastdiff.backends.cuda_device_description`
    (the ``use_target`` description, else the visible GPU's, asked once), never torch.cuda directly."""
    if device.type == "cuda":
        from fastdiff.backends import cuda_device_description

        description = cuda_device_description(device)
        return description.sm_count if description is not None else DEFAULT_NUM_SMS
    return INTERPRET_NUM_SMS


def _check_config(config: GroupNormConfig, cpg: int, s: int) -> None:
    for name in ("block_c", "block_s"):
        v = getattr(config, name)
        if v < 1 or v & (v - 1):
            raise ValueError(f"group_norm config: {name} must be a power of two, got {v}")
    if config.split < 1:
        raise ValueError(f"group_norm config: split must be >= 1, got {config.split}")
    if config.fused_combine and config.last_program_combine:
        raise ValueError("group_norm config: fused_combine and last_program_combine are exclusive")
    if config.single_pass and (config.block_c < cpg or config.block_s < s):
        raise ValueError(
            f"group_norm config: single_pass needs block_c >= {cpg} and block_s >= {s}, got {config.block_c} x {config.block_s}"
        )


# ---------------------------------------------------------------------------
# Layout: collapse the spatial dims to at most two (size, stride) pairs.
# ---------------------------------------------------------------------------


def _collapse_spatial(sizes: Sequence[int], strides: Sequence[Sequence[int]]) -> List[Tuple[int, List[int]]]:
    """Merge adjacent spatial dims wherever every tensor's strides allow it.

    ``strides`` holds one stride tuple per tensor that the kernel indexes with
    the same flat spatial index. Dims of size 1 are dropped; dim i and i+1
    merge when ``stride[i] == size[i+1] * stride[i+1]`` for every tensor.
    Returns ``[(size, [stride per tensor]), ...]``, outermost first, never empty.
    """
    out: List[Tuple[int, List[int]]] = []
    for i, size in enumerate(sizes):
        if size == 1:
            continue
        sts = [st[i] for st in strides]
        if out and all(prev == size * cur for prev, cur in zip(out[-1][1], sts)):
            out[-1] = (out[-1][0] * size, sts)
        else:
            out.append((size, sts))
    return out or [(1, [0] * len(strides))]


def _spatial_args(dims: List[Tuple[int, List[int]]], k: int) -> Tuple[int, int, int, bool]:
    """(S1, stride_s0, stride_s1, TWO_D) for tensor number ``k`` of a collapse."""
    if len(dims) == 1:
        return dims[0][0], 0, dims[0][1][k], False
    return dims[1][0], dims[0][1][k], dims[1][1][k], True


def layout_reasons(x: torch.Tensor, num_groups: int) -> List[str]:
    """Why the Triton kernels cannot read ``x`` in place; [] when they can.

    Accepted without a copy: contiguous NCHW/NCDHW, channels_last(_3d), channel
    slices, batch-strided views and anything else whose spatial dims collapse to
    at most two (size, stride) pairs, e.g. ``x[..., ::2]``.
    """
    if x.dim() < 3:
        return [f"x must have at least one spatial dim, got shape {tuple(x.shape)}"]
    dims = _collapse_spatial(x.shape[2:], [x.stride()[2:]])
    reasons = []
    if len(dims) > MAX_SPATIAL_DIMS:
        reasons.append(
            f"x's spatial strides {tuple(x.stride()[2:])} collapse to {len(dims)} (size, stride) pairs; the kernel indexes at most {MAX_SPATIAL_DIMS}"
        )
    span = _sample_span(x)
    if span > _INT32_MAX:
        reasons.append(f"one sample of x spans {span + 1} elements; the kernel's per-sample offsets are 32-bit")
    return reasons


def _sample_span(t: torch.Tensor) -> int:
    """Largest element offset within one sample, t[n] (kernels index it in int32)."""
    return sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _spatial_offsets(offs_s, S1, stride_s0, stride_s1, TWO_D: tl.constexpr):
    """Element offsets of flat spatial indices ``offs_s`` (see the module docstring)."""
    if TWO_D:
        offs = (offs_s // S1) * stride_s0 + (offs_s % S1) * stride_s1
    else:
        offs = offs_s * stride_s1
    return offs


@triton.jit
def _input_bias(IB, n, chan, mask_c, stride_ibn, stride_ibc, HAS_IB: tl.constexpr):
    """input_bias[n, chan] in x's dtype ([BLOCK_C]); zeros (never added) without it."""
    if HAS_IB:
        ib = tl.load(IB + n * stride_ibn + chan * stride_ibc, mask=mask_c, other=0.0)
    else:
        ib = tl.zeros(chan.shape, dtype=IB.dtype.element_ty)
    return ib


@triton.jit
def _load_x(ptrs, mask, ib, HAS_IB: tl.constexpr):
    """A [BLOCK_C, BLOCK_S] tile of x (+ input_bias per channel) as fp32, 0 where masked.
    The sum is rounded to x's dtype before use, exactly like the reference's
    ``x + input_bias[:, :, None, None]`` (PyTorch adds fp16/bf16 in fp32 and rounds once,
    as here), so every backend normalises the same values."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if HAS_IB:
        x = tl.where(mask, (x.to(tl.float32) + ib.to(tl.float32)[:, None]).to(x.dtype).to(tl.float32), 0.0)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _single_pass_kernel(
    X,  # pointer to x, (N, C, *spatial), any collapsible strides
    Y,  # pointer to y, same shape as x, its own strides
    W,  # pointer to weight, (C,) contiguous
    B,  # pointer to bias, (C,) contiguous
    IB,  # pointer to input_bias, (N, C) in x's dtype (HAS_IB only; else any pointer)
    MEAN,  # pointer to the fp32 mean output, (N, G) contiguous
    RSTD,  # pointer to the fp32 1/std output, (N, G) contiguous
    S,  # number of spatial positions (product of the spatial sizes)
    S1,  # size of the inner collapsed spatial dim (TWO_D only)
    stride_xn, stride_xc, stride_xs0, stride_xs1,  # x strides: batch, channel, outer/inner spatial
    stride_yn, stride_yc, stride_ys0, stride_ys1,  # y strides, same order
    stride_ibn, stride_ibc,  # input_bias strides
    G,  # number of groups
    eps,  # added to the variance
    CPG: tl.constexpr,  # channels per group (constexpr: tells the compiler each group's start alignment, for vector loads in NHWC)
    SILU: tl.constexpr,  # apply SiLU after the affine
    TWO_D: tl.constexpr,  # spatial index needs two (size, stride) pairs
    HAS_IB: tl.constexpr,  # add input_bias[n, c] to x before the statistics
    BLOCK_C: tl.constexpr,  # >= CPG, power of two
    BLOCK_S: tl.constexpr,  # >= S, power of two
):
    # One program per (n, group): pid = n * G + g. The whole group is one tile.
    tl.static_assert(BLOCK_C * BLOCK_S <= 16384, "a single-pass tile must stay in registers")
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    mask_c = offs_c < CPG
    mask = mask_c[:, None] & (offs_s < S)[None, :]
    chan = g * CPG + offs_c
    x_ptrs = X + n.to(tl.int64) * stride_xn + chan[:, None] * stride_xc + _spatial_offsets(offs_s, S1, stride_xs0, stride_xs1, TWO_D)[None, :]
    x = _load_x(x_ptrs, mask, _input_bias(IB, n, chan, mask_c, stride_ibn, stride_ibc, HAS_IB), HAS_IB)
    # Statistics from registers: mean first, then the centred second moment.
    count = CPG * S * 1.0
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(tl.sum(xc * xc, axis=1), axis=0) / count
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + chan, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(B + chan, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * (rstd * w)[:, None] + b[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    y_ptrs = Y + n.to(tl.int64) * stride_yn + chan[:, None] * stride_yc + _spatial_offsets(offs_s, S1, stride_ys0, stride_ys1, TWO_D)[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s merge of two (mean, M2, count) partials:
    n = n_a + n_b, d = mean_b - mean_a, mean = mean_a + d * n_b / n,
    M2 = M2_a + M2_b + d^2 * n_a * n_b / n. Empty partials (n = 0) merge as no-ops.

    The counts are int32 and add exactly: an fp32 count stops counting at 2^24
    elements (a VAE group at 2048x2048 holds 4 x 2^22 and more). Only the weight
    n_b / n is formed in fp32 (relative error ~1e-7, like any fp32 product)."""
    n = n_a + n_b
    w_b = tl.where(n == 0, 0.0, n_b.to(tl.float32) / tl.maximum(n, 1).to(tl.float32))
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a.to(tl.float32) * w_b, n


@triton.jit
def _stats_kernel(
    X,  # pointer to x, (N, C, *spatial)
    IB,  # pointer to input_bias, (N, C) in x's dtype (HAS_IB only)
    PMEAN,  # pointer to fp32 partial means, (N, C, n_chunks) contiguous
    PM2,  # pointer to fp32 partial sums of squared deviations, (N, C, n_chunks)
    COUNT,  # pointer to int32 arrival counters, (N * G,), all 0 on entry and on exit (LAST_COMBINE only)
    MEAN,  # pointer to the fp32 mean output, (N, G) (LAST_COMBINE only)
    RSTD,  # pointer to the fp32 1/std output, (N, G) (LAST_COMBINE only)
    C,  # number of channels
    S,  # number of spatial positions
    S1,  # size of the inner collapsed spatial dim (TWO_D only)
    stride_xn, stride_xc, stride_xs0, stride_xs1,  # x strides: batch, channel, outer/inner spatial
    stride_ibn, stride_ibc,  # input_bias strides
    chunk,  # spatial positions per program (a multiple of BLOCK_S)
    n_chunks,  # programs along the spatial axis
    n_cblocks,  # programs along the channel axis, cdiv(C, BLOCK_C)
    G,  # number of groups (LAST_COMBINE only)
    CPG,  # channels per group (LAST_COMBINE only)
    eps,  # added to the variance (LAST_COMBINE only)
    TWO_D: tl.constexpr,
    HAS_IB: tl.constexpr,
    LAST_COMBINE: tl.constexpr,  # the last program to finish a group merges its partials
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,  # >= the groups one channel block touches, power of two (LAST_COMBINE only)
    BLOCK_P: tl.constexpr,  # partials merged per step (LAST_COMBINE only)
):
    # pid = (n * n_chunks + chunk_id) * n_cblocks + cblock: neighbouring programs
    # take neighbouring channel blocks of the same chunk, which are adjacent in
    # memory for NHWC.
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    sp = (pid // n_cblocks) % n_chunks
    n = pid // (n_cblocks * n_chunks)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    x_base = X + n.to(tl.int64) * stride_xn + offs_c[:, None] * stride_xc
    ib = _input_bias(IB, n, offs_c, mask_c, stride_ibn, stride_ibc, HAS_IB)
    s_begin = sp * chunk
    s_end = tl.minimum(s_begin + chunk, S)
    # Welford per tile lane: lane (c, j) sees x[c, s_begin + j + k * BLOCK_S],
    # k = 0, 1, ...; its running mean and M2 update with
    #   cnt += 1, d = x - mean, mean += d / cnt, M2 += d * (x - mean).
    # The count only depends on j (the tail tile masks lanes by s). No
    # cross-lane communication inside the loop; one Chan-merge reduction after.
    cnt = tl.zeros([BLOCK_S], dtype=tl.int32)
    mean = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < s_end
        x = _load_x(x_base + _spatial_offsets(offs_s, S1, stride_xs0, stride_xs1, TWO_D)[None, :], mask_c[:, None] & mask_s[None, :], ib, HAS_IB)
        cnt += mask_s.to(tl.int32)
        inv_cnt = tl.where(mask_s, 1.0 / tl.maximum(cnt, 1).to(tl.float32), 0.0)
        delta = x - mean
        mean += delta * inv_cnt[None, :]
        m2 += tl.where(mask_s[None, :], delta * (x - mean), 0.0)
    # Merge the lanes of each channel at once (the exact parallel formula, as in
    # _merge_partials): mean = sum(cnt_j mean_j) / sum(cnt_j), M2 = sum(M2_j + cnt_j (mean_j - mean)^2).
    # Lanes that saw nothing have cnt_j = mean_j = M2_j = 0 and add nothing.
    cnt_f = cnt.to(tl.float32)
    mean_c = tl.sum(mean * cnt_f[None, :], axis=1) / tl.maximum(tl.sum(cnt, axis=0), 1).to(tl.float32)
    dev = mean - mean_c[:, None]
    m2_c = tl.sum(m2 + dev * dev * cnt_f[None, :], axis=1)
    p_offs = (n * C + offs_c) * n_chunks + sp
    tl.store(PMEAN + p_offs, mean_c, mask=mask_c)
    tl.store(PM2 + p_offs, m2_c, mask=mask_c)
    if LAST_COMBINE:
        # Groups g0..g1 have channels in this block. Group g receives partials from
        # its channel blocks x n_chunks programs; the one that arrives last merges them.
        g0 = (cb * BLOCK_C) // CPG
        g1 = (tl.minimum(cb * BLOCK_C + BLOCK_C, C) - 1) // CPG
        offs_g = g0 + tl.arange(0, BLOCK_G)
        mask_g = offs_g <= g1
        arrivals = (((offs_g + 1) * CPG - 1) // BLOCK_C - (offs_g * CPG) // BLOCK_C + 1) * n_chunks
        counters = COUNT + n * G + offs_g
        tl.debug_barrier()  # all threads' partial stores happen before the release below
        before = tl.atomic_add(counters, tl.full([BLOCK_G], 1, tl.int32), mask=mask_g, sem="acq_rel")
        last = mask_g & (before == arrivals - 1)
        if tl.sum(last.to(tl.int32), axis=0) > 0:
            tl.debug_barrier()  # the acquire above happens before every thread's loads
            row_base = (n * C + offs_g * CPG) * n_chunks
            g_mean, g_m2, g_cnt = _merge_partials(PMEAN, PM2, row_base, last, CPG * n_chunks, S, chunk, n_chunks, BLOCK_G, BLOCK_P)
            tl.store(MEAN + n * G + offs_g, g_mean, mask=last)
            tl.store(RSTD + n * G + offs_g, 1.0 / tl.sqrt(g_m2 / tl.maximum(g_cnt, 1).to(tl.float32) + eps), mask=last)
            tl.store(counters, tl.zeros([BLOCK_G], tl.int32), mask=last)  # 0 again for the next launch


@triton.jit
def _merge_partials(
    PMEAN,  # pointer to fp32 partial means, (N, C, n_chunks) contiguous
    PM2,  # pointer to fp32 partial M2, (N, C, n_chunks) contiguous
    row_base,  # [BLOCK_R] offset of each row's first partial: (n * C + g * CPG) * n_chunks
    mask_r,  # [BLOCK_R] valid rows
    total,  # partials per row: CPG * n_chunks (a group's partials are contiguous)
    S,  # number of spatial positions
    chunk,  # spatial positions per chunk (the last chunk may be shorter)
    n_chunks,  # chunks per channel
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partials merged per step
):
    """(mean, M2, count) of each row's group from its channel x chunk partials.

    Partial p of a row belongs to chunk p % n_chunks, whose element count is
    min(chunk, S - chunk_id * chunk). Each step merges BLOCK_P partials at once
    with the exact parallel formula (count-weighted mean, then M2 = sum M2_i +
    sum n_i (mean_i - mean)^2), then folds the step into the running result
    with Chan's merge.
    """
    cnt = tl.zeros([BLOCK_R], dtype=tl.int32)
    mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for p0 in range(0, total, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = mask_r[:, None] & (p < total)[None, :]
        ptrs = row_base[:, None] + p[None, :]
        # .cg: through L2, never a stale L1 line (other programs of the launch wrote them)
        m_i = tl.load(PMEAN + ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        q_i = tl.load(PM2 + ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        c_i = tl.where(mask, tl.minimum(chunk, S - (p % n_chunks) * chunk)[None, :], 0)  # int32
        cnt_b = tl.sum(c_i, axis=1)
        c_i = c_i.to(tl.float32)
        mean_b = tl.sum(c_i * m_i, axis=1) / tl.maximum(cnt_b, 1).to(tl.float32)
        d_i = m_i - mean_b[:, None]
        m2_b = tl.sum(q_i + c_i * d_i * d_i, axis=1)
        mean, m2, cnt = _welford_combine(mean, m2, cnt, mean_b, m2_b, cnt_b)
    return mean, m2, cnt


@triton.jit
def _combine_kernel(
    PMEAN,  # pointer to fp32 partial means, (N, C, n_chunks) contiguous
    PM2,  # pointer to fp32 partial M2, (N, C, n_chunks) contiguous
    MEAN,  # pointer to the fp32 mean output, (N, G)
    RSTD,  # pointer to the fp32 1/std output, (N, G)
    C,  # number of channels
    S,  # number of spatial positions
    G,  # number of groups
    CPG,  # channels per group
    chunk,  # spatial positions per chunk
    n_chunks,  # chunks per channel
    NG,  # N * G, the number of (n, group) pairs
    eps,
    BLOCK_R: tl.constexpr,  # (n, group) pairs per program
    BLOCK_P: tl.constexpr,  # partials merged per step
):
    # Program pid owns the (n, group) pairs pid * BLOCK_R + [0, BLOCK_R), flat index n * G + g.
    offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs < NG
    row_base = ((offs // G) * C + (offs % G) * CPG) * n_chunks
    mean, m2, cnt = _merge_partials(PMEAN, PM2, row_base, mask_r, CPG * n_chunks, S, chunk, n_chunks, BLOCK_R, BLOCK_P)
    tl.store(MEAN + offs, mean, mask=mask_r)
    tl.store(RSTD + offs, 1.0 / tl.sqrt(m2 / tl.maximum(cnt, 1).to(tl.float32) + eps), mask=mask_r)


@triton.jit
def _apply_kernel(
    X,  # pointer to x, (N, C, *spatial)
    Y,  # pointer to y, same shape, its own strides
    W,  # pointer to weight, (C,) contiguous
    B,  # pointer to bias, (C,) contiguous
    IB,  # pointer to input_bias, (N, C) in x's dtype (HAS_IB only)
    MEAN,  # pointer to fp32 group means, (N, G): read, or written when FUSED_COMBINE
    RSTD,  # pointer to fp32 group 1/std, (N, G): read, or written when FUSED_COMBINE
    PMEAN,  # pointer to fp32 partial means, (N, C, n_chunks) (FUSED_COMBINE only)
    PM2,  # pointer to fp32 partial M2, (N, C, n_chunks) (FUSED_COMBINE only)
    C,  # number of channels
    S,  # number of spatial positions
    S1,  # size of the inner collapsed spatial dim (TWO_D only)
    stride_xn, stride_xc, stride_xs0, stride_xs1,  # x strides: batch, channel, outer/inner spatial
    stride_yn, stride_yc, stride_ys0, stride_ys1,  # y strides, same order
    stride_ibn, stride_ibc,  # input_bias strides
    G,  # number of groups
    CPG,  # channels per group
    chunk,  # spatial positions per program
    n_chunks,  # programs along the spatial axis
    n_cblocks,  # programs along the channel axis
    eps,  # added to the variance (FUSED_COMBINE only)
    SILU: tl.constexpr,
    TWO_D: tl.constexpr,
    HAS_IB: tl.constexpr,
    FUSED_COMBINE: tl.constexpr,  # merge the partials here instead of reading _combine_kernel's output
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partials merged per step (FUSED_COMBINE only)
):
    # Same program mapping as _stats_kernel: (n, chunk, channel block).
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    sp = (pid // n_cblocks) % n_chunks
    n = pid // (n_cblocks * n_chunks)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    grp = n * G + offs_c // CPG
    if FUSED_COMBINE:
        # Each channel lane merges its group's partials itself (a few hundred
        # L2-resident values at most; launch_config only fuses then), saving
        # the _combine_kernel launch. The programs holding a group's first
        # channel in chunk 0 write the statistics the backward needs.
        row_base = (n * C + (offs_c // CPG) * CPG) * n_chunks
        mean, m2, cnt = _merge_partials(PMEAN, PM2, row_base, mask_c, CPG * n_chunks, S, chunk, n_chunks, BLOCK_C, BLOCK_P)
        rstd = 1.0 / tl.sqrt(m2 / tl.maximum(cnt, 1).to(tl.float32) + eps)
        if sp == 0:
            first = mask_c & (offs_c % CPG == 0)
            tl.store(MEAN + grp, mean, mask=first)
            tl.store(RSTD + grp, rstd, mask=first)
    else:
        mean = tl.load(MEAN + grp, mask=mask_c, other=0.0)
        rstd = tl.load(RSTD + grp, mask=mask_c, other=0.0)
    # Per-channel affine folded with the group statistics: y = (x - mean) * scale + b.
    scale = rstd * tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    shift = tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    x_base = X + n.to(tl.int64) * stride_xn + offs_c[:, None] * stride_xc
    y_base = Y + n.to(tl.int64) * stride_yn + offs_c[:, None] * stride_yc
    ib = _input_bias(IB, n, offs_c, mask_c, stride_ibn, stride_ibc, HAS_IB)
    s_begin = sp * chunk
    s_end = tl.minimum(s_begin + chunk, S)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        x = _load_x(x_base + _spatial_offsets(offs_s, S1, stride_xs0, stride_xs1, TWO_D)[None, :], mask, ib, HAS_IB)
        y = (x - mean[:, None]) * scale[:, None] + shift[:, None]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_base + _spatial_offsets(offs_s, S1, stride_ys0, stride_ys1, TWO_D)[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_tile(x_ptrs, dy_ptrs, mask, mean, rstd, w, b, ib, SILU: tl.constexpr, HAS_IB: tl.constexpr):
    """(dz, x_hat) of one [BLOCK_C, BLOCK_S] tile, for both backward kernels:
    x_hat = (x + ib - mean) * rstd, and dz = dy * silu'(z) with z = x_hat * w + b
    recomputed from x (dz = dy without SILU). mean, rstd, w, b, ib are per channel."""
    x = _load_x(x_ptrs, mask, ib, HAS_IB)
    dz = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
    x_hat = (x - mean[:, None]) * rstd[:, None]
    if SILU:
        z = x_hat * w[:, None] + b[:, None]
        sig = tl.sigmoid(z)
        dz = dz * sig * (1.0 + z * (1.0 - sig))
    return dz, x_hat


@triton.jit
def _bwd_reduce_kernel(
    DY,  # pointer to dy, same shape as x, its own strides
    X,  # pointer to x, (N, C, *spatial)
    W,  # pointer to weight, (C,) contiguous
    B,  # pointer to bias, (C,) contiguous
    MEAN,  # pointer to fp32 group means, (N, G)
    RSTD,  # pointer to fp32 group 1/std, (N, G)
    IB,  # pointer to input_bias, (N, C) in x's dtype (HAS_IB only)
    PDS,  # pointer to fp32 partial sum(dz * x_hat), (N, C, n_chunks) contiguous
    PDB,  # pointer to fp32 partial sum(dz), (N, C, n_chunks) contiguous
    PXH,  # pointer to fp32 partial sum(x_hat), (N, C, n_chunks) contiguous (HAS_IB only)
    C,  # number of channels
    S,  # number of spatial positions
    S1,  # size of the inner collapsed spatial dim (TWO_D only)
    stride_xn, stride_xc, stride_xs0, stride_xs1,  # x strides: batch, channel, outer/inner spatial
    stride_dyn, stride_dyc, stride_dys0, stride_dys1,  # dy strides, same order
    stride_ibn, stride_ibc,  # input_bias strides
    G,  # number of groups
    CPG,  # channels per group
    chunk,  # spatial positions per program
    n_chunks,  # programs along the spatial axis
    n_cblocks,  # programs along the channel axis
    SILU: tl.constexpr,
    TWO_D: tl.constexpr,
    HAS_IB: tl.constexpr,  # x_hat is of x + input_bias; also sum x_hat per channel for d(input_bias)
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Program mapping as in _stats_kernel: pid -> (n, chunk, channel block).
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    sp = (pid // n_cblocks) % n_chunks
    n = pid // (n_cblocks * n_chunks)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    grp = n * G + offs_c // CPG
    mean = tl.load(MEAN + grp, mask=mask_c, other=0.0)
    rstd = tl.load(RSTD + grp, mask=mask_c, other=0.0)
    w = tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    x_base = X + n.to(tl.int64) * stride_xn + offs_c[:, None] * stride_xc
    dy_base = DY + n.to(tl.int64) * stride_dyn + offs_c[:, None] * stride_dyc
    ib = _input_bias(IB, n, offs_c, mask_c, stride_ibn, stride_ibc, HAS_IB)
    s_begin = sp * chunk
    s_end = tl.minimum(s_begin + chunk, S)
    # Accumulate elementwise over the chunk, reduce along s once at the end.
    acc_ds = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    acc_xh = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)  # HAS_IB only (dead code otherwise)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        dz, x_hat = _bwd_tile(
            x_base + _spatial_offsets(offs_s, S1, stride_xs0, stride_xs1, TWO_D)[None, :],
            dy_base + _spatial_offsets(offs_s, S1, stride_dys0, stride_dys1, TWO_D)[None, :],
            mask, mean, rstd, w, b, ib, SILU, HAS_IB,
        )
        acc_ds += tl.where(mask, dz * x_hat, 0.0)
        acc_db += tl.where(mask, dz, 0.0)
        if HAS_IB:
            acc_xh += tl.where(mask, x_hat, 0.0)
    p_offs = (n * C + offs_c) * n_chunks + sp
    tl.store(PDS + p_offs, tl.sum(acc_ds, axis=1), mask=mask_c)
    tl.store(PDB + p_offs, tl.sum(acc_db, axis=1), mask=mask_c)
    if HAS_IB:
        tl.store(PXH + p_offs, tl.sum(acc_xh, axis=1), mask=mask_c)


@triton.jit
def _bwd_combine_kernel(
    PDS,  # pointer to fp32 partial sum(dz * x_hat), (N, C, n_chunks) contiguous
    PDB,  # pointer to fp32 partial sum(dz), (N, C, n_chunks) contiguous
    PXH,  # pointer to fp32 partial sum(x_hat), (N, C, n_chunks) contiguous (HAS_IB only)
    W,  # pointer to weight, (C,) contiguous
    RSTD,  # pointer to fp32 group 1/std, (N, G) (HAS_IB only)
    COEF_A,  # pointer to the fp32 output A = mean_group(dz * w), (N, G)
    COEF_B,  # pointer to the fp32 output B = mean_group(dz * w * x_hat), (N, G)
    DW,  # pointer to the dw output, (C,) in weight's dtype
    DB,  # pointer to the db output, (C,) in bias's dtype
    DIB,  # pointer to the d(input_bias) output, (N, C) contiguous in x's dtype (HAS_IB only)
    N,  # batch size
    C,  # number of channels
    G,  # number of groups
    CPG,  # channels per group
    n_chunks,  # partials per (n, c)
    inv_group_size,  # 1 / (CPG * S)
    HAS_IB: tl.constexpr,  # also write d(input_bias)
    BLOCK_CPG: tl.constexpr,  # >= CPG, power of two
    BLOCK_K: tl.constexpr,  # partials summed per step
):
    # One program per group g: it owns channels [g * CPG, (g + 1) * CPG) and
    # loops over the batch, so dw and db (sums over n) need no second pass.
    #   ds[n, c] = sum_k PDS[n, c, k]       db_nc[n, c] = sum_k PDB[n, c, k]
    #   A[n, g] = sum_{c in g} w[c] db_nc[n, c] / (CPG S)    B[n, g] = sum_{c in g} w[c] ds[n, c] / (CPG S)
    #   dw[c] = sum_n ds[n, c]              db[c] = sum_n db_nc[n, c]
    # With input_bias, d(input_bias)[n, c] = sum_s dx[n, c, s], in closed form from the
    # same sums plus xh[n, c] = sum_s x_hat:
    #   sum_s dx = rstd * (w[c] db_nc[n, c] - S A[n, g] - B[n, g] xh[n, c])
    g = tl.program_id(0)
    offs = tl.arange(0, BLOCK_CPG)
    mask_c = offs < CPG
    chan = g * CPG + offs
    w = tl.load(W + chan, mask=mask_c, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_CPG], dtype=tl.float32)
    db = tl.zeros([BLOCK_CPG], dtype=tl.float32)
    for n in range(0, N):
        # Tile-shaped accumulators, reduced once after the loop: a row sum accumulated inside
        # the loop makes Triton 3.6's TritonGPUOptimizeThreadLocality pass fail on the
        # 16x16 and 32x8 tiles without input_bias (fastdiff.tools.aot_check, every matrix).
        acc_ds = tl.zeros([BLOCK_CPG, BLOCK_K], dtype=tl.float32)
        acc_db = tl.zeros([BLOCK_CPG, BLOCK_K], dtype=tl.float32)
        acc_xh = tl.zeros([BLOCK_CPG, BLOCK_K], dtype=tl.float32)
        rows = (n * C + chan) * n_chunks
        for k0 in range(0, n_chunks, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_c[:, None] & (k < n_chunks)[None, :]
            acc_ds += tl.load(PDS + rows[:, None] + k[None, :], mask=mask, other=0.0)
            acc_db += tl.load(PDB + rows[:, None] + k[None, :], mask=mask, other=0.0)
            if HAS_IB:
                acc_xh += tl.load(PXH + rows[:, None] + k[None, :], mask=mask, other=0.0)
        ds_n = tl.sum(acc_ds, axis=1)
        db_n = tl.sum(acc_db, axis=1)
        xh_n = tl.sum(acc_xh, axis=1)
        coef_a = tl.sum(w * db_n, axis=0) * inv_group_size
        coef_b = tl.sum(w * ds_n, axis=0) * inv_group_size
        tl.store(COEF_A + n * G + g, coef_a)
        tl.store(COEF_B + n * G + g, coef_b)
        if HAS_IB:
            # S * A = sum_c(w * db_n) / CPG
            dib = tl.load(RSTD + n * G + g) * (w * db_n - tl.sum(w * db_n, axis=0) / CPG - coef_b * xh_n)
            tl.store(DIB + n * C + chan, dib.to(DIB.dtype.element_ty), mask=mask_c)
        dw += ds_n
        db += db_n
    tl.store(DW + chan, dw.to(DW.dtype.element_ty), mask=mask_c)
    tl.store(DB + chan, db.to(DB.dtype.element_ty), mask=mask_c)


@triton.jit
def _bwd_dx_kernel(
    DY,  # pointer to dy, same shape as x, its own strides
    X,  # pointer to x, (N, C, *spatial)
    DX,  # pointer to dx, same shape as x, its own strides
    W,  # pointer to weight, (C,) contiguous
    B,  # pointer to bias, (C,) contiguous
    MEAN,  # pointer to fp32 group means, (N, G)
    RSTD,  # pointer to fp32 group 1/std, (N, G)
    COEF_A,  # pointer to fp32 A = mean_group(dz * w), (N, G)
    COEF_B,  # pointer to fp32 B = mean_group(dz * w * x_hat), (N, G)
    IB,  # pointer to input_bias, (N, C) in x's dtype (HAS_IB only)
    C,  # number of channels
    S,  # number of spatial positions
    S1,  # size of the inner collapsed spatial dim (TWO_D only)
    stride_xn, stride_xc, stride_xs0, stride_xs1,  # x strides: batch, channel, outer/inner spatial
    stride_dyn, stride_dyc, stride_dys0, stride_dys1,  # dy strides, same order
    stride_dxn, stride_dxc, stride_dxs0, stride_dxs1,  # dx strides, same order
    stride_ibn, stride_ibc,  # input_bias strides
    G,  # number of groups
    CPG,  # channels per group
    chunk,  # spatial positions per program
    n_chunks,  # programs along the spatial axis
    n_cblocks,  # programs along the channel axis
    SILU: tl.constexpr,
    TWO_D: tl.constexpr,
    HAS_IB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Program mapping as in _stats_kernel. dx = rstd * (dz * w - A - x_hat * B).
    pid = tl.program_id(0)
    cb = pid % n_cblocks
    sp = (pid // n_cblocks) % n_chunks
    n = pid // (n_cblocks * n_chunks)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    grp = n * G + offs_c // CPG
    mean = tl.load(MEAN + grp, mask=mask_c, other=0.0)
    rstd = tl.load(RSTD + grp, mask=mask_c, other=0.0)
    coef_a = tl.load(COEF_A + grp, mask=mask_c, other=0.0)
    coef_b = tl.load(COEF_B + grp, mask=mask_c, other=0.0)
    w = tl.load(W + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    x_base = X + n.to(tl.int64) * stride_xn + offs_c[:, None] * stride_xc
    dy_base = DY + n.to(tl.int64) * stride_dyn + offs_c[:, None] * stride_dyc
    dx_base = DX + n.to(tl.int64) * stride_dxn + offs_c[:, None] * stride_dxc
    ib = _input_bias(IB, n, offs_c, mask_c, stride_ibn, stride_ibc, HAS_IB)
    s_begin = sp * chunk
    s_end = tl.minimum(s_begin + chunk, S)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = mask_c[:, None] & (offs_s < s_end)[None, :]
        dz, x_hat = _bwd_tile(
            x_base + _spatial_offsets(offs_s, S1, stride_xs0, stride_xs1, TWO_D)[None, :],
            dy_base + _spatial_offsets(offs_s, S1, stride_dys0, stride_dys1, TWO_D)[None, :],
            mask, mean, rstd, w, b, ib, SILU, HAS_IB,
        )
        dx = rstd[:, None] * (dz * w[:, None] - coef_a[:, None] - x_hat * coef_b[:, None])
        tl.store(dx_base + _spatial_offsets(offs_s, S1, stride_dxs0, stride_dxs1, TWO_D)[None, :], dx.to(DX.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------

_LAUNCH_HOOK: Optional[Callable] = None


def _launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or the hook set by :func:`launch_hook`."""
    if _LAUNCH_HOOK is not None:
        _LAUNCH_HOOK(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def launch_hook(hook: Callable) -> Iterator[None]:
    """Inside the block every kernel launch of this module calls
    ``hook(kernel, grid, args, kwargs)`` instead (process-wide, for tests and the census):
    count launches, or time the host path with a no-op. A hook may launch the kernel itself."""
    global _LAUNCH_HOOK
    saved, _LAUNCH_HOOK = _LAUNCH_HOOK, hook
    try:
        yield
    finally:
        _LAUNCH_HOOK = saved



def _check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, input_bias: Optional[torch.Tensor] = None) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"group_norm (triton): x dtype must be fp32, fp16 or bf16, got {x.dtype}")
    if x.dim() < 3 or x.numel() == 0:
        raise ValueError(f"group_norm (triton): x must be a non-empty (N, C, *spatial) tensor, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"group_norm (triton): num_groups ({num_groups}) must divide the channel count ({c})")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (c,) or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"group_norm (triton): {name} must be a ({c},) {x.dtype} tensor on {x.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if input_bias is not None and (tuple(input_bias.shape) != tuple(x.shape[:2]) or input_bias.dtype != x.dtype or input_bias.device != x.device):
        raise ValueError(
            f"group_norm (triton): input_bias must be a {tuple(x.shape[:2])} {x.dtype} tensor on {x.device}, "
            f"got {tuple(input_bias.shape)} {input_bias.dtype} on {input_bias.device}"
        )
    reasons = layout_reasons(x, num_groups)
    if reasons:
        raise ValueError("group_norm (triton): " + "; ".join(reasons))


def _strides4(t: torch.Tensor, dims: List[Tuple[int, List[int]]], k: int) -> Tuple[int, int, int, int]:
    """(stride_n, stride_c, stride_s0, stride_s1) of tensor number ``k`` of a collapse."""
    _, s0, s1, _ = _spatial_args(dims, k)
    return t.stride(0), t.stride(1), s0, s1


def _ib_args(x: torch.Tensor, input_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, int, int]:
    """(pointer, stride_n, stride_c) for the kernels' IB argument; x stands in when there is none
    (never read: HAS_IB is False)."""
    if input_bias is None:
        return x, 0, 0
    return input_bias, input_bias.stride(0), input_bias.stride(1)


def _device_ctx(x: torch.Tensor):
    """Launch on x's GPU (Triton launches on the current device); nothing on the CPU, nor
    with a single visible GPU (no device query: fake CUDA tensors work, and it is cheaper)."""
    if x.is_cuda and torch.cuda.device_count() > 1:
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


# Arrival counters of the last-program merge, one int32 per (n, group), by (device, stream):
# zeroed once when made, left at zero by every launch (the last program resets its group's).
_COUNTERS: dict = {}


def _group_counters(x: torch.Tensor, size: int) -> torch.Tensor:
    """At least ``size`` zeroed int32 counters on x's device for the current stream.

    Kernels on one stream run one after the other, so they share a buffer; another
    stream gets its own. Inside a CUDA graph capture a missing buffer is made by a
    captured memset (zeroed at every replay) and not kept for eager use. Fake tensors
    (FakeTensorMode) get a fresh fake buffer, never cached."""
    real = type(x) is torch.Tensor
    if not real:
        return torch.zeros(max(size, 1024), dtype=torch.int32, device=x.device)
    key = (x.device, torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else 0)
    buf = _COUNTERS.get(key)
    if buf is not None and buf.numel() >= size:
        return buf
    buf = torch.zeros(max(size, 1024), dtype=torch.int32, device=x.device)
    if not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        _COUNTERS[key] = buf
    return buf


@functools.lru_cache(maxsize=1024)
def _cached_launch_config(n: int, c: int, s: int, num_groups: int, channels_contiguous: bool, num_sms: int, allow_single_pass: bool) -> GroupNormConfig:
    """:func:`launch_config` once per distinct launch (a pure function of its arguments)."""
    config = launch_config(n, c, s, num_groups, channels_contiguous, num_sms, allow_single_pass)
    logger.debug("group_norm launch (n=%d, c=%d, s=%d, G=%d, nhwc=%s, %d SMs) -> %s", n, c, s, num_groups, channels_contiguous, num_sms, config)
    return config


@functools.lru_cache(maxsize=1024)
def _cached_collapse(sizes: Tuple[int, ...], strides: Tuple[Tuple[int, ...], ...]) -> Tuple[List[Tuple[int, List[int]]], int, bool]:
    """(dims, S1, TWO_D) of :func:`_collapse_spatial`, once per distinct layout."""
    dims = _collapse_spatial(sizes, strides)
    s1, _, _, two_d = _spatial_args(dims, 0)
    return dims, s1, two_d


def _resolve_config(x: torch.Tensor, num_groups: int, config: Optional[GroupNormConfig], allow_single_pass: bool) -> GroupNormConfig:
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    if config is None:
        config = _cached_launch_config(n, c, s, num_groups, c > 1 and x.stride(1) == 1, _num_sms(x.device), allow_single_pass)
    else:
        _check_config(config, c // num_groups, s)
    return config


def group_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    num_groups: int,
    eps: float,
    silu: bool,
    config: Optional[GroupNormConfig] = None,
    input_bias: Optional[torch.Tensor] = None,
    check: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm (+SiLU) forward of ``x + input_bias[:, :, None, ...]``.

    Args:
        x: (N, C, *spatial), fp32/fp16/bf16, any layout :func:`layout_reasons` accepts.
        weight, bias: (C,) in x's dtype.
        num_groups: G, dividing C.
        eps: added to the variance.
        silu: apply SiLU to the normalised, affine result.
        config: launch override (tests, benchmarks); default :func:`launch_config`.
        input_bias: optional (N, C) in x's dtype, any strides, added to x on load
            (in x's dtype, like the reference) before the statistics.
        check: False skips the argument checks, for a caller that has already checked
            arguments of this very metadata (the op's cached plan).

    Returns:
        y: ``torch.empty_like(x)`` (x's dtype and memory format) holding the result;
        mean, rstd: fp32 (N, G) group statistics (of the biased input).
    """
    if check:
        _check_args(x, weight, bias, num_groups, input_bias)
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    cpg = c // num_groups
    config = _resolve_config(x, num_groups, config, allow_single_pass=True)
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    rstd = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    weight, bias = weight.contiguous(), bias.contiguous()
    dims, s1, two_d = _cached_collapse(tuple(x.shape[2:]), (x.stride()[2:], y.stride()[2:]))
    x_strides, y_strides = _strides4(x, dims, 0), _strides4(y, dims, 1)
    ib, ib_sn, ib_sc = _ib_args(x, input_bias)
    has_ib = input_bias is not None
    with _device_ctx(x):
        if config.single_pass:
            _launch(
                _single_pass_kernel, (n * num_groups,),
                x, y, weight, bias, ib, mean, rstd, s, s1, *x_strides, *y_strides, ib_sn, ib_sc, num_groups, eps,
                CPG=cpg, SILU=silu, TWO_D=two_d, HAS_IB=has_ib, BLOCK_C=config.block_c, BLOCK_S=config.block_s, num_warps=config.num_warps,
            )
            return y, mean, rstd
        chunk, n_chunks = _chunking(s, config)
        n_cblocks = cdiv(c, config.block_c)
        grid = (n * n_chunks * n_cblocks,)
        pmean = torch.empty((n, c, n_chunks), dtype=torch.float32, device=x.device)
        pm2 = torch.empty_like(pmean)
        total = cpg * n_chunks
        last = config.last_program_combine
        block_g = _next_pow2(cdiv(config.block_c - 1, cpg) + 1) if last else 2
        counters = _group_counters(x, n * num_groups) if last else pmean
        _launch(
            _stats_kernel, grid,
            x, ib, pmean, pm2, counters, mean, rstd, c, s, s1, *x_strides, ib_sn, ib_sc, chunk, n_chunks, n_cblocks,
            num_groups, cpg, eps,
            TWO_D=two_d, HAS_IB=has_ib, LAST_COMBINE=last, BLOCK_C=config.block_c, BLOCK_S=config.block_s,
            BLOCK_G=block_g, BLOCK_P=max(2, min(_next_pow2(total), LAST_COMBINE_TILE // block_g)) if last else 2,
            num_warps=config.num_warps,
        )
        if not (config.fused_combine or last):
            block_p = min(_next_pow2(total), COMBINE_BLOCK)
            block_r = max(2, min(_next_pow2(n * num_groups), COMBINE_BLOCK // block_p))
            _launch(
                _combine_kernel, (cdiv(n * num_groups, block_r),),
                pmean, pm2, mean, rstd, c, s, num_groups, cpg, chunk, n_chunks, n * num_groups, eps,
                BLOCK_R=block_r, BLOCK_P=block_p, num_warps=4,
            )
        _launch(
            _apply_kernel, grid,
            x, y, weight, bias, ib, mean, rstd, pmean, pm2, c, s, s1, *x_strides, *y_strides, ib_sn, ib_sc,
            num_groups, cpg, chunk, n_chunks, n_cblocks, eps,
            SILU=silu, TWO_D=two_d, HAS_IB=has_ib, FUSED_COMBINE=config.fused_combine, BLOCK_C=config.block_c, BLOCK_S=config.block_s,
            BLOCK_P=max(2, min(_next_pow2(total), FUSED_COMBINE_MAX_PARTIALS // config.block_c)) if config.fused_combine else 2,
            num_warps=config.num_warps,
        )
    return y, mean, rstd


def group_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
    config: Optional[GroupNormConfig] = None,
    input_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Fused GroupNorm (+SiLU) backward; the math is in the module docstring.

    Args:
        dy: gradient of y, x's shape and dtype, any strides (strides the kernel
            cannot index together with x's are first copied into x's layout).
        x, weight, bias, input_bias: the forward's inputs (x_hat is recomputed from
            ``x + input_bias``, in x's dtype like the forward).
        mean, rstd: fp32 (N, G) statistics returned by :func:`group_norm_forward`.
        num_groups, silu: as in the forward.
        config: launch override; default :func:`launch_config` without the
            single pass (a forced single-pass config runs with one chunk).

    Returns:
        dx (``torch.empty_like(x)``), dw and db (like weight and bias), and
        d(input_bias) = dx summed over the spatial dims, (N, C) contiguous in x's
        dtype (None without input_bias). Three launches in all.
    """
    _check_args(x, weight, bias, num_groups, input_bias)
    if dy.shape != x.shape or dy.dtype != x.dtype or dy.device != x.device:
        raise ValueError(f"group_norm backward: dy must match x ({tuple(x.shape)} {x.dtype}), got {tuple(dy.shape)} {dy.dtype} on {dy.device}")
    n, c = x.shape[:2]
    s = math.prod(x.shape[2:])
    cpg = c // num_groups
    expected = (n, num_groups)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.shape != expected or t.dtype != torch.float32:
            raise ValueError(f"group_norm backward: {name} must be fp32 of shape {expected}, got {t.dtype} {tuple(t.shape)}")
    config = _resolve_config(x, num_groups, config, allow_single_pass=False)
    if config.single_pass:
        # A forced single-pass config: the backward always reduces through
        # partials; with this tile one chunk covers all of s.
        config = GroupNormConfig(False, config.block_c, config.block_s, config.num_warps, 1)
    dx = torch.empty_like(x)
    strides = [x.stride()[2:], dy.stride()[2:], dx.stride()[2:]]
    dims = _collapse_spatial(x.shape[2:], strides)
    if len(dims) > MAX_SPATIAL_DIMS or _sample_span(dy) > _INT32_MAX:
        logger.debug("group_norm backward: copying dy with strides %s into x's layout", tuple(dy.stride()))
        dy = torch.empty_like(x).copy_(dy)
        dims = _collapse_spatial(x.shape[2:], [x.stride()[2:], dy.stride()[2:], dx.stride()[2:]])
    s1, _, _, two_d = _spatial_args(dims, 0)
    x_strides, dy_strides, dx_strides = (_strides4(t, dims, k) for k, t in enumerate((x, dy, dx)))
    weight, bias, mean, rstd = weight.contiguous(), bias.contiguous(), mean.contiguous(), rstd.contiguous()
    chunk, n_chunks = _chunking(s, config)
    n_cblocks = cdiv(c, config.block_c)
    grid = (n * n_chunks * n_cblocks,)
    pds = torch.empty((n, c, n_chunks), dtype=torch.float32, device=x.device)
    pdb = torch.empty_like(pds)
    coef_a = torch.empty((n, num_groups), dtype=torch.float32, device=x.device)
    coef_b = torch.empty_like(coef_a)
    dw, db = torch.empty_like(weight), torch.empty_like(bias)
    has_ib = input_bias is not None
    ib, ib_sn, ib_sc = _ib_args(x, input_bias)
    pxh = torch.empty_like(pds) if has_ib else pds
    dib = torch.empty((n, c), dtype=x.dtype, device=x.device) if has_ib else None
    with _device_ctx(x):
        _launch(
            _bwd_reduce_kernel, grid,
            dy, x, weight, bias, mean, rstd, ib, pds, pdb, pxh, c, s, s1, *x_strides, *dy_strides, ib_sn, ib_sc,
            num_groups, cpg, chunk, n_chunks, n_cblocks,
            SILU=silu, TWO_D=two_d, HAS_IB=has_ib, BLOCK_C=config.block_c, BLOCK_S=config.block_s, num_warps=config.num_warps,
        )
        block_cpg = _next_pow2(cpg)
        _launch(
            _bwd_combine_kernel, (num_groups,),
            pds, pdb, pxh, weight, rstd, coef_a, coef_b, dw, db, dib if has_ib else dw, n, c, num_groups, cpg, n_chunks, 1.0 / (cpg * s),
            HAS_IB=has_ib, BLOCK_CPG=block_cpg, BLOCK_K=max(2, min(_next_pow2(n_chunks), COMBINE_BLOCK // block_cpg)), num_warps=4,
        )
        _launch(
            _bwd_dx_kernel, grid,
            dy, x, dx, weight, bias, mean, rstd, coef_a, coef_b, ib, c, s, s1, *x_strides, *dy_strides, *dx_strides, ib_sn, ib_sc,
            num_groups, cpg, chunk, n_chunks, n_cblocks,
            SILU=silu, TWO_D=two_d, HAS_IB=has_ib, BLOCK_C=config.block_c, BLOCK_S=config.block_s, num_warps=config.num_warps,
        )
    return dx, dw, db, dib
