"""CPU fp32 UNet forward: fastdiff against diffusers, same config and weights.

    python benchmarks/bench_unet_cpu.py [--configs small,sd15] [--latent 32] [--batch 2] [--iters 6]
                                        [--threads N] [--out DIR]

Target (../shared/TARGETS.md): on the CPU in float32, fastdiff is never slower
than diffusers on the same model and machine, and uses no more peak memory.

For each config the parent builds a diffusers ``UNet2DConditionModel`` with a
fixed seed and saves it to a temporary folder.

* **Time**: in one process, the diffusers model and a fastdiff model holding the
  very same weight tensors (built on the meta device, weights assigned) run
  alternately, the order flipping every iteration, after one untimed warm-up
  each. Interleaving keeps both providers under the same machine load, which
  matters on a shared CPU. Reported: wall-clock p20/p50/p80 per provider, the
  p50 of process CPU time, and the median of the per-iteration ratios
  diffusers/fastdiff of both (> 1 means fastdiff is faster). On a loaded
  machine, ``--threads 1`` gives the stable figure: with several threads,
  OpenMP workers spin while waiting for a core, which inflates both clocks.
* **Peak memory**: each provider runs in its own fresh subprocess, loading the
  folder with its own ``from_pretrained``. The figure is the rise of the
  process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after
  loading) during the first forward, so weights are not counted; the resident
  size after loading is reported separately.

Each measurement is appended as one JSON line to ``DIR/bench_unet_cpu.jsonl``
(bench_utils.environment()'s versions, commit and date, plus the CPU model,
thread count, load average and diffusers version), and a short table is
printed after a line ``== table ==``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from bench_utils import ROOT, environment

CONFIGS = {
    # A small SD-style UNet: quick, exercises every block type of the SD1 UNet.
    "small": dict(
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        cross_attention_dim=256,
        attention_head_dim=4,
        norm_num_groups=32,
    ),
    # The SD1.5 UNet architecture (860M parameters), random weights.
    "sd15": dict(cross_attention_dim=768),
}
TEXT_TOKENS = 77
PROVIDERS = ("diffusers", "fastdiff")


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _inputs(config: dict, batch: int, latent: int):
    import torch

    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 4, latent, latent, generator=generator)
    text = torch.randn(batch, TEXT_TOKENS, config["cross_attention_dim"], generator=generator)
    return sample, text


def _memory_child(args) -> None:
    """Subprocess: load with the provider's from_pretrained, one forward, print peak RSS rise as JSON."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.provider == "fastdiff":
        from fastdiff import UNet2DConditionModel
    else:
        from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel.from_pretrained(args.folder).eval()
    sample, text = _inputs(dict(model.config), args.batch, args.latent)
    with torch.no_grad():
        # safetensors weights may still be memory-mapped and not yet resident; touch
        # them so the first forward's peak counts activations only.
        for p in model.parameters():
            p.sum()
        resident_kib = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        model(sample, 500, text)
        peak_kib = _proc_status_kib("VmHWM")
    print(json.dumps({"forward_peak_mib": (peak_kib - resident_kib) / 1024, "resident_mib": resident_kib / 1024}))


def _time_interleaved(reference, config: dict, args) -> dict:
    """Time both providers alternately on shared weights; returns per-provider times in seconds."""
    import torch

    from fastdiff import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(dict(reference.config))
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    models = {"diffusers": reference.eval(), "fastdiff": model.eval()}
    sample, text = _inputs(config, args.batch, args.latent)
    wall = {name: [] for name in PROVIDERS}
    cpu = {name: [] for name in PROVIDERS}
    with torch.no_grad():
        for m in models.values():
            m(sample, 500, text)  # warm-up
        for i in range(args.iters):
            for name in PROVIDERS if i % 2 == 0 else reversed(PROVIDERS):
                start, start_cpu = time.perf_counter(), time.process_time()
                models[name](sample, 500, text)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def _environment() -> dict:
    """bench_utils.environment() plus the CPU model, thread count, load average and diffusers version."""
    import diffusers
    import torch

    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        **environment(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "diffusers": diffusers.__version__,
    }


def _quantiles(times):
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"p20_s": q[0], "p50_s": statistics.median(times), "p80_s": q[3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="small,sd15", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2, help="batch (2 = one CFG step)")
    parser.add_argument("--iters", type=int, default=6, help="timed forwards per provider")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--provider", choices=PROVIDERS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args)
        return 0
    if args.iters < 1:
        parser.error("--iters: must be at least 1")

    import torch
    from diffusers import UNet2DConditionModel

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in names:
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            reference = UNet2DConditionModel(**CONFIGS[name])
            reference.save_pretrained(folder)
            memory = {}
            for provider in PROVIDERS:
                cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--provider", provider,
                       "--folder", folder, "--latent", str(args.latent), "--batch", str(args.batch)]
                if args.threads is not None:
                    cmd += ["--threads", str(args.threads)]
                run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if run.returncode != 0:
                    raise RuntimeError(f"{provider} memory run failed:\n{run.stderr[-2000:]}")
                memory[provider] = json.loads(run.stdout.strip().splitlines()[-1])
            env = _environment()
            wall, cpu = _time_interleaved(reference, CONFIGS[name], args)
            del reference
        ratio = statistics.median(d / f for d, f in zip(wall["diffusers"], wall["fastdiff"]))
        cpu_ratio = statistics.median(d / f for d, f in zip(cpu["diffusers"], cpu["fastdiff"]))
        for provider in PROVIDERS:
            row = {"config": name, "provider": provider, **_quantiles(wall[provider]), **memory[provider],
                   "cpu_p50_s": statistics.median(cpu[provider]),
                   "speedup_vs_diffusers": ratio if provider == "fastdiff" else 1.0,
                   "cpu_speedup_vs_diffusers": cpu_ratio if provider == "fastdiff" else 1.0,
                   "latent": args.latent, "batch": args.batch, "iters": args.iters, "dtype": "float32", **env}
            results.append(row)
            with open(os.path.join(args.out, "bench_unet_cpu.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    print("== table ==")
    print(f"{'config':8} {'provider':10} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9} {'cpu p50 ms':>11} "
          f"{'fwd peak MiB':>13} {'speedup':>8} {'cpu speedup':>12}")
    for r in results:
        print(f"{r['config']:8} {r['provider']:10} {1e3 * r['p50_s']:9.1f} {1e3 * r['p20_s']:9.1f} "
              f"{1e3 * r['p80_s']:9.1f} {1e3 * r['cpu_p50_s']:11.1f} {r['forward_peak_mib']:13.1f} "
              f"{r['speedup_vs_diffusers']:7.2f}x {r['cpu_speedup_vs_diffusers']:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
