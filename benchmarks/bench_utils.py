"""What every benchmark records beside its numbers: the card, versions, commit and date.

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
