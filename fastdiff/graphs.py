"""The CUDA-graph runner: capture a fixed-shape region once, replay it, keep the cache bounded.

A *region* is a function of tensors only, such as one denoising step (UNet call + CFG combine +
fused scheduler step) or a whole loop whose per-step values come from device tables. The runner
runs it through a capture backend with **static buffers**: each call copies its input tensors into
buffers the graph was captured on, replays the graph, and returns the graph's static outputs.
Nothing in the runner reads a device value on the host (no ``.item()``, ``.cpu()``, ``.tolist()``).

Interface for a pipeline (one runner per pipeline, one region per ``__call__``)::

    from fastdiff.graphs import GraphRunner

    # in __init__ (or lazily): the runner frees everything when the pipeline is deleted
    self._graphs = GraphRunner(owner=self, max_graphs=4, max_bytes=None)

    # in __call__, once the shapes are known and before the loop:
    region = self._graphs.region(
        "denoise_step",
        self._graph_step,                       # fn(**inputs) -> tensor / tuple / dict of tensors
        dict(latents=latents, t=timesteps[0], prompt_embeds=prompt_embeds, guidance=guidance),
        modules=[self.unet],                    # fingerprinted: a swapped weight recaptures
        scheduler=self.scheduler, scheduler_kwargs=extra_step_kwargs,
        watch=lambda: scheduler_state_tensors(self.scheduler),   # device tables the step reads
        extra=(self._guidance_rescale, ...),    # every Python value fn reads (baked into a graph)
        enabled=cuda_graph, callback_on_step_end=callback_on_step_end,
        callback_tensor_inputs=callback_on_step_end_tensor_inputs,
    )
    for i, t in enumerate(timesteps):
        latents = region(latents=latents, t=t, prompt_embeds=prompt_embeds, guidance=guidance)
    latents = latents.clone()                   # static outputs are overwritten by the next replay
    # region.reasons: why this call ran eagerly ([] when it captured); region.captured: it replayed

What a region call does:

1. ``region.reasons`` non-empty (see :func:`capture_reasons`): ``fn(**inputs)`` runs eagerly.
2. A cached graph whose key, weight fingerprint and watched tensors all match: copy the inputs
   into the static input buffers, replay, return the static outputs. (After an in-place weight
   change, one eager step first: see Weights below.)
3. Otherwise the **first** call at a new key (or after a weight swap) runs ``fn`` eagerly: this
   is the warm-up. Triton compiles and autotunes there, torch.compile compiles there, and the
   fused scheduler step builds its device table, step index and history ring there. Autotuning
   never happens inside a capture. The next call (with the watched tensors unchanged by the
   warm-up step) captures and replays. A capture that fails (a host sync inside the region, an
   op that cannot be captured) is recorded, warned about once, and that key runs eagerly from
   then on; ``region.reasons`` says why. Random draws inside a capture are refused the same way
   (they would not repeat the eager run's numbers): a stochastic scheduler needs its noise bank
   (``scheduler.prepare_noise_bank``) before the loop.

Contract for ``fn``:

* It takes the region's inputs as keyword arguments (tensors, None, or dicts/lists of those, such
  as ``added_cond_kwargs``) and returns a tensor, or a tuple/list/dict of tensors. Everything else
  it reads is baked into the graph at capture: Python numbers, host step counters, which module
  ``self.unet`` is. Put every Python value that can differ between
  calls in ``extra`` (it is part of the key), and every tensor that lives outside the inputs and
  the fingerprinted modules (the scheduler's coefficient table, device step index, history ring,
  noise bank) in ``watch``: the graph reads those tensors' memory, so a new tensor recaptures.
* Python side effects run once, at capture, not at replay (a scheduler's host step counter
  advances once for the capture, not per replay).
* The returned tensors are the graph's static outputs: valid until the next replay of the same
  graph. Clone what must outlive the loop.
* One region runs on one thread and the current stream; regions of one runner never run
  concurrently (they share the memory pool).

Scheduler buffers across calls: ``set_timesteps`` gives the fused step new device tensors (table,
step index, history ring), so a per-step graph from an earlier call is stale (its watched tensors
changed): the call warms up one eager step and recaptures. A loop that rewinds the same buffers
(``scheduler.reset_fused_step()``) replays from step 0 with no capture.

The cache key (:func:`graph_key`) holds everything that changes the captured work: the region
name, each input's shape, strides, dtype and device, the scheduler class, config and step
arguments, CFG on/off (a ``guidance`` input or not), every op's requested backend
(``fastdiff.use_backend`` / ``FASTDIFF_BACKEND``; ``auto`` choices follow from shapes, dtypes and
devices, which are in the key), the autocast state, and the caller's ``extra``. The number of
steps is not in it: a per-step graph does the same work at any count, and a new schedule's table is
a new watched tensor, so it replaces the graph rather than adding one (a whole-loop region puts its
step count in ``extra``).

Weights (:func:`weights_fingerprint`), taken when a region is made (once per pipeline call) and at
each capture:

* **recapture**: a parameter or buffer with a new storage pointer, shape, stride, dtype or
  device, or a changed set of tensors: ``load_state_dict(..., assign=True)``, replacing a
  submodule or the whole UNet, ``.to(dtype)``, ``.to(device)``, ``.to(memory_format=...)``.
* **served by the existing graph**: an in-place change of the same storage: ``load_state_dict``
  (in place, the default), fused LoRA weights copied in (``weight.copy_(w + scale * B @ A)``),
  ``.copy_``/``.add_``/``.mul_`` under ``torch.no_grad()``. The graph reads that very memory. Such
  a change bumps the tensors' ``_version`` counters; the first call that sees it runs one step
  eagerly, so that caches derived from the weights on the host side (fastdiff's fused QKV weight
  of ``Attention.fuse_projections()``, rebuilt when its sources' versions change) are refreshed,
  then fingerprints again: every tensor still in place, the graph replays from the next step on
  (``stats["in_place_weight_updates"]``); a cache rebuilt as a new tensor recaptures instead. Either
  way the output is the new weights' output, never a stale graph's.
* Values baked as Python numbers are not weights: a LoRA *scale* passed as
  ``cross_attention_kwargs={"scale": s}`` must go in ``extra``.

Memory: each runner owns one private memory pool (``torch.cuda.graph_pool_handle()``) shared by
all its graphs; graphs never run concurrently, so their intermediates share memory. The cache is
an LRU bounded by ``max_graphs`` and ``max_bytes`` (static input buffers plus the pool's measured
growth at each capture, which holds the static outputs). Evicting the last graph releases the
pool; ``release()`` frees everything (graphs, static buffers, pool); deleting the owner calls it
(``weakref.finalize``). A single graph larger than ``max_bytes`` is not kept: its key runs eagerly
and says so.

Backends: :class:`CUDAGraphBackend` (``torch.cuda.CUDAGraph`` under ``torch.cuda.graph``) is the
default. :class:`StandInBackend` is the CPU stand-in used by tests: it records the ATen ops ``fn``
runs (a ``TorchDispatchMode`` tape), then replays exactly those ops on the same tensors, so it has
a CUDA graph's semantics: Python values and the tensors read are fixed at capture, inputs enter
only through the copy-in, capture leaves no trace on tensors that existed before it, outputs are
undefined (NaN) until the first replay, and ``.item()`` inside a capture raises.

Triton autotune choices persist across processes with :func:`enable_triton_autotune_cache`: a
region's first (warm-up) step on CUDA turns it on (:func:`ensure_triton_autotune_cache`), and so
does ``fastdiff.warmup``, which tunes a model or pipeline before any capture.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import logging
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils import _pytree as pytree

logger = logging.getLogger(__name__)

__all__ = [
    "CUDAGraphBackend",
    "GraphCaptureError",
    "GraphRunner",
    "Region",
    "StandInBackend",
    "capture_reasons",
    "enable_triton_autotune_cache",
    "ensure_triton_autotune_cache",
    "graph_key",
    "scheduler_capture_reasons",
    "scheduler_state_tensors",
    "weights_fingerprint",
]


class GraphCaptureError(RuntimeError):
    """A region cannot be captured (a host sync or a random draw inside it, or an output that is not a tensor)."""


# ---------------------------------------------------------------------------------------------
# Capture backends
# ---------------------------------------------------------------------------------------------


class CUDAGraphBackend:
    """Real capture: ``torch.cuda.CUDAGraph`` captured under ``torch.cuda.graph(pool=...)``.

    The pool is ``torch.cuda.graph_pool_handle()``, one per runner, shared by its graphs. Its
    growth at each capture is measured from the allocator's segments of that pool
    (``torch.cuda.memory_snapshot``), or from ``memory_reserved`` where the snapshot lacks pool ids.
    """

    name = "cuda"

    def device_reasons(self, device: torch.device) -> List[str]:
        if device.type != "cuda":
            return [f"the loop runs on {device.type}; CUDA graphs need CUDA tensors (it runs eagerly)"]
        if not torch.cuda.is_available():
            return ["torch reports no usable CUDA device"]
        return []

    def module_reasons(self, modules: Sequence[torch.nn.Module]) -> List[str]:
        return []

    def new_pool(self, device: torch.device):
        return torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], Any], pool, device: torch.device):
        import torch._dynamo  # noqa: F401 - a dispatch mode's first call imports it; not inside the capture

        graph = torch.cuda.CUDAGraph()
        lint = _lint_mode_class()()
        with torch.cuda.device(device):
            before = _pool_bytes(pool, device)
            with torch.cuda.graph(graph, pool=pool), lint:
                outputs = fn()
            growth = _pool_bytes(pool, device) - before
        return graph, outputs, max(0, growth)

    def replay(self, handle) -> None:
        handle.replay()

    def release_pool(self, pool, device: torch.device) -> None:
        # The graphs holding the pool are gone; hand its now-free segments back to the device.
        with torch.cuda.device(device):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _pool_bytes(pool, device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    segments = torch.cuda.memory_snapshot()
    if segments and "segment_pool_id" in segments[0]:
        pool_id = tuple(pool)
        mine = (s for s in segments if s.get("device") == index and tuple(s["segment_pool_id"]) == pool_id)
        return sum(s["total_size"] for s in mine)
    return torch.cuda.memory_reserved(index)


# ATen ops that read a device value on the host: a CUDA capture fails on them.
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal", "aten::item"}
# ATen ops that draw random numbers: inside a graph they would not give the eager run's numbers.
_RANDOM_OPS = {
    "aten::randn", "aten::rand", "aten::randint", "aten::randn_like", "aten::rand_like", "aten::randint_like",
    "aten::normal", "aten::normal_", "aten::uniform_", "aten::bernoulli", "aten::bernoulli_", "aten::multinomial",
    "aten::exponential_", "aten::randperm",
}  # fmt: skip


def _refuse_in_capture(func) -> None:
    """Raise :class:`GraphCaptureError` for an op a captured region must not run."""
    name = func._schema.name
    if name in _SYNC_OPS:
        raise GraphCaptureError(
            f"{name} reads a device value on the host inside a captured region "
            "(.item(), a Python bool of a tensor, nonzero, ...); a CUDA graph capture fails on it"
        )
    if name in _RANDOM_OPS:
        raise GraphCaptureError(
            f"{name} draws random numbers inside a captured region, which would not repeat the eager run's draws; "
            "pre-draw them (scheduler.prepare_noise_bank(...) before the loop)"
        )


def _lint_mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Lint(TorchDispatchMode):
        """Watches a CUDA capture (not its replays) for host syncs and random draws, and names the op."""

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _refuse_in_capture(func)
            return func(*args, **(kwargs or {}))

    return _Lint


def _storage_key(t: torch.Tensor) -> Tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def _written_tensors(func, args, kwargs) -> List[torch.Tensor]:
    """The tensors an op writes (its schema's ``Tensor(a!)`` arguments)."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        written += [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
    return written


def _tape_mode_class():
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Recorder(TorchDispatchMode):
        """Runs and records every ATen op; snapshots tensors from before the capture before they are written."""

        def __init__(self):
            super().__init__()
            self.ops: list = []
            self.created: set = set()  # storages allocated inside the capture
            self.snapshots: list = []  # (tensor that existed before, its value before the first write)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            _refuse_in_capture(func)
            for t in _written_tensors(func, args, kwargs):
                if _storage_key(t) not in self.created:
                    self.snapshots.append((t, t.detach().clone()))
            inputs = {_storage_key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            out = func(*args, **kwargs)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and _storage_key(t) not in inputs:
                    self.created.add(_storage_key(t))
            self.ops.append((func, args, kwargs, out))
            return out

    return _Recorder


class _Tape:
    def __init__(self, ops):
        self.ops = ops


class StandInBackend:
    """CPU stand-in for CUDA graphs with the same static-buffer semantics (used by the tests).

    Capture records every ATen op ``fn`` runs, with its arguments (the very tensors it read) and
    outputs. Replay re-runs the recorded ops in order on those tensors and writes each result into
    the tensor captured for it, so intermediates and outputs keep their storage, as a CUDA graph's
    do. Then, as a CUDA capture runs nothing:

    * tensors that existed before the capture (static inputs, weights, a scheduler's step index)
      are restored to their values from before it;
    * floating-point outputs are NaN until the first replay;
    * an op that reads a device value on the host, or draws random numbers, raises
      :class:`GraphCaptureError` (the CUDA backend watches its captures for both too).

    ``pool_growth`` is the bytes of the storages the capture allocated. Works on any device. It
    replays what goes through the PyTorch dispatcher: ATen ops and ``torch.library`` custom ops
    (every fastdiff kernel is one, Triton under the interpreter included); it refuses
    torch.compile'd modules, whose generated kernels bypass the dispatcher.
    """

    name = "stand-in"

    def __init__(self):
        self.replays = 0
        self.captures = 0

    def device_reasons(self, device: torch.device) -> List[str]:
        return []

    def module_reasons(self, modules: Sequence[torch.nn.Module]) -> List[str]:
        # Inductor's generated kernels do not go through the dispatcher, so a tape would miss them.
        if any(m is not None and _is_compiled(m) for m in modules):
            return ["the stand-in backend cannot replay torch.compile'd code (its kernels bypass the dispatcher)"]
        return []

    def new_pool(self, device: torch.device):
        return object()

    def capture(self, fn: Callable[[], Any], pool, device: torch.device):
        recorder = _tape_mode_class()()
        try:
            with recorder:
                outputs = fn()
        finally:
            for tensor, before in reversed(recorder.snapshots):
                tensor.copy_(before)
        for t in pytree.tree_leaves(outputs):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and _storage_key(t) in recorder.created:
                t.fill_(float("nan"))
        growth = 0
        seen = set()
        for _, _, _, out in recorder.ops:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and _storage_key(t) in recorder.created and _storage_key(t) not in seen:
                    seen.add(_storage_key(t))
                    growth += t.untyped_storage().nbytes()
        self.captures += 1
        return _Tape(recorder.ops), outputs, growth

    def replay(self, handle: _Tape) -> None:
        for func, args, kwargs, captured in handle.ops:
            fresh = func(*args, **kwargs)
            for old, new in zip(pytree.tree_leaves(captured), pytree.tree_leaves(fresh)):
                if isinstance(old, torch.Tensor) and _storage_key(new) != _storage_key(old):
                    old.copy_(new)
        self.replays += 1

    def release_pool(self, pool, device: torch.device) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# Keys and fingerprints
# ---------------------------------------------------------------------------------------------


def _frozen(value):
    """A hashable copy of a config value (lists -> tuples, tensors/arrays -> tuples of numbers)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), tuple(value.detach().cpu().flatten().tolist()))
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        return _frozen(value.tolist())
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def backend_choices() -> Tuple[Tuple[str, str], ...]:
    """Every op's requested backend (``auto`` unless forced by ``use_backend``/``FASTDIFF_BACKEND``)."""
    from fastdiff import backends

    import fastdiff.ops  # noqa: F401 - registers the dispatchers

    return tuple((name, backends._DISPATCHERS[name].requested(None)[0]) for name in sorted(backends._DISPATCHERS))


def _tensor_signature(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), tuple(t.stride()), str(t.dtype), str(t.device))


def _scheduler_signature(scheduler, scheduler_kwargs: Optional[Mapping[str, Any]]) -> tuple:
    if scheduler is None:
        return ()
    kwargs = {k: v for k, v in (scheduler_kwargs or {}).items() if not isinstance(v, (torch.Generator, list))}
    temperature = getattr(scheduler, "temperature_scheduler", None)
    return (
        type(scheduler).__name__,
        _frozen(dict(scheduler.config)),
        _frozen(kwargs),
        None if temperature is None else (type(temperature).__name__, _frozen(vars(temperature))),
    )


def graph_key(
    name: str,
    inputs: Mapping[str, Any],
    *,
    scheduler=None,
    scheduler_kwargs: Optional[Mapping[str, Any]] = None,
    extra: Any = None,
) -> tuple:
    """The cache key of a region: everything that changes the captured work (see the module docstring).

    CFG on/off is in the key through the inputs (a ``guidance`` tensor or none); batch, height and
    width through the input shapes. Generators in ``scheduler_kwargs`` are not part of the key
    (they only matter for eager draws; a captured step reads the noise bank).
    """
    paths, leaves, spec = _flatten_inputs(inputs, "inputs")
    signature = (repr(spec), *((p, None if t is None else _tensor_signature(t)) for p, t in zip(paths, leaves)))
    device_types = sorted({t.device.type for t in leaves if t is not None})
    autocast = tuple((d, torch.is_autocast_enabled(d), str(torch.get_autocast_dtype(d))) for d in device_types)
    return (
        name,
        signature,
        _scheduler_signature(scheduler, scheduler_kwargs),
        backend_choices(),
        autocast,
        _frozen(extra),
    )


@dataclasses.dataclass(frozen=True)
class WeightsFingerprint:
    """``layout``: per module, its type and per parameter/buffer (name, storage pointer, shape,
    stride, dtype, device). A change in it means the graph would read the wrong memory: recapture.
    ``versions``: the tensors' ``_version`` counters; a change there alone is an in-place update,
    which the existing graph sees."""

    layout: tuple
    versions: tuple


def weights_fingerprint(modules: Iterable[torch.nn.Module]) -> WeightsFingerprint:
    """A cheap fingerprint of the parameters and buffers of ``modules`` (no device work, no sync)."""
    layout, versions = [], []
    for module in modules:
        if module is None:
            layout.append(None)
            continue
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"modules: expected torch.nn.Module instances, got {type(module).__name__}")
        tensors = []
        for kind, named in (("p", module.named_parameters()), ("b", module.named_buffers())):
            for name, t in named:
                if t is None:
                    continue
                tensors.append((kind, name, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device))
                versions.append(t._version)
        layout.append((type(module).__qualname__, id(module), tuple(tensors)))
    return WeightsFingerprint(tuple(layout), tuple(versions))


