"""``BaseOutput``: the dict-like dataclass that every model, scheduler and pipeline output derives from.

It behaves as diffusers' ``BaseOutput`` does, so code written against diffusers' outputs runs
unchanged: fields read as attributes (``out.sample``), by name (``out["sample"]``) or by
position (``out[0]``); the object is an ``OrderedDict`` of its non-``None`` fields
(``isinstance(out, dict)``, ``out.keys()``, ``out.values()``, iterating yields the keys);
``to_tuple()`` gives the non-``None`` values in field order. Entries cannot be deleted or
popped, since an output's fields are fixed. Subclasses are registered as pytree nodes, so
``torch.compile`` and ``torch.utils._pytree`` see through them.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Tuple


class BaseOutput(OrderedDict):
    """Base of the output dataclasses (subclasses are ``@dataclass``es)."""

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        try:
            import torch.utils._pytree as pytree
        except ImportError:  # pragma: no cover - torch is a dependency
            return
        register = getattr(pytree, "register_pytree_node", None) or pytree._register_pytree_node
        try:
            register(
                cls,
                lambda out: (list(out.values()), list(out.keys())),
                lambda values, keys: cls(**dict(zip(keys, values))),
            )
        except ValueError:  # already registered (a module reloaded)
            pass

    def __post_init__(self) -> None:
        fields = dataclasses.fields(self)
        if not fields:
            raise ValueError(f"{type(self).__name__} has no fields")
        # One dict passed as the only argument fills the fields from its items, as in diffusers.
        first = getattr(self, fields[0].name)
        if isinstance(first, dict) and all(getattr(self, f.name) is None for f in fields[1:]):
            for key, value in first.items():
                self[key] = value
            return
        for field in fields:
            value = getattr(self, field.name)
            if value is not None:
                self[field.name] = value

    def _refuse(self, name: str):
        raise TypeError(f"cannot use `{name}` on a {type(self).__name__}: an output's fields are fixed")

    def __delitem__(self, *args, **kwargs):
        self._refuse("__delitem__")

    def setdefault(self, *args, **kwargs):
        self._refuse("setdefault")

    def pop(self, *args, **kwargs):
        self._refuse("pop")

    def popitem(self, *args, **kwargs):
        self._refuse("popitem")

    def update(self, *args, **kwargs):
        self._refuse("update")

    def __getitem__(self, key):
        if isinstance(key, str):
            return OrderedDict.__getitem__(self, key)
        return self.to_tuple()[key]

    def __setattr__(self, name: str, value: Any) -> None:
        # A field set to a value after construction also becomes a key (and stays in sync).
        if name in self.keys() and value is not None:
            OrderedDict.__setitem__(self, name, value)
        elif value is not None and name in {f.name for f in dataclasses.fields(self)}:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)

    def __setitem__(self, key, value) -> None:
        OrderedDict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def __reduce__(self):
        if not dataclasses.is_dataclass(self):
            return super().__reduce__()
        callable_, _args, *rest = super().__reduce__()
        args = tuple(getattr(self, f.name) for f in dataclasses.fields(self))
        return callable_, args, *rest

    def to_tuple(self) -> Tuple[Any, ...]:
        """The non-``None`` field values, in field order."""
        return tuple(self[k] for k in self.keys())
