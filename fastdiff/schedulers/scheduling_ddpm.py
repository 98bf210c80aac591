"""DDPM: denoising diffusion probabilistic models (Ho, Jain and Abbeel 2020, https://arxiv.org/abs/2006.11239)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .scheduling_utils import (
    BaseOutput,
    KarrasDiffusionSchedulers,
    SchedulerMixin,
    apply_guidance,
    integer_timestep,
    randn_tensor,
    register_to_config,
    use_fused_step,
)


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    """Output of :meth:`DDPMScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): x_{t-1}, the next model input.
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


# Copied from fastdiff.schedulers.scheduling_ddim.threshold_sample
def threshold_sample(sample, ratio, max_value):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, https://arxiv.org/abs/2205.11487, sec. 2.3).

    Per sample, s = clamp(quantile(|x|, ratio), 1, max_value); x is clamped to [-s, s] and divided by s.
    """
    dtype = sample.dtype
    batch, channels, *rest = sample.shape
    flat = sample.float() if dtype not in (torch.float32, torch.float64) else sample
    flat = flat.reshape(batch, channels * int(np.prod(rest)))
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(batch, channels, *rest).to(dtype)


# Copied from fastdiff.schedulers.scheduling_ddim.spaced_timesteps
def spaced_timesteps(spacing, num_train_timesteps, num_inference_steps, steps_offset):
    """Integer inference timesteps in descending order for ``timestep_spacing`` (Lin et al. 2023, table 2)."""
    n, total = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, total - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = total // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(total, 0, -total / n)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")


# Copied from fastdiff.schedulers.scheduling_ddim._broadcast_alphas
def _broadcast_alphas(scheduler, like, timesteps):
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device=like.device)
    a = scheduler.alphas_cumprod.to(dtype=like.dtype)[timesteps.to(like.device)].flatten()
    return a.reshape(a.shape + (1,) * (like.ndim - 1))


# Copied from fastdiff.schedulers.scheduling_ddim.add_noise_by_alphas_cumprod
def add_noise_by_alphas_cumprod(scheduler, original_samples, noise, timesteps):
    """sqrt(a_t) x_0 + sqrt(1 - a_t) noise with a = ``scheduler.alphas_cumprod`` indexed by ``timesteps``."""
    a = _broadcast_alphas(scheduler, original_samples, timesteps)
    return a**0.5 * original_samples + (1 - a) ** 0.5 * noise


VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")


class DDPMScheduler(SchedulerMixin):
    """Ancestral sampling of the DDPM reverse process, Ho et al. 2020, Algorithm 2 (eq. 6 and 7).

    x_{t-1} = c0 * x0_hat + ct * x_t + sigma_t z with the posterior mean coefficients
    c0 = sqrt(a_{t-1}) beta_t / (1 - a_t), ct = sqrt(alpha_t) (1 - a_{t-1}) / (1 - a_t), where
    a = alphas_cumprod and beta_t = 1 - a_t / a_{t-1} between consecutive inference timesteps.
    ``variance_type`` picks sigma_t^2: the posterior variance (``fixed_small``), beta_t
    (``fixed_large``), or the model's interpolation between their logs (``learned_range``,
    Nichol and Dhariwal 2021, eq. 15; the model then outputs 2x the channels).

    Config keys and defaults are diffusers' ``DDPMScheduler``'s. The noise z comes from
    ``generator`` (or a bank from :meth:`prepare_noise_bank`) and is scaled by an attached temperature
    scheduler; none is added at t = 0.

    Fused step (fastdiff extension): without ``clip_sample`` (on by default, as in diffusers) and
    ``thresholding``, and with a fixed variance type (fixed_small, fixed_small_log, fixed_large), the
    update is x_prev = a x + e m + s z per element, one launch of :func:`fastdiff.ops.scheduler_step`
    that also folds in classifier-free guidance (``step(..., guidance_scale=g)``). It runs on CUDA
    tensors, or wherever the ``scheduler_step`` backend is forced, and follows a device step index
    from :meth:`set_begin_index` (or from the first ``timestep``, read once), so later calls never
    read ``timestep`` and never synchronise with the host.
    """

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
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type is not None and variance_type not in VARIANCE_TYPES:
            # None (what a DPM-Solver config carries into from_config) adds the posterior variance, as
            # fixed_small does, exactly as diffusers' DDPMScheduler treats it.
            raise ValueError(f"variance_type must be None or one of {list(VARIANCE_TYPES)}, got {variance_type!r}")
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
        )  # fmt: skip
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.custom_timesteps = False
        self.num_inference_steps = None
        # The training-length schedule, as diffusers sets it up: step() before set_timesteps() steps on
        # it (t -> t - 1), on the plain path (no fused table is built for it).
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy())
        self.variance_type = variance_type
        self._set_lookups(self.timesteps.tolist())
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """DDPM needs no input scaling; returns ``sample``."""
        return sample

    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
        """Build the schedule from ``num_inference_steps`` (by ``timestep_spacing``) or descending ``timesteps``."""
        total = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps().")
        if timesteps is not None:
            timesteps = [int(t) for t in timesteps]
            if any(b >= a for a, b in zip(timesteps, timesteps[1:])):
                raise ValueError(f"custom timesteps must be strictly descending, got {timesteps}")
            if not timesteps or timesteps[0] >= total or timesteps[-1] < 0:
                raise ValueError(f"custom timesteps must lie in [0, {total}), got {timesteps}")
            timesteps = np.array(timesteps, dtype=np.int64)
            self.custom_timesteps = True
        else:
            if not 1 <= num_inference_steps <= total:
                raise ValueError(f"num_inference_steps must be in [1, {total}], got {num_inference_steps}")
            self.custom_timesteps = False
            timesteps = spaced_timesteps(
                self.config.timestep_spacing, total, num_inference_steps, self.config.steps_offset
            )
        self.num_inference_steps = len(timesteps)
        self._set_lookups([int(t) for t in timesteps])
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._begin_index = None
        self._reset_fused()

    def _set_lookups(self, listed: list) -> None:
        """Host lookups of the schedule ``listed`` (ints): step index and next timestep of each timestep."""
        self._index_of = {t: i for i, t in enumerate(listed)}
        self._prev_of = dict(zip(listed, listed[1:] + [-1]))
        self._host_timesteps = listed

    # Copied from fastdiff.schedulers.scheduling_ddim.DDIMScheduler.begin_index
    @property
    def begin_index(self):
        """First step index of the fused step, set by the pipeline (img2img) through :meth:`set_begin_index`."""
        return self._begin_index

    # Copied from fastdiff.schedulers.scheduling_ddim.DDIMScheduler.set_begin_index
    def set_begin_index(self, begin_index: int = 0):
        """Where the fused step's device index starts (fastdiff extension; the plain step reads timesteps)."""
        self._begin_index = begin_index
        self._restart_fused()

    def _fused_reasons(self):
        from fastdiff.ops.scheduler_step import DDPM_VARIANCE_TYPES

        reasons = []
        if self.config.thresholding:
            reasons.append("thresholding is not linear")
        elif self.config.clip_sample:
            reasons.append("clip_sample is not linear (set clip_sample=False)")
        if (self.variance_type or "fixed_small") not in DDPM_VARIANCE_TYPES:
            reasons.append(f"variance_type {self.variance_type!r} is not one of {DDPM_VARIANCE_TYPES}")
        return reasons

    def _fused_table(self):
        from fastdiff.ops.scheduler_step import ddpm_coeffs

        table = ddpm_coeffs(
            self.alphas_cumprod, self._host_timesteps, prediction_type=self.config.prediction_type,
            variance_type=self.variance_type or "fixed_small",
        )  # fmt: skip
        return table, self._noise_draws(), 0

    def _noise_draws(self):
        return [t > 0 for t in self._host_timesteps]

    # Copied from fastdiff.schedulers.scheduling_ddim.DDIMScheduler._index_of_checked
    def _index_of_checked(self, timestep) -> int:
        t = int(timestep)
        if t not in self._index_of:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps {self.timesteps.tolist()}")
        return self._index_of[t]

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule, as diffusers returns it.

        After ``set_timesteps`` (or with custom timesteps): the next entry of ``self.timesteps`` (a 0-d
        tensor; ``tensor(-1)`` after the last one). Before it: ``timestep - 1``.
        """
        if not (self.custom_timesteps or self.num_inference_steps):
            return timestep - 1
        index = self._index_of_checked(timestep)
        if index == len(self._host_timesteps) - 1:
            return torch.tensor(-1)
        return self.timesteps[index + 1]

    def _previous_int(self, t: int) -> int:
        """``previous_timestep`` as a host int (the step indexes host tables with it)."""
        if not (self.custom_timesteps or self.num_inference_steps):
            return t - 1
        self._index_of_checked(t)
        return self._prev_of[t]

    def _get_variance(self, t, predicted_variance=None, variance_type=None):
        prev_t = self._previous_int(int(t))
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        # Posterior variance, Ho et al. eq. 7; clamped so that its log stays finite.
        variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
        variance_type = variance_type or self.config.variance_type
        if variance_type in (None, "fixed_small"):
            return variance
        if variance_type == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return torch.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        frac = (predicted_variance + 1) / 2  # learned_range
        return frac * torch.log(current_beta_t) + (1 - frac) * torch.log(variance)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
        guidance_scale=None,
    ):
        """One ancestral DDPM step from ``timestep`` to the previous timestep of the schedule.

        Args:
            model_output (`torch.Tensor`): the model's prediction; with a learned variance type it may
                carry twice the sample's channels (prediction, then variance).
            timestep (`int` or 0-d tensor): one of ``self.timesteps`` (before ``set_timesteps``, any
                training timestep: it steps to ``timestep - 1``, as in diffusers).
            sample (`torch.Tensor`): x_t.
            generator (`torch.Generator`, *optional*): source of the noise.
            return_dict (`bool`): return a :class:`DDPMSchedulerOutput` rather than a tuple.
            guidance_scale (`float` or one-element float32 tensor, *optional*): fastdiff extension; with it,
                ``model_output`` is the batched CFG output (2B, ...), uncond half first, and the guidance
                ``u + g * (c - u)`` is applied (inside the fused launch when the fused step runs).

        On the fused path ``pred_original_sample`` is None (computing x0 would cost another launch).
        """
        if use_fused_step(self, sample, model_output, self._fused_reasons()):
            state = self._fused_state(())
            start = None
            if state.step_index is None:
                start = self._begin_index if self._begin_index is not None else self._index_of_checked(timestep)
            prev_sample = state.run(self, model_output, sample, guidance_scale, start, generator=generator)
            if not return_dict:
                return (prev_sample,)
            return DDPMSchedulerOutput(prev_sample=prev_sample)
        model_output = apply_guidance(model_output, guidance_scale)
        t = integer_timestep(timestep)
        prev_t = self._previous_int(t)
        if model_output.shape[1] == sample.shape[1] * 2 and self.variance_type in ("learned", "learned_range"):
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
            predicted_variance = predicted_variance.float()
        else:
            predicted_variance = None
        dtype = sample.dtype
        sample_f = sample.float()
        model_output_f = model_output.float()

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample_f - beta_prod_t**0.5 * model_output_f) / alpha_prod_t**0.5
        elif kind == "sample":
            x0 = model_output_f
        else:  # v_prediction
            x0 = alpha_prod_t**0.5 * sample_f - beta_prod_t**0.5 * model_output_f
        if self.config.thresholding:
            x0 = threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        x0_coeff = alpha_prod_t_prev**0.5 * current_beta_t / beta_prod_t
        xt_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        prev_sample = x0_coeff * x0 + xt_coeff * sample_f

        if t > 0:
            index = self._index_of[t]
            noise = self._bank_noise(index)
            if noise is None:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            noise = self._scale_step_noise(noise, index).float()
            variance = self._get_variance(t, predicted_variance=predicted_variance)
            if self.variance_type == "fixed_small_log":
                prev_sample = prev_sample + variance * noise
            elif self.variance_type == "learned_range":
                prev_sample = prev_sample + torch.exp(0.5 * variance) * noise
            else:
                prev_sample = prev_sample + variance**0.5 * noise

        prev_sample = prev_sample.to(dtype)
        x0 = x0.to(dtype)
        if not return_dict:
            return (prev_sample, x0)
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise, per batch element."""
        return add_noise_by_alphas_cumprod(self, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x_0 (Salimans and Ho 2022)."""
        a = _broadcast_alphas(self, sample, timesteps)
        return a**0.5 * noise - (1 - a) ** 0.5 * sample

    def __len__(self):
        return self.config.num_train_timesteps
