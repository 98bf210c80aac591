"""Benchmark GroupNorm + SiLU on Stable Diffusion shapes: fastdiff's kernels against PyTorch.

    python benchmarks/bench_group_norm.py [--out DIR] [--dtype fp16|bf16] [--shapes sd15-unet,sdxl-unet,vae-decoder]
                                          [--layouts nchw,nhwc] [--providers ...] [--time-budget-s 200]
                                          [--sweep | --backward] [--cpu-smoke]

Providers (``--providers``, all by default):

* ``fastdiff-triton``: ``fastdiff.ops.group_norm(..., activation="silu", backend="triton")``;
* ``fastdiff-cuda``: the same with ``backend="cuda"`` (recorded as unavailable,
  with the reason, when the CUDA extension cannot be loaded);
* ``torch-eager``: ``F.silu(F.group_norm(x, ...))``; an NHWC input pays
  whatever layout copy PyTorch makes;
* ``torch-compile``: ``torch.compile`` of that same function, compiled per
  shape and layout (dynamo is reset between cases);
* ``copy``: ``y.copy_(x)``, one read and one write of x: the bandwidth floor.

Shapes: GroupNorm inputs of the SD1.5 UNet (512x512), the SDXL UNet
(1024x1024) and the VAE decoder, at batch 2 (classifier-free guidance), 32
groups, in fp16, NCHW and NHWC (channels_last).

Metrics per (shape, layout, provider): p20/p50/p80 time
(``triton.testing.do_bench``, L2 flushed between runs), effective GB/s
counting one read and one write of x (with ``--backward``, forward plus
backward: 5 passes, x read, y written, x and dy read, dx written), the speedup over torch-eager and over
torch-compile (their p50 divided by the provider's), the fraction of the copy
bandwidth reached, and the max abs difference from torch-eager. For
fastdiff-triton the launch the heuristic chose is recorded too. With
``--sweep``, other launch configs of the same kernels are timed as
``triton-sweep<i>`` rows (the table shows the best one per case): data for
re-tuning ``launch_config``.

Each run appends one JSON line per measurement to ``DIR/bench_group_norm.jsonl``
(default DIR: benchmarks/results/) with the card, torch/triton versions,
commit and date, and prints a short table after a line ``== table ==``.
Compiling every case takes time: cases left when ``--time-budget-s`` runs out
are skipped and listed (shapes run round-robin over the groups, so every
group keeps its first shapes).

Without CUDA the script says so in one line and runs a small CPU smoke check
instead (``--cpu-smoke`` forces it): tiny shapes, fastdiff's reference and
Triton-interpreter paths against torch eager, correctness only, nothing
written. Exit code 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time

import torch
from bench_utils import ROOT, environment, timings
import torch.nn.functional as F

GROUPS = 32
EPS = 1e-5

# (name, N, C, H, W): GroupNorm inputs at batch 2.
SHAPES = {
    "sd15-unet": [
        ("sd15-320x64", 2, 320, 64, 64),
        ("sd15-640x32", 2, 640, 32, 32),
        ("sd15-1280x16", 2, 1280, 16, 16),
        ("sd15-1280x8", 2, 1280, 8, 8),
    ],
    "sdxl-unet": [
        ("sdxl-320x128", 2, 320, 128, 128),
        ("sdxl-640x64", 2, 640, 64, 64),
        ("sdxl-1280x32", 2, 1280, 32, 32),
    ],
    "vae-decoder": [
        ("vae-512x64", 2, 512, 64, 64),
        ("vae-512x256", 2, 512, 256, 256),
        ("vae-256x512", 2, 256, 512, 512),
        ("vae-128x512", 2, 128, 512, 512),
    ],
}
PROVIDERS = ("fastdiff-triton", "fastdiff-cuda", "torch-eager", "torch-compile", "copy")
# --sweep: knobs of kernels.group_norm.launch_config tried besides its defaults,
# as (tile elements, warps) x programs per SM, plus the split path where the
# default is the single pass, and the default split tiling with the partial
# merge fused or not.
SWEEP_TILES = ((1024, 4), (2048, 4), (4096, 8))
SWEEP_PROGRAMS_PER_SM = (2, 4, 8)
LAYOUTS = ("nchw", "nhwc")

logger = logging.getLogger("bench_group_norm")


def _eager(x, weight, bias):
    return F.silu(F.group_norm(x, GROUPS, weight, bias, EPS))


def _fastdiff(backend):
    from fastdiff.ops.group_norm import group_norm

    return lambda x, weight, bias: group_norm(x, GROUPS, weight, bias, EPS, "silu", backend=backend)


def _copy_into(out):
    return lambda x, weight, bias: out.copy_(x)


def _inputs(n, c, h, w, layout, dtype, device):
    x = torch.randn(n, c, h, w, device=device, dtype=dtype) * 2 + 0.5
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(c, device=device, dtype=dtype)
    bias = torch.randn(c, device=device, dtype=dtype)
    return x, weight, bias


def _launch_args(x):
    n, c = x.shape[:2]
    return n, c, math.prod(x.shape[2:]), GROUPS, x.stride(1) == 1


def _describe(config, x, backward=False) -> str:
    """A launch config in words (the backward always takes 3 launches: reduce, combine, dx)."""
    from fastdiff.kernels import group_norm as kernels

    n, c, s = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if config.single_pass:
        return f"single-pass {n * GROUPS} progs, tile {config.block_c}x{config.block_s}, {config.num_warps} warps"
    _, n_chunks = kernels._chunking(s, config)
    programs = n * n_chunks * -(-c // config.block_c)
    launches = 3 if backward else kernels.forward_launches(config)
    merge = "apply merges" if config.fused_combine else "last program merges" if config.last_program_combine else "combine launch"
    return f"split x{n_chunks}, {programs} progs, tile {config.block_c}x{config.block_s}, {config.num_warps} warps, {merge}, {launches} launches"


def _sweep_configs(x) -> list:
    """Distinct launch configs for x other than the heuristic's default."""
    from fastdiff.kernels import group_norm as kernels

    args = (*_launch_args(x), kernels._num_sms(x.device))
    default = kernels.launch_config(*args)
    seen = {_describe(default, x)}
    configs = []
    if not default.single_pass:  # the same tiling with the partials merged in each other place
        for fused, last in ((True, False), (False, True), (False, False)):
            config = dataclasses.replace(default, fused_combine=fused, last_program_combine=last)
            if _describe(config, x) not in seen:
                configs.append(config)
                seen.add(_describe(config, x))
    for allow_single_pass in (True, False):
        for tile_elems, num_warps in SWEEP_TILES:
            for programs_per_sm in SWEEP_PROGRAMS_PER_SM:
                config = kernels.launch_config(
                    *args, allow_single_pass, tile_elems=tile_elems, num_warps=num_warps, programs_per_sm=programs_per_sm
                )
                launch = _describe(config, x)  # configs that differ only in a split that rounds to the same chunks launch alike
                if launch not in seen:
                    seen.add(launch)
                    configs.append(config)
    return configs


