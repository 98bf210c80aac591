"""Compile every Triton kernel in ``kernels/`` ahead of time for sm_80 and sm_90, without a GPU.

The Triton interpreter (what the CPU test suite runs) checks arithmetic, not
compilation: layouts, ``tl.dot`` shapes, shared memory, registers and the JIT's
rules are only seen by the real compiler. Triton compiles with no GPU present::

    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=...)

What is compiled is taken from the launchers themselves, not from a copy of
their arguments: each launcher (``attention_forward``, ``group_norm_forward``,
...) is called on CPU tensors of the real Stable Diffusion / SDXL shapes while
its kernels are replaced by recorders, so the pointer dtypes, strides, ints and
constexprs are exactly those a GPU launch would pass. Launch plans that look at
the device are given an H100 (132 SMs, 227 KB shared memory per block) for
sm_90 and an A100 (108 SMs, 163 KB) for sm_80. For an autotuned kernel two
sets of configs are compiled:

* ``reachable``: every config of its GPU autotune list that its pruner can
  yield for the call on that target (the pruner without occupancy pruning, since
  other shapes fill the GPU differently);
* ``sd`` (a subset): the configs the pruner keeps for that SD shape on that card,
  i.e. what the autotuner really benchmarks there.

Matrices (``--matrix``):

* ``reachable`` (the definition of "every config"): a compile is reachable if, for
  some real SD 1.5 / SDXL / VAE shape, dtype (fp16, bf16, fp32) and mask (none,
  bool or additive, key-padding or full) that the launcher can be called with,
  its launch plan or its autotune list after the pruner can yield it. A shape
  matters to a compile only through the constexprs the launcher derives and the
  integer classes the JIT specialises on (``== 1``, divisible by 16), which
  depend on lengths modulo 128; the matrix takes one length per class
  (``REACHABLE_LENGTHS``, ``REACHABLE_LATENT_SIDES``) beside the standard
  SD shapes. What a pruner removes for every call is never benchmarked, so
  never run; the report counts it per kernel. ``--reduce`` merges instances
  that differ only by a reduction in ``REDUCTIONS`` (checked on a sample with
  ``--verify-reductions``).
* ``every`` (what CI compiles, see below): every config of every autotune list
  and launch plan that the pruner (without its occupancy rule) can yield at the
  standard SD / SDXL shapes, with every dtype (fp16, bf16, fp32), mask (none,
  bool or additive, key-padding or full), GroupNorm layout, SiLU and input bias,
  and scheduler-step variant. Deduplicated as follows: every kernel variant
  (constexprs other than block sizes and EVEN_* flags, pointer dtypes) at one
  config, and every config once per kernel, target, head-dim class (padded
  <= 128 or larger), element size and mask class (none, key-padding, full), at
  its costliest variant. What a config needs (compile, shared memory,
  registers) is settled by its tile and those classes.
* ``smoke``: the configs the pruners keep for the standard SD shapes, one
  dtype and mask sample (fast; the test suite).
* ``ci`` / ``full``: older samples of the SD shapes.

Every (kernel, signature, constexprs, config, target) is compiled once (shapes
that specialise alike share one compile), in parallel, and its results are
cached under ``$FASTDIFF_AOT_CACHE`` (default ``~/.cache/fastdiff-aot``) keyed
by the kernel's source (:func:`_source_key`: its text, the ``@triton.jit`` functions
it calls and the constant globals it reads, without line numbers, so an edit
elsewhere in the module recompiles nothing), the Triton version and the instance,
so a rerun compiles only what changed.

``--deadline EPOCH`` / ``--stop-file PATH`` bound a run: once the time has passed or
the file exists, no compile that is not cached yet is started. Those are deferred:
listed (count per kernel) in the output and the report, not checked, and compiled by
a later run, which takes everything this one compiled from the cache. CI runs the
``every`` matrix this way beside the test suite, at the lowest CPU priority, until
the tests end (.ci/run), so each CI run on a machine adds to what the cache covers
and checks all of it; the ``smoke`` matrix is compiled whole on every run.

For each compile it records registers, spill bytes, shared memory, whether the
PTX uses ``wgmma`` and TMA, and whether ptxas serialised the wgmma.

``--check`` fails (exit 1) on:

* any compile error;
* shared memory over the target's per-block limit (every compiled config is
  reachable, so the pruner must keep over-limit configs out);
* register spills in an ``sd`` config, unless the kernel module lists an
  allowance for it (``AOT_SPILL_ALLOWANCES``, next to the configs, with the reason);
* an ``sd`` attention config (forward, TMA forward, dK/dV or dQ backward) on
  sm_90 whose wgmma ptxas serialised, unless the kernel module allows it
  (``AOT_WGMMA_ALLOWANCES``, same form as the spill allowances);
* an fp16/bf16 ``sd`` attention forward config of 64+ rows on sm_90 without wgmma.

``sd`` means: kept by the pruner (occupancy rule included) on that card for at
least one enumerated shape; a launch plan's single config always is.

Usage::

    python -m fastdiff.tools.aot_check [--check] [--json OUT.json] [--report OUT.md] [--archs 80,90] [--jobs N]
        [--matrix reachable|every|smoke|ci|full] [--reduce bf16,intclass] [--families attention,...] [--kernels ...] [--dry-run]
        [--deadline EPOCH] [--stop-file PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Tuple

# The real compiler, never the interpreter; set before triton is imported.
os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton >= 3.3 prints ptxas -v; older versions are re-run below

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

TOOL_VERSION = "1"  # bump when what is recorded changes (invalidates the cache)
ARCHS = (80, 90)
# Per-block shared memory (opt-in maximum) and SM count of the card each target stands for.
SMEM_LIMIT = {80: 166912, 90: 232448}  # A100: 163 KB, H100/H200: 227 KB
NUM_SMS = {80: 108, 90: 132}
CARD = {80: "A100 (sm_80)", 90: "H100/H200 (sm_90)"}

_DTYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
    torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}

# ---------------------------------------------------------------------------
# Capturing the launchers' real arguments
# ---------------------------------------------------------------------------


class _Recorder:
    """Stands in for a kernel (JITFunction or autotuner) in its module: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, calls: List[Tuple[str, tuple, dict]]):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, args, kwargs))


@contextlib.contextmanager
def _recording(module, names: List[str]) -> Iterator[List[Tuple[str, tuple, dict]]]:
    calls: List[Tuple[str, tuple, dict]] = []
    saved = {name: getattr(module, name) for name in names}
    try:
        for name in names:
            setattr(module, name, _Recorder(name, calls))
        yield calls
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


@contextlib.contextmanager
def _patched(module, **values):
    saved = {name: getattr(module, name) for name in values}
    try:
        for name, value in values.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _device_patches(module, arch: int, occupancy: bool = True):
    """Make a kernel module's launch plan see the card of ``arch`` (its device queries
    return None on CPU tensors). ``occupancy=False`` hides the SM count, so that the
    attention pruner drops nothing for filling the GPU (other shapes fill it differently)."""
    name = module.__name__.rsplit(".", 1)[-1]
    if name == "attention":
        return _patched(
            module,
            _sms_for=lambda t: NUM_SMS[arch] if occupancy else None,
            _smem_limit_for=lambda t: SMEM_LIMIT[arch],
        )
    if name == "group_norm":
        return _patched(module, _num_sms=lambda device: NUM_SMS[arch])
    return contextlib.nullcontext()


