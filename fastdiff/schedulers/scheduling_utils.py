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
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from fastdiff.utils.outputs import BaseOutput  # noqa: F401  (re-exported: the schedulers import it from here)

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
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value  # json writes +-inf as Infinity / -Infinity, which diffusers reads back too


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
    # ``__init__`` keywords that are deprecated: ``from_config`` passes them on from the unused keys.
    _deprecated_kwargs: list = []
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

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails. As in diffusers, a config key read as an attribute
        # (``scheduler.num_train_timesteps``) returns the config value with a FutureWarning.
        internal = self.__dict__.get("_internal_dict")
        if internal is not None and name in internal and not name.startswith("__"):
            warnings.warn(
                f"Accessing config attribute `{name}` directly via '{type(self).__name__}' object attribute is "
                f"deprecated. Please access '{name}' over '{type(self).__name__}'s config object instead, e.g. "
                f"'scheduler.config.{name}'.",
                FutureWarning,
                stacklevel=2,
            )
            return internal[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"

    def to_json_string(self) -> str:
        """The config as diffusers writes it. Like diffusers, this records ``_class_name`` and
        ``_diffusers_version`` in the live config too (so they are set after ``save_pretrained``)."""
        self.register_to_config(_class_name=type(self).__name__, _diffusers_version=DIFFUSERS_COMPAT_VERSION)
        config = dict(self._internal_dict)
        config.pop("_use_default_values", None)
        config.pop("_ignore_files", None)
        config = {k: _json_ready(v) for k, v in config.items()}
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Write ``save_directory/scheduler_config.json`` (the directory is created if needed).

        The file is diffusers' format: diffusers' ``from_pretrained`` loads it. ``push_to_hub`` is
        not supported.
        """
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True) is not supported by fastdiff schedulers.")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a directory, got the file {save_directory!r}.")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        logger.info("Scheduler config saved in %s", path)

    save_config = save_pretrained

    def to_json_file(self, json_file_path) -> None:
        """Write the config as diffusers' json (what ``save_pretrained`` writes) to ``json_file_path``."""
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def get_config_dict(cls, *args, **kwargs) -> dict:
        """Deprecated alias of :meth:`load_config`, kept (with diffusers' FutureWarning) for old code."""
        warnings.warn(
            f"The function get_config_dict is deprecated. Please use {cls}.load_config instead. This function will "
            "be removed in version v1.0.0",
            FutureWarning,
            stacklevel=2,
        )
        return cls.load_config(*args, **kwargs)

    _HUB_KEYS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")

    @classmethod
    def load_config(
        cls, pretrained_model_name_or_path, return_unused_kwargs=False, return_commit_hash=False, **kwargs
    ):
        """Read a scheduler config dict from a json file, a directory, or a Hugging Face Hub repo id.

        Same signature and returns as diffusers: the dict, or ``(dict, unused_kwargs[, commit_hash])``
        with ``return_unused_kwargs`` / ``return_commit_hash`` (the commit hash is None for local files).
        ``subfolder`` and the hub options (``revision``, ``cache_dir``, ``token``, ``local_files_only``,
        ``force_download``, ``proxies``) are taken from ``kwargs``; the rest are the unused kwargs.
        """
        subfolder = kwargs.pop("subfolder", None)
        hub_kwargs = {k: kwargs.pop(k) for k in cls._HUB_KEYS if k in kwargs}
        path = os.fspath(pretrained_model_name_or_path)
        commit_hash = None
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
            config = json.load(f)
        if not (return_unused_kwargs or return_commit_hash):
            return config
        outputs = (config,)
        if return_unused_kwargs:
            outputs += (kwargs,)
        if return_commit_hash:
            outputs += (commit_hash,)
        return outputs

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None, return_unused_kwargs=False, **kwargs):
        """Build the scheduler from a saved config (local directory or file, or Hub repo id).

        Args:
            pretrained_model_name_or_path: a directory holding ``scheduler_config.json`` (or its
                ``subfolder``), the json file itself, or a Hub repo id.
            subfolder (`str`, *optional*): e.g. ``"scheduler"`` inside a pipeline directory.
            kwargs: config overrides, as in :meth:`from_config`; hub options (``revision``,
                ``cache_dir``, ``token``, ``local_files_only``) go to ``hf_hub_download``.
        """
        config, kwargs = cls.load_config(
            pretrained_model_name_or_path, subfolder=subfolder, return_unused_kwargs=True, **kwargs
        )
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
        for name in cls._deprecated_kwargs:
            if name in unused_kwargs:
                init_dict[name] = unused_kwargs.pop(name)
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
        business: it calls ``temperature_scheduler.scale_initial_noise``. On the fused step the
        temperatures scale the noise column of the coefficient table, rebuilt here.
        """
        self.temperature_scheduler = temperature_scheduler
        state = self.__dict__.get("_fused")
        if state is not None and state.key is not None:
            key, state.key = state.key, None
            self._fused_state(key)

    def _scale_step_noise(self, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        if self.temperature_scheduler is None:
            return noise
        # Before set_timesteps, step() runs on the training-length schedule (as in diffusers).
        num_steps = self.num_inference_steps or len(self.timesteps)
        return self.temperature_scheduler.scale_step_noise(noise, step_index, num_steps)

    # ---- fused step hooks (schedulers with a fused form define _fused_reasons and _fused_table) ------

    def _reset_fused(self, **default_step_args) -> None:
        """Start a new fused-step state for a new schedule, and build the table for the default step
        arguments now (host work belongs in set_timesteps, not in step) when the config has a fused form
        (``_fused_reasons()`` at its default step arguments is empty)."""
        self._fused = FusedStepState()
        if not self._fused_reasons():
            try:
                self._fused_state(tuple(sorted(default_step_args.items())))
            except (ArithmeticError, ValueError) as error:
                # A schedule the table cannot describe (e.g. a repeated timestep that a multistep
                # coefficient divides by) keeps the plain step, which does what diffusers does; the
                # fused step's reasons say why it is off.
                cause = error.__cause__ or error
                self._fused.unavailable = f"its coefficient table cannot be built for this schedule ({cause})"

    def _restart_fused(self) -> None:
        """Forget the device step index and history (a new begin index); keep the table and bank."""
        state = self.__dict__.get("_fused")
        if state is not None:
            state.step_index = state.host_index = state.history = None

    def reset_fused_step(self) -> None:
        """Rewind the fused step to the first step of its loop, in place (fastdiff extension).

        The device step index is filled with the loop's first index and the history ring is zeroed;
        both keep their storage, so a CUDA graph captured around ``step`` replays a new loop after
        this call (capture after one eager warm-up step, which builds the table, index and ring).
        The table and the noise bank stay; draw a new bank in place (``bank.copy_(...)``) for new noise.
        """
        state = self.__dict__.get("_fused")
        if state is None or state.step_index is None:
            raise ValueError("reset_fused_step() needs one fused step first (a warm-up step before capturing)")
        state.step_index.fill_(state.start_index)
        state.host_index = state.start_index
        if state.history is not None:
            state.history.zero_()
        if "_step_index" in self.__dict__:
            self._step_index = state.start_index

    def _fused_state(self, key: tuple) -> FusedStepState:
        """The fused state with its table built for the step arguments ``key`` (rebuilt when they change)."""
        state = self._fused
        if state.key != key:
            try:
                table, draws, slots = self._fused_table(**dict(key))
            except (ArithmeticError, ValueError) as error:
                raise ValueError(
                    f"{type(self).__name__}: the fused step's coefficient table cannot be built for this schedule "
                    f"and step arguments {dict(key)}: {error}"
                ) from error
            taus = None
            if self.temperature_scheduler is not None:
                taus = self.temperature_scheduler.taus(table.shape[0])
            state.set_table(key, table, draws, slots, taus)
        return state

    _no_fused_step_reason = "it has no fused step"

    def _fused_reasons(self, **step_args) -> list:
        """Why this configuration (with these step arguments) has no fused form; [] when it has one."""
        return [f"{type(self).__name__} has no fused step: {self._no_fused_step_reason}"]

    def _device_input_scale(self, sample: torch.Tensor):
        """The model-input scale of the current step as a 0-d tensor on ``sample``'s device, read from the
        device table at the fused step's device index (no host step index, so a CUDA graph captured
        around the step scales each replayed step by its own sigma); None before the first fused step
        on that device (the caller then takes its host path)."""
        state = self.__dict__.get("_fused")
        if state is None or state.step_index is None or state.input_scales is None:
            return None
        if state.step_index.device != sample.device or state.input_scales.device != sample.device:
            return None
        return state.input_scales.index_select(0, state.step_index).reshape(())

    def _noise_draws(self):
        """Per step, whether diffusers' ``step`` may draw noise (None: this scheduler never does)."""
        return None

    def _bank_noise(self, index: int):
        """Row ``index`` of the prepared noise bank, or None without a bank."""
        state = self.__dict__.get("_fused")
        if state is None or state.noise_bank is None:
            return None
        return state.noise_bank[index]

    def prepare_noise_bank(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Pre-draw the noise of every step into one (num_steps, *shape) buffer (fastdiff extension).

        The draws are exactly the ``randn_tensor(shape, generator=generator, device=device, dtype=dtype)``
        calls diffusers' ``step`` makes, in its order, from the begin index (or 0) on, so a loop that
        reads the bank (a captured CUDA graph, or any eager loop) gives the numbers eager diffusers
        gives with the same generator. Steps afterwards read the bank instead of drawing, on the fused
        and the plain path alike; ``set_timesteps`` drops it. ``dtype`` must be the sample's dtype.
        An attached temperature scheduler still scales the noise (the bank holds unscaled draws).
        """
        if self.num_inference_steps is None:
            raise ValueError("prepare_noise_bank() called before set_timesteps(); call set_timesteps() first.")
        draws = self._noise_draws()
        if draws is None:
            raise ValueError(f"{type(self).__name__} draws no noise in step(); it needs no noise bank")
        start = self.__dict__.get("_begin_index") or 0
        bank = draw_noise_bank(draws, start, shape, generator=generator, device=device, dtype=dtype)
        self._fused.noise_bank = bank
        return bank


def integer_timestep(timestep) -> int:
    """``timestep`` (an int or a 0-d tensor) as a host int, for schedulers on integer training timesteps.

    A fractional value is refused rather than truncated (diffusers fails on it too, with an IndexError).
    """
    value = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"timestep must be an integer training timestep, got {value}")
    return int(value)


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


# ---- fused step (fastdiff extension) ------------------------------------------------------------
#
# Schedulers whose update is linear in (sample, model output, noise, earlier converted outputs) can
# run ``step`` as one launch of :func:`fastdiff.ops.scheduler_step.scheduler_step`, with
# classifier-free guidance folded in. The scheduler describes its update as a (num_steps, 8)
# coefficient table (built on the host, in float64, when the schedule is set); everything below is
# the machinery they share: the decision fused-or-plain, the device step index and history ring,
# and the pre-drawn noise bank.

FUSED_OP_NAME = "scheduler_step"


def apply_guidance(model_output: torch.Tensor, guidance_scale) -> torch.Tensor:
    """Classifier-free guidance as a diffusers pipeline writes it: ``u + g * (c - u)``.

    ``model_output`` is the batched (2B, ...) output, uncond half first. ``None`` returns it as is.
    """
    if guidance_scale is None:
        return model_output
    if model_output.dim() < 1 or model_output.shape[0] % 2:
        raise ValueError(
            "with guidance_scale, model_output must be the batched (2B, ...) CFG output (uncond half first), "
            f"got shape {tuple(model_output.shape)}"
        )
    uncond, cond = model_output.chunk(2)
    return (uncond + guidance_scale * (cond - uncond)).to(model_output.dtype)


def use_fused_step(scheduler, sample: torch.Tensor, model_output: torch.Tensor, reasons: list) -> bool:
    """Whether ``scheduler.step`` runs the fused op for ``sample`` and ``model_output``.

    ``reasons`` says why the scheduler's configuration (and step arguments) has no fused form;
    empty means it has one. A model output in another dtype than the sample is one more reason (the
    op reads both in one dtype; the plain step upcasts each). The op's backend choice decides the
    rest: with ``auto`` (the default) the fused op runs on CUDA tensors only, so CPU users keep
    diffusers' exact arithmetic; a forced backend (``fastdiff.use_backend(scheduler_step=...)``,
    ``FASTDIFF_BACKEND``) runs it on any device, and raises a ValueError when it cannot (no silent
    fallback).
    """
    from fastdiff import backends

    if model_output.dtype != sample.dtype:
        reasons = [*reasons, f"model_output is {model_output.dtype} but sample is {sample.dtype}"]
    state = scheduler.__dict__.get("_fused")
    if state is None and hasattr(type(scheduler), "_fused_table"):
        reasons = [*reasons, "set_timesteps() has not been called (the training-length schedule has no table)"]
    elif state is not None and state.unavailable:
        reasons = [*reasons, state.unavailable]

    requested, source = backends.get_dispatcher(FUSED_OP_NAME).requested(None)
    if requested != backends.AUTO:
        if reasons:
            raise ValueError(
                f"{type(scheduler).__name__}.step: the {FUSED_OP_NAME} backend {requested!r} is forced (from "
                f"{source}) but this configuration has no fused form: {'; '.join(reasons)}"
            )
        return True
    return sample.device.type == "cuda" and not reasons


def table_to_device(table: torch.Tensor, device) -> torch.Tensor:
    """Copy a host table to ``device`` without a host synchronisation (pinned, non-blocking on CUDA)."""
    device = torch.device(device)
    if table.device == device:
        return table
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


class FusedStepState:
    """What the fused step of one scheduler keeps between calls.

    * ``key``, ``table``, ``draws``, ``slots``: the step arguments the table was built for, the
      (num_steps, 8) float32 host table, whether diffusers' ``step`` draws noise at each step
      (for eager draws from the user's generator), and the history ring size (0: none);
    * ``coeffs``: the table on the sample's device (copied once);
    * ``step_index``: the one-element int64 device index the op reads and advances in the same
      launch, created at ``start_index`` by the first fused step; ``host_index`` mirrors it on the
      host (a Python int, so reading it never syncs; it is only used for eager noise draws, to
      re-create the device index on another device and to stop a loop that runs past the table);
    * ``history``: the (R, *sample.shape) ring of earlier converted outputs (multistep solvers);
    * ``noise_bank``: pre-drawn (num_steps, *sample.shape) noise (see ``prepare_noise_bank``).

    A new schedule (``set_timesteps``) starts a new state; a new temperature scheduler rebuilds the
    table only; a new begin index drops the device index and the ring.
    """

    def __init__(self):
        self.key = None
        self.table = None
        self.draws = ()
        self.slots = 0
        self.coeffs = None
        self.step_index = None
        self.start_index = None
        self.host_index = None
        self.history = None
        self.noise_bank = None
        self.unavailable = None  # why the table could not be built for this schedule (None: it could)
        # per-step model-input scales (Euler-type 1 / sqrt(sigma^2 + 1)) on the host, and on the device
        # (copied by the first fused step), read at the device step index by scale_model_input
        self.input_scales_host = None
        self.input_scales = None

    def set_table(self, key, table: torch.Tensor, draws, slots: int, taus=None) -> None:
        """Install a host table built for step arguments ``key``; ``taus`` (one per step) scale its
        noise column, which is how a temperature scheduler reaches the fused step."""
        if taus is not None:
            table = table.clone()
            table[:, 2] *= torch.tensor(taus, dtype=torch.float64).to(torch.float32)
        self.key, self.table, self.draws, self.slots = key, table, tuple(draws), slots
        self.coeffs = None

    def run(self, scheduler, model_output, sample, guidance_scale, start_index, generator=None, noise=None):
        """One fused step: x_prev from the device table row at the device step index, which the same
        launch advances. ``start_index`` is the first step's index (a host int) when the device index
        does not exist yet. ``noise`` overrides the bank and the generator for this step."""
        from fastdiff.ops.scheduler_step import scheduler_step

        num_steps = self.table.shape[0]
        if self.step_index is None:
            self.start_index = self.host_index = start_index
            self.step_index = torch.full((1,), start_index, dtype=torch.int64, device=sample.device)
        elif self.step_index.device != sample.device:
            self.step_index = torch.full((1,), self.host_index, dtype=torch.int64, device=sample.device)
        if self.host_index >= num_steps:
            raise ValueError(
                f"{type(scheduler).__name__}.step called more often than the {num_steps} steps of the schedule; "
                "call set_timesteps() to start a new one"
            )
        if self.coeffs is None or self.coeffs.device != sample.device:
            self.coeffs = table_to_device(self.table, sample.device)
        if self.input_scales_host is not None and (self.input_scales is None or self.input_scales.device != sample.device):
            self.input_scales = table_to_device(self.input_scales_host, sample.device)
        history = None
        if self.slots:
            shape = (self.slots, *sample.shape)
            if self.history is None:
                self.history = zeros_in_layout_of(sample, self.slots)
            elif (self.history.shape, self.history.dtype, self.history.device) != (shape, sample.dtype, sample.device):
                raise ValueError(
                    f"{type(scheduler).__name__}.step: sample changed to {tuple(sample.shape)} {sample.dtype} on "
                    f"{sample.device} during a multistep loop (history {tuple(self.history.shape[1:])} "
                    f"{self.history.dtype} on {self.history.device}); call set_timesteps() to start a new loop"
                )
            history = self.history
        if noise is None:
            if self.noise_bank is not None:
                noise = self.noise_bank
            elif self.draws[self.host_index]:
                noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = scheduler_step(
            sample, model_output, self.coeffs, self.step_index, guidance_scale=guidance_scale, noise=noise,
            history=history, advance_step_index=True,
        )  # fmt: skip
        self.host_index += 1
        return prev_sample


def zeros_in_layout_of(sample: torch.Tensor, count: int) -> torch.Tensor:
    """A zeroed (count, *sample.shape) buffer whose every slice [i] has ``sample``'s memory layout
    (channels_last stays channels_last), so kernels that need one dense layout take them together."""
    order = sorted(range(sample.dim()), key=lambda d: (sample.stride(d), sample.shape[d]), reverse=True)
    buffer = sample.new_zeros((count, *(sample.shape[d] for d in order)))
    return buffer.permute(0, *(1 + order.index(d) for d in range(sample.dim())))


def draw_noise_bank(draws, start_index: int, shape, generator=None, device=None, dtype=torch.float32):
    """A (num_steps, *shape) bank holding, at each step from ``start_index`` on where ``draws`` says
    diffusers' ``step`` draws noise, exactly the ``randn_tensor(shape, generator, device, dtype)``
    draw it makes, in the same order; other rows are zeros (their noise coefficient is 0)."""
    shape = tuple(shape)
    bank = torch.zeros((len(draws), *shape), device=device, dtype=dtype)
    for i in range(start_index, len(draws)):
        if draws[i]:
            bank[i] = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    return bank
