"""Flash attention in Triton: forward with online softmax, FA2-style backward.

Layout (B, H, L, D) as in ``torch.nn.functional.scaled_dot_product_attention``;
every tensor is addressed through its strides, so views out of one fused QKV
projection run without a copy. Lq may differ from Lk (cross-attention: Lk=77).
Key blocks that lie fully inside Lk run without bounds checks; only the last
block, when BLOCK_N does not divide Lk, is masked (the EVEN_N split; the
backward does the same along both of its loops).

Head dim. ``tl.dot`` needs each dimension to be a power of two and at least
16, so a head dim D is padded to a multiple of 16 and split into at most two
power-of-two chunks, D0 + D1 (:func:`head_dim_chunks`): 40 -> 32 + 16 (48),
72 -> 64 + 16 (80), 80 -> 64 + 16, 160 -> 128 + 32, 64 -> 64, 8 -> 16. Each
product over D is then one or two accumulating dots, so D=40 costs 48 columns,
not the 64 a single power-of-two tile would. (FlashAttention-2 has kernels for
head dims 32, 64, 96, 128, 160, 192 and 256, so it pads 40 to 64 and 80 to 96
and runs 160 unpadded with its hdim160 kernel; FlashAttention-3 rounds 160 up
to 192.) Chunk columns at or past D are loaded as zeros. Whether two chunks
beat one padded power of two is the forward autotuner's choice where both are
at most 64 wide (``SPLIT_D``: 32 + 16 against 64 at D=40), since two narrow
dots issue more instructions than one wide one.

Masks. A boolean (True = attend) or additive mask, broadcastable to
(B, H, Lq, Lk), is read through four strides; broadcast dims get stride 0, so
nothing is materialised. A mask that does not vary along queries (key padding,
(B, 1, 1, Lk)) is read as one vector of keys per step (``MASK_KEYS_ONLY``); a
full (Lq, Lk) mask needs a tile of pointers, which on sm_90 makes the 128x64
forward tiles spill (ptxas, Triton 3.9), so expect full masks to run slower.
Even a key-padding mask makes 64x128 tiles spill at D=40/64/80 (255 registers,
serialised wgmma), so the pruner keeps masked calls on 64-key tiles. In the
backward on sm_80, masks make the 64-row dK/dV query steps spill (full masks at
every head dim, key-padding ones at D=80), so :func:`_bwd_spill_keep` keeps them
out (as it does the dQ 64x64 tile at D=160, which spills with or without a mask);
fp32 at D=160 exceeds the card's shared memory in several backward tiles, which
:func:`_bwd_smem_estimate` prunes.
A fully-masked row gives zeros (SDPA's behaviour in torch >= 2.5) and zero
gradients; its saved logsumexp is +inf so that the backward's exp2(s - lse)
is 0 there.

Alignment. Triton vectorises (and so pipelines with cp.async) a row load only
if it can prove the row starts 16 bytes apart. With D=40 the row stride 40 is
not a multiple of 16, so the JIT cannot prove it; the launcher checks it
instead and passes ``ALIGNED``, which :func:`_rows`/:func:`_cols` turn into
``tl.multiple_of`` hints (tests/test_attention.py compiles the kernels for
sm_80/sm_90 and checks that the loads are pipelined).

Precision. Scores, softmax statistics and accumulators are fp32. fp16/bf16
inputs feed the tensor cores in their own dtype (P is cast to the input dtype
before P @ V, as in FA2). fp32 inputs use ``input_precision="ieee"`` so no
TF32 rounding happens. Under TRITON_INTERPRET=1 every tile is upcast to fp32
right after loading (``UPCAST``), because the interpreter's bf16 arithmetic is
wrong; results on the CPU are therefore slightly *more* precise than on a GPU.
The interpreter also truncates fp32 -> bf16 conversions instead of rounding to
nearest (as a GPU does), so under it bf16 results are written to fp32 buffers
and rounded by torch (:func:`_store_dtype`).

Hopper. :func:`_attn_fwd_tma` is the same forward with q/k/v read by the TMA
engine through host-built 4-D tensor descriptors (Triton >= 3.4; the import is
guarded, so older Triton runs everything else). Compiled for sm_90 it loads
through TMA, uses wgmma and needs fewer registers than the pointer kernel (for
example 155 vs 185 at D=160, 128x64 tiles). It is the ``triton_tma`` backend,
kept out of ``auto`` until a GPU run measures it. Warp specialisation is not
used: Triton 3.9 leaves ``tl.range(..., warp_specialize=True)`` on this loop
unpartitioned for sm_90 (checked in the TTGIR), so it would change nothing.

Filling the GPU. There is no persistent grid. Short sequences fill the GPU
through the autotuner: its configs include BLOCK_M = 16 and 32, which give
(2, 8, 256) 256 or 128 programs, and :func:`_prune_fwd_configs` drops configs
that leave three quarters of the SMs idle when another config fills a wave.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import FakeTensor  # imported by torch itself: no cost

from fastdiff.backends import capability_reasons, cuda_device_description
from fastdiff.backends import triton_interpret_enabled as _interpret

from ._common import cdiv, next_pow2
from ._tuning import refuse_tuning_during_capture

LOG2E = math.log2(math.e)
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_GRID_Y = 65535  # CUDA's limit on grid dim 1, which holds B * H.
MAX_HEAD_DIM = 256  # every tile keeps whole head-dim rows in registers / shared memory
# Whether this process runs the kernels under Triton's interpreter: decided when the
# kernels are defined (triton.jit reads TRITON_INTERPRET then), so read once here too.
_INTERPRETED = _interpret()
# Offsets to a program's (batch, head) planes and first row/key are 64-bit in every
# kernel; positions and offsets inside one tile are 32-bit. So a length must leave
# room for one more block past it, and a tile's extent (rows x row stride plus head-dim
# columns x column stride) must fit 32 bits: :func:`index_range_problems`.
_INT32_MAX = 2**31 - 1
MAX_LENGTH = _INT32_MAX - 256  # Lq and Lk: start + arange(BLOCK) stays 32-bit
_TILE_ROWS = 128  # the largest BLOCK_M / BLOCK_N of any kernel config (and of a mask tile's keys)
# Strides below these keep every tile extent under 2^31 (127 * 2^23 + 255 * 2^22 < 2^31).
_QUICK_ROW_STRIDE, _QUICK_COL_STRIDE = 2**23, 2**22


# ---------------------------------------------------------------------------
# Launch heuristics: every block size, chunking and config choice lives here.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def head_dim_chunks(head_dim: int, split: bool = True) -> Tuple[int, int]:
    """(D0, D1): two power-of-two tile widths >= 16 (D1 may be 0) covering head_dim
    with the least padding that tl.dot allows. ``split=False`` gives one chunk
    padded to the next power of two instead (40 -> 64 + 0), the other choice the
    forward's autotuner measures (``SPLIT_D``)."""
    padded = max(16, -(-head_dim // 16) * 16)
    if not split:
        return next_pow2(padded), 0
    d0 = 1 << (padded.bit_length() - 1)
    rest = padded - d0
    d1 = 0 if rest == 0 else max(16, next_pow2(rest))
    return d0, d1


def _split_choice_matters(head_dim: int) -> bool:
    """Whether the forward tunes SPLIT_D: the head dim splits into two chunks and one
    power-of-two chunk would be at most 64 wide (D = 33..48, i.e. SD 1.5's 40: 32 + 16
    against 64). Wider ones (80 -> 128, 160 -> 256) would cost too many registers."""
    return head_dim_chunks(head_dim)[1] > 0 and head_dim_chunks(head_dim, split=False)[0] <= 64


def _chunk_heuristics():
    """D0/D1 of the forward kernels, from HEAD_DIM and the config's SPLIT_D (the kernels
    derive EVEN_D0/EVEN_D1 themselves: Triton rebuilds the whole argument dict for every
    heuristic on every launch, so each one costs host time)."""
    return {
        "D0": lambda args: head_dim_chunks(args["HEAD_DIM"], args["SPLIT_D"])[0],
        "D1": lambda args: head_dim_chunks(args["HEAD_DIM"], args["SPLIT_D"])[1],
    }


# Per-block shared memory (opt-in maximum) by compute capability, so that a launch
# plan needs no torch.cuda query (the device description may name a target that is
# not present): A100/A800 (8.0) 163 KB, H100/H200 (9.0) 227 KB, consumer Ampere and
# Ada (8.6, 8.9) 99 KB (CUDA C Programming Guide, "Technical Specifications per
# Compute Capability").
_SMEM_PER_BLOCK = {(8, 0): 166912, (8, 7): 166912, (9, 0): 232448, (8, 6): 101376, (8, 9): 101376}
_HOPPER_SMEM = _SMEM_PER_BLOCK[(9, 0)]


def _description_for(t):
    """fastdiff.backends' description (capability, SM count) of a CUDA tensor's device;
    None for other tensors, or when no description is available."""
    if isinstance(t, torch.Tensor) and t.device.type == "cuda":
        return cuda_device_description(t.device)
    return None


def _sms_for(t) -> Optional[int]:
    """The SM count of a CUDA tensor's device; None elsewhere (no occupancy pruning).
    (fastdiff.tools.aot_check patches this and _smem_limit_for to stand for an A100 or H100.)"""
    description = _description_for(t)
    return description.sm_count if description is not None else None


def _smem_limit_for(t) -> Optional[int]:
    """Shared memory per block (opt-in maximum) of a CUDA tensor's device, from its
    compute capability (:data:`_SMEM_PER_BLOCK`; unknown capabilities count as 99 KB);
    None elsewhere."""
    description = _description_for(t)
    if description is None:
        return None
    return _SMEM_PER_BLOCK.get(tuple(description.capability), 101376)


def _capability_for(t) -> Optional[Tuple[int, int]]:
    """The compute capability the forward pruner tunes for: the description's, or, for a
    stand-in device whose only known property is its shared memory (fastdiff.tools.aot_check
    patches _smem_limit_for), (9, 0) for Hopper's 227 KB and (8, 0) below; None if unknown."""
    description = _description_for(t)
    if description is not None:
        return tuple(description.capability)
    smem = _smem_limit_for(t)
    if smem is None:
        return None
    return (9, 0) if smem >= _HOPPER_SMEM else (8, 0)


def _fwd_configs() -> List[triton.Config]:
    if _interpret():
        # One small config: the interpreter runs every tile in Python, and a tail
        # block in both directions is exercised by the odd test lengths.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "SPLIT_D": True}, num_warps=4, num_stages=1)]
    return _gpu_fwd_configs()


def _ampere_keep(block_m: int, block_n: int, warps: int, stages: int) -> bool:
    """The pre-Hopper list: 128-row tiles get 8 warps and smaller ones 4, two or three stages."""
    return warps == (8 if block_m == 128 else 4) and stages in (2, 3)


def _hopper_keep(block_m: int, block_n: int, warps: int, stages: int) -> bool:
    """The Hopper list: 64/128 rows x 64/128 keys x 4/8 warps x 2-4 stages, except
    128x128 on 4 warps (one warpgroup holding a 128x128 fp32 score tile spills)."""
    if block_m <= 32:
        return warps == 4 and stages in (2, 3)
    return not (block_m == 128 and block_n == 128 and warps == 4)


def _gpu_fwd_configs() -> List[triton.Config]:
    """Every config of the Ampere and Hopper lists (the pruner keeps the device's list),
    each with the head dim split into two chunks (``SPLIT_D``, :func:`head_dim_chunks`)
    or padded to one power of two; the pruner keeps the unsplit ones only where the
    choice exists (:func:`_split_choice_matters`). The 16/32-row tiles (short
    sequences) only take 64-key steps."""
    configs = []
    for split in (True, False):
        for bm in (16, 32, 64, 128):
            for bn in (64, 128):
                if bm <= 32 and bn > 64:
                    continue
                for w in (4, 8):
                    for st in (2, 3, 4):
                        if _ampere_keep(bm, bn, w, st) or _hopper_keep(bm, bn, w, st):
                            configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_D": split}, num_warps=w, num_stages=st))
    return configs


def _fwd_smem_estimate(c: triton.Config, args, capability: Optional[Tuple[int, int]] = None) -> int:
    """Shared memory (bytes) a forward config needs, as ptxas reports it (Triton 3.9,
    fastdiff.tools.aot_check, checked on every forward config of its ci matrix: at or above
    the measured figure, never pruning one that fits): K and V tiles for every stage but
    one, the query tile, a score-sized staging tile, and the mask's tiles; on sm_90 with
    16-bit inputs (wgmma operands in shared memory) K/V for every stage and the query
    tile; plus 5% headroom. fp32 (ieee) tiles are twice fp16's, so
    their deep pipelines do not fit: 128x64 with 3 stages at D=160 needs 279 KB."""
    bm, bn, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    padded = sum(head_dim_chunks(args["HEAD_DIM"], c.kwargs.get("SPLIT_D", True)))
    elt = _element_size(args.get("Out"), 2)
    if capability is not None and capability[0] >= 9 and elt == 2:
        # wgmma reads its operands from shared memory: K/V for every stage, and the query tile.
        need = stages * bn * padded * elt * 2 + bm * padded * elt
    else:
        staging = bm * bn
        if "q_desc0" in args:
            # The TMA kernel's K chunk arrives in shared memory untransposed; for the fp32 dots
            # it is transposed through a scratch buffer the size of the larger of the score tile
            # and the K chunk (BLOCK_N x D0): at D=160, 64x64 tiles need 155,704 B with 2 stages
            # and 237,632 B with 3 (over sm_90's 232,448).
            staging = max(staging, bn * head_dim_chunks(args["HEAD_DIM"], c.kwargs.get("SPLIT_D", True))[0])
        need = (stages - 1) * bn * padded * elt * 2 + bm * padded * elt + staging * elt
    if args.get("MASK_KIND", MASK_NONE) != MASK_NONE:
        mask_elt = _element_size(args.get("Mask"), 4)
        need += stages * (bn if args.get("MASK_KEYS_ONLY", False) else bm * bn) * mask_elt
    return int(need * 1.05)


def _element_size(t, default: int) -> int:
    return t.element_size() if hasattr(t, "element_size") else default


def _fitting(configs, estimate, smem: int, kernel: str, call: str) -> list:
    """The configs whose shared-memory ``estimate`` fits ``smem`` bytes per block. If none
    does, the one with the smallest estimate, and a RuntimeWarning that says so (the launch
    may then fail with an out-of-resources error; no fitting config is ever dropped)."""
    need = {id(c): estimate(c) for c in configs}
    fitting = [c for c in configs if need[id(c)] <= smem]
    if fitting or not configs:
        return fitting
    smallest = min(configs, key=lambda c: need[id(c)])
    warnings.warn(
        f"{kernel}: no config fits the card's {smem} B of shared memory per block ({call}); running the "
        f"smallest, {_tile_label(smallest)} (estimated {need[id(smallest)]} B), which may fail to launch",
        RuntimeWarning,
        stacklevel=3,
    )
    return [smallest]


def _tile_label(c: triton.Config) -> str:
    return f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"


def _fwd_tuning_key(args) -> tuple:
    """The autotune key of the forward kernels as Triton builds it (key arguments, then tensor dtypes)."""
    return tuple(args.get(name) for name in _FWD_KEY) + tuple(str(v.dtype) for v in args.values() if hasattr(v, "dtype"))


def _prune_fwd_configs(configs, named_args, **kwargs):
    """Per-shape pruning before tuning (Triton calls it only for a key not tuned yet).

    * Never inside a CUDA graph capture: tuning would be recorded into the graph
      (:func:`fastdiff.kernels._tuning.refuse_tuning_during_capture`).
    * The device's list: Hopper (capability 9.x) or the pre-Hopper one
      (:func:`_hopper_keep`, :func:`_ampere_keep`); both when the device is unknown.
    * SPLIT_D=False (one power-of-two head-dim chunk) only where it differs from the split.
    * Large head dims (padded > 128, i.e. 160) keep BLOCK_N <= 64, drop BLOCK_M = 32
      and 128 rows on 4 warps: on sm_90 (Triton 3.9) those tiles use 250+ registers
      or spill (ptxas resource usage).
    * Masked calls keep BLOCK_N <= 64, and full (Lq, Lk) masks BLOCK_M <= 64
      as well: bigger tiles spill and serialise wgmma on sm_90.
    * Shared memory: configs whose :func:`_fwd_smem_estimate` exceeds the card's
      per-block limit (:func:`_smem_limit_for`) are dropped; fp32 deep pipelines do
      not fit (at D=160, 128x64 with 2 stages needs 197,120 B, over sm_80's 166,912;
      the TMA kernel's 64x64 with 3 stages 237,632 B, over sm_90's 232,448). If none
      fits, the smallest is kept with a warning (:func:`_fitting`).
    * Occupancy: a config whose grid covers less than a quarter wave of SMs
      is dropped whenever some other config covers a full wave (at
      (2, 8, 256, 160) that keeps 16-row tiles, 256 programs, and 64-row
      tiles, 64 programs, and lets the tuner measure which is faster).
    * The 16/32-row tiles exist only to fill the GPU: once a tile of 64+ rows
      fills a wave on its own, they are dropped.
    """
    args = {**named_args, **kwargs}  # Triton 3.0 passes constexpr arguments in kwargs
    refuse_tuning_during_capture("attention forward", _fwd_tuning_key(args))
    head_dim = args["HEAD_DIM"]
    capability = _capability_for(args["Lse"])  # an output every forward kernel has; it tells the device

    def keep(c):
        bm, bn, w, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        if capability is not None and not (_hopper_keep if capability[0] >= 9 else _ampere_keep)(bm, bn, w, st):
            return False
        return c.kwargs.get("SPLIT_D", True) or _split_choice_matters(head_dim)

    configs = [c for c in configs if keep(c)] or configs
    padded = sum(head_dim_chunks(head_dim))
    if padded > 128:
        configs = [c for c in configs if c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_M"] != 32 and not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4)] or configs
    if args.get("MASK_KIND", MASK_NONE) != MASK_NONE:
        # Masked calls (ptxas, Triton 3.9, fastdiff.tools.aot_check): with a key-padding
        # mask, 64x128 tiles at D=40/64/80 reach 255 registers, spill and serialise wgmma
        # on sm_90; a full mask (a tile of mask pointers) does the same at 128-row tiles,
        # and its 128x128 3-stage tile at D=80 exceeds sm_80's shared memory. Masked
        # calls keep 64-key steps, and full masks at most 64 query rows.
        keys_only = args.get("MASK_KEYS_ONLY", False)
        configs = [c for c in configs if c.kwargs["BLOCK_N"] <= 64 and (keys_only or c.kwargs["BLOCK_M"] <= 64)] or configs
    smem = _smem_limit_for(args["Lse"])
    if smem is not None:
        call = f"head dim {head_dim}, {_element_size(args.get('Out'), 2)}-byte inputs"
        configs = _fitting(configs, lambda c: _fwd_smem_estimate(c, args, capability), smem, "attention forward", call)
    sms = _sms_for(args["Lse"])
    if sms is None:
        return configs
    rows = args["Lq"]
    bh = args["BH"]

    def programs(c):
        return cdiv(rows, c.kwargs["BLOCK_M"]) * bh

    if any(programs(c) >= sms for c in configs):
        configs = [c for c in configs if 4 * programs(c) >= sms]
    if any(c.kwargs["BLOCK_M"] >= 64 and programs(c) >= sms for c in configs):
        configs = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    return configs


# Backward tiles, (BLOCK_M, BLOCK_N, num_warps). _attn_bwd_dkdv owns BLOCK_N keys
# and steps through BLOCK_M queries; _attn_bwd_dq owns BLOCK_M queries and steps
# through BLOCK_N keys. Chosen from the register use ptxas reports for sm_90
# (Triton 3.9, fp16, with and without a mask): the tiles listed compile without
# spills for head dims 40/64/80, the *_LARGE_D ones for padded head dims above
# 128 (160), where most bigger tiles spill.
_DKDV_TILES = ((32, 64, 4), (32, 64, 8), (64, 64, 8), (32, 128, 8), (64, 128, 8))
_DKDV_TILES_LARGE_D = ((16, 64, 4), (32, 64, 8), (16, 128, 8))
_DQ_TILES = ((64, 64, 4), (128, 64, 8), (64, 32, 8), (64, 64, 8), (128, 32, 8))
_DQ_TILES_LARGE_D = ((64, 32, 4), (64, 32, 8), (64, 64, 8), (128, 32, 8))


# Register spills that fastdiff.tools.aot_check (ptxas, Triton 3.9) finds in configs the
# pruners keep for SD shapes, allowed here with their reasons; each key is (kernel, regex
# over "sm_<arch> <dtype> <constexprs> <tile> w<warps> s<stages>"). Open work, not design.
AOT_SPILL_ALLOWANCES = {
    **{
        (kernel, r"PRECISION=ieee"): (
            "fp32 inputs: ieee dots on fp32 tiles need about twice the registers of fp16/bf16, and the tiles "
            "were chosen for fp16; fp32 is the precision path (SD runs fp16/bf16). Smaller fp32 tiles: open"
        )
        for kernel in ("_attn_fwd", "_attn_fwd_tma", "_attn_bwd_dkdv", "_attn_bwd_dq")
    },
    ("_attn_fwd", r"^sm_80 .*HEAD_DIM=40 .*MASK_KIND=0 .* 128x64 w8 s2"): (
        "D=40 without a mask on sm_80: the 128x64 8-warp 2-stage forward tile spills 4 B (Triton 3.9); "
        "negligible, and the tuner measures it against the 64-row tiles"
    ),
    ("_attn_fwd", r"^sm_80 .*HEAD_DIM=160 .* (64x64 w4|128x64 w8) "): (
        "D=160 on sm_80: the 64x64 4-warp forward tile spills 8-112 B and the 128x64 8-warp one 4-8 B (Triton 3.9); "
        "the Ampere list has no other tile of 64+ rows at D=160 (16-row tiles only fill the GPU for short "
        "sequences), so these stay and the tuner measures them; small, left to measurement on an A100"
    ),
    ("_attn_bwd_dkdv", r"^sm_80 .*HEAD_DIM=80 .*MASK_KIND=[12] MASK_KEYS_ONLY=False .* 32x(64|128) "): (
        "D=80 with a full (Lq, Lk) bool or additive mask on sm_80: the 32-row dK/dV tiles spill 44-104 B "
        "(32x64 w4/w8, 32x128 w8; Triton 3.9) and the 64-row ones 1,728 B (pruned, _bwd_spill_keep), so no "
        "listed tile is spill-free; full masks are rare in SD. 16-row tiles for this case: open"
    ),
    ("_attn_bwd_dkdv", r"^sm_80 .*HEAD_DIM=160 .*MASK_KIND=[12] MASK_KEYS_ONLY=False .* (16x64|32x64|16x128) "): (
        "D=160 with a full (Lq, Lk) bool or additive mask on sm_80: every large-D dK/dV tile spills 4.8-6.1 KB "
        "(16x64 w4, 16x128 w8, 32x64 w8; Triton 3.9), so no tile is left to prune to; full masks are rare in SD "
        "(key-padding masks and no mask do not spill). A split of the D=160 backward: open"
    ),
    ("_attn_bwd_dq", r"^sm_80 .*HEAD_DIM=40 .*MASK_KIND=1 MASK_KEYS_ONLY=True .* 64x64 w4 s3"): (
        "D=40 with a key-padding bool mask on sm_80: the 64x64 4-warp dQ tile spills 20 B at 3 stages (Triton 3.9; "
        "its 2-stage twin and every other listed dQ tile do not); small, and the tuner measures it beside them"
    ),
    ("_attn_bwd_dq", r"^sm_80 .*HEAD_DIM=160 .*MASK_KIND=2 .* 64x32 w4 s2"): (
        "D=160 with an additive mask (key-padding or full) on sm_80: the 64x32 4-warp dQ tile spills 8 B "
        "(Triton 3.9; with a bool mask or none it does not, nor do 64x32 w8 and 128x32 w8 with a bool mask); "
        "small, and the tuner measures it beside the 8-warp tiles"
    ),
}


# wgmma that ptxas serialises in configs the pruners keep for SD shapes on sm_90
# (fastdiff.tools.aot_check, Triton 3.9), allowed here with their reasons; keys as above.
AOT_WGMMA_ALLOWANCES = {
    (kernel, r"^sm_90 .*MASK_KIND=[12] MASK_KEYS_ONLY=False "): (
        "backward with a full (Lq, Lk) mask on sm_90: the mask tile's pointer arithmetic between the dots makes "
        "ptxas serialise the wgmma in every listed backward tile (issue 8 found 108 of 148 configs); full masks are "
        "rare in SD and the backward is for training; key-padding masks and no mask are not affected. Loading the "
        "mask tile ahead of the dots (or a separate masked backward): open"
    )
    for kernel in ("_attn_bwd_dkdv", "_attn_bwd_dq")
}


def _bwd_configs(*tile_sets, interpret: Optional[bool] = None) -> List[triton.Config]:
    if _interpret() if interpret is None else interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    tiles = sorted({t for tile_set in tile_sets for t in tile_set})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w in tiles for s in (2, 3)]


def _bwd_smem_estimate(kind: str, c: triton.Config, args, capability: Optional[Tuple[int, int]] = None) -> int:
    """Shared memory (bytes) a backward config needs, at or above what Triton 3.9 reports
    (fastdiff.tools.aot_check): checked on 301 distinct dK/dV and dQ compiles (the ci
    matrix's 200, and a sample near the limits: fp16/bf16/fp32, D=40/64/80/160, no,
    key-padding and full masks, bool and additive, sm_80 and sm_90). Exact for every fp32
    one, above the 16-bit ones (by up to 1.53x: sm_80 dQ, sm_90 dK/dV); never below.
    ``kind`` is "dkdv" or "dq"; p is the padded head dim, e the input's element size.

    * dK/dV keeps its K and V tiles (2 x BLOCK_N x p x e) and streams the queries: every
      pipeline stage but one buffers Q and dO (2 x BLOCK_M x p x e) and the rows'
      logsumexp and Delta (2 x BLOCK_M x 4). On sm_90 with 16-bit inputs wgmma reads Q and
      dO from shared memory once more (2 x BLOCK_M x p x e); fp32 inputs stage the score
      tile (BLOCK_M x BLOCK_N x 4).
    * dQ keeps its Q and dO tiles (2 x BLOCK_M x p x e) and streams K and V (2 x BLOCK_N x
      p x e) through every stage but one, or every stage on sm_90 with 16-bit inputs
      (wgmma); without wgmma it stages a score tile (BLOCK_M x BLOCK_N x e).
    * A full (Lq, Lk) mask's tile (BLOCK_M x BLOCK_N x its element size), or a key-padding
      mask's BLOCK_N keys, for every stage but one (every stage in the 16-bit sm_90 dK/dV:
      an additive mask's tiles are pipelined there).

    No headroom: the fp32 terms are exact, and the forward's 5% would drop fitting configs
    (the fp32 dK/dV 64x128 tile with 3 stages at D=64 and an additive key-padding mask
    needs 165,888 B of sm_80's 166,912). fp32 at D=160 is where the limit bites: the dQ
    128x32 tile with 3 stages needs 262,144 B (over both cards), with 2 stages 221,184 B
    (over sm_80, under sm_90's 232,448).
    """
    bm, bn, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages
    padded = sum(head_dim_chunks(args["HEAD_DIM"]))
    elt = _element_size(args.get("Q"), 2)
    wgmma = capability is not None and capability[0] >= 9 and elt == 2
    if kind == "dkdv":
        need = (stages - 1) * (2 * bm * padded * elt + 2 * bm * 4) + 2 * bn * padded * elt
        if wgmma:
            need += 2 * bm * padded * elt
        elif elt == 4:
            need += bm * bn * 4
    else:
        need = (stages if wgmma else stages - 1) * 2 * bn * padded * elt + 2 * bm * padded * elt
        if not wgmma:
            need += bm * bn * elt
    if args.get("MASK_KIND", MASK_NONE) != MASK_NONE:
        mask_elt = _element_size(args.get("Mask"), 4)
        tiles = stages if kind == "dkdv" and wgmma else stages - 1
        need += tiles * (bn if args.get("MASK_KEYS_ONLY", False) else bm * bn) * mask_elt
    return need


def _bwd_spill_keep(kind: str, c: triton.Config, padded: int, mask_kind: int, keys_only: bool,
                    capability: Optional[Tuple[int, int]]) -> bool:
    """Whether a backward config escapes the register spills ptxas reports on sm_80 (Triton
    3.9, fastdiff.tools.aot_check, fp16) where a listed alternative does not spill. Pre-Hopper
    cards only (on sm_90 these tiles do not spill); an unknown device keeps everything.

    * dQ at D=160 (padded above 128): the 64x64 tile spills 1,416 B without a mask and
      300 B with a full mask; 64x32 and 128x32 do not. Keep BLOCK_N <= 32.
    * dK/dV with a full (Lq, Lk) mask: 64-row query steps spill 88-1,728 B (64x64 at
      D=40/64/80, 64x128 at D=40); the 32-row ones do not at D=40/64 and spill 80-104 B at
      D=80 (an allowance, AOT_SPILL_ALLOWANCES). Keep BLOCK_M <= 32.
    * dK/dV with a key-padding mask at D=80 (padded above 64): 64x64 spills 28 B; the
      32-row tiles do not. Keep BLOCK_M <= 32 there.
    * dK/dV at D=160: 32x64 w8 spills 32-52 B without a mask and 68-104 B with a
      key-padding one; 16x64 w4 and 16x128 w8 do not (every-config matrix, fp16). Keep
      BLOCK_M <= 16 (with a full mask every large-D tile spills, an allowance).
    """
    if capability is None or capability[0] >= 9:
        return True
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    if kind == "dq":
        return padded <= 128 or bn <= 32
    if padded > 128 and bm > 16:
        return False
    if mask_kind == MASK_NONE:
        return True
    return bm <= 32 or (keys_only and padded <= 64)


def _bwd_pruner(tiles, tiles_large_d, kernel: str = "attention backward", kind: str = "dkdv"):
    """An early_config_prune for the backward kernel ``kind`` ("dkdv" or "dq"). Like the
    forward's, it refuses to start a tune inside a CUDA graph capture. Then:

    * ``tiles`` for padded head dims <= 128, else ``tiles_large_d`` (register use, above);
    * on pre-Hopper cards, the tiles that spill there while another listed tile does not
      (:func:`_bwd_spill_keep`, with the measured spills: dQ 64x64 at D=160, 64-row dK/dV
      steps with masks);
    * the configs over the card's shared memory per block are dropped
      (:func:`_bwd_smem_estimate` against :func:`_smem_limit_for`): fp32 at D=160 needs up
      to 262 KB (dQ 128x32 or 64x64, 3 stages), over sm_80's 163 KB and sm_90's 227 KB.
      If no config fits, the one with the smallest estimate is kept and a warning says so.
    """
    wanted_small, wanted_large = set(tiles), set(tiles_large_d)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        key = tuple(args.get(name) for name in _BWD_KEY) + tuple(str(v.dtype) for v in args.values() if hasattr(v, "dtype"))
        refuse_tuning_during_capture(kernel, key)
        padded = sum(head_dim_chunks(args["HEAD_DIM"]))
        wanted = wanted_small if padded <= 128 else wanted_large
        kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) in wanted] or configs
        lse = args.get("Lse")
        capability = _capability_for(lse)
        mask_kind, keys_only = args.get("MASK_KIND", MASK_NONE), args.get("MASK_KEYS_ONLY", False)
        kept = [c for c in kept if _bwd_spill_keep(kind, c, padded, mask_kind, keys_only, capability)] or kept
        smem = _smem_limit_for(lse)
        if smem is None:
            return kept
        call = f"head dim {args['HEAD_DIM']}, {_element_size(args.get('Q'), 2)}-byte inputs"
        return _fitting(kept, lambda c: _bwd_smem_estimate(kind, c, args, capability), smem, kernel, call)

    return prune


