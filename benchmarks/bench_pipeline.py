"""Benchmark whole text-to-image pipelines: fastdiff against diffusers, and the spatial resampler.

    python benchmarks/bench_pipeline.py [--out DIR] [--archs sd15,sdxl] [--steps 50]   # GPU mode
    python benchmarks/bench_pipeline.py --cpu                                           # CPU plumbing
    python benchmarks/bench_pipeline.py --resampler-table [--out DIR]                   # speed/drift table

GPU mode: Stable Diffusion 1.5 (512x512) and SDXL (1024x1024) architectures with seeded random
weights, fp16, batch 1 with classifier-free guidance, ``--steps`` denoising steps (DDIM for SD1.5,
Euler for SDXL) and the VAE decode. Text encoders are left out (random prompt embeddings of the
real shapes), so the numbers are the denoising loop and the decode. Providers:

* ``diffusers-eager``: diffusers' pipeline with its default SDPA attention;
* ``diffusers-compile``: the same with its UNet under ``torch.compile(mode="max-autotune")``;
* ``fastdiff-eager``: fastdiff's pipeline on the same weights, channels_last UNet, every op on auto
  dispatch, the guidance folded into the scheduler's fused step, CUDA graphs off (``cuda_graph=False``);
* ``fastdiff-graphs``: the same with its denoising loop captured as CUDA graphs (the default);
* ``fastdiff-compile-graphs``: ``pipe.compile_unet()`` (inductor, ``max-autotune-no-cudagraphs``, our
  ops inside) and the graph runner capturing the compiled UNet.

``--providers`` picks some of them. Metrics: seconds per image (median of ``--repeats`` after one
warm-up), it/s (steps / seconds), peak GPU memory, the largest pixel difference from
diffusers-eager's images, the first-image time in a new process (``--first-image``: cold with empty
Triton/inductor caches, then warm with the caches the cold run filled, Triton's autotune choices kept
on disk by ``fastdiff.graphs.enable_triton_autotune_cache``), and the GPU memory reserved after
cycling 5 resolutions 3 times (``--cycle``; not for the compiled providers, which recompile per shape).

``--cpu``: tiny configs in fp32 on the CPU, 3 steps; checks the plumbing and that fastdiff's images
match diffusers' to 1e-3 (CI runs it through tests/test_pipeline_bench.py).

``--resampler-table``: the spatial resampler's speed and drift on the tiny SD-style model on the CPU
(or on the SD1.5 architecture with ``--archs sd15`` on a GPU): for each ``fastdiff.Resampler``
setting, the time per image against the plain full-resolution loop and the drift of its images from
the plain run's (PSNR in dB and SSIM, mean over seeds). Writes ``DIR/resampler_cpu.jsonl`` on the
CPU (one torch thread, for stable timings on a shared machine) and joins ``DIR/bench_pipeline.jsonl``
on a GPU.

Every mode appends JSON lines (with card, versions, commit and date) to ``DIR`` and prints a short
table after ``== table ==``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
from bench_utils import ROOT, SD15_UNET, SDXL_UNET, environment

SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)
TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=4,  # 4 heads of dim 8 in the 32-channel blocks
    norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1
)

# name -> (unet config, vae config, image size, text length, text dim, SDXL, scheduler class)
ARCHS = {
    "sd15": (SD15_UNET, SD_VAE, 512, 77, 768, False, "DDIMScheduler"),
    "sdxl": (SDXL_UNET, SD_VAE, 1024, 77, 2048, True, "EulerDiscreteScheduler"),
    "tiny": (TINY_UNET, TINY_VAE, 64, 7, 32, False, "DPMSolverMultistepScheduler"),
}


def _pipelines(arch: str, device, dtype):
    """diffusers' pipeline with seeded random weights, and fastdiff's on the same weights."""
    import diffusers

    import fastdiff

    unet_config, vae_config, _, _, _, sdxl, scheduler_name = ARCHS[arch]
    torch.manual_seed(0)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**unet_config).eval()
        vae = diffusers.AutoencoderKL(**vae_config).eval()
        our_unet = fastdiff.UNet2DConditionModel.from_config(dict(unet.config)).eval()
        our_vae = fastdiff.AutoencoderKL.from_config(dict(vae.config)).eval()
    our_unet.load_state_dict(unet.state_dict())
    our_vae.load_state_dict(vae.state_dict())
    scheduler_config = dict(SD_SCHEDULER, **({"clip_sample": False} if scheduler_name == "DDIMScheduler" else {}))
    if sdxl:
        common = dict(text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
        reference = diffusers.StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=getattr(diffusers, scheduler_name)(**scheduler_config), **common
        )
        ours = fastdiff.StableDiffusionXLPipeline(
            vae=our_vae, unet=our_unet, scheduler=getattr(fastdiff, scheduler_name)(**scheduler_config), **common
        )
    else:
        common = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None)
        reference = diffusers.StableDiffusionPipeline(
            vae=vae, unet=unet, scheduler=getattr(diffusers, scheduler_name)(**scheduler_config),
            requires_safety_checker=False, **common,
        )  # fmt: skip
        ours = fastdiff.StableDiffusionPipeline(
            vae=our_vae, unet=our_unet, scheduler=getattr(fastdiff, scheduler_name)(**scheduler_config),
            requires_safety_checker=False, **common,
        )  # fmt: skip
    for pipe in (reference, ours):
        pipe.to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
    if torch.device(device).type == "cuda":
        ours.unet.to(memory_format=torch.channels_last)
    return reference, ours


def _call_kwargs(arch: str, device, dtype, steps: int, seed: int = 0):
    _, _, size, text_len, text_dim, sdxl, _ = ARCHS[arch]
    g = torch.Generator().manual_seed(1000 + seed)
    kwargs = dict(
        prompt_embeds=torch.randn(1, text_len, text_dim, generator=g).to(device, dtype),
        negative_prompt_embeds=torch.randn(1, text_len, text_dim, generator=g).to(device, dtype),
        height=size, width=size, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
    )  # fmt: skip
    if sdxl:
        kwargs["pooled_prompt_embeds"] = torch.randn(1, 1280, generator=g).to(device, dtype)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(1, 1280, generator=g).to(device, dtype)
    return kwargs


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _run(pipe, kwargs, seed, device):
    """(images, seconds) of one call with a CPU generator seeded ``seed``."""
    _sync(device)
    start = time.perf_counter()
    images = pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images
    _sync(device)
    return images, time.perf_counter() - start


PROVIDERS = ("diffusers-eager", "diffusers-compile", "fastdiff-eager", "fastdiff-graphs", "fastdiff-compile-graphs")
# resolutions cycled for the memory figure, per arch (5 sizes around the native one)
CYCLE_SIZES = {"sd15": (384, 448, 512, 576, 640), "sdxl": (768, 832, 896, 960, 1024), "tiny": (32, 48, 64, 80, 96)}


def _provider_pipe(name: str, reference, ours):
    """(pipeline, extra call kwargs) for provider ``name``; compiles in place where asked."""
    if name == "diffusers-eager":
        return reference, {}
    if name == "diffusers-compile":
        reference.unet = torch.compile(reference.unet, mode="max-autotune")
        return reference, {}
    if name == "fastdiff-eager":
        return ours, {"cuda_graph": False}
    if name == "fastdiff-graphs":
        return ours, {"cuda_graph": True}
    if name == "fastdiff-compile-graphs":
        ours.compile_unet()
        return ours, {"cuda_graph": True}
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def _memory_after_cycle(pipe, kwargs, arch, device):
    """GPU memory reserved (GiB) after 5 resolutions cycled 3 times (3 steps each), and per cycle."""
    torch.cuda.synchronize()
    per_cycle = []
    for _ in range(3):
        for size in CYCLE_SIZES[arch]:
            _run(pipe, {**kwargs, "height": size, "width": size, "num_inference_steps": 3}, 0, device)
        torch.cuda.synchronize()
        per_cycle.append(torch.cuda.memory_reserved() / 2**30)
    return per_cycle[-1], per_cycle


def bench_arch(arch: str, device, dtype, steps: int, repeats: int, providers=PROVIDERS, cycle: bool = False):
    reference, ours = _pipelines(arch, device, dtype)
    base_kwargs = _call_kwargs(arch, device, dtype, steps)
    rows, images = [], {}
    cuda = torch.device(device).type == "cuda"
    order = [p for p in PROVIDERS if p in providers]  # eager before compile: compiling is in place
    for name in order:
        pipe, extra = _provider_pipe(name, reference, ours)
        kwargs = {**base_kwargs, **extra}
        _run(pipe, {**kwargs, "num_inference_steps": min(3, steps)}, 0, device)  # warm-up (compile, capture)
        _run(pipe, {**kwargs, "num_inference_steps": min(3, steps)}, 0, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            images[name], seconds = _run(pipe, kwargs, 0, device)
            times.append(seconds)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        seconds = statistics.median(times)
        row = {"arch": arch, "provider": name, "steps": steps, "seconds": seconds, "it_per_s": steps / seconds,
               "peak_gib": peak}  # fmt: skip
        if name.startswith("fastdiff") and getattr(pipe, "graph_runner", None) is not None:
            row["graph_stats"] = pipe.graph_runner.stats
            row["loop_eager_reasons"] = list(getattr(pipe, "_last_loop_reasons", []))
        if cycle and cuda and "compile" not in name:
            row["reserved_after_cycle_gib"], row["reserved_per_cycle_gib"] = _memory_after_cycle(pipe, kwargs, arch, device)
            if getattr(pipe, "graph_runner", None) is not None:
                row["graph_bytes_after_cycle"] = pipe.graph_runner.nbytes
                pipe.release_graphs()
                torch.cuda.empty_cache()
                row["reserved_after_release_gib"] = torch.cuda.memory_reserved() / 2**30
        rows.append(row)
    base_name = "diffusers-eager" if "diffusers-eager" in images else order[0]
    base = next(r["seconds"] for r in rows if r["provider"] == base_name)
    for row in rows:
        diff = float(np.abs(images[row["provider"]].astype(np.float64) - images[base_name]).max())
        row.update(speedup=base / row["seconds"], max_pixel_diff_vs_diffusers=diff)
    del reference, ours
    return rows


def first_image_child(arch: str, provider: str, steps: int) -> dict:
    """In this (new) process: build the pipelines, then time the first image of ``provider``."""
    from fastdiff.graphs import enable_triton_autotune_cache

    cache = enable_triton_autotune_cache()
    reference, ours = _pipelines(arch, "cuda", torch.float16)
    pipe, extra = _provider_pipe(provider, reference, ours)
    kwargs = {**_call_kwargs(arch, "cuda", torch.float16, steps), **extra}
    _, seconds = _run(pipe, kwargs, 0, "cuda")
    return {"first_image_s": seconds, "autotune_disk_cache": sorted(cache["kernels"])}


def first_image_times(arch: str, provider: str, steps: int) -> dict:
    """First-image seconds in a new process: cold (empty Triton and inductor caches), then warm (the
    caches the cold process filled)."""
    import subprocess
    import tempfile

    result = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"),
                   TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"))  # fmt: skip
        for label in ("cold", "warm"):
            command = [sys.executable, os.path.abspath(__file__), "--first-image-child", f"{arch}:{provider}:{steps}"]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                result[f"first_image_{label}_error"] = (done.stderr or done.stdout)[-500:]
                continue
            result[f"first_image_{label}_s"] = json.loads(lines[-1])["first_image_s"]
    return result


# ---------------------------------------------------------------------------------- drift metrics


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004) of (H, W, C) images in [0, 1]: 11x11 Gaussian window (sigma 1.5),
    per channel, then averaged."""
    x = torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[:, None]
    y = torch.from_numpy(b.astype(np.float64)).permute(2, 0, 1)[:, None]
    size = min(11, x.shape[-1], x.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]

    def blur(t):
        return torch.nn.functional.conv2d(t, window)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    value = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return float(value.mean())


