"""Benchmark one scheduler step with classifier-free guidance: diffusers' eager sequence vs fastdiff's fused op.

    python benchmarks/bench_scheduler_step.py [--out DIR] [--dtype fp16|bf16|fp32]
        [--shapes sd15,sdxl] [--schedulers ddim,euler,euler_ancestral,ddpm,dpmpp_2m] [--compile]

Per (latent shape, scheduler), providers:

* ``diffusers-eager``: what a diffusers pipeline runs after the UNet:
  ``noise_pred.chunk(2)``, ``u + g * (c - u)``, then ``scheduler.step`` (which
  draws its own noise for ancestral steps);
* ``fastdiff-reference``: the op's plain PyTorch twin (same math, many launches);
* ``fastdiff-triton`` and ``fastdiff-cuda``: the fused op, one launch, reading
  both CFG halves in place; noise comes from a pre-drawn per-step bank, as in a
  captured loop;
* ``fastdiff-triton-graph`` and ``fastdiff-cuda-graph``: the fused step captured
  in a CUDA graph (step index advanced on the device) and replayed;
* with ``--compile``, ``torch-compile-reference``: Inductor's fusion of the
  reference twin (the same math), for comparison with the hand-written kernels.

Metrics: p20/p50/p80 time per step (``triton.testing.do_bench``; it records
events around each call, so host launch overhead that starves the GPU counts),
the speedup over ``diffusers-eager`` (its p50 over the provider's), kernel
launches per step (device events in ``torch.profiler``, memcpy/memset included),
and the max abs difference from diffusers' result. Each run appends one JSON
line per measurement to ``DIR/bench_scheduler_step.jsonl`` with the card,
versions, commit and date, and prints a short table after ``== table ==``.
Without CUDA it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

import torch
from bench_utils import ROOT, environment, timings


# (name, latent shape). SD1.5 at 512x512 and SDXL at 1024x1024, batch 1 with CFG (UNet batch 2).
SHAPES = {"sd15": [("sd15-1x4x64x64", (1, 4, 64, 64))], "sdxl": [("sdxl-1x4x128x128", (1, 4, 128, 128))]}
GUIDANCE = 7.5
NUM_STEPS = 30
STEP = 10  # the step timed: past the first-order warm-up of multistep solvers


def _schedulers():
    """name -> (diffusers class name, config, table builder of a set scheduler, step kwargs, history slots)."""
    ops = importlib.import_module("fastdiff.ops.scheduler_step")
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    return {
        "ddim": (
            "DDIMScheduler", {**sd, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1},
            lambda s, dev: ops.ddim_coeffs(s.alphas_cumprod, s.timesteps, final_alpha_cumprod=s.final_alpha_cumprod, device=dev), {}, 0,
        ),
        "euler": ("EulerDiscreteScheduler", sd, lambda s, dev: ops.euler_coeffs(s.sigmas, device=dev), {}, 0),
        "euler_ancestral": ("EulerAncestralDiscreteScheduler", sd, lambda s, dev: ops.euler_ancestral_coeffs(s.sigmas, device=dev), {}, 0),
        "ddpm": ("DDPMScheduler", {**sd, "clip_sample": False}, lambda s, dev: ops.ddpm_coeffs(s.alphas_cumprod, s.timesteps, device=dev), {}, 0),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", sd, lambda s, dev: ops.dpmpp_2m_coeffs(s.sigmas, device=dev), {}, 1),
    }


def _launches(fn) -> int:
    """Device events (kernels, memcpy, memset) one call of ``fn`` produces."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _bench(fn) -> dict:
    out = fn().clone()  # first call: compiles, must run, and is the result checked (later calls reuse buffers)
    return {"out": out, **timings(fn, rep=200), "launches": _launches(fn)}


