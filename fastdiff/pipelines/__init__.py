"""fastdiff.pipelines: diffusers' pipelines (same class names, ``__call__`` arguments and outputs).

Names resolve lazily, so importing this package imports neither the models nor transformers.
"""

import importlib

_LAZY = {
    "DiffusionPipeline": "fastdiff.pipelines.pipeline_utils",
    "ImagePipelineOutput": "fastdiff.pipelines.pipeline_utils",
    "DDPMPipeline": "fastdiff.pipelines.pipeline_ddpm",
    "DDIMPipeline": "fastdiff.pipelines.pipeline_ddim",
    "StableDiffusionPipeline": "fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "StableDiffusionPipelineOutput": "fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "StableDiffusionImg2ImgPipeline": "fastdiff.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "StableDiffusionSafetyChecker": "fastdiff.pipelines.stable_diffusion.safety_checker",
    "StableDiffusionXLPipeline": "fastdiff.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "StableDiffusionXLPipelineOutput": "fastdiff.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "Resampler": "fastdiff.pipelines.resampler",
    "VaeImageProcessor": "fastdiff.pipelines.image_processor",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdiff.pipelines' has no attribute {name!r}")


def __dir__():
    return __all__
