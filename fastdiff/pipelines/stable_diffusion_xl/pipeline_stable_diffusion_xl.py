"""``StableDiffusionXLPipeline``: text-to-image with SDXL (diffusers' API and images).

SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis, Podell et al. 2023
(https://arxiv.org/abs/2307.01952): two text encoders whose penultimate hidden states are
concatenated, the second encoder's pooled embedding, and size/crop conditioning (``add_time_ids``).

Reads top to bottom: ``check_inputs``, ``encode_prompt``, ``prepare_latents``, ``_get_add_time_ids``,
``denoise_step``, ``__call__``. As in fastdiff's SD pipeline, the guidance combine is folded into the
scheduler's step and each step's inputs live on the device. No invisible watermark is applied
(diffusers applies one only when the invisible-watermark package is installed).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from fastdiff.loaders.lora import StableDiffusionXLLoraLoaderMixin
from fastdiff.pipelines.image_processor import VaeImageProcessor, check_output_type
from fastdiff.pipelines.pipeline_utils import DiffusionPipeline, GraphPipelineMixin, check_component_type, warn_old_config
from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    get_guidance_scale_embedding,
    rescale_noise_cfg,
    retrieve_timesteps,
)
from fastdiff.schedulers.scheduling_utils import randn_tensor
from fastdiff.utils.outputs import BaseOutput

logger = logging.getLogger(__name__)


@dataclass
class StableDiffusionXLPipelineOutput(BaseOutput):
    """Args:
    images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the images (or latents).
    """

    images: Union[List[Any], np.ndarray, torch.Tensor]


class StableDiffusionXLPipeline(DiffusionPipeline, GraphPipelineMixin, StableDiffusionXLLoraLoaderMixin):
    """Args:
    vae (`AutoencoderKL`), text_encoder (`CLIPTextModel`), text_encoder_2 (`CLIPTextModelWithProjection`),
    tokenizer, tokenizer_2 (`CLIPTokenizer`), unet (`UNet2DConditionModel` with ``addition_embed_type="text_time"``),
    scheduler (any fastdiff scheduler), force_zeros_for_empty_prompt (`bool`): without a negative prompt,
    the negative embeddings are zeros (SDXL base's setting).
    """

    _optional_components = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "image_encoder", "feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: Optional[bool] = None,
    ):
        super().__init__()
        name = type(self).__name__
        check_component_type(name, "vae", vae, ("AutoencoderKL",))
        check_component_type(name, "unet", unet, ("UNet2DConditionModel",))
        check_component_type(name, "scheduler", scheduler, ("SchedulerMixin",))
        if image_encoder is not None:
            raise ValueError(f"{name}: image_encoder (IP-Adapter) is not supported by fastdiff; pass None")
        if add_watermarker:
            raise ValueError(f"{name}: add_watermarker=True is not supported by fastdiff (no invisible watermark)")
        self._fix_old_configs(scheduler, unet)
        self._check_component_fit(vae, text_encoder, text_encoder_2, unet)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.default_sample_size = unet.config.sample_size if unet is not None else 128
        self._temperature_scheduler = None
        self._spatial_resampler = None

    @staticmethod
    def _fix_old_configs(scheduler, unet) -> None:
        """Rewrite the old config values diffusers rewrites, with one warning naming each key."""
        if scheduler is not None:
            config = scheduler.config
            if "steps_offset" in config and config["steps_offset"] != 1:
                warn_old_config("scheduler", "steps_offset", config["steps_offset"], 1, "configs before diffusers 0.6")
                scheduler.register_to_config(steps_offset=1)
            if config.get("clip_sample") is True:
                warn_old_config("scheduler", "clip_sample", True, False, "latent diffusion does not clip samples")
                scheduler.register_to_config(clip_sample=False)

    def _check_component_fit(self, vae, text_encoder, text_encoder_2, unet) -> None:
        name = type(self).__name__
        if unet is not None and unet.config.addition_embed_type != "text_time":
            raise ValueError(
                f"{name}: unet.config.addition_embed_type must be 'text_time' (SDXL's size conditioning), "
                f"got {unet.config.addition_embed_type!r}"
            )
        if unet is not None and text_encoder_2 is not None:
            hidden = text_encoder_2.config.hidden_size + (text_encoder.config.hidden_size if text_encoder else 0)
            if unet.config.cross_attention_dim != hidden:
                raise ValueError(
                    f"{name}: unet.config.cross_attention_dim={unet.config.cross_attention_dim} does not match the "
                    f"text encoders' hidden sizes (text_encoder + text_encoder_2 = {hidden})"
                )
        if unet is not None and vae is not None and unet.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"{name}: unet.config.in_channels={unet.config.in_channels} does not match "
                f"vae.config.latent_channels={vae.config.latent_channels}"
            )

    # ---------------------------------------------------------------- properties (as diffusers')

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def guidance_rescale(self):
        return self._guidance_rescale

    @property
    def clip_skip(self):
        return self._clip_skip

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    @property
    def denoising_end(self):
        return self._denoising_end

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ----------------------------------------------------------------------- fastdiff controls

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.set_temperature_scheduler
    def set_temperature_scheduler(self, temperature_scheduler) -> None:
        """Attach a :class:`fastdiff.TemperatureScheduler`: tau(0) scales the initial noise and tau(i)
        the noise a stochastic scheduler injects at step i. ``None`` restores tau = 1 (bitwise the plain
        pipeline). It follows the pipeline when ``pipe.scheduler`` is replaced."""
        self._temperature_scheduler = temperature_scheduler
        self.scheduler.set_temperature_scheduler(temperature_scheduler)

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.set_spatial_resampler
    def set_spatial_resampler(self, resampler) -> None:
        """Attach a :class:`fastdiff.Resampler` (denoise the first steps at a lower latent resolution),
        or ``None`` for the plain full-resolution loop (bitwise)."""
        from fastdiff.pipelines.resampler import Resampler

        if resampler is not None and not isinstance(resampler, Resampler):
            raise TypeError(f"set_spatial_resampler: expected a fastdiff.Resampler or None, got {type(resampler).__name__}")
        self._spatial_resampler = resampler

    # --------------------------------------------------------------------------- inputs

    def check_inputs(
        self,
        prompt,
        prompt_2,
        height,
        width,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled_prompt_embeds=None,
        negative_pooled_prompt_embeds=None,
        callback_on_step_end_tensor_inputs=None,
    ):
        if height % self.vae_scale_factor != 0 or width % self.vae_scale_factor != 0:
            raise ValueError(
                f"height and width must be divisible by {self.vae_scale_factor} (the VAE's scale factor), got "
                f"height={height}, width={width}"
            )
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"callback_on_step_end_tensor_inputs: {unknown} are not available; choose from "
                    f"{self._callback_tensor_inputs}"
                )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt_2 is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt_2` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass `prompt` or `prompt_embeds`")
        for arg, value in (("prompt", prompt), ("prompt_2", prompt_2)):
            if value is not None and not isinstance(value, (str, list)):
                raise ValueError(f"{arg}: expected a str or a list of str, got {type(value).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if negative_prompt_2 is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt_2` or `negative_prompt_embeds`, not both")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
                )
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds (from text_encoder_2) as well")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds as well")

    def _tokenize(self, tokenizer, text, max_length):
        inputs = tokenizer(text, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        untruncated = tokenizer(text, padding="longest", return_tensors="pt").input_ids
        if untruncated.shape[-1] >= inputs.input_ids.shape[-1] and not torch.equal(inputs.input_ids, untruncated):
            removed = tokenizer.batch_decode(untruncated[:, tokenizer.model_max_length - 1 : -1])
            logger.warning("The prompt was truncated to %d tokens; dropped: %s", tokenizer.model_max_length, removed)
        return inputs.input_ids

    def encode_prompt(
        self,
        prompt,
        prompt_2=None,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        lora_scale: Optional[float] = None,
        clip_skip: Optional[int] = None,
    ):
        """``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)``.

        The sequence embeddings concatenate both encoders' penultimate hidden states (or the one
        ``clip_skip`` selects); the pooled embedding is the last encoder's projected output.
        """
        with self._lora_text_scale(lora_scale):  # the text encoders' LoRA layers at lora_scale
            device = device or self._execution_device
            prompt = [prompt] if isinstance(prompt, str) else prompt
            batch_size = len(prompt) if prompt is not None else prompt_embeds.shape[0]
            tokenizers = [self.tokenizer, self.tokenizer_2] if self.tokenizer is not None else [self.tokenizer_2]
            encoders = [self.text_encoder, self.text_encoder_2] if self.text_encoder is not None else [self.text_encoder_2]

            if prompt_embeds is None:
                if self.tokenizer_2 is None or self.text_encoder_2 is None:
                    raise ValueError("prompt: this pipeline has no tokenizer_2/text_encoder_2; pass prompt_embeds")
                prompt_2 = prompt_2 or prompt
                prompt_2 = [prompt_2] if isinstance(prompt_2, str) else prompt_2
                embeds_list = []
                for text, tokenizer, encoder in zip([prompt, prompt_2], tokenizers, encoders):
                    ids = self._tokenize(tokenizer, text, tokenizer.model_max_length)
                    out = encoder(ids.to(device), output_hidden_states=True)
                    if pooled_prompt_embeds is None and out[0].ndim == 2:
                        pooled_prompt_embeds = out[0]
                    layer = -2 if clip_skip is None else -(clip_skip + 2)
                    embeds_list.append(out.hidden_states[layer])
                prompt_embeds = torch.concat(embeds_list, dim=-1)

            zero_out_negative = negative_prompt is None and self.config.force_zeros_for_empty_prompt
            if do_classifier_free_guidance and negative_prompt_embeds is None and zero_out_negative:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            elif do_classifier_free_guidance and negative_prompt_embeds is None:
                negative_prompt = negative_prompt or ""
                negative_prompt_2 = negative_prompt_2 or negative_prompt
                negative_prompt = batch_size * [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
                negative_prompt_2 = batch_size * [negative_prompt_2] if isinstance(negative_prompt_2, str) else negative_prompt_2
                if prompt is not None and type(prompt) is not type(negative_prompt):
                    raise TypeError(
                        f"negative_prompt must be of the same type as prompt: {type(negative_prompt).__name__} != "
                        f"{type(prompt).__name__}"
                    )
                if batch_size != len(negative_prompt):
                    raise ValueError(
                        f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch_size}; they must match"
                    )
                negative_list = []
                for text, tokenizer, encoder in zip([negative_prompt, negative_prompt_2], tokenizers, encoders):
                    uncond = tokenizer(
                        text, padding="max_length", max_length=prompt_embeds.shape[1], truncation=True, return_tensors="pt"
                    )
                    out = encoder(uncond.input_ids.to(device), output_hidden_states=True)
                    if negative_pooled_prompt_embeds is None and out[0].ndim == 2:
                        negative_pooled_prompt_embeds = out[0]
                    negative_list.append(out.hidden_states[-2])
                negative_prompt_embeds = torch.concat(negative_list, dim=-1)

            if self.text_encoder_2 is not None:
                dtype = self.text_encoder_2.dtype
            else:
                dtype = self.unet.dtype
            prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
            bs_embed, seq_len, _ = prompt_embeds.shape
            prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1).view(bs_embed * num_images_per_prompt, seq_len, -1)
            if do_classifier_free_guidance:
                seq_len = negative_prompt_embeds.shape[1]
                negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
                negative_prompt_embeds = negative_prompt_embeds.repeat(1, num_images_per_prompt, 1)
                negative_prompt_embeds = negative_prompt_embeds.view(batch_size * num_images_per_prompt, seq_len, -1)
            pooled_prompt_embeds = pooled_prompt_embeds.repeat(1, num_images_per_prompt).view(bs_embed * num_images_per_prompt, -1)
            if do_classifier_free_guidance:
                negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.repeat(1, num_images_per_prompt)
                negative_pooled_prompt_embeds = negative_pooled_prompt_embeds.view(bs_embed * num_images_per_prompt, -1)
            return prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.prepare_extra_step_kwargs
    def prepare_extra_step_kwargs(self, generator, eta):
        """``eta`` (DDIM only) and ``generator`` for the schedulers whose ``step`` takes them."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in params:
            extra["eta"] = eta
        if "generator" in params:
            extra["generator"] = generator
        return extra

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.prepare_latents
    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, num_channels_latents, int(height) // self.vae_scale_factor, int(width) // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator: got a list of {len(generator)} generators for an effective batch of {batch_size} "
                "(prompts x num_images_per_prompt); pass one per image"
            )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            if self._temperature_scheduler is not None:
                latents = self._temperature_scheduler.scale_initial_noise(latents, self.scheduler.num_inference_steps)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
            latents = latents.to(device)
        return latents * self.scheduler.init_noise_sigma

    def _get_add_time_ids(self, original_size, crops_coords_top_left, target_size, dtype, text_encoder_projection_dim):
        add_time_ids = list(original_size) + list(crops_coords_top_left) + list(target_size)
        passed = self.unet.config.addition_time_embed_dim * len(add_time_ids) + text_encoder_projection_dim
        expected = self.unet.config.projection_class_embeddings_input_dim
        if expected is not None and passed != expected:
            raise ValueError(
                f"the UNet expects {expected} added embedding features (projection_class_embeddings_input_dim) but "
                f"the pipeline makes {passed} (addition_time_embed_dim * {len(add_time_ids)} + text_encoder_2 "
                f"projection_dim {text_encoder_projection_dim}); check unet.config.addition_time_embed_dim and "
                "text_encoder_2.config.projection_dim"
            )
        return torch.tensor([add_time_ids], dtype=dtype)

    # ------------------------------------------------------------------------------ the loop

    def _explain_inputs(self, height, width, batch_size, guidance_scale, device, dtype, call_kwargs):
        """The first step's inputs at these shapes, for :meth:`explain` (made under FakeTensorMode)."""
        cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        rows = batch_size * (2 if cfg else 1)
        length = self.tokenizer.model_max_length if self.tokenizer is not None else 77
        config = self.unet.config
        shape = (batch_size, config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        time_ids = 6
        pooled = config.projection_class_embeddings_input_dim - config.addition_time_embed_dim * time_ids
        inputs = dict(
            latents=torch.empty(shape, device=device, dtype=dtype),
            t=self.scheduler.timesteps[0],
            prompt_embeds=torch.empty((rows, length, config.cross_attention_dim), device=device, dtype=dtype),
            guidance=torch.empty((1,), device=device) if cfg else None,
            added_cond_kwargs={
                "text_embeds": torch.empty((rows, pooled), device=device, dtype=dtype),
                "time_ids": torch.empty((rows, time_ids), device=device, dtype=dtype),
            },
        )
        self._guidance_rescale = call_kwargs.get("guidance_rescale", 0.0)
        self._cross_attention_kwargs = None
        return inputs, dict(extra_step_kwargs=self._explain_scheduler_kwargs(self.scheduler, call_kwargs))

    def denoise_step(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance: Optional[torch.Tensor],
        extra_step_kwargs: Dict[str, Any],
        timestep_cond: Optional[torch.Tensor] = None,
        added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """One denoising step; every per-step input is a device tensor (``t``; ``guidance`` is the
        (1,) float32 guidance scale, or None without CFG), so the step can be captured as a graph."""
        latent_model_input = torch.cat([latents] * 2) if guidance is not None else latents
        latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
        noise_pred = self.unet(
            latent_model_input,
            t,
            encoder_hidden_states=prompt_embeds,
            timestep_cond=timestep_cond,
            cross_attention_kwargs=self._cross_attention_kwargs,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )[0]
        if guidance is not None and self._guidance_rescale > 0.0:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = (noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)).to(noise_pred_text.dtype)
            noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self._guidance_rescale)
            return self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        return self.scheduler.step(
            noise_pred, t, latents, **extra_step_kwargs, guidance_scale=guidance, return_dict=False
        )[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]] = None,
        prompt_2: Optional[Union[str, List[str]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        denoising_end: Optional[float] = None,
        guidance_scale: float = 5.0,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        negative_prompt_2: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        pooled_prompt_embeds: Optional[torch.Tensor] = None,
        negative_pooled_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        original_size: Optional[Tuple[int, int]] = None,
        crops_coords_top_left: Tuple[int, int] = (0, 0),
        target_size: Optional[Tuple[int, int]] = None,
        negative_original_size: Optional[Tuple[int, int]] = None,
        negative_crops_coords_top_left: Tuple[int, int] = (0, 0),
        negative_target_size: Optional[Tuple[int, int]] = None,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[[Any, int, Any, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        cuda_graph: Optional[bool] = None,
    ):
        """Generate images from ``prompt`` (and ``prompt_2`` for the second encoder); diffusers' arguments.

        Returns `StableDiffusionXLPipelineOutput`, or ``(images,)`` when ``return_dict=False``.
        """
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        check_output_type(output_type)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive int, got {num_images_per_prompt!r}")
        if denoising_end is not None and not (isinstance(denoising_end, float) and 0 < denoising_end < 1):
            raise ValueError(f"denoising_end: expected a float in (0, 1), got {denoising_end!r}")
        self.check_inputs(
            prompt, prompt_2, height, width, negative_prompt, negative_prompt_2, prompt_embeds, negative_prompt_embeds,
            pooled_prompt_embeds, negative_pooled_prompt_embeds, callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False
        self.scheduler.set_temperature_scheduler(self._temperature_scheduler)

        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        (prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds) = self.encode_prompt(
            prompt, prompt_2, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
            negative_prompt_2, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=self.clip_skip,
        )  # fmt: skip

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)

        resampler = self._spatial_resampler
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, self.unet.config.in_channels, height, width,
            prompt_embeds.dtype, device, generator, latents,
        )  # fmt: skip
        initial_noise = None
        if resampler is not None:
            initial_noise = latents / self.scheduler.init_noise_sigma
            latents = resampler.downsample(latents, self.unet)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        add_text_embeds = pooled_prompt_embeds
        if self.text_encoder_2 is None:
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        add_time_ids = self._get_add_time_ids(
            original_size, crops_coords_top_left, target_size, prompt_embeds.dtype, projection_dim
        )
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size, prompt_embeds.dtype,
                projection_dim,
            )  # fmt: skip
        else:
            negative_add_time_ids = add_time_ids
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds], dim=0)
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids], dim=0)
        prompt_embeds = prompt_embeds.to(device)
        add_text_embeds = add_text_embeds.to(device)
        add_time_ids = add_time_ids.to(device).repeat(batch_size * num_images_per_prompt, 1)

        if self.denoising_end is not None:
            total = self.scheduler.config.num_train_timesteps
            cutoff = int(round(total - (self.denoising_end * total)))
            num_inference_steps = len([ts for ts in timesteps.tolist() if ts >= cutoff])
            timesteps = timesteps[:num_inference_steps]

        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = get_guidance_scale_embedding(scale, self.unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=device, dtype=latents.dtype)
        guidance = None
        if self.do_classifier_free_guidance:
            guidance = torch.full((1,), float(guidance_scale), dtype=torch.float32, device=device)

        switch_index = resampler.switch_index(len(timesteps), self.scheduler.order) if resampler is not None else None
        region = self._denoise_region(
            dict(
                latents=latents, t=timesteps[0], prompt_embeds=prompt_embeds, guidance=guidance,
                timestep_cond=timestep_cond, added_cond_kwargs={"text_embeds": add_text_embeds, "time_ids": add_time_ids},
            ),
            step_kwargs=dict(extra_step_kwargs=extra_step_kwargs),
            scheduler_kwargs={k: v for k, v in extra_step_kwargs.items() if k != "generator"},
            extra=(guidance_rescale, cross_attention_kwargs), cuda_graph=cuda_graph, generator=generator,
            callback_on_step_end=callback_on_step_end, callback_tensor_inputs=callback_on_step_end_tensor_inputs,
            reasons=self._loop_reasons({}),
        )  # fmt: skip
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
                if i == switch_index:
                    latents = resampler.upsample(
                        self, latents, t, i, prompt_embeds, guidance, initial_noise, timestep_cond=timestep_cond,
                        added_cond_kwargs=added_cond_kwargs,
                    )  # fmt: skip
                latents = region(
                    latents=latents, t=t, prompt_embeds=prompt_embeds, guidance=guidance, timestep_cond=timestep_cond,
                    added_cond_kwargs=added_cond_kwargs,
                )  # fmt: skip
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    add_text_embeds = callback_outputs.pop("add_text_embeds", add_text_embeds)
                    add_time_ids = callback_outputs.pop("add_time_ids", add_time_ids)
                if i == len(timesteps) - 1 or (i + 1) % self.scheduler.order == 0:
                    progress_bar.update()

        latents = latents.clone()  # a captured loop's output is a static buffer
        if output_type != "latent":
            needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast
            if needs_upcasting:
                self.vae.to(dtype=torch.float32)
                latents = latents.to(torch.float32)
            elif latents.dtype != self.vae.dtype:
                latents = latents.to(self.vae.dtype)
            mean, std = self.vae.config.get("latents_mean"), self.vae.config.get("latents_std")
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / self.vae.config.scaling_factor + mean
            else:
                latents = latents / self.vae.config.scaling_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            if needs_upcasting:
                self.vae.to(dtype=torch.float16)
            image = self.image_processor.postprocess(image, output_type=output_type)
        else:
            image = latents
        if not return_dict:
            return (image,)
        return StableDiffusionXLPipelineOutput(images=image)
