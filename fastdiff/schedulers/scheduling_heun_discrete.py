"""Heun sampler in the sigma parametrisation (Karras et al. 2022, https://arxiv.org/abs/2206.00364)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import numpy as np
import torch

from .scheduling_utils import (
    BaseOutput,
    KarrasDiffusionSchedulers,
    SchedulerMixin,
    apply_guidance,
    register_to_config,
    use_fused_step,
)


@dataclass
class HeunDiscreteSchedulerOutput(BaseOutput):
    """Output of :meth:`HeunDiscreteScheduler.step`.

    Args:
        prev_sample (`torch.Tensor`): the next model input (an Euler predictor after the first
            call of a step, the corrected sample after the second).
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


# Copied from fastdiff.schedulers.scheduling_euler_discrete.sigma_to_t
def sigma_to_t(sigma, log_sigmas):
    """The (fractional) training timestep whose sigma is ``sigma``, interpolating log-sigma linearly."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


# Copied from fastdiff.schedulers.scheduling_euler_discrete.karras_sigmas
def karras_sigmas(sigma_min, sigma_max, num_inference_steps, rho=7.0):
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho) from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


# Copied from fastdiff.schedulers.scheduling_euler_discrete.exponential_sigmas
def exponential_sigmas(sigma_min, sigma_max, num_inference_steps):
    """Sigmas evenly spaced in log(sigma) from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))

# Copied from fastdiff.schedulers.scheduling_euler_discrete.beta_sigmas
def beta_sigmas(sigma_min, sigma_max, num_inference_steps, alpha=0.6, beta=0.6):
    """Sigmas at the quantiles of a Beta(alpha, beta) distribution, from sigma_max down to sigma_min
    (Lee et al. 2024, "Beta Sampling is All You Need", arXiv:2407.12173).

    Needs scipy (its beta quantile function), imported here only, as diffusers needs it only here.
    """
    import scipy.stats

    quantiles = scipy.stats.beta.ppf(1 - np.linspace(0, 1, num_inference_steps), alpha, beta)
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])



def heun_fused_coeffs(sigmas, prediction_type: str, begin_index: int = 0) -> torch.Tensor:
    """Heun's model calls as a fused-step coefficient table (columns a, e, s, p, q, h1, h2, h3 of
    :func:`fastdiff.ops.scheduler_step`), one row per call, with a history ring of one slot.

    ``sigmas`` is the scheduler's doubled list (final 0 included); calls alternate predictor and
    corrector from ``begin_index``. With x0 = px x + pm m at the call's sigma_input:

    * predictor at call k (sigma = sigmas[k], dt = sigmas[k + 1] - sigma): the derivative
      D1 = (x - x0) / sigma = p x + q m goes into the ring, and x_next = x + dt D1;
    * corrector at call k (sigma_next = sigmas[k], dt = sigma_next - sigmas[k - 1]): with the saved
      sample x_prev = x - dt D1 and D2 = (x - x0) / sigma_next, x_next = x_prev + dt (D1 + D2) / 2 =
      x + dt/2 D2 - dt/2 D1, so h1 = -dt/2 reads D1 from the ring.
    """
    sig = [float(v) for v in sigmas]
    n = len(sig) - 1

    def x0_weights(sigma):
        if prediction_type == "epsilon":
            return 1.0, -sigma
        if prediction_type == "v_prediction":
            return 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
        return 0.0, 1.0  # sample

    table = torch.zeros(n, 8, dtype=torch.float64)
    for k in range(begin_index, n):
        if (k - begin_index) % 2 == 0:  # predictor (Euler)
            sigma, dt = sig[k], sig[k + 1] - sig[k]
            px, pm = x0_weights(sigma)
            p, q = (1 - px) / sigma, -pm / sigma
            table[k] = torch.tensor([1 + dt * p, dt * q, 0.0, p, q, 0.0, 0.0, 0.0], dtype=torch.float64)
        else:  # corrector (trapezoidal)
            sigma_next, dt = sig[k], sig[k] - sig[k - 1]
            px, pm = x0_weights(sigma_next)
            p2, q2 = (1 - px) / sigma_next, -pm / sigma_next
            row = [1 + dt / 2 * p2, dt / 2 * q2, 0.0, 0.0, 0.0, -dt / 2, 0.0, 0.0]
            table[k] = torch.tensor(row, dtype=torch.float64)
    return table.to(torch.float32)


