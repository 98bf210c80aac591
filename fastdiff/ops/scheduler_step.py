"""The fused scheduler step, with classifier-free guidance folded in: the op, its reference twin, its backends.

Public entry point: :func:`scheduler_step`. Inference only: no backend defines a
gradient (the op is never part of a training graph).

The update form
===============

Most schedulers' ``step`` is linear in the sample, the model output, an optional
noise draw and, for multistep solvers, a few earlier "converted" model outputs
(x0 predictions or derivatives). Per element, with the coefficients of the
current step read from a device table::

    m      = u + g * (c - u)                    # CFG: u, c = uncond and cond halves of model_output
                                                # (m = model_output without guidance)
    d      = p*x + q*m                          # the converted output (x0 prediction, derivative, ...)
    x_prev = a*x + e*m + s*noise + h1*hist[-1] + h2*hist[-2] + h3*hist[-3]
    hist[0] <- d                                # when a history ring is given

``x_prev`` is written directly in terms of ``x`` and ``m``: a scheduler that
writes ``x_prev = A*x + B*d + E*m`` folds ``B*d`` in as ``a = A + B*p`` and
``e = E + B*q``. The table builders below do this in float64.

``coeffs`` is a (num_steps, 8) float32 table whose columns are
:data:`COEFF_COLUMNS` = ``(a, e, s, p, q, h1, h2, h3)``. The builders
(:func:`ddim_coeffs`, :func:`euler_coeffs`, :func:`euler_ancestral_coeffs`,
:func:`ddpm_coeffs`, :func:`dpmpp_2m_coeffs`) make it from a scheduler's
alphas/sigmas at ``set_timesteps`` time, on the host, once.

Step index, and who advances it
===============================

``step_index`` is a one-element int64 device tensor. The kernels load it on the
device and use row ``coeffs[step_index]``; nothing reads it on the host. With
``advance_step_index=True`` the op itself advances it by one after the update,
in the same launch: each Triton program / CUDA block counts its arrival with one
atomic add in the high 32 bits of the index word (the low 32 bits hold the
index), and the last one to arrive adds 1 to the index and clears the count.
Between launches the word therefore holds exactly the index. Without
``advance_step_index`` the caller owns the index (``step_index.add_(1)`` is one
more launch). A captured CUDA graph of one step replays correctly with
``advance_step_index=True``; reset with ``step_index.zero_()`` before a new loop.

An index outside ``[0, num_steps)`` cannot be reported without a host sync: the
Triton and CUDA kernels then write NaN everywhere (and touch no memory out of
bounds); the reference raises on the CPU, or trips a device assert on CUDA.

History ring (multistep solvers)
================================

``history`` is a (R, *sample.shape) ring buffer, 1 <= R <= :data:`MAX_HISTORY`
(3: enough for DPM-Solver++ 3M, PLMS and 4th-order LMS, which need up to three
earlier values). At step ``i`` the op reads ``hist[-j]`` from slot
``(i - j) mod R`` for j = 1..R, then writes ``d`` into slot ``i mod R`` (read
before write, element by element, so the slot of ``hist[-R]`` can be reused).
Allocate it with zeros (or any finite values): the first steps multiply unused
slots by a zero coefficient. Because the slots follow the device index, a
captured graph replays with fixed pointers.

Noise
=====

``noise`` is either sample-shaped (drawn by the caller for this step) or a
per-step bank of shape (num_steps, *sample.shape) from which the op reads
``noise[step_index]``. A pipeline can pre-draw the bank with the same generator
calls diffusers makes, in the same order, so a captured loop gives the numbers
eager diffusers gives.

Outside the fused form
======================

Non-linear options (``clip_sample``, ``thresholding``, ``guidance_rescale``,
learned variances, SDE noise that depends on the output) are not linear in
(x, m, noise, history), so they have no table. A scheduler with such an option
runs its own plain PyTorch ``step`` instead; the table builders refuse options
they cannot express with a ValueError.

Backends, in ``auto`` order
===========================

======================  =====================================================
CUDA tensors            ``triton``, then ``cuda``, then ``reference``
CPU tensors             ``reference`` (``triton`` only when forced, under
                        TRITON_INTERPRET=1)
======================  =====================================================

Triton goes first on CUDA because it takes any strides (the CUDA kernel needs
every tensor dense in the sample's layout) and is tested on every CI run under
the interpreter; benchmarks/bench_scheduler_step.py may promote ``cuda``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from fastdiff import backends

OP_NAME = "scheduler_step"
COEFF_COLUMNS = ("a", "e", "s", "p", "q", "h1", "h2", "h3")
NUM_COEFFS = len(COEFF_COLUMNS)
MAX_HISTORY = 3
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = FUSED_DTYPES + (torch.float64,)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

GuidanceScale = Union[None, float, torch.Tensor]


# ---------------------------------------------------------------------------
# Reference twin (plain PyTorch): the oracle and the CPU path.
# ---------------------------------------------------------------------------


def scheduler_step_ref(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    step_index: torch.Tensor,
    guidance_scale: GuidanceScale = None,
    noise: Optional[torch.Tensor] = None,
    history: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    advance_step_index: bool = False,
) -> torch.Tensor:
    """The fused step in plain PyTorch, computed in float32 (float64 for a float64
    sample) and cast back to the sample's dtype. Same arguments and effects as
    :func:`scheduler_step`, without validation. Never reads a device value on the
    host: the coefficient row, noise slice and history slots are gathered with
    ``index_select`` on the device index."""
    compute = torch.float64 if sample.dtype == torch.float64 else torch.float32
    index = step_index.reshape(1)
    a, e, s, p, q, *h = coeffs.index_select(0, index).reshape(NUM_COEFFS).to(compute).unbind()
    x = sample.to(compute)
    if guidance_scale is None:
        m = model_output.to(compute)
    else:
        uncond, cond = model_output.to(compute).chunk(2)
        g = guidance_scale.to(compute) if isinstance(guidance_scale, torch.Tensor) else guidance_scale
        m = uncond + g * (cond - uncond)
    prev = a * x + e * m
    if noise is not None:
        if noise.dim() == sample.dim() + 1:
            noise = noise.index_select(0, index).squeeze(0)
        prev = prev + s * noise.to(compute)
    if history is not None:
        slots = history.shape[0]
        for lag in range(1, slots + 1):
            slot = torch.remainder(index - lag, slots)
            prev = prev + h[lag - 1] * history.index_select(0, slot).squeeze(0).to(compute)
        d = p * x + q * m
        history.index_copy_(0, torch.remainder(index, slots), d.to(history.dtype).unsqueeze(0))
    if out is None:
        out = torch.empty_like(sample)
    out.copy_(prev)
    if advance_step_index:
        step_index.add_(1)
    return out


# ---------------------------------------------------------------------------
# Coefficient tables for common schedulers (host side, float64, once per set_timesteps).
# ---------------------------------------------------------------------------


def _as_f64(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty")
    return t


def _check_prediction_type(prediction_type: str, allowed: Sequence[str] = PREDICTION_TYPES) -> None:
    if prediction_type not in allowed:
        raise ValueError(f"prediction_type must be one of {tuple(allowed)}, got {prediction_type!r}")


def _table(rows: List[Dict[str, float]], device) -> torch.Tensor:
    """Rows of {column: value} (missing columns are 0) -> (num_steps, 8) float32 on ``device``."""
    table = torch.zeros(len(rows), NUM_COEFFS, dtype=torch.float64)
    for i, row in enumerate(rows):
        for name, value in row.items():
            table[i, COEFF_COLUMNS.index(name)] = float(value)
    return table.to(dtype=torch.float32, device=device)


def ddim_coeffs(
    alphas_cumprod,
    timesteps,
    *,
    final_alpha_cumprod: float = 1.0,
    num_train_timesteps: Optional[int] = None,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    device=None,
) -> torch.Tensor:
    """DDIM (Song et al. 2020, eq. 12) as a coefficient table, matching diffusers' DDIMScheduler.step.

    prev_t = t - num_train_timesteps // num_inference_steps; with x0 and eps the
    prediction-type conversions of (x, m), sigma = eta * sqrt(variance(t, prev_t)):
    x_prev = sqrt(alpha_prev) * x0 + sqrt(1 - alpha_prev - sigma^2) * eps + sigma * noise.
    ``d`` is x0. ``eta > 0`` needs one noise draw per step (diffusers draws it with
    ``randn_tensor(model_output.shape, generator, dtype=model_output.dtype)``).
    Not expressible: clip_sample, thresholding.
    """
    _check_prediction_type(prediction_type)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    ac = _as_f64(alphas_cumprod, "alphas_cumprod")
    ts = _as_f64(timesteps, "timesteps").long()
    n_train = len(ac) if num_train_timesteps is None else int(num_train_timesteps)
    ratio = n_train // len(ts)
    rows = []
    for t in ts.tolist():
        prev_t = t - ratio
        alpha = ac[t].item()
        alpha_prev = ac[prev_t].item() if prev_t >= 0 else float(final_alpha_cumprod)
        beta, beta_prev = 1 - alpha, 1 - alpha_prev
        variance = (beta_prev / beta) * (1 - alpha / alpha_prev)
        sigma = eta * math.sqrt(variance)
        direction = math.sqrt(max(1 - alpha_prev - sigma**2, 0.0))  # exactly 0 at eta = 1, alpha_t = 0
        # x0 = px*x + pm*m and eps = ex*x + em*m for each prediction type.
        if prediction_type == "epsilon":
            px, pm, ex, em = 1 / math.sqrt(alpha), -math.sqrt(beta) / math.sqrt(alpha), 0.0, 1.0
        elif prediction_type == "sample":
            px, pm, ex, em = 0.0, 1.0, 1 / math.sqrt(beta), -math.sqrt(alpha) / math.sqrt(beta)
        else:
            px, pm, ex, em = math.sqrt(alpha), -math.sqrt(beta), math.sqrt(beta), math.sqrt(alpha)
        root_prev = math.sqrt(alpha_prev)
        rows.append({"a": root_prev * px + direction * ex, "e": root_prev * pm + direction * em, "s": sigma, "p": px, "q": pm})
    return _table(rows, device)


def _karras_x0(prediction_type: str, sigma: float, sigma_hat: float):
    """x0 = px*x + pm*m for the k-diffusion (Karras) parametrisation used by the Euler schedulers."""
    if prediction_type == "epsilon":
        return 1.0, -sigma_hat
    if prediction_type == "v_prediction":
        return 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
    return 0.0, 1.0


def euler_coeffs(
    sigmas,
    *,
    prediction_type: str = "epsilon",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    device=None,
) -> torch.Tensor:
    """Euler (Karras et al. 2022, Alg. 2) as a coefficient table, matching diffusers' EulerDiscreteScheduler.step.

    ``sigmas`` has num_steps + 1 entries (the scheduler's ``sigmas``, final one
    included). gamma = min(s_churn / num_steps, sqrt(2) - 1) when s_tmin <= sigma
    <= s_tmax; x_hat = x + s_noise * sqrt(sigma_hat^2 - sigma^2) * noise;
    x_prev = x_hat + (x_hat - x0) / sigma_hat * (sigma_next - sigma_hat).
    diffusers draws noise only at steps with gamma > 0 (the ``s`` column is then
    non-zero). ``d`` is x0 without the churn noise.
    """
    _check_prediction_type(prediction_type)
    sig = _as_f64(sigmas, "sigmas")
    num_steps = len(sig) - 1
    if num_steps < 1:
        raise ValueError(f"sigmas must have num_steps + 1 >= 2 entries, got {len(sig)}")
    rows = []
    for i in range(num_steps):
        sigma, sigma_next = sig[i].item(), sig[i + 1].item()
        gamma = min(s_churn / num_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        churn = s_noise * math.sqrt(sigma_hat**2 - sigma**2) if gamma > 0 else 0.0
        px, pm = _karras_x0(prediction_type, sigma, sigma_hat)
        k = (sigma_next - sigma_hat) / sigma_hat
        x_hat_coeff = 1 + k * (1 - px)
        rows.append({"a": x_hat_coeff, "e": -k * pm, "s": x_hat_coeff * churn, "p": px, "q": pm})
    return _table(rows, device)


def euler_ancestral_coeffs(sigmas, *, prediction_type: str = "epsilon", device=None) -> torch.Tensor:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``) as a coefficient table,
    matching diffusers' EulerAncestralDiscreteScheduler.step.

    sigma_up = sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2),
    sigma_down = sqrt(sigma_to^2 - sigma_up^2);
    x_prev = x + (x - x0) / sigma * (sigma_down - sigma) + sigma_up * noise.
    diffusers draws one noise tensor at every step (the last one included, where
    sigma_up is 0). ``d`` is x0. diffusers has no "sample" prediction here.
    """
    _check_prediction_type(prediction_type, ("epsilon", "v_prediction"))
    sig = _as_f64(sigmas, "sigmas")
    if len(sig) < 2:
        raise ValueError(f"sigmas must have num_steps + 1 >= 2 entries, got {len(sig)}")
    rows = []
    for i in range(len(sig) - 1):
        sigma, sigma_to = sig[i].item(), sig[i + 1].item()
        sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        sigma_down = math.sqrt(max(sigma_to**2 - sigma_up**2, 0.0))
        px, pm = _karras_x0(prediction_type, sigma, sigma)
        k = (sigma_down - sigma) / sigma
        rows.append({"a": 1 + k * (1 - px), "e": -k * pm, "s": sigma_up, "p": px, "q": pm})
    return _table(rows, device)


DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def ddpm_coeffs(
    alphas_cumprod,
    timesteps,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    device=None,
) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 7) as a coefficient table,
    matching diffusers' DDPMScheduler.step after set_timesteps.

    prev_t is the next entry of ``timesteps`` (-1 after the last);
    x_prev = c0 * x0 + c1 * x + std * noise with
    c0 = sqrt(alpha_prev) * beta_t' / beta, c1 = sqrt(alpha_t') * beta_prev / beta,
    std from ``variance_type`` (fixed_small and fixed_small_log: the posterior
    variance clamped at 1e-20; fixed_large: beta_t'). diffusers draws noise at
    steps with t > 0. ``d`` is x0. Not expressible: learned variances, clip_sample
    (on by default in diffusers' DDPMScheduler), thresholding.
    """
    _check_prediction_type(prediction_type)
    if variance_type not in DDPM_VARIANCE_TYPES:
        raise ValueError(f"variance_type must be one of {DDPM_VARIANCE_TYPES} for the fused step, got {variance_type!r}")
    ac = _as_f64(alphas_cumprod, "alphas_cumprod")
    ts = _as_f64(timesteps, "timesteps").long().tolist()
    rows = []
    for i, t in enumerate(ts):
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        alpha = ac[t].item()
        alpha_prev = ac[prev_t].item() if prev_t >= 0 else 1.0
        beta, beta_prev = 1 - alpha, 1 - alpha_prev
        alpha_step = alpha / alpha_prev
        beta_step = 1 - alpha_step
        if prediction_type == "epsilon":
            px, pm = 1 / math.sqrt(alpha), -math.sqrt(beta) / math.sqrt(alpha)
        elif prediction_type == "sample":
            px, pm = 0.0, 1.0
        else:
            px, pm = math.sqrt(alpha), -math.sqrt(beta)
        c0 = math.sqrt(alpha_prev) * beta_step / beta
        c1 = math.sqrt(alpha_step) * beta_prev / beta
        std = 0.0
        if t > 0:
            variance = max(beta_prev / beta * beta_step, 1e-20)
            std = math.sqrt(beta_step) if variance_type == "fixed_large" else math.sqrt(variance)
        rows.append({"a": c1 + c0 * px, "e": c0 * pm, "s": std, "p": px, "q": pm})
    return _table(rows, device)


def dpmpp_2m_coeffs(
    sigmas,
    *,
    prediction_type: str = "epsilon",
    solver_order: int = 2,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    euler_at_final: bool = False,
    final_sigmas_type: str = "zero",
    device=None,
) -> torch.Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022, https://arxiv.org/abs/2211.01095, Alg. 2: 2M;
    ``solver_order`` 1 and 3 give 1S and 3M) as a coefficient table, matching diffusers'
    DPMSolverMultistepScheduler.step with ``algorithm_type="dpmsolver++"``.

    ``sigmas`` has num_steps + 1 entries (the scheduler's ``sigmas``, in the VP
    parametrisation sigma = sqrt((1 - alpha_bar) / alpha_bar)). ``d`` is the x0
    prediction, kept in a history ring of R = max(1, solver_order - 1) slots: pass
    ``history=torch.zeros((R, *sample.shape))``. Like diffusers, the first steps
    ramp the order up one step at a time, and the last one or two steps lower it
    when ``lower_order_final`` (or ``euler_at_final``, or a final sigma of 0) says so.
    Not expressible: thresholding, the SDE variants, flow sigmas.
    """
    _check_prediction_type(prediction_type)
    if solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    sig = _as_f64(sigmas, "sigmas")
    num_steps = len(sig) - 1
    if num_steps < 1:
        raise ValueError(f"sigmas must have num_steps + 1 >= 2 entries, got {len(sig)}")
    alpha_t = 1 / torch.sqrt(sig**2 + 1)
    sigma_t = sig * alpha_t
    lam = (torch.log(alpha_t) - torch.log(sigma_t)).tolist()  # +inf where sigma is 0
    rows = []
    for i in range(num_steps):
        lowered_final = i == num_steps - 1 and (euler_at_final or (lower_order_final and num_steps < 15) or final_sigmas_type == "zero")
        lowered_second = i == num_steps - 2 and lower_order_final and num_steps < 15
        if solver_order == 1 or i < 1 or lowered_final:
            order = 1
        elif solver_order == 2 or i < 2 or lowered_second:
            order = 2
        else:
            order = 3
        a_s, s_s, a_t, s_t = alpha_t[i].item(), sigma_t[i].item(), alpha_t[i + 1].item(), sigma_t[i + 1].item()
        if prediction_type == "epsilon":
            px, pm = 1 / a_s, -s_s / a_s
        elif prediction_type == "sample":
            px, pm = 0.0, 1.0
        else:
            px, pm = a_s, -s_s
        h = lam[i + 1] - lam[i]
        if h == 0 and order > 1:
            raise ValueError(f"sigmas[{i}] == sigmas[{i + 1}]: a zero step size at step {i} of order {order} (diffusers returns NaN there)")
        phi = a_t * math.expm1(-h)  # alpha_t * (exp(-h) - 1); h is +inf onto a final sigma of 0
        # x_prev = (sigma_t / sigma_s0) * x + c0 * m0 + c1 * m1 + c2 * m2, with m_j the x0 prediction j steps ago.
        if order == 1:
            c = [-phi, 0.0, 0.0]
        elif order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            if solver_type == "midpoint":  # D1 = (m0 - m1) / r0, x_t = ... - phi * D0 - phi / 2 * D1
                c = [-phi - 0.5 * phi / r0, 0.5 * phi / r0, 0.0]
            else:  # heun: x_t = ... - phi * D0 + psi * D1
                psi = a_t * (math.expm1(-h) / h + 1.0)
                c = [-phi + psi / r0, -psi / r0, 0.0]
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            psi = a_t * (math.expm1(-h) / h + 1.0)
            chi = a_t * ((math.expm1(-h) + h) / h**2 - 0.5)
            k = r0 / (r0 + r1)
            # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1, D1 = (1 + k) D1_0 - k D1_1,
            # D2 = (D1_0 - D1_1) / (r0 + r1); x_t = ... - phi * D0 + psi * D1 - chi * D2.
            w0 = psi * (1 + k) - chi / (r0 + r1)  # weight of D1_0
            w1 = -psi * k + chi / (r0 + r1)  # weight of D1_1
            c = [-phi + w0 / r0, -w0 / r0 + w1 / r1, -w1 / r1]
        rows.append({"a": s_t / s_s + c[0] * px, "e": c[0] * pm, "p": px, "q": pm, "h1": c[1], "h2": c[2]})
    return _table(rows, device)


# ---------------------------------------------------------------------------
# Input validation: concise errors naming the argument.
# ---------------------------------------------------------------------------


def _check_tensor(name: str, t, sample: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"scheduler_step: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != sample.device:
        raise ValueError(f"scheduler_step: {name} is on {t.device} but sample is on {sample.device}")


def _check_inputs(sample, model_output, coeffs, step_index, guidance_scale, noise, history, out) -> None:
    if not isinstance(sample, torch.Tensor):
        raise ValueError(f"scheduler_step: sample must be a torch.Tensor, got {type(sample).__name__}")
    if sample.dim() < 1 or sample.numel() == 0:
        raise ValueError(f"scheduler_step: sample must be a non-empty (B, ...) tensor, got shape {tuple(sample.shape)}")
    if sample.dtype not in REFERENCE_DTYPES:
        raise ValueError(f"scheduler_step: sample must be fp32, fp16, bf16 or fp64, got {sample.dtype}")
    shape = tuple(sample.shape)
    _check_tensor("model_output", model_output, sample)
    if model_output.dtype != sample.dtype:
        raise ValueError(f"scheduler_step: model_output dtype {model_output.dtype} does not match sample's dtype {sample.dtype}")
    if guidance_scale is None:
        if tuple(model_output.shape) != shape:
            raise ValueError(f"scheduler_step: model_output must have sample's shape {shape}, got {tuple(model_output.shape)}")
    else:
        mo_shape = tuple(model_output.shape)
        if model_output.dim() != sample.dim() or mo_shape[0] % 2:
            raise ValueError(f"scheduler_step: with guidance_scale, model_output must be (2B, ...) with an even batch (uncond half, then cond half), got {mo_shape}")
        if (mo_shape[0] // 2, *mo_shape[1:]) != shape:
            raise ValueError(f"scheduler_step: with guidance_scale, each half of model_output must have sample's shape {shape}, got model_output {mo_shape}")
        if isinstance(guidance_scale, torch.Tensor):
            _check_tensor("guidance_scale", guidance_scale, sample)
            if guidance_scale.numel() != 1 or guidance_scale.dtype != torch.float32:
                raise ValueError(f"scheduler_step: a guidance_scale tensor must be one float32 element, got {guidance_scale.dtype} of shape {tuple(guidance_scale.shape)}")
        elif isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ValueError(f"scheduler_step: guidance_scale must be None, a float or a one-element device tensor, got {type(guidance_scale).__name__}")
    _check_tensor("coeffs", coeffs, sample)
    if coeffs.dim() != 2 or coeffs.shape[1] != NUM_COEFFS or coeffs.shape[0] < 1 or coeffs.dtype != torch.float32 or not coeffs.is_contiguous():
        raise ValueError(f"scheduler_step: coeffs must be a contiguous float32 (num_steps, {NUM_COEFFS}) table with columns {COEFF_COLUMNS}, got {coeffs.dtype} of shape {tuple(coeffs.shape)}")
    _check_tensor("step_index", step_index, sample)
    if step_index.dtype != torch.int64 or step_index.numel() != 1:
        raise ValueError(f"scheduler_step: step_index must be a one-element int64 tensor, got {step_index.dtype} of shape {tuple(step_index.shape)}")
    if noise is not None:
        _check_tensor("noise", noise, sample)
        if noise.dtype != sample.dtype:
            raise ValueError(f"scheduler_step: noise dtype {noise.dtype} does not match sample's dtype {sample.dtype}")
        if tuple(noise.shape) not in (shape, (coeffs.shape[0], *shape)):
            raise ValueError(f"scheduler_step: noise must have sample's shape {shape} or (num_steps, *sample.shape) = {(coeffs.shape[0], *shape)}, got {tuple(noise.shape)}")
    if history is not None:
        _check_tensor("history", history, sample)
        if history.dtype != sample.dtype:
            raise ValueError(f"scheduler_step: history dtype {history.dtype} does not match sample's dtype {sample.dtype}")
        if history.dim() != sample.dim() + 1 or tuple(history.shape[1:]) != shape or not 1 <= history.shape[0] <= MAX_HISTORY:
            raise ValueError(f"scheduler_step: history must be a (R, *sample.shape) ring with 1 <= R <= {MAX_HISTORY}, got {tuple(history.shape)} for sample {shape}")
    if out is not None:
        _check_tensor("out", out, sample)
        if tuple(out.shape) != shape or out.dtype != sample.dtype:
            raise ValueError(f"scheduler_step: out must match sample's shape {shape} and dtype {sample.dtype}, got {tuple(out.shape)} {out.dtype}")


# ---------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------


def _tensors(inputs: Mapping[str, Any]) -> List[torch.Tensor]:
    names = ("sample", "model_output", "coeffs", "step_index", "noise", "history", "out")
    ts = [inputs[n] for n in names if inputs[n] is not None]
    if isinstance(inputs["guidance_scale"], torch.Tensor):
        ts.append(inputs["guidance_scale"])
    return ts


def _fused_dtype_reasons(inputs: Mapping[str, Any]) -> List[str]:
    if inputs["sample"].dtype not in FUSED_DTYPES:
        return [f"dtype {inputs['sample'].dtype} not supported (expected one of fp32, fp16, bf16)"]
    return []


def _reference_reasons(inputs: Mapping[str, Any]) -> List[str]:
    return []


def _reference_run(inputs: Mapping[str, Any]) -> torch.Tensor:
    return scheduler_step_ref(**inputs)


def _triton_reasons(inputs: Mapping[str, Any]) -> List[str]:
    if not backends.triton_available():
        return ["triton is not installed"]
    reasons = backends.device_reasons(_tensors(inputs), allow_cpu_interpret=True)
    reasons += _fused_dtype_reasons(inputs)
    from fastdiff.kernels.scheduler_step import layout_reasons

    reasons += layout_reasons(_views(inputs))
    return reasons


def _views(inputs: Mapping[str, Any]) -> List[torch.Tensor]:
    """The sample-shaped views a kernel indexes: sample, the first (uncond) half of
    model_output, step 0 of a noise bank, slot 0 of the history ring, out."""
    sample = inputs["sample"]
    views = [sample, inputs["model_output"][: sample.shape[0]]]
    noise = inputs["noise"]
    if noise is not None:
        views.append(noise[0] if noise.dim() == sample.dim() + 1 else noise)
    if inputs["history"] is not None:
        views.append(inputs["history"][0])
    if inputs["out"] is not None:
        views.append(inputs["out"])
    return views


def _kernel_args(inputs: Mapping[str, Any]):
    """(out, positional args) shared by the Triton and CUDA custom ops."""
    out = inputs["out"] if inputs["out"] is not None else torch.empty_like(inputs["sample"])
    g = inputs["guidance_scale"]
    g_tensor = g if isinstance(g, torch.Tensor) else None
    g_float = float(g) if g is not None and g_tensor is None else None
    args = (
        inputs["sample"],
        inputs["model_output"],
        inputs["coeffs"],
        inputs["step_index"],
        out,
        inputs["noise"],
        inputs["history"],
        g_float,
        g_tensor,
        g is not None,
        bool(inputs["advance_step_index"]),
    )
    return out, args


def _triton_run(inputs: Mapping[str, Any]) -> torch.Tensor:
    out, args = _kernel_args(inputs)
    _scheduler_step_triton(*args)
    return out


def _cuda_reasons(inputs: Mapping[str, Any]) -> List[str]:
    reasons = backends.device_reasons(_tensors(inputs), allow_cpu_interpret=False)
    reasons += _fused_dtype_reasons(inputs)
    views = _views(inputs)
    if any(not _is_dense(v) or v.stride() != views[0].stride() for v in views):
        reasons.append("needs every tensor dense in the sample's memory layout (strided views run on triton)")
    if inputs["sample"].numel() >= 2**31:
        reasons.append("more than 2**31 - 1 elements")
    if not reasons:
        from fastdiff import _extension

        reasons += _extension.extension_reasons()
    return reasons


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill exactly numel() slots of memory."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _cuda_run(inputs: Mapping[str, Any]) -> torch.Tensor:
    _register_cuda_op()
    out, args = _kernel_args(inputs)
    torch.ops.fastdiff.scheduler_step_cuda(*args)
    return out


def _priority(inputs: Mapping[str, Any]) -> List[str]:
    if inputs["sample"].device.type == "cuda":
        return ["triton", "cuda", "reference"]
    return ["reference"]


_DISPATCHER = backends.register_dispatcher(
    backends.Dispatcher(
        OP_NAME,
        [
            backends.Backend("reference", _reference_reasons, _reference_run, "plain PyTorch, fp32 math, index_select on the device index"),
            backends.Backend("triton", _triton_reasons, _triton_run, "kernels/scheduler_step.py: one launch, any strides (up to 4 merged dims)"),
            backends.Backend("cuda", _cuda_reasons, _cuda_run, "csrc/scheduler_step: one launch, 16-byte vectorised, dense tensors"),
        ],
        _priority,
    )
)


# ---------------------------------------------------------------------------
# Custom ops (torch.library), so torch.compile and CUDA graphs see through them.
# They write ``out`` (and ``history``, ``step_index``) in place and return nothing.
# ---------------------------------------------------------------------------


@torch.library.custom_op("fastdiff::scheduler_step_triton", mutates_args=("step_index", "out", "history"))
def _scheduler_step_triton(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    step_index: torch.Tensor,
    out: torch.Tensor,
    noise: Optional[torch.Tensor],
    history: Optional[torch.Tensor],
    guidance_scale: Optional[float],
    guidance_tensor: Optional[torch.Tensor],
    has_guidance: bool,
    advance_step_index: bool,
) -> None:
    from fastdiff.kernels.scheduler_step import scheduler_step_forward

    scheduler_step_forward(
        sample, model_output, coeffs, step_index, out, noise, history, guidance_scale, guidance_tensor, has_guidance, advance_step_index
    )


@_scheduler_step_triton.register_fake
def _(sample, model_output, coeffs, step_index, out, noise, history, guidance_scale, guidance_tensor, has_guidance, advance_step_index):
    return None


@functools.lru_cache(maxsize=None)
def _register_cuda_op() -> None:
    """Load the CUDA extension (JIT-building it once if needed) and give its op a
    fake implementation. Runs on first use, never at import."""
    from fastdiff import _extension

    _extension.load()
    torch.library.register_fake("fastdiff::scheduler_step_cuda")(lambda *args, **kwargs: None)


# ---------------------------------------------------------------------------
# Public op
# ---------------------------------------------------------------------------


def _inputs(sample, model_output, coeffs, step_index, guidance_scale, noise, history, out, advance_step_index) -> Dict[str, Any]:
    return {
        "sample": sample,
        "model_output": model_output,
        "coeffs": coeffs,
        "step_index": step_index,
        "guidance_scale": guidance_scale,
        "noise": noise,
        "history": history,
        "out": out,
        "advance_step_index": advance_step_index,
    }


def scheduler_step(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    coeffs: torch.Tensor,
    step_index: torch.Tensor,
    *,
    guidance_scale: GuidanceScale = None,
    noise: Optional[torch.Tensor] = None,
    history: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    advance_step_index: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """One scheduler update, with classifier-free guidance folded in, in one launch.

    Args:
        sample: x, (B, ...); fp32, fp16 or bf16 (fp64 on the reference backend).
        model_output: (B, ...) like sample, or with ``guidance_scale`` the batched
            CFG output (2B, ...): uncond half first, then cond half (diffusers'
            ``noise_pred.chunk(2)`` order). Read in place; both halves are read
            directly, nothing is chunked or copied. Same dtype as sample.
        coeffs: (num_steps, 8) contiguous float32 device table, columns
            :data:`COEFF_COLUMNS`; see the module docstring and the ``*_coeffs``
            builders.
        step_index: one-element int64 device tensor: the row of ``coeffs`` to use.
        guidance_scale: None (no CFG), a float, or a one-element float32 device
            tensor (changeable between replays of a captured graph).
        noise: None, sample-shaped noise for this step, or a (num_steps, *sample.shape)
            bank read at ``step_index``. Same dtype as sample.
        history: None, or a (R, *sample.shape) ring buffer, 1 <= R <= 3, updated in
            place (see the module docstring). Same dtype as sample.
        out: where to write x_prev (sample's shape and dtype); may be ``sample``
            itself. None allocates ``torch.empty_like(sample)``.
        advance_step_index: add 1 to ``step_index`` in the same launch.
        backend: "auto", "reference", "triton" or "cuda"; None follows
            ``fastdiff.use_backend`` / FASTDIFF_BACKEND, else auto.

    Returns:
        x_prev in sample's dtype (``out`` when given). All math is in float32.

    Nothing here reads a device value on the host, so the call can be captured
    in a CUDA graph. Inference only: there is no backward.
    """
    _check_inputs(sample, model_output, coeffs, step_index, guidance_scale, noise, history, out)
    return _DISPATCHER(_inputs(sample, model_output, coeffs, step_index, guidance_scale, noise, history, out, advance_step_index), backend)


def explain(sample, model_output, coeffs, step_index, *, guidance_scale=None, noise=None, history=None, out=None, advance_step_index=False, backend=None) -> str:
    """Which backend :func:`scheduler_step` would run on these inputs, and every backend's reasons."""
    _check_inputs(sample, model_output, coeffs, step_index, guidance_scale, noise, history, out)
    return _DISPATCHER.explain(_inputs(sample, model_output, coeffs, step_index, guidance_scale, noise, history, out, advance_step_index), backend)


scheduler_step.explain = explain
