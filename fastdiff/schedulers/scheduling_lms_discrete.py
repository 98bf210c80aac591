"""Linear multistep (LMS) sampler in the sigma parametrisation (Karras et al. 2022, arXiv:2206.00364)."""

from __future__ import annotations

import functools
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
    register_to_config,
    use_fused_step,
)

# The fused step keeps the last ``order - 1`` derivatives in the op's history ring (at most 3 slots).
MAX_FUSED_ORDER = 4

logger = logging.getLogger(__name__)

# Gauss-Legendre nodes and weights on [-1, 1]; 4 points integrate polynomials up to degree 7
# exactly, and the LMS integrand has degree order - 1 <= 3 (orders above 4 use more points).
_GAUSS_POINTS = 4


@functools.lru_cache(maxsize=None)
def _gauss_legendre(num_points: int):
    """``np.polynomial.legendre.leggauss(num_points)``, read-only and computed once per size (it solves
    an eigenproblem, most of the cost of one LMS coefficient, and every coefficient uses the same size)."""
    points, weights = np.polynomial.legendre.leggauss(num_points)
    points.setflags(write=False)
    weights.setflags(write=False)
    return points, weights


@dataclass
class LMSDiscreteSchedulerOutput(BaseOutput):
    """Output of :meth:`LMSDiscreteScheduler.step`.

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



def lms_coefficient(sigmas, order, t, current_order):
    """Integral over [sigmas[t], sigmas[t+1]] of the Lagrange basis polynomial for node ``t - current_order``.

    The nodes are sigmas[t], sigmas[t-1], ..., sigmas[t-order+1]. The integrand is a polynomial of
    degree ``order - 1``, so Gauss-Legendre quadrature with enough points is exact (diffusers uses
    scipy's adaptive ``quad`` for the same number).
    """
    nodes = [float(sigmas[t - k]) for k in range(order)]
    x_j = nodes[current_order]
    a, b = float(sigmas[t]), float(sigmas[t + 1])
    points, weights = _gauss_legendre(max(_GAUSS_POINTS, (order + 1) // 2))
    tau = 0.5 * (b - a) * points + 0.5 * (b + a)
    basis = np.ones_like(tau)
    for k, x_k in enumerate(nodes):
        if k != current_order:
            basis *= (tau - x_k) / (x_j - x_k)
    return float(0.5 * (b - a) * np.sum(weights * basis))


def lms_fused_coeffs(sigmas, prediction_type: str, order: int, begin_index: int = 0) -> torch.Tensor:
    """LMS as a fused-step coefficient table (columns a, e, s, p, q, h1, h2, h3 of
    :func:`fastdiff.ops.scheduler_step`).

    ``sigmas`` is the host list of the schedule's sigmas, final one included. The derivative
    d = (x - x0) / sigma = p x + q m (epsilon: m; v: sigma / (sigma^2 + 1) x + m / sqrt(sigma^2 + 1);
    sample: (x - m) / sigma) goes into the history ring, and x_prev = x + sum_j c_j d_{i-j} with the
    weights of :func:`lms_coefficient` at order min(i + 1, order), as
    :meth:`LMSDiscreteScheduler.step` computes them; only the derivatives taken since ``begin_index``
    exist, so the others get weight 0 (diffusers' ``zip`` drops them the same way).
    """
    n = len(sigmas) - 1
    table = torch.zeros(n, 8, dtype=torch.float64)
    for i in range(begin_index, n):
        sigma = sigmas[i]
        if prediction_type == "epsilon":
            px, pm = 0.0, 1.0
        elif prediction_type == "v_prediction":
            px, pm = sigma / (sigma**2 + 1), 1 / math.sqrt(sigma**2 + 1)
        else:  # sample
            px, pm = 1 / sigma, -1 / sigma
        current = min(i + 1, order)
        c = [lms_coefficient(sigmas, current, i, j) for j in range(min(current, i - begin_index + 1))]
        c += [0.0] * (4 - len(c))
        table[i] = torch.tensor([1 + c[0] * px, c[0] * pm, 0.0, px, pm, c[1], c[2], c[3]], dtype=torch.float64)
    return table.to(torch.float32)


class LMSDiscreteScheduler(SchedulerMixin):
    """Linear multistep method for the probability-flow ODE (k-diffusion's ``sample_lms``).

    dx/dsigma = d(x, sigma) = (x - x0_hat) / sigma is integrated with an Adams-Bashforth-type
    formula: x_next = x + sum_j c_j d_{i-j}, where c_j integrates the Lagrange polynomial through
    the last ``order`` sigmas over [sigma_i, sigma_{i+1}] (Karras et al. 2022 discuss it as
    the "LMS" baseline, sec. 3). The order ramps up from 1 over the first steps. Inputs are
    scaled by 1 / sqrt(sigma^2 + 1).

    Config keys and defaults are diffusers' ``LMSDiscreteScheduler``'s; no scipy is needed (the
    coefficients come from exact Gauss-Legendre quadrature) except for ``use_beta_sigmas`` (scipy's
    beta quantile).

    Fused step (fastdiff extension): for ``order <= 4`` the update is linear in the sample, the model
    output and the last ``order - 1`` derivatives (:func:`lms_fused_coeffs`), so ``step`` runs as one
    launch of :func:`fastdiff.ops.scheduler_step` that also folds in classifier-free guidance
    (``step(..., guidance_scale=g)`` with the batched CFG output) and keeps the derivatives in a device
    history ring. It runs on CUDA tensors, or wherever the ``scheduler_step`` backend is forced, and
    reads a device copy of the step index that the launch itself advances.
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
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        prediction_type: str = "epsilon",
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
            ("linear", "scaled_linear", "squaredcos_cap_v2"),
        )  # fmt: skip
        # Instance attributes that diffusers sets too (read without the config-attribute FutureWarning).
        self.use_karras_sigmas = use_karras_sigmas
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # The training-length schedule, as diffusers sets it up: step() before set_timesteps() runs
        # the plain step on it, as diffusers does; it gets no fused table (set_timesteps builds one).
        self._set_schedule(num_train_timesteps, None)
        self.num_inference_steps = None
        self.is_scale_input_called = False

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

    def _fused_reasons(self, order=4):
        if order > MAX_FUSED_ORDER:
            return [f"order {order} needs more than the {MAX_FUSED_ORDER - 1} history slots of the fused step"]
        return []

    def _fused_table(self, order=4, begin_index=0):
        table = lms_fused_coeffs(self._sigmas_list, self.config.prediction_type, order, begin_index)
        return table, [False] * (len(self._sigmas_list) - 1), order - 1

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Scale the model input by 1 / sqrt(sigma^2 + 1) for the current step."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        self.is_scale_input_called = True
        return sample / ((sigma**2 + 1) ** 0.5)

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """The LMS weight of the derivative ``current_order`` steps back, for step ``t`` at ``order``."""
        return lms_coefficient(self._sigmas_list, order, t, current_order)

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Choose ``num_inference_steps`` timesteps by ``config.timestep_spacing`` and their sigmas."""
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        self.num_inference_steps = num_inference_steps
        self._set_schedule(num_inference_steps, device)
        self._reset_fused(order=4, begin_index=0)

    def _set_schedule(self, num_inference_steps: int, device):
        """Timesteps, sigmas and a fresh step state for ``num_inference_steps`` steps (no fused table)."""
        timesteps = float_spaced_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )
        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.config.use_karras_sigmas or self.config.use_exponential_sigmas:
            convert = karras_sigmas if self.config.use_karras_sigmas else exponential_sigmas
            sigmas = convert(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        elif self.config.use_beta_sigmas:
            # sigma_min/sigma_max are other schedulers' keys (kept by from_config); diffusers reads them here
            lo, hi = self.config.get("sigma_min"), self.config.get("sigma_max")
            lo = lo if lo is not None else sigmas[-1].item()
            hi = hi if hi is not None else sigmas[0].item()
            sigmas = beta_sigmas(lo, hi, num_inference_steps)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        self._sigmas_list = self.sigmas.tolist()  # host copy for the quadrature, read without syncs
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None
        self.derivatives = []

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
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        order: int = 4,
        return_dict: bool = True,
        guidance_scale=None,
    ):
        """One LMS step from the current sigma to the next.

        Args:
            model_output (`torch.Tensor`): the model's prediction (per ``config.prediction_type``).
            timestep (`float` or 0-d tensor): one of ``self.timesteps``.
            sample (`torch.Tensor`): the current sample.
            order (`int`): the multistep order (at least 1); it ramps up over the first steps.
            return_dict (`bool`): return an :class:`LMSDiscreteSchedulerOutput` rather than a tuple.
            guidance_scale (`float` or one-element float32 tensor, *optional*): fastdiff extension; with it,
                ``model_output`` is the batched CFG output (2B, ...), uncond half first, and the guidance
                ``u + g * (c - u)`` is applied (inside the fused launch when the fused step runs).

        On the fused path ``pred_original_sample`` is None (computing x0 would cost another launch).
        """
        if order < 1:
            raise ValueError(f"order must be at least 1, got {order}")
        if not self.is_scale_input_called:
            logger.warning("scale_model_input() should be called before step() to scale the model input.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if use_fused_step(self, sample, model_output, self._fused_reasons(order)):
            state = self._fused
            begin = self.step_index if state.step_index is None else state.start_index
            state = self._fused_state((("begin_index", begin), ("order", order)))
            prev_sample = state.run(self, model_output, sample, guidance_scale, self.step_index)
            self._step_index += 1
            if not return_dict:
                return (prev_sample,)
            return LMSDiscreteSchedulerOutput(prev_sample=prev_sample)
        model_output = apply_guidance(model_output, guidance_scale)
        dtype = sample.dtype
        sample = sample.float()
        model_output = model_output.float()
        sigma = self.sigmas[self.step_index]
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0 = sample - sigma * model_output
        elif kind == "v_prediction":
            x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        else:  # sample
            x0 = model_output

        self.derivatives.append((sample - x0) / sigma)
        if len(self.derivatives) > order:
            self.derivatives.pop(0)
        order = min(self.step_index + 1, order)
        coeffs = [self.get_lms_coefficient(order, self.step_index, j) for j in range(order)]
        prev_sample = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        prev_sample = prev_sample.to(dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return LMSDiscreteSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

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
