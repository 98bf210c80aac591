"""Benchmark one UNet step (SD1.5 and SDXL architectures): fastdiff against diffusers, fairly, with a per-op ablation.

    python benchmarks/bench_unet.py [--out DIR] [--archs sd15,sdxl] [--compile] [--no-ablation] [--tiny]

Providers, all with the same random weights (seeded), fp16, batch 2 (CFG):

* ``diffusers-eager``: diffusers' UNet2DConditionModel with its default SDPA processor (NCHW);
* ``diffusers-eager-cl``: the same in channels_last, as diffusers' own speed guide runs it (and as
  fastdiff runs): the fair eager baseline;
* ``diffusers-graph-cl``: diffusers channels_last, its step captured in a CUDA graph (static inputs),
  the fair baseline for ``fastdiff-graph``;
* ``diffusers-compile-cl`` and ``diffusers-compile-max-autotune-cl`` (with ``--compile``: minutes of
  compiling): ``torch.compile`` of the channels_last diffusers UNet in the default mode, and in
  ``mode="max-autotune"``, which autotunes GEMMs/convolutions and replays inductor's own CUDA graphs;
* ``fastdiff``: fastdiff's UNet2DConditionModel loaded from diffusers' state_dict, channels_last,
  every op on auto dispatch;
* ``fastdiff-graph``: the same step captured in a CUDA graph (static inputs);
* the per-op ablation, inside the graph: ``fastdiff-graph[<op>=reference]`` captures the step with
  that one fused op switched back to its reference (``fastdiff.use_backend(<op>="reference")``,
  which is read when the graph is captured), for every op the UNet dispatches (group_norm,
  attention, geglu; the scheduler step is not part of a UNet call), and
  ``fastdiff-graph[all=reference]`` with every op on reference. ``gain_ms`` of an ablation row is
  its p50 minus ``fastdiff-graph``'s: the time that op's fused backend saves per step. An op whose
  auto choice is already ``reference`` (GEGLU until a GPU measures it) is also captured with its
  fused backend forced (``fastdiff-graph[geglu=triton]``), so the same run says what switching it
  on would gain.

Shapes: SD1.5 at 512x512 (latent 64x64, text 77x768) and SDXL at 1024x1024 (latent
128x128, text 77x2048, text_time conditioning). Metrics: p20/p50/p80 of the step time
(CUDA events around each call, after warm-up) and the speedup over diffusers-eager and over
diffusers-eager-cl (with ``--compile``, also over diffusers-compile-max-autotune-cl, in the JSON).
Each run appends JSON lines to ``DIR/bench_unet.jsonl`` with card, versions, commit and date, and
prints a short table after ``== table ==``.

``--tiny`` is a CPU plumbing check, not a measurement: tiny configs in fp32 on whatever device is
there (the CPU here), every provider's code path (the graph providers through
``fastdiff.graphs.StandInBackend``, the CPU stand-in with a CUDA graph's capture/replay semantics;
``--compile`` through ``torch.compile(backend="eager")``), each output checked against diffusers',
and nothing written to the results file. Without CUDA and without ``--tiny`` it prints one line
and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
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

PLUMBING_NOTE = "CPU plumbing check (--tiny): these times are not GPU timings and are not recorded"


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
    fastdiff's runs channels_last on CUDA (its fused GroupNorm reads NHWC in place).
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


def _channels_last_copy(model):
    """A channels_last copy of a diffusers UNet (the NCHW one stays for diffusers-eager)."""
    import copy

    return copy.deepcopy(model).to(memory_format=torch.channels_last)


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


def _sample(output):
    """The sample tensor of a UNet call (an output object, or a tuple from a compiled graph)."""
    return output.sample if hasattr(output, "sample") else output[0]


class _Graphed:
    """One UNet forward captured over static inputs; ``replay()`` runs it, ``output`` is its static result.

    On CUDA a ``torch.cuda.CUDAGraph`` (after an eager warm-up on a side stream, which compiles and
    autotunes every kernel first); elsewhere (``--tiny``) fastdiff's ``StandInBackend``, which records
    the ATen ops of the capture and replays them with the same static-buffer semantics.
    ``backend_choice``: ``fastdiff.use_backend`` keywords in force during warm-up and capture, so
    the graph holds those backends' kernels."""

    def __init__(self, model, kwargs, device, backend_choice=None):
        import fastdiff

        scope = fastdiff.use_backend(**backend_choice) if backend_choice else contextlib.nullcontext()
        self.device = device
        with scope:
            if device.type == "cuda":
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):
                        model(**kwargs)
                torch.cuda.current_stream().wait_stream(stream)
                self.handle = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.handle):
                    self.output = _sample(model(**kwargs))
            else:
                from fastdiff.graphs import StandInBackend

                model(**kwargs)
                self.backend = StandInBackend()
                self.handle, out, _ = self.backend.capture(lambda: _sample(model(**kwargs)), self.backend.new_pool(device), device)
                self.output = out

    def replay(self):
        if self.device.type == "cuda":
            self.handle.replay()
        else:
            self.backend.replay(self.handle)
        return self.output