class HeunDiscreteScheduler(SchedulerMixin):
    """Heun's second-order method for the probability-flow ODE, Karras et al. 2022, Algorithm 1 (gamma = 0).

    Each sigma interval takes two model calls: an Euler predictor
    x' = x + (sigma_next - sigma) d(x, sigma), then the trapezoidal corrector
    x_next = x + (sigma_next - sigma) (d(x, sigma) + d(x', sigma_next)) / 2, with
    d = (x - x0_hat) / sigma. ``timesteps`` therefore lists every interior timestep twice and
    ``order`` is 2. Inputs are scaled by 1 / sqrt(sigma^2 + 1).

    Config keys and defaults are diffusers' ``HeunDiscreteScheduler``'s. ``use_beta_sigmas`` needs
    scipy (its beta quantile), as in diffusers; nothing else does.

    Fused step (fastdiff extension): without ``clip_sample`` each model call is linear in the sample,
    the model output and the predictor's derivative (:func:`heun_fused_coeffs`), so ``step`` runs as
    one launch of :func:`fastdiff.ops.scheduler_step` that also folds in classifier-free guidance
    (``step(..., guidance_scale=g)`` with the batched CFG output) and keeps the derivative in a
    one-slot device ring. It runs on CUDA tensors, or wherever the ``scheduler_step`` backend is
    forced, and reads a device copy of the step index that the launch itself advances.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 2

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ):
        if use_beta_sigmas and importlib.util.find_spec("scipy") is None:
            raise ImportError("use_beta_sigmas=True needs scipy (pip install scipy), as in diffusers.")
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError("set at most one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas.")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            ("linear", "scaled_linear", "squaredcos_cap_v2", "exp"),
        )  # fmt: skip
        # Instance attributes that diffusers sets too (read without the config-attribute FutureWarning).
        self.use_karras_sigmas = use_karras_sigmas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # The training-length schedule, as diffusers sets it up: step() before set_timesteps() runs
        # the plain step on it, as diffusers does; it gets no fused table (set_timesteps builds one).
        self._set_schedule(num_train_timesteps, None, num_train_timesteps, None)
        self.num_inference_steps = None

    @property
    def init_noise_sigma(self):
        """Standard deviation of the initial noise: the largest sigma (sqrt(sigma^2 + 1) for leading spacing)."""
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return self.sigmas.max()
        return (self.sigmas.max() ** 2 + 1) ** 0.5

    @property
    def step_index(self):
        """Index of the current model call in ``timesteps``; None before the first."""
        return self._step_index

    @property
    def begin_index(self):
        """First step index, set by the pipeline (img2img) through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index
        self._restart_fused()

    def _fused_reasons(self):
        return ["clip_sample is not linear"] if self.config.clip_sample else []

    def _fused_table(self, begin_index=0):
        table = heun_fused_coeffs(self.sigmas, self.config.prediction_type, begin_index)
        return table, [False] * len(self.timesteps), 1

    @property
    def state_in_first_order(self):
        """True when the next ``step`` is a predictor (first) call."""
        return self.dt is None

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Scale the model input by 1 / sqrt(sigma^2 + 1) for the current model call."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def set_timesteps(self, num_inference_steps=None, device=None, num_train_timesteps=None, timesteps=None):
        """Build the schedule from ``num_inference_steps`` or custom ``timesteps``; interior entries are doubled."""
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps().")
        if timesteps is not None and (
            self.config.use_karras_sigmas or self.config.use_exponential_sigmas or self.config.use_beta_sigmas
        ):
            raise ValueError(
                "custom timesteps cannot be combined with use_karras_sigmas/use_exponential_sigmas/use_beta_sigmas."
            )
        num_inference_steps = num_inference_steps or len(timesteps)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self._set_schedule(num_inference_steps, device, num_train_timesteps, timesteps)
        self._reset_fused(begin_index=0)

    def _set_schedule(self, num_inference_steps: int, device, num_train_timesteps, timesteps):
        """Timesteps, doubled sigmas and a fresh step state for ``num_inference_steps`` steps (no fused table)."""
        total = num_train_timesteps or self.config.num_train_timesteps
        if timesteps is not None:
            timesteps = np.array(timesteps, dtype=np.float32)
        else:
            timesteps = float_spaced_timesteps(
                self.config.timestep_spacing, total, num_inference_steps, self.config.steps_offset
            )
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.config.use_karras_sigmas or self.config.use_exponential_sigmas or self.config.use_beta_sigmas:
            lo = self.config.get("sigma_min")
            hi = self.config.get("sigma_max")
            lo = lo if lo is not None else sigmas[-1].item()
            hi = hi if hi is not None else sigmas[0].item()
            if self.config.use_karras_sigmas:
                sigmas = karras_sigmas(lo, hi, num_inference_steps)
            elif self.config.use_exponential_sigmas:
                sigmas = exponential_sigmas(lo, hi, num_inference_steps)
            else:
                sigmas = beta_sigmas(lo, hi, num_inference_steps)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.from_numpy(timesteps)
        timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        self.timesteps = timesteps.to(device=device, dtype=torch.float32)
        self.prev_derivative = None
        self.dt = None
        self.sample = None
        self._step_index = None
        self._begin_index = None

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

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, guidance_scale=None
    ):
        """One model call's worth of Heun: the Euler predictor or the trapezoidal corrector.

        Args:
            model_output (`torch.Tensor`): the model's prediction (per ``config.prediction_type``).
            timestep (`float` or 0-d tensor): the current entry of ``self.timesteps``.
            sample (`torch.Tensor`): the current sample.
            return_dict (`bool`): return a :class:`HeunDiscreteSchedulerOutput` rather than a tuple.
            guidance_scale (`float` or one-element float32 tensor, *optional*): fastdiff extension; with it,
                ``model_output`` is the batched CFG output (2B, ...), uncond half first, and the guidance
                ``u + g * (c - u)`` is applied (inside the fused launch when the fused step runs).

        On the fused path ``pred_original_sample`` is None (computing x0 would cost another launch).
        """
        if self.step_index is None:
            self._init_step_index(timestep)
        if use_fused_step(self, sample, model_output, self._fused_reasons()):
            state = self._fused
            if state.step_index is None:  # predictor and corrector alternate from the first call
                state = self._fused_state((("begin_index", self.step_index),))
            prev_sample = state.run(self, model_output, sample, guidance_scale, self.step_index)
            # Keep state_in_first_order right; the plain step's saved sample and derivative stay unset.
            k = self.step_index
            self.dt = self.sigmas[k + 1] - self.sigmas[k] if self.state_in_first_order else None
            self._step_index += 1
            if not return_dict:
                return (prev_sample,)
            return HeunDiscreteSchedulerOutput(prev_sample=prev_sample)
        model_output = apply_guidance(model_output, guidance_scale)
        dtype = sample.dtype
        sample = sample.float()
        model_output = model_output.float()
        first = self.state_in_first_order
        if first:
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self.step_index - 1], self.sigmas[self.step_index]
        sigma_input = sigma if first else sigma_next

        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = sample - sigma_input * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma_input / (sigma_input**2 + 1) ** 0.5) + sample / (sigma_input**2 + 1)
        else:  # sample
            x0 = model_output
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)

        if first:
            derivative = (sample - x0) / sigma
            dt = sigma_next - sigma
            self.prev_derivative, self.dt, self.sample = derivative, dt, sample
        else:
            derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            dt, sample = self.dt, self.sample
            self.prev_derivative = self.dt = self.sample = None
        prev_sample = (sample + derivative * dt).to(dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return HeunDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

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
