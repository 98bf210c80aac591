"""What every benchmark records beside its numbers (the card, versions, commit and
date), and the GPU benchmarks' timing.

Imported by the bench_*.py scripts (run as ``python benchmarks/bench_x.py``, so this
folder is on sys.path).
"""

from __future__ import annotations

import datetime
import os
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """HEAD's short hash; FASTDIFF_COMMIT where the tree travelled without .git (a device run)."""
    if os.environ.get("FASTDIFF_COMMIT"):
        return os.environ["FASTDIFF_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment() -> dict:
    """Card (or CPU), capability, torch/CUDA/triton versions, commit and UTC date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version}
    if torch.cuda.is_available():
        env["card"] = torch.cuda.get_device_name(0)
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
    else:
        env["card"] = "cpu"
    env["commit"] = git_commit()
    env["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return env


def timings(fn, rep: int = 100) -> dict:
    """p20/p50/p80 in ms of ``fn()`` on the GPU (``triton.testing.do_bench``, L2 flushed between runs)."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=25, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"p20_ms": p20, "p50_ms": p50, "p80_ms": p80}


# The SD1.5 and SDXL UNet architectures (diffusers config keys) that the GPU benchmarks build with random weights.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
