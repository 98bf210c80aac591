"""Configuration and loading machinery shared by every fastdiff scheduler.

Schedulers keep diffusers' conventions so that configs travel both ways:

* the keyword arguments of a scheduler's ``__init__`` are recorded by the
  :func:`register_to_config` decorator into ``scheduler.config``, a read-only
  dict whose items are also attributes (``scheduler.config.beta_start``);
* ``save_pretrained(dir)`` writes ``dir/scheduler_config.json`` with
  ``_class_name`` and ``_diffusers_version`` like diffusers does, so
  ``diffusers.XScheduler.from_pretrained(dir)`` reads it, and
  ``fastdiff.XScheduler.from_pretrained(diffusers_dir, subfolder="scheduler")``
  reads diffusers' files;
* ``Y.from_config(x.config)`` builds a ``Y`` from the keys ``Y`` understands and
  keeps the others in ``Y.config`` (diffusers' "hidden" keys), so a later
  swap back to ``X`` restores them.

This module holds no scheduler math; each ``scheduling_*.py`` file is
self-contained in diffusers' single-file style.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SCHEDULER_CONFIG_NAME = "scheduler_config.json"

# The diffusers release whose scheduler behaviour and config format fastdiff follows.
# Written as ``_diffusers_version`` into saved configs so diffusers reads them as its own.
DIFFUSERS_COMPAT_VERSION = "0.42.1"


class KarrasDiffusionSchedulers(enum.Enum):
    """Names of the schedulers that can replace one another in a Stable Diffusion style pipeline.

    Same members and values as diffusers' enum; ``_compatibles`` lists are built from it.
    """

    DDIMScheduler = 1
    DDPMScheduler = 2
    PNDMScheduler = 3
    LMSDiscreteScheduler = 4
    EulerDiscreteScheduler = 5
    HeunDiscreteScheduler = 6
    EulerAncestralDiscreteScheduler = 7
    DPMSolverMultistepScheduler = 8
    DPMSolverSinglestepScheduler = 9
    KDPM2DiscreteScheduler = 10
    KDPM2AncestralDiscreteScheduler = 11
    DEISMultistepScheduler = 12
    UniPCMultistepScheduler = 13
    DPMSolverSDEScheduler = 14
    EDMEulerScheduler = 15


class FrozenDict(OrderedDict):
    """A read-only ordered dict whose keys are also readable as attributes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_frozen", True)

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only; use `register_to_config(...)` to change a config.")

    __delitem__ = setdefault = pop = popitem = update = clear = _refuse

    def __reduce__(self):  # copy/deepcopy/pickle rebuild through __init__, not item by item
        return (type(self), (OrderedDict(self),))

    def __setitem__(self, key, value):
        if getattr(self, "_frozen", False):
            self._refuse()
        super().__setitem__(key, value)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            self._refuse()
        object.__setattr__(self, name, value)


@dataclasses.dataclass
class BaseOutput:
    """A dataclass output that also indexes like diffusers' outputs: ``out[0]``, ``out["prev_sample"]``.

    Fields that are ``None`` are left out of the tuple view, as in diffusers.
    """

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self):
        return len(self.to_tuple())


@dataclasses.dataclass
class SchedulerOutput(BaseOutput):
    """Output of a scheduler's ``step``.

    Args:
        prev_sample (`torch.Tensor`, same shape as the sample): the sample at the previous
            (less noisy) timestep; feed it to the model on the next iteration.
    """

    prev_sample: torch.Tensor


