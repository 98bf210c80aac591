"""``fastdiff.warmup``: tune every kernel for the shapes a model or pipeline will see, before any capture.

(Defined here, in ``fastdiff.tuning``: a submodule named ``warmup`` would shadow the function
``fastdiff.warmup`` once imported.)

Triton's autotuner benchmarks its candidate configs the first time a kernel meets a new tuning
key (shapes, dtypes). That must never happen inside a CUDA graph capture: fastdiff's autotuned
kernels refuse it with :class:`fastdiff.kernels._tuning.TuningDuringCaptureError`. ``warmup``
runs one eager forward of a model (or one eager generation of a pipeline) with the caller's
example inputs, under ``torch.no_grad()`` and with CUDA graphs off, so that every op dispatches,
compiles and tunes at those shapes. Afterwards::

    report = fastdiff.warmup(pipe, dict(prompt="a cat", num_inference_steps=30, height=512, width=512))
    print(report)                 # which ops ran on which backends, which kernels tuned which keys
    pipe("a cat", num_inference_steps=30, height=512, width=512)   # captures without tuning

It also turns on Triton's on-disk autotune cache for fastdiff's kernels
(:func:`fastdiff.graphs.enable_triton_autotune_cache`), so that the chosen configs persist between
processes: a second process that warms up at the same shapes reads them instead of re-tuning.

Nothing else is left behind: the torch random number generators (CPU and CUDA), and the
``torch.Generator`` objects passed in ``example_inputs``, are restored to their states from before
the warm-up, so a later call gives the numbers it would have given without it. A pipeline's
scheduler is reset by its next ``__call__`` (``set_timesteps``), as after any call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import time
from collections import Counter
from typing import Any, Dict, Iterator, List, Mapping, Tuple

import torch

__all__ = ["WarmupReport", "warmup"]


@dataclasses.dataclass
class WarmupReport:
    """What :func:`warmup` did.

    Attributes:
        kind (`str`): ``"module"`` or ``"pipeline"``.
        ops (`dict`): ``(op_name, backend_name) -> calls`` for every fused op that ran
            (``fastdiff.trace_dispatch``).
        processors (`dict`): attention processor class name -> calls (the trace names them too).
        tuned (`dict`): autotuned kernel (``"attention._attn_fwd_tuned"``, ...) -> the tuning keys it
            gained during the warm-up (tuned now, or read from the disk cache). Empty where nothing
            was tuned: on the CPU, under the Triton interpreter (one config, nothing to tune), or when
            every key was tuned before.
        autotune_cache (`dict`): what :func:`fastdiff.graphs.enable_triton_autotune_cache` reported
            (``kernels``: name -> enabled, ``skipped``: name -> why), or ``{}`` with ``persist=False``.
        seconds (`float`): the warm-up's wall time.
        notes (`list[str]`): anything that limited the report (no Triton, ...).
    """

    kind: str
    ops: Dict[Tuple[str, str], int]
    tuned: Dict[str, List[tuple]]
    autotune_cache: Dict[str, Any]
    seconds: float
    processors: Dict[str, int] = dataclasses.field(default_factory=dict)
    notes: List[str] = dataclasses.field(default_factory=list)

    @property
    def backends(self) -> Dict[str, List[str]]:
        """op_name -> the backends it ran on (sorted)."""
        result: Dict[str, List[str]] = {}
        for op, backend in sorted(self.ops):
            result.setdefault(op, []).append(backend)
        return result

    def __str__(self) -> str:
        lines = [f"fastdiff.warmup ({self.kind}, {self.seconds:.2f} s)"]
        if self.ops:
            lines.append("fused ops: " + ", ".join(f"{op} -> {backend} x{n}" for (op, backend), n in sorted(self.ops.items())))
        else:
            lines.append("fused ops: none ran")
        if self.processors:
            lines.append("attention processors: " + ", ".join(f"{name} x{n}" for name, n in sorted(self.processors.items())))
        if self.tuned:
            for name, keys in sorted(self.tuned.items()):
                lines.append(f"tuned {name}: {len(keys)} new key(s): " + "; ".join(map(str, keys)))
        else:
            lines.append("tuned: no autotuned kernel gained a key")
        enabled = sorted(k for k, on in self.autotune_cache.get("kernels", {}).items() if on)
        if self.autotune_cache:
            lines.append(f"autotune disk cache: on for {enabled}" if enabled else "autotune disk cache: on for no kernel")
            lines += [f"  {name}: {why}" for name, why in sorted(self.autotune_cache.get("skipped", {}).items())]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# What the warm-up reads and restores
# ---------------------------------------------------------------------------------------------


def _autotuned_kernels() -> Dict[str, Any]:
    """fastdiff's Triton autotuners by name (every module of fastdiff.kernels)."""
    from fastdiff.graphs import _autotuned_kernels as found

    return found()


