"""Euler sampler in the sigma (variance-exploding) parametrisation (Karras et al. 2022, arXiv:2206.00364)."""

from __future__ import annotations

import importlib.util
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
class EulerDiscreteSchedulerOutput(BaseOutput):
    """Output of :meth:`EulerDiscreteScheduler.step`.

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


def sigma_to_t(sigma, log_sigmas):
    """The (fractional) training timestep whose sigma is ``sigma``, interpolating log-sigma linearly."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho) from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min, sigma_max, num_inference_steps):
    """Sigmas evenly spaced in log(sigma) from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))

def beta_sigmas(sigma_min, sigma_max, num_inference_steps, alpha=0.6, beta=0.6):
    """Sigmas at the quantiles of a Beta(alpha, beta) distribution, from sigma_max down to sigma_min
    (Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173).

    Needs scipy (its beta quantile function), imported here only, as diffusers needs it only here.
    """
    import scipy.stats

    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, num_inference_steps), alpha, beta)
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])



class EulerDiscreteScheduler(SchedulerMixin):
    """Euler method for the probability-flow ODE, Karras et al. 2022, Algorithm 2 (with churn, eq. 8 to 10).

    With sigma_hat = sigma_i (1 + gamma): x_hat = x + sqrt(sigma_hat^2 - sigma_i^2) * s_noise * z,
    d = (x_hat - x0_hat) / sigma_hat, x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d. ``gamma`` is
    ``min(s_churn / N, sqrt(2) - 1)`` inside [s_tmin, s_tmax] and 0 otherwise, so the default
    (s_churn=0) is the deterministic Euler sampler. Inputs are scaled by 1 / sqrt(sigma^2 + 1).

    Config keys and defaults are diffusers' ``EulerDiscreteScheduler``'s. ``use_beta_sigmas`` needs
    scipy (its beta quantile), as in diffusers; nothing else does.

    Fused step (fastdiff extension): without churn (``s_churn == 0``) the update is
    x_prev = a x + e m per element, one launch of :func:`fastdiff.ops.scheduler_step` that also folds
    in classifier-free guidance (``step(..., guidance_scale=g)`` with the batched CFG output). It runs
    on CUDA tensors, or wherever the ``scheduler_step`` backend is forced, and reads a device copy of
    the step index that the launch itself advances (the host ``step_index`` advances alongside).
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
        interpolation_type: str = "linear",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        if use_beta_sigmas and importlib.util.find_spec("scipy") is None:
            raise ImportError("use_beta_sigmas=True needs scipy (pip install scipy), as in diffusers.")
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError("set at most one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas.")
        if prediction_type not in ("epsilon", "v_prediction", "sample", "original_sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
        if interpolation_type not in ("linear", "log_linear"):
            raise ValueError(f"interpolation_type must be 'linear' or 'log_linear', got {interpolation_type!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            ("linear", "scaled_linear", "squaredcos_cap_v2"),
        )  # fmt: skip
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        # Instance attributes that diffusers sets too (read without the config-attribute FutureWarning).
        self.use_karras_sigmas = use_karras_sigmas
        self.use_exponential_sigmas = use_exponential_sigmas
        self.use_beta_sigmas = use_beta_sigmas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if rescale_betas_zero_snr:
            # Keep the last sigma finite: sigma = sqrt((1 - a) / a) with a = 2^-24.
            self.alphas_cumprod[-1] = 2**-24
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).flip(0)
        timesteps = torch.from_numpy(np.linspace(0, num_train_timesteps - 1, num_train_timesteps)[::-1].copy())
        self.num_inference_steps = None
        if self._continuous_v:
            self.timesteps = 0.25 * sigmas.log()
        else:
            self.timesteps = timesteps.to(torch.float32)
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.is_scale_input_called = False
        self._step_index = None
        self._begin_index = None

    @property
    def _continuous_v(self):
        return self.config.timestep_type == "continuous" and self.config.prediction_type == "v_prediction"

    @property
    def init_noise_sigma(self):
        """Standard deviation of the initial noise: the largest sigma (sqrt(sigma^2 + 1) for leading spacing)."""
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

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

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
        """Build the inference schedule: from ``num_inference_steps``, or custom ``timesteps`` or ``sigmas``.

        ``sigmas`` must end with the final sigma (usually 0), so it has one more entry than steps.
        """
        given = [x is not None for x in (num_inference_steps, timesteps, sigmas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of num_inference_steps, timesteps or sigmas to set_timesteps().")
        if timesteps is not None and (
            self.config.use_karras_sigmas or self.config.use_exponential_sigmas or self.config.use_beta_sigmas
        ):
            raise ValueError(
                "custom timesteps cannot be combined with use_karras_sigmas/use_exponential_sigmas/use_beta_sigmas."
            )
        if timesteps is not None and self._continuous_v:
            raise ValueError("custom timesteps cannot be combined with timestep_type='continuous' and v_prediction.")
        if num_inference_steps is None:
            num_inference_steps = len(timesteps) if timesteps is not None else len(sigmas) - 1
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(train_sigmas)

        if sigmas is not None:
            sigmas = np.array(sigmas).astype(np.float32)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas[:-1]])
        else:
            if timesteps is not None:
                timesteps = np.array(timesteps).astype(np.float32)
            else:
                timesteps = float_spaced_timesteps(
                    self.config.timestep_spacing, self.config.num_train_timesteps, num_inference_steps,
                    self.config.steps_offset,
                )  # fmt: skip
            if self.config.interpolation_type == "linear":
                sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
            else:
                sigmas = (
                    torch.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), num_inference_steps + 1)
                    .exp()
                    .numpy()
                )
            if self.config.use_karras_sigmas or self.config.use_exponential_sigmas or self.config.use_beta_sigmas:
                lo = self.config.sigma_min if self.config.sigma_min is not None else sigmas[-1].item()
                hi = self.config.sigma_max if self.config.sigma_max is not None else sigmas[0].item()
                if self.config.use_karras_sigmas:
                    sigmas = karras_sigmas(lo, hi, num_inference_steps)
                elif self.config.use_exponential_sigmas:
                    sigmas = exponential_sigmas(lo, hi, num_inference_steps)
                else:
                    sigmas = beta_sigmas(lo, hi, num_inference_steps)
                timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if self.config.final_sigmas_type == "sigma_min":
                sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
            else:
                sigma_last = 0
            sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)

        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32)
        if self._continuous_v:
            self.timesteps = (0.25 * sigmas[:-1].log()).to(device=device)
        else:
            self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(device=device)
        self.sigmas = sigmas
        self._step_index = None
        self._begin_index = None
        self._reset_fused()
        self._fused.input_scales_host = (self.sigmas**2 + 1) ** 0.5

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the schedule (the second match if it occurs twice, as diffusers)."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps; pass one of `.timesteps`.")
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep):
        if self.begin_index is None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def _fused_reasons(self, s_churn=0.0):
        return ["s_churn > 0 (Karras churn) is not supported by the fused step"] if s_churn > 0 else []

    def _fused_table(self):
        from fastdiff.ops.scheduler_step import euler_coeffs

        kind = self.config.prediction_type
        table = euler_coeffs(self.sigmas, prediction_type="sample" if kind == "original_sample" else kind)
        return table, [False] * (len(self.sigmas) - 1), 0

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        return_dict: bool = True,
        guidance_scale=None,
    ):
        """One Euler step from the current sigma to the next.

        Args:
            model_output (`torch.Tensor`): the model's prediction (per ``config.prediction_type``).
            timestep (`float` or 0-d tensor): one of ``self.timesteps`` (not an integer step index).
            sample (`torch.Tensor`): the current sample.
            s_churn, s_tmin, s_tmax, s_noise (`float`): Karras et al. stochasticity (Algorithm 2).
            generator (`torch.Generator`, *optional*): source of the churn noise.
            return_dict (`bool`): return an :class:`EulerDiscreteSchedulerOutput` rather than a tuple.
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
        if use_fused_step(self, sample, model_output, self._fused_reasons(s_churn)):
            state = self._fused_state(())
            prev_sample = state.run(self, model_output, sample, guidance_scale, self.step_index)
            self._step_index += 1
            if not return_dict:
                return (prev_sample,)
            return EulerDiscreteSchedulerOutput(prev_sample=prev_sample)
        model_output = apply_guidance(model_output, guidance_scale)
        dtype = model_output.dtype
        sample = sample.to(torch.float32)
        model_output_f = model_output.to(torch.float32)
        sigma = self.sigmas[self.step_index]
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn_tensor(
                model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator
            )
            noise = self._scale_step_noise(noise, self.step_index)
            sample = sample + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5

        kind = self.config.prediction_type
        if kind in ("original_sample", "sample"):
            x0 = model_output_f
        elif kind == "epsilon":
            x0 = sample - sigma_hat * model_output_f
        else:  # v_prediction
            x0 = model_output_f * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)

        derivative = (sample - x0) / sigma_hat
        dt = self.sigmas[self.step_index + 1] - sigma_hat
        prev_sample = (sample + derivative * dt).to(dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return EulerDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Refused (a deliberate difference from diffusers, which has this method).

        diffusers' ``EulerDiscreteScheduler.get_velocity`` indexes ``alphas_cumprod`` by the timestep's
        position in ``timesteps`` rather than by the timestep, so its v-prediction targets belong to
        another timestep (all but the middle one). Use ``DDPMScheduler.get_velocity`` (same config).
        """
        raise NotImplementedError(
            "EulerDiscreteScheduler.get_velocity is refused: diffusers' version indexes alphas_cumprod by the step "
            "index instead of the timestep, which gives the v-prediction target of another timestep. Use "
            "DDPMScheduler.from_config(scheduler.config).get_velocity(sample, noise, timesteps)."
        )

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