def scheduler_state_tensors(scheduler) -> Tuple[Optional[torch.Tensor], ...]:
    """The device tensors a scheduler's fused step reads and writes (``watch`` for a region):
    the coefficient table, device step index, history ring and noise bank (None where absent)."""
    state = getattr(scheduler, "__dict__", {}).get("_fused")
    if state is None:
        return ()
    return (state.coeffs, state.step_index, state.history, state.noise_bank)


def _watch_fingerprint(tensors: Sequence[Optional[torch.Tensor]]) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), *_tensor_signature(t)) for t in tensors)


# ---------------------------------------------------------------------------------------------
# Why a region runs eagerly
# ---------------------------------------------------------------------------------------------


def _is_compiled(module) -> bool:
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def scheduler_capture_reasons(scheduler, device: torch.device, **step_kwargs) -> List[str]:
    """Why ``scheduler.step(**step_kwargs)`` cannot run inside a captured step on ``device``.

    Asks the scheduler (its fused-step reasons for these step arguments, a table that could not
    be built), then the ``scheduler_step`` backend choice (``auto`` runs the fused step on CUDA
    only; elsewhere the plain step reads host step counters, which a graph would bake in), then
    ``scale_model_input``: a scheduler whose input scaling changes the sample per step from a host
    step index (Heun, LMS) cannot be captured per step yet; Euler and Euler ancestral read it at the
    fused step's device index (``_scale_model_input_on_device``) and can.
    """
    from fastdiff import backends
    from fastdiff.schedulers.scheduling_utils import FUSED_OP_NAME

    name = type(scheduler).__name__
    fused_reasons = getattr(scheduler, "_fused_reasons", None)
    if fused_reasons is None:
        return [f"{name} is not a fastdiff scheduler with a fused step"]
    accepted = inspect.signature(fused_reasons).parameters
    reasons = list(fused_reasons(**{k: v for k, v in step_kwargs.items() if k in accepted}))
    state = scheduler.__dict__.get("_fused")
    if state is not None and state.unavailable:
        reasons.append(state.unavailable)
    requested, _ = backends.get_dispatcher(FUSED_OP_NAME).requested(None)
    if requested == backends.AUTO and device.type != "cuda":
        reasons.append(
            f"on {device.type} {name} runs its plain step (per-step host values); the fused step runs on CUDA, "
            "or anywhere with use_backend(scheduler_step=...)"
        )
    reasons += _scale_model_input_reasons(scheduler, device)
    return reasons


