"""CPU host path: fastdiff's GroupNorm+SiLU and attention against plain PyTorch on the CPU.

    python benchmarks/bench_cpu_host_path.py [--reps 41] [--block-ms 20] [--threads N]
                                             [--cases gn_small,...] [--label TEXT] [--out FILE]

On the CPU, ``fastdiff.ops.group_norm(..., activation="silu")`` runs the reference
(``F.group_norm`` + ``F.silu``) and ``fastdiff.ops.attention`` under ``auto`` runs
``F.scaled_dot_product_attention``; the only difference from plain PyTorch is fastdiff's
Python host path, which a small problem cannot hide. Target: never slower than plain
PyTorch (ratio >= 1.0 within noise) at every shape.

Providers, per case:

* ``torch``: plain PyTorch as diffusers calls it (``F.silu(F.group_norm(x, 32, w, b, 1e-5))``;
  ``F.scaled_dot_product_attention(q, k, v)``).
* ``fastdiff``: the fastdiff op as a model calls it (``backend=None``, no override): the CPU
  fast path where the code has one.
* ``torch (again)``: plain PyTorch a second time, as its own provider: ``ratio_torch_again``
  (torch / torch again) is the noise floor of the method under the current load.
* ``dispatched``: the same op with the same backend forced through
  ``fastdiff.use_backend``, so it takes the dispatcher's path (plan cache, lookup): the host
  path every CPU call took before the fast path. Measured in the same rounds, under the
  same load.

Timing: every round times one block of calls per provider (the block sized to about
``--block-ms`` from a calibration call, at least 3 calls), the providers' order rotating
every round, so a shared machine's load falls on all of them alike; per provider the median over
``--reps`` rounds of the per-call time in the block. ``ratio`` is the median over rounds
of ``torch / fastdiff`` (> 1: fastdiff is faster), ``ratio_dispatched`` the same for the
dispatched path. Each case asserts that ``fastdiff`` and ``dispatched`` return bitwise
equal results, and records whether ``fastdiff`` equals plain PyTorch bitwise.

The load average (``os.getloadavg()``) is read before and after every case and stored
with it: on a shared 2-core machine a figure taken under load is not an idle figure.
Each case appends one JSON line to ``--out`` (default
benchmarks/results/cpu_host_path.jsonl) with the shape, times, ratios, torch version,
thread count, commit, date and load averages, and one line per case is printed. On a
loaded machine use ``--threads 1``: with two threads on two busy cores, OpenMP's workers
wait for a core and a 15 us call takes milliseconds, for every provider.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import git_commit  # noqa: E402

import fastdiff  # noqa: E402
from fastdiff import backends  # noqa: E402
from fastdiff.ops import attention, group_norm  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu_host_path.jsonl")


def _group_norm_case(shape, channels_last=False):
    def build(gen):
        x = torch.randn(shape, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(shape[1], generator=gen), torch.randn(shape[1], generator=gen)
        return {
            "torch": lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5)),
            "fastdiff": lambda: group_norm(x, 32, w, b, 1e-5, "silu"),
        }

    label = "x".join(map(str, shape)) + (" channels_last" if channels_last else "")
    return {"op": "group_norm_silu", "shape": label, "dtype": "float32", "build": build, "force": {"group_norm": "reference"}}


def _attention_case(b, h, lq, lk, d):
    def build(gen):
        q = torch.randn(b, h, lq, d, generator=gen)
        k, v = torch.randn(b, h, lk, d, generator=gen), torch.randn(b, h, lk, d, generator=gen)
        return {
            "torch": lambda: F.scaled_dot_product_attention(q, k, v),
            "fastdiff": lambda: attention(q, k, v),
        }

    return {"op": "attention", "shape": f"{b}x{h}x{lq}x{lk}x{d} (BxHxLqxLkxD)", "dtype": "float32", "build": build, "force": {"attention": "sdpa"}}


CASES = {
    "gn_small": _group_norm_case((2, 64, 32, 32)),  # fastdiff bench's small GroupNorm shape
    "gn_sd": _group_norm_case((2, 320, 64, 64)),  # SD1.5's first resnet norm at 512x512
    "gn_sd_cl": _group_norm_case((2, 320, 64, 64), channels_last=True),
    "attn_tiny": _attention_case(1, 2, 8, 8, 8),
    "attn_cross": _attention_case(2, 8, 64, 77, 40),  # SD cross-attention at a small latent
    "attn_self": _attention_case(2, 8, 256, 256, 40),  # SD self-attention at a 16x16 latent
}


def _calls_per_block(fn, block_ms: float) -> int:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(5):
        fn()
    per_call = (time.perf_counter() - start) / 5
    # At least 3 calls: with one call per block, a 10 MB output's allocation (the allocator's
    # state left by the previous provider) decides the time, not the call.
    return max(3, min(5000, int(block_ms / 1000 / max(per_call, 1e-7))))


def _time_block(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure_case(case: dict, reps: int, block_ms: float) -> dict:
    gen = torch.Generator().manual_seed(0)
    providers = case["build"](gen)
    force = case["force"]
    fast = providers["fastdiff"]

    def dispatched_block(calls):
        with backends.use_backend(**force):
            return _time_block(fast, calls)

    with torch.no_grad():
        with backends.use_backend(**force), backends.trace_dispatch() as forced_calls:
            reference = fast()
        with backends.trace_dispatch() as fast_calls:
            result = fast()
        if not torch.equal(result, reference):
            raise AssertionError(f"{case['op']} {case['shape']}: the fast path's result differs from the dispatched path's")
        equal_to_torch = torch.equal(result, providers["torch"]())
        calls = _calls_per_block(providers["torch"], block_ms)
        blocks = {
            "torch": lambda: _time_block(providers["torch"], calls),
            "torch_again": lambda: _time_block(providers["torch"], calls),
            "fastdiff": lambda: _time_block(fast, calls),
            "dispatched": lambda: dispatched_block(calls),
        }
        for block in blocks.values():  # warm-up
            block()
        times = {name: [] for name in blocks}
        names = list(blocks)
        load_before = os.getloadavg()
        for rep in range(reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                times[name].append(blocks[name]())
        load_after = os.getloadavg()
    ratios = [t / f for t, f in zip(times["torch"], times["fastdiff"])]
    ratios_dispatched = [t / f for t, f in zip(times["torch"], times["dispatched"])]
    ratios_again = [t / f for t, f in zip(times["torch"], times["torch_again"])]
    return {
        "op": case["op"],
        "shape": case["shape"],
        "dtype": case["dtype"],
        "torch_us": statistics.median(times["torch"]),
        "fastdiff_us": statistics.median(times["fastdiff"]),
        "dispatched_us": statistics.median(times["dispatched"]),
        "ratio": statistics.median(ratios),
        "ratio_p20": statistics.quantiles(ratios, n=10, method="inclusive")[1],
        "ratio_p80": statistics.quantiles(ratios, n=10, method="inclusive")[7],
        "ratio_dispatched": statistics.median(ratios_dispatched),
        "ratio_torch_again": statistics.median(ratios_again),
        "ratio_torch_again_p20": statistics.quantiles(ratios_again, n=10, method="inclusive")[1],
        "ratio_torch_again_p80": statistics.quantiles(ratios_again, n=10, method="inclusive")[7],
        "backend": fast_calls[0][1] if fast_calls else "?",
        "dispatched_backend": forced_calls[0][1] if forced_calls else "?",
        "equal_to_torch": equal_to_torch,
        "reps": reps,
        "calls_per_block": calls,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
    parser.add_argument("--reps", type=int, default=41, help="rounds per case (median over rounds)")
    parser.add_argument("--block-ms", type=float, default=20.0, help="about how long one provider's block of calls takes")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--label", default="", help="free text stored with every row (e.g. 'before', 'idle')")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON-lines file to append to ('' for none)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; expected names from {list(CASES)}")
    common = {
        "label": args.label,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fastdiff_file": os.path.dirname(fastdiff.__file__),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []
    for name in names:
        row = {"case": name, **measure_case(CASES[name], args.reps, args.block_ms), **common}
        rows.append(row)
        print(
            f"{row['op']:16} {row['shape']:32} torch {row['torch_us']:9.1f} us  fastdiff {row['fastdiff_us']:9.1f} us  "
            f"ratio {row['ratio']:.3f} [{row['ratio_p20']:.3f}, {row['ratio_p80']:.3f}]  "
            f"dispatched {row['dispatched_us']:9.1f} us ratio {row['ratio_dispatched']:.3f}  "
            f"A/A {row['ratio_torch_again']:.3f} [{row['ratio_torch_again_p20']:.3f}, {row['ratio_torch_again_p80']:.3f}]  "
            f"load {row['loadavg_before'][0]:.2f}->{row['loadavg_after'][0]:.2f}",
            flush=True,
        )
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