def _providers(shape, dtype, spec, compile_reference=False):
    """Provider name -> zero-argument function returning x_prev, for one scheduler at step STEP."""
    import diffusers

    from fastdiff.ops.scheduler_step import scheduler_step

    cls_name, config, build, step_kwargs, slots = spec
    sched = getattr(diffusers, cls_name)(**config)
    sched.set_timesteps(NUM_STEPS, device="cuda")
    t = sched.timesteps[STEP]
    sched.is_scale_input_called = True  # the pipeline scaled the UNet input; no per-step warning (Euler schedulers)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    model_output = torch.randn((2 * shape[0], *shape[1:]), device="cuda", generator=g, dtype=torch.float32).to(dtype)
    # The previous x0 of multistep solvers, the same for diffusers and for the fused history ring.
    history = torch.randn((slots, *shape), device="cuda", generator=g, dtype=torch.float32).to(dtype) if slots else None
    if isinstance(sched, diffusers.DPMSolverMultistepScheduler):  # second order at STEP, like mid-loop
        sched.model_outputs = [history[0].clone(), history[0].clone()]
        sched.lower_order_nums = sched.config.solver_order
    # diffusers' step draws its noise from `noise_gen`, re-seeded every call, so the
    # fused providers' bank holds the same values at STEP (and the results compare).
    noise_gen = torch.Generator(device="cuda")
    bank = torch.randn((NUM_STEPS, *shape), device="cuda", generator=g, dtype=torch.float32).to(dtype)
    bank[STEP] = torch.randn(shape, device="cuda", generator=noise_gen.manual_seed(1), dtype=dtype)

    def eager():
        if hasattr(sched, "_step_index"):
            sched._step_index = STEP
        uncond, cond = model_output.chunk(2)
        noise_pred = uncond + GUIDANCE * (cond - uncond)
        return sched.step(noise_pred, t, x, generator=noise_gen.manual_seed(1), **step_kwargs).prev_sample

    coeffs = build(sched, "cuda")

    def fused(backend):
        ring = history.clone() if slots else None  # each provider starts from the same history
        index, out = torch.tensor(STEP, device="cuda"), torch.empty_like(x)
        return lambda: scheduler_step(x, model_output, coeffs, index, guidance_scale=GUIDANCE, noise=bank, history=ring, out=out, backend=backend)

    def graphed(backend):
        ring = history.clone() if slots else None
        index, out = torch.tensor(STEP, device="cuda"), torch.empty_like(x)
        step = lambda: scheduler_step(x, model_output, coeffs, index, guidance_scale=GUIDANCE, noise=bank, history=ring, out=out, advance_step_index=True, backend=backend)  # noqa: E731
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up: compiles outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        index.fill_(STEP)  # the warm-up advanced it; the first replay (the checked one) runs step STEP
        if slots:
            ring.copy_(history)

        def replay():
            # Later replays run past the table (NaN rows): same work, same time.
            graph.replay()
            return out

        return replay

    providers = {"diffusers-eager": eager, "fastdiff-reference": fused("reference")}
    if compile_reference:  # Inductor's fusion of the same math, the anchor in shared/TARGETS.md
        from fastdiff.ops.scheduler_step import scheduler_step_ref

        compiled = torch.compile(scheduler_step_ref, fullgraph=True)
        ring = history.clone() if slots else None
        index, out = torch.tensor(STEP, device="cuda"), torch.empty_like(x)
        providers["torch-compile-reference"] = lambda: compiled(x, model_output, coeffs, index, GUIDANCE, bank, ring, out)
    for backend in ("triton", "cuda"):
        providers[f"fastdiff-{backend}"] = fused(backend)
        providers[f"fastdiff-{backend}-graph"] = (lambda b=backend: graphed(b))
    return providers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="directory for bench_scheduler_step.jsonl")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--shapes", default="sd15,sdxl", help="comma-separated groups: " + ",".join(SHAPES))
    parser.add_argument("--schedulers", default="ddim,euler,euler_ancestral,ddpm,dpmpp_2m")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the reference twin (slow to compile; off by default)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_scheduler_step: no CUDA device; nothing to benchmark")
        return 0
    if importlib.util.find_spec("diffusers") is None:
        print("bench_scheduler_step: diffusers is not installed; the eager baseline needs it")
        return 1
    sys.path.insert(0, ROOT)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    specs = _schedulers()
    env = environment()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_scheduler_step.jsonl")
    table = []
    with open(path, "a") as sink:
        for shape_name, shape in [s for group in args.shapes.split(",") for s in SHAPES[group]]:
            for sched_name in args.schedulers.split(","):
                results = {}
                for provider, fn in _providers(shape, dtype, specs[sched_name], args.compile).items():
                    try:
                        if provider.endswith("-graph"):
                            fn = fn()
                        results[provider] = _bench(fn)
                    except Exception as err:  # noqa: BLE001 - record why a provider could not run (e.g. no extension)
                        results[provider] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                eager = results["diffusers-eager"]
                for provider, r in results.items():
                    row = {**env, "op": "scheduler_step", "shape": shape_name, "latent": list(shape), "scheduler": sched_name, "dtype": args.dtype, "guidance": GUIDANCE, "provider": provider}
                    if "error" in r:
                        row["error"] = r["error"]
                    else:
                        row.update({key: r[key] for key in ("p20_ms", "p50_ms", "p80_ms", "launches")})
                        row["speedup_vs_eager"] = eager["p50_ms"] / r["p50_ms"] if "p50_ms" in eager else None
                        if "out" in eager:
                            row["max_abs_diff_vs_eager"] = (r["out"].float() - eager["out"].float()).abs().max().item()
                    sink.write(json.dumps(row) + "\n")
                    table.append(row)
    print(f"results appended to {path}")
    print("== table ==")
    print(f"{env['card']} ({env['capability']}), torch {env['torch']}, triton {env['triton']}, {args.dtype}, commit {env['commit']}")
    print(f"{'shape':<18}{'scheduler':<17}{'provider':<23}{'p50 us':>9}{'launches':>9}{'x eager':>9}{'max diff':>10}")
    for row in table:
        head = f"{row['shape']:<18}{row['scheduler']:<17}{row['provider']:<23}"
        if "error" in row:
            print(head + "n/a: " + row["error"][:60])
        else:
            speedup = f"{row['speedup_vs_eager']:.2f}" if row["speedup_vs_eager"] else "-"
            diff = f"{row['max_abs_diff_vs_eager']:.1e}" if "max_abs_diff_vs_eager" in row else "-"
            print(head + f"{row['p50_ms'] * 1e3:>9.1f}{row['launches']:>9}{speedup:>9}{diff:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
