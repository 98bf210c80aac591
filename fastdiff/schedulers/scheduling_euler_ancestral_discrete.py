"""Ancestral Euler sampler (k-diffusion's ``sample_euler_ancestral``; Karras et al. 2022, arXiv:2206.00364)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from .scheduling_utils import (
    BaseOutput,
    KarrasDiffusionSchedulers,
    SchedulerMixin,
    apply_guidance,
    randn_tensor,
    register_to_config,
    use_fused_step,
)

logger = logging.getLogger(__name__)


@dataclass
class EulerAncestralDiscreteSchedulerOutput(BaseOutput):
    """Output of :meth:`EulerAncestralDiscreteScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): the sample at the next sigma, the next model input.
        pred_original_sample (`torch.Tensor`): the model's current estimate of x_0.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


# Copied from fastdiff.schedulers.scheduling_ddim.betas_for_alpha_bar
def betas_for_alpha_bar(num_diffusion_timesteps, max_beta=0.999, alpha_transform_type="cosine"):
    """Betas that discretise a continuous alpha_bar(t), t in [0, 1].

    ``cosine`` is the squared-cosine schedule of Nichol and Dhariwal 2021 (improved DDPM, eq. 17);
    ``exp`` is alpha_bar(t) = exp(-12 t). Each beta is capped at ``max_beta``.
    """
    if alpha_transform_type == "cosine":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "exp":

        def alpha_bar(t):
            return math.exp(t * -12.0)

    else:
        raise ValueError(f"alpha_transform_type must be 'cosine' or 'exp', got {alpha_transform_type!r}")
    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


# Copied from fastdiff.schedulers.scheduling_ddim.rescale_zero_terminal_snr
def rescale_zero_terminal_snr(betas):
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab -= last
    sqrt_ab *= first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


# Copied from fastdiff.schedulers.scheduling_ddim.make_betas
def make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, schedules):
    """The training beta schedule as float32, from ``trained_betas`` or the named ``beta_schedule``."""
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    if beta_schedule not in schedules:
        raise ValueError(f"beta_schedule must be one of {list(schedules)}, got {beta_schedule!r}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_train_timesteps)
    if beta_schedule == "exp":
        return betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="exp")
    if beta_schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    raise AssertionError(beta_schedule)


# Copied from fastdiff.schedulers.scheduling_euler_discrete.float_spaced_timesteps
def float_spaced_timesteps(spacing, num_train_timesteps, num_inference_steps, steps_offset):
    """Float32 inference timesteps in descending order for ``timestep_spacing`` (linspace is not rounded)."""
    n, total = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, total - 1, n, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = total // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.float32) + steps_offset
    if spacing == "trailing":
        return np.arange(total, 0, -total / n).round().copy().astype(np.float32) - 1
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


class EulerAncestralDiscreteScheduler(SchedulerMixin):
    """Euler steps with ancestral noise, as k-diffusion's ``sample_euler_ancestral`` (eta = 1).

    From sigma to sigma_next the step splits sigma_next^2 = sigma_down^2 + sigma_up^2 with
    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2): a deterministic Euler step
    x' = x + (sigma_down - sigma) (x - x0_hat) / sigma, then fresh noise x_next = x' + sigma_up z.
    Inputs are scaled by 1 / sqrt(sigma^2 + 1).

    Config keys and defaults are diffusers' ``EulerAncestralDiscreteScheduler``'s. The noise z is
    drawn from ``generator`` (or a bank from :meth:`prepare_noise_bank`) on every step (the last one
    included, as diffusers) and scaled by an attached temperature scheduler.

    Fused step (fastdiff extension): the update is x_prev = a x + e m + s z per element, one launch of
    :func:`fastdiff.ops.scheduler_step` that also folds in classifier-free guidance
    (``step(..., guidance_scale=g)`` with the batched CFG output). It runs on CUDA tensors, or wherever
    the ``scheduler_step`` backend is forced, and reads a device copy of the step index that the
    launch itself advances (the host ``step_index`` advances alongside).
    """

    # scale_model_input reads sigma at the fused step's device index once the fused step runs
    _scale_model_input_on_device = True

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            ("linear", "scaled_linear", "squaredcos_cap_v2"),
        )  # fmt: skip
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # keeps the largest sigma finite
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        self.sigmas = torch.from_numpy(np.concatenate([sigmas[::-1], [0.0]]).astype(np.float32))
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].copy())
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    @property
    def init_noise_sigma(self):
        """Standard deviation of the initial noise: the largest sigma (sqrt(sigma^2 + 1) for leading spacing)."""
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    @property
    def step_index(self):
        """Index of the current step in ``timesteps``; None until the first step or scaled input."""
        return self._step_index

    @property
    def begin_index(self):
        """First step index, set by the pipeline (img2img) through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index
        self._restart_fused()

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Scale the model input by 1 / sqrt(sigma^2 + 1) for the current step."""
        if self.step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        scale = self._device_input_scale(sample)
        if scale is not None:  # the fused step is running: the scale at its device step index
            return sample / scale
        sigma = self.sigmas[self.step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose ``num_inference_steps`` timesteps by ``config.timestep_spacing`` and interpolate their sigmas."""
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        timesteps = float_spaced_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device)
        self._step_index = None
        self._begin_index = None
        self._reset_fused()
        self._fused.input_scales_host = (self.sigmas**2 + 1) ** 0.5

    # Copied from fastdiff.schedulers.scheduling_euler_discrete.EulerDiscreteScheduler.index_for_timestep
    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the schedule (the second match if it occurs twice, as diffusers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps; pass one of `.timesteps`.")
        return indices[1 if len(indices) > 1 else 0].item()

    # Copied from fastdiff.schedulers.scheduling_euler_discrete.EulerDiscreteScheduler._init_step_index
    def _init_step_index(self, timestep):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _fused_reasons(self):
        return []

    def _fused_table(self):
        from fastdiff.ops.scheduler_step import euler_ancestral_coeffs

        table = euler_ancestral_coeffs(self.sigmas, prediction_type=self.config.prediction_type)
        return table, self._noise_draws(), 0

    def _noise_draws(self):
        return [True] * (len(self.sigmas) - 1)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
        guidance_scale=None,
    ):
        """One ancestral Euler step from the current sigma to the next.

        Args:
            model_output (`torch.Tensor`): the model's prediction (per ``config.prediction_type``).
            timestep (`float` or 0-d tensor): one of ``self.timesteps`` (not an integer step index).
            sample (`torch.Tensor`): the current sample.
            generator (`torch.Generator`, *optional*): source of the ancestral noise.
            return_dict (`bool`): return an :class:`EulerAncestralDiscreteSchedulerOutput` rather than a tuple.
            guidance_scale (`float` or one-element float32 tensor, *optional*): fastdiff extension; with it,
                ``model_output`` is the batched CFG output (2B, ...), uncond half first, and the guidance
                ``u + g * (c - u)`` is applied (inside the fused launch when the fused step runs).

        On the fused path ``pred_original_sample`` is None (computing x0 would cost another launch).
        """
        if isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError("timestep must be one of `scheduler.timesteps`, not an integer step index.")
        if not self.is_scale_input_called:
            logger.warning("scale_model_input() should be called before step() to scale the model input.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if use_fused_step(self, sample, model_output, self._fused_reasons()):
            state = self._fused_state(())
            prev_sample = state.run(self, model_output, sample, guidance_scale, self.step_index, generator=generator)
            self._step_index += 1
            if not return_dict:
                return (prev_sample,)
            return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample)
        model_output = apply_guidance(model_output, guidance_scale)
        dtype = model_output.dtype
        sample = sample.to(torch.float32)
        model_output_f = model_output.to(torch.float32)
        sigma = self.sigmas[self.step_index]
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output_f
        else:  # v_prediction
            x0 = model_output_f * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)

        sigma_to = self.sigmas[self.step_index + 1]
        sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)

        noise = self._bank_noise(self.step_index)
        if noise is None:
            noise = randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
            )
        noise = self._scale_step_noise(noise, self.step_index)
        prev_sample = (prev_sample + noise * sigma_up).to(dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    # Copied from fastdiff.schedulers.scheduling_euler_discrete.EulerDiscreteScheduler.add_noise
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_0 + sigma(t) * noise, with sigma taken at ``timesteps`` (or the current/begin index if set)."""
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        schedule_timesteps = self.timesteps.to(original_samples.device)
        timesteps = timesteps.to(original_samples.device)
        if self.begin_index is None:
            indices = [self.index_for_timestep(t, schedule_timesteps) for t in timesteps]
        elif self.step_index is not None:
            indices = [self.step_index] * timesteps.shape[0]
        else:
            indices = [self.begin_index] * timesteps.shape[0]
        sigma = sigmas[indices].flatten()
        sigma = sigma.reshape(sigma.shape + (1,) * (original_samples.ndim - 1))
        return original_samples + noise * sigma

    def __len__(self):
        return self.config.num_train_timesteps
