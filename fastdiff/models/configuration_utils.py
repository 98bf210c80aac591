"""Configuration handling shared by every model: ``ConfigMixin`` and ``@register_to_config``.

Mirrors diffusers' ``configuration_utils`` closely enough that a ``config.json``
written by diffusers loads here and one written here loads in diffusers: the same
keys, the same ``_class_name`` entry, and the same warning for keys the class
does not take.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

logger = logging.getLogger(__name__)


class FrozenDict(dict):
    """A dict that cannot be changed after creation; keys also read as attributes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Keys are also plain instance attributes (as in diffusers), so ``config.key`` in a
        # forward pass is an ordinary attribute read that torch.compile traces without a break.
        self.__dict__.update(self)

    def _refuse(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is immutable; use register_to_config to change a config")

    __setitem__ = __delitem__ = setdefault = pop = popitem = update = clear = _refuse

    def __setattr__(self, name, value):
        self._refuse()

    def __reduce__(self):
        return (type(self), (dict(self),))

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no entry {name!r}") from None


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    return value


class ConfigMixin:
    """Stores a class's constructor arguments as its config.

    Subclasses set ``config_name`` (the file name, ``config.json`` for models) and
    decorate ``__init__`` with :func:`register_to_config`. ``ignore_for_config``
    lists constructor arguments that are not saved.
    """

    config_name: Optional[str] = None
    ignore_for_config: Tuple[str, ...] = ()

    def register_to_config(self, **kwargs) -> None:
        if self.config_name is None:
            raise NotImplementedError(f"{type(self).__name__} must define the class attribute `config_name`")
        current = dict(getattr(self, "_internal_dict", {}))
        current.update(kwargs)
        # nn.Module.__setattr__ would try to register a dict as a plain attribute; bypass it.
        object.__setattr__(self, "_internal_dict", FrozenDict(current))

    @property
    def config(self) -> FrozenDict:
        """The constructor arguments this instance was built with, as a read-only dict."""
        return self._internal_dict

    # ------------------------------------------------------------------ saving

    def to_json_string(self) -> str:
        from fastdiff import __version__

        config = {k: _json_value(v) for k, v in self._internal_dict.items() if not k.startswith("_")}
        config["_class_name"] = type(self).__name__
        config["_fastdiff_version"] = __version__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write ``config_name`` into ``save_directory`` (created if needed); returns the file path."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory: {save_directory} is a file, expected a folder")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        logger.info("configuration saved in %s", path)
        return path

    # ----------------------------------------------------------------- loading

    @classmethod
    def load_config(cls, folder: Union[str, os.PathLike], subfolder: Optional[str] = None) -> Dict[str, Any]:
        """Read ``config_name`` from a local folder (optionally its ``subfolder``)."""
        if cls.config_name is None:
            raise NotImplementedError(f"{cls.__name__} must define the class attribute `config_name`")
        directory = os.path.join(folder, subfolder) if subfolder else os.fspath(folder)
        path = os.path.join(directory, cls.config_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no file named {cls.config_name} in {directory}")
        try:
            with open(path, "r", encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object, found {type(config).__name__}")
        return config

    @classmethod
    def _init_keys(cls) -> set:
        keys = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
        return keys - set(cls.ignore_for_config)

    @classmethod
    def extract_init_dict(cls, config: Dict[str, Any], **kwargs) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Split ``config`` (plus overriding ``kwargs``) into constructor arguments and the rest.

        Keys the constructor does not take are logged with the same warning diffusers
        gives, and returned as the second value together with unused ``kwargs``.
        """
        expected = cls._init_keys()
        public = {k: v for k, v in config.items() if not k.startswith("_")}
        init_dict = {}
        for key in expected:
            if key in kwargs:
                init_dict[key] = kwargs.pop(key)
                public.pop(key, None)
            elif key in public:
                init_dict[key] = public.pop(key)
        if public:
            logger.warning(
                f"The config attributes {public} were passed to {cls.__name__}, but are not expected and will be "
                f"ignored. Please verify your {cls.config_name} configuration file."
            )
        missing = expected - set(init_dict)
        if missing:
            logger.info("%s was not found in config. Values will be initialized to default values.", sorted(missing))
        return init_dict, {**public, **kwargs}

    @classmethod
    def from_config(cls, config: Optional[Dict[str, Any]] = None, **kwargs):
        """Build an instance from a config dict (e.g. another instance's ``.config``).

        ``kwargs`` override entries of ``config``. Unknown config entries are warned
        about and ignored; unknown ``kwargs`` raise a ValueError.
        """
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise ValueError(f"config: expected a dict or FrozenDict, got {type(config).__name__}")
        overrides = dict(kwargs)
        unknown = set(overrides) - cls._init_keys()
        if unknown:
            raise ValueError(f"{cls.__name__}.from_config got unexpected keyword arguments {sorted(unknown)}")
        init_dict, _ = cls.extract_init_dict(config, **overrides)
        return cls(**init_dict)


def register_to_config(init):
    """Decorator for ``__init__`` of a :class:`ConfigMixin` subclass.

    Every argument, given or defaulted, is recorded in ``self.config`` before
    ``__init__`` runs. Arguments listed in ``ignore_for_config`` are not recorded.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def inner_init(self, *args, **kwargs):
        if not isinstance(self, ConfigMixin):
            raise RuntimeError(f"@register_to_config is on {type(self).__name__}.__init__, which is not a ConfigMixin")
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        ignore = set(getattr(self, "ignore_for_config", ()))
        values = {k: v for k, v in list(bound.arguments.items())[1:] if k not in ignore and not k.startswith("_")}
        self.register_to_config(**values)
        init(self, *args, **kwargs)

    return inner_init