# The backward pruner reads the head dim only; the mask's kind changes the tiles' cost.
_BWD_KEY = ["Lq", "Lk", "HEAD_DIM", "MASK_KIND", "MASK_KEYS_ONLY"]


def _even_heuristics():
    """EVEN_* flags skip bounds checks when a length is a multiple of its block."""
    return {
        "EVEN_M": lambda args: args["Lq"] % args["BLOCK_M"] == 0,
        "EVEN_N": lambda args: args["Lk"] % args["BLOCK_N"] == 0,
    }


# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------


@triton.jit
def _load(ptrs, ok_rows, ok_cols, EVEN_ROWS: tl.constexpr, EVEN_COLS: tl.constexpr):
    """Load a 2-D tile; out-of-range entries read 0. ``ok_rows``/``ok_cols`` are
    broadcastable bool tiles, and a bounds check is skipped when its EVEN_* flag
    says the block lies fully inside the tensor."""
    if EVEN_ROWS:
        if EVEN_COLS:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=ok_cols, other=0.0)
    else:
        if EVEN_COLS:
            x = tl.load(ptrs, mask=ok_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=ok_rows & ok_cols, other=0.0)
    return x


@triton.jit
def _rows(base, offs, stride, ALIGNED: tl.constexpr):
    """Element offsets base + offs * stride as a (len(offs), 1) tile (positions along rows).

    With ALIGNED (the launcher checked that the head-dim stride is 1 and every
    other stride a multiple of 8 elements, :func:`_rows_aligned`) the offsets
    are declared multiples of 8 elements (16 bytes at fp16/bf16) along both
    tile dims, so the sum with the head-dim arange stays provably aligned along
    the vectorised dim. Without the hint Triton cannot vectorise the row loads
    when a stride such as D=40 is not a multiple of 16, and then cannot
    pipeline them (cp.async)."""
    x = base + offs[:, None] * stride
    if ALIGNED:
        x = tl.multiple_of(x, [8, 8])
    return x


