"""torchrun runs on the CPU with gloo and 2 processes: generate splits the images across ranks and
gives the single-process images; train with DDP matches one process with the same global batch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def _env():
    # One thread per rank: two ranks share the CI machine's two cores.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args, cwd):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastdiff", *args],
        capture_output=True, text=True, cwd=cwd, env=_env(), timeout=400,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _single(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, cwd=cwd, env=_env(), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_torchrun_generate_equals_one_process(tmp_path):
    # 5 images in batches of 2: rank 0 runs images 0,1 and 4, rank 1 runs images 2,3.
    args = ["generate", "--num-images", "5", "--batch-size", "2", "--steps", "4", "--seed", "7", "--no-progress"]
    multi = _torchrun(*args, "--out-dir", "multi", "--out", "multi.png", cwd=tmp_path)
    _single(*args, "--out-dir", "single", "--out", "single.png", cwd=tmp_path)
    assert "2 process(es)" in multi.stdout
    assert sorted(os.listdir(tmp_path / "multi")) == [f"{i:05d}.png" for i in range(5)]
    images = []
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "multi" / f"{i:05d}.png"))
        b = np.asarray(Image.open(tmp_path / "single" / f"{i:05d}.png"))
        np.testing.assert_array_equal(a, b, err_msg=f"image {i}")
        images.append(a)
    assert len({a.tobytes() for a in images}) == 5
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "multi.png")), np.asarray(Image.open(tmp_path / "single.png")))


def test_torchrun_train_matches_one_process_with_the_same_global_batch(tmp_path):
    args = ["train", "--steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--checkpoint-every", "3", "--no-progress"]
    _torchrun(*args, "--output-dir", "ddp", cwd=tmp_path)
    _single(*args, "--output-dir", "one", cwd=tmp_path)
    ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    assert ddp["step"] == one["step"] == 3
    np.testing.assert_allclose(ddp["losses"], one["losses"], rtol=1e-5)

    # Each rank's loss is the mean over its half of the global batch and DDP averages the two
    # gradients: the full-batch gradient up to float rounding. Adam's first moment is a linear
    # function of the gradients, so it matches to rounding. The attention key biases are the
    # exception: softmax ignores a constant shift per query, so their true gradient is 0 and both
    # runs hold only rounding noise (which Adam's normalisation then turns into steps of +-lr).
    initial = _initial_weights()
    names = list(initial)
    for index, state in one["optimizer"]["state"].items():
        name = names[index]
        if name.endswith("to_k.bias"):
            continue
        theirs, ours = state["exp_avg"], ddp["optimizer"]["state"][index]["exp_avg"]
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item(), msg=f"grad moment {name}")
    for name, value in one["unet"].items():
        if name.endswith("to_k.bias"):
            continue
        # Adam divides by sqrt(v): an element whose gradient is ~0 can step the other way, by at
        # most 2 lr per step (lr <= 1e-3 here); all but a few elements in a thousand agree to 1e-6.
        diff = (ddp["unet"][name] - value).abs()
        assert diff.max().item() < 6e-3, name
        assert (diff > 1e-6).float().mean().item() < 1e-3, name
        torch.testing.assert_close(ddp["ema"][name], one["ema"][name], rtol=0, atol=6e-3)
    moved = max((one["unet"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3  # the three steps did change the weights
    with open(tmp_path / "ddp" / "model" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "DDIMPipeline"


def _initial_weights():
    from fastdiff.train import build_model

    unet, _ = build_model(16, seed=0)
    return unet.state_dict()
