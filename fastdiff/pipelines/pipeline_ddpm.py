"""``DDPMPipeline``: unconditional image generation with a ``UNet2DModel`` and a scheduler (diffusers' API).

Denoising Diffusion Probabilistic Models, Ho et al. 2020 (https://arxiv.org/abs/2006.11239),
Algorithm 2. Same arguments, noise draws and images as ``diffusers.DDPMPipeline``.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

from fastdiff.pipelines.image_processor import check_output_type, numpy_to_pil, pt_to_numpy
from fastdiff.pipelines.pipeline_utils import (
    DiffusionPipeline,
    GraphPipelineMixin,
    ImagePipelineOutput,
    check_component_type,
)
from fastdiff.schedulers.scheduling_utils import randn_tensor


class DDPMPipeline(DiffusionPipeline, GraphPipelineMixin):
    """Args:
    unet (`UNet2DModel`): the denoiser.
    scheduler (`SchedulerMixin`): any fastdiff scheduler, usually `DDPMScheduler`.
    """

    def __init__(self, unet, scheduler):
        super().__init__()
        check_component_type(type(self).__name__, "unet", unet, ("UNet2DModel",))
        check_component_type(type(self).__name__, "scheduler", scheduler, ("SchedulerMixin",))
        self.register_modules(unet=unet, scheduler=scheduler)

    # Copied from fastdiff.pipelines.pipeline_ddim.DDIMPipeline.check_inputs
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

    # Copied from fastdiff.pipelines.pipeline_ddim.DDIMPipeline.image_shape
    def image_shape(self, batch_size: int):
        size = self.unet.config.sample_size
        if isinstance(size, int):
            return (batch_size, self.unet.config.in_channels, size, size)
        return (batch_size, self.unet.config.in_channels, *size)

    def denoise_step(self, image: torch.Tensor, t: torch.Tensor, generator) -> torch.Tensor:
        """One step: model output at ``t`` (a device tensor) and the scheduler update."""
        model_output = self.unet(image, t).sample
        return self.scheduler.step(model_output, t, image, generator=generator).prev_sample

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: int = 1000,
        output_type: Optional[str] = "pil",
        return_dict: bool = True,
        cuda_graph: Optional[bool] = None,
    ):
        """Generate ``batch_size`` images.

        ``cuda_graph``: ``False`` runs this call's loop eagerly, ``None`` follows ``enable_cuda_graph``
        (on by default; captured on CUDA only; a stochastic scheduler's noise is pre-drawn from
        ``generator`` in diffusers' order, so captured and eager give the same images).

        Returns `ImagePipelineOutput` (or a 1-tuple when ``return_dict=False``) whose ``images`` are PIL
        images, a (B, H, W, C) float array in [0, 1] (``"np"``), or a (B, C, H, W) tensor (``"pt"``).
        """
        self.check_inputs(batch_size, generator, num_inference_steps, output_type)
        device = self._execution_device
        image = randn_tensor(self.image_shape(batch_size), generator=generator, device=device, dtype=self.unet.dtype)
        temperature = self.scheduler.temperature_scheduler
        if temperature is not None:
            image = temperature.scale_initial_noise(image, num_inference_steps)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        region = self._denoise_region(
            dict(image=image, t=self.scheduler.timesteps[0]), step_kwargs=dict(generator=generator),
            scheduler_kwargs={}, extra=(), cuda_graph=cuda_graph, generator=generator,
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
        return dict(image=image, t=self.scheduler.timesteps[0]), dict(generator=None)

    def set_temperature_scheduler(self, temperature_scheduler) -> None:
        """Attach a :class:`fastdiff.TemperatureScheduler` (scales the initial and the injected noise);
        ``None`` detaches it (tau = 1, bitwise the plain pipeline)."""
        self.scheduler.set_temperature_scheduler(temperature_scheduler)
