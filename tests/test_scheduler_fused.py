"""The schedulers' fused step (fastdiff extension) against diffusers.

Each scheduler with a fused form runs a full CFG sampling loop: fastdiff's ``step`` gets the batched
(2B, ...) model output and ``guidance_scale`` and runs one ``scheduler_step`` launch per step
(forced ``reference`` or ``triton`` op backend; Triton runs under TRITON_INTERPRET=1 on the CPU),
and diffusers does chunk + CFG arithmetic + its own ``step``. Stochastic schedulers read a noise bank
pre-drawn with the generator calls diffusers makes. Also: the plain path (CPU default) with
``guidance_scale``, forced backends on configs without a fused form, dispatch traces, temperature,
begin indices, low precision, strided inputs, and the absence of host syncs.

Tolerances (fp32, max error relative to the largest |value| of diffusers' sample, at every step):
the fused tables are computed in float64 from the schedulers' float32 alphas/sigmas and rounded
once, while diffusers evaluates the same coefficients in float32 tensor arithmetic; the loops then
drift apart by float32 rounding. Measured maxima over 12 seeds (reference backend; Triton agrees):

* DDIM, DDPM, Euler, EulerAncestral, LMS, DPM-Solver++ order 1: under 7e-7 -> ``RTOL`` = 1e-6;
* DDPM near t = 0 with squaredcos_cap_v2: 1.2e-6 -> 4e-6. Here diffusers is the less accurate
  one: its float32 ``1 - a_t / a_prev`` cancels (1.05e-6 from a loop with float64 coefficients,
  against 1.8e-7 for the fused table; see also the custom-timesteps DDPM test);
* DPM-Solver++ order 2: 1.5e-6, PNDM (PLMS): 1.0e-6 -> 5e-6; DPM-Solver++ order 3: 8.8e-6 -> 2e-5.
  For DPM-Solver++ both loops are about equally far (1e-6 to 2e-6) from a loop with float64
  coefficients: the multistep differences of x0 predictions amplify float32 rounding on either side.

DDIM with eta = 1 at zero terminal SNR is left out: there diffusers takes sqrt(1 - a_prev - sigma^2)
of a float32 rounding residue (about 2e-4 instead of 0) where the table has the exact 0; eta = 0.8
is well conditioned.
"""

import contextlib
import inspect

import pytest
import torch
from _utils import assert_fp32_close, assert_low_precision_ok, max_abs_err, requires_triton

import fastdiff
import fastdiff.schedulers as fs

try:  # the oracle
    import diffusers
except ImportError:
    diffusers = None

requires_diffusers = pytest.mark.skipif(diffusers is None, reason="needs diffusers (the oracle)")

SHAPE = (1, 4, 9, 7)  # small and odd: the interpreter stays fast and no size is a power of two
STEPS = 10
GUIDANCE = 7.5
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
RTOL = 1e-6
RTOL_DDPM_NEAR_0 = 4e-6
RTOL_MULTISTEP = 5e-6
RTOL_3RD_ORDER = 2e-5
OP = "scheduler_step"


def _case(name, step_kwargs=None, stochastic=False, rtol=RTOL, **config):
    """(class name, config, step kwargs, draws noise, rtol)"""
    return name, config, step_kwargs or {}, stochastic, rtol