@triton.jit
def _cols(base, offs, stride, ALIGNED: tl.constexpr):
    """:func:`_rows` for a transposed tile: a (1, len(offs)) tile (positions along columns)."""
    x = base + offs[None, :] * stride
    if ALIGNED:
        x = tl.multiple_of(x, [8, 8])
    return x


@triton.jit
def _apply_mask(s, Mask, offs_m, offs_n, ok_m, ok_n, stride_mm, stride_mn,
                MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr):
    """Add the user mask to a (len(offs_m), len(offs_n)) tile of scores in log2 units.

    Mask points at this (batch, head)'s mask plane; offs_m/offs_n index its
    query/key axes (either may be laid out along the tile's rows). With
    MASK_KEYS_ONLY the mask is the same for every query (a key-padding mask such
    as (B, 1, 1, Lk)), so one vector of keys is loaded instead of a full tile:
    a full tile of mask pointers costs enough registers to make the forward
    spill at 128x64 tiles on sm_90."""
    if MASK_KIND != 0:
        if MASK_KEYS_ONLY:
            if EVEN_N:
                m = tl.load(Mask + offs_n * stride_mn)
            else:
                m = tl.load(Mask + offs_n * stride_mn, mask=ok_n, other=0)
        else:
            m = _load(Mask + offs_m * stride_mm + offs_n * stride_mn, ok_m, ok_n, EVEN_M, EVEN_N)
        if MASK_KIND == 1:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32) * 1.4426950408889634  # log2(e): scores are in log2 units
    return s


