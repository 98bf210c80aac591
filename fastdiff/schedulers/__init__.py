"""Schedulers with diffusers' names, config keys and behaviour, one algorithm per file."""

from .scheduling_ddim import DDIMScheduler
from .scheduling_ddpm import DDPMScheduler
from .scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from .scheduling_euler_ancestral_discrete import EulerAncestralDiscreteScheduler
from .scheduling_euler_discrete import EulerDiscreteScheduler
from .scheduling_heun_discrete import HeunDiscreteScheduler
from .scheduling_lms_discrete import LMSDiscreteScheduler
from .scheduling_pndm import PNDMScheduler
from .scheduling_temperature import TemperatureScheduler
from .scheduling_unipc_multistep import UniPCMultistepScheduler
from .scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KarrasDiffusionSchedulers",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "SchedulerMixin",
    "SchedulerOutput",
    "TemperatureScheduler",
    "UniPCMultistepScheduler",
]
