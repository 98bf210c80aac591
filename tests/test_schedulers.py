"""fastdiff schedulers against diffusers (the oracle): full sampling loops, configs, errors."""

import json

import pytest
import torch

import fastdiff.schedulers as fs

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 4, 7, 9)  # odd spatial sizes on purpose


def fake_model(sample, t, weight):
    """A deterministic stand-in for a UNet: a smooth function of the sample and the timestep."""
    t = float(t)
    return 0.6 * torch.tanh(sample) + 0.3 * weight * torch.cos(torch.tensor(t / 137.0)) + 0.05 * sample


def run_loop(scheduler, num_steps, seed, step_kwargs=None, set_kwargs=None):
    """Sample with ``scheduler``; return every prev_sample. Noise comes from one seeded generator."""
    step_kwargs = step_kwargs or {}
    set_kwargs = set_kwargs or {}
    if num_steps is None:
        scheduler.set_timesteps(**set_kwargs)
    else:
        scheduler.set_timesteps(num_steps, **set_kwargs)
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(SHAPE, generator=gen)
    sample = torch.randn(SHAPE, generator=gen) * scheduler.init_noise_sigma
    outs = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        model_output = fake_model(model_input, t, weight)
        out = (
            scheduler.step(model_output, t, sample, **step_kwargs, generator=gen)
            if _takes_generator(scheduler)
            else scheduler.step(model_output, t, sample, **step_kwargs)
        )
        sample = out.prev_sample
        outs.append(sample)
    return outs


def _takes_generator(scheduler):
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


def assert_loops_match(name, config, num_steps=12, step_kwargs=None, set_kwargs=None, *, seed, rtol=1e-6):
    ours = getattr(fs, name)(**config)
    ref = getattr(diffusers, name)(**config)
    got = run_loop(ours, num_steps, seed, step_kwargs, set_kwargs)
    want = run_loop(ref, num_steps, seed, step_kwargs, set_kwargs)
    assert len(got) == len(want) > 0
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0, check_dtype=True)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.isfinite(w).all(), f"{name} step {i}: the oracle itself is not finite"
        scale = w.abs().max().item()
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{name} step {i}: {m}")
    return got


# ---- option grids -----------------------------------------------------------------------------

BETAS = [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()},
]
SPACINGS = [{"timestep_spacing": s} for s in ("leading", "trailing", "linspace")]