@triton.jit
def _online_softmax(s, m_i, l_i):
    """One step of the online softmax over a tile of scores s (log2 units):
    returns (p, alpha, m_new, l_new) where p = 2^(s - m_new) and alpha = 2^(m_old - m_new)
    rescales what was accumulated so far. A row that has seen only masked keys keeps
    m = -inf; shifting it by 0 instead keeps exp2 at 0 rather than NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s - m_shift[:, None])
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def _fwd_block(
    acc0, acc1, m_i, l_i,  # running output accumulators (per head-dim chunk) and softmax state
    q0, q1,  # the query tile's head-dim chunks (q1, acc1, offs_d1 are placeholders when D1 == 0)
    K, V, Mask, k_base, v_base,  # as in _attn_fwd: K/V plane offsets and this plane's mask pointer
    start_n, offs_m, offs_n, offs_d0, offs_d1, ok_m, Lk,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, EVEN_D0: tl.constexpr, EVEN_D1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_M: tl.constexpr,
    FULL: tl.constexpr,  # keys [start_n, start_n + BLOCK_N) all lie inside Lk: no bounds checks
):
    """One key block of the forward: scores, mask, online softmax, P @ V. ``offs_m``
    and ``offs_n`` are positions inside the tile; the block's first key is added to
    the 64-bit plane offsets once, so tile offsets stay 32-bit."""
    ok_n = start_n + offs_n < Lk
    n0 = tl.cast(start_n, tl.int64)
    k_blk = k_base + n0 * stride_kn
    v_blk = v_base + n0 * stride_vn
    # s = (q @ k^T) * scale * log2(e), as one or two accumulating dots over the head-dim chunks.
    kt0 = _load(K + _cols(k_blk, offs_n, stride_kn, ALIGNED) + offs_d0[:, None] * stride_kd, offs_d0[:, None] < HEAD_DIM, ok_n[None, :], EVEN_D0, FULL)
    if UPCAST:
        kt0 = kt0.to(tl.float32)
    s = tl.dot(q0, kt0, input_precision=PRECISION)
    if D1 > 0:
        kt1 = _load(K + _cols(k_blk, offs_n, stride_kn, ALIGNED) + offs_d1[:, None] * stride_kd, offs_d1[:, None] < HEAD_DIM, ok_n[None, :], EVEN_D1, FULL)
        if UPCAST:
            kt1 = kt1.to(tl.float32)
        s = tl.dot(q1, kt1, s, input_precision=PRECISION)
    s = s * qk_scale
    s = _apply_mask(s, Mask + n0 * stride_mn, offs_m[:, None], offs_n[None, :], ok_m[:, None], ok_n[None, :], stride_mm, stride_mn, MASK_KIND, MASK_KEYS_ONLY, EVEN_M, FULL)
    if not FULL:
        s = tl.where(ok_n[None, :], s, float("-inf"))

    # Online softmax: rescale the running sum and accumulator by 2^(m_old - m_new).
    p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
    if UPCAST:
        p_in = p
    else:
        p_in = p.to(V.dtype.element_ty)

    v0 = _load(V + _rows(v_blk, offs_n, stride_vn, ALIGNED) + offs_d0[None, :] * stride_vd, ok_n[:, None], offs_d0[None, :] < HEAD_DIM, FULL, EVEN_D0)
    if UPCAST:
        v0 = v0.to(tl.float32)
    acc0 = tl.dot(p_in, v0, acc0 * alpha[:, None], input_precision=PRECISION)
    if D1 > 0:
        v1 = _load(V + _rows(v_blk, offs_n, stride_vn, ALIGNED) + offs_d1[None, :] * stride_vd, ok_n[:, None], offs_d1[None, :] < HEAD_DIM, FULL, EVEN_D1)
        if UPCAST:
            v1 = v1.to(tl.float32)
        acc1 = tl.dot(p_in, v1, acc1 * alpha[:, None], input_precision=PRECISION)
    return acc0, acc1, m_i, l_i


@triton.jit
def _attn_fwd(
    Q, K, V,  # inputs, (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D), any strides
    Mask,  # (B, H, Lq, Lk) view (broadcast dims have stride 0); uint8 for bool masks; unused when MASK_KIND == 0
    Out,  # output, (B, H, Lq, D) view of a (B, Lq, H, D) buffer
    Lse,  # output, (B * H, Lq) fp32: per-row logsumexp of the scores in log2 units (+inf for fully-masked rows)
    stride_qb, stride_qh, stride_qm, stride_qd,  # Q strides: batch, head, query position, head-dim column
    stride_kb, stride_kh, stride_kn, stride_kd,  # K strides: batch, head, key position, column
    stride_vb, stride_vh, stride_vn, stride_vd,  # V strides: batch, head, key position, column
    stride_mb, stride_mh, stride_mm, stride_mn,  # Mask strides: batch, head, query, key
    stride_ob, stride_oh, stride_om, stride_od,  # Out strides: batch, head, query position, column
    H,  # heads per batch entry
    BH,  # B * H (read by the config pruner)
    Lq, Lk,  # query and key lengths
    qk_scale,  # softmax scale * log2(e): scores come out of the dot in log2 units, ready for exp2
    HEAD_DIM: tl.constexpr,  # true head dim D
    D0: tl.constexpr, D1: tl.constexpr,  # head-dim chunk widths (powers of two >= 16; D1 may be 0), from SPLIT_D
    MASK_KIND: tl.constexpr,  # 0 none, 1 boolean, 2 additive
    MASK_KEYS_ONLY: tl.constexpr,  # the mask does not vary along queries (stride_mm == 0 or Lq == 1)
    PRECISION: tl.constexpr,  # tl.dot input_precision: "ieee" for fp32 inputs
    UPCAST: tl.constexpr,  # compute every dot in fp32 (the interpreter)
    ALIGNED: tl.constexpr,  # every q/k/v/out row starts on a 16-byte boundary (see _rows)
    SPLIT_D: tl.constexpr,  # config choice: D0/D1 as head_dim_chunks(HEAD_DIM, SPLIT_D) (set by heuristics)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query rows per program, keys per inner step
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,  # Lq % BLOCK_M == 0, Lk % BLOCK_N == 0
):
    # Program (pid_m, pid_bh) owns query rows [pid_m * BLOCK_M, +BLOCK_M) of one
    # (batch, head) and streams every key block of that head through SRAM.
    tl.static_assert(D0 >= 16)
    EVEN_D0: tl.constexpr = D0 <= HEAD_DIM  # chunk lies fully inside D (no column bounds check)
    EVEN_D1: tl.constexpr = D0 + D1 <= HEAD_DIM
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    # 64-bit offsets to this program's (batch, head) planes and first query row, since
    # B * H * L * D (and Lq * Lk for a full mask) may pass 2^31; offsets inside a tile
    # (at most 128 rows/keys times a stride) stay 32-bit (the launcher checks them).
    row0 = start_m.to(tl.int64)
    q_base = off_b * stride_qb + off_h * stride_qh + row0 * stride_qm
    k_base = off_b * stride_kb + off_h * stride_kh
    v_base = off_b * stride_vb + off_h * stride_vh
    o_base = off_b * stride_ob + off_h * stride_oh + row0 * stride_om
    Mask += off_b * stride_mb + off_h * stride_mh + row0 * stride_mm
    Lse += pid_bh.to(tl.int64) * Lq + row0

    offs_mt = tl.arange(0, BLOCK_M)  # query rows inside the tile
    offs_m = start_m + offs_mt  # their positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    ok_m = offs_m < Lq

    # The query tile stays in registers for the whole loop.
    q0 = _load(Q + _rows(q_base, offs_mt, stride_qm, ALIGNED) + offs_d0[None, :] * stride_qd, ok_m[:, None], offs_d0[None, :] < HEAD_DIM, EVEN_M, EVEN_D0)
    if UPCAST:
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        q1 = _load(Q + _rows(q_base, offs_mt, stride_qm, ALIGNED) + offs_d1[None, :] * stride_qd, ok_m[:, None], offs_d1[None, :] < HEAD_DIM, EVEN_M, EVEN_D1)
        if UPCAST:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:  # one chunk: placeholders the block step passes through untouched
        offs_d1 = offs_d0
        q1 = q0
        acc1 = acc0
    # Online softmax state per row: running max m_i and running sum l_i (log2 units).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Every key block that lies fully inside Lk runs without bounds checks; only
    # the last one, when BLOCK_N does not divide Lk (77 keys), is masked.
    if EVEN_N:
        n_full = Lk
    else:
        n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _fwd_block(
            acc0, acc1, m_i, l_i, q0, q1, K, V, Mask, k_base, v_base, start_n, offs_mt, offs_n, offs_d0, offs_d1, ok_m, Lk,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
            HEAD_DIM, D1, EVEN_D0, EVEN_D1, MASK_KIND, MASK_KEYS_ONLY, PRECISION, UPCAST, ALIGNED, EVEN_M, True,
        )
    if not EVEN_N:
        acc0, acc1, m_i, l_i = _fwd_block(
            acc0, acc1, m_i, l_i, q0, q1, K, V, Mask, k_base, v_base, n_full, offs_mt, offs_n, offs_d0, offs_d1, ok_m, Lk,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
            HEAD_DIM, D1, EVEN_D0, EVEN_D1, MASK_KIND, MASK_KEYS_ONLY, PRECISION, UPCAST, ALIGNED, EVEN_M, False,
        )

    # Normalise. Fully-masked rows (l_i == 0) output zeros and save lse = +inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    if EVEN_M:
        tl.store(Lse + offs_mt, lse)
    else:
        tl.store(Lse + offs_mt, lse, mask=ok_m)
    out0 = (acc0 / l_safe[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + _rows(o_base, offs_mt, stride_om, ALIGNED) + offs_d0[None, :] * stride_od, out0, mask=ok_m[:, None] & (offs_d0[None, :] < HEAD_DIM))
    if D1 > 0:
        out1 = (acc1 / l_safe[:, None]).to(Out.dtype.element_ty)
        tl.store(Out + _rows(o_base, offs_mt, stride_om, ALIGNED) + offs_d1[None, :] * stride_od, out1, mask=ok_m[:, None] & (offs_d1[None, :] < HEAD_DIM))


# Everything the pruner reads is in the key; Triton appends the tensor dtypes.
_FWD_KEY = ["BH", "Lq", "Lk", "HEAD_DIM", "MASK_KIND", "MASK_KEYS_ONLY"]
_attn_fwd_tuned = triton.autotune(
    configs=_fwd_configs(),
    key=_FWD_KEY,
    prune_configs_by={"early_config_prune": _prune_fwd_configs},
)(triton.heuristics({**_even_heuristics(), **_chunk_heuristics()})(_attn_fwd))


@triton.jit
def _fwd_block_tma(
    acc0, acc1, m_i, l_i, q0, q1,  # as in _fwd_block
    k_desc0, k_desc1, v_desc0, v_desc1,  # TMA descriptors of k and v (see _attn_fwd_tma)
    Mask, off_b, off_h, start_n, offs_m, offs_n, ok_m, Lk, stride_mm, stride_mn, qk_scale,
    D0: tl.constexpr, D1: tl.constexpr, MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FULL: tl.constexpr,  # keys [start_n, start_n + BLOCK_N) all lie inside Lk
):
    """:func:`_fwd_block` with k/v tiles fetched through TMA (which zero-fills past Lk and D,
    so only the scores of the tail block need masking). ``offs_m``/``offs_n`` are positions
    inside the tile; Mask points at the tile's first query row."""
    ok_n = start_n + offs_n < Lk
    k0 = k_desc0.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D0)
    if UPCAST:
        k0 = k0.to(tl.float32)
    s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
    if D1 > 0:
        k1 = k_desc1.load([off_b, off_h, start_n, D0]).reshape(BLOCK_N, D1)
        if UPCAST:
            k1 = k1.to(tl.float32)
        s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
    s = s * qk_scale
    s = _apply_mask(s, Mask + tl.cast(start_n, tl.int64) * stride_mn, offs_m[:, None], offs_n[None, :], ok_m[:, None], ok_n[None, :], stride_mm, stride_mn, MASK_KIND, MASK_KEYS_ONLY, EVEN_M, FULL)
    if not FULL:
        s = tl.where(ok_n[None, :], s, float("-inf"))

    p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
    v0 = v_desc0.load([off_b, off_h, start_n, 0]).reshape(BLOCK_N, D0)
    if UPCAST:
        v0 = v0.to(tl.float32)
        p_in = p
    else:
        p_in = p.to(v0.dtype)
    acc0 = tl.dot(p_in, v0, acc0 * alpha[:, None], input_precision=PRECISION)
    if D1 > 0:
        v1 = v_desc1.load([off_b, off_h, start_n, D0]).reshape(BLOCK_N, D1)
        if UPCAST:
            v1 = v1.to(tl.float32)
        acc1 = tl.dot(p_in, v1, acc1 * alpha[:, None], input_precision=PRECISION)
    return acc0, acc1, m_i, l_i