def _scale_model_input_reasons(scheduler, device: torch.device) -> List[str]:
    if getattr(scheduler, "_scale_model_input_on_device", False):
        return []  # it reads the scale at the fused step's device index (Euler, Euler ancestral)
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        return []
    probe = copy.copy(scheduler)  # scale_model_input may set its host step index: on the copy only
    sample = torch.ones(1, device=device)
    if probe.scale_model_input(sample, timesteps[0]) is sample:
        return []
    return [
        f"{type(scheduler).__name__}.scale_model_input scales the sample by a per-step host value, which a captured "
        "step would freeze"
    ]


def capture_reasons(
    device,
    *,
    enabled: bool = True,
    backend=None,
    callback_on_step_end=None,
    callback_tensor_inputs: Sequence[str] = (),
    scheduler=None,
    scheduler_kwargs: Optional[Mapping[str, Any]] = None,
    modules: Sequence[torch.nn.Module] = (),
    warmed: bool = True,
) -> List[str]:
    """Why a loop on ``device`` runs eagerly instead of through captured graphs; ``[]`` means it captures.

    ``warmed``: whether this runner has run the region at these shapes before (a torch.compile'd
    module then has compiled; when it has not, this call runs eagerly to compile and tune, and the
    next one captures).
    """
    device = torch.device(device)
    backend = backend if backend is not None else CUDAGraphBackend()
    reasons = []
    if not enabled:
        reasons.append("CUDA graphs are turned off for this pipeline (enable_cuda_graph(False) or cuda_graph=False)")
    reasons += backend.device_reasons(device)
    reasons += backend.module_reasons(modules)
    if callback_on_step_end is not None and list(callback_tensor_inputs):
        reasons.append(
            f"callback_on_step_end receives the tensors {list(callback_tensor_inputs)} and may change them between "
            "steps, which a captured step cannot see"
        )
    if scheduler is not None:
        reasons += scheduler_capture_reasons(scheduler, device, **dict(scheduler_kwargs or {}))
    if not warmed:
        for module in modules:
            if module is not None and _is_compiled(module):
                reasons.append(
                    f"the torch.compile'd {type(getattr(module, '_orig_mod', module)).__name__} has not run at these "
                    "shapes yet: this call runs eagerly (compiling and autotuning), the next one captures"
                )
                break
    return reasons


