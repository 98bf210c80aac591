"""Drop-in compatibility of the schedulers with diffusers' behaviour (issue 9), diffusers as the oracle.

Each test does what a diffusers user's code does with a fastdiff scheduler and with the diffusers
class of the same name, and compares the results: stepping before ``set_timesteps``, timesteps off
the schedule, configs carried between classes, ``previous_timestep``, PNDM's public sub-steps,
dict-like outputs, config keys read as attributes, saving, and beta sigmas. Where diffusers produces
NaN samples, fastdiff refuses the configuration instead (README: deliberate differences).
"""

import ast
import importlib.util
import inspect
import json
import warnings
from pathlib import Path

import pytest
import torch

import fastdiff
import fastdiff.schedulers as fs
from fastdiff.schedulers.scheduling_utils import DIFFUSERS_COMPAT_VERSION, register_to_config, use_fused_step

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
STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler")
SHAPE = (2, 3, 5, 7)


def _pair(name, **config):
    return getattr(fs, name)(**config), getattr(diffusers, name)(**config)


def _inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)


def _fake_model(x, t, weight):
    return 0.5 * torch.tanh(x) + 0.2 * weight * torch.cos(torch.tensor(float(t) / 97.0))


def _step(scheduler, name, model_output, t, sample, seed=0, **kwargs):
    if name in STOCHASTIC:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return scheduler.step(model_output, t, sample, **kwargs)


def _run(scheduler, name, timesteps, seed):
    """Step through ``timesteps`` with a fixed fake model; return every prev_sample."""
    weight, sample = _inputs(seed)
    sample = sample * scheduler.init_noise_sigma
    outs = []
    for i, t in enumerate(timesteps):
        model_output = _fake_model(scheduler.scale_model_input(sample, t), t, weight)
        sample = _step(scheduler, name, model_output, t, sample, seed=seed + i).prev_sample
        outs.append(sample)
    return outs


def _assert_runs_equal(got, want, rtol=1e-6):
    """Equal to float32 rounding, relative to each step's largest finite value (NaN where diffusers has NaN)."""
    assert len(got) == len(want) > 0
    for i, (g, w) in enumerate(zip(got, want)):
        finite = w[torch.isfinite(w)]
        scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=lambda m: f"step {i}: {m}")


# ---- DPM-Solver: N == num_train_timesteps ------------------------------------------------------------


def test_dpm_full_length_schedule_keeps_the_plain_step_and_says_why_not_fused(seed):
    ours, ref = _pair("DPMSolverMultistepScheduler")
    ours.set_timesteps(1000)  # raised ZeroDivisionError building the fused table
    ref.set_timesteps(1000)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    reasons = ours._fused_reasons()
    assert not use_fused_step(ours, x, x, reasons)
    with fastdiff.use_backend(scheduler_step="reference"), pytest.raises(ValueError, match="repeated timestep"):
        ours.step(x, ours.timesteps[0], x)
    ours.set_timesteps(1000)  # a fresh loop (the refused step had placed the step index)
    # The plain step gives diffusers' numbers through the repeated timestep (index 499/500) and after.
    _assert_runs_equal(
        _run(ours, "DPMSolverMultistepScheduler", ours.timesteps[490:510], seed),
        _run(ref, "DPMSolverMultistepScheduler", ref.timesteps[490:510], seed),
    )


# ---- step() before set_timesteps() -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
     "LMSDiscreteScheduler"],
)  # fmt: skip
def test_step_before_set_timesteps_uses_the_training_schedule(name, seed):
    ours, ref = _pair(name)
    assert ours.num_inference_steps is None and torch.equal(ours.timesteps, ref.timesteps)
    _assert_runs_equal(_run(ours, name, ours.timesteps[:5], seed), _run(ref, name, ref.timesteps[:5], seed))


# ---- timesteps that are not in .timesteps -------------------------------------------------------------


