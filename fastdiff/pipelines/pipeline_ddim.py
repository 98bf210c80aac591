"""``DDIMPipeline``: unconditional image generation with DDIM sampling (diffusers' API).

Denoising Diffusion Implicit Models, Song et al. 2020 (https://arxiv.org/abs/2010.02502), eq. 12.
The scheduler is always converted to a ``DDIMScheduler`` (``from_config``), as in diffusers.
"""

from __future__ import annotations

import logging
from typing import List, Optional, Union

import torch

from fastdiff.pipelines.image_processor import check_output_type, numpy_to_pil, pt_to_numpy
from fastdiff.pipelines.pipeline_utils import (
    DiffusionPipeline,
    GraphPipelineMixin,
    ImagePipelineOutput,
    check_component_type,
)
from fastdiff.schedulers import DDIMScheduler
from fastdiff.schedulers.scheduling_utils import randn_tensor

logger = logging.getLogger(__name__)


class DDIMPipeline(DiffusionPipeline, GraphPipelineMixin):
    """Args:
    unet (`UNet2DModel`): the denoiser.
    scheduler (`SchedulerMixin`): its config builds the pipeline's `DDIMScheduler`.
    """

    def __init__(self, unet, scheduler):
        super().__init__()
        check_component_type(type(self).__name__, "unet", unet, ("UNet2DModel",))
        check_component_type(type(self).__name__, "scheduler", scheduler, ("SchedulerMixin",))
        temperature = getattr(scheduler, "temperature_scheduler", None)
        scheduler = DDIMScheduler.from_config(scheduler.config)
        if temperature is not None:
            scheduler.set_temperature_scheduler(temperature)
        self.register_modules(unet=unet, scheduler=scheduler)

    def check_inputs(self, batch_size, generator, num_inference_steps, output_type):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps: expected a positive int, got {num_inference_steps!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"generator: got a list of {len(generator)} generators for batch_size={batch_size}; pass one per image"
            )
        check_output_type(output_type)
        if output_type == "latent":
            raise ValueError("output_type: 'latent' is for latent pipelines; use 'pil', 'np' or 'pt'")

    def image_shape(self, batch_size: int):
        size = self.unet.config.sample_size
        if isinstance(size, int):
            return (batch_size, self.unet.config.in_channels, size, size)
        return (batch_size, self.unet.config.in_channels, *size)

    def denoise_step(self, image, t, eta, use_clipped_model_output, generator) -> torch.Tensor:
        """One step: model output at ``t`` (a device tensor) and the DDIM update."""
        model_output = self.unet(image, t).sample
        return self.scheduler.step(
            model_output, t, image, eta=eta, use_clipped_model_output=use_clipped_model_output, generator=generator
        ).prev_sample

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        eta: float = 0.0,
        num_inference_steps: int = 50,
        use_clipped_model_output: Optional[bool] = None,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cuda_graph: Optional[bool] = None,
    ):
        """Generate ``batch_size`` images.

        ``eta`` weights the injected noise (0: deterministic DDIM, 1: DDPM-like). ``cuda_graph``:
        ``False`` runs this call's loop eagerly, ``None`` follows ``enable_cuda_graph`` (on by default;
        captured on CUDA only). Returns `ImagePipelineOutput` (or a 1-tuple when ``return_dict=False``).
        """
        self.check_inputs(batch_size, generator, num_inference_steps, output_type)
        if not 0.0 <= eta <= 1.0:
            logger.warning("eta should be in [0, 1] (0: DDIM, 1: DDPM), got %s; results may be unexpected", eta)
        device = self._execution_device
        image = randn_tensor(self.image_shape(batch_size), generator=generator, device=device, dtype=self.unet.dtype)
        temperature = self.scheduler.temperature_scheduler
        if temperature is not None:
            image = temperature.scale_initial_noise(image, num_inference_steps)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        region = self._denoise_region(
            dict(image=image, t=self.scheduler.timesteps[0]),
            step_kwargs=dict(eta=eta, use_clipped_model_output=use_clipped_model_output, generator=generator),
            scheduler_kwargs=dict(eta=eta, use_clipped_model_output=use_clipped_model_output), extra=(),
            cuda_graph=cuda_graph, generator=generator,
        )  # fmt: skip
        for t in self.progress_bar(self.scheduler.timesteps):
            image = region(image=image, t=t)
        image = image.clone()  # a captured loop's output is a static buffer

        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            image = pt_to_numpy(image)
            if output_type == "pil":
                image = numpy_to_pil(image)
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _explain_inputs(self, height, width, batch_size, guidance_scale, device, dtype, call_kwargs):
        image = torch.empty(self.image_shape(batch_size), device=device, dtype=dtype)
        step_kwargs = dict(eta=call_kwargs.get("eta", 0.0), use_clipped_model_output=None, generator=None)
        return dict(image=image, t=self.scheduler.timesteps[0]), step_kwargs

    # Copied from fastdiff.pipelines.pipeline_ddpm.DDPMPipeline.set_temperature_scheduler
    def set_temperature_scheduler(self, temperature_scheduler) -> None:
        """Attach a :class:`fastdiff.TemperatureScheduler` (scales the initial and the injected noise);
        ``None`` detaches it (tau = 1, bitwise the plain pipeline)."""
        self.scheduler.set_temperature_scheduler(temperature_scheduler)
