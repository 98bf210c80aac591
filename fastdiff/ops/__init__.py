"""fastdiff.ops: the fused ops, each a plain function that dispatches to a backend.

Every op takes ``backend=`` ("auto", "reference", "triton", "cuda", "sdpa", ...)
and follows ``fastdiff.use_backend`` / FASTDIFF_BACKEND; see fastdiff.backends.
Each op's reference twin (plain PyTorch) sits beside it: the oracle and the CPU path.
"""

from fastdiff.ops.attention import attention, attention_ref
from fastdiff.ops.geglu import geglu, geglu_ref
from fastdiff.ops.group_norm import group_norm, group_norm_ref
from fastdiff.ops.scheduler_step import scheduler_step, scheduler_step_ref

__all__ = ["attention", "attention_ref", "geglu", "geglu_ref", "group_norm", "group_norm_ref", "scheduler_step", "scheduler_step_ref"]
