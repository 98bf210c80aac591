"""Benchmark ``fastdiff.optimize(pipe)`` on diffusers pipelines (SD1.5 and SDXL architectures).

    python benchmarks/bench_optimize.py [--out DIR] [--archs sd15,sdxl] [--steps 20] [--compile] [--tiny]

Providers, one pipeline per architecture with seeded random weights, fp16, batch 1 with CFG,
the text embeddings given directly (random, so no text encoder is needed), latents out
(``output_type="latent"``: the VAE is the same in every provider):

* ``diffusers-eager``: the diffusers pipeline as it comes (SDPA processors);
* ``diffusers-compile``: the same with ``pipe.unet = torch.compile(pipe.unet)`` (only with
  ``--compile``: compiling takes minutes; ``--compile-mode``, default ``max-autotune-no-cudagraphs``);
* ``fastdiff-optimize``: ``fastdiff.optimize(pipe)``: fused GroupNorm+SiLU, fastdiff attention,
  fastdiff scheduler, the UNet call captured as CUDA graphs.

Metrics per provider: ``first_call_s`` (the first image, with compiling, autotuning and capture),
``it_per_s`` (denoising steps per second over the following calls, median), ``peak_mem_gib``
(``torch.cuda.max_memory_allocated`` over those calls), ``lora_load_s`` (``load_lora_weights`` of
two random rank-16 LoRAs built with peft), ``lora_switch_s`` (``set_adapters`` to the other LoRA
plus the next image, minus a steady image: the extra cost of switching, target < 0.3 s), and the
largest difference of its latents from diffusers-eager's, without and with the LoRA.

Each run appends JSON lines to ``DIR/bench_optimize.jsonl`` with card, versions, commit and date,
and prints a short table after ``== table ==``. ``--tiny`` runs tiny configs in fp32 on whatever
device is there (the CPU here; no graphs there) as a plumbing check that also fails when fastdiff's
latents differ from diffusers'. Without CUDA and without ``--tiny`` it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from bench_utils import ROOT, SD15_UNET, SDXL_UNET, environment

TINY_UNET = dict(
    sample_size=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
TINY_XL_UNET = dict(
    TINY_UNET,
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=6 * 8 + 32,
    use_linear_projection=True,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
)
TINY_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
)

# name -> (UNet config, VAE config, latent size, text length, text dim, pooled dim or None (SD1.5))
ARCHS = {
    "sd15": (SD15_UNET, SD_VAE, 64, 77, 768, None),
    "sdxl": (SDXL_UNET, SD_VAE, 128, 77, 2048, 1280),
    "tiny": (TINY_UNET, TINY_VAE, 8, 7, 32, None),
    "tiny-xl": (TINY_XL_UNET, TINY_VAE, 8, 7, 64, 32),
}


def _pipeline(arch: str, device, dtype):
    """A diffusers SD/SDXL pipeline with seeded random weights and no text encoders."""
    import diffusers

    unet_config, vae_config, _, _, _, pooled = ARCHS[arch]
    torch.manual_seed(0)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(in_channels=4, out_channels=4, **unet_config).eval()
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, **vae_config).eval()
    scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    if pooled is None:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet, scheduler=scheduler
        )
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_kwargs(arch: str, device, dtype, steps: int):
    _, _, latent, text_len, text_dim, pooled = ARCHS[arch]
    g = torch.Generator().manual_seed(1)
    kwargs = dict(
        prompt_embeds=torch.randn(1, text_len, text_dim, generator=g).to(device, dtype),
        negative_prompt_embeds=torch.randn(1, text_len, text_dim, generator=g).to(device, dtype),
        latents=torch.randn(1, 4, latent, latent, generator=g).to(device, dtype),
        num_inference_steps=steps,
        guidance_scale=7.5,
        output_type="latent",
        height=latent * 8,
        width=latent * 8,
    )
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = torch.randn(1, pooled, generator=g).to(device, dtype)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(1, pooled, generator=g).to(device, dtype)
    return kwargs


def _save_loras(pipe, folder: str, rank: int):
    """Two random LoRAs for pipe.unet's attention projections (peft), saved as diffusers does."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    paths = []
    for seed, name in ((11, "bench_a"), (12, "bench_b")):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
        pipe.unet.add_adapter(config, adapter_name=name)
        with torch.no_grad():  # small deltas: random LoRAs at full scale would swamp the image
            for n, p in pipe.unet.named_parameters():
                if f"lora_B.{name}" in n:
                    p.mul_(0.05)
        state = get_peft_model_state_dict(pipe.unet, adapter_name=name)
        path = os.path.join(folder, name)
        type(pipe).save_lora_weights(path, unet_lora_layers=state)
        pipe.unet.delete_adapters(name)
        paths.append(path)
    pipe.unload_lora_weights()  # back to plain nn.Linear projections
    return paths


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _run_provider(name, pipe, kwargs, device, steps, iters, loras, setup):
    """Set ``pipe`` up as ``name``, measure, and leave it as it was."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    undo, setup_s = _timed(setup, device)
    run = lambda: pipe(**kwargs).images  # noqa: E731
    first, first_s = _timed(run, device)
    steady = statistics.median(_timed(run, device)[1] for _ in range(iters))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    names = [os.path.basename(path) for path in loras]
    _, load_s = _timed(lambda: [pipe.load_lora_weights(path, adapter_name=n) for path, n in zip(loras, names)], device)
    pipe.set_adapters([names[0]], [1.0])
    run()  # the first images with LoRA layers: new parameters, so graphs warm up and capture again
    run()
    with_b, switch = _timed(lambda: (pipe.set_adapters([names[1]], [1.0]), run())[1], device)
    pipe.unload_lora_weights()
    undo()
    row = {
        "provider": name,
        "setup_s": setup_s,
        "first_call_s": first_s,
        "step_ms": steady / steps * 1e3,
        "it_per_s": steps / steady,
        "peak_mem_gib": peak,
        "lora_load_s": load_s,
        "lora_switch_s": max(0.0, switch - steady),
    }
    return row, first.float(), with_b.float()


def bench_arch(arch, device, dtype, steps, iters, with_compile, compile_mode, lora_rank):
    import fastdiff.optimize_diffusers as fo

    pipe = _pipeline(arch, device, dtype)
    kwargs = _call_kwargs(arch, device, dtype, steps)
    unet = pipe.unet
    providers = [("diffusers-eager", lambda: (lambda: None))]
    if with_compile:

        def compile_setup():
            pipe.unet = torch.compile(unet, mode=compile_mode)
            return lambda: setattr(pipe, "unet", unet)

        providers.append(("diffusers-compile", compile_setup))
    swapped = []

    def optimize_setup():
        fo.optimize(pipe)
        swapped.append(len(fo.optimization_report(pipe).swapped))
        return lambda: fo.revert(pipe)

    providers.append(("fastdiff-optimize", optimize_setup))
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as folder:
        loras = _save_loras(pipe, folder, lora_rank)
        for name, setup in providers:
            row, latents, lora_latents = _run_provider(name, pipe, kwargs, device, steps, iters, loras, setup)
            if reference is None:
                reference = (latents, lora_latents)
            row["max_abs_diff_vs_eager"] = (latents - reference[0]).abs().max().item()
            row["lora_max_abs_diff_vs_eager"] = (lora_latents - reference[1]).abs().max().item()
            row["latent_scale"] = reference[0].abs().max().item()
            row["swaps"] = swapped[-1] if name == "fastdiff-optimize" else 0
            rows.append({"arch": arch, "steps": steps, **row})
    base = rows[0]["it_per_s"]
    for row in rows:
        row["speedup_vs_eager"] = row["it_per_s"] / base
    return rows


def print_table(env, dtype, table) -> None:
    print(f"{env['card']}, torch {env['torch']}, triton {env['triton']}, {dtype}, commit {env['commit']}")
    print("== table ==")
    print(f"{'arch':7} {'provider':18} {'it/s':>8} {'vs eager':>8} {'first s':>8} {'peak GiB':>8} {'LoRA load s':>11} {'switch s':>8} {'max diff':>9}")
    for r in table:
        print(
            f"{r['arch']:7} {r['provider']:18} {r['it_per_s']:8.2f} {r['speedup_vs_eager']:7.2f}x {r['first_call_s']:8.2f} "
            f"{r['peak_mem_gib']:8.2f} {r['lora_load_s']:11.3f} {r['lora_switch_s']:8.3f} "
            f"{max(r['max_abs_diff_vs_eager'], r['lora_max_abs_diff_vs_eager']):9.2e}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="directory for bench_optimize.jsonl")
    parser.add_argument("--archs", default=None, help="comma-separated: sd15,sdxl (default), with --tiny: tiny (default),tiny-xl")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--iters", type=int, default=3, help="timed images per provider after the first")
    parser.add_argument("--compile", action="store_true", help="add diffusers with its UNet under torch.compile (minutes)")
    parser.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="tiny configs in fp32 on the available device: a plumbing check")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        archs, dtype, steps, iters, rank = (args.archs or "tiny").split(","), torch.float32, 2, 1, 4
    elif device.type != "cuda":
        print("bench_optimize: no CUDA device; nothing to measure (use --tiny for a CPU plumbing check)")
        return 0
    else:
        archs, dtype, steps, iters, rank = (args.archs or "sd15,sdxl").split(","), torch.float16, args.steps, args.iters, args.lora_rank
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"--archs: unknown {unknown}; expected names from {sorted(ARCHS)}")

    env = environment()
    table = []
    for arch in archs:
        table.extend(bench_arch(arch, device, dtype, steps, iters, args.compile, args.compile_mode, rank))
    if not args.tiny:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_optimize.jsonl"), "a") as f:
            for row in table:
                f.write(json.dumps({**env, "dtype": str(dtype), "batch": 1, "cfg": True, **row}) + "\n")

    print_table(env, dtype, table)
    worst = max(max(r["max_abs_diff_vs_eager"], r["lora_max_abs_diff_vs_eager"]) / max(r["latent_scale"], 1e-6) for r in table)
    if args.tiny and worst > 1e-4:
        print(f"bench_optimize: fastdiff's latents differ from diffusers' by {worst:.2e} relative", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
