"""Benchmark GEGLU's gate product on Stable Diffusion feed-forward shapes: fastdiff's Triton kernel against PyTorch.

    python benchmarks/bench_geglu.py [--out DIR] [--dtype fp16|bf16] [--providers ...] [--backward]

Providers (``--providers``, all by default):

* ``fastdiff-triton``: ``fastdiff.ops.geglu.geglu(x, backend="triton")``: one
  pass, reads x (2D per row) and writes y (D per row);
* ``torch-eager``: diffusers' ``h, g = x.chunk(2, -1); h * F.gelu(g)``: gelu
  writes a (..., D) temporary that the product reads back;
* ``torch-compile``: ``torch.compile`` of that same function, compiled per
  shape (dynamo is reset between cases);
* ``copy``: the bandwidth floor: ``out.copy_(x[..., :3D/2])`` reads and writes
  3D elements per row in all, the same bytes as the forward's floor.

Shapes: the projection output ``proj(x)`` of the SD1.5 (512x512) and SDXL
(1024x1024) UNets' GEGLU at batch 2 (classifier-free guidance): (2, tokens, 2D)
with D = 4 x the block's channels.

Metrics per (shape, provider): p20/p50/p80 time (``triton.testing.do_bench``),
effective GB/s counting the floor traffic (forward: read 2D + write D per
row; ``--backward``, forward + backward: additionally read 2D and D, write 2D),
the speedup over torch-eager and over torch-compile (their p50 divided by the
provider's), and the max abs difference from torch-eager.

Each run appends one JSON line per measurement to ``DIR/bench_geglu.jsonl``
(default DIR: benchmarks/results/) with the card, torch/triton versions,
commit and date, and prints a short table after a line ``== table ==``.
Without CUDA the script says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from bench_utils import ROOT, environment, timings

# (name, batch, tokens, D): GEGLU inputs are (batch, tokens, 2 * D).
SHAPES = [
    ("sd15-64x64-d1280", 2, 4096, 1280),
    ("sd15-32x32-d2560", 2, 1024, 2560),
    ("sd15-16x16-d5120", 2, 256, 5120),
    ("sdxl-64x64-d2560", 2, 4096, 2560),
    ("sdxl-32x32-d5120", 2, 1024, 5120),
    ("4096tok-d5120", 2, 4096, 5120),
]
PROVIDERS = ("fastdiff-triton", "torch-eager", "torch-compile", "copy")


def _eager(x):
    hidden, gate = x.chunk(2, dim=-1)
    return hidden * F.gelu(gate)


def _fastdiff(x):
    from fastdiff.ops.geglu import geglu

    return geglu(x, backend="triton")


def _copy_floor(x):
    """A copy moving the same bytes as the forward's floor (3D elements per row, read + write)."""
    d = x.shape[-1] // 2
    src = x[..., : d * 3 // 2]
    out = torch.empty_like(src)
    return lambda x: out.copy_(src)


def _forward_backward(fn, dy):
    return lambda x: torch.autograd.grad(fn(x), x, dy)[0]


def _bench(fn, x) -> dict:
    out = fn(x)  # first call compiles, and checks that it runs
    torch.cuda.synchronize()
    return {"out": out, **timings(lambda: fn(x))}


def _run_case(providers, batch, tokens, d, dtype, backward) -> dict:
    x = torch.randn(batch, tokens, 2 * d, device="cuda", dtype=dtype) * 2 + 0.3
    if backward:
        x.requires_grad_()
        dy = torch.randn(batch, tokens, d, device="cuda", dtype=dtype)
    results = {}
    for provider in providers:
        if provider == "copy":
            if backward:
                results[provider] = {"error": "no copy floor for --backward"}
                continue
            fn = _copy_floor(x)
        elif provider == "torch-compile":
            torch._dynamo.reset()
            fn = torch.compile(_eager, dynamic=False)
        elif provider == "torch-eager":
            fn = _eager
        else:
            fn = _fastdiff
        if backward and provider != "copy":
            fn = _forward_backward(fn, dy)
        try:
            results[provider] = _bench(fn, x)
        except Exception as err:  # noqa: BLE001 - recorded in the results, never hidden
            results[provider] = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"}
    return results


def _rows(env, results, name, batch, tokens, d, dtype_name, itemsize, backward):
    rows_bytes = batch * tokens * itemsize
    # Floor: forward reads 2D and writes D; the backward reads x (2D) and dy (D) and writes dx (2D).
    bytes_moved = rows_bytes * (3 * d + (5 * d if backward else 0))
    eager = results.get("torch-eager", {})
    compiled = results.get("torch-compile", {})
    reference = eager.get("out")
    out_rows = []
    for provider, r in results.items():
        row = {**env, "op": "geglu_fwd_bwd" if backward else "geglu", "shape": name, "batch": batch, "tokens": tokens, "D": d, "dtype": dtype_name, "provider": provider}
        if "error" in r:
            row["error"] = r["error"]
            out_rows.append(row)
            continue
        row.update({key: r[key] for key in ("p20_ms", "p50_ms", "p80_ms")})
        row["gbps"] = bytes_moved / (r["p50_ms"] * 1e-3) / 1e9
        row["speedup_vs_eager"] = eager["p50_ms"] / r["p50_ms"] if "p50_ms" in eager else None
        row["speedup_vs_compile"] = compiled["p50_ms"] / r["p50_ms"] if "p50_ms" in compiled else None
        if reference is not None and provider != "copy":
            row["max_abs_diff_vs_eager"] = (r["out"].float() - reference.float()).abs().max().item()
        out_rows.append(row)
    return out_rows


def _fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def _print_table(env, table, what):
    print("== table ==")
    print(f"{env['card']} ({env['capability']}), torch {env['torch']}, triton {env['triton']}, {what}, commit {env['commit']}")
    print(f"{'shape':<20}{'provider':<17}{'p20 us':>9}{'p50 us':>9}{'p80 us':>9}{'GB/s':>8}{'x eager':>9}{'x compile':>10}{'max diff':>10}")
    for row in table:
        head = f"{row['shape']:<20}{row['provider']:<17}"
        if "error" in row:
            print(head + "n/a: " + row["error"][-90:])
            continue
        print(
            head
            + f"{row['p20_ms'] * 1e3:>9.1f}{row['p50_ms'] * 1e3:>9.1f}{row['p80_ms'] * 1e3:>9.1f}{row['gbps']:>8.0f}"
            + f"{_fmt(row['speedup_vs_eager'], '.2f'):>9}{_fmt(row['speedup_vs_compile'], '.2f'):>10}"
            + f"{_fmt(row.get('max_abs_diff_vs_eager'), '.1e'):>10}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="directory for bench_geglu.jsonl")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: " + ",".join(PROVIDERS))
    parser.add_argument("--backward", action="store_true", help="time forward + backward (the gradient for x) instead of the forward")
    args = parser.parse_args(argv)
    unknown = [p for p in args.providers.split(",") if p not in PROVIDERS]
    if unknown:
        parser.error(f"--providers: unknown {unknown}; expected some of {list(PROVIDERS)}")
    if not torch.cuda.is_available():
        print("bench_geglu: no CUDA device; nothing to measure (run it on a GPU machine, e.g. via benchmarks/device_run.sh)")
        return 0
    sys.path.insert(0, ROOT)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    providers = [p for p in PROVIDERS if p in args.providers.split(",")]
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_geglu.jsonl")
    table = []
    with open(path, "a") as sink:
        for name, batch, tokens, d in SHAPES:
            torch.manual_seed(0)
            results = _run_case(providers, batch, tokens, d, dtype, args.backward)
            rows = _rows(env, results, name, batch, tokens, d, args.dtype, torch.finfo(dtype).bits // 8, args.backward)
            for row in rows:
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            table.extend(rows)
    print(f"results appended to {path}")
    _print_table(env, table, args.dtype + (", forward + backward" if args.backward else ", forward"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
