"""``StableDiffusionPipeline``: text-to-image with Stable Diffusion 1.x/2.x (diffusers' API and images).

High-Resolution Image Synthesis with Latent Diffusion Models, Rombach et al. 2022
(https://arxiv.org/abs/2112.10752), with classifier-free guidance (Ho and Salimans 2022,
https://arxiv.org/abs/2207.12598).

Reads top to bottom as diffusers' file does: ``check_inputs``, ``encode_prompt``,
``prepare_latents``, then ``__call__``. What differs:

* the guidance combine is folded into the scheduler's step (``step(..., guidance_scale=)`` takes the
  batched uncond-first output), so on CUDA the combine and the update are one launch;
* each step is one call of :meth:`denoise_step`, whose per-step inputs (the timestep, the guidance
  scale) are device tensors, so a CUDA-graph runner can capture it;
* fastdiff's controls: :meth:`set_temperature_scheduler` and :meth:`set_spatial_resampler`.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from fastdiff.loaders.lora import StableDiffusionLoraLoaderMixin
from fastdiff.pipelines.image_processor import VaeImageProcessor, check_output_type
from fastdiff.pipelines.pipeline_utils import DiffusionPipeline, GraphPipelineMixin, check_component_type, warn_old_config
from fastdiff.schedulers.scheduling_utils import randn_tensor
from fastdiff.utils.outputs import BaseOutput

logger = logging.getLogger(__name__)


@dataclass
class StableDiffusionPipelineOutput(BaseOutput):
    """Args:
    images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): the images (or latents).
    nsfw_content_detected (`list[bool]` or None): per image, whether the safety checker flagged it
        (None without a safety checker).
    """

    images: Union[List[Any], np.ndarray, torch.Tensor]
    nsfw_content_detected: Optional[List[bool]]


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale=0.0):
    """Rescale the guided prediction towards the text prediction's std (Lin et al. 2023,
    https://arxiv.org/abs/2305.08891, section 3.4), mixing by ``guidance_rescale``."""
    dims = list(range(1, noise_pred_text.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def retrieve_timesteps(scheduler, num_inference_steps=None, device=None, timesteps=None, sigmas=None):
    """Set the scheduler's schedule from a step count, or custom ``timesteps`` or ``sigmas``; returns
    ``(timesteps, num_inference_steps)``. A scheduler that does not take the custom form raises."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass only one of `timesteps` and `sigmas`")
    params = set(inspect.signature(scheduler.set_timesteps).parameters)
    for name, value in (("timesteps", timesteps), ("sigmas", sigmas)):
        if value is not None:
            if name not in params:
                raise ValueError(f"{name}: {type(scheduler).__name__}.set_timesteps does not take custom {name}")
            scheduler.set_timesteps(**{name: value}, device=device)
            return scheduler.timesteps, len(scheduler.timesteps)
    scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler.timesteps, num_inference_steps


def get_guidance_scale_embedding(w: torch.Tensor, embedding_dim: int = 512, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of the guidance scale for guidance-distilled UNets (``time_cond_proj_dim``)."""
    w = w * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class StableDiffusionPipeline(DiffusionPipeline, GraphPipelineMixin, StableDiffusionLoraLoaderMixin):
    """Args:
    vae (`AutoencoderKL`), text_encoder (`transformers.CLIPTextModel`), tokenizer (`transformers.CLIPTokenizer`),
    unet (`UNet2DConditionModel`), scheduler (any fastdiff scheduler),
    safety_checker (`StableDiffusionSafetyChecker` or None), feature_extractor (`transformers.CLIPImageProcessor`
    or None), requires_safety_checker (`bool`): warn when the safety checker is None.
    """

    _optional_components = ["safety_checker", "feature_extractor", "image_encoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        safety_checker,
        feature_extractor,
        image_encoder=None,
        requires_safety_checker: bool = True,
    ):
        super().__init__()
        name = type(self).__name__
        check_component_type(name, "vae", vae, ("AutoencoderKL",))
        check_component_type(name, "unet", unet, ("UNet2DConditionModel",))
        check_component_type(name, "scheduler", scheduler, ("SchedulerMixin",))
        if image_encoder is not None:
            raise ValueError(f"{name}: image_encoder (IP-Adapter) is not supported by fastdiff; pass None")
        self._fix_old_configs(scheduler, unet)
        if safety_checker is None and requires_safety_checker:
            logger.warning(
                "%s: the safety checker is disabled (safety_checker=None); keep it enabled in public services. "
                "Pass requires_safety_checker=False to silence this.",
                name,
            )
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(f"{name}: a safety_checker needs a feature_extractor (CLIPImageProcessor) to prepare its input")
        self._check_component_fit(vae, text_encoder, unet)
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.register_to_config(requires_safety_checker=requires_safety_checker)
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
        if unet is not None:
            version = unet.config.get("_diffusers_version")
            size = unet.config.get("sample_size")
            if version is not None and isinstance(size, int) and size < 64 and _version_below(version, (0, 9)):
                warn_old_config("unet", "sample_size", size, 64, "configs written before diffusers 0.9")
                unet.register_to_config(sample_size=64)

    def _check_component_fit(self, vae, text_encoder, unet) -> None:
        name = type(self).__name__
        if unet is not None and text_encoder is not None:
            hidden = text_encoder.config.hidden_size
            if unet.config.cross_attention_dim != hidden:
                raise ValueError(
                    f"{name}: unet.config.cross_attention_dim={unet.config.cross_attention_dim} does not match "
                    f"text_encoder.config.hidden_size={hidden}"
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
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ----------------------------------------------------------------------- fastdiff controls

    def set_temperature_scheduler(self, temperature_scheduler) -> None:
        """Attach a :class:`fastdiff.TemperatureScheduler`: tau(0) scales the initial noise and tau(i)
        the noise a stochastic scheduler injects at step i. ``None`` restores tau = 1 (bitwise the plain
        pipeline). It follows the pipeline when ``pipe.scheduler`` is replaced."""
        self._temperature_scheduler = temperature_scheduler
        self.scheduler.set_temperature_scheduler(temperature_scheduler)

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
        height,
        width,
        callback_steps,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
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
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass `prompt` or `prompt_embeds`")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise ValueError(f"prompt: expected a str or a list of str, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either `negative_prompt` or `negative_prompt_embeds`, not both")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
                )

    def _encode_text(self, text_input_ids, attention_mask, device, clip_skip):
        if clip_skip is None:
            return self.text_encoder(text_input_ids.to(device), attention_mask=attention_mask)[0]
        out = self.text_encoder(text_input_ids.to(device), attention_mask=attention_mask, output_hidden_states=True)
        # hidden_states[-1] is the last layer's output before the final layer norm
        hidden = out.hidden_states[-(clip_skip + 1)]
        # transformers < 5 nests the layers under `text_model`; 5.x puts them on the model itself
        final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_layer_norm(hidden)

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_classifier_free_guidance,
        negative_prompt=None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        lora_scale: Optional[float] = None,
        clip_skip: Optional[int] = None,
    ):
        """Text embeddings ``(prompt_embeds, negative_prompt_embeds)``, each (B * n, L, D).

        ``lora_scale`` scales the text encoders' LoRA layers (None: the call's ``cross_attention_kwargs`` scale).
        """
        with self._lora_text_scale(lora_scale):  # the text encoders' LoRA layers at lora_scale
            if prompt is not None and isinstance(prompt, str):
                batch_size = 1
            elif prompt is not None and isinstance(prompt, list):
                batch_size = len(prompt)
            else:
                batch_size = prompt_embeds.shape[0]

            use_mask = getattr(self.text_encoder.config, "use_attention_mask", False) if self.text_encoder else False
            if prompt_embeds is None:
                if self.tokenizer is None or self.text_encoder is None:
                    raise ValueError("prompt: this pipeline has no tokenizer/text_encoder; pass prompt_embeds instead")
                text_inputs = self.tokenizer(
                    prompt,
                    padding="max_length",
                    max_length=self.tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                text_input_ids = text_inputs.input_ids
                untruncated_ids = self.tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
                if untruncated_ids.shape[-1] >= text_input_ids.shape[-1] and not torch.equal(text_input_ids, untruncated_ids):
                    removed = self.tokenizer.batch_decode(untruncated_ids[:, self.tokenizer.model_max_length - 1 : -1])
                    logger.warning(
                        "The prompt was truncated to %d tokens; dropped: %s", self.tokenizer.model_max_length, removed
                    )
                attention_mask = text_inputs.attention_mask.to(device) if use_mask else None
                prompt_embeds = self._encode_text(text_input_ids, attention_mask, device, clip_skip)

            if self.text_encoder is not None:
                dtype = self.text_encoder.dtype
            elif self.unet is not None:
                dtype = self.unet.dtype
            else:
                dtype = prompt_embeds.dtype
            prompt_embeds = prompt_embeds.to(dtype=dtype, device=device)
            bs_embed, seq_len, _ = prompt_embeds.shape
            prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1).view(bs_embed * num_images_per_prompt, seq_len, -1)

            if do_classifier_free_guidance and negative_prompt_embeds is None:
                if negative_prompt is None:
                    uncond_tokens = [""] * batch_size
                elif prompt is not None and type(prompt) is not type(negative_prompt):
                    raise TypeError(
                        f"negative_prompt must be of the same type as prompt: {type(negative_prompt).__name__} != "
                        f"{type(prompt).__name__}"
                    )
                elif isinstance(negative_prompt, str):
                    uncond_tokens = [negative_prompt]
                elif batch_size != len(negative_prompt):
                    raise ValueError(
                        f"negative_prompt has {len(negative_prompt)} entries but prompt has {batch_size}; they must match"
                    )
                else:
                    uncond_tokens = negative_prompt
                if self.tokenizer is None or self.text_encoder is None:
                    raise ValueError("this pipeline has no tokenizer/text_encoder; pass negative_prompt_embeds")
                uncond_input = self.tokenizer(
                    uncond_tokens, padding="max_length", max_length=prompt_embeds.shape[1], truncation=True, return_tensors="pt"
                )
                attention_mask = uncond_input.attention_mask.to(device) if use_mask else None
                negative_prompt_embeds = self.text_encoder(uncond_input.input_ids.to(device), attention_mask=attention_mask)[0]

            if do_classifier_free_guidance:
                seq_len = negative_prompt_embeds.shape[1]
                negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
                negative_prompt_embeds = negative_prompt_embeds.repeat(1, num_images_per_prompt, 1)
                negative_prompt_embeds = negative_prompt_embeds.view(batch_size * num_images_per_prompt, seq_len, -1)
            return prompt_embeds, negative_prompt_embeds

    def run_safety_checker(self, image, device, dtype):
        if self.safety_checker is None:
            return image, None
        if torch.is_tensor(image):
            extractor_input = self.image_processor.postprocess(image, output_type="pil")
        else:
            extractor_input = self.numpy_to_pil(image)
        checker_input = self.feature_extractor(extractor_input, return_tensors="pt").to(device)
        return self.safety_checker(images=image, clip_input=checker_input.pixel_values.to(dtype))

    def prepare_extra_step_kwargs(self, generator, eta):
        """``eta`` (DDIM only) and ``generator`` for the schedulers whose ``step`` takes them."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in params:
            extra["eta"] = eta
        if "generator" in params:
            extra["generator"] = generator
        return extra

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

    # ------------------------------------------------------------------------------ the loop

    def _explain_inputs(self, height, width, batch_size, guidance_scale, device, dtype, call_kwargs):
        """The first step's inputs at these shapes, for :meth:`explain` (made under FakeTensorMode)."""
        cfg = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        rows = batch_size * (2 if cfg else 1)
        length = self.tokenizer.model_max_length if self.tokenizer is not None else 77
        channels = self.unet.config.in_channels
        shape = (batch_size, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        inputs = dict(
            latents=torch.empty(shape, device=device, dtype=dtype),
            t=self.scheduler.timesteps[0],
            prompt_embeds=torch.empty((rows, length, self.unet.config.cross_attention_dim), device=device, dtype=dtype),
            guidance=torch.empty((1,), device=device) if cfg else None,
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
            # rescaling needs the text half and the guided output: combine here, plain step
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
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        guidance_scale: float = 7.5,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        num_images_per_prompt: Optional[int] = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        guidance_rescale: float = 0.0,
        clip_skip: Optional[int] = None,
        callback_on_step_end: Optional[Callable[[Any, int, Any, Dict], Dict]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
        cuda_graph: Optional[bool] = None,
    ):
        """Generate images from ``prompt`` (or ``prompt_embeds``); diffusers' arguments and defaults.

        ``cuda_graph``: ``False`` runs this call's loop eagerly; ``None`` follows ``enable_cuda_graph`` (on by
        default, captured on CUDA; ``explain()`` says when and why a loop runs eagerly instead).
        Returns `StableDiffusionPipelineOutput` (``images``, ``nsfw_content_detected``), or the tuple
        ``(images, nsfw_content_detected)`` when ``return_dict=False``.
        """
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        check_output_type(output_type)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt: expected a positive int, got {num_images_per_prompt!r}")
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds,
            callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
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

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)

        num_channels_latents = self.unet.config.in_channels
        resampler = self._spatial_resampler
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt, num_channels_latents, height, width,
            prompt_embeds.dtype, device, generator, latents,
        )  # fmt: skip
        initial_noise = None
        if resampler is not None:
            initial_noise = latents / self.scheduler.init_noise_sigma
            latents = resampler.downsample(latents, self.unet)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = get_guidance_scale_embedding(scale, self.unet.config.time_cond_proj_dim)
            timestep_cond = timestep_cond.to(device=device, dtype=latents.dtype)
        # the guidance scale lives on the device, once per call (no host value inside the loop)
        guidance = None
        if self.do_classifier_free_guidance:
            guidance = torch.full((1,), float(guidance_scale), dtype=torch.float32, device=device)

        switch_index = resampler.switch_index(len(timesteps), self.scheduler.order) if resampler is not None else None
        region = self._denoise_region(
            dict(latents=latents, t=timesteps[0], prompt_embeds=prompt_embeds, guidance=guidance, timestep_cond=timestep_cond),
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
                if i == switch_index:
                    latents = resampler.upsample(
                        self, latents, t, i, prompt_embeds, guidance, initial_noise, timestep_cond=timestep_cond,
                    )  # fmt: skip
                latents = region(
                    latents=latents, t=t, prompt_embeds=prompt_embeds, guidance=guidance, timestep_cond=timestep_cond
                )

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

        latents = latents.clone()  # a captured loop's output is a static buffer
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


def _version_below(version: str, bound) -> bool:
    parts = []
    for piece in str(version).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) < tuple(bound)