def _ops_and_backends(model, kwargs):
    """op name -> the backends auto dispatch gives it in one forward of ``model`` (fused ops only;
    the trace also names the attention processors, which are not ops)."""
    import fastdiff
    from fastdiff import backends

    with fastdiff.trace_dispatch() as calls:
        model(**kwargs)
    chosen = {}
    for op, backend in calls:
        if op in backends._DISPATCHERS:
            chosen.setdefault(op, set()).add(backend)
    return {op: sorted(backends) for op, backends in sorted(chosen.items())}


def _ablation_variants(model, kwargs, device):
    """(provider name, use_backend keywords, what it ablates) for the per-op ablation inside the graph,
    and op -> the backends auto dispatch chose in one eager forward."""
    from fastdiff import backends

    chosen = _ops_and_backends(model, kwargs)
    variants = []
    for op, used in chosen.items():
        if used != ["reference"]:
            variants.append((f"fastdiff-graph[{op}=reference]", {op: "reference"}, op))
        elif device.type == "cuda" and "triton" in backends.get_dispatcher(op).backends:
            # auto keeps this op on reference (not measured yet): measure what its fused kernel would gain
            variants.append((f"fastdiff-graph[{op}=triton]", {op: "triton"}, op))
    if chosen:
        variants.append(("fastdiff-graph[all=reference]", {op: "reference" for op in chosen}, "all"))
    return chosen, variants


def _compiled_call(model, mode: str, device, kwargs):
    """A call of ``torch.compile(model, mode=mode)``; on the CPU plumbing path, Dynamo with the eager
    backend (the same code path, in seconds, without inductor)."""
    compiled = torch.compile(model, mode=mode) if device.type == "cuda" else torch.compile(model, backend="eager")
    return lambda: _sample(compiled(**kwargs))


def _providers(arch, reference, ours, kwargs, device, with_compile, with_ablation):
    """name -> (a callable returning the sample, metadata for the row). Built lazily by the caller,
    one at a time, so a captured graph's memory is freed before the next one is captured."""
    providers = {
        "diffusers-eager": (lambda: (lambda: _sample(reference(**kwargs))), {}),
    }
    reference_cl = _channels_last_copy(reference)
    providers["diffusers-eager-cl"] = (lambda: (lambda: _sample(reference_cl(**kwargs))), {"channels_last": True})
    providers["diffusers-graph-cl"] = (lambda: _Graphed(reference_cl, kwargs, device).replay, {"channels_last": True, "graph": True})
    if with_compile:
        for name, mode in (("diffusers-compile-cl", "default"), ("diffusers-compile-max-autotune-cl", "max-autotune")):
            providers[name] = (
                lambda mode=mode: _compiled_call(reference_cl, mode, device, kwargs),
                {"channels_last": True, "compile_mode": mode if device.type == "cuda" else "eager backend (plumbing)"},
            )
    providers["fastdiff"] = (lambda: (lambda: _sample(ours(**kwargs))), {"channels_last": device.type == "cuda"})
    providers["fastdiff-graph"] = (lambda: _Graphed(ours, kwargs, device).replay, {"channels_last": device.type == "cuda", "graph": True})
    if with_ablation:
        chosen, variants = _ablation_variants(ours, kwargs, device)
        for name, choice, op in variants:
            providers[name] = (
                lambda choice=choice: _Graphed(ours, kwargs, device, backend_choice=choice).replay,
                {"graph": True, "ablation": op, "backends": choice, "auto_backends": chosen.get(op, chosen)},
            )
    return providers


