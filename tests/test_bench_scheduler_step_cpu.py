"""CPU microbenchmarks (pytest-benchmark) of the scheduler step: diffusers' eager
sequence (chunk, CFG arithmetic, ``scheduler.step``) against fastdiff's
``scheduler_step`` on the CPU path (the reference backend), on SD1.5 and SDXL
latents in float32. The GPU counterpart is benchmarks/bench_scheduler_step.py.

Each benchmark still checks its result. Timings are reported, never asserted.
"""

import importlib

import pytest
import torch

from fastdiff.ops.scheduler_step import scheduler_step

diffusers = pytest.importorskip("diffusers")
ops = importlib.import_module("fastdiff.ops.scheduler_step")

SHAPES = {"sd15-1x4x64x64": (1, 4, 64, 64), "sdxl-1x4x128x128": (1, 4, 128, 128)}
GUIDANCE = 7.5
NUM_STEPS, STEP = 30, 10


@pytest.fixture(params=list(SHAPES))
def step_inputs(request):
    """A set EulerDiscreteScheduler at STEP, a latent, a batched CFG output and the fused table."""
    shape = SHAPES[request.param]
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(NUM_STEPS)
    sched.is_scale_input_called = True  # as after a pipeline's scale_model_input: no per-step warning
    x = torch.randn(shape)
    model_output = torch.randn(2 * shape[0], *shape[1:])
    return sched, x, model_output, ops.euler_coeffs(sched.sigmas)


def _eager(sched, x, model_output):
    sched._step_index = STEP
    uncond, cond = model_output.chunk(2)
    return sched.step(uncond + GUIDANCE * (cond - uncond), sched.timesteps[STEP], x).prev_sample


def test_bench_diffusers_eager_step(benchmark, step_inputs):
    sched, x, model_output, _ = step_inputs
    prev = benchmark(lambda: _eager(sched, x, model_output))
    assert prev.shape == x.shape and torch.isfinite(prev).all()


def test_bench_fastdiff_scheduler_step(benchmark, step_inputs):
    sched, x, model_output, coeffs = step_inputs
    index, out = torch.tensor(STEP), torch.empty_like(x)
    prev = benchmark(lambda: scheduler_step(x, model_output, coeffs, index, guidance_scale=GUIDANCE, out=out, backend="reference"))
    expected = _eager(sched, x, model_output)
    err = (prev - expected).abs().max().item()
    assert err <= 2e-6 * expected.abs().max().item(), f"max abs error {err:.3e}"
