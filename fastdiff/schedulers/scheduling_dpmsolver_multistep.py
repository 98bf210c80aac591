"""DPM-Solver and DPM-Solver++ multistep samplers (Lu et al. 2022, arXiv:2206.00927 and arXiv:2211.01095)."""

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
    randn_tensor,
    register_to_config,
    use_fused_step,
)

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


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


def alpha_sigma_from_sigma(sigma, flow=False):
    """(alpha_t, sigma_t) of the VP process for a VE sigma: alpha = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha.

    With ``flow`` (rectified-flow sigmas) alpha = 1 - sigma and sigma_t = sigma.
    """
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def log_snr(alpha_t, sigma_t):
    """lambda = log(alpha_t) - log(sigma_t), the half log-SNR that DPM-Solver steps in."""
    return torch.log(alpha_t) - torch.log(sigma_t)


def dpmpp_multistep_coeffs(
    sigmas,
    *,
    prediction_type: str,
    solver_order: int,
    solver_type: str,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas_type: str,
    begin_index: int = 0,
) -> torch.Tensor:
    """DPM-Solver++ orders 1 to 3 (``algorithm_type="dpmsolver++"``) as a fused-step coefficient table.

    Row i holds the columns (a, e, s, p, q, h1, h2, h3) of :func:`fastdiff.ops.scheduler_step`:
    ``d = p x + q m`` is the x0 prediction (the solver's converted output), kept in a history ring of
    R = max(1, solver_order - 1) slots, and x_prev = a x + e m + h1 d_{i-1} + h2 d_{i-2}. With
    m0 = d_i, r0 = h_0 / h and r1 = h_1 / h (lambda differences, Lu et al. 2022b) the updates of
    :meth:`DPMSolverMultistepScheduler.step` expand to:

    * order 1: x_prev = (sigma_t / sigma_s) x - phi m0, phi = alpha_t (e^{-h} - 1);
    * order 2: D1 = (m0 - m1) / r0, midpoint adds -phi / 2 D1, heun adds psi D1 with
      psi = alpha_t ((e^{-h} - 1) / h + 1);
    * order 3: D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
      D2 = (D1_0 - D1_1) / (r0 + r1), adding psi D1 - alpha_t ((e^{-h} - 1 + h) / h^2 - 1/2) D2.

    The order of step i follows diffusers: first order on the first step taken (``begin_index``),
    second order while fewer than two earlier outputs exist, and lowered on the final steps by
    ``lower_order_final`` / ``euler_at_final`` / ``final_sigmas_type="zero"``. Computed in float64
    from the scheduler's float32 sigmas, rounded once to float32.
    """
    sig = sigmas.double() if isinstance(sigmas, torch.Tensor) else torch.tensor(sigmas, dtype=torch.float64)
    n = len(sig) - 1
    alpha = (1 / torch.sqrt(sig**2 + 1)).tolist()
    sigma = (sig / torch.sqrt(sig**2 + 1)).tolist()
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    table = torch.zeros(n, 8, dtype=torch.float64)
    for i in range(begin_index, n):
        taken = i - begin_index  # diffusers' lower_order_nums before this step (capped below)
        lower_final = i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or final_sigmas_type == "zero")
        lower_second = i == n - 2 and lower_order_final and n < 15
        if solver_order == 1 or taken < 1 or lower_final:
            order = 1
        elif solver_order == 2 or taken < 2 or lower_second:
            order = 2
        else:
            order = 3
        a_s, s_s, a_t, s_t = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        if prediction_type == "epsilon":
            px, pm = 1 / a_s, -s_s / a_s
        elif prediction_type == "sample":
            px, pm = 0.0, 1.0
        else:  # v_prediction
            px, pm = a_s, -s_s
        h = lam[i + 1] - lam[i]
        em1 = math.expm1(-h)  # e^{-h} - 1; -1 onto a final sigma of 0 (h = inf)
        phi = a_t * em1
        c = [-phi, 0.0, 0.0]  # weights of m0, m1 (= hist[-1]), m2 (= hist[-2])
        for j in range(i - order + 1, i):
            if lam[j + 1] == lam[j]:
                raise ValueError(
                    f"sigmas[{j}] == sigmas[{j + 1}] (a repeated timestep): the order-{order} update of step {i} "
                    "divides by their log-SNR difference, which is zero"
                )
        if h == 0:
            pass  # a repeated sigma (karras sigmas ending on sigma_min): x_prev = x, where diffusers gets 0/0
        elif order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            if solver_type == "midpoint":
                c = [-phi - 0.5 * phi / r0, 0.5 * phi / r0, 0.0]
            else:
                psi = a_t * (em1 / h + 1.0)
                c = [-phi + psi / r0, -psi / r0, 0.0]
        elif order == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            psi = a_t * (em1 / h + 1.0)
            chi = -a_t * ((em1 + h) / h**2 - 0.5)
            k = 1 / (r0 + r1)
            u = psi * (1 + r0 * k) + chi * k  # weight of D1_0
            v = -psi * r0 * k - chi * k  # weight of D1_1
            c = [-phi + u / r0, -u / r0 + v / r1, -v / r1]
        table[i] = torch.tensor([s_t / s_s + c[0] * px, c[0] * pm, 0.0, px, pm, c[1], c[2], 0.0], dtype=torch.float64)
    return table.to(torch.float32)


