"""The fused scheduler step (fastdiff.ops.scheduler_step) against diffusers and its reference twin.

diffusers' schedulers are the oracle: full CFG sampling loops with a fake UNet,
every step's prev_sample (and x0 prediction) compared with diffusers' own
``step`` after diffusers' CFG arithmetic. The Triton kernel runs under
TRITON_INTERPRET=1 on the CPU; the CUDA kernel and the sync checks run on a GPU.
"""

import dataclasses
import importlib
from typing import Callable, Dict

import pytest
import torch
from _utils import assert_fp32_close, assert_low_precision_ok, max_abs_err, requires_cuda, requires_triton

from fastdiff import backends
from fastdiff.ops.scheduler_step import scheduler_step, scheduler_step_ref

ss = importlib.import_module("fastdiff.ops.scheduler_step")  # the module (fastdiff.ops.scheduler_step is also the op's name)

try:  # the oracle; the GPU and validation tests run without it
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor
except ImportError:
    diffusers = None

requires_diffusers = pytest.mark.skipif(diffusers is None, reason="needs diffusers (the oracle)")

SHAPE = (1, 4, 9, 7)  # small and odd, so the interpreter is fast and no size is a power of two
GUIDANCE = 7.5
STEPS = 12
SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def fake_unet(model_input, t, weights):
    """A deterministic stand-in for a UNet on the batched CFG input (uncond rows first):
    a smooth function of the input and the timestep, different for the two halves."""
    phase = torch.cos(torch.tensor(float(t) / 137.0, dtype=model_input.dtype))
    return 0.6 * torch.tanh(model_input) + 0.3 * weights.to(model_input.dtype) * phase + 0.05 * model_input


def cfg(model_output, guidance):
    """diffusers' pipeline arithmetic."""
    uncond, cond = model_output.chunk(2)
    return uncond + guidance * (cond - uncond)


@dataclasses.dataclass
class Case:
    """A diffusers scheduler configuration and how the fused step expresses it."""

    make: Callable[[], object]
    coeffs: Callable[[object], torch.Tensor]
    draws_noise: Callable[[object, int, object], bool]  # does diffusers' step i draw noise?
    karras_input: bool = False  # scale_model_input divides by sqrt(sigma^2 + 1)
    step_kwargs: Dict = dataclasses.field(default_factory=dict)
    x0_in_history: bool = True  # the history slot holds diffusers' pred_original_sample
    history_slots: int = 1


def _ddim(eta, **config):
    pt = config.get("prediction_type", "epsilon")
    return Case(
        make=lambda: diffusers.DDIMScheduler(clip_sample=False, **config),
        coeffs=lambda s: ss.ddim_coeffs(
            s.alphas_cumprod, s.timesteps, final_alpha_cumprod=s.final_alpha_cumprod,
            num_train_timesteps=s.config.num_train_timesteps, prediction_type=pt, eta=eta,
        ),
        draws_noise=lambda s, i, t: eta > 0,
        step_kwargs={"eta": eta},
    )


def _euler(s_churn=0.0, **config):
    pt = config.get("prediction_type", "epsilon")
    return Case(
        make=lambda: diffusers.EulerDiscreteScheduler(**config),
        coeffs=lambda s: ss.euler_coeffs(s.sigmas, prediction_type=pt, s_churn=s_churn),
        draws_noise=lambda s, i, t: s_churn > 0,
        karras_input=True,
        step_kwargs={"s_churn": s_churn},
        x0_in_history=s_churn == 0,  # with churn diffusers' x0 includes the churn noise; d does not
    )


def _euler_ancestral(**config):
    pt = config.get("prediction_type", "epsilon")
    return Case(
        make=lambda: diffusers.EulerAncestralDiscreteScheduler(**config),
        coeffs=lambda s: ss.euler_ancestral_coeffs(s.sigmas, prediction_type=pt),
        draws_noise=lambda s, i, t: True,
        karras_input=True,
    )


def _ddpm(variance_type, **config):
    pt = config.get("prediction_type", "epsilon")
    return Case(
        make=lambda: diffusers.DDPMScheduler(clip_sample=False, variance_type=variance_type, **config),
        coeffs=lambda s: ss.ddpm_coeffs(s.alphas_cumprod, s.timesteps, prediction_type=pt, variance_type=variance_type),
        draws_noise=lambda s, i, t: int(t) > 0,
    )


