"""TemperatureScheduler: schedules, the exact tau == 1 identity, and its effect on sample diversity."""

import math

import pytest
import torch

import fastdiff
import fastdiff.schedulers as fs

DATA_STD = 1.5
DATA_MEAN = torch.tensor([0.5, -0.3]).view(1, 2, 1, 1)


def gaussian_eps(x_t, alpha_bar):
    """The exact eps-prediction for data N(DATA_MEAN, DATA_STD^2 I) under x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    a = float(alpha_bar)
    return (1 - a) ** 0.5 * (x_t - a**0.5 * DATA_MEAN) / (a * DATA_STD**2 + 1 - a)


def sample_toy(scheduler, temperature=None, n=512, steps=50, seed=0):
    """Sample n points of the 2-D toy with ``scheduler``; the pipeline's side of the temperature is done here."""
    scheduler.set_temperature_scheduler(temperature)
    scheduler.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 1, 1, generator=gen)
    if temperature is not None:
        x = temperature.scale_initial_noise(x, steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        if hasattr(scheduler, "sigmas") and scheduler.step_index is not None:
            alpha_bar = 1 / (1 + scheduler.sigmas[scheduler.step_index] ** 2)
        else:
            alpha_bar = scheduler.alphas_cumprod[int(t)]
        x = scheduler.step(gaussian_eps(model_input, alpha_bar), t, x, generator=gen).prev_sample
    return x.flatten(1)


def spread(samples):
    """Per-coordinate standard deviation estimated from the mean pairwise squared distance."""
    d2 = torch.cdist(samples, samples).pow(2)
    n = samples.shape[0]
    return math.sqrt(d2.sum().item() / (n * (n - 1)) / (2 * samples.shape[1]))


STOCHASTIC = [
    ("DDPMScheduler", {"clip_sample": False}, {}),
    ("DDIMScheduler", {"clip_sample": False}, {"eta": 1.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 1.0}),
]


def _loop(name, config, step_kwargs, temperature, module):
    scheduler = getattr(module, name)(**config)
    if temperature is not None:
        scheduler.set_temperature_scheduler(temperature)
    scheduler.set_timesteps(10)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 5, 3, generator=gen) * scheduler.init_noise_sigma
    outs = []
    for t in scheduler.timesteps:
        out = 0.5 * torch.tanh(scheduler.scale_model_input(x, t))
        x = scheduler.step(out, t, x, **step_kwargs, generator=gen).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("name,config,step_kwargs", STOCHASTIC)
