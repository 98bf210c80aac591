"""Schedulers with diffusers' names, config keys and behaviour, one algorithm per file."""

from .scheduling_ddim import DDIMScheduler
from .scheduling_euler_discrete import EulerDiscreteScheduler
from .scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

__all__ = [
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "KarrasDiffusionSchedulers",
    "SchedulerMixin",
    "SchedulerOutput",
]
