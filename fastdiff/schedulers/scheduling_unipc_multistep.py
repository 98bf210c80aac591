"""UniPC: unified predictor-corrector multistep sampler (Zhao et al. 2023, https://arxiv.org/abs/2302.04867)."""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import torch

from .scheduling_utils import (
    KarrasDiffusionSchedulers,
    SchedulerMixin,
    SchedulerOutput,
    apply_guidance,
    register_to_config,
    use_fused_step,
)


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


# Copied from fastdiff.schedulers.scheduling_dpmsolver_multistep.alpha_sigma_from_sigma
def alpha_sigma_from_sigma(sigma, flow=False):
    """(alpha_t, sigma_t) of the VP process for a VE sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha.

    With ``flow`` (rectified-flow sigmas) alpha = 1 - sigma and sigma_t = sigma.
    """
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


# Copied from fastdiff.schedulers.scheduling_dpmsolver_multistep.log_snr
def log_snr(alpha_t, sigma_t):
    """lambda = log(alpha_t) - log(sigma_t), the half log-SNR that DPM-Solver steps in."""
    return torch.log(alpha_t) - torch.log(sigma_t)


class UniPCMultistepScheduler(SchedulerMixin):
    """UniPC multistep sampling: UniP-p predictor then UniC-p corrector, Zhao et al. 2023, Algorithms 1 to 3.

    Each step first corrects the sample it was handed with UniC (using the model output at that
    sample, for free), then predicts the next sample with UniP. Both are exponential-integrator
    updates in lambda = log(alpha / sigma) with coefficients rho solved from the order conditions
    R rho = b (eq. 9); ``solver_type`` picks B(h) = h (``bh1``) or e^h - 1 (``bh2``).
    ``predict_x0`` integrates the data prediction (UniPC with DPM-Solver++'s parametrisation).
    ``disable_corrector`` lists step indices whose corrector is skipped; ``solver_p`` replaces
    the predictor by another scheduler's step.

    Config keys and defaults are diffusers' ``UniPCMultistepScheduler``'s. ``use_beta_sigmas`` needs
    scipy (its beta quantile), as in diffusers. Not supported: ``use_dynamic_shifting``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _no_fused_step_reason = "no coefficient table is written for UniPC yet"

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list = [],
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
        if solver_type in ("midpoint", "heun", "logrho"):
            solver_type = "bh2"
            self.register_to_config(solver_type=solver_type)
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be 'bh1' or 'bh2', got {solver_type!r}")
        if prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise ValueError(
                "prediction_type must be 'epsilon', 'sample', 'v_prediction' or 'flow_prediction', "
                f"got {prediction_type!r}"
            )
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if use_beta_sigmas and importlib.util.find_spec("scipy") is None:
            raise ImportError("use_beta_sigmas=True needs scipy (pip install scipy), as in diffusers.")
        if use_dynamic_shifting:
            raise ValueError("use_dynamic_shifting=True is not supported by fastdiff's UniPCMultistepScheduler.")
        # As in diffusers, these three exclude each other; use_flow_sigmas combines with use_karras_sigmas
        # (set_timesteps takes the karras sigmas and maps them to flow sigmas).
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError("set at most one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas.")
        if use_flow_sigmas and (use_exponential_sigmas or use_beta_sigmas):
            # diffusers reads these (VP) sigmas as flow sigmas and samples NaN: refused (a deliberate difference).
            name = "use_exponential_sigmas" if use_exponential_sigmas else "use_beta_sigmas"
            raise ValueError(
                f"use_flow_sigmas=True cannot be combined with {name}=True: diffusers reads those sigmas as flow "
                "sigmas and samples NaN; choose one (use_karras_sigmas does combine with it)."
            )
        if shift_terminal is not None and not use_flow_sigmas:
            raise ValueError("shift_terminal is only supported with use_flow_sigmas=True.")
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
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.predict_x0 = predict_x0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(
            np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        )
        self.model_outputs = [None] * solver_order
        self.timestep_list = [None] * solver_order
        self.lower_order_nums = 0
        self.disable_corrector = disable_corrector
        self.solver_p = solver_p
        self.last_sample = None
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self):
        """Index of the current step in ``timesteps``; None before the first step."""
        return self._step_index

    @property
    def begin_index(self):
        """First step index, set by the pipeline (img2img) through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None):
        """Build the schedule for ``num_inference_steps`` (custom ``sigmas`` only with ``use_flow_sigmas``).

        ``mu`` (diffusers' dynamic shifting) is refused, as ``use_dynamic_shifting`` is.
        """
        config = self.config
        if mu is not None:
            raise ValueError("set_timesteps(mu=...) needs use_dynamic_shifting, which fastdiff does not support.")
        if sigmas is not None:
            if not config.use_flow_sigmas:
                raise ValueError("custom sigmas need use_flow_sigmas=True for UniPCMultistepScheduler.")
            num_inference_steps = len(sigmas)
        if num_inference_steps is None or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        n, total = num_inference_steps, config.num_train_timesteps
        if config.timestep_spacing == "linspace":
            timesteps = np.linspace(0, total - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif config.timestep_spacing == "leading":
            ratio = total // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += config.steps_offset
        elif config.timestep_spacing == "trailing":
            timesteps = np.arange(total, 0, -total / n).round().copy().astype(np.int64) - 1
        else:
            raise ValueError(
                f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {config.timestep_spacing!r}"
            )

        train_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        if config.use_karras_sigmas or config.use_exponential_sigmas or config.use_beta_sigmas:
            # Custom (flow) sigmas are the input sigmas here, as in diffusers.
            base = train_sigmas if sigmas is None else np.asarray(sigmas, dtype=np.float64)
            log_sigmas = np.log(base)
            flipped = np.flip(base).copy()
            lo = config.sigma_min if config.sigma_min is not None else flipped[-1].item()
            hi = config.sigma_max if config.sigma_max is not None else flipped[0].item()
            if config.use_karras_sigmas:
                sigmas = karras_sigmas(lo, hi, n)
            elif config.use_exponential_sigmas:
                sigmas = exponential_sigmas(lo, hi, n)
            else:
                sigmas = beta_sigmas(lo, hi, n)
            if config.use_karras_sigmas and config.use_flow_sigmas:
                sigmas = sigmas / (sigmas + 1)  # VE sigma to flow sigma, as diffusers maps karras sigmas
                timesteps = (sigmas * total).copy()
            else:
                timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
                if config.use_karras_sigmas:
                    timesteps = timesteps.round()
            sigma_last = sigmas[-1] if config.final_sigmas_type == "sigma_min" else 0
        elif config.use_flow_sigmas:
            if sigmas is None:
                sigmas = np.linspace(1, 1 / total, n + 1)[:-1]
            sigmas = np.asarray(sigmas, dtype=np.float64)
            sigmas = config.flow_shift * sigmas / (1 + (config.flow_shift - 1) * sigmas)
            if config.shift_terminal:
                one_minus = 1 - sigmas
                sigmas = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
            if np.fabs(sigmas[0] - 1) < 1e-6:
                sigmas[0] -= 1e-6
            timesteps = (sigmas * total).copy()
            sigma_last = sigmas[-1] if config.final_sigmas_type == "sigma_min" else 0
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
            if config.final_sigmas_type == "sigma_min":
                sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
            else:
                sigma_last = 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self.last_sample = None
        if self.solver_p:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)
        self._step_index = None
        self._begin_index = None

    def _alpha_sigma(self, index):
        return alpha_sigma_from_sigma(self.sigmas[index], self.config.use_flow_sigmas)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs):
        """Turn the model output into x0 (``predict_x0``) or eps, the quantity the solver integrates.

        ``sample`` is a keyword argument, as in diffusers, which also still takes its old positional form
        ``(model_output, timestep, sample)`` (the timestep is unused) with a FutureWarning.
        """
        if sample is None:
            if len(args) < 2:
                raise ValueError("convert_model_output() is missing `sample` as a required keyword argument")
            sample = args[1]
        if args or "timestep" in kwargs:
            warnings.warn(
                "Passing `timesteps` is deprecated and has no effect as model output conversion is now handled via "
                "an internal counter `self.step_index`",
                FutureWarning,
                stacklevel=2,
            )
        config = self.config
        kind = config.prediction_type
        alpha_t, sigma_t = self._alpha_sigma(self.step_index)
        if self.predict_x0:
            if kind == "epsilon":
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif kind == "sample":
                x0 = model_output
            elif kind == "v_prediction":
                x0 = alpha_t * sample - sigma_t * model_output
            else:  # flow_prediction
                x0 = sample - self.sigmas[self.step_index] * model_output
            if config.thresholding:
                x0 = threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
            return x0
        if kind == "epsilon":
            return model_output
        if kind == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        if kind == "v_prediction":
            return alpha_t * model_output + sigma_t * sample
        raise ValueError(f"prediction_type {kind!r} needs predict_x0=True")

    # All scalar coefficients below are 0-d float32 CPU tensors (``self.sigmas`` lives on the CPU):
    # they enter the device math as scalars, so a step copies nothing to or from the device.

    def _coefficients(self, h, order, rks):
        """R (powers of r_k), b (phi-function terms over B(h)), h_phi_1 and B(h) of Zhao et al. eq. 9."""
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        return torch.stack(R), torch.stack(b), h_phi_1, B_h

    def _history(self, order, lambda_s0, h, m0, first_back):
        """r_k = (lambda_{s_k} - lambda_{s_0}) / h and D1_k = (m_k - m_0) / r_k for the previous outputs."""
        rks, D1s = [], []
        for i in range(1, order):
            alpha_si, sigma_si = self._alpha_sigma(self.step_index - (i + first_back))
            rk = (log_snr(alpha_si, sigma_si) - lambda_s0) / h
            rks.append(rk)
            D1s.append((self.model_outputs[-(i + 1)] - m0) / rk)
        rks.append(torch.ones(()))
        return torch.stack(rks), D1s

    @staticmethod
    def _combine(rhos, D1s):
        """sum_k rhos[k] * D1s[k] (0 when there is no history)."""
        total = 0
        for rho, d in zip(rhos, D1s):
            total = total + rho * d
        return total

    def multistep_uni_p_bh_update(self, model_output, sample, order):
        """UniP-p predictor (Zhao et al. Algorithm 2 with B(h)): the next sample from the stored outputs."""
        m0 = self.model_outputs[-1]
        x = sample
        if self.solver_p:
            return self.solver_p.step(model_output, self.timestep_list[-1], x).prev_sample
        alpha_t, sigma_t = self._alpha_sigma(self.step_index + 1)
        alpha_s0, sigma_s0 = self._alpha_sigma(self.step_index)
        lambda_s0 = log_snr(alpha_s0, sigma_s0)
        h = log_snr(alpha_t, sigma_t) - lambda_s0
        rks, D1s = self._history(order, lambda_s0, h, m0, first_back=0)
        R, b, h_phi_1, B_h = self._coefficients(h, order, rks)
        if order == 2:
            rhos_p = torch.tensor([0.5])
        elif order > 2:
            rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            rhos_p = torch.zeros(0)
        pred_res = self._combine(rhos_p, D1s)
        if self.predict_x0:
            x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0 - alpha_t * B_h * pred_res
        else:
            x_t = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0 - sigma_t * B_h * pred_res
        return x_t.to(x.dtype)

    def multistep_uni_c_bh_update(self, this_model_output, last_sample, this_sample, order):
        """UniC-p corrector (Zhao et al. Algorithm 1): refine ``this_sample`` with the model output at it."""
        m0 = self.model_outputs[-1]
        x, model_t = last_sample, this_model_output
        alpha_t, sigma_t = self._alpha_sigma(self.step_index)
        alpha_s0, sigma_s0 = self._alpha_sigma(self.step_index - 1)
        lambda_s0 = log_snr(alpha_s0, sigma_s0)
        h = log_snr(alpha_t, sigma_t) - lambda_s0
        rks, D1s = self._history(order, lambda_s0, h, m0, first_back=1)
        R, b, h_phi_1, B_h = self._coefficients(h, order, rks)
        rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
        corr_res = self._combine(rhos_c[:-1], D1s)
        D1_t = model_t - m0
        if self.predict_x0:
            x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            x_t = x_t - alpha_t * B_h * (corr_res + rhos_c[-1] * D1_t)
        else:
            x_t = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
            x_t = x_t - sigma_t * B_h * (corr_res + rhos_c[-1] * D1_t)
        return x_t.to(x.dtype)

    # Copied from fastdiff.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler.index_for_timestep
    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of ``timestep`` in the schedule (the second match if it occurs twice, as diffusers).

        A timestep that is not in the schedule maps to the last step, as in diffusers.
        """
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            return len(self.timesteps) - 1
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
        """Correct the current sample (UniC), then predict the next one (UniP).

        Args:
            model_output (`torch.Tensor`): the model's prediction (per ``config.prediction_type``).
            timestep (`int` or 0-d tensor): one of ``self.timesteps``; as in diffusers, a first timestep
                that is not in it starts at the last step.
            sample (`torch.Tensor`): the current sample.
            return_dict (`bool`): return a :class:`SchedulerOutput` rather than a tuple.
            guidance_scale (`float` or one-element float32 tensor, *optional*): fastdiff extension; with it,
                ``model_output`` is the batched CFG output (2B, ...), uncond half first, and the guidance
                ``u + g * (c - u)`` is applied in PyTorch first. This scheduler has no fused step
                (``_no_fused_step_reason``), so forcing a ``scheduler_step`` backend raises.
        """
        if self.num_inference_steps is None:
            raise ValueError("step() called before set_timesteps(); call set_timesteps(num_inference_steps) first.")
        use_fused_step(self, sample, model_output, self._fused_reasons())  # False, or raises when forced
        model_output = apply_guidance(model_output, guidance_scale)
        if self.step_index is None:
            self._init_step_index(timestep)
        dtype = model_output.dtype
        sample = sample.to(torch.float32)
        model_output = model_output.to(torch.float32)
        use_corrector = (
            self.step_index > 0 and self.step_index - 1 not in self.disable_corrector and self.last_sample is not None
        )
        converted = self.convert_model_output(model_output, sample=sample)
        if use_corrector:
            sample = self.multistep_uni_c_bh_update(converted, self.last_sample, sample, self.this_order)
        self.model_outputs = self.model_outputs[1:] + [converted]
        self.timestep_list = self.timestep_list[1:] + [timestep]

        order = self.config.solver_order
        if self.config.lower_order_final:
            order = min(order, len(self.timesteps) - self.step_index)
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev_sample = self.multistep_uni_p_bh_update(model_output, sample, self.this_order)
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        prev_sample = prev_sample.to(dtype)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """UniPC needs no input scaling; returns ``sample``."""
        return sample

    # Copied from fastdiff.schedulers.scheduling_dpmsolver_multistep.DPMSolverMultistepScheduler.add_noise
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """alpha_t x_0 + sigma_t noise at ``timesteps`` (or the current/begin step if set)."""
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
        alpha_t, sigma_t = alpha_sigma_from_sigma(sigma, self.config.use_flow_sigmas)
        return alpha_t * original_samples + sigma_t * noise

    def __len__(self):
        return self.config.num_train_timesteps
