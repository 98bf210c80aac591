"""The attention-processor API that diffusers' models expose, on fastdiff's models.

``AttentionProcessorMixin`` is a base of :class:`fastdiff.models.ModelMixin`, so every model
has ``attn_processors``, ``set_attn_processor``, ``set_default_attn_processor`` and
``set_attention_slice``. They walk the module tree and talk to every submodule that has
``get_processor``/``set_processor`` (``fastdiff.nn.Attention``), keyed by module path as in
diffusers (``"down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"``).
"""

from __future__ import annotations

from typing import Dict, Union

from torch import nn


def _processor_modules(root: nn.Module):
    """(key, module) for every submodule with a processor, keyed ``"<module path>.processor"``."""
    for name, module in root.named_modules():
        if module is not root and hasattr(module, "set_processor") and hasattr(module, "get_processor"):
            yield f"{name}.processor", module


class AttentionProcessorMixin:
    """Model-level access to the attention processors of every ``Attention`` inside."""

    @property
    def attn_processors(self) -> Dict[str, object]:
        """Every attention processor in the model, keyed by ``"<module path>.processor"``."""
        return {key: module.get_processor() for key, module in _processor_modules(self)}

    def set_attn_processor(self, processor: Union[object, Dict[str, object]]) -> None:
        """Set one processor on every attention layer, or a dict keyed as ``attn_processors`` is.

        A dict must name every attention layer of the model, and nothing else.
        """
        modules = dict(_processor_modules(self))
        if isinstance(processor, dict):
            missing = sorted(set(modules) - set(processor))
            unknown = sorted(set(processor) - set(modules))
            if missing or unknown:
                raise ValueError(
                    f"set_attn_processor: the dict of processors must have one entry per attention layer "
                    f"({len(modules)}); missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"unknown {unknown[:5]}{'...' if len(unknown) > 5 else ''}"
                )
            for key, module in modules.items():
                module.set_processor(processor[key])
        else:
            for module in modules.values():
                module.set_processor(processor)
