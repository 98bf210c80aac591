"""fastdiff.ops: the fused ops, each a plain function that dispatches to a backend.

Every op takes ``backend=`` ("auto", "reference", "triton", "cuda", ...) and
follows ``fastdiff.use_backend`` / FASTDIFF_BACKEND; see fastdiff.backends.
"""

from fastdiff.ops.group_norm import group_norm, group_norm_ref

__all__ = ["group_norm", "group_norm_ref"]
