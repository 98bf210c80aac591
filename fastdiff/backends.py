"""Backend dispatch shared by every fastdiff op.

Each op (group_norm, attention, ...) owns a :class:`Dispatcher` holding its
backends. A backend declares what it supports by answering
``not_supported_reasons(inputs) -> list[str]``; an empty list means it can run.

Selection, per call:

1. the op's ``backend=`` keyword, if given;
2. else the innermost ``with fastdiff.use_backend(...)`` block (per thread);
3. else the ``FASTDIFF_BACKEND`` environment variable;
4. else ``"auto"``: the first backend with no reasons, in the op's priority
   order for the input's device (and GPU architecture).

A forced backend that cannot run raises :class:`BackendNotSupportedError`
listing every backend with its reasons. Nothing ever falls back silently.

``FASTDIFF_BACKEND`` and ``use_backend`` take either one name for every op
(``"triton"``) or per-op choices (``"group_norm=triton,attention=sdpa"`` /
``use_backend(group_norm="triton")``). A name an op does not have is an error.

``with fastdiff.backends.use_target("sm_90"):`` makes the reasons decide for a
named GPU (:class:`DeviceDescription`: capability, SM count, name) instead of
querying ``torch.cuda``, so dispatch runs on fake CUDA tensors without a GPU.

**Plans.** An op may pass ``cache_key=``: a hashable summary of everything its
argument checks and every backend's reasons read (shapes, strides, dtypes,
devices, scalar arguments). :meth:`Dispatcher.lookup` then answers a repeat
call with the backend chosen before, without re-running checks or reasons, so
the host path of a fused op stays a few microseconds. The plan is keyed also by
the request (``backend=``, ``use_backend``, ``FASTDIFF_BACKEND``) and the
:func:`use_target` description; :func:`clear_plans` drops every plan.

``with fastdiff.trace_dispatch() as calls:`` records ``(op_name, backend_name)``
for each op call made inside the block, and ``explain_dispatch`` reports the
reasons every backend gives for one set of inputs.

Under ``torch.compile`` the choice is made once, when Dynamo traces the call,
and baked into the graph without a graph break; calls replayed from a compiled
graph are not recorded by ``trace_dispatch``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

AUTO = "auto"
ENV_VAR = "FASTDIFF_BACKEND"


class BackendNotSupportedError(ValueError):
    """A requested backend cannot run these inputs (or does not exist)."""


def triton_interpret_enabled() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports (asked once: a failed import is not retried on every op call)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def device_reasons(tensors: Sequence[torch.Tensor], *, allow_cpu_interpret: bool) -> List[str]:
    """Shared device check for GPU kernels.

    CUDA tensors are accepted. CPU tensors are accepted only when
    ``allow_cpu_interpret`` and TRITON_INTERPRET=1 (Triton's CPU interpreter).
    """
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        return [f"inputs are on different devices: {sorted(str(d) for d in devices)}"]
    device = devices.pop()
    if device.type == "cuda":
        return []
    if device.type == "cpu" and allow_cpu_interpret and triton_interpret_enabled():
        return []
    if allow_cpu_interpret:
        return [f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"]
    return [f"needs CUDA tensors, got {device.type}"]


@dataclass
class Backend:
    """One implementation of an op.

    ``not_supported_reasons(inputs)`` returns why it cannot run ``inputs``
    (a dict the op builds, documented in the op's module); ``[]`` means it can.
    ``run(inputs)`` computes the op's result.
    """

    name: str
    not_supported_reasons: Callable[[Mapping[str, Any]], List[str]]
    run: Callable[[Mapping[str, Any]], Any]
    description: str = ""


class Dispatcher:
    """The backends of one op and the rule that orders them for ``auto``.

    ``priority(inputs)`` returns backend names, best first. Ops keep their
    priority table next to their kernels, with the benchmark that set it.
    """

    def __init__(self, op_name: str, backends: Sequence[Backend], priority: Callable[[Mapping[str, Any]], Sequence[str]]):
        self.op_name = op_name
        self.backends: Dict[str, Backend] = {b.name: b for b in backends}
        self.priority = priority
        self._plans: Dict[Any, Backend] = {}
        _ALL_PLANS.append(self._plans)

    def untouched(self, name: str, run: Callable, reasons: Callable, priority: Callable) -> bool:
        """Whether nobody watches or replaces this dispatcher's choice: no instance ``select`` or
        ``lookup`` (pipeline explain and the step census patch them), and the op's own ``priority``
        and backend ``name``'s own ``run`` and reasons. The ops' CPU fast paths skip dispatch only then."""
        own = self.__dict__
        backend = own["backends"][name]
        return (
            "select" not in own and "lookup" not in own and own["priority"] is priority
            and backend.run is run and backend.not_supported_reasons is reasons
        )

    def reasons(self, inputs: Mapping[str, Any]) -> Dict[str, List[str]]:
        """Every backend's reasons for ``inputs`` (empty list = can run)."""
        return {name: list(b.not_supported_reasons(inputs)) for name, b in self.backends.items()}

    def requested(self, backend: Optional[str]) -> Tuple[str, str]:
        """The backend name asked for, and where the request came from."""
        if backend is not None:
            return backend, "backend= argument"
        if _is_compiling():
            # Inside torch.compile the choice is read once, at trace time, and
            # baked into the graph (Dynamo cannot trace ContextVar reads).
            return _requested_while_tracing(self.op_name)
        return _requested_from_context(self.op_name)

    def lookup(self, cache_key: Any, backend: Optional[str] = None) -> Optional[Backend]:
        """The backend an earlier :meth:`select` with the same ``cache_key`` chose under the
        same request and target, recorded for ``trace_dispatch`` as a fresh choice would
        be; None on a miss (and always while torch.compile traces)."""
        if _is_compiling():
            return None
        chosen = self._plans.get((cache_key, self.requested(backend)[0], _TARGET.get()))
        if chosen is not None:
            _record(self.op_name, chosen.name)
        return chosen

    def select(self, inputs: Mapping[str, Any], backend: Optional[str] = None, cache_key: Any = None) -> Backend:
        """The backend that runs ``inputs``; with ``cache_key`` the choice is kept for
        :meth:`lookup` (the caller promises the key covers what checks and reasons read)."""
        name, source = self.requested(backend)
        if name != AUTO and name not in self.backends:
            raise BackendNotSupportedError(
                f"{self.op_name}: unknown backend {name!r} (from {source}); "
                f"expected one of {[AUTO, *self.backends]}"
            )
        if name == AUTO:
            order = list(self.priority(inputs))
            for candidate in order:
                reasons = self.backends[candidate].not_supported_reasons(inputs)
                if not reasons:
                    chosen = self.backends[candidate]
                    break
            else:
                raise BackendNotSupportedError(self._report(f"no backend can run these inputs (auto order {order})", inputs))
        else:
            chosen = self.backends[name]
            if chosen.not_supported_reasons(inputs):
                raise BackendNotSupportedError(self._report(f"backend {name!r} (from {source}) cannot run these inputs", inputs))
        if not _is_compiling():
            _record(self.op_name, chosen.name)
            if cache_key is not None:
                if len(self._plans) >= _MAX_PLANS:
                    self._plans.clear()
                self._plans[(cache_key, name, _TARGET.get())] = chosen
        return chosen

    def __call__(self, inputs: Mapping[str, Any], backend: Optional[str] = None):
        return self.select(inputs, backend).run(inputs)

    def _reason_lines(self, inputs: Mapping[str, Any]) -> List[str]:
        lines = []
        for name, reasons in self.reasons(inputs).items():
            status = "; ".join(reasons) if reasons else "supported"
            lines.append(f"  {name}: {status}" + (f"  [{self.backends[name].description}]" if self.backends[name].description else ""))
        return lines

    def _report(self, headline: str, inputs: Mapping[str, Any]) -> str:
        return "\n".join([f"{self.op_name}: {headline}:", *self._reason_lines(inputs)])

    def explain(self, inputs: Mapping[str, Any], backend: Optional[str] = None) -> str:
        """A readable account of which backend would run, why, and every backend's reasons."""
        name, source = self.requested(backend)
        order = list(self.priority(inputs))
        if name == AUTO:
            runnable = [b for b in order if not self.backends[b].not_supported_reasons(inputs)]
            verdict = f"would run {runnable[0]!r}" if runnable else "no backend can run these inputs"
        elif name not in self.backends:
            verdict = f"unknown backend {name!r}"
        else:
            verdict = "cannot run" if self.backends[name].not_supported_reasons(inputs) else f"would run {name!r}"
        header = f"{self.op_name}: requested {name!r} (from {source}), auto order {order}: {verdict}"
        return "\n".join([header, *self._reason_lines(inputs)])


# ---------------------------------------------------------------------------
# Forcing: per-thread (and per-asyncio-task) stack of choices via contextvars.
# ---------------------------------------------------------------------------

_FORCED: contextvars.ContextVar[Tuple[Dict[str, str], ...]] = contextvars.ContextVar("fastdiff_forced_backends", default=())


# The FASTDIFF_BACKEND entry of os.environ's underlying table, read without os.environ.get,
# whose KeyError on an unset variable costs about 1 us per call (as much as the rest of an op's
# CPU fast path). os.environ[...] = / del / monkeypatch.setenv all update this table.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON_DATA is not None else None


def context_requests_auto() -> bool:
    """True when neither :func:`use_backend` nor FASTDIFF_BACKEND (unset or empty) names a
    backend, so a call with ``backend=None`` asks for ``auto``. False when either does, even
    for another op: such calls take the dispatcher's path, which reads and checks the request."""
    if _FORCED.get():
        return False
    if _ENVIRON_DATA is not None:
        return not _ENVIRON_DATA.get(_ENV_KEY)
    return not os.environ.get(ENV_VAR)


_TRACES: contextvars.ContextVar[Tuple[list, ...]] = contextvars.ContextVar("fastdiff_dispatch_traces", default=())

_ALL_OPS = "*"


@functools.lru_cache(maxsize=32)
def _parse_choice(text: str, source: str) -> Mapping[str, str]:
    """Parse ``"triton"`` or ``"group_norm=triton,attention=sdpa"`` (once per distinct text;
    the environment variable is read on every call, so changing it takes effect)."""
    text = text.strip()
    if not text:
        return {}
    if "=" not in text:
        return {_ALL_OPS: text}
    choice = {}
    for item in text.split(","):
        op, sep, name = item.partition("=")
        if not sep or not op.strip() or not name.strip():
            raise ValueError(f"{source}: expected 'backend' or 'op=backend,op=backend', got {text!r}")
        choice[op.strip()] = name.strip()
    return choice


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def _requested_from_context(op_name: str) -> Tuple[str, str]:
    forced = _forced_for(op_name)
    if forced is not None:
        return forced, "fastdiff.use_backend"
    env = _choice_for(_parse_choice(os.environ.get(ENV_VAR, ""), ENV_VAR), op_name)
    if env is not None:
        return env, f"{ENV_VAR} environment variable"
    return AUTO, "auto"


def _requested_while_tracing(op_name: str) -> Tuple[str, str]:
    return _requested_from_context(op_name)


# What torch.compiler.assume_constant_result(fn) does, without importing
# torch._dynamo (about a second) when fastdiff.ops is imported: Dynamo calls the
# function at trace time and treats its result as a constant.
_requested_while_tracing._dynamo_marked_constant = True


def _choice_for(choice: Mapping[str, str], op_name: str) -> Optional[str]:
    return choice.get(op_name, choice.get(_ALL_OPS))


def _forced_for(op_name: str) -> Optional[str]:
    for choice in reversed(_FORCED.get()):
        name = _choice_for(choice, op_name)
        if name is not None:
            return name
    return None


@contextlib.contextmanager
def use_backend(name: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Force backends inside a ``with`` block.

    ``use_backend("triton")`` forces Triton for every op; ``use_backend(group_norm="cuda")``
    forces one op. Blocks nest; the innermost wins. The choice is local to the
    current thread (and asyncio task), so concurrent callers do not interfere.
    """
    if name is not None and per_op:
        raise ValueError("use_backend: give either one backend name for every op or op=backend keywords, not both")
    if name is None and not per_op:
        raise ValueError("use_backend: expected a backend name such as 'triton', or op=backend keywords")
    choice: Dict[str, str] = {_ALL_OPS: name} if name is not None else dict(per_op)
    token = _FORCED.set(_FORCED.get() + (choice,))
    try:
        yield
    finally:
        _FORCED.reset(token)


@contextlib.contextmanager
def trace_dispatch() -> Iterator[List[Tuple[str, str]]]:
    """Record ``(op_name, backend_name)`` for every op call made inside the block."""
    calls: List[Tuple[str, str]] = []
    token = _TRACES.set(_TRACES.get() + (calls,))
    try:
        yield calls
    finally:
        _TRACES.reset(token)


def _record(op_name: str, backend_name: str) -> None:
    traces = _TRACES.get()
    for calls in traces:
        calls.append((op_name, backend_name))
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s -> %s", op_name, backend_name)


_DISPATCHERS: Dict[str, Dispatcher] = {}
# Every dispatcher's plan table, for clear_plans(); a table past _MAX_PLANS starts again empty.
_ALL_PLANS: List[Dict[Any, Backend]] = []
_MAX_PLANS = 4096


def clear_plans() -> None:
    """Forget every op's cached choices (see ``cache_key`` in :meth:`Dispatcher.select`).
    Needed only after changing something a backend's reasons read that its op's key
    does not cover, such as monkeypatching a reason function in a test."""
    for plans in _ALL_PLANS:
        plans.clear()


def register_dispatcher(dispatcher: Dispatcher) -> Dispatcher:
    if dispatcher.op_name in _DISPATCHERS:
        raise ValueError(f"a dispatcher for {dispatcher.op_name!r} is already registered")
    _DISPATCHERS[dispatcher.op_name] = dispatcher
    return dispatcher


def get_dispatcher(op_name: str) -> Dispatcher:
    import fastdiff.ops  # noqa: F401 - importing the ops registers their dispatchers

    try:
        return _DISPATCHERS[op_name]
    except KeyError:
        raise ValueError(f"unknown op {op_name!r}; expected one of {sorted(_DISPATCHERS)}") from None


def explain_dispatch(op_name: str, *args, target: Any = None, **kwargs) -> str:
    """Which backend ``fastdiff.ops.<op_name>(*args, **kwargs)`` would run, and every backend's reasons.

    ``target`` (``"sm_90"``, ``"sm_80"``, ... or a :class:`DeviceDescription`) answers
    for that GPU instead of the visible one: pass CUDA tensors made under
    ``torch._subclasses.FakeTensorMode`` (or real ones) and read what would run
    on an H100 from a machine without one.
    """
    import fastdiff.ops

    op = getattr(fastdiff.ops, op_name, None)
    explain = getattr(op, "explain", None)
    if explain is None:
        raise ValueError(f"unknown op {op_name!r}")
    if target is None:
        return explain(*args, **kwargs)
    with use_target(target) as description:
        return f"target {description.name}, capability {description.capability}, {description.sm_count} SMs\n" + explain(*args, **kwargs)


# ---------------------------------------------------------------------------
# Device description: what the backends' reasons read instead of torch.cuda.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceDescription:
    """The GPU that dispatch decides for: compute capability, SM count and name.

    Backends' reasons read this (through :func:`cuda_device_description`), never
    ``torch.cuda`` directly, so dispatch also runs on fake CUDA tensors
    (``FakeTensorMode`` on a CPU-only torch) once a target is set with
    :func:`use_target`.
    """

    capability: Tuple[int, int]
    sm_count: int
    name: str


#: Named targets for :func:`use_target` and ``explain_dispatch(..., target=...)``.
TARGETS: Dict[str, DeviceDescription] = {
    "sm_80": DeviceDescription((8, 0), 108, "NVIDIA A100 (sm_80, 108 SMs)"),
    "sm_86": DeviceDescription((8, 6), 84, "NVIDIA RTX 3090 (sm_86, 82-84 SMs)"),
    "sm_89": DeviceDescription((8, 9), 128, "NVIDIA RTX 4090 (sm_89, 128 SMs)"),
    "sm_90": DeviceDescription((9, 0), 132, "NVIDIA H100 SXM (sm_90, 132 SMs)"),
}

_TARGET: contextvars.ContextVar[Optional[DeviceDescription]] = contextvars.ContextVar("fastdiff_device_target", default=None)


def _as_description(target: Any) -> DeviceDescription:
    if isinstance(target, DeviceDescription):
        return target
    if isinstance(target, str) and target in TARGETS:
        return TARGETS[target]
    raise ValueError(f"target: expected one of {sorted(TARGETS)} or a fastdiff.backends.DeviceDescription, got {target!r}")


@contextlib.contextmanager
def use_target(target: Any) -> Iterator[DeviceDescription]:
    """Inside the block, dispatch decides for ``target`` (a name in :data:`TARGETS`,
    such as ``"sm_90"``, or a :class:`DeviceDescription`) instead of the visible GPU.

    Per thread (and asyncio task), like :func:`use_backend`. It changes what the
    reasons say for CUDA tensors only; CPU tensors still take CPU paths.
    """
    description = _as_description(target)
    token = _TARGET.set(description)
    try:
        yield description
    finally:
        _TARGET.reset(token)


def current_target() -> Optional[DeviceDescription]:
    """The description set by the innermost :func:`use_target`, or None."""
    return _TARGET.get()


@functools.lru_cache(maxsize=None)
def _visible_description(index: int) -> DeviceDescription:
    props = torch.cuda.get_device_properties(index)
    return DeviceDescription((props.major, props.minor), props.multi_processor_count, props.name)


def cuda_device_description(device: torch.device) -> Optional[DeviceDescription]:
    """What the reasons should assume about CUDA ``device``: the :func:`use_target`
    description if one is set, else the visible GPU's (asked once per index).
    None when there is no target and torch cannot query the device (fake CUDA
    tensors on a CPU-only torch); reasons then say so, see :func:`capability_reasons`."""
    target = _TARGET.get()
    if target is not None:
        return target
    try:
        if not torch.cuda.is_available():
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _visible_description(index)
    except (RuntimeError, AssertionError):  # torch without CUDA, or no driver
        return None


def capability_reasons(device: torch.device, minimum: Tuple[int, int], why: str) -> List[str]:
    """[] when CUDA ``device`` (as described by :func:`cuda_device_description`) has
    compute capability >= ``minimum``; CPU devices give []."""
    if device.type != "cuda":
        return []
    description = cuda_device_description(device)
    if description is None:
        return ["cannot query the CUDA device (no GPU visible); set a target with fastdiff.backends.use_target('sm_90')"]
    if tuple(description.capability) < tuple(minimum):
        major, minor = minimum
        return [f"needs compute capability {major}.{minor} or newer ({why}); the target is {description.name}, capability {description.capability}"]
    return []