# ---------------------------------------------------------------------------------------------
# The cache and the runner
# ---------------------------------------------------------------------------------------------


class _Graph:
    """One captured region: the backend's handle, static buffers and what it was captured against."""

    def __init__(self, handle, static_inputs, static_leaves, outputs, spec, nbytes, weights, watch):
        self.handle = handle
        self.static_inputs = static_inputs  # the structure fn was called with
        self.static_leaves = static_leaves  # its tensors, in the region's flattening order
        self.outputs = outputs  # flat list of static output tensors
        self.spec = spec  # their structure
        self.nbytes = nbytes
        self.weights = weights
        self.watch = watch


class _CacheState:
    """The graphs, pool and bookkeeping of one runner. Holds no reference to the owner, so a
    ``weakref.finalize`` on the owner can release it."""

    def __init__(self, backend, max_graphs: int, max_bytes: Optional[int]):
        self.backend = backend
        self.max_graphs = max_graphs
        self.max_bytes = max_bytes
        self.graphs: "collections.OrderedDict[tuple, _Graph]" = collections.OrderedDict()
        self.pool = None
        self.pool_device = None
        self.warmed: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()
        self.failed: Dict[tuple, str] = {}
        self.released = False
        self.stats = collections.Counter()

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.graphs.values())

    def drop(self, key: tuple) -> None:
        self.graphs.pop(key, None)
        if not self.graphs:
            self._release_pool()

    def _release_pool(self) -> None:
        if self.pool is not None:
            pool, device, self.pool, self.pool_device = self.pool, self.pool_device, None, None
            self.backend.release_pool(pool, device)
            self.stats["pool_releases"] += 1

    def mark_warmed(self, token: tuple) -> None:
        self.warmed[token] = None
        self.warmed.move_to_end(token)
        while len(self.warmed) > 4 * max(self.max_graphs, 1) + 16:
            self.warmed.popitem(last=False)

    def insert(self, key: tuple, graph: _Graph) -> None:
        self.graphs[key] = graph
        self.graphs.move_to_end(key)
        while len(self.graphs) > 1 and (
            len(self.graphs) > self.max_graphs or (self.max_bytes is not None and self.nbytes > self.max_bytes)
        ):
            self.graphs.popitem(last=False)
            self.stats["evictions"] += 1

    def release(self, final: bool = True) -> None:
        """Free every graph, static buffer and the pool; ``final``: the owner is gone, refuse further calls."""
        self.graphs.clear()
        self.warmed.clear()
        self.failed.clear()
        self._release_pool()
        self.released = final


