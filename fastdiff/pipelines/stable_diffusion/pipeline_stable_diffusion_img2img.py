"""``StableDiffusionImg2ImgPipeline``: image-to-image with Stable Diffusion (diffusers' API and images).

SDEdit (Meng et al. 2021, https://arxiv.org/abs/2108.01073): the input image is encoded, noised to
the timestep that ``strength`` selects, and denoised from there with text guidance.

A single file in diffusers' style: the text encoding, the safety checker and the step function are
copied from the text-to-image pipeline (marked ``# Copied from``); what differs is
``get_timesteps``, ``prepare_latents`` (encode and noise the image) and ``__call__``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Dict, List, Optional, Union

import torch

from fastdiff.loaders.lora import StableDiffusionLoraLoaderMixin
from fastdiff.pipelines.image_processor import VaeImageProcessor, check_output_type
from fastdiff.pipelines.pipeline_utils import DiffusionPipeline, GraphPipelineMixin, check_component_type, warn_old_config
from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipelineOutput,
    _version_below,
    get_guidance_scale_embedding,
    rescale_noise_cfg,
    retrieve_timesteps,
)
from fastdiff.schedulers.scheduling_utils import randn_tensor

logger = logging.getLogger(__name__)


def retrieve_latents(encoder_output, generator=None, sample_mode: str = "sample"):
    """A sample (or the mode) of the VAE's latent distribution, drawn from ``generator``."""
    if sample_mode == "sample":
        return encoder_output.latent_dist.sample(generator)
    return encoder_output.latent_dist.mode()


class StableDiffusionImg2ImgPipeline(DiffusionPipeline, GraphPipelineMixin, StableDiffusionLoraLoaderMixin):
    """Args (as :class:`StableDiffusionPipeline`):
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

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline._fix_old_configs
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

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline._check_component_fit
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

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.guidance_scale
    @property
    def guidance_scale(self):
        return self._guidance_scale

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.guidance_rescale
    @property
    def guidance_rescale(self):
        return self._guidance_rescale

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.clip_skip
    @property
    def clip_skip(self):
        return self._clip_skip

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.do_classifier_free_guidance
    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.cross_attention_kwargs
    @property
    def cross_attention_kwargs(self):
        return self._cross_attention_kwargs

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.num_timesteps
    @property
    def num_timesteps(self):
        return self._num_timesteps

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.interrupt
    @property
    def interrupt(self):
        return self._interrupt

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.set_temperature_scheduler
    def set_temperature_scheduler(self, temperature_scheduler) -> None:
        """Attach a :class:`fastdiff.TemperatureScheduler`: tau(0) scales the initial noise and tau(i)
        the noise a stochastic scheduler injects at step i. ``None`` restores tau = 1 (bitwise the plain
        pipeline). It follows the pipeline when ``pipe.scheduler`` is replaced."""
        self._temperature_scheduler = temperature_scheduler
        self.scheduler.set_temperature_scheduler(temperature_scheduler)

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.check_inputs
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

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline._encode_text
    def _encode_text(self, text_input_ids, attention_mask, device, clip_skip):
        if clip_skip is None:
            return self.text_encoder(text_input_ids.to(device), attention_mask=attention_mask)[0]
        out = self.text_encoder(text_input_ids.to(device), attention_mask=attention_mask, output_hidden_states=True)
        # hidden_states[-1] is the last layer's output before the final layer norm
        hidden = out.hidden_states[-(clip_skip + 1)]
        # transformers < 5 nests the layers under `text_model`; 5.x puts them on the model itself
        final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_layer_norm(hidden)

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.encode_prompt
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

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.run_safety_checker
    def run_safety_checker(self, image, device, dtype):
        if self.safety_checker is None:
            return image, None
        if torch.is_tensor(image):
            extractor_input = self.image_processor.postprocess(image, output_type="pil")
        else:
            extractor_input = self.numpy_to_pil(image)
        checker_input = self.feature_extractor(extractor_input, return_tensors="pt").to(device)
        return self.safety_checker(images=image, clip_input=checker_input.pixel_values.to(dtype))

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

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline._explain_inputs
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

    # Copied from fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion.StableDiffusionPipeline.denoise_step
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
        cuda_graph: Optional[bool] = None,
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

        region = self._denoise_region(
            dict(latents=latents, t=timesteps[0], prompt_embeds=prompt_embeds, guidance=guidance, timestep_cond=timestep_cond),
            step_kwargs=dict(extra_step_kwargs=extra_step_kwargs),
            scheduler_kwargs={k: v for k, v in extra_step_kwargs.items() if k != "generator"},
            extra=(0.0, cross_attention_kwargs), cuda_graph=cuda_graph, generator=generator,
            callback_on_step_end=callback_on_step_end, callback_tensor_inputs=callback_on_step_end_tensor_inputs,
        )  # fmt: skip
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
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

    def set_spatial_resampler(self, resampler) -> None:
        """Not available here: the spatial resampler changes the starting resolution of text-to-image."""
        raise NotImplementedError(
            "StableDiffusionImg2ImgPipeline: the spatial resampler is for text-to-image (it changes the starting "
            "resolution); use StableDiffusionPipeline"
        )
