"""CPU fp32 UNet forward: fastdiff against diffusers, same config and weights.

    python benchmarks/bench_unet_cpu.py [--configs small,sd15] [--latent 32] [--batch 2] [--iters 5] [--out DIR]

Target (../shared/TARGETS.md): on the CPU in float32, fastdiff is never slower
than diffusers on the same model and machine, and uses no more peak memory.

For each config the parent builds a diffusers ``UNet2DConditionModel`` with a
fixed seed and saves it to a temporary folder. Each provider then runs in its own
fresh subprocess, one after the other: it loads the folder with its own
``from_pretrained``, runs one untimed warm-up forward, then ``--iters`` timed
forwards under ``torch.no_grad()``. Peak memory is the rise of the process's
peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` after loading)
during the forwards, so the weights are not counted; resident weights are
reported separately.

Each measurement is appended as one JSON line to ``DIR/bench_unet_cpu.jsonl``
(CPU model, thread count, torch/diffusers versions, commit, date), and a short
table is printed after a line ``== table ==``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def _child(args) -> None:
    """Runs in a subprocess: load, warm up, time, and print one JSON result line."""
    import torch

    torch.manual_seed(0)
    if args.provider == "fastdiff":
        from fastdiff import UNet2DConditionModel
    else:
        from diffusers import UNet2DConditionModel
    model = UNet2DConditionModel.from_pretrained(args.folder).eval()
    cross_dim = model.config.cross_attention_dim
    sample = torch.randn(args.batch, 4, args.latent, args.latent)
    text = torch.randn(args.batch, TEXT_TOKENS, cross_dim)
    with torch.no_grad():
        # Peak memory of the first forward: later ones reuse memory the allocator keeps.
        resident_kib = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        model(sample, 500, text)  # also the untimed warm-up
        peak_kib = _proc_status_kib("VmHWM")
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            model(sample, 500, text)
            times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    print(json.dumps({
        "p20_s": q[0], "p50_s": statistics.median(times), "p80_s": q[3],
        "forward_peak_mib": (peak_kib - resident_kib) / 1024, "resident_mib": resident_kib / 1024,
    }))


def _environment() -> dict:
    import diffusers
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "commit": commit or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="small,sd15", help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--latent", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch", type=int, default=2, help="batch (2 = one CFG step)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--provider", choices=PROVIDERS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return 0

    import torch
    from diffusers import UNet2DConditionModel

    names = [c for c in args.configs.split(",") if c]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        parser.error(f"--configs: unknown {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    env = _environment()
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in names:
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            UNet2DConditionModel(**CONFIGS[name]).save_pretrained(folder)
            for provider in PROVIDERS:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--provider", provider, "--folder", folder,
                       "--latent", str(args.latent), "--batch", str(args.batch), "--iters", str(args.iters)]
                run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if run.returncode != 0:
                    row = {"config": name, "provider": provider, "error": run.stderr.strip().splitlines()[-1:]}
                else:
                    row = {"config": name, "provider": provider, **json.loads(run.stdout.strip().splitlines()[-1])}
                row.update(latent=args.latent, batch=args.batch, iters=args.iters, dtype="float32", **env)
                results.append(row)
                with open(os.path.join(args.out, "bench_unet_cpu.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")

    print("== table ==")
    print(f"{'config':8} {'provider':10} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9} {'fwd peak MiB':>13} {'vs diffusers':>13}")
    base = {r["config"]: r for r in results if r["provider"] == "diffusers" and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"{r['config']:8} {r['provider']:10} ERROR {r['error']}")
            continue
        ref = base.get(r["config"])
        speedup = f"{ref['p50_s'] / r['p50_s']:.2f}x" if ref else "-"
        print(f"{r['config']:8} {r['provider']:10} {1e3 * r['p50_s']:9.1f} {1e3 * r['p20_s']:9.1f} "
              f"{1e3 * r['p80_s']:9.1f} {r['forward_peak_mib']:13.1f} {speedup:>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