DDIM, DDPM, EULER = "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler"
EULER_A, DPM, LMS = "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler"
PNDM, HEUN = "PNDMScheduler", "HeunDiscreteScheduler"
V, KARRAS = {"prediction_type": "v_prediction"}, {"use_karras_sigmas": True}
CASES = {
    "ddim-eps-leading": _case(DDIM, clip_sample=False, set_alpha_to_one=False, steps_offset=1, **SD),
    "ddim-v-zero_snr-trailing-eta0.8": _case(
        DDIM, {"eta": 0.8}, True, clip_sample=False, rescale_betas_zero_snr=True, timestep_spacing="trailing",
        **V, **SD,
    ),  # fmt: skip
    "ddim-sample-linspace-eta0.5": _case(
        DDIM, {"eta": 0.5}, True, clip_sample=False, prediction_type="sample", timestep_spacing="linspace"
    ),
    "ddpm-eps-fixed_small": _case(DDPM, None, True, clip_sample=False),
    "ddpm-v-fixed_large-cos": _case(
        DDPM, None, True, RTOL_DDPM_NEAR_0, clip_sample=False, variance_type="fixed_large",
        beta_schedule="squaredcos_cap_v2", **V,
    ),  # fmt: skip
    "ddpm-sample-fixed_small_log": _case(
        DDPM, None, True, clip_sample=False, variance_type="fixed_small_log", prediction_type="sample"
    ),
    "euler-eps": _case(EULER, **SD),
    "euler-v-karras": _case(EULER, **V, **KARRAS, **SD),
    "euler-sample-trailing-sigma_min": _case(
        EULER, prediction_type="sample", timestep_spacing="trailing", final_sigmas_type="sigma_min"
    ),
    "euler_ancestral-eps": _case(EULER_A, None, True, **SD),
    "euler_ancestral-v-trailing": _case(EULER_A, None, True, timestep_spacing="trailing", **V, **SD),
    "dpmpp_1-eps": _case(DPM, solver_order=1, **SD),
    "dpmpp_2m-eps": _case(DPM, rtol=RTOL_MULTISTEP, **SD),
    "dpmpp_2m-v-heun-karras": _case(DPM, rtol=RTOL_MULTISTEP, solver_type="heun", **V, **KARRAS, **SD),
    "dpmpp_2m-sample-sigma_min-no_lower_final": _case(
        DPM, rtol=RTOL_MULTISTEP, prediction_type="sample", final_sigmas_type="sigma_min", lower_order_final=False
    ),
    "dpmpp_3m-eps": _case(DPM, rtol=RTOL_3RD_ORDER, solver_order=3, **SD),
    "dpmpp_3m-v-trailing-sigma_min-no_lower_final": _case(
        DPM, rtol=RTOL_3RD_ORDER, solver_order=3, timestep_spacing="trailing", final_sigmas_type="sigma_min",
        lower_order_final=False, **V, **SD,
    ),  # fmt: skip
    "lms-eps": _case(LMS, **SD),
    "lms-v-karras": _case(LMS, **V, **KARRAS, **SD),
    "lms-sample-order2": _case(LMS, {"order": 2}, prediction_type="sample"),
    "heun-eps": _case(HEUN, **SD),
    "heun-v-karras": _case(HEUN, **V, **KARRAS, **SD),
    "heun-sample-trailing": _case(HEUN, prediction_type="sample", timestep_spacing="trailing"),
    "pndm-plms-eps-sd15": _case(PNDM, rtol=RTOL_MULTISTEP, skip_prk_steps=True, steps_offset=1, **SD),
    "pndm-plms-v-trailing": _case(
        PNDM, rtol=RTOL_MULTISTEP, skip_prk_steps=True, timestep_spacing="trailing", set_alpha_to_one=True, **V, **SD
    ),
}
STOCHASTIC = [k for k, case in CASES.items() if case[3]]
FUSED_BACKENDS = ["reference", pytest.param("triton", marks=requires_triton)]


def fake_unet(model_input, t, weights):
    """A stand-in for a UNet on the batched CFG input (uncond rows first): a smooth function of the
    input and the timestep, different for the two halves through ``weights``."""
    phase = torch.cos(torch.tensor(float(t) / 137.0, dtype=torch.float64)).item()
    return 0.6 * torch.tanh(model_input) + (0.3 * phase) * weights.to(model_input.dtype) + 0.05 * model_input


def cfg(model_output, guidance):
    """diffusers' pipeline arithmetic."""
    uncond, cond = model_output.chunk(2)
    return uncond + guidance * (cond - uncond)


def _takes(scheduler, name):
    return name in inspect.signature(scheduler.step).parameters


def _make(case_id, library):
    name, config, step_kwargs, stochastic, rtol = CASES[case_id]
    return getattr(library, name)(**config), step_kwargs, stochastic, rtol


def _diffusers_loop(ref, x, weights, step_kwargs, generator, timesteps=None):
    """diffusers' sequence: model on the batched input, chunk + CFG, step. Yields every prev_sample."""
    gen_kwargs = {"generator": generator} if _takes(ref, "generator") else {}
    for t in ref.timesteps if timesteps is None else timesteps:
        model_output = fake_unet(ref.scale_model_input(torch.cat([x, x]), t), t, weights)
        x = ref.step(cfg(model_output, GUIDANCE), t, x, **gen_kwargs, **step_kwargs).prev_sample
        yield x


def _fastdiff_loop(sched, x, weights, step_kwargs, generator=None, guidance=GUIDANCE, timesteps=None):
    """fastdiff's sequence: model on the batched input, one step with guidance_scale. Yields every prev_sample."""
    gen_kwargs = {"generator": generator} if _takes(sched, "generator") else {}
    for t in sched.timesteps if timesteps is None else timesteps:
        model_output = fake_unet(sched.scale_model_input(torch.cat([x, x]), t), t, weights)
        x = sched.step(model_output, t, x, guidance_scale=guidance, **gen_kwargs, **step_kwargs).prev_sample
        yield x


def _inputs(ref, shape=SHAPE, dtype=torch.float32):
    weights = torch.randn(2 * shape[0], *shape[1:]) * 0.5
    x = (torch.randn(shape) * float(ref.init_noise_sigma)).to(dtype)
    return weights, x


# ---------------------------------------------------------------------------
# Fused loops against diffusers
# ---------------------------------------------------------------------------