def test_tau_one_reproduces_the_plain_sampler_exactly(name, config, step_kwargs):
    plain = _loop(name, config, step_kwargs, None, fs)
    for ts in (fastdiff.TemperatureScheduler(), fastdiff.TemperatureScheduler("linear", tau=1.0, tau_end=1.0)):
        hooked = _loop(name, config, step_kwargs, ts, fs)
        for a, b in zip(plain, hooked):
            assert torch.equal(a, b)
    diffusers = pytest.importorskip("diffusers")
    for a, b in zip(plain, _loop(name, config, step_kwargs, None, diffusers)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,config,step_kwargs", STOCHASTIC)
def test_tau_scales_exactly_the_injected_noise(name, config, step_kwargs):
    """With tau=0 the stochastic step equals the deterministic part; tau=2 doubles the noise term."""
    results = {}
    for tau in (0.0, 1.0, 2.0):
        outs = []
        scheduler = getattr(fs, name)(**config)
        scheduler.set_temperature_scheduler(fs.TemperatureScheduler(tau=tau))
        scheduler.set_timesteps(10)
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(2, 4, 5, 3, generator=gen)
        t = scheduler.timesteps[2]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(2)
        scheduler.scale_model_input(x, t)
        outs = scheduler.step(0.3 * x, t, x, **step_kwargs, generator=torch.Generator().manual_seed(11))
        results[tau] = outs.prev_sample
    noise_term = results[1.0] - results[0.0]
    assert noise_term.abs().max() > 1e-3
    torch.testing.assert_close(results[2.0] - results[0.0], 2 * noise_term, rtol=1e-5, atol=1e-5)


def test_lower_temperature_lowers_diversity():
    spreads = {}
    for label, ts in [
        ("1.0", None),
        ("0.8", fs.TemperatureScheduler(tau=0.8)),
        ("0.5", fs.TemperatureScheduler(tau=0.5)),
        ("linear 1.0->0.5", fs.TemperatureScheduler("linear", tau=1.0, tau_end=0.5)),
    ]:
        spreads[label] = spread(sample_toy(fs.DDPMScheduler(clip_sample=False), ts))
    assert abs(spreads["1.0"] - DATA_STD) < 0.12 * DATA_STD  # the plain sampler recovers the data spread
    assert spreads["1.0"] > spreads["0.8"] + 0.1 > spreads["0.5"] + 0.2
    # decaying the temperature late keeps more diversity than holding the final value throughout
    assert spreads["0.5"] + 0.2 < spreads["linear 1.0->0.5"] <= spreads["1.0"] + 0.05

    # A stochastic sampler forgets a scaled initial noise; a deterministic one maps it through linearly here.
    initial_only = fs.TemperatureScheduler([1.0] * 50, initial_tau=0.5)
    assert abs(spread(sample_toy(fs.DDPMScheduler(clip_sample=False), initial_only)) - spreads["1.0"]) < 0.05
    ddim = {tau: spread(sample_toy(fs.DDIMScheduler(clip_sample=False), fs.TemperatureScheduler(tau=tau)))
            for tau in (1.0, 0.5)}  # fmt: skip
    assert ddim[0.5] / ddim[1.0] == pytest.approx(0.5, abs=0.02)

    ancestral = {tau: spread(sample_toy(fs.EulerAncestralDiscreteScheduler(), fs.TemperatureScheduler(tau=tau)))
                 for tau in (1.0, 0.6)}  # fmt: skip
    assert ancestral[1.0] > ancestral[0.6] + 0.2


def test_schedule_values():
    n = 5
    assert fs.TemperatureScheduler(tau=0.7).taus(n) == [0.7] * n
    lin = fs.TemperatureScheduler("linear", tau=1.0, tau_end=0.6).taus(n)
    assert lin == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    cos = fs.TemperatureScheduler("cosine", tau=1.0, tau_end=0.6).taus(n)
    assert cos[0] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.6) and cos[2] == pytest.approx(0.8)
    assert cos[1] > lin[1]  # eases out of the start
    assert fs.TemperatureScheduler([1.0, 0.9, 0.5]).taus(3) == [1.0, 0.9, 0.5]
    assert fs.TemperatureScheduler(lambda i, n: 1 - i / (2 * n)).taus(4) == [1.0, 0.875, 0.75, 0.625]
    assert fs.TemperatureScheduler("linear", tau=0.9, tau_end=0.2).taus(1) == [0.9]


def test_initial_noise_scaling():
    x = torch.randn(1, 4, 8, 8)
    assert fs.TemperatureScheduler().scale_initial_noise(x) is x
    torch.testing.assert_close(fs.TemperatureScheduler(tau=0.5).scale_initial_noise(x), 0.5 * x)
    torch.testing.assert_close(fs.TemperatureScheduler(tau=0.5, initial_tau=0.9).scale_initial_noise(x), 0.9 * x)
    torch.testing.assert_close(fs.TemperatureScheduler([0.8, 0.4]).scale_initial_noise(x), 0.8 * x)
    with pytest.raises(ValueError, match="num_steps"):
        fs.TemperatureScheduler(lambda i, n: 0.5).scale_initial_noise(x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"schedule": "exponential"}, "schedule"),
        ({"schedule": "linear"}, "tau_end"),
        ({"schedule": "constant", "tau_end": 0.5}, "tau_end"),
        ({"tau": -0.1}, "tau"),
        ({"tau": float("nan")}, "tau"),
        ({"schedule": []}, "at least one"),
        ({"schedule": 3}, "schedule"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fs.TemperatureScheduler(**kwargs)


def test_bad_calls_raise():
    with pytest.raises(ValueError, match="3 temperatures"):
        fs.TemperatureScheduler([1.0, 0.9, 0.8]).tau(0, 5)
    with pytest.raises(ValueError, match="step_index"):
        fs.TemperatureScheduler().tau(5, 5)
    with pytest.raises(ValueError, match="callable"):
        fs.TemperatureScheduler(lambda i, n: -1.0).tau(0, 3)
