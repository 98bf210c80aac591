"""Triton kernel for the fused scheduler step with classifier-free guidance.

One launch per step. A 1-D grid of programs covers the sample's elements; each
program reads the step index on the device, loads its row of the coefficient
table, and for its BLOCK elements computes (in float32)::

    m      = u + g * (c - u)            # or m = model_output without guidance
    x_prev = a*x + e*m + s*noise + h1*hist[-1] + h2*hist[-2] + h3*hist[-3]
    hist[i mod R] <- p*x + q*m          # when a history ring is given

The math, the table columns and the history/noise/step-index conventions are
documented in fastdiff/ops/scheduler_step.py, which owns validation.

Layout: every tensor is read through its own strides. The launcher merges the
sample-shaped views into at most 4 dims (dims are ordered by the sample's
strides and merged where every view is contiguous across them), so dense
tensors in one layout (contiguous, channels_last, ...) become one flat dim and
the kernel skips the index arithmetic (NDIM == 1).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastdiff.kernels._common import _to_dtype, cdiv, next_pow2

MAX_DIMS = 4

# Launch heuristic, in one place: aim for about 256 programs (two per SM on a
# 132-SM H100) so small latents (16K-64K elements) still fill the GPU, with at
# least 128 and at most 2048 elements per program, ~4 elements per thread.
TARGET_PROGRAMS = 256
MIN_BLOCK = 128
MAX_BLOCK = 2048
ELEMENTS_PER_THREAD = 4


def launch_settings(n_elements: int) -> Tuple[int, int]:
    """(BLOCK, num_warps) for ``n_elements`` elements."""
    block = next_pow2(cdiv(n_elements, TARGET_PROGRAMS))
    block = max(MIN_BLOCK, min(MAX_BLOCK, block))
    num_warps = max(1, min(8, block // (32 * ELEMENTS_PER_THREAD)))
    return block, num_warps


@triton.jit
def _view_offsets(i0, i1, i2, i3, s0, s1, s2, s3, NDIM: tl.constexpr):
    """Memory offset (in elements) of logical index (i0, i1, i2, i3) in a view with strides s0..s3.
    Only the NDIM innermost dims exist; the others have size 1."""
    off = i3 * s3
    if NDIM >= 2:
        off += i2 * s2
    if NDIM >= 3:
        off += i1 * s1
    if NDIM >= 4:
        off += i0 * s0
    return off


@triton.jit
def _scheduler_step_kernel(
    x_ptr,  # sample x: read
    mo_ptr,  # model output: the whole (B, ...) output, or with guidance its first (uncond) half
    noise_ptr,  # noise, or step 0 of a (num_steps, ...) noise bank (unused without HAS_NOISE)
    hist_ptr,  # slot 0 of the (R, ...) history ring (unused when NUM_HISTORY == 0)
    out_ptr,  # x_prev: written (may alias x_ptr exactly)
    coeff_ptr,  # (num_steps, 8) float32 table, row-major contiguous: a, e, s, p, q, h1, h2, h3
    index_ptr,  # int64 step index (low 32 bits; the high 32 count arrivals while ADVANCE runs)
    guidance_ptr,  # one-element guidance scale tensor (read when GUIDANCE == 2)
    guidance_scale,  # float guidance scale (used when GUIDANCE == 1)
    n_elements,  # elements in the sample
    size1,  # sizes of logical dims 1..3 of the merged view (dim 3 innermost; dim 0's size is implied)
    size2,
    size3,
    sx0, sx1, sx2, sx3,  # strides of x over the merged dims, in elements
    sm0, sm1, sm2, sm3,  # strides of the model output view
    cond_offset,  # elements from the uncond half to the cond half: B * model_output.stride(0)
    sn0, sn1, sn2, sn3,  # strides of the noise view
    noise_step_stride,  # elements between two steps of a noise bank: noise.stride(0)
    sh0, sh1, sh2, sh3,  # strides of one history slot
    hist_slot_stride,  # elements between two history slots: history.stride(0)
    so0, so1, so2, so3,  # strides of out
    num_steps,  # rows in the coefficient table
    NDIM: tl.constexpr,  # merged dims actually present (1..4)
    GUIDANCE: tl.constexpr,  # 0: no CFG, 1: float guidance_scale, 2: guidance_ptr tensor
    HAS_NOISE: tl.constexpr,
    NOISE_PER_STEP: tl.constexpr,  # noise is a bank indexed by the step index
    NUM_HISTORY: tl.constexpr,  # R, slots in the history ring (0: none)
    ADVANCE: tl.constexpr,  # advance the step index by one in this launch
    BLOCK: tl.constexpr,  # elements per program
):
    tl.static_assert(NUM_HISTORY <= 3)
    tl.static_assert(NDIM >= 1 and NDIM <= 4)
    # Program pid covers the flat (logical, row-major) elements [pid * BLOCK, (pid + 1) * BLOCK).
    pid = tl.program_id(0)

    # --- the step index, read on the device -------------------------------------------------
    if ADVANCE:
        # One atomic per program: add 1 to the arrival count in the high 32 bits and get the
        # index from the low 32 bits of the old value. The last program to arrive knows every
        # other one already has its index, so it adds 1 to the index and clears the count.
        num_programs = tl.num_programs(0).to(tl.int64)
        old = tl.atomic_add(index_ptr, 1 << 32)
        step = old & 0xFFFFFFFF
        last = (old >> 32) == num_programs - 1
        tl.atomic_add(index_ptr, 1 - (num_programs << 32), mask=last)
    else:
        step = tl.load(index_ptr)
    # An index outside the table cannot be reported without a host sync: clamp it for the
    # address arithmetic (no out-of-bounds access) and poison the coefficients with NaN.
    valid = (step >= 0) & (step < num_steps)
    step = tl.where(valid, step, 0)
    poison = tl.where(valid, 0.0, float("nan"))
    row = coeff_ptr + step * 8
    a = tl.load(row + 0) + poison
    e = tl.load(row + 1) + poison
    s = tl.load(row + 2) + poison
    p = tl.load(row + 3) + poison
    q = tl.load(row + 4) + poison

    # --- element offsets in every view ----------------------------------------------------------
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_elements
    if NDIM == 1:
        # Dense in one layout (the common case): the flat index is the offset (times the stride).
        i0 = idx
        i1 = idx
        i2 = idx
        i3 = idx
    else:
        # Unravel the flat index over (dim0, dim1, dim2, dim3), dim3 innermost.
        i3 = idx % size3
        rest = idx // size3
        i2 = rest % size2
        rest = rest // size2
        i1 = rest % size1
        i0 = rest // size1
    off_x = _view_offsets(i0, i1, i2, i3, sx0, sx1, sx2, sx3, NDIM)
    off_m = _view_offsets(i0, i1, i2, i3, sm0, sm1, sm2, sm3, NDIM)
    off_o = _view_offsets(i0, i1, i2, i3, so0, so1, so2, so3, NDIM)

    # --- the update, in float32 (loads are upcast at once, stores cast back) -----------------------
    x = tl.load(x_ptr + off_x, mask=mask, other=0.0).to(tl.float32)
    if GUIDANCE == 0:
        m = tl.load(mo_ptr + off_m, mask=mask, other=0.0).to(tl.float32)
    else:
        if GUIDANCE == 1:
            g = guidance_scale
        else:
            g = tl.load(guidance_ptr).to(tl.float32)
        uncond = tl.load(mo_ptr + off_m, mask=mask, other=0.0).to(tl.float32)
        cond = tl.load(mo_ptr + cond_offset + off_m, mask=mask, other=0.0).to(tl.float32)
        m = uncond + g * (cond - uncond)
    acc = a * x + e * m
    if HAS_NOISE:
        off_n = _view_offsets(i0, i1, i2, i3, sn0, sn1, sn2, sn3, NDIM)
        if NOISE_PER_STEP:
            off_n += step * noise_step_stride
        noise = tl.load(noise_ptr + off_n, mask=mask, other=0.0).to(tl.float32)
        acc += s * noise
    if NUM_HISTORY > 0:
        off_h = _view_offsets(i0, i1, i2, i3, sh0, sh1, sh2, sh3, NDIM)
        # hist[-j] lives in slot (step - j) mod R; all reads happen before the write below,
        # which may reuse the slot of hist[-R].
        for j in tl.static_range(1, NUM_HISTORY + 1):
            h_j = tl.load(row + 4 + j) + poison
            slot = (step + NUM_HISTORY - j) % NUM_HISTORY
            hist = tl.load(hist_ptr + slot * hist_slot_stride + off_h, mask=mask, other=0.0).to(tl.float32)
            acc += h_j * hist
        d = p * x + q * m
        slot = step % NUM_HISTORY
        tl.store(hist_ptr + slot * hist_slot_stride + off_h, _to_dtype(d, hist_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + off_o, _to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------


def merge_dims(views: Sequence[torch.Tensor]) -> Tuple[List[int], List[List[int]]]:
    """Merge same-shaped views into the fewest dims an elementwise kernel can index.

    Size-1 dims are dropped, the rest are ordered by the first view's strides
    (outermost first, so any memory format of the first view becomes row-major),
    and neighbouring dims are merged where every view is contiguous across them.
    Returns (sizes, strides per view), outermost first; at least one dim.
    """
    shape = views[0].shape
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    dims.sort(key=lambda d: -views[0].stride(d))
    sizes: List[int] = []
    strides: List[List[int]] = [[] for _ in views]
    for d in dims:
        mergeable = sizes and all(st[-1] == v.stride(d) * shape[d] for st, v in zip(strides, views))
        if mergeable:
            sizes[-1] *= shape[d]
            for st, v in zip(strides, views):
                st[-1] = v.stride(d)
        else:
            sizes.append(shape[d])
            for st, v in zip(strides, views):
                st.append(v.stride(d))
    if not sizes:
        sizes = [1]
        strides = [[1] for _ in views]
    return sizes, strides


def layout_reasons(views: Sequence[torch.Tensor]) -> List[str]:
    """Why the kernel cannot index these sample-shaped views (empty when it can)."""
    reasons = []
    sizes, _ = merge_dims(views)
    if len(sizes) > MAX_DIMS:
        reasons.append(f"the tensors' strides leave {len(sizes)} dims after merging (at most {MAX_DIMS})")
    if views[0].numel() >= 2**31:
        reasons.append("more than 2**31 - 1 elements")
    return reasons


def scheduler_step_forward(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    step_index: torch.Tensor,
    out: torch.Tensor,
    noise: Optional[torch.Tensor],
    history: Optional[torch.Tensor],
    guidance_scale: Optional[float],
    guidance_tensor: Optional[torch.Tensor],
    has_guidance: bool,
    advance_step_index: bool,
) -> None:
    """Launch the kernel once: writes ``out`` (and the history slot, and advances
    ``step_index`` when asked). Inputs are validated by fastdiff.ops.scheduler_step."""
    batch = sample.shape[0]
    uncond = model_output[:batch]
    views = [sample, uncond, out]
    noise_per_step = noise is not None and noise.dim() == sample.dim() + 1
    if noise is not None:
        views.append(noise[0] if noise_per_step else noise)
    if history is not None:
        views.append(history[0])
    sizes, strides = merge_dims(views)
    ndim = len(sizes)
    pad = MAX_DIMS - ndim
    sizes = [1] * pad + sizes
    strides = [[0] * pad + st for st in strides]
    sx, sm, so = strides[0], strides[1], strides[2]
    sn = strides[3] if noise is not None else [0] * MAX_DIMS
    sh = strides[-1] if history is not None else [0] * MAX_DIMS

    n_elements = sample.numel()
    block, num_warps = launch_settings(n_elements)
    grid = (cdiv(n_elements, block),)
    if not has_guidance:
        guidance_mode = 0
    elif guidance_tensor is None:
        guidance_mode = 1
    else:
        guidance_mode = 2
    _scheduler_step_kernel[grid](
        sample,
        uncond,
        noise if noise is not None else sample,
        history if history is not None else sample,
        out,
        coeffs,
        step_index,
        guidance_tensor if guidance_tensor is not None else coeffs,
        float(guidance_scale) if guidance_mode == 1 else 0.0,
        n_elements,
        sizes[1],
        sizes[2],
        sizes[3],
        *sx,
        *sm,
        batch * model_output.stride(0),
        *sn,
        noise.stride(0) if noise_per_step else 0,
        *sh,
        history.stride(0) if history is not None else 0,
        *so,
        coeffs.shape[0],
        NDIM=ndim,
        GUIDANCE=guidance_mode,
        HAS_NOISE=noise is not None,
        NOISE_PER_STEP=noise_per_step,
        NUM_HISTORY=history.shape[0] if history is not None else 0,
        ADVANCE=advance_step_index,
        BLOCK=block,
        num_warps=num_warps,
    )