@pytest.mark.parametrize(
    "name, timestep",
    [("DDIMScheduler", 1), ("DDIMScheduler", torch.tensor(13)), ("PNDMScheduler", 13),
     ("DPMSolverMultistepScheduler", 0), ("DPMSolverMultistepScheduler", torch.tensor(13)),
     ("UniPCMultistepScheduler", 0), ("UniPCMultistepScheduler", torch.tensor(13))],
)  # fmt: skip
def test_timestep_off_the_schedule_is_accepted_as_diffusers(name, timestep, seed):
    ours, ref = _pair(name)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    assert not (ours.timesteps == timestep).any()
    weight, x = _inputs(seed)
    got = ours.step(weight, timestep, x)
    want = ref.step(weight, timestep, x)
    torch.testing.assert_close(got.prev_sample, want.prev_sample, rtol=1e-6, atol=1e-6)
    if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        assert ours.step_index == ref.step_index == len(ref.timesteps)  # diffusers takes the last step


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler"])
def test_forced_fused_step_refuses_a_start_off_the_schedule(name):
    config = {"clip_sample": False} if name == "DDIMScheduler" else {"skip_prk_steps": True}
    ours = getattr(fs, name)(**config)
    ours.set_timesteps(10)
    x = torch.randn(SHAPE)
    with fastdiff.use_backend(scheduler_step="reference"), pytest.raises(ValueError, match="timestep 7 is not one of"):
        ours.step(x, 7, x)


# ---- configs from other schedulers --------------------------------------------------------------------


@pytest.mark.parametrize("source", ALL)
def test_from_config_of_every_other_scheduler(source, seed):
    for target in ALL:
        ours = getattr(fs, target).from_config(getattr(fs, source)().config)
        ref = getattr(diffusers, target).from_config(getattr(diffusers, source)().config)
        public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
        assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == public, f"{source} -> {target}"
        ours.set_timesteps(8)
        ref.set_timesteps(8)
        torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
        _assert_runs_equal(_run(ours, target, ours.timesteps[:3], seed), _run(ref, target, ref.timesteps[:3], seed))


def test_ddpm_from_a_dpm_config_has_no_variance_type_and_samples_as_diffusers(seed):
    # An explicit variance_type=None (a default value is not carried over to another class).
    ours = fs.DDPMScheduler.from_config(fs.DPMSolverMultistepScheduler(variance_type=None).config)
    ref = diffusers.DDPMScheduler.from_config(diffusers.DPMSolverMultistepScheduler(variance_type=None).config)
    assert ours.config.variance_type is None and ref.config.variance_type is None
    for s in (ours, ref):
        s.set_timesteps(6)
    got, want = _run(ours, "DDPMScheduler", ours.timesteps, seed), _run(ref, "DDPMScheduler", ref.timesteps, seed)
    _assert_runs_equal(got, want)


def test_ddpm_unknown_variance_type_is_refused():
    # diffusers silently treats an unknown name as fixed_small: a typo would change the samples.
    with pytest.raises(ValueError, match="variance_type"):
        fs.DDPMScheduler(variance_type="fixed-large")


def test_unipc_flow_sigmas_with_karras_sigmas_as_diffusers(seed):
    config = {"use_flow_sigmas": True, "use_karras_sigmas": True, "prediction_type": "flow_prediction"}
    ours, ref = _pair("UniPCMultistepScheduler", **config)
    ours.set_timesteps(9)
    ref.set_timesteps(9)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    assert torch.equal(ours.timesteps, ref.timesteps)
    _assert_runs_equal(
        _run(ours, "UniPCMultistepScheduler", ours.timesteps, seed),
        _run(ref, "UniPCMultistepScheduler", ref.timesteps, seed),
    )


