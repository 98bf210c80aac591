"""Benchmark fastdiff's Triton attention against PyTorch SDPA on diffusion shapes.

    python benchmarks/bench_attention.py [--out DIR] [--dtype fp16|bf16] [--shapes sd15,sdxl]

Providers: ``fastdiff-triton`` and ``fastdiff-triton-tma`` (the same forward
reading q/k/v through Hopper TMA descriptors; it is not in ``auto`` until these
numbers say so); ``sdpa`` (PyTorch's own choice); and SDPA with
one backend forced through ``torch.nn.attention.sdpa_kernel``: ``sdpa-flash``,
``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``. A provider that cannot run a
shape is recorded with the error, not skipped silently.

Metrics per (shape, provider): p20/p50/p80 time of the forward
(``triton.testing.do_bench``), TFLOP/s counted on the true head dim
(4 * B * H * Lq * Lk * D, no padding), and the speedup over ``sdpa`` (its p50
divided by the provider's). Each run appends one JSON line per measurement to
``DIR/bench_attention.jsonl`` with the card, torch/triton versions, commit and
date, and prints a short table after a line ``== table ==``. Without CUDA it
prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F
from bench_utils import ROOT, environment, timings

# (name, B, H, Lq, Lk, D). SD1.5 at 512x512 with CFG (batch 2), 8 heads; SDXL at 1024x1024.
SHAPES = {
    "sd15": [
        ("sd15-self-4096", 2, 8, 4096, 4096, 40),
        ("sd15-self-1024", 2, 8, 1024, 1024, 80),
        ("sd15-self-256", 2, 8, 256, 256, 160),
        ("sd15-cross-4096", 2, 8, 4096, 77, 40),
        ("sd15-cross-1024", 2, 8, 1024, 77, 80),
        ("sd15-cross-256", 2, 8, 256, 77, 160),
    ],
    "sdxl": [
        ("sdxl-self-4096", 2, 10, 4096, 4096, 64),
        ("sdxl-self-1024", 2, 20, 1024, 1024, 64),
        ("sdxl-cross-1024", 2, 20, 1024, 77, 64),
    ],
}


def _sdpa_backends():
    """Forced SDPA backends this torch knows: name -> SDPBackend member."""
    from torch.nn.attention import SDPBackend

    names = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
    return {name: getattr(SDPBackend, member) for name, member in names.items() if hasattr(SDPBackend, member)}


def _providers():
    """name -> (function of q, k, v, context manager factory)."""
    from torch.nn.attention import sdpa_kernel

    from fastdiff.ops.attention import attention

    providers = {
        "fastdiff-triton": (lambda q, k, v: attention(q, k, v, backend="triton"), contextlib.nullcontext),
        "fastdiff-triton-tma": (lambda q, k, v: attention(q, k, v, backend="triton_tma"), contextlib.nullcontext),
        "sdpa": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), contextlib.nullcontext),
    }
    for name, member in _sdpa_backends().items():
        providers[name] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (lambda m=member: sdpa_kernel(m)))
    return providers


def _bench(fn, q, k, v, context) -> dict:
    with context():
        out = fn(q, k, v)  # first call: compile / autotune, and a check that it runs
        return {"out": out, **timings(lambda: fn(q, k, v))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="directory for bench_attention.jsonl")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--shapes", default="sd15,sdxl", help="comma-separated groups: " + ",".join(SHAPES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: no CUDA device; nothing to benchmark")
        return 0
    sys.path.insert(0, ROOT)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    shapes = [s for group in args.shapes.split(",") for s in SHAPES[group]]
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_attention.jsonl")
    providers = _providers()
    table = []
    with open(path, "a") as sink:
        for name, b, h, lq, lk, d in shapes:
            torch.manual_seed(0)
            q = torch.randn(b, h, lq, d, device="cuda", dtype=dtype)
            k = torch.randn(b, h, lk, d, device="cuda", dtype=dtype)
            v = torch.randn(b, h, lk, d, device="cuda", dtype=dtype)
            flops = 4.0 * b * h * lq * lk * d
            results = {}
            for provider, (fn, context) in providers.items():
                try:
                    results[provider] = _bench(fn, q, k, v, context)
                # RuntimeError: a forced SDPA backend that does not take this shape;
                # ValueError (BackendNotSupportedError): a fastdiff backend that cannot run here.
                except (RuntimeError, ValueError) as err:
                    results[provider] = {"error": str(err).splitlines()[0][:200]}
            default = results["sdpa"].get("p50_ms")
            reference = results["sdpa"].get("out")
            for provider, r in results.items():
                row = {**env, "op": "attention", "shape": name, "B": b, "H": h, "Lq": lq, "Lk": lk, "D": d, "dtype": args.dtype, "provider": provider}
                if "error" in r:
                    row["error"] = r["error"]
                else:
                    row.update({key: r[key] for key in ("p20_ms", "p50_ms", "p80_ms")})
                    row["tflops"] = flops / (r["p50_ms"] * 1e-3) / 1e12
                    row["speedup_vs_sdpa"] = default / r["p50_ms"] if default else None
                    row["max_abs_diff_vs_sdpa"] = (r["out"].float() - reference.float()).abs().max().item() if reference is not None else None
                sink.write(json.dumps(row) + "\n")
                table.append(row)
    print(f"results appended to {path}")
    print("== table ==")
    print(f"{env['card']} ({env['capability']}), torch {env['torch']}, triton {env['triton']}, {args.dtype}, commit {env['commit']}")
    print(f"{'shape':<18}{'D':>4}  {'provider':<21}{'p50 ms':>9}{'TFLOP/s':>9}{'x sdpa':>8}")
    for row in table:
        if "error" in row:
            print(f"{row['shape']:<18}{row['D']:>4}  {row['provider']:<21}{'n/a: ' + row['error'][:40]}")
        else:
            speedup = f"{row['speedup_vs_sdpa']:.2f}" if row["speedup_vs_sdpa"] else "-"
            print(f"{row['shape']:<18}{row['D']:>4}  {row['provider']:<21}{row['p50_ms']:>9.3f}{row['tflops']:>9.1f}{speedup:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