def _unwrap(obj):
    """(autotuner or None, heuristics values dict, JITFunction) of a kernel object."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    tuner, heuristics = None, {}
    while True:
        if isinstance(obj, Autotuner):
            tuner = obj
        elif isinstance(obj, Heuristics):
            heuristics.update(obj.values)
        else:
            return tuner, heuristics, obj
        obj = obj.fn


def _spec(value) -> Tuple:
    """How Triton's JIT specialises one runtime argument."""
    if isinstance(value, torch.Tensor):
        return ("ptr", _DTYPES[value.dtype], value.data_ptr() % 16 == 0)
    if type(value).__name__ == "TensorDescriptor":
        return ("desc", _DTYPES[value.base.dtype], tuple(value.block_shape))
    if isinstance(value, bool):
        return ("i1",)
    if isinstance(value, int):
        kind = "i32" if -(2**31) <= value < 2**31 else "i64"
        return ("int", kind, "one" if value == 1 else ("d16" if value % 16 == 0 else "any"))
    if isinstance(value, float):
        return ("fp32",)
    raise TypeError(f"aot_check: cannot specialise an argument of type {type(value).__name__}")


# What the pruners removed, per (module, kernel, arch): the configs of the autotune list, those
# some enumerated call can yield (pruner without occupancy), those kept for a call's shape on its
# card, and how many (variant, config) pairs were pruned. Filled by enumerate_instances.
PRUNING: Dict[Tuple[str, str, int], Dict[str, Any]] = {}


def _config_label(config) -> str:
    tile = "x".join(str(v) for v in config.kwargs.values())
    return f"{tile} w{config.num_warps} s{config.num_stages}"


def _note_pruning(module, kernel: str, arch: int, listed, reachable, kept, args) -> None:
    entry = PRUNING.setdefault(
        (module.__name__.rsplit(".", 1)[-1], kernel, arch),
        {"listed": [], "reachable": set(), "kept": set(), "pairs": set(), "pruned_pairs": set()},
    )
    entry["listed"] = [_config_label(c) for c in listed]
    entry["reachable"].update(_config_label(c) for c in reachable)
    entry["kept"].update(_config_label(c) for c in kept)
    variant = tuple(sorted((k, str(v)) for k, v in args.items()))
    reachable_labels = {_config_label(c) for c in reachable}
    for c in listed:
        pair = (variant, _config_label(c))
        entry["pairs"].add(pair)
        if pair[1] not in reachable_labels:
            entry["pruned_pairs"].add(pair)


def _instances_of_call(module, name: str, args: tuple, kwargs: dict, arch: int, case: str, matrix: str) -> List[Dict[str, Any]]:
    """The compile instances one recorded launch yields on ``arch``."""
    obj = getattr(module, name)
    tuner, heuristics, jit = _unwrap(obj)
    if jit.__name__ == "_attn_fwd_tma" and arch < 90:
        return []  # TMA is Hopper-only (tma_reasons refuses other cards)
    kwargs = dict(kwargs)
    launch = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    named = dict(zip(jit.arg_names, args))
    if tuner is None:
        configs = [(None, launch.get("num_warps", 4), launch.get("num_stages"), True)]
    else:
        pruner = tuner.early_config_prune or (lambda configs, nargs, **kw: configs)
        with _device_patches(module, arch, occupancy=False):
            reachable = pruner(tuner.configs, named, **kwargs)
        with _device_patches(module, arch):
            kept = pruner(tuner.configs, named, **kwargs)
        kept_ids = {id(c) for c in kept}
        configs = [(c, c.num_warps, c.num_stages, id(c) in kept_ids) for c in reachable]
        constexprs = {p.name for p in jit.params if p.is_constexpr}
        _note_pruning(module, jit.__name__, arch, tuner.configs, reachable, kept, {k: v for k, v in {**named, **kwargs}.items() if k in constexprs})
        if matrix not in ("full", "reachable", "every"):
            configs = [entry for entry in configs if entry[3]]
    out = []
    for config, warps, stages, sd in configs:
        values = {**named, **kwargs, **(config.kwargs if config is not None else {})}
        for key, heuristic in heuristics.items():
            values[key] = heuristic(values)
        if config is not None and config.pre_hook is not None:
            config.pre_hook(values)  # e.g. the TMA descriptors' block shapes
        args_spec = []
        for param in jit.params:
            value = values[param.name]
            args_spec.append((param.name, ("constexpr", value) if param.is_constexpr else _spec(value)))
        out.append({
            "module": module.__name__.rsplit(".", 1)[-1],
            "kernel": jit.__name__,
            "case": case,
            "arch": arch,
            "num_warps": warps,
            "num_stages": stages,
            "config": dict(config.kwargs) if config is not None else {},
            "args": args_spec,
            "sd": sd,
        })
    return out


# ---------------------------------------------------------------------------
# The matrix: the launchers on SD / SDXL shapes
# ---------------------------------------------------------------------------

