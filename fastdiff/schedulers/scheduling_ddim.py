"""DDIM: denoising diffusion implicit models (Song, Meng and Ermon 2020, https://arxiv.org/abs/2010.02502)."""

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
class DDIMSchedulerOutput(BaseOutput):
    """Output of :meth:`DDIMScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): x_{t-1}, the next model input.
        pred_original_sample (`torch.Tensor`): the model's current estimate of x_0.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


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


def rescale_zero_terminal_snr(betas):
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab -= last
    sqrt_ab *= first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


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


class DDIMScheduler(SchedulerMixin):
    """DDIM sampler: Song et al. 2020, eq. 12, with ``eta`` interpolating between DDIM (0) and DDPM (1).

    x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma_t^2) eps_hat + sigma_t z,
    sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t) * (1 - a_t / a_{t-1})), where a = alphas_cumprod.

    Config keys and defaults are diffusers' ``DDIMScheduler``'s. Like diffusers, the previous timestep
    is ``t - num_train_timesteps // num_inference_steps`` whatever the spacing. The noise z comes from
    ``generator`` (or ``variance_noise``, or a bank from :meth:`prepare_noise_bank`) and is scaled by an
    attached temperature scheduler.

    Fused step (fastdiff extension): without ``clip_sample`` and ``thresholding`` the update is
    x_prev = a x + e m + s z per element, one launch of :func:`fastdiff.ops.scheduler_step` that also
    folds in classifier-free guidance (``step(..., guidance_scale=g)`` with the batched CFG output).
    It runs on CUDA tensors, or wherever the ``scheduler_step`` backend is forced. It follows a device
    step index from :meth:`set_begin_index` (or from the first ``timestep``, which reads its value
    once), so later calls never read ``timestep`` and never synchronise with the host.
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
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}")
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            ("linear", "scaled_linear", "squaredcos_cap_v2"),
        )  # fmt: skip
        if rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64))
        self._index_of = {}
        self._begin_index = None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """DDIM needs no input scaling; returns ``sample``."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose ``num_inference_steps`` timesteps by ``config.timestep_spacing`` and put them on ``device``."""
        total = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be in [1, {total}], got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        timesteps = spaced_timesteps(
            self.config.timestep_spacing, total, num_inference_steps, self.config.steps_offset
        )
        self._index_of = {int(t): i for i, t in enumerate(timesteps)}
        self._host_timesteps = timesteps
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._begin_index = None
        self._reset_fused(eta=0.0)

    @property
    def begin_index(self):
        """First step index of the fused step, set by the pipeline (img2img) through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Where the fused step's device index starts (fastdiff extension; the plain step reads timesteps)."""
        self._begin_index = begin_index
        self._restart_fused()

    def _fused_reasons(self, eta=0.0):
        reasons = []
        if self.config.thresholding:
            reasons.append("thresholding is not linear")
        elif self.config.clip_sample:
            reasons.append("clip_sample is not linear (set clip_sample=False)")
        if eta < 0:
            reasons.append(f"eta must be >= 0, got {eta}")
        return reasons

    def _fused_table(self, eta=0.0):
        from fastdiff.ops.scheduler_step import ddim_coeffs

        table = ddim_coeffs(
            self.alphas_cumprod, self._host_timesteps, final_alpha_cumprod=float(self.final_alpha_cumprod),
            num_train_timesteps=self.config.num_train_timesteps, prediction_type=self.config.prediction_type,
            eta=eta,
        )  # fmt: skip
        return table, [eta > 0] * len(self._host_timesteps), 0

    def _noise_draws(self):
        return [True] * len(self._host_timesteps)  # every step draws when eta > 0

    def _index_of_checked(self, timestep) -> int:
        t = int(timestep)
        if t not in self._index_of:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps {self.timesteps.tolist()}")
        return self._index_of[t]

    def _unscheduled_reasons(self, timestep) -> list:
        """Why the fused step cannot start at ``timestep``: its table follows ``.timesteps`` row by row."""
        t = int(timestep)
        if t in self._index_of:
            return []
        return [f"timestep {t} is not one of `.timesteps` (the table follows the schedule; the plain step takes it)"]

    def _scheduled_index(self, t: int, feature: str) -> int:
        """The step index of ``t``, for a fastdiff extension that needs one (the noise bank, temperature)."""
        if t not in self._index_of:
            raise ValueError(f"timestep {t} is not in `.timesteps`, so {feature} has no step for it; pass one of them")
        return self._index_of[t]

    def _alpha_prod(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def _get_variance(self, timestep: int, prev_timestep: int) -> torch.Tensor:
        """sigma_t^2 / eta^2 of Song et al. 2021, eq. 16: (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)."""
        alpha_prod_t, alpha_prod_t_prev = self.alphas_cumprod[timestep], self._alpha_prod(prev_timestep)
        return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
        guidance_scale=None,
    ):
        """One DDIM update from ``timestep`` to the previous timestep.

        Args:
            model_output (`torch.Tensor`): the model's prediction (per ``config.prediction_type``).
            timestep (`int` or 0-d tensor): the current integer training timestep, normally one of
                ``self.timesteps``; as in diffusers, another one is accepted (it steps by
                ``num_train_timesteps // num_inference_steps``).
            sample (`torch.Tensor`): x_t.
            eta (`float`): noise weight; 0 is deterministic DDIM, 1 is DDPM-like ancestral sampling.
            use_clipped_model_output (`bool`): recompute eps from the clipped x0 estimate.
            generator (`torch.Generator`, *optional*): source of the noise when ``eta > 0``.
            variance_noise (`torch.Tensor`, *optional*): the noise itself, instead of ``generator``.
            return_dict (`bool`): return a :class:`DDIMSchedulerOutput` rather than a tuple.
            guidance_scale (`float` or one-element float32 tensor, *optional*): fastdiff extension; with it,
                ``model_output`` is the batched CFG output (2B, ...), uncond half first, and the guidance
                ``u + g * (c - u)`` is applied (inside the fused launch when the fused step runs).

        On the fused path ``pred_original_sample`` is None (computing x0 would cost another launch).
        """
        if self.num_inference_steps is None:
            raise ValueError("step() called before set_timesteps(); call set_timesteps(num_inference_steps) first.")
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise to step(), not both.")
        # Without clipping or thresholding, use_clipped_model_output recomputes the same eps: same table.
        reasons = self._fused_reasons(eta)
        if not reasons and self._fused.step_index is None and self._begin_index is None:
            reasons = self._unscheduled_reasons(timestep)
        if use_fused_step(self, sample, model_output, reasons):
            state = self._fused_state((("eta", eta),))
            start = None
            if state.step_index is None:
                start = self._begin_index if self._begin_index is not None else self._index_of_checked(timestep)
            prev_sample = state.run(
                self, model_output, sample, guidance_scale, start, generator=generator,
                noise=variance_noise if eta > 0 else None,
            )  # fmt: skip
            if not return_dict:
                return (prev_sample,)
            return DDIMSchedulerOutput(prev_sample=prev_sample)
        model_output = apply_guidance(model_output, guidance_scale)
        t = integer_timestep(timestep)
        index = self._index_of.get(t)  # None for a timestep off the schedule, which diffusers accepts too
        dtype = sample.dtype
        sample = sample.float()
        model_output_f = model_output.float()
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self._alpha_prod(prev_t)
        beta_prod_t = 1 - alpha_prod_t

        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = (sample - beta_prod_t**0.5 * model_output_f) / alpha_prod_t**0.5
            eps = model_output_f
        elif kind == "sample":
            x0 = model_output_f
            eps = (sample - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5
        else:  # v_prediction
            x0 = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output_f
            eps = alpha_prod_t**0.5 * model_output_f + beta_prod_t**0.5 * sample

        if self.config.thresholding:
            x0 = threshold_sample(x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
        elif self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        variance = self._get_variance(t, prev_t)
        std_dev_t = eta * variance**0.5
        if use_clipped_model_output:
            eps = (sample - alpha_prod_t**0.5 * x0) / beta_prod_t**0.5

        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * eps
        prev_sample = alpha_prod_t_prev**0.5 * x0 + direction

        if eta > 0:
            if variance_noise is None and self._fused.noise_bank is not None:
                variance_noise = self._bank_noise(self._scheduled_index(t, "the noise bank"))
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            if self.temperature_scheduler is not None:
                variance_noise = self._scale_step_noise(variance_noise, self._scheduled_index(t, "temperature"))
            prev_sample = prev_sample + std_dev_t * variance_noise.float()

        prev_sample = prev_sample.to(dtype)
        x0 = x0.to(dtype)
        if not return_dict:
            return (prev_sample, x0)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise, per batch element."""
        return add_noise_by_alphas_cumprod(self, original_samples, noise, timesteps)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x_0 (Salimans and Ho 2022)."""
        a = _broadcast_alphas(self, sample, timesteps)
        return a**0.5 * noise - (1 - a) ** 0.5 * sample

    def __len__(self):
        return self.config.num_train_timesteps


def _broadcast_alphas(scheduler, like, timesteps):
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device=like.device)
    a = scheduler.alphas_cumprod.to(dtype=like.dtype)[timesteps.to(like.device)].flatten()
    return a.reshape(a.shape + (1,) * (like.ndim - 1))


def add_noise_by_alphas_cumprod(scheduler, original_samples, noise, timesteps):
    """sqrt(a_t) x_0 + sqrt(1 - a_t) noise with a = ``scheduler.alphas_cumprod`` indexed by ``timesteps``."""
    a = _broadcast_alphas(scheduler, original_samples, timesteps)
    return a**0.5 * original_samples + (1 - a) ** 0.5 * noise