def bench_arch(arch: str, device, dtype, with_compile: bool, warmup: int, iters: int, with_ablation: bool = True):
    import fastdiff

    reference, ours = _models(arch, device, dtype)
    kwargs = _inputs(arch, device, dtype)
    rows = []
    with torch.inference_mode():
        expected = _sample(reference(**kwargs)).float()
        scale = expected.abs().max().item()
        for name, (build, meta) in _providers(arch, reference, ours, kwargs, device, with_compile, with_ablation).items():
            t0 = time.perf_counter()
            try:
                with fastdiff.trace_dispatch() as calls:  # warm-up and capture included: the graph's backends
                    fn = build()
                    got = fn().float()
            except Exception as error:  # noqa: BLE001 - a provider that cannot run is recorded, not fatal
                rows.append({"arch": arch, "provider": name, **meta, "error": f"{type(error).__name__}: {error}"[:500]})
                continue
            max_diff = (got - expected).abs().max().item()
            p20, p50, p80 = _time(fn, device, warmup, iters)
            rows.append({
                "arch": arch, "provider": name, **meta, "p20_ms": p20, "p50_ms": p50, "p80_ms": p80,
                "setup_s": time.perf_counter() - t0, "max_abs_diff_vs_diffusers": max_diff, "output_scale": scale,
                "dispatch": sorted(set(calls)),
            })  # fmt: skip
            del fn
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
    timed = {r["provider"]: r["p50_ms"] for r in rows if "p50_ms" in r}
    graph = timed.get("fastdiff-graph")
    for r in rows:
        if "p50_ms" not in r:
            continue
        for base in ("diffusers-eager", "diffusers-eager-cl", "diffusers-compile-max-autotune-cl"):
            if base in timed:
                r[f"speedup_vs_{base.replace('-', '_')}"] = timed[base] / r["p50_ms"]
        if "ablation" in r and graph is not None:
            r["gain_ms"] = r["p50_ms"] - graph  # > 0: the fused backend saves this much per step
    return rows


def _print_table(table, plumbing: bool):
    print("== table ==")
    if plumbing:
        print(PLUMBING_NOTE)
    print(f"{'arch':6} {'provider':36} {'p50 ms':>9} {'vs eager':>9} {'vs cl':>7} {'gain ms':>8} {'max diff':>9}")
    for r in table:
        if "error" in r:
            print(f"{r['arch']:6} {r['provider']:36} failed: {r['error'][:80]}")
            continue
        gain = f"{r['gain_ms']:8.3f}" if "gain_ms" in r else f"{'':8}"
        print(
            f"{r['arch']:6} {r['provider']:36} {r['p50_ms']:9.3f} {r.get('speedup_vs_diffusers_eager', float('nan')):8.2f}x "
            f"{r.get('speedup_vs_diffusers_eager_cl', float('nan')):6.2f}x {gain} {r['max_abs_diff_vs_diffusers']:9.2e}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="directory for bench_unet.jsonl")
    parser.add_argument("--archs", default="sd15,sdxl", help="comma-separated: sd15,sdxl")
    parser.add_argument("--compile", action="store_true", help="add torch.compile of the diffusers UNet, default and max-autotune modes (minutes of compiling)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the per-op ablation inside the graph")
    parser.add_argument("--tiny", action="store_true", help="tiny config in fp32 on the available device: a plumbing check, not a measurement")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        archs, dtype, warmup, iters = ["tiny"], torch.float32, 1, 2
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
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny convolutions on a shared CPU: more threads only oversubscribe it
    try:
        for arch in archs:
            table.extend(bench_arch(arch, device, dtype, args.compile, warmup, iters, with_ablation=not args.no_ablation))
    finally:
        torch.set_num_threads(threads)
    if not args.tiny:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_unet.jsonl"), "a") as f:
            for row in table:
                f.write(json.dumps({**env, "dtype": str(dtype), "batch": 2, **row}, default=str) + "\n")

    print(f"{env['card']}, torch {env['torch']}, triton {env['triton']}, {dtype}, commit {env['commit']}")
    _print_table(table, plumbing=args.tiny)
    failed = [r["provider"] for r in table if "error" in r]
    if failed:
        print(f"bench_unet: providers failed: {failed}", file=sys.stderr)
    # fp32 on the CPU: every provider (graphs and ablations included) must match diffusers closely.
    # In fp16 on a GPU the differences are recorded (max diff column), not judged here.
    worst = max((r["max_abs_diff_vs_diffusers"] / max(r["output_scale"], 1e-6) for r in table if "error" not in r), default=0.0)
    if args.tiny and worst > 1e-4:
        print(f"bench_unet: a provider differs from diffusers by {worst:.2e} relative", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
