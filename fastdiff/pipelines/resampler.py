"""``Resampler``: denoise the first steps at a lower latent resolution, then finish at full size.

A fastdiff control (diffusers has none): ``pipe.set_spatial_resampler(fastdiff.Resampler(scale=0.5,
fraction=0.4))`` runs the first 40% of the steps on latents at half the height and width (a quarter
of the UNet's work per step), then moves to full size with matching re-noising:

1. at the switch step ``k`` (timestep ``t_k``), one more low-resolution model evaluation gives the
   clean estimate ``x0`` (from the epsilon or v prediction, with the same guidance);
2. ``x0`` is upsampled (``mode``, default bicubic) to the full latent size;
3. the full-size starting noise (drawn exactly as the plain pipeline draws it; the low-resolution
   start is its area average, rescaled to unit variance) is mixed in again at ``t_k``'s noise level
   with the scheduler's own ``add_noise``, so the latents have the statistics the scheduler expects
   and keep the plain run's noise;
4. the scheduler restarts its schedule at step ``k`` (``set_begin_index``), dropping any multistep
   history made at the low resolution, and the loop continues at full size.

Early steps decide the layout and late steps the detail, so the drift from the full-resolution
image is small for small ``fraction`` and grows with it; the benchmark
``benchmarks/bench_pipeline.py --resampler-table`` measures speed and drift (PSNR, SSIM).
Only the default schedule (``num_inference_steps``) is supported, not custom ``timesteps``/``sigmas``.
"""

from __future__ import annotations

import torch

MODES = ("nearest", "bilinear", "bicubic")


class Resampler:
    """Args:
    scale (`float` in (0, 1)): the low latent resolution as a fraction of the full one (rounded to
        what the UNet can take).
    fraction (`float` in (0, 1)): the share of the denoising steps run at the low resolution.
    mode (`str`): how the clean estimate is upsampled: "nearest", "bilinear" or "bicubic".
    """

    def __init__(self, scale: float = 0.5, fraction: float = 0.4, mode: str = "bicubic"):
        if not 0 < scale < 1:
            raise ValueError(f"scale: expected a value in (0, 1), got {scale}")
        if not 0 < fraction < 1:
            raise ValueError(f"fraction: expected a value in (0, 1), got {fraction}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        self.scale, self.fraction, self.mode = float(scale), float(fraction), mode

    def __repr__(self):
        return f"Resampler(scale={self.scale}, fraction={self.fraction}, mode={self.mode!r})"

    def low_size(self, size: int, unet) -> int:
        """The low latent size for a full latent size (a multiple of the UNet's downsampling)."""
        multiple = 2 ** (len(unet.config.block_out_channels) - 1)
        low = max(multiple, int(round(size * self.scale / multiple)) * multiple)
        if low >= size:
            raise ValueError(
                f"Resampler(scale={self.scale}): a latent size of {size} leaves no lower size that the UNet "
                f"takes (multiples of {multiple}); use larger images or a smaller scale"
            )
        return low

    def downsample(self, latents: torch.Tensor, unet) -> torch.Tensor:
        """The starting latents at low resolution: area-averaged, then scaled back to the input's std
        (an average of n independent Gaussians has std 1/sqrt(n))."""
        height, width = latents.shape[-2:]
        low = (self.low_size(height, unet), self.low_size(width, unet))
        pooled = torch.nn.functional.interpolate(latents.float(), size=low, mode="area")
        return (pooled * ((height * width) / (low[0] * low[1])) ** 0.5).to(latents.dtype)

    def switch_index(self, num_timesteps: int, order: int) -> int:
        """The step at which the loop moves to full resolution (a multiple of the scheduler's order)."""
        steps = num_timesteps // order
        k = int(round(steps * self.fraction))
        if steps < 2:
            raise ValueError("the spatial resampler needs at least 2 denoising steps")
        return min(max(k, 1), steps - 1) * order

    @torch.no_grad()
    def upsample(self, pipe, latents, t, index, prompt_embeds, guidance, initial_noise, **unet_kwargs):
        """Full-size latents at step ``index`` (timestep ``t``) from the low-resolution ``latents``;
        ``initial_noise`` is the full-size unit-variance noise the loop started from (what
        :meth:`downsample` was given, divided by the scheduler's ``init_noise_sigma``)."""
        scheduler = pipe.scheduler
        model_input = torch.cat([latents] * 2) if guidance is not None else latents
        model_input = scheduler.scale_model_input(model_input, t)
        output = pipe.unet(
            model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            timestep_cond=unet_kwargs.get("timestep_cond"),
            cross_attention_kwargs=getattr(pipe, "_cross_attention_kwargs", None),
            added_cond_kwargs=unet_kwargs.get("added_cond_kwargs"),
            return_dict=False,
        )[0]
        if guidance is not None:
            uncond, cond = output.chunk(2)
            output = uncond + guidance.to(output.dtype) * (cond - uncond)
        x0 = self._clean_estimate(scheduler, latents, output, t)
        corners = None if self.mode == "nearest" else False
        x0 = torch.nn.functional.interpolate(x0, size=tuple(initial_noise.shape[-2:]), mode=self.mode, align_corners=corners)
        x0 = x0.to(latents.dtype)

        num_steps = scheduler.num_inference_steps
        old_timesteps = scheduler.timesteps
        scheduler.set_timesteps(num_steps, device=latents.device)
        if not torch.equal(scheduler.timesteps, old_timesteps):
            raise ValueError("the spatial resampler supports the scheduler's default schedule only (no custom timesteps/sigmas)")
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(index)
        timesteps = t.reshape(1).expand(x0.shape[0])
        return scheduler.add_noise(x0, initial_noise.to(latents.dtype), timesteps)

    @staticmethod
    def _clean_estimate(scheduler, latents, model_output, t):
        prediction = scheduler.config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"the spatial resampler supports epsilon and v_prediction models, not {prediction!r}")
        latents, model_output = latents.float(), model_output.float()
        init_sigma = scheduler.init_noise_sigma
        sigma_convention = float(init_sigma) != 1.0 and getattr(scheduler, "step_index", None) is not None
        if sigma_convention:  # Euler-type: x = x0 + sigma * eps
            sigma = scheduler.sigmas[scheduler.step_index].to(latents.device, torch.float32)
            if prediction == "epsilon":
                return latents - sigma * model_output
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + latents / (sigma**2 + 1)
        # DDPM convention: x = sqrt(a) x0 + sqrt(1 - a) eps
        alphas = scheduler.alphas_cumprod.to(latents.device, torch.float32)
        a = alphas[t.to(latents.device).round().long().clamp(0, alphas.shape[0] - 1)]
        if prediction == "epsilon":
            return (latents - (1 - a) ** 0.5 * model_output) / a**0.5
        return a**0.5 * latents - (1 - a) ** 0.5 * model_output
