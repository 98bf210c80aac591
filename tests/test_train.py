"""`fastdiff train`: a short run lowers the loss, resumes exactly, and writes a loadable model folder."""

import json
import os

import pytest
import torch

from fastdiff.cli import main
from fastdiff.train import TrainConfig, ema_update, load_digits_split, lr_factor, train


def test_digits_split_is_fixed_and_scaled():
    split = load_digits_split(16)
    assert split["train_images"].shape == (1437, 1, 16, 16) and split["test_images"].shape == (360, 1, 16, 16)
    assert split["train_images"].min() >= -1 and split["train_images"].max() <= 1
    assert split["train_images"].std() > 0.3
    # stratified: every class is in both splits in the same proportion (within one image)
    for labels in (split["train_labels"], split["test_labels"]):
        share = torch.bincount(labels, minlength=10).float() / len(labels)
        assert (share - 0.1).abs().max() < 0.01
    again = load_digits_split(16)
    assert torch.equal(again["test_images"], split["test_images"])
    with pytest.raises(ValueError, match="image_size: expected a multiple of 8"):
        load_digits_split(12)


def test_lr_schedule_and_ema():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    ema, model = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = ema.weight.detach().clone()
    ema_update(ema, model, decay=0.999, step=0)  # warm-up decay min(0.999, 1/10)
    torch.testing.assert_close(ema.weight, 0.1 * before + 0.9 * model.weight.detach())


def test_short_training_lowers_the_loss_and_writes_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--steps", "40", "--batch-size", "16", "--warmup-steps", "5",
                 "--learning-rate", "2e-3", "--checkpoint-every", "20", "--no-progress"])
    assert code == 0
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert (out / "loss.png").stat().st_size > 1000
    with open(out / "model" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "DDIMPipeline"

    # The saved folder holds the EMA weights and loads in fastdiff's pipeline and in diffusers'.
    import diffusers

    from fastdiff.pipelines import DiffusionPipeline

    ours = DiffusionPipeline.from_pretrained(str(out / "model"))
    theirs = diffusers.DDIMPipeline.from_pretrained(str(out / "model"))
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    for name, value in ours.unet.state_dict().items():
        assert torch.equal(value, state["ema"][name])
        assert torch.equal(value, theirs.unet.state_dict()[name])
    assert not torch.equal(state["ema"]["conv_in.weight"], state["unet"]["conv_in.weight"])


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    data = load_digits_split(16)["train_images"][:64]
    config = dict(steps=6, batch_size=8, warmup_steps=2, checkpoint_every=2, progress=False)
    straight = train(TrainConfig(output_dir=str(tmp_path / "straight"), **config), data=data)
    cut = train(TrainConfig(output_dir=str(tmp_path / "cut"), stop_at=3, **config), data=data)
    assert cut["step"] == 3 and len(cut["losses"]) == 3
    assert _state(tmp_path / "cut")["step"] == 3
    resumed = train(TrainConfig(output_dir=str(tmp_path / "cut"), **config), data=data)
    assert resumed["losses"] == straight["losses"]
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "cut")
    assert a["step"] == b["step"] == 6
    for key in ("unet", "ema"):
        for name, value in a[key].items():
            assert torch.equal(b[key][name], value), f"{key}.{name} differs after resuming"


def _state(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=False)


def test_resume_refuses_other_settings(tmp_path):
    data = load_digits_split(16)["train_images"][:32]
    train(TrainConfig(output_dir=str(tmp_path), steps=2, batch_size=4, checkpoint_every=1, progress=False), data=data)
    with pytest.raises(ValueError, match="batch_size: the checkpoint .* was trained with 4, got 8"):
        train(TrainConfig(output_dir=str(tmp_path), steps=4, batch_size=8, progress=False), data=data)
