"""The scheduler half of the drop-in contract: the calls a diffusers user's code makes, unchanged.

A diffusers pipeline (and a training script) drives its scheduler through a small, fixed set of
calls: ``from_pretrained``/``from_config``, ``set_timesteps(n, device=...)``, ``timesteps``,
``order``, ``init_noise_sigma``, ``scale_model_input``, ``inspect.signature(step)`` to decide which
keywords to pass, ``step(..., return_dict=False)[0]``, ``set_begin_index`` and ``add_noise`` for
img2img, ``config`` reads, and ``save_pretrained``. This module runs those calls, written exactly as
diffusers' code writes them, on a fastdiff scheduler and on diffusers' class side by side, so that a
narrowing of the API (a renamed keyword, a missing method, a different return type) fails CI.
"""

import inspect

import pytest
import torch

import fastdiff.schedulers as fs

diffusers = pytest.importorskip("diffusers")

ALL = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
]
# Stable Diffusion's scheduler config, as found in a pipeline folder's scheduler/scheduler_config.json.
SD_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
LATENTS = (1, 4, 9, 11)


def _prepare_extra_step_kwargs(scheduler, generator, eta):
    """StableDiffusionPipeline.prepare_extra_step_kwargs, as diffusers writes it."""
    extra_step_kwargs = {}
    if "eta" in set(inspect.signature(scheduler.step).parameters.keys()):
        extra_step_kwargs["eta"] = eta
    if "generator" in set(inspect.signature(scheduler.step).parameters.keys()):
        extra_step_kwargs["generator"] = generator
    return extra_step_kwargs


def _unet(latent_model_input, t, weight):
    """A deterministic stand-in for the UNet's batched (uncond, cond) noise prediction."""
    scale = torch.cos(torch.as_tensor(t, dtype=torch.float32) / 211.0)
    return 0.4 * torch.tanh(latent_model_input) + weight * scale


def _text2img(scheduler, seed, num_inference_steps=6, guidance_scale=7.5, eta=0.3):
    """The denoising loop of StableDiffusionPipeline.__call__, scheduler calls written as diffusers writes them."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn((2, *LATENTS[1:]), generator=generator)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    timesteps = scheduler.timesteps
    latents = torch.randn(LATENTS, generator=generator) * scheduler.init_noise_sigma
    extra_step_kwargs = _prepare_extra_step_kwargs(scheduler, generator, eta)
    num_warmup_steps = len(timesteps) - num_inference_steps * scheduler.order
    assert num_warmup_steps >= 0
    for t in timesteps:
        latent_model_input = torch.cat([latents] * 2)
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = _unet(latent_model_input, t, weight)
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
    return latents


def _img2img(scheduler, seed, num_inference_steps=8, strength=0.6):
    """StableDiffusionImg2ImgPipeline: get_timesteps, set_begin_index, add_noise, then the loop."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(LATENTS, generator=generator)
    init_latents = torch.randn(LATENTS, generator=generator)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    latent_timestep = timesteps[:1].repeat(LATENTS[0])
    noise = torch.randn(LATENTS, generator=generator)
    latents = scheduler.add_noise(init_latents, noise, latent_timestep)
    extra_step_kwargs = _prepare_extra_step_kwargs(scheduler, generator, 0.0)
    for t in timesteps:
        model_output = _unet(scheduler.scale_model_input(latents, t), t, weight)
        latents = scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample
    return latents


def _load_both(name, tmp_path):
    """A diffusers-written pipeline folder, loaded and swapped the way users swap schedulers."""
    diffusers.PNDMScheduler.from_config(SD_CONFIG).save_pretrained(tmp_path / "sd" / "scheduler")
    loaded = []
    for lib in (fs, diffusers):
        base = lib.PNDMScheduler.from_pretrained(tmp_path / "sd", subfolder="scheduler")
        assert base.config.steps_offset == 1 and base.config.skip_prk_steps is True
        scheduler = getattr(lib, name).from_config(base.config)  # pipe.scheduler = X.from_config(pipe.scheduler.config)
        assert name in [c.__name__ for c in base.compatibles]
        loaded.append(scheduler)
    return loaded


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"])
def test_a_diffusers_users_scheduler_calls(name, tmp_path, seed):
    ours, ref = _load_both(name, tmp_path)
    defaults = "_use_default_values"  # diffusers lists them in set order
    assert set(ours.config[defaults]) == set(ref.config[defaults])
    assert {k: v for k, v in ours.config.items() if k != defaults} == {
        k: v for k, v in ref.config.items() if k != defaults
    }
    assert ours.order == ref.order and len(ours) == len(ref)

    torch.testing.assert_close(_text2img(ours, seed), _text2img(ref, seed), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    torch.testing.assert_close(_img2img(ours, seed), _img2img(ref, seed), rtol=1e-5, atol=1e-5)

    # Training scripts: add_noise at random integer timesteps of the training schedule.
    gen = torch.Generator().manual_seed(seed)
    clean, noise = torch.randn(LATENTS, generator=gen), torch.randn(LATENTS, generator=gen)
    for scheduler in (ours, ref):
        scheduler.set_timesteps(ours.config.num_train_timesteps)
    t = torch.randint(0, ours.config.num_train_timesteps, (LATENTS[0],), generator=gen)
    torch.testing.assert_close(ours.add_noise(clean, noise, t), ref.add_noise(clean, noise, t), rtol=1e-6, atol=1e-6)

    # Saving writes a folder diffusers loads as its own; the live config records the class, as in diffusers.
    ours.save_pretrained(tmp_path / "saved")
    assert ours.config["_class_name"] == name
    reloaded = getattr(diffusers, name).from_pretrained(tmp_path / "saved")
    assert {k: reloaded.config[k] for k in ours.config if not k.startswith("_")} == {
        k: v for k, v in ours.config.items() if not k.startswith("_")
    }


@pytest.mark.parametrize("name", ALL)
def test_the_public_surface_is_at_least_diffusers(name):
    """Every method a pipeline calls takes diffusers' parameters, in diffusers' order (extensions come after)."""
    ours, ref = getattr(fs, name), getattr(diffusers, name)
    methods = [
        "__init__", "set_timesteps", "step", "scale_model_input", "add_noise", "from_config", "from_pretrained",
        "save_pretrained", "save_config", "load_config", "set_begin_index", "index_for_timestep",
        "previous_timestep", "get_velocity", "step_prk", "step_plms", "convert_model_output", "to_json_string",
    ]  # fmt: skip
    for method in methods:
        if not hasattr(ref, method):
            continue
        assert hasattr(ours, method), f"{name}.{method} is missing"
        want = list(inspect.signature(getattr(ref, method)).parameters)
        got = list(inspect.signature(getattr(ours, method)).parameters)
        assert got[: len(want)] == want, f"{name}.{method}: diffusers takes {want}, fastdiff {got}"
    for attribute in ("order", "config_name", "_compatibles", "_deprecated_kwargs", "has_compatibles"):
        assert getattr(ours, attribute) == getattr(ref, attribute), attribute
    instance = ours()
    for attribute in ("timesteps", "init_noise_sigma", "num_inference_steps", "config", "compatibles"):
        assert hasattr(instance, attribute), attribute
