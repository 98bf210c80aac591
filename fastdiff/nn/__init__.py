"""fastdiff.nn: drop-in modules that keep the state_dict keys of the modules they replace."""

import importlib

_LAZY = {
    "GroupNorm": "fastdiff.nn.group_norm",
    "fuse_group_norm_silu": "fastdiff.nn.group_norm",
    "Attention": "fastdiff.nn.attention",
    "AttentionProcessorMixin": "fastdiff.nn.attention_processor",
    "CrossAttentionKVCache": "fastdiff.nn.attention_processor",
    "FastdiffAttnProcessor": "fastdiff.nn.attention_processor",
    "FastdiffAttnAddedKVProcessor": "fastdiff.nn.attention_processor",
    "SlicedAttnProcessor": "fastdiff.nn.attention_processor",
    "SlicedAttnAddedKVProcessor": "fastdiff.nn.attention_processor",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastdiff.nn' has no attribute {name!r}")
