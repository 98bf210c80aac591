"""PNDM: pseudo numerical methods for diffusion models (Liu et al. 2022, https://arxiv.org/abs/2202.09778)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .scheduling_utils import (
    KarrasDiffusionSchedulers,
    SchedulerMixin,
    SchedulerOutput,
    apply_guidance,
    integer_timestep,
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


def _plms_transfer(alphas_cumprod, final_alpha_cumprod, t, prev_t, v_prediction):
    """(sample weight, model output weight) of :meth:`PNDMScheduler._get_prev_sample`, in float64;
    with v_prediction the model output's conversion adds ``sqrt(beta_t)`` x its weight to the sample's."""
    a_t = alphas_cumprod[t]
    a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    b_t, b_prev = 1 - a_t, 1 - a_prev
    denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
    w_sample, w_output = (a_prev / a_t) ** 0.5, -(a_prev - a_t) / denom
    if v_prediction:
        return w_sample + w_output * b_t**0.5, w_output * a_t**0.5
    return w_sample, w_output


def plms_fused_coeffs(
    alphas_cumprod, final_alpha_cumprod, timesteps, ratio, prediction_type, begin_index=0, slots=3
) -> torch.Tensor:
    """PLMS with ``skip_prk_steps`` as a fused-step coefficient table (columns a, e, s, p, q, h1, h2, h3
    of :func:`fastdiff.ops.scheduler_step`), found by running :meth:`PNDMScheduler._plms` on symbols.

    Every sample and model output of the loop is a vector of weights over the basis (first sample,
    m_0, m_1, ...): the scheduler's update is linear in them. Row i then solves
    x_{i+1} = a x_i + e m_i + h1 d_{i-1} + h2 d_{i-2} + h3 d_{i-3} exactly, with the ring entries
    d_j = m_j. One step breaks that: the fourth PLMS step after the start needs m_0, which sits four
    steps back (the start step's output, m_1, is never reused), and the ring holds three. There the
    ring entry three steps back is chosen as d = p x + q m of its own step (x of that step carries
    m_0) so the row solves exactly. Each row is checked to reproduce the update to 1e-9.
    """
    ac = [float(a) for a in alphas_cumprod]
    final = float(final_alpha_cumprod)
    timesteps = [int(t) for t in timesteps]
    n = len(timesteps)
    dim = 1 + n  # weights over (first sample, m_0, ..., m_{n-1})
    unit = np.eye(dim)
    v = prediction_type == "v_prediction"

    # Symbolic run of _plms from begin_index (counter 0 there).
    xs = {begin_index: unit[0]}
    ets, cur_sample = [], None
    for i in range(begin_index, n):
        counter, m = i - begin_index, unit[1 + i]
        t = timesteps[i]
        prev_t = t - ratio
        if counter != 1:
            ets = ets[-3:] + [m]
        else:
            prev_t, t = t, t + ratio
        sample = xs[i]
        if len(ets) == 1 and counter == 0:
            cur_sample, eps = sample, m
        elif len(ets) == 1 and counter == 1:
            eps, sample, cur_sample = (m + ets[-1]) / 2, cur_sample, None
        elif len(ets) == 2:
            eps = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            eps = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        w_sample, w_output = _plms_transfer(ac, final, t, prev_t, v)
        xs[i + 1] = w_sample * sample + w_output * eps

    table = np.zeros((n, 8))
    ring = {j: unit[1 + j] for j in range(begin_index, n)}  # d_j; p_j = 0, q_j = 1 unless re-chosen
    table[begin_index:, 4] = 1.0

    def solve(i, free_lag=None):
        lags = [k for k in range(1, slots + 1) if i - k >= begin_index]
        cols = [xs[i], unit[1 + i]] + [ring[i - k] for k in lags if k != free_lag]
        if free_lag is not None:
            cols += [xs[i - free_lag], unit[1 + i - free_lag]]
        m = np.stack(cols, axis=1)
        c = np.linalg.lstsq(m, xs[i + 1], rcond=None)[0]
        ok = np.abs(m @ c - xs[i + 1]).max() <= 1e-9 * max(1.0, np.abs(xs[i + 1]).max())
        return ok, lags, c

    def fill(i, lags, c):
        table[i, 0:2] = c[:2]
        table[i, 5:] = 0.0
        for k, h in zip(lags, c[2:]):
            table[i, 4 + k] = h

    for i in range(begin_index, n):
        ok, lags, c = solve(i)
        if not ok and i - 3 >= begin_index:
            ok, lags, c = solve(i, free_lag=3)
            if ok:  # d_{i-3} = p x_{i-3} + q m_{i-3}, read with weight 1 here
                j, (p, q) = i - 3, c[-2:]
                ring[j] = p * xs[j] + q * unit[1 + j]
                table[j, 3:5] = p, q
                c = np.concatenate([c[:-2], [1.0]])
                for k in (i - 2, i - 1):  # rows i-2 and i-1 also see the new d_{i-3}: solve them again
                    ok_k, lags_k, c_k = solve(k)
                    ok = ok and ok_k
                    fill(k, lags_k, c_k)
        if not ok:
            raise ValueError(f"PLMS step {i} has no exact fused form with {slots} history slots")
        fill(i, lags, c)
    return torch.from_numpy(table).to(torch.float32)


class PNDMScheduler(SchedulerMixin):
    """Pseudo linear multistep (PLMS) sampling, Liu et al. 2022, eq. 11 to 13, with Runge-Kutta warm-up.

    Each update uses the pseudo step phi(x_t, eps, t, t') of eq. 11 (the DDIM step written as a
    function of eps), fed with a combination of past eps estimates: fourth-order Runge-Kutta
    (three warm-up steps of four model calls) then the linear multistep formula
    (55 e_t - 59 e_{t-1} + 37 e_{t-2} - 9 e_{t-3}) / 24. With ``skip_prk_steps``
    (Stable Diffusion's setting) the warm-up uses lower-order Adams-Bashforth steps instead.

    Config keys and defaults are diffusers' ``PNDMScheduler``'s; only ``epsilon`` and
    ``v_prediction`` outputs are supported (as in diffusers).

    Fused step (fastdiff extension): with ``skip_prk_steps`` the PLMS update is linear in the sample,
    the model output and three ring entries (:func:`plms_fused_coeffs`), so ``step`` runs as one
    launch of :func:`fastdiff.ops.scheduler_step` that also folds in classifier-free guidance
    (``step(..., guidance_scale=g)`` with the batched CFG output). It runs on CUDA tensors, or wherever
    the ``scheduler_step`` backend is forced, and follows a device step index from
    :meth:`set_begin_index` (or from the first ``timestep``, read once), so later calls never read
    ``timestep`` and never synchronise with the host. The Runge-Kutta warm-up has no fused form.
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
        skip_prk_steps: bool = False,
        set_alpha_to_one: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction' for PNDM, got {prediction_type!r}")
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            ("linear", "scaled_linear", "squaredcos_cap_v2"),
        )  # fmt: skip
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.pndm_order = 4
        self.num_inference_steps = None
        self._timesteps = np.arange(0, num_train_timesteps)[::-1].copy()
        self.prk_timesteps = None
        self.plms_timesteps = None
        self.timesteps = None
        self._begin_index = None
        self._reset_state()

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
        if not self.config.skip_prk_steps:
            return ["the Runge-Kutta warm-up (skip_prk_steps=False) re-evaluates earlier samples"]
        return []

    def _fused_table(self, begin_index=0):
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        table = plms_fused_coeffs(
            self.alphas_cumprod, self.final_alpha_cumprod, self._host_timesteps, ratio, self.config.prediction_type,
            begin_index,
        )  # fmt: skip
        return table, [False] * len(self._host_timesteps), 3

    def _reset_state(self):
        self.cur_model_output = 0
        self.counter = 0
        self.cur_sample = None
        self.ets = []

    def set_timesteps(self, num_inference_steps: int, device=None):
        """Build the PRK and PLMS timestep lists for ``num_inference_steps`` and reset the multistep state."""
        total = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must be in [1, {total}], got {num_inference_steps}")
        n = self.num_inference_steps = num_inference_steps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            base = np.linspace(0, total - 1, n).round().astype(np.int64)
        elif spacing == "leading":
            base = (np.arange(0, n) * (total // n)).round().astype(np.int64) + self.config.steps_offset
        elif spacing == "trailing":
            base = np.round(np.arange(total, 0, -total / n))[::-1].astype(np.int64) - 1
        else:
            raise ValueError(f"timestep_spacing must be 'linspace', 'leading' or 'trailing', got {spacing!r}")
        self._timesteps = base  # ascending
        if self.config.skip_prk_steps:
            # Repeat the second timestep: the first PLMS step is taken twice (a two-call Heun-like start).
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
        else:
            half = total // n // 2
            prk = base[-self.pndm_order :].repeat(2) + np.tile(np.array([0, half]), self.pndm_order)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            self.plms_timesteps = base[:-3][::-1].copy()
        timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._known = set(int(t) for t in timesteps)
        self._host_timesteps = [int(t) for t in timesteps]
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._begin_index = None
        self._reset_fused(begin_index=0)
        self._reset_state()

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """PNDM needs no input scaling; returns ``sample``."""
        return sample

    def step(
        self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True, guidance_scale=None
    ):
        """Advance one model call: a Runge-Kutta sub-step during warm-up, a PLMS step afterwards.

        Args:
            model_output (`torch.Tensor`): the model's eps (or v) prediction at ``timestep``.
            timestep (`int` or 0-d tensor): the current entry of ``self.timesteps`` (as in diffusers,
                any integer training timestep is accepted).
            sample (`torch.Tensor`): the current sample.
            return_dict (`bool`): return a :class:`SchedulerOutput` rather than a tuple.
            guidance_scale (`float` or one-element float32 tensor, *optional*): fastdiff extension; with it,
                ``model_output`` is the batched CFG output (2B, ...), uncond half first, and the guidance
                ``u + g * (c - u)`` is applied (inside the fused launch when the fused step runs).

        On the fused path the step follows the device step index, not ``timestep``.
        """
        if self.num_inference_steps is None:
            raise ValueError("step() called before set_timesteps(); call set_timesteps(num_inference_steps) first.")
        reasons = self._fused_reasons()
        first = self._fused.step_index is None and self._begin_index is None
        if not reasons and first and int(timestep) not in self._known:
            # The plain step takes any timestep, as diffusers does; the table follows the schedule.
            reasons = [f"timestep {int(timestep)} is not one of `.timesteps` (the table follows the schedule)"]
        if use_fused_step(self, sample, model_output, reasons):
            state, start = self._fused, None
            if state.step_index is None:  # the PLMS ramp starts at the first step taken
                if self._begin_index is not None:
                    start = self._begin_index
                else:
                    start = self._host_timesteps.index(int(timestep))
                state = self._fused_state((("begin_index", start),))
            prev_sample = state.run(self, model_output, sample, guidance_scale, start)
            if not return_dict:
                return (prev_sample,)
            return SchedulerOutput(prev_sample=prev_sample)
        model_output = apply_guidance(model_output, guidance_scale)
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            return self.step_prk(model_output, timestep, sample, return_dict=return_dict)
        return self.step_plms(model_output, timestep, sample, return_dict=return_dict)

    def step_prk(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One Runge-Kutta warm-up sub-step (four model calls per step; Liu et al. 2022, eq. 13).

        Public as in diffusers; :meth:`step` calls it for the first ``len(self.prk_timesteps)`` calls.
        Like diffusers, ``timestep`` need not be one of ``self.timesteps``.
        """
        if self.num_inference_steps is None:
            raise ValueError("step_prk() called before set_timesteps(); call set_timesteps(num_inference_steps) first.")
        dtype = sample.dtype
        prev_sample = self._prk(model_output.float(), integer_timestep(timestep), sample.float()).to(dtype)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def step_plms(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True):
        """One linear multistep (PLMS) step (Liu et al. 2022, eq. 12), after the warm-up.

        Public as in diffusers; :meth:`step` calls it after the Runge-Kutta warm-up (for every call with
        ``skip_prk_steps``). Like diffusers, ``timestep`` need not be one of ``self.timesteps``.
        """
        if self.num_inference_steps is None:
            raise ValueError(
                "step_plms() called before set_timesteps(); call set_timesteps(num_inference_steps) first."
            )
        dtype = sample.dtype
        prev_sample = self._plms(model_output.float(), integer_timestep(timestep), sample.float()).to(dtype)
        self.counter += 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _prk(self, model_output, t, sample):
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - (0 if self.counter % 2 else ratio // 2)
        t = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._get_prev_sample(cur_sample, t, prev_t, model_output)

    def _plms(self, model_output, t, sample):
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError(
                "PLMS steps need the 12 Runge-Kutta warm-up steps first; step through all of `.timesteps`."
            )
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - ratio
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_t, t = t, t + ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = 1 / 24 * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._get_prev_sample(sample, t, prev_t, model_output)

    def _get_prev_sample(self, sample, t, prev_t, model_output):
        """Liu et al. eq. 11: the DDIM-form transfer of ``sample`` from ``t`` to ``prev_t`` along eps."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config.prediction_type == "v_prediction":
            model_output = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
        denom = alpha_prod_t * beta_prod_t_prev**0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise, per batch element."""
        return add_noise_by_alphas_cumprod(self, original_samples, noise, timesteps)

    def __len__(self):
        return self.config.num_train_timesteps
