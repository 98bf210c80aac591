"""Loaders that pipelines mix in: LoRA (``fastdiff.loaders.lora``)."""

from fastdiff.loaders.lora import (
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
    get_lora_adapter_metadata,
    get_lora_state_dict,
)
from fastdiff.loaders.lora_layers import LoRALayer

__all__ = [
    "LoRALayer",
    "StableDiffusionLoraLoaderMixin",
    "StableDiffusionXLLoraLoaderMixin",
    "get_lora_adapter_metadata",
    "get_lora_state_dict",
]