class DPMSolverMultistepScheduler(SchedulerMixin):
    """Multistep DPM-Solver++ (Lu et al. 2022b, Algorithm 2) and its relatives.

    DPM-Solver++ integrates the data-prediction ODE in lambda = log(alpha_t / sigma_t):
    order 1 is x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) x0_s (the DDIM step); orders 2
    and 3 add finite differences D1, D2 of past x0 predictions (eq. 8 and the third-order
    multistep of Lu et al. 2022a, Algorithm 3/4, ``solver_type`` midpoint or heun).
    ``algorithm_type``:

    * ``dpmsolver++`` (default): the deterministic solver above;
    * ``sde-dpmsolver++``: its SDE variant (Lu et al. 2022b, sec. 5.1), x_t = (sigma_t / sigma_s)
      e^{-h} x_s + alpha_t (1 - e^{-2h}) x0_s + ... + sigma_t sqrt(1 - e^{-2h}) z; the noise z
      comes from ``generator`` (or ``variance_noise``) and is scaled by an attached temperature
      scheduler;
    * ``dpmsolver`` / ``sde-dpmsolver``: the noise-prediction forms of Lu et al. 2022a.

    The order ramps up from 1 over the first steps; ``lower_order_final`` drops it again on the
    last steps of short (< 15 step) schedules, which stabilises few-step sampling.

    Config keys and defaults are diffusers' ``DPMSolverMultistepScheduler``'s. ``use_beta_sigmas``
    needs scipy (its beta quantile), as in diffusers. Not supported: ``use_dynamic_shifting``.

    Fused step (fastdiff extension): ``dpmsolver++`` without thresholding, flow sigmas or learned
    variances is linear in the sample, the model output and the last one or two x0 predictions
    (:func:`dpmpp_multistep_coeffs`), so ``step`` runs as one launch of
    :func:`fastdiff.ops.scheduler_step` that also folds in classifier-free guidance
    (``step(..., guidance_scale=g)`` with the batched CFG output) and keeps the x0 predictions in a
    device history ring. It runs on CUDA tensors, or wherever the ``scheduler_step`` backend is forced,
    and reads a device copy of the step index that the launch itself advances.
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
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        if solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
        if algorithm_type == "deis":
            algorithm_type = "dpmsolver++"
            self.register_to_config(algorithm_type=algorithm_type)
        if algorithm_type not in ALGORITHMS:
            raise ValueError(f"algorithm_type must be one of {list(ALGORITHMS)}, got {algorithm_type!r}")
        if solver_type in ("logrho", "bh1", "bh2"):
            solver_type = "midpoint"
            self.register_to_config(solver_type=solver_type)
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        if algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError("algorithm_type='sde-dpmsolver' supports solver_order 1 or 2, got 3")
        if algorithm_type in ("dpmsolver", "sde-dpmsolver") and final_sigmas_type == "zero":
            raise ValueError(
                f"final_sigmas_type='zero' needs a dpmsolver++ algorithm; use 'sigma_min' with {algorithm_type!r}"
            )
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise ValueError(
                "prediction_type must be 'epsilon', 'sample', 'v_prediction' or 'flow_prediction', "
                f"got {prediction_type!r}"
            )
        if use_beta_sigmas and importlib.util.find_spec("scipy") is None:
            raise ImportError("use_beta_sigmas=True needs scipy (pip install scipy), as in diffusers.")
        if use_dynamic_shifting:
            raise ValueError("use_dynamic_shifting=True is not supported by fastdiff's DPMSolverMultistepScheduler.")
        # As in diffusers, these three exclude each other; with use_lu_lambdas as well, set_timesteps takes
        # the first of karras, lu lambdas, exponential, beta.
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError("set at most one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas.")
        # diffusers takes those sigmas and then reads them as flow sigmas (alpha = 1 - sigma with sigma up to
        # ~157): every sample is NaN. fastdiff refuses the combination instead (a deliberate difference).
        other = [k for k, v in [("use_karras_sigmas", use_karras_sigmas), ("use_lu_lambdas", use_lu_lambdas),
                                ("use_exponential_sigmas", use_exponential_sigmas),
                                ("use_beta_sigmas", use_beta_sigmas)] if v]  # fmt: skip
        if use_flow_sigmas and other:
            raise ValueError(
                f"use_flow_sigmas=True cannot be combined with {other[0]}=True: diffusers reads those (VP) sigmas as "
                "flow sigmas and samples NaN; choose one."
            )
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
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(
            np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        )
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
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
        self._restart_fused()

    def _fused_reasons(self):
        config, reasons = self.config, []
        if config.algorithm_type != "dpmsolver++":
            reasons.append(f"algorithm_type {config.algorithm_type!r} (only 'dpmsolver++' is linear and noise-free)")
        if config.thresholding:
            reasons.append("thresholding is not linear")
        if config.use_flow_sigmas or config.prediction_type == "flow_prediction":
            reasons.append("flow sigmas / flow_prediction have no fused table")
        if config.variance_type in ("learned", "learned_range"):
            reasons.append(f"variance_type {config.variance_type!r} splits the model output")
        return reasons

    def _fused_table(self, begin_index=0):
        c = self.config
        table = dpmpp_multistep_coeffs(
            self.sigmas, prediction_type=c.prediction_type, solver_order=c.solver_order, solver_type=c.solver_type,
            lower_order_final=c.lower_order_final, euler_at_final=c.euler_at_final,
            final_sigmas_type=c.final_sigmas_type, begin_index=begin_index,
        )  # fmt: skip
        slots = 0 if c.solver_order == 1 else c.solver_order - 1
        return table, [False] * len(self.timesteps), slots

    def set_timesteps(self, num_inference_steps=None, device=None, mu=None, timesteps=None):
        """Build the schedule from ``num_inference_steps`` or custom descending integer ``timesteps``.

        ``mu`` (diffusers' dynamic shifting) is refused, as ``use_dynamic_shifting`` is.
        """
        config = self.config
        if mu is not None:
            raise ValueError("set_timesteps(mu=...) needs use_dynamic_shifting, which fastdiff does not support.")
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps to set_timesteps().")
        if timesteps is not None and (
            config.use_karras_sigmas or config.use_lu_lambdas or config.use_exponential_sigmas or config.use_beta_sigmas
        ):
            raise ValueError(
                "custom timesteps cannot be combined with use_karras_sigmas/use_lu_lambdas/use_exponential_sigmas/"
                "use_beta_sigmas."
            )
        if num_inference_steps is not None and num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        total = config.num_train_timesteps
        if timesteps is not None:
            timesteps = np.array(timesteps).astype(np.int64)
        else:
            n = num_inference_steps
            clipped_idx = torch.searchsorted(torch.flip(self.lambda_t, [0]), config.lambda_min_clipped)
            last = (total - clipped_idx).numpy().item()
            if config.timestep_spacing == "linspace":
                timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
            elif config.timestep_spacing == "leading":
                ratio = last // (n + 1)
                timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
                timesteps += config.steps_offset
            elif config.timestep_spacing == "trailing":
                timesteps = np.arange(last, 0, -total / n).round().copy().astype(np.int64) - 1
            else:
                raise ValueError(
                    f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {config.timestep_spacing!r}"
                )

        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()
        log_sigmas = np.log(sigmas)
        n = num_inference_steps
        keep_fractional = config.beta_schedule == "squaredcos_cap_v2"
        if config.use_karras_sigmas or (config.use_exponential_sigmas and not config.use_lu_lambdas) or (
            config.use_beta_sigmas and not config.use_lu_lambdas
        ):
            # diffusers' order of precedence: karras, lu lambdas, exponential, beta, flow
            sigmas = np.flip(sigmas).copy()
            lo = config.get("sigma_min")  # keys of other schedulers' configs, read as diffusers reads them
            hi = config.get("sigma_max")
            lo = lo if lo is not None else sigmas[-1].item()
            hi = hi if hi is not None else sigmas[0].item()
            if config.use_karras_sigmas:
                sigmas = karras_sigmas(lo, hi, n)
            elif config.use_exponential_sigmas:
                sigmas = exponential_sigmas(lo, hi, n)
            else:
                sigmas = beta_sigmas(lo, hi, n)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if config.use_karras_sigmas and not keep_fractional:
                timesteps = timesteps.round()
        elif config.use_lu_lambdas:
            # Lu et al. 2022b, sec. 6: steps uniform in lambda (here log-sigma, as diffusers).
            lambdas = np.flip(log_sigmas.copy())
            lam_min, lam_max = lambdas[-1].item(), lambdas[0].item()
            lambdas = lam_max + np.linspace(0, 1, n) * (lam_min - lam_max)
            sigmas = np.exp(lambdas)
            timesteps = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if not keep_fractional:
                timesteps = timesteps.round()
        elif config.use_flow_sigmas:
            alphas = np.linspace(1, 1 / total, n + 1)
            s = 1.0 - alphas
            sigmas = np.flip(config.flow_shift * s / (1 + (config.flow_shift - 1) * s))[:-1].copy()
            timesteps = (sigmas * total).copy()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)

        if config.final_sigmas_type == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [sigma_last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._reset_fused(begin_index=0)

    def _alpha_sigma(self, index):
        return alpha_sigma_from_sigma(self.sigmas[index], self.config.use_flow_sigmas)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs):
        """Turn the model output into what the solver integrates: x0 for the ++ variants, eps otherwise.

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
        if config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"):
            if kind == "epsilon":
                if config.variance_type in ("learned", "learned_range"):
                    model_output = model_output[:, :3]
                alpha_t, sigma_t = self._alpha_sigma(self.step_index)
                x0 = (sample - sigma_t * model_output) / alpha_t
            elif kind == "sample":
                x0 = model_output
            elif kind == "v_prediction":
                alpha_t, sigma_t = self._alpha_sigma(self.step_index)
                x0 = alpha_t * sample - sigma_t * model_output
            else:  # flow_prediction
                x0 = sample - self.sigmas[self.step_index] * model_output
            if config.thresholding:
                x0 = threshold_sample(x0, config.dynamic_thresholding_ratio, config.sample_max_value)
            return x0
        if kind == "epsilon":
            eps = model_output[:, :3] if config.variance_type in ("learned", "learned_range") else model_output
        elif kind == "sample":
            alpha_t, sigma_t = self._alpha_sigma(self.step_index)
            eps = (sample - alpha_t * model_output) / sigma_t
        elif kind == "v_prediction":
            alpha_t, sigma_t = self._alpha_sigma(self.step_index)
            eps = alpha_t * model_output + sigma_t * sample
        else:
            raise ValueError(f"prediction_type {kind!r} needs a dpmsolver++ algorithm_type")
        if config.thresholding:
            alpha_t, sigma_t = self._alpha_sigma(self.step_index)
            x0 = threshold_sample(
                (sample - sigma_t * eps) / alpha_t, config.dynamic_thresholding_ratio, config.sample_max_value
            )
            eps = (sample - alpha_t * x0) / sigma_t
        return eps

    def dpm_solver_first_order_update(self, model_output, sample, noise=None):
        """One first-order step (DDIM in lambda), from sigmas[i] to sigmas[i+1]."""
        i = self.step_index
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        alpha_s, sigma_s = self._alpha_sigma(i)
        h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s, sigma_s)
        algo = self.config.algorithm_type
        if algo == "dpmsolver++":
            return sigma_t / sigma_s * sample - alpha_t * (torch.exp(-h) - 1.0) * model_output
        if algo == "dpmsolver":
            return alpha_t / alpha_s * sample - sigma_t * (torch.exp(h) - 1.0) * model_output
        if algo == "sde-dpmsolver++":
            return (
                sigma_t / sigma_s * torch.exp(-h) * sample
                + alpha_t * (1 - torch.exp(-2.0 * h)) * model_output
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
            )
        return (  # sde-dpmsolver
            alpha_t / alpha_s * sample
            - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * model_output
            + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
        )

    def multistep_dpm_solver_second_order_update(self, model_output_list, sample, noise=None):
        """Second-order multistep step using the last two converted outputs (Lu et al. 2022b, eq. 8)."""
        i = self.step_index
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        alpha_s0, sigma_s0 = self._alpha_sigma(i)
        alpha_s1, sigma_s1 = self._alpha_sigma(i - 1)
        lambda_t, lambda_s0 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0)
        lambda_s1 = log_snr(alpha_s1, sigma_s1)
        m0, m1 = model_output_list[-1], model_output_list[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        D0, D1 = m0, 1.0 / r0 * (m0 - m1)
        algo, midpoint = self.config.algorithm_type, self.config.solver_type == "midpoint"
        if algo == "dpmsolver++":
            x = sigma_t / sigma_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * D0
            if midpoint:
                return x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            return x + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1
        if algo == "dpmsolver":
            x = alpha_t / alpha_s0 * sample - sigma_t * (torch.exp(h) - 1.0) * D0
            if midpoint:
                return x - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1
            return x - sigma_t * ((torch.exp(h) - 1.0) / h - 1.0) * D1
        if algo == "sde-dpmsolver++":
            x = sigma_t / sigma_s0 * torch.exp(-h) * sample + alpha_t * (1 - torch.exp(-2.0 * h)) * D0
            if midpoint:
                x = x + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
            else:
                x = x + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * D1
            return x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        x = alpha_t / alpha_s0 * sample - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0  # sde-dpmsolver
        if midpoint:
            x = x - sigma_t * (torch.exp(h) - 1.0) * D1
        else:
            x = x - 2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
        return x + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise

    def multistep_dpm_solver_third_order_update(self, model_output_list, sample, noise=None):
        """Third-order multistep step using the last three converted outputs (Lu et al. 2022a, Algorithm 4)."""
        i = self.step_index
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        alpha_s0, sigma_s0 = self._alpha_sigma(i)
        alpha_s1, sigma_s1 = self._alpha_sigma(i - 1)
        alpha_s2, sigma_s2 = self._alpha_sigma(i - 2)
        lambda_t, lambda_s0 = log_snr(alpha_t, sigma_t), log_snr(alpha_s0, sigma_s0)
        lambda_s1, lambda_s2 = log_snr(alpha_s1, sigma_s1), log_snr(alpha_s2, sigma_s2)
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        D0 = m0
        D1_0, D1_1 = 1.0 / r0 * (m0 - m1), 1.0 / r1 * (m1 - m2)
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = 1.0 / (r0 + r1) * (D1_0 - D1_1)
        algo = self.config.algorithm_type
        if algo == "dpmsolver++":
            return (
                sigma_t / sigma_s0 * sample
                - alpha_t * (torch.exp(-h) - 1.0) * D0
                + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * D1
                - alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5) * D2
            )
        if algo == "dpmsolver":
            return (
                alpha_t / alpha_s0 * sample
                - sigma_t * (torch.exp(h) - 1.0) * D0
                - sigma_t * ((torch.exp(h) - 1.0) / h - 1.0) * D1
                - sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5) * D2
            )
        return (  # sde-dpmsolver++
            sigma_t / sigma_s0 * torch.exp(-h) * sample
            + alpha_t * (1.0 - torch.exp(-2.0 * h)) * D0
            + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * D1
            + alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5) * D2
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )

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
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        variance_noise=None,
        return_dict: bool = True,
        guidance_scale=None,
    ):
        """One multistep update from the current timestep to the next.

        Args:
            model_output (`torch.Tensor`): the model's prediction (per ``config.prediction_type``).
            timestep (`int` or 0-d tensor): one of ``self.timesteps``; as in diffusers, a first timestep
                that is not in it starts at the last step.
            sample (`torch.Tensor`): the current sample.
            generator (`torch.Generator`, *optional*): noise source for the SDE variants.
            variance_noise (`torch.Tensor`, *optional*): the SDE noise itself, instead of ``generator``.
            return_dict (`bool`): return a :class:`SchedulerOutput` rather than a tuple.
            guidance_scale (`float` or one-element float32 tensor, *optional*): fastdiff extension; with it,
                ``model_output`` is the batched CFG output (2B, ...), uncond half first, and the guidance
                ``u + g * (c - u)`` is applied (inside the fused launch when the fused step runs).
        """
        if self.num_inference_steps is None:
            raise ValueError("step() called before set_timesteps(); call set_timesteps(num_inference_steps) first.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if use_fused_step(self, sample, model_output, self._fused_reasons()):
            state = self._fused
            if state.step_index is None:  # the order ramps up from the first step taken
                state = self._fused_state((("begin_index", self.step_index),))
            prev_sample = state.run(self, model_output, sample, guidance_scale, self.step_index)
            self._step_index += 1
            if not return_dict:
                return (prev_sample,)
            return SchedulerOutput(prev_sample=prev_sample)
        model_output = apply_guidance(model_output, guidance_scale)
        config = self.config
        n = len(self.timesteps)
        final = self.step_index == n - 1
        lower_order_final = final and (
            config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
        )
        lower_order_second = self.step_index == n - 2 and config.lower_order_final and n < 15

        dtype = model_output.dtype
        sample = sample.to(torch.float32)
        model_output = self.convert_model_output(model_output.to(torch.float32), sample=sample)
        self.model_outputs = self.model_outputs[1:] + [model_output]

        noise = None
        if config.algorithm_type in ("sde-dpmsolver", "sde-dpmsolver++"):
            if variance_noise is None:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32
                )
            else:
                noise = variance_noise.to(device=model_output.device, dtype=torch.float32)
            noise = self._scale_step_noise(noise, self.step_index)

        if config.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self.dpm_solver_first_order_update(model_output, sample, noise)
        elif config.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
            prev_sample = self.multistep_dpm_solver_second_order_update(self.model_outputs, sample, noise)
        else:
            prev_sample = self.multistep_dpm_solver_third_order_update(self.model_outputs, sample, noise)
        if self.lower_order_nums < config.solver_order:
            self.lower_order_nums += 1
        prev_sample = prev_sample.to(dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """DPM-Solver needs no input scaling; returns ``sample``."""
        return sample

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