@requires_diffusers
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case_id", list(CASES))
def test_fused_loop_matches_diffusers(case_id, backend, seed):
    """Full CFG loop, one fused launch per step (noise from a pre-drawn bank), vs diffusers."""
    ref, step_kwargs, stochastic, rtol = _make(case_id, diffusers)
    sched, _, _, _ = _make(case_id, fs)
    ref.set_timesteps(STEPS)
    sched.set_timesteps(STEPS)
    weights, x = _inputs(ref)
    if stochastic:
        sched.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed + 1))
    reference = _diffusers_loop(ref, x.clone(), weights, step_kwargs, torch.Generator().manual_seed(seed + 1))
    with fastdiff.use_backend(scheduler_step=backend):
        fused = _fastdiff_loop(sched, x.clone(), weights, step_kwargs, generator=torch.Generator().manual_seed(999))
        for i, x_ref in enumerate(reference):
            with fastdiff.trace_dispatch() as calls:
                x_fused = next(fused)
            assert calls == [(OP, backend)], f"step {i}: expected one fused launch, got {calls}"
            assert_fp32_close(x_fused, x_ref, rtol=rtol, what=f"{case_id} step {i} prev_sample (seed {seed})")
    assert i == len(ref.timesteps) - 1  # PNDM makes one more model call than STEPS


@requires_diffusers
@pytest.mark.parametrize("case_id", STOCHASTIC)
def test_fused_eager_draws_match_diffusers(case_id, seed):
    """Without a bank the fused step draws from the user's generator exactly when and as diffusers does."""
    ref, step_kwargs, _, rtol = _make(case_id, diffusers)
    sched, _, _, _ = _make(case_id, fs)
    ref.set_timesteps(STEPS)
    sched.set_timesteps(STEPS)
    weights, x = _inputs(ref)
    gen_ref, gen = torch.Generator().manual_seed(seed + 2), torch.Generator().manual_seed(seed + 2)
    with fastdiff.use_backend(scheduler_step="reference"):
        pairs = zip(
            _diffusers_loop(ref, x.clone(), weights, step_kwargs, gen_ref),
            _fastdiff_loop(sched, x.clone(), weights, step_kwargs, gen),
        )
        for i, (x_ref, x_fused) in enumerate(pairs):
            assert_fp32_close(x_fused, x_ref, rtol=rtol, what=f"{case_id} step {i}")
    assert torch.equal(gen.get_state(), gen_ref.get_state()), "the generators were advanced differently"


@requires_diffusers
@pytest.mark.parametrize(
    "case_id", ["ddpm-eps-fixed_small", "euler_ancestral-eps", "dpmpp_2m-eps", "ddim-v-zero_snr-trailing-eta0.8"]
)
def test_plain_path_with_guidance_matches_diffusers(case_id, seed):
    """On the CPU by default (auto) the plain step runs: guidance in PyTorch, then diffusers' math.
    Nothing is dispatched to the fused op. A tensor guidance scale gives the same numbers."""
    ref, step_kwargs, _, _ = _make(case_id, diffusers)
    sched, _, _, _ = _make(case_id, fs)
    ref.set_timesteps(STEPS)
    sched.set_timesteps(STEPS)
    weights, x = _inputs(ref)
    guidance = torch.tensor([GUIDANCE])
    with fastdiff.trace_dispatch() as calls:
        pairs = zip(
            _diffusers_loop(ref, x.clone(), weights, step_kwargs, torch.Generator().manual_seed(seed)),
            _fastdiff_loop(
                sched, x.clone(), weights, step_kwargs, torch.Generator().manual_seed(seed), guidance=guidance
            ),
        )
        for i, (x_ref, x_plain) in enumerate(pairs):
            assert_fp32_close(x_plain, x_ref, rtol=RTOL, what=f"{case_id} step {i}")
    assert calls == []


# ---------------------------------------------------------------------------
# Configurations without a fused form
# ---------------------------------------------------------------------------

UNSUPPORTED = [
    ("DDIMScheduler", {}, {}, "clip_sample"),  # diffusers' default clips
    ("DDIMScheduler", {"thresholding": True}, {}, "thresholding"),
    ("DDPMScheduler", {}, {}, "clip_sample"),
    ("DDPMScheduler", {"clip_sample": False, "variance_type": "learned_range"}, {}, "variance_type"),
    ("EulerDiscreteScheduler", {}, {"s_churn": 1.0}, "churn"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}, "algorithm_type"),
    ("DPMSolverMultistepScheduler", {"thresholding": True}, {}, "thresholding"),
    ("LMSDiscreteScheduler", {}, {"order": 5}, "order 5"),
    ("PNDMScheduler", {}, {}, "Runge-Kutta"),  # diffusers' default warm-up
    ("HeunDiscreteScheduler", {"clip_sample": True}, {}, "clip_sample"),
]