DDIM_CASES = [
    *[(b, {}) for b in BETAS],
    *[(s, {}) for s in SPACINGS],
    ({"steps_offset": 1, "set_alpha_to_one": False}, {}),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {}),
    ({"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 0.8}, {}),
    ({"clip_sample": False}, {"eta": 1.0}),
    ({"thresholding": True, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.9}, {"eta": 0.5}),
    ({}, {"eta": 0.3, "use_clipped_model_output": True}),
]


@pytest.mark.parametrize("config,step_kwargs", DDIM_CASES)
def test_ddim_matches_diffusers(config, step_kwargs, seed):
    assert_loops_match("DDIMScheduler", config, step_kwargs=step_kwargs, seed=seed)


EULER_CASES = [
    *[(b, {}) for b in BETAS],
    *[(s, {}) for s in SPACINGS],
    ({"timestep_spacing": "leading", "steps_offset": 1}, {}),
    ({"use_karras_sigmas": True, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, {}),
    ({"use_exponential_sigmas": True}, {}),
    ({"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, {}),
    ({"interpolation_type": "log_linear"}, {}),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {}),
    ({"prediction_type": "v_prediction", "timestep_type": "continuous"}, {}),
    ({"prediction_type": "sample", "final_sigmas_type": "sigma_min"}, {}),
    ({}, {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 50.0, "s_noise": 1.003}),
]


@pytest.mark.parametrize("config,step_kwargs", EULER_CASES)
def test_euler_matches_diffusers(config, step_kwargs, seed):
    assert_loops_match("EulerDiscreteScheduler", config, step_kwargs=step_kwargs, seed=seed)


def test_euler_custom_timesteps_and_sigmas_match_diffusers(seed):
    assert_loops_match(
        "EulerDiscreteScheduler", {}, None, set_kwargs={"timesteps": [999, 800, 650, 400, 120, 3]}, seed=seed
    )
    assert_loops_match(
        "EulerDiscreteScheduler", {}, None, set_kwargs={"sigmas": [14.6, 7.0, 3.2, 1.1, 0.3, 0.0]}, seed=seed
    )


DDPM_CASES = [
    *[({"variance_type": v}, {}) for v in ("fixed_small", "fixed_small_log", "fixed_large")],
    *[(b, {}) for b in BETAS],
    *[(s, {}) for s in SPACINGS],
    ({"beta_schedule": "sigmoid"}, {}),
    ({"steps_offset": 1, "clip_sample_range": 0.7}, {}),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {}),
    ({"prediction_type": "sample", "clip_sample": False}, {}),
    ({"thresholding": True, "sample_max_value": 1.3}, {}),
]


@pytest.mark.parametrize("config,step_kwargs", DDPM_CASES)
def test_ddpm_matches_diffusers(config, step_kwargs, seed):
    assert_loops_match("DDPMScheduler", config, step_kwargs=step_kwargs, seed=seed)


def test_ddpm_custom_timesteps_and_learned_range_match_diffusers(seed):
    assert_loops_match("DDPMScheduler", {}, None, set_kwargs={"timesteps": [990, 700, 640, 300, 41, 0]}, seed=seed)
    # learned_range: the model returns eps and a variance interpolation channel block.
    ours, ref = fs.DDPMScheduler(variance_type="learned_range"), diffusers.DDPMScheduler(variance_type="learned_range")
    for s in (ours, ref):
        s.set_timesteps(8)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=gen)
    out = torch.randn(SHAPE[0], 2 * SHAPE[1], *SHAPE[2:], generator=gen).clamp(-1, 1)
    for t in ours.timesteps:
        got = ours.step(out, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        want = ref.step(out, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


PNDM_CASES = [
    {},
    {"skip_prk_steps": True},
    {
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
    },
    *[{**s, "skip_prk_steps": True} for s in SPACINGS],
    *[{**b} for b in BETAS[2:]],
    {"prediction_type": "v_prediction", "skip_prk_steps": True},
    {"timestep_spacing": "trailing"},
]


@pytest.mark.parametrize("config", PNDM_CASES)
def test_pndm_matches_diffusers(config, seed):
    assert_loops_match("PNDMScheduler", config, num_steps=15, seed=seed)


EULER_A_CASES = [
    *[(b, {}) for b in BETAS],
    *[(s, {}) for s in SPACINGS],
    ({"timestep_spacing": "leading", "steps_offset": 1}, {}),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, {}),
]


@pytest.mark.parametrize("config,step_kwargs", EULER_A_CASES)
def test_euler_ancestral_matches_diffusers(config, step_kwargs, seed):
    assert_loops_match("EulerAncestralDiscreteScheduler", config, step_kwargs=step_kwargs, seed=seed)


HEUN_CASES = [
    {},
    *BETAS[1:],
    {"beta_schedule": "exp"},
    *SPACINGS,
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "sample", "clip_sample": True, "clip_sample_range": 2.0},
]


@pytest.mark.parametrize("config", HEUN_CASES)
def test_heun_matches_diffusers(config, seed):
    assert_loops_match("HeunDiscreteScheduler", config, num_steps=8, seed=seed)


def test_heun_custom_timesteps_match_diffusers(seed):
    assert_loops_match(
        "HeunDiscreteScheduler", {}, None, set_kwargs={"timesteps": [999, 700, 501, 200, 10]}, seed=seed
    )


LMS_CASES = [
    ({}, {}),
    *[(b, {}) for b in BETAS[1:]],
    *[(s, {}) for s in SPACINGS],
    ({"timestep_spacing": "leading", "steps_offset": 1}, {}),
    ({"use_karras_sigmas": True}, {}),
    ({"use_exponential_sigmas": True}, {}),
    ({"prediction_type": "v_prediction"}, {}),
    ({"prediction_type": "sample"}, {"order": 3}),
    ({}, {"order": 2}),
    ({}, {"order": 6}),
]


@pytest.mark.parametrize("config,step_kwargs", LMS_CASES)
def test_lms_matches_diffusers(config, step_kwargs, seed):
    pytest.importorskip("scipy")  # diffusers' LMS (the oracle) needs it; fastdiff's does not
    assert_loops_match("LMSDiscreteScheduler", config, step_kwargs=step_kwargs, seed=seed)


DPM_CASES = [
    *[({"solver_order": o, "lower_order_final": lof}, 12) for o in (1, 2, 3) for lof in (True, False)],
    *[({"solver_order": o, "use_karras_sigmas": True}, 12) for o in (2, 3)],
    ({"solver_order": 3}, 20),
    ({"solver_type": "heun", "solver_order": 2}, 12),
    ({"euler_at_final": True, "solver_order": 3, "final_sigmas_type": "sigma_min"}, 16),
    *[(b, 10) for b in BETAS[1:]],
    *[(s, 10) for s in SPACINGS],
    ({"timestep_spacing": "leading", "steps_offset": 1}, 10),
    ({"use_karras_sigmas": True, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, 10),
    ({"use_exponential_sigmas": True}, 10),
    ({"use_lu_lambdas": True}, 10),
    ({"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}, 10),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10),
    ({"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5}, 10),
    ({"lambda_min_clipped": -5.1}, 10),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, 10),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun"}, 10),
    ({"algorithm_type": "sde-dpmsolver++", "solver_order": 1}, 10),
    ({"algorithm_type": "dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 10),
    ({"algorithm_type": "dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 10),
    ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, 10),
    ({"algorithm_type": "sde-dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 10),
]


@pytest.mark.parametrize("config,num_steps", DPM_CASES)
def test_dpmsolver_multistep_matches_diffusers(config, num_steps, seed):
    assert_loops_match("DPMSolverMultistepScheduler", config, num_steps=num_steps, seed=seed)


def test_dpmsolver_custom_timesteps_match_diffusers(seed):
    assert_loops_match(
        "DPMSolverMultistepScheduler",
        {"solver_order": 3},
        None,
        set_kwargs={"timesteps": [999, 850, 600, 420, 300, 80, 5]},
        seed=seed,
    )


# A zero final sigma makes lambda infinite on the last step; like diffusers, a third-order last step,
# bh1 and predict_x0=False then give NaN, so those cases end at sigma_min.
UNIPC_CASES = [
    *[({"solver_order": o}, 12) for o in (1, 2, 3)],
    *[({"solver_order": o, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 12) for o in (1, 2, 3)],
    ({"solver_order": 3}, 20),
    ({"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 10),
    ({"predict_x0": False, "solver_order": 3, "final_sigmas_type": "sigma_min"}, 10),
    ({"predict_x0": False, "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}, 10),
    ({"disable_corrector": [0, 3]}, 10),
    ({"use_karras_sigmas": True, "solver_order": 3}, 10),
    ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "sigma_min": 0.05}, 10),
    ({"use_exponential_sigmas": True}, 10),
    ({"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "flow_prediction"}, 10),
    ({"use_flow_sigmas": True, "shift_terminal": 0.1, "prediction_type": "flow_prediction"}, 10),
    *[(b, 10) for b in BETAS[1:]],
    *[(s, 10) for s in SPACINGS],
    ({"timestep_spacing": "leading", "steps_offset": 1}, 10),
    ({"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 10),
    ({"prediction_type": "sample", "thresholding": True, "sample_max_value": 1.5}, 10),
    ({"final_sigmas_type": "sigma_min"}, 10),
]


@pytest.mark.parametrize("config,num_steps", UNIPC_CASES)
def test_unipc_matches_diffusers(config, num_steps, seed):
    assert_loops_match("UniPCMultistepScheduler", config, num_steps=num_steps, seed=seed)


def test_unipc_with_solver_p_matches_diffusers():
    # Trailing spacing gives UniPC and DDIM the same timesteps, so DDIM can step on UniPC's schedule.
    kw = {"timestep_spacing": "trailing"}
    ours = fs.UniPCMultistepScheduler(**kw, solver_p=fs.DDIMScheduler(clip_sample=False, **kw))
    ref = diffusers.UniPCMultistepScheduler(**kw, solver_p=diffusers.DDIMScheduler(clip_sample=False, **kw))
    for a, b in zip(run_loop(ours, 8, 1), run_loop(ref, 8, 1)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- configs, swaps, outputs, errors ------------------------------------------------------------

ALL = [
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "UniPCMultistepScheduler",
]  # fmt: skip
SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}


def _public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip_with_diffusers(name, tmp_path):
    ours = getattr(fs, name)(**SD15, prediction_type="v_prediction")
    ours.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name and "_diffusers_version" in saved
    ref = getattr(diffusers, name).from_pretrained(tmp_path / "a")
    assert _public(ref.config) == _public(ours.config)

    ref.save_pretrained(tmp_path / "pipe" / "scheduler")
    back = getattr(fs, name).from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert _public(back.config) == _public(ours.config)
    assert back.config.prediction_type == "v_prediction" and back.config["beta_schedule"] == "scaled_linear"


@pytest.mark.parametrize("target", ALL)
@pytest.mark.parametrize("source", ["PNDMScheduler", "DPMSolverMultistepScheduler"])
def test_from_config_swap_keeps_keys_like_diffusers(source, target):
    ours = getattr(fs, target).from_config(getattr(fs, source)(**SD15).config)
    ref = getattr(diffusers, target).from_config(getattr(diffusers, source)(**SD15).config)
    assert type(ours).__name__ == target
    assert _public(ours.config) == _public(ref.config)
    # and back again: the source's own keys survived the trip
    again = getattr(fs, source).from_config(ours.config)
    assert _public(again.config) == _public(getattr(fs, source)(**SD15).config)


def test_from_config_overrides_and_compatibles():
    s = fs.EulerDiscreteScheduler.from_config(fs.DDIMScheduler(clip_sample=False).config, timestep_spacing="trailing")
    assert s.config.timestep_spacing == "trailing"
    assert s.config.clip_sample is False  # a DDIM-only key set by the user is kept, as in diffusers
    assert "set_alpha_to_one" not in s.config  # a DDIM default is not (it was never a user choice)
    names = {c.__name__ for c in fs.DDIMScheduler().compatibles}
    assert set(ALL) <= names
    with pytest.raises(TypeError):
        s.config["beta_start"] = 1.0
    with pytest.raises(ValueError, match="dict"):
        fs.DDIMScheduler.from_config("path/to/dir")


def test_config_survives_deepcopy():
    import copy

    s = fs.DPMSolverMultistepScheduler(solver_order=3)
    c = copy.deepcopy(s)
    assert c.config == s.config and c.config.solver_order == 3


@pytest.mark.parametrize("name", ALL)
def test_add_noise_matches_diffusers(name):
    ours, ref = getattr(fs, name)(), getattr(diffusers, name)()
    for s in (ours, ref):
        s.set_timesteps(10)
    gen = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = ours.timesteps[[1, 4]]
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)


# DDPM and EulerAncestral draw their noise in the model output's dtype (as diffusers does), so an
# fp16 call and an fp32 call see different noise; they are checked for dtype only.
DETERMINISTIC_AT_DEFAULTS = [n for n in ALL if n not in ("DDPMScheduler", "EulerAncestralDiscreteScheduler")]


@pytest.mark.parametrize("name", DETERMINISTIC_AT_DEFAULTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_step_computes_in_float32_and_casts_back(name, dtype):
    gen = torch.Generator().manual_seed(9)
    sample = torch.randn(SHAPE, generator=gen).to(dtype)
    out = torch.randn(SHAPE, generator=gen).to(dtype)
    results = []
    for x, y in ((sample, out), (sample.float(), out.float())):  # low-precision inputs are exact in fp32
        s = getattr(fs, name)()
        s.set_timesteps(10)
        t = s.timesteps[0]
        s.scale_model_input(x, t)
        results.append(s.step(y, t, x).prev_sample)
    assert results[0].dtype == dtype
    # The low-precision step is the fp32 step rounded once at the end.
    torch.testing.assert_close(results[0], results[1].to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_stochastic_step_keeps_low_precision_dtype(name):
    s = getattr(fs, name)()
    s.set_timesteps(10)
    x = torch.randn(SHAPE).half()
    s.scale_model_input(x, s.timesteps[0])
    y = s.step(x, s.timesteps[0], x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
def test_step_accepts_strided_and_channels_last_inputs(name):
    gen = torch.Generator().manual_seed(2)
    big = torch.randn(SHAPE[0], SHAPE[1], SHAPE[2], 2 * SHAPE[3], generator=gen)
    sample = big[..., ::2]  # non-contiguous
    out = torch.randn(SHAPE, generator=gen).to(memory_format=torch.channels_last)
    a, b = getattr(fs, name)(), getattr(fs, name)()
    for s in (a, b):
        s.set_timesteps(6)
    for t in a.timesteps[:3]:
        kw = {"generator": torch.Generator().manual_seed(int(t))} if _takes_generator(a) else {}
        ya = a.step(out, t, sample, **kw).prev_sample
        kw = {"generator": torch.Generator().manual_seed(int(t))} if _takes_generator(b) else {}
        yb = b.step(out.contiguous(), t, sample.contiguous(), **kw).prev_sample
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)


def test_outputs_index_like_diffusers():
    s = fs.DDIMScheduler()
    s.set_timesteps(5)
    x = torch.randn(SHAPE)
    out = s.step(x, s.timesteps[0], x)
    assert out[0] is out.prev_sample and out["pred_original_sample"] is out.pred_original_sample
    prev, x0 = s.step(x, s.timesteps[0], x, return_dict=False)
    torch.testing.assert_close(prev, out.prev_sample)


@pytest.mark.parametrize("name", ALL)
def test_unknown_beta_schedule_raises(name):
    with pytest.raises(ValueError, match="beta_schedule"):
        getattr(fs, name)(beta_schedule="quadratic")


# diffusers raises for these too; the others step on the training-length schedule (test_scheduler_compat.py).
@pytest.mark.parametrize(
    "name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler", "UniPCMultistepScheduler"]
)
def test_step_before_set_timesteps_raises(name):
    s = getattr(fs, name)()
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, s.timesteps[0] if s.timesteps is not None else 999, x)


# Where diffusers fails on a timestep off the schedule (an IndexError deep inside), fastdiff says why;
# DDIM, PNDM, DPM-Solver and UniPC accept one, as diffusers does (test_scheduler_compat.py).
@pytest.mark.parametrize(
    "name",
    ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
     "LMSDiscreteScheduler"],
)  # fmt: skip
def test_timestep_not_in_schedule_raises(name):
    s = getattr(fs, name)()
    s.set_timesteps(10)
    x = torch.randn(SHAPE)
    bad = torch.tensor(12.5) if s.timesteps.is_floating_point() else torch.tensor(13)
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        s.step(x, bad, x)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler"])
def test_fractional_timestep_raises(name):
    s = getattr(fs, name)()
    s.set_timesteps(10)
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="integer training timestep"):
        s.step(x, torch.tensor(float(s.timesteps[0]) + 0.5), x)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
@pytest.mark.parametrize("order", [0, 4])
def test_solver_order_out_of_range_raises(name, order):
    with pytest.raises(ValueError, match="solver_order"):
        getattr(fs, name)(solver_order=order)


def test_lms_order_and_prediction_type_errors():
    with pytest.raises(ValueError, match="order"):
        s = fs.LMSDiscreteScheduler()
        s.set_timesteps(4)
        s.step(torch.randn(SHAPE), s.timesteps[0], torch.randn(SHAPE), order=0)
    with pytest.raises(ValueError, match="prediction_type"):
        fs.DDIMScheduler(prediction_type="flow")
    with pytest.raises(ValueError, match="timestep_spacing"):
        fs.DDIMScheduler(timestep_spacing="even").set_timesteps(4)


def test_lms_coefficients_match_scipy_quadrature():
    pytest.importorskip("scipy")
    ours, ref = fs.LMSDiscreteScheduler(), diffusers.LMSDiscreteScheduler()
    for s in (ours, ref):
        s.set_timesteps(17)
    for t in (3, 9, 16):
        for order in (1, 2, 3, 4):
            for j in range(order):
                want = ref.get_lms_coefficient(order, t, j)
                assert ours.get_lms_coefficient(order, t, j) == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_randn_tensor_matches_diffusers_draws():
    from diffusers.utils.torch_utils import randn_tensor as ref_randn

    from fastdiff.schedulers.scheduling_utils import randn_tensor

    shape = (3, 4, 5, 6)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    torch.testing.assert_close(
        randn_tensor(shape, generator=gens()), ref_randn(shape, generator=gens()), rtol=0, atol=0
    )
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a = randn_tensor(shape, generator=g1, dtype=torch.float16)
    b = ref_randn(shape, generator=g2, dtype=torch.float16)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="generators"):
        randn_tensor(shape, generator=gens()[:2])


def test_from_config_across_libraries():
    # diffusers config -> fastdiff class, and fastdiff config -> diffusers class, give the same configs.
    src_ref = diffusers.DPMSolverMultistepScheduler(**SD15, solver_order=3)
    src_ours = fs.DPMSolverMultistepScheduler(**SD15, solver_order=3)
    for target in ("EulerDiscreteScheduler", "UniPCMultistepScheduler", "DDIMScheduler"):
        a = getattr(fs, target).from_config(src_ref.config)
        b = getattr(diffusers, target).from_config(src_ours.config)
        assert _public(a.config) == _public(b.config)


def test_loads_a_stable_diffusion_1_5_scheduler_config(tmp_path):
    sd15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False,
    }  # fmt: skip
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sd15))
    ours = fs.PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    ref = diffusers.PNDMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert _public(ours.config) == _public(ref.config) and ours.config.clip_sample is False
    for a, b in zip(run_loop(ours, 20, 4), run_loop(ref, 20, 4)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    euler = fs.EulerDiscreteScheduler.from_config(ours.config)
    assert euler.config.steps_offset == 1 and euler.config.beta_schedule == "scaled_linear"
    with pytest.raises(OSError, match="scheduler_config.json"):
        fs.PNDMScheduler.from_pretrained(tmp_path / "scheduler" / "nope")


# Schedulers that track a step index: once it is set (set_begin_index, as a pipeline does), their
# step reads only host-side tables and CPU scalars. DDPM, DDIM and PNDM read the timestep's value
# (int(timestep)), which syncs when it lives on the GPU; the fused step of DDPM and DDIM does not
# (tests/test_scheduler_fused.py checks every fused scheduler under the sync debug mode).
SYNC_FREE = [
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("LMSDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("UniPCMultistepScheduler", {"solver_order": 3}),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,config", SYNC_FREE)
def test_step_does_not_sync_on_cuda(name, config):
    device = torch.device("cuda")
    s = getattr(fs, name)(**config)
    s.set_timesteps(8, device=device)
    s.set_begin_index(0)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(SHAPE, device=device, generator=gen) * float(s.init_noise_sigma)
    timesteps = list(s.timesteps)  # indexing the device tensor up front, outside the checked region
    kw = {"generator": gen} if _takes_generator(s) else {}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in timesteps:
            x = s.step(0.5 * torch.tanh(s.scale_model_input(x, t)), t, x, **kw).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()
