"""Small shared helpers (output classes)."""

from fastdiff.utils.outputs import BaseOutput

__all__ = ["BaseOutput"]