class GraphRunner:
    """Captures and replays regions of one owner (a pipeline) with one private memory pool.

    Args:
        owner: the object whose graphs these are; when it is garbage-collected, everything is freed.
        backend: :class:`CUDAGraphBackend` (default) or :class:`StandInBackend` (tests).
        max_graphs (`int`): at most this many graphs are kept (least recently used evicted first).
        max_bytes (`int`, *optional*): and at most this many bytes of static input buffers plus pool
            growth; ``None``: no byte limit.
        enabled (`bool`): ``False`` runs every region eagerly (``pipe.enable_cuda_graph(False)``).
    """

    def __init__(
        self, owner=None, *, backend=None, max_graphs: int = 4, max_bytes: Optional[int] = None, enabled: bool = True
    ):
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs: expected a positive int, got {max_graphs!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes: expected a positive int or None, got {max_bytes!r}")
        self.backend = backend if backend is not None else CUDAGraphBackend()
        self.enabled = enabled
        self._state = _CacheState(self.backend, max_graphs, max_bytes)
        # Freed when the owner is collected, or when this runner is (replaced or dropped), whichever is first.
        # The state holds neither, so neither finalizer keeps anything alive.
        self._finalizers = [weakref.finalize(self, _CacheState.release, self._state)]
        if owner is not None:
            self._finalizers.append(weakref.finalize(owner, _CacheState.release, self._state))
        for finalizer in self._finalizers:
            finalizer.atexit = False  # at interpreter exit the process frees it all; CUDA may be gone already

    # ---- inspection ------------------------------------------------------------------------

    @property
    def stats(self) -> Dict[str, int]:
        """Counters: warmups, captures, replays, recaptures_weights, recaptures_watch,
        in_place_weight_updates, evictions, capture_failures, pool_releases, eager_calls."""
        return dict(self._state.stats)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached graphs (static inputs + pool growth at their captures)."""
        return self._state.nbytes

    def __len__(self) -> int:
        return len(self._state.graphs)

    def keys(self) -> List[tuple]:
        """The cached keys, least recently used first."""
        return list(self._state.graphs)

    def describe(self) -> str:
        """A few lines for ``pipe.explain()``: the cache's size and limits, counters, failed keys."""
        state = self._state
        budget = "no byte limit" if state.max_bytes is None else f"max_bytes={state.max_bytes}"
        lines = [
            f"CUDA graphs ({self.backend.name} backend, {'on' if self.enabled else 'off'}): {len(state.graphs)} cached "
            f"of max_graphs={state.max_graphs}, {state.nbytes} bytes ({budget})",
            "  " + (", ".join(f"{k}={v}" for k, v in sorted(state.stats.items())) or "nothing run yet"),
        ]
        lines += [f"  eager at {key[0]} {dict(key[1])}: {why}" for key, why in state.failed.items()]
        return "\n".join(lines)

    def release(self) -> None:
        """Free every graph, static buffer and the memory pool (``pipe.release_graphs()``)."""
        self._state.release(final=False)

    # ---- regions ---------------------------------------------------------------------------

    def can_capture(self, device, **kwargs) -> List[str]:
        """:func:`capture_reasons` with this runner's backend and ``enabled`` (``[]``: it captures)."""
        kwargs.setdefault("enabled", self.enabled)
        return capture_reasons(device, backend=self.backend, **kwargs)

    def region(
        self,
        name: str,
        fn: Callable[..., Any],
        inputs: Mapping[str, torch.Tensor],
        *,
        modules: Sequence[torch.nn.Module] = (),
        scheduler=None,
        scheduler_kwargs: Optional[Mapping[str, Any]] = None,
        watch: Optional[Callable[[], Sequence[Optional[torch.Tensor]]]] = None,
        extra: Any = None,
        enabled: Optional[bool] = None,
        callback_on_step_end=None,
        callback_tensor_inputs: Sequence[str] = (),
        reasons: Sequence[str] = (),
    ) -> "Region":
        """A callable for one loop: ``region(**inputs)`` captures/replays ``fn`` or runs it eagerly.

        ``inputs`` are the first step's inputs (tensors, None, or dicts/lists of those): their
        names, where the Nones are, and the tensors' shapes, strides, dtypes and devices fix the
        region. ``reasons``: the caller's own reasons to run eagerly, added to :func:`capture_reasons`.
        Everything else: see the module docstring. Make a new region per loop, and keep none past it
        (``fn`` is usually a bound method of the owner)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: expected a non-empty region name, got {name!r}")
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        devices = {t.device for t in _flatten_inputs(inputs, "inputs")[1] if t is not None}
        if len(devices) != 1:
            raise ValueError(f"inputs: expected tensors on one device, got {sorted(str(d) for d in devices)}")
        device = devices.pop()
        key = graph_key(name, inputs, scheduler=scheduler, scheduler_kwargs=scheduler_kwargs, extra=extra)
        weights = weights_fingerprint(modules)
        why = list(reasons)
        why += capture_reasons(
            device,
            enabled=self.enabled if enabled is None else enabled,
            backend=self.backend,
            callback_on_step_end=callback_on_step_end,
            callback_tensor_inputs=callback_tensor_inputs,
            scheduler=scheduler,
            scheduler_kwargs=scheduler_kwargs,
            modules=modules,
            warmed=(key, weights.layout) in self._state.warmed,
        )
        if key in self._state.failed:
            why.append(self._state.failed[key])
        return Region(self._state, fn, key, device, tuple(modules), weights, watch, why)


def _sorted_dicts(value):
    """``value`` with every dict's keys in sorted order (so keyword order never changes a region)."""
    if isinstance(value, Mapping):
        return {k: _sorted_dicts(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_sorted_dicts(v) for v in value)
    return value


def _flatten_inputs(inputs: Mapping[str, Any], what: str):
    """(paths, leaves, spec) of a region's inputs: a dict whose values are tensors, None, or
    dicts/lists/tuples of those (``added_cond_kwargs``). Leaves are tensors or None; where a None
    stands is part of the region (a tensor there later is refused)."""
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError(f"{what}: expected a non-empty dict of name -> tensor, got {inputs!r}")
    with_paths, spec = pytree.tree_flatten_with_path(_sorted_dicts(inputs))
    paths, leaves = [], []
    for path, leaf in with_paths:
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{what}{pytree.keystr(path)}: expected a tensor or None, got {type(leaf).__name__} "
                "(a Python value read by fn belongs in extra=)"
            )
        paths.append(pytree.keystr(path))
        leaves.append(leaf)
    if all(leaf is None for leaf in leaves):
        raise ValueError(f"{what}: expected at least one tensor, got {inputs!r}")
    return paths, leaves, spec


class Region:
    """One loop's view of a runner: call it with the region's tensors (see :meth:`GraphRunner.region`).

    Attributes:
        reasons (`list[str]`): why this region runs eagerly; empty when it uses graphs.
        captured (`bool`): whether the last call replayed a graph (False for eager and warm-up calls).
        key (`tuple`): the cache key.
    """

    def __init__(self, state: _CacheState, fn, key, device, modules, weights: WeightsFingerprint, watch, reasons):
        self._state = state
        self.fn = fn
        self.key = key
        self.device = device
        self.modules = modules
        self.weights = weights
        self._watch = watch
        self.reasons = reasons
        self.captured = False
        self._watch_after_last_call = None
        self._spec_repr, *signature = key[1]
        self._paths = [p for p, _ in signature]
        self._signatures = [sig for _, sig in signature]

    def __call__(self, **inputs):
        state = self._state
        if self.reasons:
            state.stats["eager_calls"] += 1
            self.captured = False
            return self.fn(**inputs)
        if state.released:
            raise RuntimeError("this region's runner was released (owner deleted); create a new region")
        leaves, spec = self._check_call(inputs)
        watch = _watch_fingerprint(self._watch()) if self._watch is not None else ()
        graph = state.graphs.get(self.key)
        if graph is not None and graph.weights.layout == self.weights.layout and graph.watch == watch:
            if graph.weights.versions != self.weights.versions:
                # Weights changed in place since the capture: one eager step refreshes what is derived
                # from them (a fused QKV weight), then the fingerprint decides: same tensors, same graph.
                state.stats["in_place_weight_updates"] += 1
                out = self._eager(inputs)
                self.weights = weights_fingerprint(self.modules)
                state.mark_warmed((self.key, self.weights.layout))
                if self.weights.layout == graph.weights.layout:
                    graph.weights = self.weights
                return out
            state.graphs.move_to_end(self.key)
        elif graph is not None:
            weights_changed = graph.weights.layout != self.weights.layout
            state.stats["recaptures_weights" if weights_changed else "recaptures_watch"] += 1
            state.drop(self.key)
            graph = None
        if graph is None:
            token = (self.key, self.weights.layout)
            if token not in state.warmed or (self._watch is not None and self._watch_after_last_call != watch):
                # Warm-up: compile, autotune and let the scheduler build its device buffers, eagerly.
                # The autotuner's choices go to Triton's disk cache, so the next process reads them.
                if self.device.type == "cuda":
                    ensure_triton_autotune_cache()
                state.mark_warmed(token)
                state.stats["warmups"] += 1
                return self._eager(inputs)
            graph = self._capture(leaves, spec, watch)
            if graph is None:
                return self._eager(inputs)
        with torch.no_grad():
            for static, t in zip(graph.static_leaves, leaves):
                if t is not static:  # None stays None (checked above)
                    static.copy_(t)
            state.backend.replay(graph.handle)
        state.stats["replays"] += 1
        self.captured = True
        return pytree.tree_unflatten(graph.outputs, graph.spec)

    def _eager(self, inputs: Mapping[str, Any]):
        self.captured = False
        with torch.no_grad():
            out = self.fn(**inputs)
        if self._watch is not None:
            self._watch_after_last_call = _watch_fingerprint(self._watch())
        return out

    def _check_call(self, inputs: Mapping[str, Any]):
        paths, leaves, spec = _flatten_inputs(inputs, "region inputs")
        given = ", ".join(f"{p}{'=None' if t is None else ''}" for p, t in zip(paths, leaves))
        expected = ", ".join(f"{p}{'=None' if sig is None else ''}" for p, sig in zip(self._paths, self._signatures))
        if repr(spec) != self._spec_repr or given != expected:
            raise ValueError(f"region inputs: expected the tensors {expected}, got {given} (the same None entries too)")
        for path, t, expected in zip(paths, leaves, self._signatures):
            if t is not None and _tensor_signature(t) != expected:
                shape, stride, dtype, device = expected
                raise ValueError(
                    f"region input {path}: expected shape {shape}, stride {stride}, {dtype} on {device}, got "
                    f"shape {tuple(t.shape)}, stride {tuple(t.stride())}, {t.dtype} on {t.device}; "
                    "a new shape needs a new region"
                )
        return leaves, spec

    def _capture(self, leaves: List[torch.Tensor], spec, watch: tuple) -> Optional[_Graph]:
        state = self._state
        # Tensors a module creates at its first call (a lazily built cache) exist now: fingerprint them too.
        self.weights = weights_fingerprint(self.modules)
        if state.pool is None:
            state.pool, state.pool_device = state.backend.new_pool(self.device), self.device
        static_leaves = [None if t is None else torch.empty_like(t).copy_(t) for t in leaves]
        static_inputs = pytree.tree_unflatten(static_leaves, spec)
        input_bytes = sum(t.untyped_storage().nbytes() for t in static_leaves if t is not None)
        try:
            with torch.no_grad():
                run = lambda: self.fn(**static_inputs)  # noqa: E731
                handle, outputs, growth = state.backend.capture(run, state.pool, self.device)
            out_leaves, out_spec = pytree.tree_flatten(outputs)
            if not out_leaves or not all(isinstance(t, torch.Tensor) for t in out_leaves):
                raise GraphCaptureError(
                    f"fn must return a tensor or a tuple/list/dict of tensors, got {type(outputs).__name__}"
                )
        except Exception as error:  # noqa: BLE001 - any capture failure: run eagerly and say why
            reason = f"capture failed for these shapes ({type(error).__name__}: {error}); this key runs eagerly"
            self._fail(reason)
            if not state.graphs:
                state._release_pool()
            return None
        nbytes = input_bytes + growth
        if state.max_bytes is not None and nbytes > state.max_bytes:
            self._fail(
                f"one graph for these shapes needs {nbytes} bytes, over the byte budget max_bytes={state.max_bytes}"
            )
            if not state.graphs:
                state._release_pool()
            return None
        graph = _Graph(handle, static_inputs, static_leaves, out_leaves, out_spec, nbytes, self.weights, watch)
        state.insert(self.key, graph)
        state.stats["captures"] += 1
        logger.debug(
            "captured %s (%d bytes; %d graphs, %d bytes cached)", self.key[0], nbytes, len(state.graphs), state.nbytes
        )
        return graph

    def _fail(self, reason: str) -> None:
        self._state.failed[self.key] = reason
        self._state.stats["capture_failures"] += 1
        self.reasons = [reason]
        warnings.warn(f"fastdiff.graphs: {reason}", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Triton autotune choices on disk
# ---------------------------------------------------------------------------------------------


def _autotuned_kernels():
    """fastdiff's own Triton autotuners, by name."""
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner

    import fastdiff.kernels as kernels

    found = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"fastdiff.kernels.{info.name}")
        for attr, value in vars(module).items():
            if isinstance(value, Autotuner):
                found[f"{info.name}.{attr}"] = value
    return found


def enable_triton_autotune_cache() -> Dict[str, Any]:
    """Make fastdiff's Triton autotuners keep their choices on disk, so a new process does not re-tune.

    Uses Triton's own cache where the installed Triton has one: ``triton.autotune(cache_results=...)``
    (Triton 3.2 and later) writes each tuning key's timings to ``<triton cache dir>/<hash>/<kernel>.autotune.json``
    (``TRITON_CACHE_DIR``, default ``~/.triton/cache``), keyed on the Triton version, the GPU target, the
    kernel source, the tuning key and the configs. Newer Triton reads the process default from
    ``triton.knobs.autotuning.cache`` (environment ``TRITON_CACHE_AUTOTUNING=1``) when an autotuner is
    created; this helper instead turns it on for fastdiff's own autotuners only (nothing global).
    Triton skips the disk cache for configs with a ``pre_hook`` (the TMA attention kernel's) and under
    the interpreter. Triton 3.6 (the GPU image) and 3.9 (.venv) both have ``cache_results``,
    ``check_disk_cache`` and ``knobs.autotuning.cache``, read once when an autotuner is created.

    Returns what it found and did: ``triton`` (version), ``knob`` (whether
    ``triton.knobs.autotuning.cache`` exists), ``kernels`` (name -> enabled), ``skipped`` (name -> why).
    """
    report: Dict[str, Any] = {"triton": None, "knob": False, "kernels": {}, "skipped": {}}
    try:
        import triton
    except ImportError:
        report["skipped"]["*"] = "triton is not installed"
        return report
    from fastdiff.backends import triton_interpret_enabled

    report["triton"] = triton.__version__
    knobs = getattr(triton, "knobs", None)
    report["knob"] = hasattr(getattr(knobs, "autotuning", None), "cache")
    for name, tuner in _autotuned_kernels().items():
        if not hasattr(tuner, "check_disk_cache"):
            report["skipped"][name] = f"Triton {triton.__version__} has no autotune disk cache"
        elif triton_interpret_enabled():
            report["skipped"][name] = "TRITON_INTERPRET=1: the interpreter does not autotune on a device"
        elif any(getattr(c, "pre_hook", None) for c in tuner.configs):
            report["skipped"][name] = "its configs have a pre_hook, which Triton does not cache on disk"
        else:
            tuner.cache_results = True
            report["kernels"][name] = True
    return report


_AUTOTUNE_CACHE_REPORT: Optional[Dict[str, Any]] = None


def ensure_triton_autotune_cache() -> Dict[str, Any]:
    """:func:`enable_triton_autotune_cache`, once per process; returns its report.

    Called by a region's warm-up step on CUDA and by ``fastdiff.warmup``. A failure (an
    unexpected Triton version) is logged and reported, never raised: the disk cache only saves
    time."""
    global _AUTOTUNE_CACHE_REPORT
    if _AUTOTUNE_CACHE_REPORT is None:
        try:
            _AUTOTUNE_CACHE_REPORT = enable_triton_autotune_cache()
        except Exception as error:  # noqa: BLE001 - the cache is an optimisation; say why it is off
            logger.warning("the Triton autotune disk cache stays off: %s: %s", type(error).__name__, error)
            _AUTOTUNE_CACHE_REPORT = {"triton": None, "knob": False, "kernels": {}, "skipped": {"*": f"{type(error).__name__}: {error}"}}
    return _AUTOTUNE_CACHE_REPORT
