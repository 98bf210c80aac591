"""Benchmark one UNet step (SD1.5 and SDXL architectures): fastdiff against diffusers.

    python benchmarks/bench_unet.py [--out DIR] [--archs sd15,sdxl] [--compile] [--tiny]

Providers, all with the same random weights (seeded), fp16, batch 2 (CFG):

* ``diffusers-eager``: diffusers' UNet2DConditionModel with its default SDPA processor;
* ``diffusers-compile``: the same under ``torch.compile(mode="max-autotune-no-cudagraphs")``
  (only with ``--compile``: compiling takes minutes);
* ``fastdiff``: fastdiff's UNet2DConditionModel loaded from diffusers' state_dict,
  channels_last, every op on auto dispatch;
* ``fastdiff-graph``: the same step captured in a CUDA graph (static inputs).

Shapes: SD1.5 at 512x512 (latent 64x64, text 77x768) and SDXL at 1024x1024 (latent
128x128, text 77x2048, text_time conditioning). Metrics: p20/p50/p80 of the step time
(CUDA events around each call, after warm-up) and the speedup over diffusers-eager.
Each run appends JSON lines to ``DIR/bench_unet.jsonl`` with card, versions, commit and
date, and prints a short table after ``== table ==``.

``--tiny`` runs tiny configs in fp32 on whatever device is there (the CPU here), to
check the plumbing and that fastdiff's output matches diffusers'. Without CUDA and
without ``--tiny`` it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from bench_utils import ROOT, SD15_UNET as SD15, SDXL_UNET as SDXL, environment


TINY_SD = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)

# name -> (config, latent size, text length, text dim, SDXL-style added conditioning)
ARCHS = {
    "sd15": (SD15, 64, 77, 768, False),
    "sdxl": (SDXL, 128, 77, 2048, True),
    "tiny": (TINY_SD, 16, 7, 32, False),
}


def _inputs(arch: str, device, dtype, batch: int = 2):
    _, latent, text_len, text_dim, text_time = ARCHS[arch]
    g = torch.Generator().manual_seed(0)
    kwargs = {
        "sample": torch.randn(batch, 4, latent, latent, generator=g).to(device, dtype),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": torch.randn(batch, text_len, text_dim, generator=g).to(device, dtype),
    }
    if text_time:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 1280, generator=g).to(device, dtype),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch).to(device, dtype),
        }
    return kwargs


def _models(arch: str, device, dtype):
    """diffusers' UNet with seeded random weights, and fastdiff's loaded from its state_dict.

    Both are built directly on ``device`` (an SDXL UNet takes minutes to initialise on a CPU).
    """
    import diffusers

    import fastdiff

    torch.manual_seed(0)
    with torch.device(device):
        reference = diffusers.UNet2DConditionModel(**ARCHS[arch][0]).eval()
        ours = fastdiff.UNet2DConditionModel.from_config(dict(reference.config)).eval()
    ours.load_state_dict(reference.state_dict())
    reference = reference.to(dtype)
    ours = ours.to(dtype)
    if device.type == "cuda":
        ours = ours.to(memory_format=torch.channels_last)
    return reference, ours


def _time(fn, device, warmup: int, iters: int):
    """p20/p50/p80 in ms of ``fn()``: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
    return pick(0.2), pick(0.5), pick(0.8)


def _graphed(model, kwargs):
    """Capture one forward in a CUDA graph over static inputs; returns its replay function."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(**kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(**kwargs)
    return graph.replay


def bench_arch(arch: str, device, dtype, with_compile: bool, warmup: int, iters: int):
    reference, ours = _models(arch, device, dtype)
    kwargs = _inputs(arch, device, dtype)
    rows = []
    with torch.inference_mode():
        expected = reference(**kwargs).sample.float()
        got = ours(**kwargs).sample.float()
        max_diff = (got - expected).abs().max().item()
        scale = expected.abs().max().item()
        providers = {"diffusers-eager": lambda: reference(**kwargs), "fastdiff": lambda: ours(**kwargs)}
        if with_compile:
            compiled = torch.compile(reference, mode="max-autotune-no-cudagraphs")
            providers["diffusers-compile"] = lambda: compiled(**kwargs)
        if device.type == "cuda":
            providers["fastdiff-graph"] = _graphed(ours, kwargs)
        for name, fn in providers.items():
            t0 = time.perf_counter()
            p20, p50, p80 = _time(fn, device, warmup, iters)
            rows.append({"arch": arch, "provider": name, "p20_ms": p20, "p50_ms": p50, "p80_ms": p80, "setup_s": time.perf_counter() - t0})
    base = next(r["p50_ms"] for r in rows if r["provider"] == "diffusers-eager")
    for r in rows:
        r["speedup_vs_diffusers_eager"] = base / r["p50_ms"]
        r["max_abs_diff_vs_diffusers"] = max_diff
        r["output_scale"] = scale
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="directory for bench_unet.jsonl")
    parser.add_argument("--archs", default="sd15,sdxl", help="comma-separated: sd15,sdxl")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the diffusers UNet (minutes of compiling)")
    parser.add_argument("--tiny", action="store_true", help="tiny config in fp32 on the available device: a plumbing check")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        archs, dtype, warmup, iters = ["tiny"], torch.float32, 1, 3
    elif device.type != "cuda":
        print("bench_unet: no CUDA device; nothing to measure (use --tiny for a CPU plumbing check)")
        return 0
    else:
        archs, dtype, warmup, iters = args.archs.split(","), torch.float16, 3, args.iters
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"--archs: unknown {unknown}; expected names from {sorted(ARCHS)}")

    env = environment()
    table = []
    for arch in archs:
        table.extend(bench_arch(arch, device, dtype, args.compile, warmup, iters))
    if not args.tiny:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_unet.jsonl"), "a") as f:
            for row in table:
                f.write(json.dumps({**env, "dtype": str(dtype), "batch": 2, **row}) + "\n")

    print(f"{env['card']}, torch {env['torch']}, triton {env['triton']}, {dtype}, commit {env['commit']}")
    print("== table ==")
    print(f"{'arch':6} {'provider':18} {'p50 ms':>9} {'vs eager':>9} {'max diff':>9}")
    for r in table:
        print(f"{r['arch']:6} {r['provider']:18} {r['p50_ms']:9.3f} {r['speedup_vs_diffusers_eager']:8.2f}x {r['max_abs_diff_vs_diffusers']:9.2e}")
    worst = max(r["max_abs_diff_vs_diffusers"] / max(r["output_scale"], 1e-6) for r in table)
    if args.tiny and worst > 1e-4:
        print(f"bench_unet: fastdiff differs from diffusers by {worst:.2e} relative", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
