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


class PNDMScheduler(SchedulerMixin):
    """Pseudo linear multistep (PLMS) sampling, Liu et al. 2022, eq. 11 to 13, with Runge-Kutta warm-up.

    Each update uses the pseudo step phi(x_t, eps, t, t') of eq. 11 (the DDIM step written as a
    function of eps), fed with a combination of past eps estimates: fourth-order Runge-Kutta
    (three warm-up steps of four model calls) then the linear multistep formula
    (55 e_t - 59 e_{t-1} + 37 e_{t-2} - 9 e_{t-3}) / 24. With ``skip_prk_steps``
    (Stable Diffusion's setting) the warm-up uses lower-order Adams-Bashforth steps instead.

    Config keys and defaults are diffusers' ``PNDMScheduler``'s; only ``epsilon`` and
    ``v_prediction`` outputs are supported (as in diffusers).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    _no_fused_step_reason = (
        "its PLMS start needs a model output four steps back (the op's history ring holds three) and its "
        "Runge-Kutta warm-up revisits earlier samples"
    )

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
        self._reset_state()

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
        self.timesteps = torch.from_numpy(timesteps).to(device)
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
            timestep (`int` or 0-d tensor): the current entry of ``self.timesteps``.
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
        t = int(timestep)
        if t not in self._known:
            raise ValueError(f"timestep {t} is not in this scheduler's timesteps {self.timesteps.tolist()}")
        dtype = sample.dtype
        model_output, sample = model_output.float(), sample.float()
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            prev_sample = self._prk(model_output, t, sample)
        else:
            prev_sample = self._plms(model_output, t, sample)
        self.counter += 1
        prev_sample = prev_sample.to(dtype)
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
