"""LoRA loading for fastdiff's Stable Diffusion pipelines, with diffusers' method names.

The mixins are bases of ``StableDiffusionPipeline``, ``StableDiffusionImg2ImgPipeline``
(``StableDiffusionLoraLoaderMixin``) and ``StableDiffusionXLPipeline``
(``StableDiffusionXLLoraLoaderMixin``).
"""


class StableDiffusionLoraLoaderMixin:
    """LoRA methods of the SD pipelines (``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ...)."""


class StableDiffusionXLLoraLoaderMixin(StableDiffusionLoraLoaderMixin):
    """LoRA methods of the SDXL pipeline (adds the second text encoder)."""