def _one_step(sched, step_kwargs):
    sched.set_timesteps(STEPS)
    t = sched.timesteps[0]
    x = torch.randn(SHAPE)
    learned = sched.config.get("variance_type") == "learned_range"  # the model outputs 2x the channels
    model_output = torch.randn(2 * SHAPE[0], SHAPE[1] * (2 if learned else 1), *SHAPE[2:])
    return sched.step(sched.scale_model_input(model_output, t), t, x, guidance_scale=GUIDANCE, **step_kwargs)


@pytest.mark.parametrize("name,config,step_kwargs,reason", UNSUPPORTED)
def test_forced_fused_backend_with_unsupported_config_raises(name, config, step_kwargs, reason, monkeypatch):
    with fastdiff.use_backend(scheduler_step="reference"), pytest.raises(ValueError, match=reason) as info:
        _one_step(getattr(fs, name)(**config), step_kwargs)
    assert "no fused form" in str(info.value) and "forced" in str(info.value)
    monkeypatch.setenv("FASTDIFF_BACKEND", "scheduler_step=triton")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        _one_step(getattr(fs, name)(**config), step_kwargs)


def test_model_output_dtype_unlike_the_sample_takes_the_plain_step():
    """fp32 latents with an fp16 model output: the plain step on auto (as diffusers), an error when forced."""
    sched = fs.EulerDiscreteScheduler()
    sched.set_timesteps(STEPS)
    t = sched.timesteps[0]
    model_output, x = torch.randn(2, *SHAPE[1:], dtype=torch.float16), torch.randn(SHAPE)
    with fastdiff.trace_dispatch() as calls:
        assert sched.step(model_output, t, x, guidance_scale=GUIDANCE).prev_sample.dtype == torch.float16
    assert calls == []
    with fastdiff.use_backend(scheduler_step="reference"), pytest.raises(ValueError, match="is torch.float16 but"):
        sched.step(model_output, t, x, guidance_scale=GUIDANCE)


@pytest.mark.parametrize("name,config,step_kwargs,reason", UNSUPPORTED)
def test_unsupported_config_runs_the_plain_step_on_auto(name, config, step_kwargs, reason):
    with fastdiff.trace_dispatch() as calls:
        out = _one_step(getattr(fs, name)(**config), step_kwargs)
    assert calls == [] and torch.isfinite(out.prev_sample).all()


# ---------------------------------------------------------------------------
# State: temperature, begin index, noise bank, validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["ddpm-eps-fixed_small", "euler_ancestral-eps", "ddim-sample-linspace-eta0.5"])
@pytest.mark.parametrize("before_set_timesteps", [True, False])
def test_temperature_scales_fused_noise(case_id, before_set_timesteps, seed):
    """tau(i) scales the injected noise on the fused path (folded into the table) exactly as on the
    plain path, whether attached before or after set_timesteps."""
    temperature = fs.TemperatureScheduler("linear", tau=1.0, tau_end=0.4)
    plain, step_kwargs, _, _ = _make(case_id, fs)
    fused, _, _, _ = _make(case_id, fs)
    for s in (plain, fused):
        if before_set_timesteps:
            s.set_temperature_scheduler(temperature)
        s.set_timesteps(STEPS)
        if not before_set_timesteps:
            s.set_temperature_scheduler(temperature)
        s.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed))
    weights, x = _inputs(plain)
    expected = list(_fastdiff_loop(plain, x.clone(), weights, step_kwargs))
    with fastdiff.use_backend(scheduler_step="reference"):
        got = list(_fastdiff_loop(fused, x.clone(), weights, step_kwargs))
    untempered, _, _, _ = _make(case_id, fs)
    untempered.set_timesteps(STEPS)
    untempered.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed))
    with fastdiff.use_backend(scheduler_step="reference"):
        hot = list(_fastdiff_loop(untempered, x.clone(), weights, step_kwargs))
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_fp32_close(a, b, rtol=RTOL, what=f"{case_id} step {i}")
    assert max_abs_err(got[-2], hot[-2]) > 1e-3, "the temperature changed nothing"


@requires_diffusers
@pytest.mark.parametrize(
    "case_id,begin", [("dpmpp_3m-eps", 3), ("lms-eps", 3), ("euler_ancestral-eps", 3), ("heun-eps", 4)]
)
def test_fused_loop_from_a_begin_index_matches_diffusers(case_id, begin, seed):
    """img2img: set_begin_index(k) starts the device index (and the multistep order ramp) at k
    (a pipeline gives Heun, of order 2, an even k)."""
    ref, step_kwargs, stochastic, rtol = _make(case_id, diffusers)
    sched, _, _, _ = _make(case_id, fs)
    for s in (ref, sched):
        s.set_timesteps(STEPS)
        s.set_begin_index(begin)
    if stochastic:
        sched.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed))
    weights, x = _inputs(ref)
    with fastdiff.use_backend(scheduler_step="reference"):
        pairs = zip(
            _diffusers_loop(
                ref, x.clone(), weights, step_kwargs, torch.Generator().manual_seed(seed), ref.timesteps[begin:]
            ),
            _fastdiff_loop(sched, x.clone(), weights, step_kwargs, timesteps=sched.timesteps[begin:]),
        )
        for i, (x_ref, x_fused) in enumerate(pairs):
            assert_fp32_close(x_fused, x_ref, rtol=rtol, what=f"{case_id} step {begin + i}")
    assert i == len(ref.timesteps) - begin - 1