@triton.jit
def _attn_fwd_tma(
    q_desc0, q_desc1,  # TensorDescriptors over q (B, H, Lq, D): head-dim columns [0, D0) and [D0, D0 + D1)
    k_desc0, k_desc1,  # the same over k (B, H, Lk, D)
    v_desc0, v_desc1,  # the same over v (B, H, Lk, D)
    Mask, Out, Lse,  # as in _attn_fwd
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, BH, Lq, Lk, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    SPLIT_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    # _attn_fwd with q/k/v tiles fetched by the Hopper TMA engine through host-built
    # 4-D tensor descriptors (any strides that are multiples of 16 bytes). TMA zero-
    # fills reads past Lq/Lk and past D, so the loads need no masks; the math, the
    # program-id mapping (pid_m: query block, pid_bh: batch * H + head) and the
    # output are exactly those of _attn_fwd. The autotuner's pre-hook
    # (_tma_block_shapes) sets each descriptor's block shape from BLOCK_M/BLOCK_N.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    start_m = pid_m * BLOCK_M
    # 64-bit offsets to the program's planes and first row, as in _attn_fwd (TMA
    # coordinates are per-dimension 32-bit integers).
    row0 = start_m.to(tl.int64)
    Mask += off_b.to(tl.int64) * stride_mb + off_h.to(tl.int64) * stride_mh + row0 * stride_mm
    o_base = off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + row0 * stride_om
    Lse += pid_bh.to(tl.int64) * Lq + row0

    offs_mt = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_mt
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    ok_m = offs_m < Lq

    q0 = q_desc0.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, D0)
    if UPCAST:
        q0 = q0.to(tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        q1 = q_desc1.load([off_b, off_h, start_m, D0]).reshape(BLOCK_M, D1)
        if UPCAST:
            q1 = q1.to(tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:  # one chunk: placeholders the block step passes through untouched
        q1 = q0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Full key blocks unmasked, then the tail block (if any) with bounds checks, as in _attn_fwd.
    if EVEN_N:
        n_full = Lk
    else:
        n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, m_i, l_i = _fwd_block_tma(
            acc0, acc1, m_i, l_i, q0, q1, k_desc0, k_desc1, v_desc0, v_desc1, Mask, off_b, off_h, start_n, offs_mt, offs_n, ok_m, Lk,
            stride_mm, stride_mn, qk_scale, D0, D1, MASK_KIND, MASK_KEYS_ONLY, PRECISION, UPCAST, EVEN_M, BLOCK_N, True,
        )
    if not EVEN_N:
        acc0, acc1, m_i, l_i = _fwd_block_tma(
            acc0, acc1, m_i, l_i, q0, q1, k_desc0, k_desc1, v_desc0, v_desc1, Mask, off_b, off_h, n_full, offs_mt, offs_n, ok_m, Lk,
            stride_mm, stride_mn, qk_scale, D0, D1, MASK_KIND, MASK_KEYS_ONLY, PRECISION, UPCAST, EVEN_M, BLOCK_N, False,
        )

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(Lse + offs_mt, lse, mask=ok_m)
    out0 = (acc0 / l_safe[:, None]).to(Out.dtype.element_ty)
    tl.store(Out + _rows(o_base, offs_mt, stride_om, ALIGNED) + offs_d0[None, :] * stride_od, out0, mask=ok_m[:, None] & (offs_d0[None, :] < HEAD_DIM))
    if D1 > 0:
        out1 = (acc1 / l_safe[:, None]).to(Out.dtype.element_ty)
        tl.store(Out + _rows(o_base, offs_mt, stride_om, ALIGNED) + offs_d1[None, :] * stride_od, out1, mask=ok_m[:, None] & (offs_d1[None, :] < HEAD_DIM))


def _tma_block_shapes(nargs) -> None:
    """Autotune pre-hook: give every descriptor the block shape of the chosen config
    (chunk 1 of a head dim with D1 == 0 is never read; it keeps D0's width)."""
    d0, d1 = head_dim_chunks(nargs["HEAD_DIM"], nargs["SPLIT_D"])
    d1 = d1 or d0
    for name, rows in (("q", nargs["BLOCK_M"]), ("k", nargs["BLOCK_N"]), ("v", nargs["BLOCK_N"])):
        nargs[f"{name}_desc0"].block_shape = [1, 1, rows, d0]
        nargs[f"{name}_desc1"].block_shape = [1, 1, rows, d1]


def _tma_configs() -> List[triton.Config]:
    """The forward configs with the descriptor pre-hook; wgmma wants 64+ query rows."""
    return [
        triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_tma_block_shapes)
        for c in _fwd_configs()
        if _interpret() or c.kwargs["BLOCK_M"] >= 64
    ]


_attn_fwd_tma_tuned = triton.autotune(
    configs=_tma_configs(),
    key=_FWD_KEY,
    prune_configs_by={"early_config_prune": _prune_fwd_configs},
)(triton.heuristics({**_even_heuristics(), **_chunk_heuristics()})(_attn_fwd_tma))


@triton.jit
def _attn_bwd_delta(
    Out, DOut,  # forward output and its gradient, (B, H, Lq, D), any strides
    Delta,  # output, (B * H, Lq) fp32: rowsum(dO * O), the softmax-backward correction
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    H, Lq,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,  # rows per program; head dim rounded up to a power of two
):
    # Program (pid_m, pid_bh): rows [pid_m * BLOCK_M, +BLOCK_M) of one (batch, head).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    row0 = (pid_m * BLOCK_M).to(tl.int64)  # 64-bit plane and row offsets, 32-bit inside the tile
    offs_mt = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + offs_mt
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Lq) & (offs_d[None, :] < HEAD_DIM)
    o_base = off_b * stride_ob + off_h * stride_oh + row0 * stride_om
    do_base = off_b * stride_db + off_h * stride_dh + row0 * stride_dm
    o = tl.load(Out + o_base + offs_mt[:, None] * stride_om + offs_d[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DOut + do_base + offs_mt[:, None] * stride_dm + offs_d[None, :] * stride_dd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


# Backward math (natural-log units, per (batch, head)); S = scale * Q K^T + mask:
#   P  = exp(S - lse)              recomputed from the saved logsumexp (here exp2 in log2 units)
#   dV = P^T dO
#   dP = dO V^T
#   dS = P * (dP - Delta),         Delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i
#   dQ = scale * dS K,  dK = scale * dS^T Q
# _attn_bwd_dkdv owns a block of keys and loops over all queries; _attn_bwd_dq
# owns a block of queries and loops over all keys. Each program writes only its
# own rows, so no atomics are needed (at the cost of computing P twice).


@triton.jit
def _dkdv_block(
    dk0, dk1, dv0, dv1,  # dK/dV accumulators of this program's keys, per head-dim chunk
    k0, k1, v0, v1,  # this program's key/value tiles (k1, v1, dk1, dv1, offs_d1 are placeholders when D1 == 0)
    Q, DOut, Mask, Lse, Delta, q_base, do_base,  # as in _attn_bwd_dkdv (Lse/Delta already at this (batch, head))
    start_m, offs_m, offs_n, offs_d0, offs_d1, ok_n, Lq,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, qk_scale,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, EVEN_D0: tl.constexpr, EVEN_D1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_N: tl.constexpr,
    FULL: tl.constexpr,  # queries [start_m, start_m + BLOCK_M) all lie inside Lq: no bounds checks
):
    """One query block of the dK/dV backward (keys along the tile's rows). ``offs_m``
    and ``offs_n`` are positions inside the tiles; Mask points at the program's first key."""
    rows = start_m + offs_m
    ok_m = rows < Lq
    m0 = tl.cast(start_m, tl.int64)
    q_blk = q_base + m0 * stride_qm
    do_blk = do_base + m0 * stride_dom
    q0 = _load(Q + _rows(q_blk, offs_m, stride_qm, ALIGNED) + offs_d0[None, :] * stride_qd, ok_m[:, None], offs_d0[None, :] < HEAD_DIM, FULL, EVEN_D0)
    do0 = _load(DOut + _rows(do_blk, offs_m, stride_dom, ALIGNED) + offs_d0[None, :] * stride_dod, ok_m[:, None], offs_d0[None, :] < HEAD_DIM, FULL, EVEN_D0)
    if UPCAST:
        q0 = q0.to(tl.float32)
        do0 = do0.to(tl.float32)
    # s^T = K Q^T (keys along rows), in log2 units.
    st = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)
    if D1 > 0:
        q1 = _load(Q + _rows(q_blk, offs_m, stride_qm, ALIGNED) + offs_d1[None, :] * stride_qd, ok_m[:, None], offs_d1[None, :] < HEAD_DIM, FULL, EVEN_D1)
        do1 = _load(DOut + _rows(do_blk, offs_m, stride_dom, ALIGNED) + offs_d1[None, :] * stride_dod, ok_m[:, None], offs_d1[None, :] < HEAD_DIM, FULL, EVEN_D1)
        if UPCAST:
            q1 = q1.to(tl.float32)
            do1 = do1.to(tl.float32)
        st = tl.dot(k1, tl.trans(q1), st, input_precision=PRECISION)
    st = st * qk_scale
    st = _apply_mask(st, Mask + m0 * stride_mm, offs_m[None, :], offs_n[:, None], ok_m[None, :], ok_n[:, None], stride_mm, stride_mn, MASK_KIND, MASK_KEYS_ONLY, FULL, EVEN_N)
    # Rows past Lq read lse = +inf, so their P is 0; key rows past Lk are never stored.
    if FULL:
        lse = tl.load(Lse + rows)
        delta = tl.load(Delta + rows)
    else:
        lse = tl.load(Lse + rows, mask=ok_m, other=float("inf"))
        delta = tl.load(Delta + rows, mask=ok_m, other=0.0)
    pt = tl.math.exp2(st - lse[None, :])
    if UPCAST:
        pt_in = pt
    else:
        pt_in = pt.to(Q.dtype.element_ty)
    # dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T * (dP^T - Delta);  dK += dS^T Q.
    dv0 = tl.dot(pt_in, do0, dv0, input_precision=PRECISION)
    dpt = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
    if D1 > 0:
        dv1 = tl.dot(pt_in, do1, dv1, input_precision=PRECISION)
        dpt = tl.dot(v1, tl.trans(do1), dpt, input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    if UPCAST:
        dst_in = dst
    else:
        dst_in = dst.to(Q.dtype.element_ty)
    dk0 = tl.dot(dst_in, q0, dk0, input_precision=PRECISION)
    if D1 > 0:
        dk1 = tl.dot(dst_in, q1, dk1, input_precision=PRECISION)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dq_block(
    dq0, dq1,  # dQ accumulators of this program's queries, per head-dim chunk
    q0, q1, do0, do1, lse, delta,  # this program's query rows (q1, do1, dq1, offs_d1 are placeholders when D1 == 0)
    K, V, Mask, k_base, v_base,  # as in _attn_bwd_dq
    start_n, offs_m, offs_n, offs_d0, offs_d1, ok_m, Lk,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
    HEAD_DIM: tl.constexpr, D1: tl.constexpr, EVEN_D0: tl.constexpr, EVEN_D1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_M: tl.constexpr,
    FULL: tl.constexpr,  # keys [start_n, start_n + BLOCK_N) all lie inside Lk: no bounds checks
):
    """One key block of the dQ backward (positions inside the tiles, as in _fwd_block)."""
    ok_n = start_n + offs_n < Lk
    n0 = tl.cast(start_n, tl.int64)
    k_blk = k_base + n0 * stride_kn
    v_blk = v_base + n0 * stride_vn
    kt0 = _load(K + _cols(k_blk, offs_n, stride_kn, ALIGNED) + offs_d0[:, None] * stride_kd, offs_d0[:, None] < HEAD_DIM, ok_n[None, :], EVEN_D0, FULL)
    vt0 = _load(V + _cols(v_blk, offs_n, stride_vn, ALIGNED) + offs_d0[:, None] * stride_vd, offs_d0[:, None] < HEAD_DIM, ok_n[None, :], EVEN_D0, FULL)
    if UPCAST:
        kt0 = kt0.to(tl.float32)
        vt0 = vt0.to(tl.float32)
    s = tl.dot(q0, kt0, input_precision=PRECISION)
    dp = tl.dot(do0, vt0, input_precision=PRECISION)
    if D1 > 0:
        kt1 = _load(K + _cols(k_blk, offs_n, stride_kn, ALIGNED) + offs_d1[:, None] * stride_kd, offs_d1[:, None] < HEAD_DIM, ok_n[None, :], EVEN_D1, FULL)
        vt1 = _load(V + _cols(v_blk, offs_n, stride_vn, ALIGNED) + offs_d1[:, None] * stride_vd, offs_d1[:, None] < HEAD_DIM, ok_n[None, :], EVEN_D1, FULL)
        if UPCAST:
            kt1 = kt1.to(tl.float32)
            vt1 = vt1.to(tl.float32)
        s = tl.dot(q1, kt1, s, input_precision=PRECISION)
        dp = tl.dot(do1, vt1, dp, input_precision=PRECISION)
    s = s * qk_scale
    s = _apply_mask(s, Mask + n0 * stride_mn, offs_m[:, None], offs_n[None, :], ok_m[:, None], ok_n[None, :], stride_mm, stride_mn, MASK_KIND, MASK_KEYS_ONLY, EVEN_M, FULL)
    if not FULL:
        s = tl.where(ok_n[None, :], s, float("-inf"))
    p = tl.math.exp2(s - lse[:, None])
    ds = p * (dp - delta[:, None])
    if UPCAST:
        ds_in = ds
    else:
        ds_in = ds.to(K.dtype.element_ty)
    dq0 = tl.dot(ds_in, tl.trans(kt0), dq0, input_precision=PRECISION)
    if D1 > 0:
        dq1 = tl.dot(ds_in, tl.trans(kt1), dq1, input_precision=PRECISION)
    return dq0, dq1


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, DOut,  # inputs as in _attn_fwd; DOut is dL/dOut, (B, H, Lq, D), any strides
    Lse, Delta,  # (B * H, Lq) fp32, from _attn_fwd and _attn_bwd_delta
    DK, DV,  # outputs, (B, H, Lk, D), any strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,  # DOut strides
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # DK strides
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,  # DV strides
    H, Lq, Lk,
    sm_scale,  # softmax scale (natural units), applied to dK once at the end
    qk_scale,  # sm_scale * log2(e)
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, EVEN_D0: tl.constexpr, EVEN_D1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    # Program (pid_n, pid_bh) owns key rows [pid_n * BLOCK_N, +BLOCK_N) of one
    # (batch, head); tiles are transposed (keys along rows) so dK/dV accumulate in place.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    # 64-bit offsets to the planes and this program's first key (as in _attn_fwd).
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    q_base = off_b * stride_qb + off_h * stride_qh
    k_base = off_b * stride_kb + off_h * stride_kh + col0 * stride_kn
    v_base = off_b * stride_vb + off_h * stride_vh + col0 * stride_vn
    Mask += off_b * stride_mb + off_h * stride_mh + col0 * stride_mn
    do_base = off_b * stride_dob + off_h * stride_doh
    dk_base = off_b * stride_dkb + off_h * stride_dkh + col0 * stride_dkn
    dv_base = off_b * stride_dvb + off_h * stride_dvh + col0 * stride_dvn
    Lse += pid_bh.to(tl.int64) * Lq
    Delta += pid_bh.to(tl.int64) * Lq

    offs_nt = tl.arange(0, BLOCK_N)  # key rows inside the tile
    offs_n = pid_n * BLOCK_N + offs_nt  # their positions
    offs_m = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    ok_n = offs_n < Lk

    k0 = _load(K + _rows(k_base, offs_nt, stride_kn, ALIGNED) + offs_d0[None, :] * stride_kd, ok_n[:, None], offs_d0[None, :] < HEAD_DIM, EVEN_N, EVEN_D0)
    v0 = _load(V + _rows(v_base, offs_nt, stride_vn, ALIGNED) + offs_d0[None, :] * stride_vd, ok_n[:, None], offs_d0[None, :] < HEAD_DIM, EVEN_N, EVEN_D0)
    if UPCAST:
        k0 = k0.to(tl.float32)
        v0 = v0.to(tl.float32)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        k1 = _load(K + _rows(k_base, offs_nt, stride_kn, ALIGNED) + offs_d1[None, :] * stride_kd, ok_n[:, None], offs_d1[None, :] < HEAD_DIM, EVEN_N, EVEN_D1)
        v1 = _load(V + _rows(v_base, offs_nt, stride_vn, ALIGNED) + offs_d1[None, :] * stride_vd, ok_n[:, None], offs_d1[None, :] < HEAD_DIM, EVEN_N, EVEN_D1)
        if UPCAST:
            k1 = k1.to(tl.float32)
            v1 = v1.to(tl.float32)
        dk1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1], dtype=tl.float32)
    else:  # one chunk: placeholders the block step passes through untouched
        offs_d1 = offs_d0
        k1 = k0
        v1 = v0
        dk1 = dk0
        dv1 = dv0

    # Query blocks that lie fully inside Lq run without bounds checks; only the last
    # one, when BLOCK_M does not divide Lq, is masked.
    if EVEN_M:
        m_full = Lq
    else:
        m_full = (Lq // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk0, dk1, dv0, dv1 = _dkdv_block(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DOut, Mask, Lse, Delta, q_base, do_base, start_m, offs_m, offs_nt, offs_d0, offs_d1, ok_n, Lq,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, qk_scale,
            HEAD_DIM, D1, EVEN_D0, EVEN_D1, MASK_KIND, MASK_KEYS_ONLY, PRECISION, UPCAST, ALIGNED, EVEN_N, True,
        )
    if not EVEN_M:
        dk0, dk1, dv0, dv1 = _dkdv_block(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, DOut, Mask, Lse, Delta, q_base, do_base, m_full, offs_m, offs_nt, offs_d0, offs_d1, ok_n, Lq,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, qk_scale,
            HEAD_DIM, D1, EVEN_D0, EVEN_D1, MASK_KIND, MASK_KEYS_ONLY, PRECISION, UPCAST, ALIGNED, EVEN_N, False,
        )

    ok_store = ok_n[:, None] & (offs_d0[None, :] < HEAD_DIM)
    tl.store(DK + _rows(dk_base, offs_nt, stride_dkn, ALIGNED) + offs_d0[None, :] * stride_dkd, (dk0 * sm_scale).to(DK.dtype.element_ty), mask=ok_store)
    tl.store(DV + _rows(dv_base, offs_nt, stride_dvn, ALIGNED) + offs_d0[None, :] * stride_dvd, dv0.to(DV.dtype.element_ty), mask=ok_store)
    if D1 > 0:
        ok_store1 = ok_n[:, None] & (offs_d1[None, :] < HEAD_DIM)
        tl.store(DK + _rows(dk_base, offs_nt, stride_dkn, ALIGNED) + offs_d1[None, :] * stride_dkd, (dk1 * sm_scale).to(DK.dtype.element_ty), mask=ok_store1)
        tl.store(DV + _rows(dv_base, offs_nt, stride_dvn, ALIGNED) + offs_d1[None, :] * stride_dvd, dv1.to(DV.dtype.element_ty), mask=ok_store1)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, DOut, Lse, Delta,  # as in _attn_bwd_dkdv
    DQ,  # output, (B, H, Lq, D), any strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,  # DQ strides
    H, Lq, Lk,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, EVEN_D0: tl.constexpr, EVEN_D1: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    # Program (pid_m, pid_bh) owns query rows [pid_m * BLOCK_M, +BLOCK_M) of one
    # (batch, head) and loops over every key block to accumulate dQ = scale * dS K.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    # 64-bit offsets to the planes and this program's first query row (as in _attn_fwd).
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    q_base = off_b * stride_qb + off_h * stride_qh + row0 * stride_qm
    k_base = off_b * stride_kb + off_h * stride_kh
    v_base = off_b * stride_vb + off_h * stride_vh
    Mask += off_b * stride_mb + off_h * stride_mh + row0 * stride_mm
    do_base = off_b * stride_dob + off_h * stride_doh + row0 * stride_dom
    dq_base = off_b * stride_dqb + off_h * stride_dqh + row0 * stride_dqm
    Lse += pid_bh.to(tl.int64) * Lq
    Delta += pid_bh.to(tl.int64) * Lq

    offs_mt = tl.arange(0, BLOCK_M)  # query rows inside the tile
    offs_m = pid_m * BLOCK_M + offs_mt  # their positions
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    ok_m = offs_m < Lq

    q0 = _load(Q + _rows(q_base, offs_mt, stride_qm, ALIGNED) + offs_d0[None, :] * stride_qd, ok_m[:, None], offs_d0[None, :] < HEAD_DIM, EVEN_M, EVEN_D0)
    do0 = _load(DOut + _rows(do_base, offs_mt, stride_dom, ALIGNED) + offs_d0[None, :] * stride_dod, ok_m[:, None], offs_d0[None, :] < HEAD_DIM, EVEN_M, EVEN_D0)
    if UPCAST:
        q0 = q0.to(tl.float32)
        do0 = do0.to(tl.float32)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        q1 = _load(Q + _rows(q_base, offs_mt, stride_qm, ALIGNED) + offs_d1[None, :] * stride_qd, ok_m[:, None], offs_d1[None, :] < HEAD_DIM, EVEN_M, EVEN_D1)
        do1 = _load(DOut + _rows(do_base, offs_mt, stride_dom, ALIGNED) + offs_d1[None, :] * stride_dod, ok_m[:, None], offs_d1[None, :] < HEAD_DIM, EVEN_M, EVEN_D1)
        if UPCAST:
            q1 = q1.to(tl.float32)
            do1 = do1.to(tl.float32)
        dq1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
    else:  # one chunk: placeholders the block step passes through untouched
        offs_d1 = offs_d0
        q1 = q0
        do1 = do0
        dq1 = dq0
    if EVEN_M:
        lse = tl.load(Lse + offs_m)
        delta = tl.load(Delta + offs_m)
    else:
        lse = tl.load(Lse + offs_m, mask=ok_m, other=float("inf"))
        delta = tl.load(Delta + offs_m, mask=ok_m, other=0.0)

    # Full key blocks unmasked, then the tail block (if any) with bounds checks.
    if EVEN_N:
        n_full = Lk
    else:
        n_full = (Lk // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq0, dq1 = _dq_block(
            dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, Mask, k_base, v_base, start_n, offs_mt, offs_n, offs_d0, offs_d1, ok_m, Lk,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
            HEAD_DIM, D1, EVEN_D0, EVEN_D1, MASK_KIND, MASK_KEYS_ONLY, PRECISION, UPCAST, ALIGNED, EVEN_M, True,
        )
    if not EVEN_N:
        dq0, dq1 = _dq_block(
            dq0, dq1, q0, q1, do0, do1, lse, delta, K, V, Mask, k_base, v_base, n_full, offs_mt, offs_n, offs_d0, offs_d1, ok_m, Lk,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, qk_scale,
            HEAD_DIM, D1, EVEN_D0, EVEN_D1, MASK_KIND, MASK_KEYS_ONLY, PRECISION, UPCAST, ALIGNED, EVEN_M, False,
        )

    tl.store(DQ + _rows(dq_base, offs_mt, stride_dqm, ALIGNED) + offs_d0[None, :] * stride_dqd, (dq0 * sm_scale).to(DQ.dtype.element_ty), mask=ok_m[:, None] & (offs_d0[None, :] < HEAD_DIM))
    if D1 > 0:
        tl.store(DQ + _rows(dq_base, offs_mt, stride_dqm, ALIGNED) + offs_d1[None, :] * stride_dqd, (dq1 * sm_scale).to(DQ.dtype.element_ty), mask=ok_m[:, None] & (offs_d1[None, :] < HEAD_DIM))