@pytest.mark.parametrize(
    "name, config",
    [("UniPCMultistepScheduler", {"use_flow_sigmas": True, "use_exponential_sigmas": True}),
     ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "use_beta_sigmas": True}),
     ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "use_karras_sigmas": True}),
     ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "use_lu_lambdas": True})],
)  # fmt: skip
def test_sigma_combinations_that_diffusers_turns_into_nan_are_refused(name, config):
    pytest.importorskip("scipy")  # diffusers' beta sigmas need it
    ref = getattr(diffusers, name)(**config)
    ref.set_timesteps(6)
    x = torch.randn(SHAPE)
    for t in ref.timesteps:
        x = ref.step(0.3 * torch.tanh(x), t, x).prev_sample
    assert torch.isnan(x).all()  # what fastdiff refuses to do silently
    with pytest.raises(ValueError, match="use_flow_sigmas=True cannot be combined"):
        getattr(fs, name)(**config)


# ---- previous_timestep, PNDM's sub-steps --------------------------------------------------------------


@pytest.mark.parametrize("set_kwargs", [None, {"num_inference_steps": 7}, {"timesteps": [951, 600, 377, 42, 0]}])
def test_ddpm_previous_timestep_matches_diffusers(set_kwargs):
    ours, ref = _pair("DDPMScheduler")
    if set_kwargs is not None:
        ours.set_timesteps(**set_kwargs)
        ref.set_timesteps(**set_kwargs)
    for t in ref.timesteps[:3].tolist() + ref.timesteps[-2:].tolist():
        for arg in (t, torch.tensor(t)):
            got, want = ours.previous_timestep(arg), ref.previous_timestep(arg)
            assert type(got) is type(want) and int(got) == int(want), (arg, got, want)
            if isinstance(want, torch.Tensor):
                assert got.dtype == want.dtype and got.shape == want.shape


@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_pndm_step_prk_and_step_plms_are_public_as_in_diffusers(skip_prk_steps, seed):
    ours, ref = _pair("PNDMScheduler", skip_prk_steps=skip_prk_steps)
    weight, x = _inputs(seed)
    results = []
    for s in (ours, ref):
        s.set_timesteps(6)
        sample = x.clone()
        for i, t in enumerate(s.timesteps):
            sub_step = s.step_prk if i < len(s.prk_timesteps) else s.step_plms
            sample = sub_step(_fake_model(sample, t, weight), t, sample).prev_sample
        results.append(sample)
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
    assert len(inspect.signature(fs.PNDMScheduler.step_plms).parameters) == 5  # self, model_output, timestep, ...


# ---- outputs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_step_outputs_are_dict_like_as_diffusers(name, seed):
    described = []
    for scheduler in _pair(name):
        scheduler.set_timesteps(5)
        t = scheduler.timesteps[0]
        weight, x = _inputs(seed)
        out = _step(scheduler, name, weight, t, scheduler.scale_model_input(x, t))
        scheduler.set_timesteps(5)
        as_tuple = _step(scheduler, name, weight, t, scheduler.scale_model_input(x, t), return_dict=False)
        assert isinstance(out, dict) and isinstance(as_tuple, tuple)
        assert out["prev_sample"] is out.prev_sample is out[0] is next(iter(out.values()))
        assert len(out.to_tuple()) == len(as_tuple) == len(out)
        for a, b in zip(out.to_tuple(), as_tuple):
            torch.testing.assert_close(a, b)
        described.append((type(out).__name__, list(out.keys()), len(as_tuple)))
    assert described[0] == described[1]


# ---- config access, deprecated kwargs, saving ----------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_config_keys_read_as_attributes_warn_as_diffusers(name):
    ours, ref = _pair(name, num_train_timesteps=999)
    for scheduler in (ours, ref):
        with pytest.warns(FutureWarning, match="Accessing config attribute `num_train_timesteps` directly"):
            assert scheduler.num_train_timesteps == 999
        with pytest.raises(AttributeError, match="no_such_key"):
            scheduler.no_such_key  # noqa: B018
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # real attributes do not warn
            assert scheduler.config.num_train_timesteps == 999
    assert ours._deprecated_kwargs == ref._deprecated_kwargs == []