@requires_diffusers
@pytest.mark.parametrize("case_id", ["ddim-eps-leading", "pndm-plms-eps-sd15"])
def test_fused_loop_starts_at_the_first_timestep_given(case_id, seed):
    """Without set_begin_index, DDIM, DDPM and PNDM read the first timestep once to place the device
    index (img2img with diffusers' pipelines, which set no begin index for them)."""
    ref, step_kwargs, _, rtol = _make(case_id, diffusers)
    sched, _, _, _ = _make(case_id, fs)
    ref.set_timesteps(STEPS)
    sched.set_timesteps(STEPS)
    weights, x = _inputs(ref)
    with fastdiff.use_backend(scheduler_step="reference"):
        pairs = zip(
            _diffusers_loop(ref, x.clone(), weights, step_kwargs, None, ref.timesteps[4:]),
            _fastdiff_loop(sched, x.clone(), weights, step_kwargs, timesteps=sched.timesteps[4:]),
        )
        for i, (x_ref, x_fused) in enumerate(pairs):
            assert_fp32_close(x_fused, x_ref, rtol=rtol, what=f"{case_id} step {4 + i}")
    # A forced fused step cannot start off the schedule (the plain step takes any timestep, as diffusers).
    with pytest.raises(ValueError, match="timestep 3 is not one of"), fastdiff.use_backend(scheduler_step="reference"):
        sched.set_timesteps(STEPS)
        sched.step(torch.randn(SHAPE), 3, torch.randn(SHAPE))


@requires_diffusers
def test_ddpm_fused_loop_with_custom_timesteps(seed):
    """DDPM's custom (uneven) timesteps: the table steps to the next listed timestep, as diffusers.

    The step 3 -> 0 is where diffusers' float32 ``1 - a_t / a_prev`` cancels (3.5e-5 off a loop with
    float64 coefficients, where the fused loop is 3.3e-7 off), so the oracle here is diffusers with its
    alphas_cumprod in float64: its arithmetic, its samples in float32, exact coefficients."""
    timesteps = [961, 700, 512, 311, 170, 42, 3, 0]
    ref, sched = diffusers.DDPMScheduler(clip_sample=False), fs.DDPMScheduler(clip_sample=False)
    ref.alphas_cumprod, ref.one = ref.alphas_cumprod.double(), ref.one.double()
    ref.set_timesteps(timesteps=timesteps)
    sched.set_timesteps(timesteps=timesteps)
    weights, x = _inputs(ref)
    sched.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed))
    with fastdiff.use_backend(scheduler_step="reference"):
        pairs = zip(
            _diffusers_loop(ref, x.clone(), weights, {}, torch.Generator().manual_seed(seed)),
            _fastdiff_loop(sched, x.clone(), weights, {}),
        )
        for i, (x_ref, x_fused) in enumerate(pairs):
            assert x_ref.dtype == torch.float32
            assert_fp32_close(x_fused, x_ref, rtol=RTOL, what=f"step {i}")
    assert i == len(timesteps) - 1


def test_noise_bank_holds_diffusers_draws_in_order(seed):
    """DDPM draws at t > 0 only: the bank's rows are the generator's draws in step order, zeros elsewhere."""
    sched = fs.DDPMScheduler(clip_sample=False, timestep_spacing="linspace")
    sched.set_timesteps(6)
    assert int(sched.timesteps[-1]) == 0
    bank = sched.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    expected = [torch.randn(SHAPE, generator=gen) for _ in range(5)]
    assert bank.shape == (6, *SHAPE)
    assert torch.equal(bank[:5], torch.stack(expected)) and torch.equal(bank[5], torch.zeros(SHAPE))


def test_fused_state_errors():
    with pytest.raises(ValueError, match="before set_timesteps"):
        fs.EulerAncestralDiscreteScheduler().prepare_noise_bank(SHAPE)
    euler = fs.EulerDiscreteScheduler()
    euler.set_timesteps(4)
    with pytest.raises(ValueError, match="draws no noise"):
        euler.prepare_noise_bank(SHAPE)
    with pytest.raises(ValueError, match=r"model_output must be the batched \(2B, \.\.\.\) CFG output"):
        euler.step(torch.randn(3, 4, 9, 7), euler.timesteps[0], torch.randn(SHAPE), guidance_scale=2.0)
    with fastdiff.use_backend(scheduler_step="reference"):
        for t in euler.timesteps:
            euler.step(torch.randn(SHAPE), t, torch.randn(SHAPE))
        with pytest.raises(ValueError, match="more often than the 4 steps"):  # not NaN from a row past the table
            euler.step(torch.randn(SHAPE), euler.timesteps[-1], torch.randn(SHAPE))
        dpm = fs.DPMSolverMultistepScheduler()
        dpm.set_timesteps(4)
        dpm.step(torch.randn(SHAPE), dpm.timesteps[0], torch.randn(SHAPE))
        with pytest.raises(ValueError, match="during a multistep loop"):
            dpm.step(torch.randn(2, 4, 9, 7), dpm.timesteps[1], torch.randn(2, 4, 9, 7))