# (B, H, Lq, Lk, D): SD 1.5 (D = 40, 80, 160 at 64x64 latents), SDXL (D = 64), self- and cross-attention (Lk = 77).
SD_ATTENTION_SHAPES = [
    (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40),
    (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
    (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (2, 8, 64, 64, 160), (2, 8, 64, 77, 160),
    (2, 10, 4096, 4096, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 1024, 64), (2, 20, 1024, 77, 64),
]
ATTENTION_MASKS = ("none", "bool-keys", "bool-full", "additive-keys", "additive-full")
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The `reachable` matrix. A compile depends on a shape only through how the JIT specialises
# it: the constexprs the launcher derives (EVEN_M = Lq % BLOCK_M == 0 and the like, block
# sizes <= 128) and each integer argument's class (== 1, divisible by 16, other). All of
# these are functions of the lengths modulo 128, so one length per residue class that a real
# shape can have covers every length: SD/SDXL token counts are h * w of a latent level, and
# a pipeline accepts any multiple of 8 pixels, so every class occurs (e.g. 16 x 20 = 320 at
# 512 x 640 px). Lengths are >= 16 at every real level, so never the `== 1` class.
REACHABLE_LENGTHS = (256, 320, 288, 272, 289)  # = 0, 64, 32, 16 (mod 128) and odd
# (D, H) of the UNets' attention: SD 1.5 (8 heads of 40/80/160), SDXL (10 or 20 heads of 64;
# 10 and 20 give the same integer classes). The VAE's single 512-wide head is above the
# kernels' MAX_HEAD_DIM and runs on SDPA, so it never reaches a Triton kernel.
REACHABLE_HEADS = ((40, 8), (80, 8), (160, 8), (64, 10))
# Batch (after CFG doubling) 1 and 8: B * H is then not / is divisible by 16 for every H above.
REACHABLE_BATCHES = (1, 8)


def _attention_cases(matrix: str) -> List[Tuple[int, int, int, int, int, torch.dtype, str]]:
    """(B, H, Lq, Lk, D, dtype, mask) launches enumerated for ``matrix``."""
    cases = [(b, h, lq, lk, d, dtype, mask) for b, h, lq, lk, d in SD_ATTENTION_SHAPES for dtype, mask in _attention_variants(matrix)]
    if matrix == "reachable":
        cases += [
            (b, h, lq, lk, d, dtype, mask)
            for d, h in REACHABLE_HEADS for lq in REACHABLE_LENGTHS for lk in (lq, 77) for b in REACHABLE_BATCHES
            for dtype in ATTENTION_DTYPES for mask in ATTENTION_MASKS
        ]
    return cases


def _attention_variants(matrix: str) -> List[Tuple[torch.dtype, str]]:
    """(dtype, mask) pairs compiled at the SD shapes. ``reachable`` takes every pair;
    ``full`` the old sample (bf16/fp32 only without a mask and with the costliest one)."""
    if matrix == "smoke":
        return [(torch.float16, "none"), (torch.float16, "bool-full"), (torch.float32, "none")]
    if matrix == "ci":
        return [(torch.float16, m) for m in ("none", "bool-keys", "bool-full")] + [(torch.bfloat16, "none"), (torch.float32, "none")]
    if matrix in ("reachable", "sd", "every"):
        return [(dt, m) for dt in ATTENTION_DTYPES for m in ATTENTION_MASKS]
    heavy = ("none", "bool-full")
    return [(torch.float16, m) for m in ATTENTION_MASKS] + [(dt, m) for dt in (torch.bfloat16, torch.float32) for m in heavy]


def _attention_calls(matrix: str, archs) -> Iterator[Tuple[str, Any, List[str]]]:
    """(case, thunk, kernel names): thunk() runs one launcher on CPU tensors."""
    from fastdiff.kernels import attention as kernels

    for b, h, lq, lk, d, dtype, mask_kind in _attention_cases(matrix):
        def tensors(b=b, h=h, lq=lq, lk=lk, d=d, dtype=dtype, mask_kind=mask_kind):
            # diffusers' layout: (B, L, H * D) projections viewed as (B, H, L, D).
            q = torch.empty(b, lq, h * d, dtype=dtype).view(b, lq, h, d).transpose(1, 2)
            k = torch.empty(b, lk, h * d, dtype=dtype).view(b, lk, h, d).transpose(1, 2)
            v = torch.empty(b, lk, h * d, dtype=dtype).view(b, lk, h, d).transpose(1, 2)
            mask = None
            if mask_kind != "none":
                mdtype = torch.bool if mask_kind.startswith("bool") else dtype
                mask = torch.empty((b, 1, 1, lk) if mask_kind.endswith("keys") else (b, 1, lq, lk), dtype=mdtype)
            return q, k, v, mask

        case = f"D={d} {_DTYPES[dtype]} mask={mask_kind} B={b} Lq={lq} Lk={lk}"
        yield case, lambda t=tensors: kernels.attention_forward(*t(), 0.125), ["_attn_fwd_tuned"]
        if not kernels.tma_reasons(*tensors()) and max(archs) >= 90:
            yield case, lambda t=tensors: kernels.attention_forward_tma(*t(), 0.125), ["_attn_fwd_tma_tuned"]

        def backward(t=tensors):
            q, k, v, mask = t()
            out = torch.empty_like(q)
            lse = torch.empty(q.shape[:3], dtype=torch.float32)
            kernels.attention_backward(torch.empty_like(out), q, k, v, mask, out, lse, 0.125)

        yield case, backward, ["_attn_bwd_delta", "_attn_bwd_dkdv_tuned", "_attn_bwd_dq_tuned"]


# GroupNorm: (N, C, H, W, groups), every ResNet GroupNorm of the SD 1.5 / SDXL UNet and VAE decoder at 64x64 latents.
SD_GROUP_NORM_SHAPES = [
    (2, 320, 64, 64, 32), (2, 640, 32, 32, 32), (2, 1280, 16, 16, 32), (2, 1280, 8, 8, 32),
    (2, 960, 64, 64, 32), (2, 1920, 32, 32, 32), (2, 2560, 16, 16, 32),
    (1, 512, 64, 64, 32), (1, 512, 128, 128, 32), (1, 256, 256, 256, 32), (1, 128, 512, 512, 32),
]
# GEGLU: (rows, D): the feed-forward widths of SD 1.5 (4 * 320/640/1280) and SDXL, self-attention token counts.
SD_GEGLU_SHAPES = [(2 * 4096, 1280), (2 * 1024, 2560), (2 * 256, 5120), (2 * 64, 5120), (2 * 1024, 5120)]
# The channel counts of every GroupNorm (32 groups) per resolution level, counted in halvings of
# the latent side: SD 1.5 / SDXL UNet levels 0-3 (the up blocks' concatenations included), and
# the VAE encoder/decoder at 8x, 4x, 2x and 1x the latent side (levels -3..0).
UNET_GROUP_NORM_CHANNELS = {0: (320, 640, 960), 1: (320, 640, 960, 1280, 1920), 2: (640, 1280, 1920, 2560), 3: (1280, 2560)}
VAE_GROUP_NORM_CHANNELS = {-3: (128, 256), -2: (256, 512), -1: (512,), 0: (512,)}
# Latent sides: 32-192 (256-1536 px) in steps of 8 latents (64 px), and sides that are odd or
# 2 (mod 4) at some level. The launch plan reads the shape through powers of two, splits and
# integer classes; the dedup below shows how few distinct compiles they produce.
REACHABLE_LATENT_SIDES = tuple(range(32, 193, 8)) + (33, 45, 65, 90, 97, 129, 150)
# Batches 1 (VAE, one image), 2 (CFG) and 8 (4 prompts with CFG): the split plan depends on N.
REACHABLE_GROUP_NORM_BATCHES = (1, 2, 8)


def _level_side(side: int, level: int) -> int:
    """The spatial side at a UNet level (stride-2 convolutions round up) or a VAE level (x 2**-level)."""
    for _ in range(max(level, 0)):
        side = -(-side // 2)
    return side * 2 ** max(-level, 0)


def _group_norm_shapes(matrix: str) -> List[Tuple[int, int, int, int, int]]:
    if matrix != "reachable":
        return list(SD_GROUP_NORM_SHAPES)
    shapes = set(SD_GROUP_NORM_SHAPES)
    for side in REACHABLE_LATENT_SIDES:
        for n in REACHABLE_GROUP_NORM_BATCHES:
            for level, channels in UNET_GROUP_NORM_CHANNELS.items():
                hw = _level_side(side, level)
                shapes.update((n, c, hw, hw, 32) for c in channels)
            if n <= 2:
                for level, channels in VAE_GROUP_NORM_CHANNELS.items():
                    hw = _level_side(side, level)
                    shapes.update((n, c, hw, hw, 32) for c in channels)
    return sorted(shapes)


def _group_norm_calls(matrix: str, archs) -> Iterator[Tuple[str, Any, List[str]]]:
    from fastdiff.kernels import group_norm as kernels

    names = ["_single_pass_kernel", "_stats_kernel", "_combine_kernel", "_apply_kernel", "_bwd_reduce_kernel", "_bwd_combine_kernel", "_bwd_dx_kernel"]
    if matrix in ("reachable", "sd", "every"):
        dtypes = (torch.float16, torch.bfloat16, torch.float32)
    else:
        dtypes = (torch.float16, torch.float32) if matrix != "smoke" else (torch.float16,)
    import inspect

    # input_bias (the ResnetBlock's time-embedding add, (N, C)) where the launcher takes it.
    biases = (False, True) if "input_bias" in inspect.signature(kernels.group_norm_forward).parameters else (False,)
    for n, c, hh, ww, groups in _group_norm_shapes(matrix):
        for dtype, has_ib in ((dtype, has_ib) for dtype in dtypes for has_ib in biases):
            for layout in ("NCHW", "NHWC"):
                for silu in (False, True):
                    def tensors(n=n, c=c, hh=hh, ww=ww, dtype=dtype, layout=layout):
                        # Never touched: torch.empty of a VAE-sized tensor only reserves address space.
                        fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
                        x = torch.empty(n, c, hh, ww, dtype=dtype, memory_format=fmt)
                        return x, torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)

                    def run(t=tensors, groups=groups, silu=silu, has_ib=has_ib):
                        x, w, bias = t()
                        extra = {"input_bias": torch.empty(x.shape[:2], dtype=x.dtype)} if has_ib else {}
                        y, mean, rstd = kernels.group_norm_forward(x, w, bias, groups, 1e-5, silu, **extra)
                        kernels.group_norm_backward(torch.empty_like(x), x, w, bias, mean, rstd, groups, silu, **extra)

                    case = f"{n}x{c}x{hh}x{ww} G={groups} {_DTYPES[dtype]} {layout}{' silu' if silu else ''}{' input_bias' if has_ib else ''}"
                    yield case, run, names

    # A config forced with neither merge flag runs the separate _combine_kernel (3 launches). Only
    # group_norm_forward(config=...) reaches it (bench_group_norm.py --sweep), so one SD shape covers it.
    import dataclasses

    for layout in ("NCHW", "NHWC"):
        def forced(layout=layout):
            fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
            x = torch.empty(2, 320, 64, 64, dtype=torch.float16, memory_format=fmt)
            w, bias = torch.empty(320, dtype=x.dtype), torch.empty(320, dtype=x.dtype)
            config = kernels.launch_config(2, 320, 64 * 64, 32, layout == "NHWC", 132, allow_single_pass=False)
            config = dataclasses.replace(config, fused_combine=False, last_program_combine=False)
            kernels.group_norm_forward(x, w, bias, 32, 1e-5, True, config=config)

        yield f"2x320x64x64 G=32 fp16 {layout} silu, forced 3-launch config", forced, names


def _geglu_shapes(matrix: str) -> List[Tuple[int, int]]:
    if matrix != "reachable":
        return list(SD_GEGLU_SHAPES)
    # rows = B * L over the batches and token-count classes above; D = 4 * channels / 2 halves.
    rows = {b * lq for b in (1, 2, 8) for lq in REACHABLE_LENGTHS + (4096, 1024, 64, 16)}
    return sorted(set(SD_GEGLU_SHAPES) | {(r, d) for r in rows for d in (1280, 2560, 5120)})


def _geglu_calls(matrix: str, archs) -> Iterator[Tuple[str, Any, List[str]]]:
    from fastdiff.kernels import geglu as kernels

    for rows, d in _geglu_shapes(matrix):
        for dtype in ATTENTION_DTYPES:
            def run(rows=rows, d=d, dtype=dtype):
                x = torch.empty(rows, 2 * d, dtype=dtype)
                kernels.geglu_forward(x)
                kernels.geglu_backward(torch.empty(rows, d, dtype=dtype), x)

            yield f"rows={rows} D={d} {_DTYPES[dtype]}", run, ["_geglu_fwd_kernel", "_geglu_bwd_kernel"]


def _scheduler_step_calls(matrix: str, archs) -> Iterator[Tuple[str, Any, List[str]]]:
    """The fused step's variants as the schedulers use them: guidance (none, float, tensor),
    noise (none, one tensor, a per-step bank), history rings of 0-3 slots, the step index advanced."""
    from fastdiff.kernels import scheduler_step as kernels

    shapes = [(2, 4, 64, 64)]  # SD latents (SDXL: 128x128, same specialisation)
    if matrix == "reachable":
        # Latents of every side above and batch 1, 2 (CFG-less and with CFG the sample is (B, 4, h, w)) and 8.
        shapes = sorted({(b, 4, side, side) for b in (1, 2, 8) for side in REACHABLE_LATENT_SIDES} | set(shapes))
    full = matrix != "smoke"
    dtypes = ATTENTION_DTYPES if matrix in ("reachable", "sd", "every") else (torch.float16, torch.float32) if full else (torch.float16,)
    for shape, dtype in ((shape, dtype) for shape in shapes for dtype in dtypes):
        for guidance in ("none", "float", "tensor") if full else ("float",):
            for noise in ("none", "tensor", "bank") if full else ("none", "bank"):
                for history in (0, 1, 2, 3) if full else (0, 3):
                    def run(shape=shape, dtype=dtype, guidance=guidance, noise=noise, history=history):
                        sample = torch.empty(shape, dtype=dtype)
                        model_output = torch.empty((2 * shape[0] if guidance != "none" else shape[0], *shape[1:]), dtype=dtype)
                        noise_t = {"none": None, "tensor": torch.empty(shape, dtype=dtype), "bank": torch.empty((50, *shape), dtype=dtype)}[noise]
                        hist = torch.empty((history, *shape), dtype=dtype) if history else None
                        kernels.scheduler_step_forward(
                            sample, model_output, torch.empty(50, 8), torch.zeros((), dtype=torch.int64), torch.empty_like(sample),
                            noise_t, hist, 7.5 if guidance == "float" else None,
                            torch.full((), 7.5) if guidance == "tensor" else None, guidance != "none", True,
                        )

                    case = f"{'x'.join(map(str, shape))} {_DTYPES[dtype]} guidance={guidance} noise={noise} history={history}"
                    yield case, run, ["_scheduler_step_kernel"]


FAMILIES = {
    "attention": _attention_calls,
    "group_norm": _group_norm_calls,
    "geglu": _geglu_calls,
    "scheduler_step": _scheduler_step_calls,
}


def enumerate_instances(archs=ARCHS, matrix: str = "ci", families=tuple(FAMILIES)) -> List[Dict[str, Any]]:
    """Every compile instance, deduplicated: one entry per distinct compile, listing every case that needs it."""
    import importlib

    by_key: Dict[str, Dict[str, Any]] = {}
    for family in families:
        module = importlib.import_module(f"fastdiff.kernels.{family}")
        for case, thunk, names in FAMILIES[family](matrix, archs):
            for arch in archs:
                with _device_patches(module, arch), _recording(module, names) as calls:
                    thunk()
                for name, args, kwargs in calls:
                    for inst in _instances_of_call(module, name, args, kwargs, arch, case, matrix):
                        key = _instance_key(inst)
                        if key in by_key:
                            by_key[key]["cases"].append(case)
                            by_key[key]["sd"] = by_key[key]["sd"] or inst["sd"]
                        else:
                            inst["cases"] = [inst.pop("case")]
                            inst["key"] = key
                            by_key[key] = inst
    return list(by_key.values())


def _consts(inst) -> Dict[str, Any]:
    return {n: s[1] for n, s in inst["args"] if s[0] == "constexpr"}


def select(instances, matrix: str) -> List[Dict[str, Any]]:
    """Deduplicate the matrix to what a cold run can afford (``full`` keeps everything).

    * every kernel variant (pointer dtypes and constexprs other than block sizes and
      EVEN_* flags) at one config, preferring one the pruner keeps for SD shapes;
    * ``ci`` adds every config (tile, warps, stages) once per kernel, head-dim class
      (padded <= 128 or larger) and element size, at the costliest variant (full
      bool mask for attention), which settles compile, shared memory and registers
      for every config the autotune lists can yield.
    """
    if matrix in ("full", "reachable", "sd"):
        return instances

    def variant(i):
        return (i["kernel"], i["arch"], re.sub(r" EVEN_\w+=\w+", "", _variant(i)))

    def config_group(i):
        c = _consts(i)
        wide = sum(x for k, x in c.items() if k in ("D0", "D1")) > 128
        elem = "fp32" if "fp32" in _variant(i).split(" ")[0] else "16-bit"
        return (i["kernel"], i["arch"], _label(i), wide, elem)

    def mask_class(i):
        c = _consts(i)
        return "none" if not c.get("MASK_KIND", 0) else "keys" if c.get("MASK_KEYS_ONLY", False) else "full"

    def cost(i):
        c = _consts(i)
        # Kept for SD first, then 64+-row tiles (the ones that run wgmma on sm_90), then the costliest variant.
        big = i["config"].get("BLOCK_M", 64) >= 64
        return (not i["sd"], not big, -(c.get("MASK_KIND", 0) == 1 and not c.get("MASK_KEYS_ONLY", False)), -int(c.get("SILU", 0)))

    chosen: Dict[Any, Dict[str, Any]] = {}
    for i in sorted(instances, key=cost):
        chosen.setdefault(("v",) + variant(i), i)
        if matrix == "ci":
            chosen.setdefault(("c",) + config_group(i), i)
        if matrix == "every":
            chosen.setdefault(("c",) + config_group(i) + (mask_class(i),), i)
    unique = {i["key"]: i for i in chosen.values()}
    return [i for i in instances if i["key"] in unique]


# Reductions of the reachable matrix: each maps an instance to a coarser key; instances sharing a
# coarse key are compiled once (one representative), which is sound only if the members compile
# to the same figures. `--verify-reductions N` compiles every member of N sampled groups and
# compares, so a claim of equivalence is always a measured one.
#  * bf16: bf16 pointers read as fp16 (same tiles and dots; only conversions differ);
#  * intclass: integer arguments' divisibility-by-16 class ignored (the `== 1` class and every
#    constexpr, EVEN_* flags included, are kept).
REDUCTIONS = ("bf16", "intclass")
PROFILE = ("registers", "spill_stores", "spill_loads", "shared", "wgmma", "wgmma_serialized", "tma")


def _reduced_key(inst, reductions) -> str:
    args = []
    for name, spec in inst["args"]:
        spec = list(spec)
        if "bf16" in reductions and spec[0] in ("ptr", "desc") and spec[1] == "bf16":
            spec[1] = "fp16"
        if "intclass" in reductions and spec[0] == "int" and spec[2] != "one":
            spec[2] = "int"
        args.append((name, [str(x) for x in spec]))
    payload = json.dumps([inst["module"], inst["kernel"], inst["arch"], inst["num_warps"], inst["num_stages"], args], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _representative_rank(inst) -> Tuple:
    """Which member of a group is compiled: fp16 over bf16, then the fewest integer hints."""
    specs = [s for _, s in inst["args"]]
    return (any(s[0] in ("ptr", "desc") and s[1] == "bf16" for s in specs), sum(s[0] == "int" and s[2] == "d16" for s in specs), inst["key"])


def reduction_groups(instances, reductions) -> Dict[str, List[Dict[str, Any]]]:
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for inst in instances:
        groups.setdefault(_reduced_key(inst, reductions), []).append(inst)
    return groups


def reduce_matrix(instances, reductions) -> List[Dict[str, Any]]:
    """One representative per reduction group; it inherits the group's cases and `sd` flag."""
    if not reductions:
        return instances
    out = []
    for members in reduction_groups(instances, reductions).values():
        members.sort(key=_representative_rank)
        rep = dict(members[0])
        rep["cases"] = [c for m in members for c in m["cases"]]
        rep["sd"] = any(m["sd"] for m in members)
        rep["represents"] = len(members)
        out.append(rep)
    return out


def verify_reductions(instances, reductions, samples: int, jobs: int) -> List[str]:
    """Compile every member of ``samples`` random multi-member groups per reduction (seeded)
    and compare their figures; returns one line per reduction, and one per mismatch."""
    import random

    lines = []
    for reduction in reductions:
        groups = [g for g in reduction_groups(instances, (reduction,)).values() if len(g) > 1]
        rng = random.Random(0)
        picked = rng.sample(groups, min(samples, len(groups)))
        members = [m for g in picked for m in g]
        run_all(members, jobs)
        mismatched = []
        for group in picked:
            profiles = {json.dumps([m["result"].get(k) for k in PROFILE]) for m in group}
            if len(profiles) > 1 or not all(m["result"]["ok"] for m in group):
                mismatched.append(group)
        lines.append(
            f"reduction {reduction}: {len(groups)} groups with more than one member; {len(picked)} sampled "
            f"({len(members)} compiles), {len(picked) - len(mismatched)} identical in {', '.join(PROFILE)}"
        )
        for group in mismatched:
            figures = "; ".join(f"{_variant(m)} -> " + ", ".join(f"{k}={m['result'].get(k)}" for k in PROFILE[:4]) for m in group)
            lines.append(f"  differs: {group[0]['kernel']} sm_{group[0]['arch']} {_label(group[0])} ({group[0]['cases'][0]}): {figures}")
    return lines


def _jit(inst):
    import importlib

    module = importlib.import_module(f"{inst.get('package', 'fastdiff.kernels')}.{inst['module']}")
    for obj in vars(module).values():
        if getattr(obj, "__name__", None) == inst["kernel"] and hasattr(obj, "arg_names"):
            return obj
    raise LookupError(inst["kernel"])


def _source_key(fn, seen=None) -> str:
    """What a compile depends on in the source, without line numbers: the @triton.jit function's
    text, the keys of the @triton.jit functions it names (directly or as ``module.name``), and the
    values of the constant globals it names. Triton's own ``JITFunction.cache_key`` also hashes the
    function's starting line, so editing a launcher or pruner above a kernel would recompile every
    one of its instances; this key only changes when something the kernel compiles from does."""
    from triton.runtime.jit import JITFunction

    seen = set() if seen is None else seen
    if id(fn) in seen:
        return "recursion:" + fn.__name__
    seen.add(id(fn))
    digest = hashlib.sha256(fn.src.encode())
    scope = fn.fn.__globals__
    names = set(re.findall(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?", fn.src))
    for name in sorted(names):
        head, _, attr = name.partition(".")
        value = scope.get(head)
        if attr and getattr(value, "__name__", "").startswith(("fastdiff.kernels", "kernels")):
            value = getattr(value, attr, None)  # a helper reached as module.name
        elif attr:
            value = None
        if isinstance(value, JITFunction):
            digest.update(f"{name}:{_source_key(value, seen)}".encode())
        elif isinstance(value, (bool, int, float, str, tl.constexpr)):
            digest.update(f"{name}={value!r}".encode())
    return digest.hexdigest()


def _instance_key(inst) -> str:
    payload = json.dumps(
        [TOOL_VERSION, triton.__version__, inst["module"], inst["kernel"], inst["arch"], inst["num_warps"], inst["num_stages"],
         [(n, [str(x) for x in s]) for n, s in inst["args"]], _source_key(_jit(inst))],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------
# Compiling one instance
# ---------------------------------------------------------------------------


def _new_api() -> bool:
    import inspect

    from triton.compiler import ASTSource

    return "constexprs" in inspect.signature(ASTSource.__init__).parameters


def _type_of(spec) -> str:
    if spec[0] == "ptr":
        return "*" + spec[1]
    if spec[0] == "desc":
        return f"tensordesc<{spec[1]}[{', '.join(map(str, spec[2]))}]>"
    if spec[0] == "int":
        return spec[1]
    return spec[0]


def _source(inst):
    from triton.compiler import ASTSource

    fn = _jit(inst)
    if _new_api():
        signature, constexprs, attrs = {}, {}, {}
        for i, (name, spec) in enumerate(inst["args"]):
            if spec[0] == "constexpr" or (spec[0] == "int" and spec[2] == "one"):
                signature[name] = "constexpr"
                constexprs[name] = spec[1] if spec[0] == "constexpr" else 1
            else:
                signature[name] = _type_of(spec)
                if (spec[0] == "ptr" and spec[2]) or (spec[0] == "int" and spec[2] == "d16"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    # Triton 3.0-3.1: index-keyed attributes, integers equal to 1 folded as constants.
    from triton.compiler.compiler import AttrsDescriptor

    signature, constants, div16, ones = {}, {}, [], []
    for i, (name, spec) in enumerate(inst["args"]):
        if spec[0] == "constexpr":
            constants[name] = spec[1]
            continue
        signature[name] = _type_of(spec)
        if spec[0] == "int" and spec[2] == "one":
            constants[name] = 1
            ones.append(i)
        elif (spec[0] == "ptr" and spec[2]) or (spec[0] == "int" and spec[2] == "d16"):
            div16.append(i)
    return ASTSource(fn, signature, constants, AttrsDescriptor(divisible_by_16=tuple(div16), equal_to_1=tuple(ones)))


def _ptxas_log(compiled, captured: str, arch: int) -> str:
    if "Used" in captured and "registers" in captured:
        return captured
    # Triton < 3.3 keeps no ptxas log: run its own ptxas -v on the PTX again.
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    ptxas = nvidia if os.path.exists(nvidia) else shutil.which("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        result = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
        return result.stdout + result.stderr


def compile_instance(inst) -> Dict[str, Any]:
    """Compile one instance; returns its measurements (or its error)."""
    from triton.backends.compiler import GPUTarget

    options = {"num_warps": inst["num_warps"]}
    if inst["num_stages"] is not None:
        options["num_stages"] = inst["num_stages"]
    start = time.time()
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            compiled = triton.compile(_source(inst), target=GPUTarget("cuda", inst["arch"], 32), options=options)
    except Exception as exc:  # noqa: BLE001 - every compile error is a finding, reported with its message
        message = f"{type(exc).__name__}: {exc}"
        return {"ok": False, "error": message[-2000:], "seconds": round(time.time() - start, 2)}
    log = _ptxas_log(compiled, buffer.getvalue(), inst["arch"])
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    stores = [int(x) for x in re.findall(r"(\d+) bytes spill stores", log)]
    loads = [int(x) for x in re.findall(r"(\d+) bytes spill loads", log)]
    ptx = compiled.asm["ptx"]
    return {
        "ok": True,
        "registers": max(regs) if regs else None,
        "spill_stores": sum(stores),
        "spill_loads": sum(loads),
        "shared": int(compiled.metadata.shared),
        "wgmma": "wgmma.mma_async" in ptx,
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in log,
        "tma": "cp.async.bulk.tensor" in ptx,
        "seconds": round(time.time() - start, 2),
    }


def _cache_dir() -> str:
    return os.environ.get("FASTDIFF_AOT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fastdiff-aot")


def _cache_path(inst) -> str:
    return os.path.join(_cache_dir(), triton.__version__, inst["key"] + ".json")


def _compile_cached(inst) -> Dict[str, Any]:
    path = _cache_path(inst)
    if os.path.exists(path):
        with open(path) as f:
            return dict(json.load(f), cached=True)
    result = compile_instance(inst)
    if result["ok"] or "OutOfResources" in result.get("error", ""):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f)
        os.replace(tmp, path)
    return dict(result, cached=False)


# Set by main before the pool forks: with a deadline or a stop file, an instance that is not
# cached yet is deferred (its result stays None) once the deadline has passed or the file exists.
_DEFER = {"deadline": None, "stop_file": None}


def _should_defer() -> bool:
    deadline, stop_file = _DEFER["deadline"], _DEFER["stop_file"]
    return (deadline is not None and time.time() > deadline) or (stop_file is not None and os.path.exists(stop_file))


def _compile_or_defer(inst) -> Optional[Dict[str, Any]]:
    if _should_defer() and not os.path.exists(_cache_path(inst)):
        return None
    return _compile_cached(inst)


def run_all(instances, jobs: int) -> None:
    """Compile every instance (cached), adding its results under ``result`` (None: deferred, see _DEFER)."""
    triton_cache = tempfile.mkdtemp(prefix="fastdiff-aot-triton-")
    os.environ["TRITON_CACHE_DIR"] = triton_cache  # a fresh Triton cache, so ptxas runs and its log is seen
    try:
        import multiprocessing

        # Most expensive first (attention), so the pool's tail is short.
        order = sorted(range(len(instances)), key=lambda i: instances[i]["module"] != "attention")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for i, result in zip(order, pool.map(_compile_or_defer, [instances[i] for i in order], chunksize=1)):
                instances[i]["result"] = result
    finally:
        shutil.rmtree(triton_cache, ignore_errors=True)


# ---------------------------------------------------------------------------
# Checks and report
# ---------------------------------------------------------------------------


def _label(inst) -> str:
    c = inst["config"]
    tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N") if k in c)
    consts = {n: s[1] for n, s in inst["args"] if s[0] == "constexpr"}
    if not tile:
        tile = "x".join(str(v) for k, v in consts.items() if k.startswith("BLOCK"))
    stages = f" s{inst['num_stages']}" if inst["num_stages"] is not None else ""
    return f"{tile} w{inst['num_warps']}{stages}"


def _variant(inst) -> str:
    """The constexprs that tell instances of one kernel apart (block sizes excluded)."""
    consts = {n: s[1] for n, s in inst["args"] if s[0] == "constexpr" and not n.startswith("BLOCK") and n not in ("UPCAST",)}
    ptrs = sorted({s[1] for n, s in inst["args"] if s[0] in ("ptr", "desc")} - {"fp32", "u8", "i64", "i1"}) or ["fp32"]
    return "/".join(ptrs) + " " + " ".join(f"{k}={v}" for k, v in consts.items())


def _allowance(inst, table: str = "AOT_SPILL_ALLOWANCES") -> Optional[str]:
    """The reason a kernel module gives (next to its configs) for allowing this instance's
    spills (``AOT_SPILL_ALLOWANCES``) or serialised wgmma (``AOT_WGMMA_ALLOWANCES``); None if none."""
    import importlib

    module = importlib.import_module(f"{inst.get('package', 'fastdiff.kernels')}.{inst['module']}")
    for (kernel, pattern), reason in getattr(module, table, {}).items():
        if kernel == inst["kernel"] and re.search(pattern, f"sm_{inst['arch']} {_variant(inst)} {_label(inst)}"):
            return reason
    return None


# Kernels whose sm_90 code must not have its wgmma serialised by ptxas (a serialised wgmma waits
# for each MMA before issuing the next, losing Hopper's asynchronous tensor-core pipeline).
WGMMA_KERNELS = ("_attn_fwd", "_attn_fwd_tma", "_attn_bwd_dkdv", "_attn_bwd_dq")


def violations(instances, compile_only: bool = False) -> List[str]:
    """What --check fails on; ``compile_only``: compile errors and shared memory only
    (the older Triton versions, whose register allocation is not what runs on the GPU image)."""
    found = []
    for inst in instances:
        r = inst["result"]
        where = f"{inst['module']}.{inst['kernel']} sm_{inst['arch']} {_label(inst)} [{_variant(inst)}] ({inst['cases'][0]})"
        if not r["ok"]:
            found.append(f"compile error: {where}: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        if r["shared"] > SMEM_LIMIT[inst["arch"]]:
            found.append(f"shared memory {r['shared']} B > {SMEM_LIMIT[inst['arch']]} B: {where}")
        if compile_only:
            continue
        figures = f"{r['registers']} registers, spills {r['spill_stores']}/{r['spill_loads']} B, {r['shared']} B shared"
        if inst["sd"] and r["spill_stores"] > 0 and _allowance(inst) is None:
            found.append(f"spills {r['spill_stores']} B in a config the pruner or launch plan keeps for SD shapes: {where}: {figures}")
        if inst["sd"] and inst["arch"] >= 90 and inst["kernel"] in WGMMA_KERNELS:
            if r["wgmma_serialized"] and _allowance(inst, "AOT_WGMMA_ALLOWANCES") is None:
                found.append(f"wgmma serialised by ptxas in a config the pruner keeps for SD shapes: {where}: {figures}")
        if inst["sd"] and inst["arch"] >= 90 and inst["kernel"] in ("_attn_fwd", "_attn_fwd_tma"):
            precision = dict(inst["args"]).get("PRECISION", ("constexpr", ""))[1]
            # wgmma takes 64 rows per warpgroup: the 16/32-row tiles (short sequences) use mma.
            if precision != "ieee" and inst["config"].get("BLOCK_M", 0) >= 64 and not r["wgmma"]:
                found.append(f"no wgmma in the sm_90 attention forward: {where}")
    return found


def reachable_section(archs, families) -> List[str]:
    """The reachable matrix's size per kernel and what the pruners remove (enumerated, not compiled)."""
    PRUNING.clear()
    start = time.time()
    reach = enumerate_instances(archs, "reachable", families)
    counts: Dict[str, Dict[int, int]] = {}
    for i in reach:
        counts.setdefault(f"{i['module']}.{i['kernel']}", {}).setdefault(i["arch"], 0)
        counts[f"{i['module']}.{i['kernel']}"][i["arch"]] += 1
    lines = [
        "## The reachable matrix (enumerated here, not compiled in CI)",
        "",
        f"`--matrix reachable` (see the tool's docstring for the definition) has **{len(reach)} distinct compiles**",
        f"(enumerated in {time.time() - start:.0f} s); after deduplication every one differs in its constexprs, integer",
        "specialisation, pointer dtypes, config or target. Per kernel:",
        "",
        "| kernel | " + " | ".join(f"sm_{a}" for a in archs) + " |",
        "|---|" + "---|" * len(archs),
    ]
    lines += [f"| {k} | " + " | ".join(str(v.get(a, 0)) for a in archs) + " |" for k, v in sorted(counts.items())]
    lines += ["", "What the pruners remove over the reachable matrix (never benchmarked, so never run):", ""]
    lines += [f"- {line}" for line in pruning_summary()] + [""]
    PRUNING.clear()
    return lines


def write_report(instances, path: str, seconds: float, compile_only: bool = False, command: str = "", summary: str = "", extra=()) -> None:
    lines = [
        "# Triton kernels compiled ahead of time for sm_80 and sm_90",
        "",
        "A static figure, not a timing: what Triton's compiler and ptxas report for every kernel at every",
        "config its launcher, autotune list and pruner can yield on the Stable Diffusion / SDXL shapes",
        f"(`{command or 'python -m fastdiff.tools.aot_check'}`, no GPU involved).",
        "",
        *([summary, ""] if summary else []),
        f"- Triton {triton.__version__}, torch {torch.__version__}; tool version {TOOL_VERSION}; kernel sources: `{sources_hash()}`",
        f"- targets: {', '.join(CARD[a] + f', {SMEM_LIMIT[a]} B shared memory per block' for a in sorted({i['arch'] for i in instances}))}",
        f"- {len(instances)} distinct compiles ({sum(not i['result']['ok'] for i in instances)} failed); the tool ran {seconds:.0f} s",
        "- `sd`: the pruner keeps this config for one of the SD shapes on that card (what the autotuner benchmarks there);",
        "  other rows are reachable for other shapes. `spill` is spill stores / loads in bytes; `serial` means ptxas",
        "  serialised the wgmma instructions. Each row lists the first SD case that compiles to it and how many share it.",
        "",
    ]
    violation_list = violations(instances, compile_only)
    lines += ["## Check", "", "no violations" if not violation_list else "\n".join(f"- {v}" for v in violation_list), ""]
    allowed: Dict[Tuple[str, str], int] = {}
    for inst in instances:
        r = inst["result"]
        if not inst["sd"] or not r["ok"]:
            continue
        for table, hit in (("AOT_SPILL_ALLOWANCES", r["spill_stores"] > 0), ("AOT_WGMMA_ALLOWANCES", r["wgmma_serialized"] and inst["kernel"] in WGMMA_KERNELS)):
            reason = _allowance(inst, table) if hit else None
            if reason:
                allowed[(f"{table} {inst['kernel']}", reason)] = allowed.get((f"{table} {inst['kernel']}", reason), 0) + 1
    if allowed and not compile_only:
        lines += ["## Allowances applied (written next to the configs in the kernel modules)", ""]
        lines += [f"- {where}: {count} compiles: {reason}" for (where, reason), count in sorted(allowed.items())] + [""]
    if PRUNING:
        lines += [
            "## What the pruners remove",
            "",
            "A config that an autotuner's pruner removes for every call is never benchmarked, so never run:",
            "the pruner is the proof. `reachable` configs are what the pruner (without its occupancy rule,",
            "which only removes more for some shapes) yields for at least one enumerated call.",
            "",
        ] + [f"- {line}" for line in pruning_summary()] + [""]
    lines += list(extra)
    kernels = sorted({(i["module"], i["kernel"]) for i in instances})
    for module, kernel in kernels:
        rows = [i for i in instances if (i["module"], i["kernel"]) == (module, kernel)]
        rows.sort(key=lambda i: (i["arch"], _variant(i), _label(i)))
        ok = [i for i in rows if i["result"]["ok"]]
        spilling = sum(1 for i in ok if i["result"]["spill_stores"])
        lines += [
            f"## {module}.{kernel}",
            "",
            f"{len(rows)} compiles, {len(rows) - len(ok)} failed, {spilling} spill, max {max((i['result']['registers'] or 0) for i in ok) if ok else '-'} registers",
            "",
            "| arch | variant | config | sd | regs | spill | shared B | wgmma | serial | tma | first case (+ others) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i in rows:
            r = i["result"]
            case = i["cases"][0] + (f" (+{len(i['cases']) - 1})" if len(i["cases"]) > 1 else "")
            if not r["ok"]:
                lines.append(f"| sm_{i['arch']} | {_variant(i)} | {_label(i)} | {'yes' if i['sd'] else ''} | FAILED: {r['error'].splitlines()[-1][:120] if r['error'] else ''} ||||||{case} |")
                continue
            lines.append(
                f"| sm_{i['arch']} | {_variant(i)} | {_label(i)} | {'yes' if i['sd'] else ''} | {r['registers']} | "
                f"{r['spill_stores']}/{r['spill_loads']} | {r['shared']} | {'yes' if r['wgmma'] else ''} | "
                f"{'yes' if r['wgmma_serialized'] else ''} | {'yes' if r['tma'] else ''} | {case} |"
            )
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def pruning_summary() -> List[str]:
    """One line per autotuned kernel and target: what its pruner removes for every enumerated call."""
    lines = []
    for (module, kernel, arch), e in sorted(PRUNING.items()):
        never = [c for c in e["listed"] if c not in e["reachable"]]
        lines.append(
            f"{module}.{kernel} sm_{arch}: {len(e['listed'])} configs listed, {len(e['reachable'])} reachable for some call, "
            f"{len(e['kept'])} kept at some enumerated shape on the card; the pruner removes {len(e['pruned_pairs'])} of "
            f"{len(e['pairs'])} (variant, config) pairs" + (f"; never reachable: {', '.join(never)}" if never else "")
        )
    return lines


def sources_hash() -> str:
    """sha256 (first 16 hex digits) of every kernels/*.py file, in name order."""
    from fastdiff import kernels

    folder = os.path.dirname(kernels.__file__) if getattr(kernels, "__file__", None) else list(kernels.__path__)[0]
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def _count_by_kernel(instances) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for i in instances:
        counts[i["kernel"]] = counts.get(i["kernel"], 0) + 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default=",".join(map(str, ARCHS)), help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--matrix", choices=("reachable", "every", "sd", "ci", "smoke", "full"), default="smoke")
    parser.add_argument("--families", default=",".join(FAMILIES), help="kernel modules to compile (default: all)")
    parser.add_argument("--kernels", help="comma-separated kernel names to keep (default: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write every instance and its results here")
    parser.add_argument("--report", help="write the markdown report here")
    parser.add_argument("--check", action="store_true", help="exit 1 on any violation (see the module docstring)")
    parser.add_argument("--compile-only", action="store_true", help="with --check: fail on compile errors and shared memory only")
    parser.add_argument("--dry-run", action="store_true", help="enumerate and count the distinct compiles, compile nothing")
    parser.add_argument(
        "--deadline", type=float, metavar="EPOCH",
        help="start no new compile after this time (seconds since the epoch); what is left is deferred: not checked by "
        "this run, listed as deferred, and compiled by a later run (the cache keeps what this one compiled)",
    )
    parser.add_argument("--stop-file", metavar="PATH", help="like --deadline: start no new compile once PATH exists")
    parser.add_argument("--reduce", default="", help=f"comma-separated reductions of the matrix ({', '.join(REDUCTIONS)}); see REDUCTIONS")
    parser.add_argument("--verify-reductions", type=int, metavar="N", help="compile every member of N sampled groups per reduction and compare")
    parser.add_argument(
        "--report-reachable", action="store_true",
        help="also enumerate the reachable matrix (nothing compiled) and add its size and the pruners' counts to the report",
    )
    args = parser.parse_args(argv)
    reductions = tuple(r for r in args.reduce.split(",") if r)
    unknown = set(reductions) - set(REDUCTIONS)
    if unknown:
        parser.error(f"--reduce: unknown reduction(s) {sorted(unknown)}; expected some of {list(REDUCTIONS)}")

    start = time.time()
    archs = tuple(int(a) for a in args.archs.split(","))
    instances = select(enumerate_instances(archs, args.matrix, tuple(args.families.split(","))), args.matrix)
    if args.kernels:
        instances = [i for i in instances if i["kernel"] in args.kernels.split(",")]
    if args.verify_reductions:
        lines = verify_reductions(instances, reductions or REDUCTIONS, args.verify_reductions, args.jobs)
        for line in lines:
            print(line)
        if args.json:
            command = " ".join(["python -m fastdiff.tools.aot_check"] + list(sys.argv[1:] if argv is None else argv))
            with open(args.json, "w") as f:
                json.dump({"command": command, "triton": triton.__version__, "sources": sources_hash(), "results": lines}, f, indent=1)
        return 0
    distinct = len(instances)
    instances = reduce_matrix(instances, reductions)
    if reductions:
        print(f"aot_check: {distinct} distinct compiles; reductions {','.join(reductions)} leave {len(instances)}")
    enumerated = time.time() - start
    if args.dry_run:
        counts: Dict[Tuple[str, int], int] = {}
        for i in instances:
            counts[(i["kernel"], i["arch"])] = counts.get((i["kernel"], i["arch"]), 0) + 1
        for (kernel, arch), n in sorted(counts.items()):
            print(f"{kernel:24s} sm_{arch}: {n}")
        for line in pruning_summary():
            print(line)
        print(f"aot_check: {len(instances)} distinct compiles enumerated in {enumerated:.1f} s (--dry-run: nothing compiled)")
        return 0
    _DEFER.update(deadline=args.deadline, stop_file=args.stop_file)
    run_all(instances, args.jobs)
    deferred = [i for i in instances if i["result"] is None]
    instances = [i for i in instances if i["result"] is not None]
    if deferred:
        print(
            f"aot_check: {len(deferred)} of {distinct} compiles DEFERRED (--deadline/--stop-file reached before they were "
            f"compiled; not checked by this run, a later run compiles them): "
            + ", ".join(f"{k} {n}" for k, n in sorted(_count_by_kernel(deferred).items()))
        )
    seconds = time.time() - start
    failed = sum(not i["result"]["ok"] for i in instances)
    compiled = sum(not i["result"]["cached"] for i in instances)
    print(
        f"aot_check: triton {triton.__version__}: {len(instances)} distinct compiles ({compiled} compiled now, "
        f"{len(instances) - compiled} cached), {failed} failed; enumerated in {enumerated:.1f} s, total {seconds:.1f} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "sources": sources_hash(), "instances": instances}, f, default=str)
    if args.report:
        command = " ".join(["python -m fastdiff.tools.aot_check"] + list(sys.argv[1:] if argv is None else argv))
        summary = f"Matrix `{args.matrix}`: {distinct} distinct compiles" + (
            f"; reductions {', '.join(reductions)} (each checked on a sample, see REDUCTIONS in the tool) compile {len(instances)} of them." if reductions else "."
        )
        if deferred:
            summary += (
                f" **{len(deferred)} of them were deferred** (the run's --deadline/--stop-file came first): not in this "
                "report and not checked; a later run compiles them."
            )
        extra: List[str] = []
        if args.report_reachable:
            extra = reachable_section(archs, tuple(args.families.split(",")))
        write_report(instances, args.report, seconds, args.compile_only, command, summary, extra)
    found = violations(instances, args.compile_only)
    for line in found:
        print("VIOLATION", line)
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