def _bench(fn, args) -> dict:
    out = fn(*args)  # first call compiles, and checks that it runs
    torch.cuda.synchronize()
    return {"out": out, **timings(lambda: fn(*args))}


def _forward_backward(fn, dy):
    """fn's forward and backward: the gradients for x, weight and bias."""
    return lambda x, weight, bias: torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), dy)


def _run_case(providers, n, c, h, w, layout, dtype, unavailable, sweep, backward) -> dict:
    from fastdiff.backends import BackendNotSupportedError
    from fastdiff.kernels import group_norm as kernels

    x, weight, bias = _inputs(n, c, h, w, layout, dtype, "cuda")
    if backward:
        x, weight, bias = (t.requires_grad_() for t in (x, weight, bias))
        dy = torch.randn_like(x)
    results = {}
    for provider in providers:
        if provider in unavailable:
            results[provider] = {"error": unavailable[provider]}
            continue
        if backward and provider == "copy":
            results[provider] = {"error": "no copy floor for --backward"}
            continue
        if provider == "torch-compile":
            torch._dynamo.reset()
            fn = torch.compile(_eager, dynamic=False)
        elif provider == "torch-eager":
            fn = _eager
        elif provider == "copy":
            fn = _copy_into(torch.empty_like(x))
        else:
            fn = _fastdiff(provider.split("-", 1)[1])
        if backward:
            fn = _forward_backward(fn, dy)
        try:
            results[provider] = _bench(fn, (x, weight, bias))
        except Exception as err:  # noqa: BLE001 - recorded in the results, never hidden
            message = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            results[provider] = {"error": message}
            if provider == "fastdiff-cuda" and not isinstance(err, BackendNotSupportedError):
                unavailable[provider] = message  # a failed extension load/build: do not retry it for every shape
    if "fastdiff-triton" in results and "error" not in results["fastdiff-triton"]:
        launch_args = (*_launch_args(x), kernels._num_sms(x.device))
        launch = _describe(kernels.launch_config(*launch_args), x)
        if backward:
            launch = f"fwd {launch}; bwd {_describe(kernels.launch_config(*launch_args, allow_single_pass=False), x, backward=True)}"
        results["fastdiff-triton"]["launch"] = launch
        for i, config in enumerate(_sweep_configs(x) if sweep else ()):

            def fn(x, weight, bias, config=config):
                return kernels.group_norm_forward(x, weight, bias, GROUPS, EPS, True, config)[0]

            results[f"triton-sweep{i}"] = {**_bench(fn, (x, weight, bias)), "launch": _describe(config, x)}
    return results


