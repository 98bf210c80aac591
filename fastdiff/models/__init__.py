"""fastdiff.models: diffusers-compatible models whose hot paths run on fastdiff's ops.

Names resolve lazily, so importing this package does not build or import every model.
"""

import importlib

_LAZY = {
    "ConfigMixin": "fastdiff.models.configuration_utils",
    "FrozenDict": "fastdiff.models.configuration_utils",
    "register_to_config": "fastdiff.models.configuration_utils",
    "ModelMixin": "fastdiff.models.modeling_utils",
    "BaseOutput": "fastdiff.models.modeling_utils",
    "UNet2DModel": "fastdiff.models.unet_2d",
    "UNet2DOutput": "fastdiff.models.unet_2d",
    "UNet2DConditionModel": "fastdiff.models.unet_2d_condition",
    "UNet2DConditionOutput": "fastdiff.models.unet_2d_condition",
    "AutoencoderKL": "fastdiff.models.autoencoder_kl",
    "AutoencoderKLOutput": "fastdiff.models.autoencoder_kl",
    "DecoderOutput": "fastdiff.models.autoencoder_kl",
    "DiagonalGaussianDistribution": "fastdiff.models.autoencoder_kl",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdiff.models' has no attribute {name!r}")


def __dir__():
    return __all__