_attn_bwd_dkdv_tuned = triton.autotune(
    configs=_bwd_configs(_DKDV_TILES, _DKDV_TILES_LARGE_D),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _bwd_pruner(_DKDV_TILES, _DKDV_TILES_LARGE_D, "attention backward dK/dV", "dkdv")},
)(triton.heuristics(_even_heuristics())(_attn_bwd_dkdv))
_attn_bwd_dq_tuned = triton.autotune(
    configs=_bwd_configs(_DQ_TILES, _DQ_TILES_LARGE_D),
    key=_BWD_KEY,
    prune_configs_by={"early_config_prune": _bwd_pruner(_DQ_TILES, _DQ_TILES_LARGE_D, "attention backward dQ", "dq")},
)(triton.heuristics(_even_heuristics())(_attn_bwd_dq))


# ---------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------


def _tile_extent(rows: int, row_stride: int, cols: int, col_stride: int) -> int:
    """The largest element offset inside one tile of at most _TILE_ROWS rows (rows past
    the tensor's end are masked and never dereferenced) and ``cols`` columns."""
    return (min(rows, _TILE_ROWS) - 1) * row_stride + (cols - 1) * col_stride


def index_range_problems(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> List[str]:
    """Sizes and strides beyond what the kernels' offsets hold, each naming its argument;
    [] when everything fits (anything short of lengths near 2^31 or row strides near
    2^24 elements). Reads shapes and strides only: nothing is allocated or read."""
    lq, lk = q.shape[2], k.shape[2]
    if (
        lq <= MAX_LENGTH and lk <= MAX_LENGTH
        and max(q.stride(2), k.stride(2), v.stride(2)) < _QUICK_ROW_STRIDE
        and max(q.stride(3), k.stride(3), v.stride(3)) < _QUICK_COL_STRIDE
        and (attn_mask is None or max(attn_mask.stride()[-2:]) < _QUICK_ROW_STRIDE)
    ):
        return []  # every call short of huge strides: decided in a few operations
    problems = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[2] > MAX_LENGTH:
            problems.append(f"{name} has length {t.shape[2]} > {MAX_LENGTH} (positions are 32-bit in the Triton kernels)")
        extent = _tile_extent(t.shape[2], t.stride(2), t.shape[3], t.stride(3))
        if extent > _INT32_MAX:
            problems.append(
                f"{name}'s strides {tuple(t.stride())} are too large: one tile spans {extent} elements, "
                f"more than the kernels' 32-bit in-tile offsets hold ({_INT32_MAX})"
            )
    if attn_mask is not None:
        # Broadcast dims are read with stride 0 (_mask_view).
        stride_m = attn_mask.stride(-2) if attn_mask.dim() >= 2 and attn_mask.shape[-2] != 1 else 0
        stride_n = attn_mask.stride(-1) if attn_mask.shape[-1] != 1 else 0
        extent = _tile_extent(lq, stride_m, min(lk, _TILE_ROWS), stride_n)
        if extent > _INT32_MAX:
            problems.append(
                f"attn_mask's strides {tuple(attn_mask.stride())} are too large: one tile spans {extent} elements, "
                f"more than the kernels' 32-bit in-tile offsets hold ({_INT32_MAX})"
            )
    return problems


def _check_index_ranges(q, k, v, attn_mask) -> None:
    """The launchers' guard: a clear error instead of wrapped 32-bit offsets."""
    problems = index_range_problems(q, k, v, attn_mask)
    if problems:
        raise ValueError("attention (Triton): " + "; ".join(problems))


def layout_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> List[str]:
    """Why these (already validated) inputs cannot run on the Triton kernels; [] if they can."""
    reasons = index_range_problems(q, k, v, attn_mask)
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    if q.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {q.dtype} not supported (expected fp16, bf16 or fp32)")
    if q.shape[0] * q.shape[1] > MAX_GRID_Y:
        reasons.append(f"B * H = {q.shape[0] * q.shape[1]} exceeds {MAX_GRID_Y}")
    if attn_mask is not None and attn_mask.requires_grad:
        reasons.append("attn_mask requires grad; the Triton backward does not compute a mask gradient")
    # The device as fastdiff.backends describes it (a use_target description or the
    # visible GPU), never torch.cuda directly, so this also decides on fake CUDA tensors.
    reasons += capability_reasons(q.device, (8, 0), "bf16 tensor cores; compiled and tested for sm_80/sm_90")
    return reasons


def _data_ptr(t: torch.Tensor) -> int:
    """t.data_ptr(), or 0 for a tensor without real storage (a FakeTensor; meta tensors
    already give 0): taken as 16-byte aligned, as every block of torch's caching allocator is."""
    return 0 if isinstance(t, FakeTensor) else t.data_ptr()


def _tma_compatible(t: torch.Tensor) -> bool:
    """What a TMA descriptor requires of a tensor: unit last stride, 16-byte aligned
    base and 16-byte multiples for every other stride."""
    if t.stride(-1) != 1 or _data_ptr(t) % 16 != 0:
        return False
    return all((stride * t.element_size()) % 16 == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size > 1)


def tma_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> List[str]:
    """Why the TMA forward (:func:`attention_forward_tma`) cannot run these inputs; [] if it can.
    Everything :func:`layout_reasons` says applies as well (same backward)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401 - Triton >= 3.4
    except ImportError:
        return [f"triton {triton.__version__} has no host-side tensor descriptors (TMA); needs triton >= 3.4"]
    reasons = layout_reasons(q, k, v, attn_mask)
    if q.device.type == "cuda" and cuda_device_description(q.device) is not None:  # else layout_reasons said why
        reasons = capability_reasons(q.device, (9, 0), "TMA needs Hopper") + reasons
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not _tma_compatible(t):
            reasons.append(f"{name} is not TMA-compatible (needs unit head-dim stride, 16-byte aligned pointer and strides)")
    return reasons


def _store_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels write outputs in: the input dtype, except bf16 under the
    interpreter, whose fp32 -> bf16 conversion truncates; those get fp32 buffers
    that the launcher rounds with torch."""
    return torch.float32 if dtype == torch.bfloat16 and _INTERPRETED else dtype


def _rows_aligned(t: torch.Tensor) -> bool:
    """The ALIGNED hint's promise: head-dim stride 1, a 16-byte aligned data
    pointer, and every other stride (of a dim longer than 1) a multiple of 8
    elements. Any (B, H, L, D) tensor whose rows are whole heads qualifies,
    since D is a multiple of 8; only unusual views do not."""
    stride, shape = t.stride(), t.shape
    if stride[3] != 1 or _data_ptr(t) % 16 != 0:
        return False
    return (shape[0] == 1 or stride[0] % 8 == 0) and (shape[1] == 1 or stride[1] % 8 == 0) and (shape[2] == 1 or stride[2] % 8 == 0)


def _forward_meta(q: torch.Tensor, attn_mask: Optional[torch.Tensor], tensors: Tuple[torch.Tensor, ...]) -> Dict[str, object]:
    """Constexpr launch arguments shared by every kernel; ``tensors`` are all the
    (B, H, L, D) operands the kernel addresses through _rows/_cols. The forward kernels
    take their head-dim chunks from their config (``SPLIT_D``, :func:`_chunk_heuristics`)."""
    if attn_mask is None:
        kind = MASK_NONE
    elif attn_mask.dtype == torch.bool:
        kind = MASK_BOOL
    else:
        kind = MASK_ADDITIVE
    return {
        "HEAD_DIM": q.shape[-1],
        "MASK_KIND": kind,
        # The query dim of the mask is broadcast (or there is one query): one vector of keys.
        "MASK_KEYS_ONLY": attn_mask is not None and (q.shape[2] == 1 or attn_mask.dim() < 2 or attn_mask.shape[-2] == 1 or attn_mask.stride(-2) == 0),
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "UPCAST": _INTERPRETED,
        "ALIGNED": all(_rows_aligned(t) for t in tensors),
    }


def _common_meta(q: torch.Tensor, attn_mask: Optional[torch.Tensor], tensors: Tuple[torch.Tensor, ...]) -> Dict[str, object]:
    """:func:`_forward_meta` plus the head-dim chunks (:func:`head_dim_chunks`), for the backward kernels."""
    meta = _forward_meta(q, attn_mask, tensors)
    head_dim = meta["HEAD_DIM"]
    d0, d1 = head_dim_chunks(head_dim)
    meta.update(D0=d0, D1=d1, EVEN_D0=d0 <= head_dim, EVEN_D1=d0 + d1 <= head_dim)
    return meta


def _mask_view(attn_mask: Optional[torch.Tensor], q: torch.Tensor, lk: int) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
    """The mask as a (B, H, Lq, Lk) view with stride 0 on broadcast dims (no copy),
    bool reinterpreted as uint8; without a mask, q as a never-read placeholder."""
    if attn_mask is None:
        return q, (0, 0, 0, 0)
    b, h, lq, _ = q.shape
    mask = attn_mask.expand(b, h, lq, lk)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    return mask, tuple(mask.stride())


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. Returns (out, lse): out is (B, H, Lq, D) in q's dtype,
    a view of a (B, Lq, H, D) buffer so that ``out.transpose(1, 2).reshape(B, Lq, H * D)``
    is free; lse is (B, H, Lq) fp32 in log2 units (+inf on fully-masked rows)."""
    _check_index_ranges(q, k, v, attn_mask)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty((b, lq, h, d), dtype=_store_dtype(q.dtype), device=q.device).transpose(1, 2)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    mask, mask_strides = _mask_view(attn_mask, q, lk)

    def grid(meta):
        return (cdiv(lq, meta["BLOCK_M"]), b * h)

    _attn_fwd_tuned[grid](
        q, k, v, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        h, b * h, lq, lk, scale * LOG2E,
        **_forward_meta(q, attn_mask, (q, k, v, out)),
    )
    return out.to(q.dtype), lse


def attention_forward_tma(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor], scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_forward` with q/k/v read through TMA descriptors (Hopper,
    Triton >= 3.4; see :func:`tma_reasons`). Same outputs, same backward."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    _check_index_ranges(q, k, v, attn_mask)
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = torch.empty((b, lq, h, d), dtype=_store_dtype(q.dtype), device=q.device).transpose(1, 2)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    mask, mask_strides = _mask_view(attn_mask, q, lk)
    # Block shapes are placeholders; the autotune pre-hook sets them per config.
    descriptors = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, 16]) for t in (q, q, k, k, v, v)]

    def grid(meta):
        return (cdiv(lq, meta["BLOCK_M"]), b * h)

    _attn_fwd_tma_tuned[grid](
        *descriptors, mask, out, lse,
        *mask_strides, *out.stride(),
        h, b * h, lq, lk, scale * LOG2E,
        **_forward_meta(q, attn_mask, (out,)),
    )
    return out.to(q.dtype), lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the three backward kernels (Delta, dK/dV, dQ). Returns (dq, dk, dv)
    shaped like q, k, v (``torch.empty_like`` layouts)."""
    _check_index_ranges(q, k, v, attn_mask)
    for name, t in (("dout", dout), ("out", out)):
        problems = index_range_problems(t, k, v, None)
        if problems:
            raise ValueError(f"attention (Triton) backward: {name}: " + "; ".join(problems))
    b, h, lq, d = q.shape
    lk = k.shape[2]
    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    store = _store_dtype(q.dtype)
    dq, dk, dv = (torch.empty_like(t, dtype=store) for t in (q, k, v))
    mask, mask_strides = _mask_view(attn_mask, q, lk)
    meta = _common_meta(q, attn_mask, (q, k, v, dout, dq, dk, dv))

    block_m_delta = 16 if _interpret() else 64
    _attn_bwd_delta[(cdiv(lq, block_m_delta), b * h)](
        out, dout, delta, *out.stride(), *dout.stride(), h, lq,
        HEAD_DIM=d, BLOCK_M=block_m_delta, BLOCK_D=next_pow2(d),
    )
    _attn_bwd_dkdv_tuned[lambda m: (cdiv(lk, m["BLOCK_N"]), b * h)](
        q, k, v, mask, dout, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride(), *dk.stride(), *dv.stride(),
        h, lq, lk, scale, scale * LOG2E,
        **meta,
    )
    _attn_bwd_dq_tuned[lambda m: (cdiv(lq, m["BLOCK_M"]), b * h)](
        q, k, v, mask, dout, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *dout.stride(), *dq.stride(),
        h, lq, lk, scale, scale * LOG2E,
        **meta,
    )
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
