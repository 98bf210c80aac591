"""Loaders that pipelines mix in: LoRA (``fastdiff.loaders.lora``)."""
