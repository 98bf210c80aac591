"""LoRA switch time in fastdiff's own pipelines (SD1.5 and SDXL architectures).

    python benchmarks/bench_lora.py [--out DIR] [--archs sd15,sdxl] [--steps 20] [--rank 16] [--tiny]

One fastdiff pipeline per architecture with seeded random weights, fp16 on CUDA, batch 1 with CFG,
text embeddings given directly (no text encoder), latents out. Two random LoRAs (rank ``--rank`` on
to_q/to_k/to_v/to_out.0, written with ``save_lora_weights`` and loaded with ``load_lora_weights``).
The measured sequence, the issue's:

    fuse A -> image (steady) -> unfuse -> fuse B -> first image after -> steady image

Per architecture: ``load_s`` (both files), ``fuse_a_s``, ``unfuse_s``, ``fuse_b_s``, ``switch_s``
(unfuse + fuse B: target < 0.3 s), ``first_image_after_s`` and ``steady_image_s`` (their difference is
what the switch costs the next image: an eager step after the in-place change, or a recapture),
``scale_switch_s`` (``set_adapters`` with new weights on unfused adapters, in place) and, where the
pipeline runs a graph runner, its counters before and after the switch (``captures`` unchanged:
the graph was reused). Each run appends a JSON line to ``DIR/bench_lora.jsonl`` with card,
versions, commit and date. ``--tiny`` runs tiny configs in fp32 on whatever device is there: on the
CPU that is a **plumbing run only** (its times say nothing about a GPU) and is marked so. Without
CUDA and without ``--tiny`` it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_optimize import ARCHS  # noqa: E402 - the same architectures as the optimize benchmark
from bench_utils import ROOT, environment  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _pipeline(arch: str, device, dtype):
    """A fastdiff SD/SDXL pipeline with seeded random weights and no text encoders."""
    import fastdiff

    unet_config, vae_config, _, _, _, pooled = ARCHS[arch]
    torch.manual_seed(0)
    unet = fastdiff.UNet2DConditionModel(in_channels=4, out_channels=4, **unet_config).eval()
    vae = fastdiff.AutoencoderKL(in_channels=3, out_channels=3, **vae_config).eval()
    scheduler = fastdiff.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    if pooled is None:
        pipe = fastdiff.StableDiffusionPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    else:
        pipe = fastdiff.StableDiffusionXLPipeline(
            vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=unet, scheduler=scheduler
        )
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_kwargs(arch: str, device, dtype, steps: int, vae_scale_factor: int):
    _, _, latent, text_len, text_dim, pooled = ARCHS[arch]
    g = torch.Generator().manual_seed(1)
    kwargs = dict(
        prompt_embeds=torch.randn(1, text_len, text_dim, generator=g).to(device, dtype),
        negative_prompt_embeds=torch.randn(1, text_len, text_dim, generator=g).to(device, dtype),
        latents=torch.randn(1, 4, latent, latent, generator=g).to(device, dtype),
        num_inference_steps=steps,
        guidance_scale=7.5,
        output_type="latent",
        height=latent * vae_scale_factor,
        width=latent * vae_scale_factor,
    )
    if pooled is not None:
        kwargs["pooled_prompt_embeds"] = torch.randn(1, pooled, generator=g).to(device, dtype)
        kwargs["negative_pooled_prompt_embeds"] = torch.randn(1, pooled, generator=g).to(device, dtype)
    return kwargs


def _write_loras(pipe, folder: str, rank: int):
    """Two random diffusers-format LoRA files for the UNet's attention projections (small deltas)."""
    paths = []
    for seed, name in ((11, "a"), (12, "b")):
        g = torch.Generator().manual_seed(seed)
        layers = {}
        for path, module in pipe.unet.named_modules():
            if isinstance(module, torch.nn.Linear) and path.endswith(TARGETS):
                layers[f"{path}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / module.in_features**0.5
                layers[f"{path}.lora_B.weight"] = 0.05 * torch.randn(module.out_features, rank, generator=g) / rank**0.5
        out = os.path.join(folder, name)
        type(pipe).save_lora_weights(out, unet_lora_layers=layers)
        paths.append(out)
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


def _graph_stats(pipe):
    runner = getattr(pipe, "graph_runner", None)
    return dict(runner.stats) if runner is not None else None


def bench_arch(arch: str, device, dtype, steps: int, rank: int) -> dict:
    pipe = _pipeline(arch, device, dtype)
    kwargs = _call_kwargs(arch, device, dtype, steps, pipe.vae_scale_factor)
    image = lambda: pipe(**kwargs).images  # noqa: E731
    record = {"arch": arch, "steps": steps, "rank": rank, "dtype": str(dtype).replace("torch.", "")}
    with tempfile.TemporaryDirectory() as folder:
        files = _write_loras(pipe, folder, rank)
        _, record["load_s"] = _timed(lambda: [pipe.load_lora_weights(f, adapter_name=n) for f, n in zip(files, "ab")], device)
    pipe.set_adapters("a")
    _, record["fuse_a_s"] = _timed(lambda: pipe.fuse_lora(adapter_names=["a"]), device)
    _, record["first_image_fused_a_s"] = _timed(image, device)  # warm-up, capture
    fused_a, record["steady_image_fused_a_s"] = _timed(image, device)
    before = _graph_stats(pipe)
    _, record["unfuse_s"] = _timed(pipe.unfuse_lora, device)
    _, record["fuse_b_s"] = _timed(lambda: pipe.fuse_lora(adapter_names=["b"]), device)
    record["switch_s"] = record["unfuse_s"] + record["fuse_b_s"]
    fused_b, record["first_image_after_s"] = _timed(image, device)
    _, record["steady_image_s"] = _timed(image, device)
    record["graph_stats_before_switch"], record["graph_stats_after_switch"] = before, _graph_stats(pipe)
    record["images_differ"] = bool((fused_a.float() - fused_b.float()).abs().max() > 0)
    # unfused adapters: a new weight is written in place into the layers' scale buffers
    pipe.unfuse_lora()
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    image()
    image()
    _, record["scale_switch_s"] = _timed(lambda: pipe.set_adapters(["a", "b"], [0.5, 1.0]), device)
    _, record["first_image_after_scale_switch_s"] = _timed(image, device)
    _, record["steady_image_unfused_s"] = _timed(image, device)
    pipe.unload_lora_weights()
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"), help="directory for bench_lora.jsonl")
    parser.add_argument("--archs", default=None, help="comma-separated: sd15,sdxl (default); with --tiny: tiny,tiny-xl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="tiny configs in fp32 on the available device (plumbing)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("bench_lora: no CUDA device; run with --tiny for a CPU plumbing run")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda and not args.tiny else torch.float32
    archs = (args.archs or ("tiny,tiny-xl" if args.tiny else "sd15,sdxl")).split(",")
    env = environment()
    plumbing = device.type != "cuda"
    os.makedirs(args.out, exist_ok=True)
    for arch in archs:
        record = {**env, **bench_arch(arch, device, dtype, args.steps, args.rank), "plumbing_only": plumbing}
        with open(os.path.join(args.out, "bench_lora.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        note = " (CPU plumbing run: not a performance figure)" if plumbing else ""
        print(
            f"{arch}: switch (unfuse + fuse B) {record['switch_s']:.3f} s, first image after {record['first_image_after_s']:.3f} s "
            f"vs steady {record['steady_image_s']:.3f} s, scale switch {record['scale_switch_s']:.4f} s{note}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