def _dpmpp(**config):
    def coeffs(s):
        c = s.config
        return ss.dpmpp_2m_coeffs(
            s.sigmas, prediction_type=c.prediction_type, solver_order=c.solver_order, solver_type=c.solver_type,
            lower_order_final=c.lower_order_final, euler_at_final=c.euler_at_final, final_sigmas_type=c.final_sigmas_type,
        )

    slots = max(1, config.get("solver_order", 2) - 1)
    return Case(make=lambda: diffusers.DPMSolverMultistepScheduler(**config), coeffs=coeffs, draws_noise=lambda s, i, t: False, history_slots=slots)


CASES = {
    "ddim-eps-leading": _ddim(0.0, **SD_BETAS, set_alpha_to_one=False, steps_offset=1),
    "ddim-v-zero_snr-trailing-eta1": _ddim(1.0, **SD_BETAS, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "ddim-sample-linspace-eta0.5": _ddim(0.5, prediction_type="sample", timestep_spacing="linspace"),
    "euler-eps": _euler(**SD_BETAS),
    "euler-v-karras-churn": _euler(2.0, **SD_BETAS, prediction_type="v_prediction", use_karras_sigmas=True),
    "euler-sample-trailing": _euler(prediction_type="sample", timestep_spacing="trailing"),
    "euler_ancestral-eps": _euler_ancestral(**SD_BETAS),
    "euler_ancestral-v-trailing": _euler_ancestral(**SD_BETAS, prediction_type="v_prediction", timestep_spacing="trailing"),
    "ddpm-eps-fixed_small": _ddpm("fixed_small"),
    "ddpm-v-fixed_large": _ddpm("fixed_large", prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"),
    "ddpm-sample-fixed_small_log": _ddpm("fixed_small_log", prediction_type="sample"),
    "dpmpp_2m-eps": _dpmpp(**SD_BETAS),
    "dpmpp_2m-v-heun-karras": _dpmpp(**SD_BETAS, prediction_type="v_prediction", solver_type="heun", use_karras_sigmas=True),
    "dpmpp_2m-sample-sigma_min-no_lower_final": _dpmpp(prediction_type="sample", final_sigmas_type="sigma_min", lower_order_final=False),
    "dpmpp_1-eps": _dpmpp(**SD_BETAS, solver_order=1),
    "dpmpp_3m-eps": _dpmpp(**SD_BETAS, solver_order=3),
    "dpmpp_3m-v-heun-karras": _dpmpp(**SD_BETAS, solver_order=3, prediction_type="v_prediction", solver_type="heun", use_karras_sigmas=True),
}

FUSED_BACKENDS = ["reference", pytest.param("triton", marks=requires_triton)]


def _input_scale(case, scheduler, i):
    return float(1 / (scheduler.sigmas[i].double() ** 2 + 1) ** 0.5) if case.karras_input else 1.0


def _diffusers_x0(scheduler, out):
    if isinstance(scheduler, diffusers.DPMSolverMultistepScheduler):
        return scheduler.model_outputs[-1]
    return out.pred_original_sample


def _noise_bank(case, scheduler, generator, dtype=torch.float32):
    """Pre-draw every step's noise with the generator calls diffusers' step makes, in its order.
    Steps where diffusers draws nothing get unrelated noise: their noise coefficient is 0."""
    filler = torch.Generator().manual_seed(12345)
    bank = []
    for i, t in enumerate(scheduler.timesteps):
        gen = generator if case.draws_noise(scheduler, i, t) else filler
        bank.append(randn_tensor(SHAPE, generator=gen, device=torch.device("cpu"), dtype=dtype))
    return torch.stack(bank)


@requires_diffusers
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case_id", list(CASES))
def test_sampling_loop_matches_diffusers(case_id, backend, seed):
    """Full CFG loop: fused step (noise bank, history ring, step index advanced on the
    device) vs diffusers' chunk + CFG + step, compared at every step."""
    case = CASES[case_id]
    ref_sched, sched = case.make(), case.make()
    ref_sched.set_timesteps(STEPS)
    sched.set_timesteps(STEPS)
    weights = torch.randn(2, *SHAPE[1:]) * 0.5
    x_init = torch.randn(SHAPE) * float(ref_sched.init_noise_sigma)
    noise_seed = seed + 1

    coeffs = case.coeffs(sched)
    assert coeffs.shape == (len(sched.timesteps), ss.NUM_COEFFS)
    bank = _noise_bank(case, sched, torch.Generator().manual_seed(noise_seed))
    history = torch.zeros(case.history_slots, *SHAPE)
    step_index = torch.zeros((), dtype=torch.int64)

    gen = torch.Generator().manual_seed(noise_seed)
    x_ref, x = x_init.clone(), x_init.clone()
    for i, t in enumerate(ref_sched.timesteps):
        x_scale = x.abs().max().item()  # x0 = p*x + q*m may cancel: its rounding error scales with x too
        model_output = fake_unet(ref_sched.scale_model_input(torch.cat([x_ref, x_ref]), t), t, weights)
        ref_out = ref_sched.step(cfg(model_output, GUIDANCE), t, x_ref, generator=gen, **case.step_kwargs)
        x_ref = ref_out.prev_sample

        model_output = fake_unet(torch.cat([x, x]) * _input_scale(case, sched, i), t, weights)
        x = scheduler_step(
            x, model_output, coeffs, step_index, guidance_scale=GUIDANCE, noise=bank, history=history,
            advance_step_index=True, backend=backend,
        )
        assert step_index.item() == i + 1
        assert_fp32_close(x, x_ref, rtol=2e-6, what=f"{case_id} step {i} prev_sample (seed {seed})")
        if case.x0_in_history:
            x0_ref = _diffusers_x0(ref_sched, ref_out)
            x0_scale = max(x_scale, x0_ref.abs().max().item())
            x0_err = max_abs_err(history[i % case.history_slots], x0_ref)
            assert x0_err <= 2e-6 * x0_scale, f"{case_id} step {i} x0: error {x0_err:.3e} vs scale {x0_scale:.3e} (seed {seed})"


def test_history_ring_semantics():
    """With R = 3 slots, step i reads hist[-j] = d_{i-j} and stores d_i; x_prev = sum_j h_j d_{i-j}."""
    num_steps, h = 7, (1.0, 10.0, 100.0)
    coeffs = torch.zeros(num_steps, ss.NUM_COEFFS)
    coeffs[:, ss.COEFF_COLUMNS.index("p")] = 1.0  # d = x
    for j, value in enumerate(h):
        coeffs[j + 1 :, ss.COEFF_COLUMNS.index(f"h{j + 1}")] = value  # only once d_{i-j} exists
    history = torch.zeros(3, 2, 3)
    step_index = torch.zeros((), dtype=torch.int64)
    values = [torch.full((2, 3), float(i + 1)) for i in range(num_steps)]
    for i in range(num_steps):
        x_prev = scheduler_step_ref(values[i], values[i], coeffs, step_index, history=history, advance_step_index=True)
        expected = sum(h[j - 1] * (i + 1 - j) for j in range(1, 4) if i - j >= 0)
        torch.testing.assert_close(x_prev, torch.full((2, 3), float(expected)))
        assert history[i % 3].eq(i + 1).all()


def _random_table(num_steps, generator=None):
    return torch.randn(num_steps, ss.NUM_COEFFS, generator=generator)


@requires_triton
@pytest.mark.parametrize("slots", [0, 1, 2, 3])
@pytest.mark.parametrize("noise_kind", ["none", "step", "bank"])
def test_triton_matches_reference_every_option(slots, noise_kind, seed):
    """Random tables exercise every column and history slot; three steps walk the ring."""
    shape, num_steps = (3, 5, 11, 13), 4
    coeffs = _random_table(num_steps)
    x = torch.randn(shape)
    mo = torch.randn(2 * shape[0], *shape[1:])
    noise = {"none": None, "step": torch.randn(shape), "bank": torch.randn(num_steps, *shape)}[noise_kind]
    hist = torch.randn(slots, *shape) if slots else None
    hist_ref = hist.clone() if slots else None
    index, index_ref = torch.tensor(1), torch.tensor(1)
    for _ in range(3):
        ours = scheduler_step(x, mo, coeffs, index, guidance_scale=3.0, noise=noise, history=hist, advance_step_index=True, backend="triton")
        ref = scheduler_step_ref(x, mo, coeffs, index_ref, 3.0, noise, hist_ref, advance_step_index=True)
        assert_fp32_close(ours, ref, what=f"x_prev (seed {seed})")
        if slots:
            assert_fp32_close(hist, hist_ref, what=f"history (seed {seed})")
    assert index.item() == index_ref.item() == 4


@requires_triton
def test_triton_odd_layouts(seed):
    """channels_last, non-contiguous views (a slice of a wider tensor, a transposed noise),
    a 5-D video-like latent, and in-place out=sample."""
    num_steps = 3
    coeffs = _random_table(num_steps)
    index = torch.tensor(2)

    x = torch.randn(2, 6, 9, 7).to(memory_format=torch.channels_last)
    mo = torch.randn(4, 6, 9, 12)[..., 2:9]  # sliced view: not dense
    noise = torch.randn(2, 6, 7, 9).transpose(2, 3)  # transposed view
    hist = torch.randn(2, 2, 6, 9, 7)
    out = torch.empty_like(x)
    hist_ref = hist.clone()
    ref = scheduler_step_ref(x, mo, coeffs, index, 2.5, noise, hist_ref)
    got = scheduler_step(x, mo, coeffs, index, guidance_scale=2.5, noise=noise, history=hist, out=out, backend="triton")
    assert got is out and out.is_contiguous(memory_format=torch.channels_last)
    assert_fp32_close(got, ref, what=f"strided x_prev (seed {seed})")
    assert_fp32_close(hist, hist_ref, what=f"strided history (seed {seed})")

    video = torch.randn(1, 4, 3, 5, 7)
    mo5 = torch.randn(2, 4, 3, 5, 7)
    ref = scheduler_step_ref(video, mo5, coeffs, index, 4.0)
    got = scheduler_step(video.clone(), mo5, coeffs, index, guidance_scale=4.0, backend="triton")
    assert_fp32_close(got, ref, what="5-D x_prev")

    inplace = video.clone()
    got = scheduler_step(inplace, mo5, coeffs, index, guidance_scale=4.0, out=inplace, backend="triton")
    assert got is inplace
    assert_fp32_close(inplace, ref, what="in-place x_prev")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_guidance_forms(backend, seed):
    """No guidance, a float, and a device tensor scale agree with the plain arithmetic."""
    coeffs = _random_table(2)
    index = torch.tensor(1)
    x = torch.randn(3, 4, 5, 3)
    mo = torch.randn(6, 4, 5, 3)
    a, e = coeffs[1, 0], coeffs[1, 1]
    expected = a * x + e * cfg(mo, 6.0)
    assert_fp32_close(scheduler_step(x, mo, coeffs, index, guidance_scale=6.0, backend=backend), expected)
    assert_fp32_close(scheduler_step(x, mo, coeffs, index, guidance_scale=torch.tensor(6.0), backend=backend), expected)
    assert_fp32_close(scheduler_step(x, mo[3:], coeffs, index, backend=backend), a * x + e * mo[3:])


@requires_triton
def test_triton_advances_index_once_with_many_programs():
    from fastdiff.kernels.scheduler_step import launch_settings

    shape = (2, 4, 33, 31)
    block, _ = launch_settings(torch.Size(shape).numel())
    assert torch.Size(shape).numel() // block > 8  # many programs race for the index
    coeffs = _random_table(5)
    index = torch.tensor(0)
    x, mo = torch.randn(shape), torch.randn(shape)
    for expected in range(1, 5):
        scheduler_step(x, mo, coeffs, index, advance_step_index=True, backend="triton")
        assert index.item() == expected
    scheduler_step(x, mo, coeffs, index, backend="triton")
    assert index.item() == 4


@requires_triton
def test_index_out_of_range():
    """No host check is possible: the kernel poisons the output with NaN; the reference raises on the CPU."""
    coeffs = _random_table(3)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    for bad in (3, -1):
        assert torch.isnan(scheduler_step(x, mo, coeffs, torch.tensor(bad), backend="triton")).all()
        with pytest.raises((IndexError, RuntimeError)):
            scheduler_step(x, mo, coeffs, torch.tensor(bad), backend="reference")


def test_reference_never_syncs(monkeypatch):
    """The reference path (the CPU path and the CUDA fallback) never reads a tensor on the host."""

    def forbidden(*args, **kwargs):
        raise AssertionError("scheduler_step read a device value on the host")

    coeffs = _random_table(4)
    index = torch.tensor(1)
    x, mo = torch.randn(SHAPE), torch.randn(2 * SHAPE[0], *SHAPE[1:])
    bank, hist, scale = torch.randn(4, *SHAPE), torch.zeros(2, *SHAPE), torch.tensor(5.0)
    expected = scheduler_step_ref(x, mo, coeffs, index.clone(), scale, bank, hist.clone())
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    got = scheduler_step(x, mo, coeffs, index, guidance_scale=scale, noise=bank, history=hist, advance_step_index=True, backend="reference")
    monkeypatch.undo()
    assert_fp32_close(got, expected)
    assert index.item() == 2


# ---------------------------------------------------------------------------
# Low precision: the fused error is at most 2x diffusers' eager error in the same dtype.
# ---------------------------------------------------------------------------

LOW_PRECISION_CASES = ["ddim-eps-leading", "euler-eps", "euler_ancestral-eps", "ddpm-eps-fixed_small", "dpmpp_2m-eps", "dpmpp_3m-eps"]


class _Replay:
    """Stands in for a generator: the next randn_tensor call returns ``values`` (see replay_randn)."""

    def __init__(self, values):
        self.values = values


@pytest.fixture
def replay_randn(monkeypatch):
    """Let diffusers' schedulers draw a _Replay's fixed values, so every path sees the same noise."""
    import diffusers.utils.torch_utils as tu

    original = tu.randn_tensor

    def randn_tensor_replay(shape, generator=None, **kwargs):
        if isinstance(generator, _Replay):
            return generator.values
        return original(shape, generator=generator, **kwargs)

    for name in ("scheduling_ddim", "scheduling_ddpm", "scheduling_euler_discrete", "scheduling_euler_ancestral_discrete"):
        monkeypatch.setattr(getattr(diffusers.schedulers, name), "randn_tensor", randn_tensor_replay)


@requires_diffusers
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case_id", LOW_PRECISION_CASES)
def test_low_precision_vs_diffusers(case_id, dtype, backend, seed, replay_randn):
    """Teacher-forced loop: at each step the three paths get the same low-precision x, UNet
    output and noise; the oracle is diffusers in float64, the baseline diffusers in ``dtype``."""
    case = CASES[case_id]
    oracle, eager, sched = case.make(), case.make(), case.make()
    for s in (oracle, eager, sched):
        s.set_timesteps(STEPS)
    coeffs = case.coeffs(sched)
    weights = torch.randn(2, *SHAPE[1:]) * 0.5
    x = (torch.randn(SHAPE) * float(oracle.init_noise_sigma)).to(dtype)
    bank = torch.randn(len(sched.timesteps), *SHAPE).to(dtype)
    history = torch.zeros(case.history_slots, *SHAPE, dtype=dtype)
    step_index = torch.zeros((), dtype=torch.int64)
    errs = []
    for i, t in enumerate(oracle.timesteps):
        mo = fake_unet(torch.cat([x, x]).float() * _input_scale(case, sched, i), t, weights).to(dtype)
        ref = oracle.step(cfg(mo.double(), GUIDANCE), t, x.double(), generator=_Replay(bank[i].double()), **case.step_kwargs).prev_sample
        base = eager.step(cfg(mo, GUIDANCE), t, x, generator=_Replay(bank[i]), **case.step_kwargs).prev_sample
        ours = scheduler_step(x, mo, coeffs, step_index, guidance_scale=GUIDANCE, noise=bank, history=history, advance_step_index=True, backend=backend)
        assert ours.dtype == dtype and base.dtype == dtype
        errs.append(max_abs_err(ours, ref))
        assert_low_precision_ok(ours, base, ref, what=f"{case_id} {dtype} step {i} (seed {seed})")
        x = ref.to(dtype)
    assert max(errs) > 0  # the comparison measured something


# ---------------------------------------------------------------------------
# Validation, dispatch, custom op
# ---------------------------------------------------------------------------


def _good():
    return dict(
        sample=torch.randn(SHAPE),
        model_output=torch.randn(2, *SHAPE[1:]),
        coeffs=_random_table(3),
        step_index=torch.tensor(0),
        guidance_scale=7.5,
    )


def _call(**overrides):
    kwargs = {**_good(), **overrides}
    args = [kwargs.pop(k) for k in ("sample", "model_output", "coeffs", "step_index")]
    return scheduler_step(*args, **kwargs, backend="reference")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model_output": torch.randn(3, *SHAPE[1:])}, "even batch"),
        ({"model_output": torch.randn(2, 4, 9, 8)}, "each half of model_output"),
        ({"model_output": torch.randn(2, *SHAPE[1:]), "guidance_scale": None}, "model_output must have sample's shape"),
        ({"model_output": torch.randn(2, *SHAPE[1:], dtype=torch.float64)}, "model_output dtype"),
        ({"coeffs": torch.randn(3, 5)}, "coeffs must be"),
        ({"coeffs": torch.randn(3, 8, dtype=torch.float64)}, "coeffs must be"),
        ({"coeffs": torch.randn(8, 3).t()}, "coeffs must be"),
        ({"step_index": torch.tensor(0, dtype=torch.int32)}, "step_index must be"),
        ({"step_index": torch.tensor([0, 1])}, "step_index must be"),
        ({"step_index": 0}, "step_index must be a torch.Tensor"),
        ({"guidance_scale": "7.5"}, "guidance_scale must be"),
        ({"guidance_scale": torch.tensor([1.0, 2.0])}, "guidance_scale tensor"),
        ({"guidance_scale": torch.tensor(7.5, dtype=torch.float64)}, "guidance_scale tensor"),
        ({"noise": torch.randn(2, *SHAPE)}, "noise must have"),
        ({"noise": torch.randn(SHAPE, dtype=torch.float16)}, "noise dtype"),
        ({"history": torch.randn(4, *SHAPE)}, "history must be"),
        ({"history": torch.randn(SHAPE)}, "history must be"),
        ({"out": torch.empty(1, 4, 9, 6)}, "out must match"),
        ({"sample": torch.randn(SHAPE).long()}, "sample must be"),
    ],
)
def test_bad_inputs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ss.ddim_coeffs(torch.rand(10), [9, 4], prediction_type="x0"), "prediction_type"),
        (lambda: ss.ddim_coeffs(torch.rand(10), [9, 4], eta=-1.0), "eta"),
        (lambda: ss.euler_ancestral_coeffs(torch.rand(5) + 1, prediction_type="sample"), "prediction_type"),
        (lambda: ss.euler_coeffs([1.0]), "sigmas"),
        (lambda: ss.ddpm_coeffs(torch.rand(10), [9, 4], variance_type="learned"), "variance_type"),
        (lambda: ss.dpmpp_2m_coeffs(torch.rand(5) + 1, solver_order=4), "solver_order"),
        (lambda: ss.dpmpp_2m_coeffs(torch.rand(5) + 1, solver_type="bh2"), "solver_type"),
        (lambda: ss.dpmpp_2m_coeffs([3.0, 2.0, 1.0, 1.0], final_sigmas_type="sigma_min", lower_order_final=False), "zero step size"),
    ],
)
def test_bad_table_options_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cuda_backend_on_cpu_says_why():
    kwargs = _good()
    with pytest.raises(backends.BackendNotSupportedError, match="cuda: needs CUDA tensors"):
        scheduler_step(*[kwargs.pop(k) for k in ("sample", "model_output", "coeffs", "step_index")], **kwargs, backend="cuda")
    kwargs = _good()
    report = scheduler_step.explain(*[kwargs.pop(k) for k in ("sample", "model_output", "coeffs", "step_index")], **kwargs)
    assert "reference: supported" in report and "cuda:" in report and "triton:" in report