def _rows(env, results, name, n, c, h, w, layout, dtype_name, itemsize, backward):
    # Floor traffic: forward reads x and writes y; the backward reads x and dy and writes dx.
    bytes_moved = (5 if backward else 2) * n * c * h * w * itemsize
    eager = results.get("torch-eager", {})
    compiled = results.get("torch-compile", {})
    copy = results.get("copy", {})
    reference = eager.get("out")
    rows = []
    for provider, r in results.items():
        row = {**env, "op": "group_norm_silu_fwd_bwd" if backward else "group_norm_silu", "shape": name, "N": n, "C": c, "H": h, "W": w, "groups": GROUPS, "layout": layout, "dtype": dtype_name, "provider": provider}
        if "error" in r:
            row["error"] = r["error"]
            rows.append(row)
            continue
        row.update({key: r[key] for key in ("p20_ms", "p50_ms", "p80_ms")})
        row["gbps"] = bytes_moved / (r["p50_ms"] * 1e-3) / 1e9
        row["speedup_vs_eager"] = eager["p50_ms"] / r["p50_ms"] if "p50_ms" in eager else None
        row["speedup_vs_compile"] = compiled["p50_ms"] / r["p50_ms"] if "p50_ms" in compiled else None
        row["frac_of_copy_bw"] = copy["p50_ms"] / r["p50_ms"] if "p50_ms" in copy else None
        if reference is not None and provider != "copy":
            out, ref = (r["out"][0], reference[0]) if backward else (r["out"], reference)  # backward: compare dx
            row["max_abs_diff_vs_eager"] = (out.float() - ref.float()).abs().max().item()
        if "launch" in r:
            row["launch"] = r["launch"]
        rows.append(row)
    return rows


def _fmt(v, spec):
    return format(v, spec) if v is not None else "-"


def _print_table(env, table, dtype_name, skipped):
    print("== table ==")
    print(f"{env['card']} ({env['capability']}), torch {env['torch']}, triton {env['triton']}, {dtype_name}, GN({GROUPS})+SiLU, commit {env['commit']}")
    print(f"{'shape':<14}{'layout':<6} {'provider':<16}{'p50 us':>9}{'GB/s':>8}{'x eager':>9}{'x compile':>10}{'of copy':>8}")
    best_sweep = {}
    for row in table:
        if row["provider"].startswith("triton-sweep") and "p50_ms" in row:
            key = (row["shape"], row["layout"])
            if key not in best_sweep or row["p50_ms"] < best_sweep[key]["p50_ms"]:
                best_sweep[key] = row
    for row in table:
        if row["provider"].startswith("triton-sweep") and row is not best_sweep.get((row["shape"], row["layout"])):
            continue  # the table shows the best swept config per case; the jsonl has them all
        head = f"{row['shape']:<14}{row['layout']:<6} {row['provider']:<16}"
        if "error" in row:
            print(head + "n/a: ..." + row["error"][-70:])  # the reasons come last
            continue
        print(
            head
            + f"{row['p50_ms'] * 1e3:>9.1f}{row['gbps']:>8.0f}{_fmt(row['speedup_vs_eager'], '.2f'):>9}"
            + f"{_fmt(row['speedup_vs_compile'], '.2f'):>10}{_fmt(row['frac_of_copy_bw'], '.0%'):>8}"
            + (f"  {row['launch']}" if "launch" in row else "")
        )
    if skipped:
        print(f"skipped (time budget): {', '.join(skipped)}")