def test_deprecated_kwargs_reach_init_through_from_config():
    class LegacyDDIM(fs.DDIMScheduler):
        _deprecated_kwargs = ["legacy_offset"]

        @register_to_config
        def __init__(self, num_train_timesteps: int = 1000, **kwargs):
            self.legacy_offset = kwargs.pop("legacy_offset", None)
            super().__init__(num_train_timesteps=num_train_timesteps)

    scheduler = LegacyDDIM.from_config({"num_train_timesteps": 500, "legacy_offset": 3})
    assert scheduler.legacy_offset == 3 and scheduler.config.num_train_timesteps == 500
    assert LegacyDDIM.from_config({"num_train_timesteps": 500}).legacy_offset is None


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_save_pretrained_records_class_name_and_version_in_the_live_config(name, tmp_path):
    ours, ref = _pair(name)
    assert "_class_name" not in ours.config and "_class_name" not in ref.config
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    assert ours.config["_class_name"] == ref.config["_class_name"] == name
    assert ours.config["_diffusers_version"] == DIFFUSERS_COMPAT_VERSION
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name
    reloaded = getattr(diffusers, name).from_pretrained(tmp_path / "ours")
    assert {k: v for k, v in reloaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in ref.config.items() if not k.startswith("_")
    }


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_dynamic_shifting_mu_is_refused_by_name(name):
    scheduler = getattr(fs, name)()
    assert list(inspect.signature(scheduler.set_timesteps).parameters) == list(
        inspect.signature(getattr(diffusers, name)().set_timesteps).parameters
    )
    with pytest.raises(ValueError, match="mu"):
        scheduler.set_timesteps(5, mu=0.5)


# ---- beta sigmas --------------------------------------------------------------------------------------

BETA_SIGMAS = [
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
]


@pytest.mark.parametrize("name", BETA_SIGMAS)
def test_beta_sigmas_match_diffusers(name, seed):
    pytest.importorskip("scipy")  # both need it for beta sigmas
    ours, ref = _pair(name, use_beta_sigmas=True)
    ours.set_timesteps(7)
    ref.set_timesteps(7)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    _assert_runs_equal(_run(ours, name, ours.timesteps, seed), _run(ref, name, ref.timesteps, seed))


@pytest.mark.parametrize("name", BETA_SIGMAS)
def test_beta_sigmas_need_scipy_and_nothing_else_does(name, monkeypatch):
    module = Path(inspect.getfile(getattr(fs, name)))
    top_level = [n for n in ast.parse(module.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    imported = [a.name for n in top_level for a in n.names]
    imported += [n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith("scipy")], f"{module.name} imports scipy at module level"
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "scipy" else real_find_spec(n, *a))
    getattr(fs, name)()  # no scipy needed without beta sigmas
    with pytest.raises(ImportError, match="use_beta_sigmas=True needs scipy"):
        getattr(fs, name)(use_beta_sigmas=True)


@pytest.mark.parametrize("name", BETA_SIGMAS)
def test_beta_sigmas_exclude_karras_and_exponential_as_diffusers(name):
    pytest.importorskip("scipy")  # diffusers refuses beta sigmas without it before checking the others
    for other in ("use_karras_sigmas", "use_exponential_sigmas"):
        with pytest.raises(ValueError):
            getattr(diffusers, name)(use_beta_sigmas=True, **{other: True})
        with pytest.raises(ValueError, match="at most one"):
            getattr(fs, name)(use_beta_sigmas=True, **{other: True})


def test_euler_get_velocity_is_refused_where_diffusers_uses_the_wrong_timestep(seed):
    gen = torch.Generator().manual_seed(seed)
    sample, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = torch.tensor([900.0, 123.0])
    ref = diffusers.EulerDiscreteScheduler().get_velocity(sample, noise, t)
    right = diffusers.DDPMScheduler().get_velocity(sample, noise, t.long())
    assert not torch.allclose(ref, right, atol=1e-2)  # diffusers' answer is another timestep's target
    with pytest.raises(NotImplementedError, match="DDPMScheduler"):
        fs.EulerDiscreteScheduler().get_velocity(sample, noise, t)
    torch.testing.assert_close(fs.DDPMScheduler().get_velocity(sample, noise, t.long()), right)