def test_auto_on_cpu_picks_reference():
    kwargs = _good()
    with backends.trace_dispatch() as calls:
        scheduler_step(*[kwargs.pop(k) for k in ("sample", "model_output", "coeffs", "step_index")], **kwargs)
    assert calls == [("scheduler_step", "reference")]


@requires_triton
def test_triton_custom_op_opcheck():
    coeffs = _random_table(3)
    x, mo = torch.randn(SHAPE), torch.randn(2, *SHAPE[1:])
    args = (x, mo, coeffs, torch.tensor(1), torch.empty_like(x), torch.randn(3, *SHAPE), torch.zeros(2, *SHAPE), 7.5, None, True, False)
    torch.library.opcheck(torch.ops.fastdiff.scheduler_step_triton.default, args)


# ---------------------------------------------------------------------------
# GPU: CUDA kernel, no host sync, CUDA graph replay
# ---------------------------------------------------------------------------


def _gpu_backends():
    return ["reference", "triton", "cuda"]  # on a GPU machine the CUDA extension must build: no skipping


def _gpu_inputs(dtype, shape=(1, 4, 64, 64), num_steps=20, slots=2, layout="contiguous"):
    """Random CUDA inputs. ``channels_last``: every sample-shaped view is NHWC-dense (the
    CUDA kernel's vector path still applies); ``misaligned``: x starts one element into
    its buffer, so the CUDA kernel must take its scalar path."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*lead):
        if layout == "channels_last":
            b, c, h, w = shape
            return torch.randn(*lead, b, h, w, c, device="cuda", generator=g).to(dtype).movedim(-1, -3)
        return torch.randn(*lead, *shape, device="cuda", generator=g).to(dtype)

    coeffs = torch.randn(num_steps, ss.NUM_COEFFS, device="cuda", generator=g)
    x = rand()
    if layout == "misaligned":
        x = torch.randn(x.numel() + 1, device="cuda", generator=g).to(dtype)[1:].view(shape)
    mo = torch.cat([rand(), rand()]) if layout != "channels_last" else rand(2).flatten(0, 1)
    return coeffs, x, mo, rand(num_steps), rand(slots)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_backends_match_reference(dtype, layout):
    """Every GPU backend vs the fp32 reference, at most one rounding step apart in low precision."""
    coeffs, x, mo, bank, hist = _gpu_inputs(dtype, shape=(2, 4, 33, 65), layout=layout)
    index = torch.tensor(3, device="cuda")
    hist_ref = hist.clone()
    ref = scheduler_step_ref(x, mo, coeffs, index.clone(), 7.5, bank, hist_ref)
    for name in _gpu_backends():
        h = hist.clone()
        got = scheduler_step(x, mo, coeffs, index.clone(), guidance_scale=7.5, noise=bank, history=h, backend=name)
        if layout == "channels_last":
            assert got.is_contiguous(memory_format=torch.channels_last), name
        if dtype == torch.float32:
            assert_fp32_close(got, ref, what=name)
            assert_fp32_close(h, hist_ref, what=f"{name} history")
        else:
            assert max_abs_err(got, ref) <= 2**-6 * ref.double().abs().max().item(), name
            assert max_abs_err(h, hist_ref) <= 2**-6 * hist_ref.double().abs().max().item(), name


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("op", ["scheduler_step_triton", "scheduler_step_cuda"])
def test_gpu_custom_ops_opcheck(op):
    if op == "scheduler_step_cuda":
        ss._register_cuda_op()
    coeffs, x, mo, bank, hist = _gpu_inputs(torch.float16, shape=(1, 4, 9, 7), num_steps=4)
    args = (x, mo, coeffs, torch.tensor(1, device="cuda"), torch.empty_like(x), bank, hist, None, torch.tensor(7.5, device="cuda"), True, False)
    torch.library.opcheck(getattr(torch.ops.fastdiff, op).default, args)


@pytest.mark.gpu
@requires_cuda
def test_gpu_no_host_sync_and_graph_replay():
    """No backend syncs under set_sync_debug_mode("error"), and a captured step (index advanced
    on the device) replays the eager loop exactly."""
    steps = 20
    for name in _gpu_backends():
        coeffs, x, mo, bank, hist = _gpu_inputs(torch.float16, num_steps=steps)
        scale = torch.tensor(7.5, device="cuda")
        eager_x, eager_h, index = x.clone(), hist.clone(), torch.tensor(0, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(steps):
                scheduler_step(eager_x, mo, coeffs, index, guidance_scale=scale, noise=bank, history=eager_h, out=eager_x, advance_step_index=True, backend=name)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert index.item() == steps, name

        static_x, static_h, static_index = x.clone(), hist.clone(), torch.tensor(0, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (compiles), then rewind
            scheduler_step(static_x, mo, coeffs, static_index, guidance_scale=scale, noise=bank, history=static_h, out=static_x, advance_step_index=True, backend=name)
        torch.cuda.current_stream().wait_stream(stream)
        static_x.copy_(x)
        static_h.copy_(hist)
        static_index.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            scheduler_step(static_x, mo, coeffs, static_index, guidance_scale=scale, noise=bank, history=static_h, out=static_x, advance_step_index=True, backend=name)
        static_x.copy_(x)
        static_h.copy_(hist)
        static_index.zero_()
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
        assert static_index.item() == steps, name
        torch.testing.assert_close(static_x, eager_x, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(static_h, eager_h, rtol=0, atol=0, msg=name)