def register_to_config(init):
    """Decorator for a scheduler's ``__init__``: records every argument (defaults included) in ``self.config``.

    Arguments named in the class's ``ignore_for_config`` are not recorded. Keyword arguments
    starting with ``_`` are recorded but not passed to ``__init__``. Keys that took their
    default are listed under ``_use_default_values``, exactly as diffusers does, so that
    ``from_config`` of another class does not treat our defaults as user choices.
    """

    signature = inspect.signature(init)

    @functools.wraps(init)
    def inner_init(self, *args, **kwargs):
        init_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        private_kwargs = {k: v for k, v in kwargs.items() if k.startswith("_")}
        ignore = set(getattr(self, "ignore_for_config", ()))
        defaults = {
            name: p.default
            for i, (name, p) in enumerate(signature.parameters.items())
            if i > 0 and name not in ignore and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        recorded = dict(zip(defaults, args))
        recorded.update({k: init_kwargs.get(k, d) for k, d in defaults.items() if k not in recorded})
        used_defaults = set(recorded) - set(init_kwargs) - set(list(defaults)[: len(args)])
        if used_defaults:
            recorded["_use_default_values"] = sorted(used_defaults)
        self.register_to_config(**private_kwargs, **recorded)
        init(self, *args, **init_kwargs)

    return inner_init


def _json_ready(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return value  # json writes Infinity / -Infinity, which diffusers reads back too
    return value


class SchedulerMixin:
    """Base class of every fastdiff scheduler: config storage, ``from_config``, save and load.

    Class attributes:
        config_name (`str`): the file ``save_pretrained`` writes (``scheduler_config.json``).
        _compatibles (`list[str]`): names of classes whose configs this class can be built from.
        ignore_for_config (`list[str]`): ``__init__`` arguments that are not recorded in the config.

    Temperature hook: ``scheduler.temperature_scheduler`` (default ``None``) may hold a
    :class:`~fastdiff.schedulers.TemperatureScheduler`; stochastic schedulers pass the noise they
    are about to inject through :meth:`_scale_step_noise`, which multiplies it by tau at the
    current step. Set it with :meth:`set_temperature_scheduler`.
    """

    config_name = SCHEDULER_CONFIG_NAME
    _compatibles: list = []
    has_compatibles = True
    ignore_for_config: list = []
    temperature_scheduler = None

    # ---- config -----------------------------------------------------------------------------

    def register_to_config(self, **kwargs):
        kwargs.pop("kwargs", None)
        current = dict(self.__dict__.get("_internal_dict", {}))
        current.update(kwargs)
        self._internal_dict = FrozenDict(current)

    @property
    def config(self) -> FrozenDict:
        """The scheduler's configuration, read-only (a :class:`FrozenDict`)."""
        return self._internal_dict

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"

    def to_json_string(self) -> str:
        config = dict(self._internal_dict)
        config["_class_name"] = type(self).__name__
        config["_diffusers_version"] = DIFFUSERS_COMPAT_VERSION
        config.pop("_use_default_values", None)
        config.pop("_ignore_files", None)
        config = {k: _json_ready(v) for k, v in config.items()}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory, **kwargs):
        """Write ``save_directory/scheduler_config.json`` (the directory is created if needed).

        The file is diffusers' format: diffusers' ``from_pretrained`` loads it. ``push_to_hub`` is
        not supported.
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True) is not supported by fastdiff schedulers.")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory!r}.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        logger.info("Scheduler config saved in %s", path)

    save_config = save_pretrained

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, subfolder=None, **hub_kwargs) -> dict:
        """Read a scheduler config dict from a json file, a directory, or a Hugging Face Hub repo id."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            config_file = path
        elif os.path.isdir(path):
            candidates = [os.path.join(path, subfolder, cls.config_name)] if subfolder else []
            candidates.append(os.path.join(path, cls.config_name))
            config_file = next((c for c in candidates if os.path.isfile(c)), None)
            if config_file is None:
                raise OSError(f"No {cls.config_name} found in {path!r} (subfolder={subfolder!r}).")
        elif os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:
            raise OSError(f"{path!r} is neither a {cls.config_name} file nor a directory holding one.")
        else:  # a Hub repo id such as "org/model"
            from huggingface_hub import hf_hub_download

            config_file = hf_hub_download(path, filename=cls.config_name, subfolder=subfolder, **hub_kwargs)
        with open(config_file, encoding="utf-8") as f:
            return json.load(f)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, return_unused_kwargs=False, **kwargs):
        """Build the scheduler from a saved config (local directory or file, or Hub repo id).

        Args:
            pretrained_model_name_or_path: a directory holding ``scheduler_config.json`` (or its
                ``subfolder``), the json file itself, or a Hub repo id.
            subfolder (`str`, *optional*): e.g. ``"scheduler"`` inside a pipeline directory.
            kwargs: config overrides, as in :meth:`from_config`; hub options (``revision``,
                ``cache_dir``, ``token``, ``local_files_only``) go to ``hf_hub_download``.
        """
        hub_keys = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build the scheduler from a config dict, typically another scheduler's ``.config``.

        Keys this class accepts go to ``__init__`` (``kwargs`` override them); the others are
        kept in the new scheduler's config, as diffusers does, so swapping back loses nothing.
        """
        if config is None:
            raise ValueError("from_config needs a config dict as its first argument.")
        if not isinstance(config, dict):
            raise ValueError(
                f"from_config expects a dict (e.g. `other_scheduler.config`), got {type(config).__name__}; "
                "use from_pretrained to load from a path."
            )
        init_dict, unused_kwargs, hidden_dict = cls.extract_init_dict(config, **kwargs)
        scheduler = cls(**init_dict)
        if "_class_name" in hidden_dict:
            hidden_dict["_class_name"] = cls.__name__
        scheduler.register_to_config(**hidden_dict)
        unused_kwargs = {**unused_kwargs, **hidden_dict}
        return (scheduler, unused_kwargs) if return_unused_kwargs else scheduler

    @staticmethod
    def _init_keys(klass) -> set:
        return set(inspect.signature(klass.__init__).parameters) - {"self", "kwargs"}

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs):
        """Split ``config_dict`` into (``__init__`` kwargs, unused kwargs, hidden keys) like diffusers."""
        used_defaults = set(config_dict.get("_use_default_values", ()))
        config_dict = {k: v for k, v in config_dict.items() if k not in used_defaults and k != "_use_default_values"}
        original = dict(config_dict)
        expected = cls._init_keys(cls) - set(cls.ignore_for_config)

        # Keys that only compatible classes take are not passed to __init__ (nor warned about).
        only_compatible = set()
        for other in cls._get_compatibles():
            only_compatible |= cls._init_keys(other)
        only_compatible -= cls._init_keys(cls)
        config_dict = {k: v for k, v in config_dict.items() if k not in only_compatible}

        origin_name = config_dict.pop("_class_name", cls.__name__)
        if not isinstance(origin_name, (str, list, tuple)):
            raise ValueError(f"_class_name must be a string, got {origin_name!r}.")
        origin_cls = _scheduler_class(origin_name) if isinstance(origin_name, str) else None
        if origin_cls is not None and origin_cls is not cls:
            foreign = cls._init_keys(origin_cls) - expected
            config_dict = {k: v for k, v in config_dict.items() if k not in foreign}
        config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_")}

        init_dict = {}
        for key in expected:
            if key in kwargs:
                config_dict.pop(key, None)
                init_dict[key] = kwargs.pop(key)
            elif key in config_dict:
                init_dict[key] = config_dict.pop(key)
        if config_dict:
            logger.warning(
                "Config attributes %s were passed to %s but are not expected and will be ignored.",
                config_dict,
                cls.__name__,
            )
        unused_kwargs = {**config_dict, **kwargs}
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        return init_dict, unused_kwargs, hidden

    @property
    def compatibles(self) -> list:
        """The scheduler classes that can be built from this scheduler's config."""
        return self._get_compatibles()

    @classmethod
    def _get_compatibles(cls) -> list:
        names = sorted(set([cls.__name__] + list(cls._compatibles)))
        found = (_scheduler_class(n) for n in names)
        return [c for c in found if c is not None]

    # ---- temperature hook ---------------------------------------------------------------------

    def set_temperature_scheduler(self, temperature_scheduler) -> None:
        """Attach a :class:`~fastdiff.schedulers.TemperatureScheduler` (or ``None`` to detach).

        While attached, every noise tensor that ``step`` injects is multiplied by
        ``temperature_scheduler.tau(step_index, num_inference_steps)``. Deterministic schedulers
        inject no noise, so for them this changes nothing. The initial latents are the pipeline's
        business: it calls ``temperature_scheduler.scale_initial_noise``.
        """
        self.temperature_scheduler = temperature_scheduler

    def _scale_step_noise(self, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        if self.temperature_scheduler is None:
            return noise
        return self.temperature_scheduler.scale_step_noise(noise, step_index, self.num_inference_steps)


def _scheduler_class(name: str):
    """The fastdiff scheduler class called ``name``, or None if fastdiff has none."""
    schedulers = importlib.import_module("fastdiff.schedulers")
    klass = getattr(schedulers, name, None)
    return klass if isinstance(klass, type) and issubclass(klass, SchedulerMixin) else None


def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' ``randn_tensor`` draws it.

    Same generator consumption, so fastdiff and diffusers give identical noise for identical
    generators: a CPU generator with a non-CPU ``device`` draws on the CPU and moves the result; a
    list of generators draws one batch element from each, in order.

    Args:
        shape (`tuple[int, ...]`): output shape; ``shape[0]`` is the batch size.
        generator (`torch.Generator` or `list[torch.Generator]`, *optional*): the random source.
        device, dtype, layout: of the returned tensor (``device`` defaults to the CPU).
    """
    device = torch.device(device) if isinstance(device, str) else device
    device = device or torch.device("cpu")
    layout = layout or torch.strided
    draw_device = device
    if generator is not None:
        gen_type = (generator[0] if isinstance(generator, list) else generator).device.type
        if gen_type != device.type:
            if gen_type != "cpu":
                raise ValueError(f"generator is on {gen_type} but the noise is requested on {device}.")
            draw_device = torch.device("cpu")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}; pass one per sample.")
        one = (1,) + tuple(shape[1:])
        parts = [torch.randn(one, generator=g, device=draw_device, dtype=dtype, layout=layout) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype, layout=layout).to(device)