RESAMPLER_SETTINGS = [(0.5, 0.2), (0.5, 0.4), (0.5, 0.6), (0.75, 0.4)]


def resampler_table(arch: str, device, dtype, steps: int, seeds: int, repeats: int):
    import fastdiff

    _, ours = _pipelines(arch, device, dtype)
    kwargs = _call_kwargs(arch, device, dtype, steps)
    _run(ours, {**kwargs, "num_inference_steps": 2}, 0, device)  # warm-up
    plain_images, plain_times = [], []
    for seed in range(seeds):
        runs = [_run(ours, kwargs, seed, device) for _ in range(repeats)]
        plain_images.append(runs[0][0][0])
        plain_times.append(statistics.median(r[1] for r in runs))
    plain_seconds = statistics.median(plain_times)
    rows = [{"arch": arch, "setting": "plain", "scale": 1.0, "fraction": 0.0, "seconds": plain_seconds,
             "speedup": 1.0, "psnr_db": math.inf, "ssim": 1.0, "steps": steps, "seeds": seeds}]  # fmt: skip
    for scale, fraction in RESAMPLER_SETTINGS:
        ours.set_spatial_resampler(fastdiff.Resampler(scale=scale, fraction=fraction))
        times, psnrs, ssims = [], [], []
        for seed in range(seeds):
            runs = [_run(ours, kwargs, seed, device) for _ in range(repeats)]
            image = runs[0][0][0]
            times.append(statistics.median(r[1] for r in runs))
            psnrs.append(psnr(image, plain_images[seed]))
            ssims.append(ssim(image, plain_images[seed]))
        seconds = statistics.median(times)
        rows.append({"arch": arch, "setting": f"Resampler(scale={scale}, fraction={fraction})", "scale": scale,
                     "fraction": fraction, "seconds": seconds, "speedup": plain_seconds / seconds,
                     "psnr_db": statistics.mean(psnrs), "ssim": statistics.mean(ssims), "steps": steps,
                     "seeds": seeds})  # fmt: skip
    ours.set_spatial_resampler(None)
    return rows