def _tuned_keys(tuners: Mapping[str, Any]) -> Dict[str, set]:
    return {name: set(getattr(tuner, "cache", {})) for name, tuner in tuners.items()}


def _generators(value) -> Iterator[torch.Generator]:
    if isinstance(value, torch.Generator):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _generators(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _generators(v)


@contextlib.contextmanager
def _rng_preserved(example_inputs) -> Iterator[None]:
    """Restore torch's default generators (CPU, and CUDA where initialised) and every
    ``torch.Generator`` in ``example_inputs`` to their states from before the block."""
    generators = list({id(g): g for g in _generators(example_inputs)}.values())
    states = [g.get_state() for g in generators]
    cpu_state = torch.get_rng_state()
    # With a GPU present this initialises CUDA (a warm-up that first touches CUDA would otherwise
    # consume draws from generators whose starting state was never read).
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        for g, state in zip(generators, states):
            g.set_state(state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def _optimize_graphs_off(obj) -> Iterator[None]:
    """Turn off, for the block, the graph runners that ``fastdiff.optimize`` installed on ``obj``
    (a diffusers pipeline or model): their second call would otherwise capture."""
    runners = []
    if getattr(obj, "_fastdiff_optimize_state", None) is not None:
        from fastdiff.optimize_diffusers import optimization_report

        runners = list(optimization_report(obj).graph_runners.values())
    enabled = [runner.enabled for runner in runners]
    for runner in runners:
        runner.enabled = False
    try:
        yield
    finally:
        for runner, on in zip(runners, enabled):
            runner.enabled = on


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _is_pipeline(obj) -> bool:
    """A fastdiff pipeline, or a diffusers one (``fastdiff.optimize`` leaves diffusers pipelines as they are)."""
    from fastdiff.pipelines.pipeline_utils import DiffusionPipeline

    if isinstance(obj, DiffusionPipeline):
        return True
    return any(c.__name__ == "DiffusionPipeline" and c.__module__.startswith("diffusers.") for c in type(obj).__mro__)


def _check_keywords(fn, names, what: str) -> None:
    """Raise a TypeError naming the keywords ``fn`` does not take (unless it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(names) - set(params))
    if unknown:
        accepted = [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]
        raise TypeError(f"example_inputs: {what} takes no argument(s) {unknown}; it takes {accepted}")


def _module_call(module: torch.nn.Module, example_inputs):
    name = type(module).__name__
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(k, str) for k in example_inputs):
            raise TypeError(f"example_inputs: expected a dict with str keys (keyword arguments of {name}.forward), got keys {list(example_inputs)}")
        _check_keywords(module.forward, example_inputs, f"{name}.forward")
        return lambda: module(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return lambda: module(*example_inputs)
    hint = " (wrap a single tensor as (x,))" if isinstance(example_inputs, torch.Tensor) else ""
    raise TypeError(
        f"example_inputs: for a model, expected a tuple of positional arguments or a dict of keyword arguments "
        f"of {name}.forward, got {type(example_inputs).__name__}{hint}"
    )


def _pipeline_call(pipe, example_inputs):
    name = type(pipe).__name__
    if not isinstance(example_inputs, Mapping) or not all(isinstance(k, str) for k in example_inputs):
        raise TypeError(
            f"example_inputs: for a pipeline, expected a dict of {name}.__call__ keyword arguments "
            f"(e.g. dict(prompt=..., num_inference_steps=...)), got {type(example_inputs).__name__}"
        )
    kwargs = dict(example_inputs)
    params = inspect.signature(pipe.__call__).parameters
    if "cuda_graph" in kwargs:
        raise ValueError(
            "example_inputs: leave out cuda_graph; warmup always runs the denoising loop eagerly "
            "(tuning inside a CUDA graph capture is refused)"
        )
    _check_keywords(pipe.__call__, kwargs, f"{name}.__call__")
    if "cuda_graph" in params:
        kwargs["cuda_graph"] = False
    return lambda: pipe(**kwargs)


def _persist_autotune_cache() -> Dict[str, Any]:
    from fastdiff.graphs import ensure_triton_autotune_cache

    return ensure_triton_autotune_cache()


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------


def warmup(module_or_pipeline, example_inputs, *, persist: bool = True) -> WarmupReport:
    """Pre-tune every fastdiff op for the shapes ``module_or_pipeline`` will see with ``example_inputs``.

    Args:
        module_or_pipeline: a model (``fastdiff.ModelMixin`` or any ``torch.nn.Module``, a
            ``fastdiff.optimize``'d diffusers model included), or a pipeline (a fastdiff
            ``DiffusionPipeline`` subclass, or a diffusers pipeline).
        example_inputs: for a model, a tuple of positional arguments or a dict of keyword arguments of
            its ``forward``, on the device and in the dtype and memory format of the real calls. For a
            pipeline, a dict of ``__call__`` keyword arguments: the real calls' sizes, batch, guidance
            and ``num_inference_steps`` (each step has the same shapes, so fewer steps tune the same
            keys; the scheduler's own per-step variants are covered only by the caller's count).
        persist (`bool`): turn on Triton's on-disk autotune cache for fastdiff's kernels first, so the
            chosen configs are written to (and read from) Triton's cache directory (``TRITON_CACHE_DIR``,
            default ``~/.triton/cache``) and a new process does not tune again.

    One eager forward runs under ``torch.no_grad()`` (a pipeline's loop with ``cuda_graph=False``;
    the graph runners of a ``fastdiff.optimize``'d pipeline or model are off for the warm-up). It
    must not be called inside a CUDA graph capture. Returns a :class:`WarmupReport`.
    """
    from fastdiff.kernels._tuning import capturing

    if isinstance(module_or_pipeline, torch.nn.Module):
        kind, run = "module", _module_call(module_or_pipeline, example_inputs)
    elif _is_pipeline(module_or_pipeline):
        kind, run = "pipeline", _pipeline_call(module_or_pipeline, example_inputs)
    else:
        raise TypeError(
            "module_or_pipeline: expected a model (fastdiff.ModelMixin or torch.nn.Module) or a pipeline "
            f"(fastdiff.DiffusionPipeline or a diffusers pipeline), got {type(module_or_pipeline).__name__}"
        )
    if not isinstance(persist, bool):
        raise TypeError(f"persist: expected True or False, got {persist!r}")
    if capturing():
        raise RuntimeError(
            "fastdiff.warmup was called inside a CUDA graph capture; call it before capturing (it tunes, which a capture refuses)"
        )

    import fastdiff.backends as backends

    notes: List[str] = []
    cache_report = _persist_autotune_cache() if persist else {}
    try:
        tuners = _autotuned_kernels()
    except ImportError as error:
        tuners = {}
        notes.append(f"autotuned kernels not inspected: {error}")
    before = _tuned_keys(tuners)

    start = time.perf_counter()
    with _rng_preserved(example_inputs), _optimize_graphs_off(module_or_pipeline), backends.trace_dispatch() as calls:
        with torch.no_grad():
            run()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    after = _tuned_keys(tuners)
    tuned = {name: sorted(after[name] - before[name], key=repr) for name in tuners if after[name] - before[name]}
    from fastdiff.nn.attention_processor import PROCESSOR_TRACE_NAME

    ops = Counter(call for call in calls if call[0] != PROCESSOR_TRACE_NAME)
    processors = Counter(name for op, name in calls if op == PROCESSOR_TRACE_NAME)
    return WarmupReport(
        kind=kind, ops=dict(ops), tuned=tuned, autotune_cache=cache_report, seconds=seconds,
        processors=dict(processors), notes=notes,
    )  # fmt: skip
