"""StableDiffusionXLPipeline against diffusers (fp32, CPU)."""

import json

import numpy as np
import pytest
import torch

import fastdiff
from _tiny_pipelines import one_torch_thread, save_sdxl_folder  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

BASE = dict(num_inference_steps=3, height=16, width=16, output_type="np")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory, one_torch_thread):
    folder = save_sdxl_folder(tmp_path_factory.mktemp("sdxl"))
    ours = fastdiff.DiffusionPipeline.from_pretrained(folder)
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def _both(pipes, scheduler=None, seed=0, **kwargs):
    ours, ref = pipes
    if scheduler is not None:
        ours.scheduler = getattr(fastdiff, scheduler).from_config(ours.scheduler.config)
        ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    args = {**BASE, **kwargs}
    gen = (lambda: [torch.Generator().manual_seed(s) for s in seed]) if isinstance(seed, list) else (
        lambda: torch.Generator().manual_seed(seed)
    )
    return ours(generator=gen(), **args).images, ref(generator=gen(), **args).images


def test_sdxl_matches_diffusers(pipes):
    assert type(pipes[0]).__name__ == "StableDiffusionXLPipeline"
    out, expected = _both(pipes, prompt="a cat")
    assert out.shape == (1, 16, 16, 3) and out.std() > 0.01
    np.testing.assert_allclose(out, expected, atol=1e-3, rtol=0)


def test_sdxl_prompt_2_negatives_size_conditioning_and_denoising_end(pipes):
    kwargs = dict(
        prompt=["a cat", "red dog"], prompt_2=["abc", "the cat"], negative_prompt=["dog", "cat"],
        negative_prompt_2=["red", "abc"], num_images_per_prompt=2, original_size=(32, 24),
        crops_coords_top_left=(2, 3), target_size=(20, 16), negative_original_size=(8, 8),
        negative_target_size=(16, 16), denoising_end=0.7, guidance_rescale=0.5, num_inference_steps=4,
    )  # fmt: skip
    out, expected = _both(pipes, "DPMSolverMultistepScheduler", seed=[1, 2, 3, 4], **kwargs)
    assert out.shape == (4, 16, 16, 3)
    np.testing.assert_allclose(out, expected, atol=1e-3, rtol=0)
    # the size conditioning reaches the UNet: another original_size changes the image
    other, _ = _both(pipes, "DPMSolverMultistepScheduler", seed=[1, 2, 3, 4], **{**kwargs, "original_size": (64, 64)})
    assert np.abs(other - out).max() > 1e-4


def test_sdxl_cfg_off_and_save_both_ways(pipes, tmp_path):
    out, expected = _both(pipes, "EulerAncestralDiscreteScheduler", prompt="a cat", guidance_scale=1.0)
    np.testing.assert_allclose(out, expected, atol=1e-3, rtol=0)
    ours, _ = pipes
    ours.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["force_zeros_for_empty_prompt"] is True
    reloaded = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    args = dict(prompt="a dog", **BASE)
    np.testing.assert_allclose(
        ours(generator=torch.Generator().manual_seed(4), **args).images,
        reloaded(generator=torch.Generator().manual_seed(4), **args).images,
        atol=1e-3, rtol=0,
    )  # fmt: skip


def test_sdxl_bad_components_and_arguments(pipes):
    ours, _ = pipes
    with pytest.raises(ValueError, match="denoising_end"):
        ours(prompt="a", denoising_end=1.5, **BASE)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=torch.randn(1, 16, 64), **BASE)
    sd_unet = fastdiff.UNet2DConditionModel.from_config(
        {k: v for k, v in ours.unet.config.items() if not k.startswith("_")}, addition_embed_type=None
    )
    with pytest.raises(ValueError, match="addition_embed_type"):
        fastdiff.StableDiffusionXLPipeline(**{**ours.components, "unet": sd_unet})


def test_sdxl_spatial_resampler_and_temperature(pipes):
    ours, _ = pipes
    ours.scheduler = fastdiff.EulerDiscreteScheduler.from_config(ours.scheduler.config)
    args = dict(prompt="a cat", num_inference_steps=4, height=32, width=32, output_type="np")
    plain = ours(generator=torch.Generator().manual_seed(2), **args).images
    sizes = []
    handle = ours.unet.register_forward_pre_hook(lambda m, a: sizes.append(tuple(a[0].shape[-2:])))
    try:
        ours.set_spatial_resampler(fastdiff.Resampler(scale=0.5, fraction=0.5))
        resampled = ours(generator=torch.Generator().manual_seed(2), **args).images
    finally:
        handle.remove()
        ours.set_spatial_resampler(None)
    assert sizes == [(8, 8)] * 3 + [(16, 16)] * 2
    assert resampled.shape == plain.shape and np.isfinite(resampled).all()
    ours.set_temperature_scheduler(fastdiff.TemperatureScheduler("constant", tau=0.7))
    cooled = ours(generator=torch.Generator().manual_seed(2), **args).images
    ours.set_temperature_scheduler(None)
    assert np.abs(cooled - plain).max() > 1e-3  # the initial noise is scaled even for a deterministic sampler
    np.testing.assert_array_equal(ours(generator=torch.Generator().manual_seed(2), **args).images, plain)
