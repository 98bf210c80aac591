"""``StableDiffusionImg2ImgPipeline``: image-to-image with Stable Diffusion (diffusers' API and images).

SDEdit (Meng et al. 2021, https://arxiv.org/abs/2108.01073): the input image is encoded, noised to
the timestep that ``strength`` selects, and denoised from there with text guidance.

The text encoding, the safety checker and the step function are the text-to-image pipeline's
(this class derives from it, one level); what differs is here: ``get_timesteps``,
``prepare_latents`` (encode and noise the image) and ``__call__``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch

from fastdiff.pipelines.image_processor import check_output_type
from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
    StableDiffusionPipelineOutput,
    get_guidance_scale_embedding,
    retrieve_timesteps,
)
from fastdiff.schedulers.scheduling_utils import randn_tensor


def retrieve_latents(encoder_output, generator=None, sample_mode: str = "sample"):
    """A sample (or the mode) of the VAE's latent distribution, drawn from ``generator``."""
    if sample_mode == "sample":
        return encoder_output.latent_dist.sample(generator)
    return encoder_output.latent_dist.mode()


class StableDiffusionImg2ImgPipeline(StableDiffusionPipeline):
    """Same components as :class:`StableDiffusionPipeline`."""

    def check_img2img_inputs(self, image, strength):
        if image is None:
            raise ValueError("image: required (a PIL image, numpy array or tensor, or a list of them)")
        if not 0 <= strength <= 1:
            raise ValueError(f"strength: expected a value in [0.0, 1.0], got {strength}")

    def get_timesteps(self, num_inference_steps, strength, device):
        """The tail of the schedule that ``strength`` keeps, and its length."""
        init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
        t_start = int(max(num_inference_steps - init_timestep, 0))
        timesteps = self.scheduler.timesteps[t_start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * self.scheduler.order)
        return timesteps, num_inference_steps - t_start

    def prepare_latents(self, image, timestep, batch_size, num_images_per_prompt, dtype, device, generator=None):
        if not isinstance(image, (torch.Tensor, list)):
            raise ValueError(f"image: expected a preprocessed tensor, got {type(image).__name__}")
        image = image.to(device=device, dtype=dtype)
        batch_size = batch_size * num_images_per_prompt
        if image.shape[1] == self.vae.config.latent_channels:
            init_latents = image
        else:
            if isinstance(generator, list) and len(generator) != batch_size:
                raise ValueError(
                    f"generator: got a list of {len(generator)} generators for an effective batch of {batch_size}; "
                    "pass one per image"
                )
            if isinstance(generator, list):
                if image.shape[0] < batch_size and batch_size % image.shape[0] == 0:
                    image = torch.cat([image] * (batch_size // image.shape[0]), dim=0)
                init_latents = [
                    retrieve_latents(self.vae.encode(image[i : i + 1]), generator=generator[i])
                    for i in range(image.shape[0])
                ]
                init_latents = torch.cat(init_latents, dim=0)
            else:
                init_latents = retrieve_latents(self.vae.encode(image), generator=generator)
            init_latents = self.vae.config.scaling_factor * init_latents

        if batch_size > init_latents.shape[0]:
            if batch_size % init_latents.shape[0] != 0:
                raise ValueError(
                    f"image: cannot repeat {init_latents.shape[0]} images to fill an effective batch of {batch_size}"
                )
            init_latents = torch.cat([init_latents] * (batch_size // init_latents.shape[0]), dim=0)

        noise = randn_tensor(init_latents.shape, generator=generator, device=device, dtype=dtype)
        if self._temperature_scheduler is not None:
            noise = self._temperature_scheduler.scale_initial_noise(noise, self.scheduler.num_inference_steps)
        return self.scheduler.add_noise(init_latents, noise, timestep)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: Optional[int] = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        guidance_scale: Optional[float] = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: Optional[float] = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[[Any, int, Any, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
    ):
        """Transform ``image`` (PIL, numpy or tensor in [0, 1], single or a batch) following ``prompt``.

        ``strength`` in [0, 1] is how much of the schedule is run (1: the image is fully noised).
        Returns `StableDiffusionPipelineOutput`, or ``(images, nsfw_content_detected)``.
        """
        check_output_type(output_type)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive int, got {num_images_per_prompt!r}")
        self.check_img2img_inputs(image, strength)
        self.check_inputs(
            prompt, self.vae_scale_factor, self.vae_scale_factor, None, negative_prompt, prompt_embeds,
            negative_prompt_embeds, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._guidance_rescale = 0.0
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        self.scheduler.set_temperature_scheduler(self._temperature_scheduler)

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=self.clip_skip,
        )  # fmt: skip
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        image = self.image_processor.preprocess(image)

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        timesteps, num_inference_steps = self.get_timesteps(num_inference_steps, strength, device)
        if num_inference_steps < 1:
            raise ValueError(
                f"strength={strength} with num_inference_steps leaves no denoising step; raise either of them"
            )
        latent_timestep = timesteps[:1].repeat(batch_size * num_images_per_prompt)
        latents = self.prepare_latents(
            image, latent_timestep, batch_size, num_images_per_prompt, prompt_embeds.dtype, device, generator
        )
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = get_guidance_scale_embedding(scale, self.unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=device, dtype=latents.dtype)
        guidance = None
        if self.do_classifier_free_guidance:
            guidance = torch.full((1,), float(guidance_scale), dtype=torch.float32, device=device)

        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latents = self.denoise_step(latents, t, prompt_embeds, guidance, extra_step_kwargs, timestep_cond)
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                if i == len(timesteps) - 1 or (i + 1) % self.scheduler.order == 0:
                    progress_bar.update()

        if output_type != "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image, has_nsfw_concept = latents, None
        if has_nsfw_concept is None:
            do_denormalize = [True] * image.shape[0]
        else:
            do_denormalize = [not flagged for flagged in has_nsfw_concept]
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)
        if not return_dict:
            return (image, has_nsfw_concept)
        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)

    def set_spatial_resampler(self, resampler) -> None:
        raise NotImplementedError(
            "StableDiffusionImg2ImgPipeline: the spatial resampler is for text-to-image (it changes the starting "
            "resolution); use StableDiffusionPipeline"
        )
