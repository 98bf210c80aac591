"""Stable Diffusion text-to-image and image-to-image pipelines against diffusers (fp32, CPU)."""

import json
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch

import fastdiff
from _tiny_pipelines import one_torch_thread, save_sd_folder  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest.importorskip("transformers")

SCHEDULERS = [
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
]
BASE = dict(num_inference_steps=3, height=16, width=16, output_type="np")


def _gen(seed):
    if isinstance(seed, list):
        return [torch.Generator().manual_seed(s) for s in seed]
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, one_torch_thread):
    return save_sd_folder(tmp_path_factory.mktemp("sd"), safety=True)


@pytest.fixture(scope="module")
def pipes(sd_folder, one_torch_thread):
    ours = fastdiff.DiffusionPipeline.from_pretrained(sd_folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    return ours, ref


def _both(pipes, scheduler="PNDMScheduler", seed=0, ref_kwargs=None, base=BASE, **kwargs):
    ours, ref = pipes
    ours.scheduler = getattr(fastdiff, scheduler).from_config(ours.scheduler.config)
    ref.scheduler = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    args = {**base, **kwargs}
    out = ours(generator=_gen(seed), **args)
    expected = ref(generator=_gen(seed), **{**args, **(ref_kwargs or {})})
    return out, expected


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_images_match_diffusers_for_every_scheduler(pipes, scheduler):
    out, expected = _both(pipes, scheduler, prompt="a cat", seed=3)
    assert type(pipes[0]).__name__ == "StableDiffusionPipeline"
    assert out.images.shape == (1, 16, 16, 3) and out.images.std() > 0.01
    np.testing.assert_allclose(out.images, expected.images, atol=1e-3, rtol=0)
    assert out.nsfw_content_detected == expected.nsfw_content_detected == [False]


def test_generator_list_and_images_per_prompt(pipes):
    out, expected = _both(
        pipes, "EulerAncestralDiscreteScheduler", seed=[1, 2, 3, 4], prompt=["a cat", "the dog"],
        negative_prompt=["red", "abc"], num_images_per_prompt=2,
    )  # fmt: skip
    assert out.images.shape == (4, 16, 16, 3)
    np.testing.assert_allclose(out.images, expected.images, atol=1e-3, rtol=0)
    assert np.abs(out.images[0] - out.images[1]).max() > 1e-3  # different generators, different images


def test_given_latents_prompt_embeds_clip_skip_rescale_and_sigmas(pipes):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    embeds = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(8))
    out, expected = _both(pipes, "DDIMScheduler", latents=latents, prompt_embeds=embeds, guidance_rescale=0.7, eta=0.3)
    np.testing.assert_allclose(out.images, expected.images, atol=1e-3, rtol=0)
    # diffusers' clip_skip reads text_encoder.text_model, which transformers 5 removed: give diffusers the
    # embeddings clip_skip=1 selects (the penultimate layer through the final layer norm) instead
    encoder, tokenizer = pipes[1].text_encoder, pipes[1].tokenizer
    ids = tokenizer("abc", padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        skipped = encoder.final_layer_norm(encoder(ids, output_hidden_states=True).hidden_states[-2])
    out, expected = _both(
        pipes, "EulerDiscreteScheduler", prompt="abc", clip_skip=1, sigmas=[9.0, 3.0, 0.5],
        ref_kwargs=dict(prompt=None, prompt_embeds=skipped, clip_skip=None),
    )  # fmt: skip
    np.testing.assert_allclose(out.images, expected.images, atol=1e-3, rtol=0)


def test_cfg_is_off_at_guidance_scale_le_1(pipes):
    ours, _ = pipes
    batches = []
    handle = ours.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        out, expected = _both(pipes, "DDIMScheduler", prompt="a cat", guidance_scale=1.0)
    finally:
        handle.remove()
    assert batches == [1, 1, 1]
    np.testing.assert_allclose(out.images, expected.images, atol=1e-3, rtol=0)


def test_callback_on_step_end_edits_are_honoured(pipes):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append((i, sorted(kwargs)))
        return {"latents": kwargs["latents"] * 0.5} if i == 0 else {}

    args = dict(prompt="a cat", callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    out, expected = _both(pipes, "DDIMScheduler", callback_on_step_end=callback, **args)
    assert seen[:3] == [(i, ["latents", "prompt_embeds"]) for i in range(3)]
    np.testing.assert_allclose(out.images, expected.images, atol=1e-3, rtol=0)
    plain, _ = _both(pipes, "DDIMScheduler", prompt="a cat")
    assert np.abs(plain.images - out.images).max() > 1e-3
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipes[0](prompt="a", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"], **BASE)


def test_output_types_and_tuple(pipes):
    ours, _ = pipes
    kwargs = dict(prompt="a", num_inference_steps=2, height=16, width=16)
    pt = ours(generator=_gen(0), output_type="pt", **kwargs).images
    latent = ours(generator=_gen(0), output_type="latent", **kwargs).images
    pil, nsfw = ours(generator=_gen(0), return_dict=False, **kwargs)
    assert pt.shape == (1, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1
    assert latent.shape == (1, 4, 8, 8) and pil[0].size == (16, 16) and nsfw == [False]
    np.testing.assert_allclose(np.asarray(pil[0]) / 255.0, pt[0].permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)


def test_safety_checker_flags_like_diffusers(pipes):
    ours, ref = pipes
    originals = ours.safety_checker.concept_embeds_weights.clone()
    try:
        for p in pipes:  # thresholds of -1: every image is flagged
            p.safety_checker.concept_embeds_weights.data.fill_(-1.0)
        out, expected = _both(pipes, "DDIMScheduler", prompt="a cat", num_images_per_prompt=2)
        assert out.nsfw_content_detected == expected.nsfw_content_detected == [True, True]
        assert (out.images == 0).all() and (expected.images == 0).all()
    finally:
        for p in pipes:
            p.safety_checker.concept_embeds_weights.data.copy_(originals)


def test_save_both_ways(pipes, sd_folder, tmp_path):
    ours, ref = pipes
    # clip_sample=False: a DDIMScheduler built from PNDM's config defaults it to True, which diffusers'
    # pipeline rewrites when it loads the folder (a different image, by design)
    ours.scheduler = fastdiff.DDIMScheduler.from_config(ours.scheduler.config, clip_sample=False)
    ours.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["requires_safety_checker"] is True
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours")
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded.scheduler).__name__ == "DDIMScheduler"
    args = dict(prompt="a cat", **BASE)
    np.testing.assert_allclose(
        ours(generator=_gen(2), **args).images, reloaded(generator=_gen(2), **args).images, atol=1e-3, rtol=0
    )


def test_null_entries_and_keyword_overrides(sd_folder, tmp_path):
    folder = tmp_path / "nulls"
    shutil.copytree(sd_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "safety_checker")
    pipe = fastdiff.StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    pipe = fastdiff.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, feature_extractor=None)
    assert pipe.safety_checker is None and pipe.config["safety_checker"] == [None, None]
    scheduler = fastdiff.EulerDiscreteScheduler()
    assert fastdiff.DiffusionPipeline.from_pretrained(sd_folder, scheduler=scheduler).scheduler is scheduler


def test_component_mismatch_names_both(pipes):
    ours, _ = pipes
    other_unet = fastdiff.UNet2DConditionModel.from_config(dict(ours.unet.config), cross_attention_dim=48)
    components = {**ours.components, "unet": other_unet}
    with pytest.raises(ValueError, match=r"cross_attention_dim=48 .*text_encoder.config.hidden_size=32"):
        fastdiff.StableDiffusionPipeline(**components)


def test_old_config_warns_naming_the_key(sd_folder, tmp_path, pipes):
    folder = tmp_path / "old"
    shutil.copytree(sd_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["steps_offset"] = 0
    path.write_text(json.dumps(config))
    with pytest.warns(FutureWarning, match="steps_offset") as record:
        pipe = fastdiff.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    assert len([w for w in record if "steps_offset" in str(w.message)]) == 1
    assert pipe.scheduler.config.steps_offset == 1


def test_missing_transformers_is_one_line(sd_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError) as info:
        fastdiff.DiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, feature_extractor=None)
    message = str(info.value)
    assert "fastdiff[text]" in message and "\n" not in message


def test_vae_slicing_and_tiling_pass_through(pipes):
    ours, _ = pipes
    latent = ours(prompt="a", generator=_gen(1), **{**BASE, "output_type": "latent", "num_inference_steps": 2}).images
    plain = ours.vae.decode(latent / ours.vae.config.scaling_factor).sample
    ours.enable_vae_slicing()
    ours.enable_vae_tiling()
    try:
        assert ours.vae.use_slicing and ours.vae.use_tiling
        torch.testing.assert_close(ours.vae.decode(latent / ours.vae.config.scaling_factor).sample, plain)
    finally:
        ours.disable_vae_slicing()
        ours.disable_vae_tiling()
    assert not ours.vae.use_slicing and not ours.vae.use_tiling


def test_bad_arguments_name_them(pipes):
    ours, _ = pipes
    with pytest.raises(ValueError, match="height and width"):
        ours(prompt="a", height=15, width=16)
    with pytest.raises(ValueError, match="prompt"):
        ours(num_inference_steps=2)
    with pytest.raises(ValueError, match="generator"):
        ours(prompt="a", generator=[torch.Generator()] * 3, **BASE)
    with pytest.raises(ValueError, match="latents"):
        ours(prompt="a", latents=torch.randn(1, 4, 5, 5), **BASE)


# ---------------------------------------------------------------------------------- img2img


@pytest.fixture(scope="module")
def img2img_pipes(pipes):
    ours, ref = pipes
    return (fastdiff.StableDiffusionImg2ImgPipeline(**ours.components),
            diffusers.StableDiffusionImg2ImgPipeline(**ref.components))  # fmt: skip


def test_img2img_matches_diffusers(img2img_pipes):
    from PIL import Image

    rng = np.random.default_rng(0)
    pil = Image.fromarray((rng.random((18, 20, 3)) * 255).astype(np.uint8))
    batch = torch.from_numpy(rng.random((2, 3, 16, 16)).astype(np.float32))
    for image, seed, prompt in ((pil, 0, "a cat"), (batch, [3, 4], ["a cat", "dog"])):
        out, expected = _both(img2img_pipes, "DPMSolverMultistepScheduler", seed=seed, prompt=prompt, image=image,
                              strength=0.7, base=dict(num_inference_steps=4, output_type="np"))  # fmt: skip
        assert out.images.shape[0] == (1 if image is pil else 2)
        np.testing.assert_allclose(out.images, expected.images, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="strength"):
        img2img_pipes[0](prompt="a", image=pil, strength=1.5)


# ------------------------------------------------------------------------- fastdiff controls


def test_temperature_scheduler(pipes):
    ours, _ = pipes
    ours.scheduler = fastdiff.EulerAncestralDiscreteScheduler.from_config(ours.scheduler.config)
    args = dict(prompt="a cat", **BASE)
    plain = ours(generator=_gen(5), **args).images
    ours.set_temperature_scheduler(fastdiff.TemperatureScheduler("constant", tau=1.0))
    np.testing.assert_array_equal(ours(generator=_gen(5), **args).images, plain)
    ours.set_temperature_scheduler(fastdiff.TemperatureScheduler("linear", tau=0.9, tau_end=0.5))
    ours.scheduler = fastdiff.EulerAncestralDiscreteScheduler.from_config(ours.scheduler.config)  # follows a swap
    cooled = ours(generator=_gen(5), **args).images
    assert ours.scheduler.temperature_scheduler is not None
    assert np.abs(cooled - plain).max() > 1e-3
    ours.set_temperature_scheduler(None)
    np.testing.assert_array_equal(ours(generator=_gen(5), **args).images, plain)


def test_spatial_resampler(pipes):
    ours, _ = pipes
    ours.scheduler = fastdiff.DPMSolverMultistepScheduler.from_config(ours.scheduler.config)
    args = dict(prompt="a cat", num_inference_steps=5, height=32, width=32, output_type="np")
    plain = ours(generator=_gen(6), **args).images
    sizes = []
    handle = ours.unet.register_forward_pre_hook(lambda m, a: sizes.append(tuple(a[0].shape[-2:])))
    try:
        ours.set_spatial_resampler(fastdiff.Resampler(scale=0.5, fraction=0.4))
        resampled = ours(generator=_gen(6), **args).images
    finally:
        handle.remove()
        ours.set_spatial_resampler(None)
    # 2 low-resolution steps, the x0 estimate at the switch, then 3 full-size steps
    assert sizes == [(8, 8)] * 3 + [(16, 16)] * 3
    assert resampled.shape == plain.shape and np.isfinite(resampled).all()
    assert np.abs(resampled - plain).max() > 1e-4
    np.testing.assert_array_equal(ours(generator=_gen(6), **args).images, plain)
    with pytest.raises(ValueError, match="fraction"):
        fastdiff.Resampler(fraction=1.0)
    with pytest.raises(TypeError, match="Resampler"):
        ours.set_spatial_resampler(0.5)
