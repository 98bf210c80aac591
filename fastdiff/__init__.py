"""fastdiff: diffusion models whose hot paths run on fused Triton and CUDA kernels.

`import fastdiff` is cheap (about 1 ms, measured with `python -X importtime`):
it imports nothing, not even torch. Submodules (ops, kernels, models,
schedulers, pipelines) load the first time one of their names is used, and nothing is
ever compiled at import time.
"""

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it. Resolved lazily by __getattr__.
_LAZY_EXPORTS = {
    # backend dispatch
    "use_backend": "fastdiff.backends",
    "trace_dispatch": "fastdiff.backends",
    "explain_dispatch": "fastdiff.backends",
    "use_target": "fastdiff.backends",
    "BackendNotSupportedError": "fastdiff.backends",
    # tune every op for a model's or pipeline's shapes before any CUDA graph capture
    "warmup": "fastdiff.tuning",
    # schedulers
    "DDPMScheduler": "fastdiff.schedulers",
    "DDIMScheduler": "fastdiff.schedulers",
    "PNDMScheduler": "fastdiff.schedulers",
    "EulerDiscreteScheduler": "fastdiff.schedulers",
    "EulerAncestralDiscreteScheduler": "fastdiff.schedulers",
    "DPMSolverMultistepScheduler": "fastdiff.schedulers",
    "HeunDiscreteScheduler": "fastdiff.schedulers",
    "LMSDiscreteScheduler": "fastdiff.schedulers",
    "UniPCMultistepScheduler": "fastdiff.schedulers",
    "TemperatureScheduler": "fastdiff.schedulers",
    "SchedulerMixin": "fastdiff.schedulers",
    "KarrasDiffusionSchedulers": "fastdiff.schedulers",
    # models
    "ModelMixin": "fastdiff.models",
    "ConfigMixin": "fastdiff.models",
    "UNet2DModel": "fastdiff.models",
    "UNet2DConditionModel": "fastdiff.models",
    "AutoencoderKL": "fastdiff.models",
    # pipelines
    "DiffusionPipeline": "fastdiff.pipelines",
    "DDPMPipeline": "fastdiff.pipelines",
    "DDIMPipeline": "fastdiff.pipelines",
    "StableDiffusionPipeline": "fastdiff.pipelines",
    "StableDiffusionImg2ImgPipeline": "fastdiff.pipelines",
    "StableDiffusionXLPipeline": "fastdiff.pipelines",
    "ImagePipelineOutput": "fastdiff.pipelines",
    "StableDiffusionPipelineOutput": "fastdiff.pipelines",
    "StableDiffusionXLPipelineOutput": "fastdiff.pipelines",
    "Resampler": "fastdiff.pipelines",
    # the embedded default model (a diffusers-format DDIMPipeline folder)
    "DEFAULT_MODEL": "fastdiff.default_model",
    # keep diffusers, swap in fastdiff
    "optimize": "fastdiff.optimize_diffusers",
    "revert": "fastdiff.optimize_diffusers",
    "optimization_report": "fastdiff.optimize_diffusers",
}

_SUBMODULES = ("backends", "ops", "nn", "kernels", "models", "schedulers", "pipelines")

__all__ = sorted(_LAZY_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _LAZY_EXPORTS:
        module = importlib.import_module(_LAZY_EXPORTS[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"fastdiff.{name}")
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")


def __dir__():
    return __all__