def _cpu_smoke() -> int:
    """Tiny shapes on the CPU: the fastdiff paths run and agree with torch eager."""
    from fastdiff.ops.group_norm import group_norm

    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    backends = ["reference"] + (["triton"] if interpret else [])
    print(f"{'shape':<18}{'layout':<6} {'provider':<20}{'median ms':>10}{'max diff':>10}")
    worst = 0.0
    for n, c, h, w in ((2, 64, 8, 8), (1, 96, 7, 9)):
        for layout in LAYOUTS:
            x, weight, bias = _inputs(n, c, h, w, layout, torch.float32, "cpu")
            expected = _eager(x, weight, bias)
            for backend in backends:
                times = []
                for _ in range(3 if backend == "triton" else 20):
                    start = time.perf_counter()
                    y = group_norm(x, GROUPS, weight, bias, EPS, "silu", backend=backend)
                    times.append(time.perf_counter() - start)
                diff = (y - expected).abs().max().item()
                worst = max(worst, diff)
                times.sort()
                print(f"{f'{n}x{c}x{h}x{w}':<18}{layout:<6} {'fastdiff-' + backend:<20}{times[len(times) // 2] * 1e3:>10.3f}{diff:>10.1e}")
    if worst > 1e-4:
        print(f"cpu smoke: FAILED, max diff {worst:.1e} from torch eager")
        return 1
    print(f"cpu smoke: ok (backends: {', '.join(backends)}; max diff {worst:.1e} from torch eager)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="directory for bench_group_norm.jsonl")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated groups: " + ",".join(SHAPES))
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: nchw,nhwc")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated: " + ",".join(PROVIDERS))
    parser.add_argument("--time-budget-s", type=float, default=200.0, help="skip the cases left after this many seconds")
    parser.add_argument("--cpu-smoke", action="store_true", help="run the small CPU check even if CUDA is available")
    parser.add_argument("--sweep", action="store_true", help="also time other launch configs of the Triton kernels (to re-tune the heuristic)")
    parser.add_argument("--backward", action="store_true", help="time forward + backward (gradients for x, weight, bias) instead of the forward")
    args = parser.parse_args(argv)
    for value, allowed, flag in ((args.shapes, SHAPES, "--shapes"), (args.layouts, LAYOUTS, "--layouts"), (args.providers, PROVIDERS, "--providers")):
        unknown = [v for v in value.split(",") if v not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; expected some of {list(allowed)}")
    if args.sweep and args.backward:
        parser.error("--sweep times forward launches only; run it without --backward")
    sys.path.insert(0, ROOT)
    if args.cpu_smoke or not torch.cuda.is_available():
        if not args.cpu_smoke:
            print("bench_group_norm: no CUDA device; running the CPU smoke check only (nothing is written)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported: Triton runs on the CPU
        return _cpu_smoke()

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    # Round-robin over the groups, so a time-budget cut trims every group's tail evenly.
    groups = [SHAPES[group] for group in args.shapes.split(",")]
    shapes = [group[i] for i in range(max(map(len, groups))) for group in groups if i < len(group)]
    layouts = args.layouts.split(",")
    providers = [p for p in PROVIDERS if p in args.providers.split(",")]
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_group_norm.jsonl")
    unavailable: dict = {}
    table, skipped = [], []
    start = time.monotonic()
    with open(path, "a") as sink:
        for name, n, c, h, w in shapes:
            for layout in layouts:
                if time.monotonic() - start > args.time_budget_s:
                    skipped.append(f"{name}/{layout}")
                    continue
                torch.manual_seed(0)
                results = _run_case(providers, n, c, h, w, layout, dtype, unavailable, args.sweep, args.backward)
                rows = _rows(env, results, name, n, c, h, w, layout, args.dtype, torch.finfo(dtype).bits // 8, args.backward)
                for row in rows:
                    sink.write(json.dumps(row) + "\n")
                sink.flush()
                table.extend(rows)
                logger.info("%s/%s done (%.0f s)", name, layout, time.monotonic() - start)
    print(f"results appended to {path}")
    _print_table(env, table, args.dtype + (", forward + backward" if args.backward else ""), skipped)
    return 0


if __name__ == "__main__":
    sys.exit(main())