# ---------------------------------------------------------------------------
# Layouts and low precision (Triton under the interpreter)
# ---------------------------------------------------------------------------


@requires_triton
@requires_diffusers
@pytest.mark.parametrize("case_id", ["dpmpp_2m-eps", "euler_ancestral-eps"])
def test_fused_loop_on_channels_last_and_strided_views(case_id, seed):
    """channels_last samples and a model output that is a strided view of a bigger buffer."""
    shape = (2, 4, 9, 7)
    ref, step_kwargs, stochastic, rtol = _make(case_id, diffusers)
    sched, _, _, _ = _make(case_id, fs)
    ref.set_timesteps(STEPS)
    sched.set_timesteps(STEPS)
    weights, x = _inputs(ref, shape)
    if stochastic:
        sched.prepare_noise_bank(shape, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    x_ref, x_fused = x.clone(), x.clone().to(memory_format=torch.channels_last)
    with fastdiff.use_backend(scheduler_step="triton"):
        for i, t in enumerate(ref.timesteps):
            model_output = fake_unet(ref.scale_model_input(torch.cat([x_ref, x_ref]), t), t, weights)
            x_ref = ref.step(cfg(model_output, GUIDANCE), t, x_ref, generator=gen, **step_kwargs).prev_sample
            model_input = sched.scale_model_input(torch.cat([x_fused, x_fused]), t)
            wide = torch.randn(4, 4, 9, 11)
            wide[:, :, :, 2:9] = fake_unet(model_input, t, weights)
            model_output = wide[:, :, :, 2:9]  # strided view: last-dim stride 1, row stride 11
            x_fused = sched.step(model_output, t, x_fused, guidance_scale=GUIDANCE, **step_kwargs).prev_sample
            assert_fp32_close(x_fused, x_ref, rtol=rtol, what=f"{case_id} step {i}")
            assert x_fused.is_contiguous(memory_format=torch.channels_last)
    if sched._fused.history is not None:  # the ring follows the sample's layout (the CUDA kernel needs one layout)
        assert sched._fused.history[0].stride() == x_fused.stride()


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case_id", ["ddim-eps-leading", "euler_ancestral-eps", "dpmpp_2m-eps"])
def test_fused_loop_low_precision(case_id, dtype, seed):
    """fp16/bf16 loops: the fused loop's error is at most 2x the error of the plain loop in the same
    dtype (diffusers' arithmetic: CFG and casts in the low dtype), both against the plain loop in
    fp32 (which matches diffusers, above) fed the same low-precision noise draws, upcast."""
    ref, step_kwargs, stochastic, _ = _make(case_id, fs)
    plain, _, _, _ = _make(case_id, fs)
    fused, _, _, _ = _make(case_id, fs)
    for s in (ref, plain, fused):
        s.set_timesteps(STEPS)
    weights, x = _inputs(ref)
    x = x.to(dtype).float()  # the same start in every loop
    if stochastic:
        for s in (plain, fused):
            bank = s.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        ref.prepare_noise_bank(SHAPE)
        ref._fused.noise_bank = bank.float()
    x_ref, x_plain, x_fused = x.clone(), x.to(dtype), x.to(dtype)
    for t in ref.timesteps:
        mo_ref = fake_unet(ref.scale_model_input(torch.cat([x_ref, x_ref]), t), t, weights)
        mo_plain = fake_unet(plain.scale_model_input(torch.cat([x_plain, x_plain]), t), t, weights)
        mo_fused = fake_unet(fused.scale_model_input(torch.cat([x_fused, x_fused]), t), t, weights)
        x_ref = ref.step(cfg(mo_ref, GUIDANCE), t, x_ref, **step_kwargs).prev_sample
        x_plain = plain.step(cfg(mo_plain, GUIDANCE), t, x_plain, **step_kwargs).prev_sample
        with fastdiff.use_backend(scheduler_step="triton"):
            x_fused = fused.step(mo_fused, t, x_fused, guidance_scale=GUIDANCE, **step_kwargs).prev_sample
    assert x_fused.dtype == dtype
    assert_low_precision_ok(x_fused, x_plain, x_ref, what=f"{case_id} {dtype}")


# ---------------------------------------------------------------------------
# No host synchronisation inside a fused step
# ---------------------------------------------------------------------------

HOST_READS = ("item", "cpu", "tolist", "numpy", "__int__", "__float__", "__bool__")
SYNC_CASES = [
    "ddim-eps-leading",
    "ddim-v-zero_snr-trailing-eta0.8",
    "ddpm-eps-fixed_small",
    "euler-eps",
    "euler_ancestral-eps",
    "dpmpp_3m-eps",
    "lms-sample-order2",
    "pndm-plms-eps-sd15",
    "heun-v-karras",
]


@contextlib.contextmanager
def _no_host_reads():
    """Make every way of reading a tensor's value on the host raise (CPU stand-in for sync checks)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside a fused step")

        return method

    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("case_id", SYNC_CASES)
def test_fused_step_reads_no_tensor_on_the_host(case_id, seed):
    """After set_timesteps (and set_begin_index, as a pipeline calls it), a fused step never reads a
    tensor value on the host: not the timestep, not the step index, not a table entry."""
    sched, step_kwargs, stochastic, _ = _make(case_id, fs)
    sched.set_timesteps(STEPS)
    sched.set_begin_index(0)
    if stochastic:
        sched.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed))
    weights, x = _inputs(sched)
    guidance = torch.tensor([GUIDANCE])
    # set_timesteps builds the table for the default step arguments; a step argument that changes the
    # table (DDIM's eta, LMS's order) rebuilds it on the first step that passes it (host arithmetic on
    # the scheduler's CPU tables), so that one step runs unchecked.
    warm_up = bool(step_kwargs)
    with fastdiff.use_backend(scheduler_step="reference"), fastdiff.trace_dispatch() as calls:
        for i, t in enumerate(sched.timesteps):
            model_output = fake_unet(sched.scale_model_input(torch.cat([x, x]), t), t, weights)
            with contextlib.nullcontext() if warm_up and i == 0 else _no_host_reads():
                x = sched.step(model_output, t, x, guidance_scale=guidance, **step_kwargs).prev_sample
    num_calls = len(sched.timesteps)
    assert calls == [(OP, "reference")] * num_calls and torch.isfinite(x).all()
    assert sched._fused.step_index.item() == num_calls


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "cuda"])
@pytest.mark.parametrize("case_id", SYNC_CASES)
def test_fused_loop_does_not_sync_on_cuda(case_id, backend, seed):
    """A fused CUDA loop under torch.cuda.set_sync_debug_mode("error"), then its result against the
    plain loop on the CPU. auto picks Triton on CUDA; "cuda" forces the CUDA kernel."""
    from fastdiff import _extension

    if backend == "cuda" and _extension.extension_reasons():
        pytest.skip(f"CUDA extension unavailable: {_extension.extension_reasons()}")
    device = torch.device("cuda")
    sched, step_kwargs, stochastic, _ = _make(case_id, fs)
    plain, _, _, _ = _make(case_id, fs)
    sched.set_timesteps(STEPS, device=device)
    plain.set_timesteps(STEPS)
    sched.set_begin_index(0)
    weights, x = _inputs(plain)
    if stochastic:  # the same CPU generator draws, moved to the GPU
        plain.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed))
        sched.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed), device=device)
    expected = list(_fastdiff_loop(plain, x.clone(), weights, step_kwargs))[-1]
    timesteps = list(sched.timesteps)  # indexing the device tensor up front, outside the checked region
    x_dev, w_dev = x.to(device), weights.to(device)
    phases = [0.3 * torch.cos(torch.tensor(float(t) / 137.0, dtype=torch.float64)).item() for t in plain.timesteps]
    context = contextlib.nullcontext() if backend == "auto" else fastdiff.use_backend(scheduler_step=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with context, fastdiff.trace_dispatch() as calls:
            for t, phase in zip(timesteps, phases):
                model_input = sched.scale_model_input(torch.cat([x_dev, x_dev]), t)
                model_output = 0.6 * torch.tanh(model_input) + phase * w_dev + 0.05 * model_input
                x_dev = sched.step(model_output, t, x_dev, guidance_scale=GUIDANCE, **step_kwargs).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls == [(OP, "triton" if backend == "auto" else "cuda")] * len(timesteps)
    assert_fp32_close(x_dev.cpu(), expected, rtol=1e-5, what=f"{case_id} on CUDA vs the CPU plain loop")


@pytest.mark.gpu
@pytest.mark.parametrize("name,config,step_kwargs,reason", UNSUPPORTED)
def test_unsupported_config_runs_the_plain_step_on_cuda(name, config, step_kwargs, reason):
    """auto on CUDA: the fused op for what it can express, the plain step (no dispatch) for the rest."""
    device = torch.device("cuda")
    sched = getattr(fs, name)(**config)
    sched.set_timesteps(STEPS, device=device)
    t = sched.timesteps[0]
    learned = sched.config.get("variance_type") == "learned_range"
    model_output = torch.randn(2 * SHAPE[0], SHAPE[1] * (2 if learned else 1), *SHAPE[2:], device=device)
    with fastdiff.trace_dispatch() as calls:
        out = sched.step(model_output, t, torch.randn(SHAPE, device=device), guidance_scale=GUIDANCE, **step_kwargs)
    assert calls == [] and out.prev_sample.device.type == "cuda"


# ---------------------------------------------------------------------------
# Schedulers without a fused form take guidance_scale on the plain path
# ---------------------------------------------------------------------------

NO_FUSED_FORM = {
    "pndm-prk": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", dict(SD)),
}


@requires_diffusers
@pytest.mark.parametrize("case_id", list(NO_FUSED_FORM))
def test_guidance_scale_without_a_fused_form(case_id):
    """PNDM's Runge-Kutta mode and UniPC apply guidance_scale in PyTorch and match diffusers' chunk + CFG + step;
    forcing a scheduler_step backend on them raises with the reason."""
    name, config = NO_FUSED_FORM[case_id]
    ref, sched = getattr(diffusers, name)(**config), getattr(fs, name)(**config)
    ref.set_timesteps(STEPS)
    sched.set_timesteps(STEPS)
    weights, x = _inputs(ref)
    with fastdiff.trace_dispatch() as calls:
        pairs = zip(_diffusers_loop(ref, x.clone(), weights, {}, None), _fastdiff_loop(sched, x.clone(), weights, {}))
        for i, (x_ref, x_plain) in enumerate(pairs):
            assert_fp32_close(x_plain, x_ref, rtol=RTOL, what=f"{case_id} step {i}")
    assert calls == []
    sched.set_timesteps(STEPS)
    with fastdiff.use_backend(scheduler_step="triton"), pytest.raises(ValueError, match="no fused form: "):
        sched.step(torch.randn(2, *SHAPE[1:]), sched.timesteps[0], torch.randn(SHAPE), guidance_scale=GUIDANCE)


# ---------------------------------------------------------------------------
# Replays: reset_fused_step rewinds in place; a captured CUDA graph of one step replays a loop
# ---------------------------------------------------------------------------

REPLAY_CASES = [
    "ddpm-eps-fixed_small",
    "euler_ancestral-eps",
    "dpmpp_3m-eps",
    "lms-eps",
    "pndm-plms-eps-sd15",
    "heun-eps",
]


def _model(x, weights):
    """A model that needs no host value (no timestep, no input scaling), so a graph can hold the step alone."""
    return 0.6 * torch.tanh(torch.cat([x, x])) + 0.3 * weights + 0.05 * torch.cat([x, x])


@pytest.mark.parametrize("case_id", REPLAY_CASES)
def test_reset_fused_step_replays_the_same_loop(case_id, seed):
    sched, step_kwargs, stochastic, _ = _make(case_id, fs)
    sched.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="needs one fused step first"):
        sched.reset_fused_step()
    if stochastic:
        sched.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed))
    weights, x0 = _inputs(sched)
    runs = []
    with fastdiff.use_backend(scheduler_step="reference"):
        for _ in range(2):
            x = x0.clone()
            for t in sched.timesteps:
                x = sched.step(_model(x, weights), t, x, guidance_scale=GUIDANCE, **step_kwargs).prev_sample
            runs.append(x)
            sched.reset_fused_step()
    assert torch.equal(runs[0], runs[1])
    assert sched._fused.step_index.tolist() == [0] and sched._fused.host_index == 0


@pytest.mark.gpu
@pytest.mark.parametrize("case_id", REPLAY_CASES)
def test_fused_step_replays_in_a_cuda_graph(case_id, seed):
    """Capture one fused step (after an eager warm-up), replay it once per timestep: the device index,
    history ring and noise bank advance inside the graph and give the eager loop's numbers."""
    device = torch.device("cuda")
    sched, step_kwargs, stochastic, _ = _make(case_id, fs)
    sched.set_timesteps(STEPS, device=device)
    sched.set_begin_index(0)
    if stochastic:
        sched.prepare_noise_bank(SHAPE, generator=torch.Generator().manual_seed(seed), device=device)
    weights, x0 = _inputs(sched)
    weights, x0 = weights.to(device), x0.to(device)
    timesteps = list(sched.timesteps)

    x = x0.clone()
    for t in timesteps:
        x = sched.step(_model(x, weights), t, x, guidance_scale=GUIDANCE, **step_kwargs).prev_sample
    eager = x

    static_x, static_out = x0.clone(), _model(x0, weights)
    sched.reset_fused_step()
    sched.step(static_out, timesteps[0], static_x.clone(), guidance_scale=GUIDANCE, **step_kwargs)  # warm-up
    sched.reset_fused_step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_prev = sched.step(static_out, timesteps[0], static_x, guidance_scale=GUIDANCE, **step_kwargs)[0]
    sched.reset_fused_step()
    for _ in timesteps:
        static_out.copy_(_model(static_x, weights))
        graph.replay()
        static_x.copy_(static_prev)
    assert_fp32_close(static_x, eager, rtol=1e-6, what=f"{case_id}: graph replays vs the eager fused loop")