# -------------------------------------------------------------------------------------- main


def _write(out_dir: str, name: str, rows, env):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="folder for the .jsonl")
    parser.add_argument("--archs", default="sd15,sdxl", help="comma-separated: sd15,sdxl (GPU) or tiny")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="tiny fp32 plumbing run on the CPU")
    parser.add_argument("--resampler-table", action="store_true", help="the spatial resampler's speed and drift")
    parser.add_argument("--seeds", type=int, default=4, help="seeds averaged in the resampler table")
    parser.add_argument("--sdxl-steps", type=int, default=None, help="steps for sdxl (default: --steps)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated, from {PROVIDERS}")
    parser.add_argument("--first-image", action="store_true", help="cold and warm first-image time (new processes)")
    parser.add_argument("--cycle", action="store_true", help="memory after cycling 5 resolutions 3 times")
    parser.add_argument("--first-image-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.first_image_child:
        arch, provider, steps = args.first_image_child.split(":")
        print(json.dumps(first_image_child(arch, provider, int(steps))))
        return 0
    env = environment()

    if args.resampler_table:
        cuda = torch.cuda.is_available() and args.archs != "tiny" and not args.cpu
        device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
        arch = args.archs.split(",")[0] if cuda else "tiny"
        if not cuda:
            torch.set_num_threads(1)  # stable timings on a shared machine
        steps = args.steps if cuda else min(args.steps, 20)
        rows = resampler_table(arch, device, dtype, steps, args.seeds, args.repeats if cuda else 1)
        # on a GPU the rows join bench_pipeline.jsonl (one file per benchmark in a device run)
        name = "bench_pipeline.jsonl" if cuda else "resampler_cpu.jsonl"
        path = _write(args.out, name, [{"mode": "resampler", **r} for r in rows], env)
        print(f"wrote {path}")
        print("== table ==")
        print(f"{'setting':42s} {'s/image':>8s} {'speedup':>8s} {'PSNR dB':>8s} {'SSIM':>6s}")
        for r in rows:
            print(f"{r['setting']:42s} {r['seconds']:8.3f} {r['speedup']:7.2f}x {r['psnr_db']:8.2f} {r['ssim']:6.3f}")
        return 0

    if args.cpu:
        reference, ours = _pipelines("tiny", "cpu", torch.float32)
        kwargs = _call_kwargs("tiny", "cpu", torch.float32, steps=3)
        kwargs.update(height=16, width=16)
        expected, t_ref = _run(reference, kwargs, 0, "cpu")
        images, t_ours = _run(ours, kwargs, 0, "cpu")
        diff = float(np.abs(images - expected).max())
        rows = [{"arch": "tiny", "provider": n, "seconds": s, "max_pixel_diff_vs_diffusers": diff}
                for n, s in (("diffusers-eager", t_ref), ("fastdiff", t_ours))]  # fmt: skip
        print("== table ==")
        for r in rows:
            print(f"{r['arch']:6s} {r['provider']:16s} {r['seconds']:7.3f} s  max |diff| {diff:.2e}")
        if diff > 1e-3:
            print(f"fastdiff's images differ from diffusers' by {diff:.2e} (> 1e-3)", file=sys.stderr)
            return 1
        return 0

    if not torch.cuda.is_available():
        print("bench_pipeline: no CUDA device; run with --cpu (plumbing) or --resampler-table")
        return 0
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"--archs: unknown {unknown}; expected names from {sorted(ARCHS)}")
    providers = [p for p in args.providers.split(",") if p]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        parser.error(f"--providers: unknown {unknown}; expected names from {PROVIDERS}")
    rows = []
    for arch in archs:
        steps = args.sdxl_steps if arch == "sdxl" and args.sdxl_steps else args.steps
        arch_rows = bench_arch(arch, "cuda", torch.float16, steps, args.repeats, providers, cycle=args.cycle)
        torch.cuda.empty_cache()
        if args.first_image:
            for row in arch_rows:
                row.update(first_image_times(arch, row["provider"], steps))
        rows += arch_rows
    path = _write(args.out, "bench_pipeline.jsonl", [{"mode": "pipeline", **r} for r in rows], env)
    print(f"wrote {path}")
    print("== table ==")
    print(f"{'arch':6s} {'provider':24s} {'s/image':>8s} {'it/s':>7s} {'peak GiB':>9s} {'speedup':>8s} {'max|diff|':>9s} "
          f"{'cold s':>7s} {'warm s':>7s} {'cycle GiB':>9s}")  # fmt: skip

    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else f"{'-':>{spec.split('.')[0]}}"

    for r in rows:
        print(f"{r['arch']:6s} {r['provider']:24s} {r['seconds']:8.3f} {r['it_per_s']:7.2f} {r['peak_gib']:9.2f} "
              f"{r['speedup']:7.2f}x {r['max_pixel_diff_vs_diffusers']:9.2e} {fmt(r.get('first_image_cold_s'), '7.2f')} "
              f"{fmt(r.get('first_image_warm_s'), '7.2f')} {fmt(r.get('reserved_after_cycle_gib'), '9.2f')}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
