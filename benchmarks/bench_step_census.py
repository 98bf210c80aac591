"""Census of one UNet step without a GPU: launches, host time, and the host path of each fused op.

    python benchmarks/bench_step_census.py [--archs sd15,sdxl] [--runs 5] [--out benchmarks/results]

Everything here is a CPU proxy, not a GPU timing:

* **Launches per step**: one UNet forward (fp16, batch 2 as with classifier-free
  guidance) on fake CUDA tensors (``torch._subclasses.FakeTensorMode`` on a CPU-only
  torch), with dispatch deciding for an H100 (``fastdiff.backends.use_target("sm_90")``),
  so fastdiff takes its CUDA paths and the real sizes cost nothing. A
  ``TorchDispatchMode`` counts every op that reaches the dispatcher, except views,
  metadata and allocations (:func:`launches_work`). A fastdiff custom op
  (``fastdiff::group_norm_fwd_triton``, ...) counts as one launch, although a
  channels_last GroupNorm may take up to 3 on the GPU today. fastdiff's UNet and
  diffusers' UNet run the same config side by side. Dtype copies (``_to_copy`` that
  changes dtype) are counted separately.
* **Host time per step**: the same forward, median of ``--runs``, on the meta device
  (where fastdiff runs its reference paths) and on fake CUDA tensors (fastdiff's CUDA
  dispatch; the fake-tensor bookkeeping is paid by both libraries alike, per op).
* **Host path per fused op**: ``fastdiff.ops.<op>`` on SD1.5 shapes with dispatch
  deciding for sm_90, up to the backend's run: argument checks, the inputs dict and
  backend selection (every candidate's reasons). The custom-op call and the kernels'
  launcher preparation (grid, strides, autotune lookup) are not in it: they need real
  tensors and a no-op launch hook in kernels/ (see the table's notes).

Targets (issue 10): launches <= 0.6x diffusers', host time <= 0.8x diffusers', each fused
op's host path <= 6 us. Results go to ``OUT/step_census.json`` and ``OUT/step_census.md``
with versions, commit and date.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_unet import ARCHS  # noqa: E402
from bench_utils import environment  # noqa: E402

TARGET = "sm_90"
TARGETS = {"launch_ratio": 0.6, "host_time_ratio": 0.8, "fused_op_host_us": 6.0}

# Ops that reach the dispatcher but launch no work: allocations and metadata.
_NO_WORK = {
    "aten::empty.memory_format",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::empty_like",
    "aten::lift_fresh",
    "aten::_local_scalar_dense",
    "aten::sym_size.int",
    "aten::sym_stride.int",
    "aten::sym_numel",
    "aten::sym_storage_offset",
    "aten::is_contiguous",
    "aten::is_non_overlapping_and_dense",
    "aten::set_.source_Storage_storage_offset",
    "aten::_unsafe_view",  # a view whose schema does not say so (reshape's copy-free path)
}


def op_name(func) -> str:
    return f"{func.namespace}::{func._opname}" + (f".{func._overloadname}" if func._overloadname != "default" else "")


def launches_work(func) -> bool:
    """True for an op that launches device work: not a view (its output aliases its
    input: transpose, view, expand, detach, ...), not an allocation, not metadata."""
    if getattr(func, "is_view", False) or func.namespace == "prim":  # prim::device, prim::layout, ...
        return False
    return op_name(func) not in _NO_WORK


def is_dtype_copy(func, args, kwargs) -> bool:
    if func is not torch.ops.aten._to_copy.default:
        return False
    dtype = kwargs.get("dtype")
    return dtype is not None and isinstance(args[0], torch.Tensor) and dtype != args[0].dtype


class LaunchCounter(TorchDispatchMode):
    """Counts the ops that launch work (:func:`launches_work`), by name, and the dtype copies."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.skipped = Counter()
        self.dtype_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = op_name(func)
        if launches_work(func):
            self.ops[name] += 1
            self.dtype_copies += is_dtype_copy(func, args, kwargs)
        else:
            self.skipped[name] += 1
        return func(*args, **kwargs)

    @property
    def launches(self) -> int:
        return sum(self.ops.values())


# ---------------------------------------------------------------------------
# Models and inputs on the meta device or as fake CUDA tensors
# ---------------------------------------------------------------------------


def build_models(arch: str, dtype=torch.float16) -> dict:
    """diffusers' and fastdiff's UNet for ``arch`` on the meta device (no weights materialised);
    :func:`to_fake_cuda` moves them onto fake CUDA tensors inside :func:`fake_cuda`."""
    import diffusers

    from fastdiff import UNet2DConditionModel

    config = ARCHS[arch][0]
    with torch.device("meta"):
        models = {
            "diffusers": diffusers.UNet2DConditionModel(**config).to(dtype).eval(),
            "fastdiff": UNet2DConditionModel(**config).to(dtype).eval(),
        }
    return models


def to_fake_cuda(models: dict) -> dict:
    for model in models.values():
        _replace_tensors(model, "cuda")
    return models


def _replace_tensors(model: torch.nn.Module, device) -> None:
    """Give every parameter and buffer an empty twin on ``device`` (fake CUDA tensors inside
    FakeTensorMode; initialisers cannot run there: random fills need a CUDA generator)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=device), requires_grad=False
                )
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device=device)


def step_inputs(arch: str, device, dtype=torch.float16, batch: int = 2) -> dict:
    _, latent, text_len, text_dim, text_time = ARCHS[arch]
    kwargs = {
        "sample": torch.empty(batch, 4, latent, latent, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500, device=device, dtype=torch.int64),
        "encoder_hidden_states": torch.empty(batch, text_len, text_dim, device=device, dtype=dtype),
    }
    if text_time:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, 1280, device=device, dtype=dtype),
            "time_ids": torch.empty(batch, 6, device=device, dtype=dtype),
        }
    return kwargs


def _memory_format(library: str):
    # fastdiff's UNet runs channels_last (as bench_unet.py runs it); diffusers' runs in
    # its default (contiguous) layout.
    return torch.channels_last if library == "fastdiff" else torch.contiguous_format


@contextmanager
def fake_cuda():
    """FakeTensorMode (CUDA tensors on a CPU-only torch) with dispatch deciding for sm_90."""
    from fastdiff import backends

    with FakeTensorMode(), backends.use_target(TARGET), _BasicIndexing():
        yield


class _BasicIndexing(TorchFunctionMode):
    """``tensor[...]`` and ``tensor.contiguous()`` for fake CUDA tensors.

    On a CPU-only torch, Python indexing of a fake CUDA tensor fails in C++ ("not linked
    with support for cuda devices") before it reaches the dispatcher. Basic indices (int,
    slice, None, Ellipsis) become the view ops that indexing itself dispatches to, and
    ``contiguous`` the clone it dispatches to, so the census counts the same ops; other
    indices are left to torch.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and args[0].device.type == "cuda":
            out = _basic_getitem(args[0], args[1])
            if out is not None:
                return out
        if func is torch.Tensor.contiguous and args[0].device.type == "cuda":
            # Tensor.contiguous is a copy (aten::clone) unless already in the format.
            fmt = kwargs.get("memory_format", args[1] if len(args) > 1 else torch.contiguous_format)
            return args[0] if args[0].is_contiguous(memory_format=fmt) else torch.ops.aten.clone.default(args[0], memory_format=fmt)
        return func(*args, **kwargs)


def _basic_getitem(t: torch.Tensor, index):
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) and not isinstance(i, bool) for i in items):
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at : at + 1] = [slice(None)] * (t.dim() - used)
    dim = 0
    for item in items:
        if item is None:
            t = t.unsqueeze(dim)
            dim += 1
        elif isinstance(item, int):
            t = t.select(dim, item)
        else:
            if item != slice(None):
                start, stop, step = item.indices(t.shape[dim])
                t = t.slice(dim, start, stop, step) if hasattr(t, "slice") else torch.ops.aten.slice.Tensor(t, dim, start, stop, step)
            dim += 1
    return t


def _forward(model, library: str, inputs: dict):
    sample = inputs["sample"].contiguous(memory_format=_memory_format(library))
    with torch.no_grad():
        return model(**{**inputs, "sample": sample}).sample


def count_launches(arch: str) -> dict:
    """Launches per step for each library, on fake CUDA tensors (target sm_90)."""
    import fastdiff

    result = {}
    models = build_models(arch)
    with fake_cuda():
        to_fake_cuda(models)
        inputs = step_inputs(arch, "cuda")
        for library, model in models.items():
            counter = LaunchCounter()
            with fastdiff.trace_dispatch() as calls, counter:
                out = _forward(model, library, inputs)
            assert out.shape == inputs["sample"].shape
            result[library] = {
                "launches": counter.launches,
                "dtype_copies": counter.dtype_copies,
                "top_ops": dict(counter.ops.most_common(12)),
                "fused_ops": dict(Counter(f"{op}:{b}" for op, b in calls if op != "attention_processor")),
            }
        # fastdiff with the text's cross-attention K/V cached (as a pipeline passes it) and
        # the resnets' time projections as one GEMM: a step after the first, which filled the cache.
        from fastdiff.nn import CrossAttentionKVCache

        models["fastdiff"].fuse_time_projections()
        cache = CrossAttentionKVCache(inputs["encoder_hidden_states"])
        cached_inputs = {**inputs, "cross_attention_kwargs": {"kv_cache": cache}}
        _forward(models["fastdiff"], "fastdiff", cached_inputs)
        counter = LaunchCounter()
        with counter:
            _forward(models["fastdiff"], "fastdiff", cached_inputs)
        result["fastdiff"]["launches_kv_cache"] = counter.launches
        models["fastdiff"].unfuse_time_projections()
    return result


def host_time(arch: str, runs: int) -> dict:
    """Median wall time (ms) of one forward per library, on meta tensors and on fake CUDA tensors."""
    models = build_models(arch)
    result = {library: {} for library in models}
    inputs = step_inputs(arch, "meta")
    for library, model in models.items():
        _forward(model, library, inputs)  # warm-up
        result[library]["meta_ms"] = _median_ms(lambda: _forward(model, library, inputs), runs)
    with fake_cuda():
        to_fake_cuda(models)
        inputs = step_inputs(arch, "cuda")
        for library, model in models.items():
            _forward(model, library, inputs)
            result[library]["fake_cuda_ms"] = _median_ms(lambda: _forward(model, library, inputs), runs)
    return result


def _median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------------------
# Host path of each fused op
# ---------------------------------------------------------------------------


def fused_op_inputs(dtype=torch.float16):
    """(name, op module, args, kwargs) for each fused op at an SD1.5 shape, as fake CUDA tensors."""
    import importlib

    attention, geglu, group_norm = (importlib.import_module(f"fastdiff.ops.{m}") for m in ("attention", "geglu", "group_norm"))
    x = torch.empty(2, 320, 64, 64, device="cuda", dtype=dtype, memory_format=torch.channels_last)
    w = torch.empty(320, device="cuda", dtype=dtype)
    q = torch.empty(2, 8, 4096, 40, device="cuda", dtype=dtype)
    k = torch.empty(2, 8, 77, 40, device="cuda", dtype=dtype)
    h = torch.empty(2, 4096, 2560, device="cuda", dtype=dtype)
    return [
        ("group_norm (2x320x64x64 NHWC, silu)", group_norm, (x, 32, w, w, 1e-5, "silu")),
        ("attention self (2x8x4096x40)", attention, (q, q, q, None, None)),
        ("attention cross (Lk=77)", attention, (q, k, k, None, None)),
        ("geglu (2x4096x2560)", geglu, (h,)),
    ]


def fused_op_host_us(runs: int, inner: int = 500) -> dict:
    """Median microseconds per call of each fused op's checks and dispatch for sm_90: the
    op's argument checks, building its inputs and selecting the backend (every candidate's
    reasons). The custom-op call and the launcher's preparation are not in it (see notes)."""
    from fastdiff import backends

    result = {}
    # Without fake_cuda's indexing mode: a TorchFunctionMode sees every tensor attribute read.
    with FakeTensorMode(), backends.use_target(TARGET):
        for name, module, args in fused_op_inputs():
            dispatcher = module._DISPATCHER

            def call():
                module._check_inputs(*args)
                return dispatcher.select(module._inputs(*args))

            call()
            samples = []
            for _ in range(runs):
                start = time.perf_counter()
                for _ in range(inner):
                    call()
                samples.append((time.perf_counter() - start) / inner * 1e6)
            result[name] = {"us": statistics.median(samples), "backend": call().name}
    return result


# ---------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------


def census(archs, runs: int) -> dict:
    report = {"environment": environment(), "target": TARGET, "targets": TARGETS, "archs": {}}
    report["environment"]["diffusers"] = __import__("diffusers").__version__
    for arch in archs:
        entry = {"launches": count_launches(arch), "host_time": host_time(arch, runs)}
        ours, theirs = entry["launches"]["fastdiff"], entry["launches"]["diffusers"]
        entry["launch_ratio"] = ours["launches"] / theirs["launches"]
        entry["launch_ratio_kv_cache"] = ours["launches_kv_cache"] / theirs["launches"]
        for where in ("meta_ms", "fake_cuda_ms"):
            entry[f"host_time_ratio_{where[:-3]}"] = entry["host_time"]["fastdiff"][where] / entry["host_time"]["diffusers"][where]
        report["archs"][arch] = entry
    report["fused_op_host_us"] = fused_op_host_us(runs)
    return report


def _verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else f"missed ({value / limit:.2f}x the target)"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# UNet step census (CPU proxies, not GPU timings)",
        "",
        f"Made by `benchmarks/bench_step_census.py` on {env['card']}: torch {env['torch']}, triton {env['triton']}, "
        f"diffusers {env['diffusers']}, commit {env['commit']}, {env['date']}.",
        "",
        f"One UNet forward, fp16, batch 2 (classifier-free guidance). Launches are counted on fake CUDA tensors "
        f"with dispatch deciding for {report['target']} (ops that launch work; views, metadata and allocations "
        "excluded; a fastdiff custom op counts as one launch). Host time is the median wall time of the forward "
        "on meta tensors and on fake CUDA tensors. None of this is measured on a GPU.",
        "",
        "| arch | launches fastdiff | launches diffusers | ratio (target <= 0.6) | fastdiff with kv_cache + fused time projections (ratio) | dtype copies fastdiff / diffusers "
        "| host ms meta fastdiff / diffusers | ratio (target <= 0.8) | host ms fake-CUDA fastdiff / diffusers | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, e in report["archs"].items():
        lo, ld = e["launches"]["fastdiff"], e["launches"]["diffusers"]
        ho, hd = e["host_time"]["fastdiff"], e["host_time"]["diffusers"]
        lines.append(
            f"| {arch} | {lo['launches']} | {ld['launches']} | {e['launch_ratio']:.2f} ({_verdict(e['launch_ratio'], TARGETS['launch_ratio'])}) "
            f"| {lo['launches_kv_cache']} ({e['launch_ratio_kv_cache']:.2f}) "
            f"| {lo['dtype_copies']} / {ld['dtype_copies']} | {ho['meta_ms']:.0f} / {hd['meta_ms']:.0f} "
            f"| {e['host_time_ratio_meta']:.2f} ({_verdict(e['host_time_ratio_meta'], TARGETS['host_time_ratio'])}) "
            f"| {ho['fake_cuda_ms']:.0f} / {hd['fake_cuda_ms']:.0f} | {e['host_time_ratio_fake_cuda']:.2f} |"
        )
    lines += ["", "Fused ops dispatched per step (fastdiff, fake CUDA, sm_90):", ""]
    for arch, e in report["archs"].items():
        lines.append(f"* {arch}: " + ", ".join(f"{k} x{v}" for k, v in sorted(e["launches"]["fastdiff"]["fused_ops"].items())))
    lines += [
        "",
        "| fused op: checks + dispatch for sm_90 | backend | us (target <= 6 for the whole host path) |",
        "|---|---|---|",
    ]
    for name, e in report["fused_op_host_us"].items():
        lines.append(f"| {name} | {e['backend']} | {e['us']:.1f} ({_verdict(e['us'], TARGETS['fused_op_host_us'])}) |")
    lines += [
        "",
        "The per-op figure is the Python host path up to the backend's run: argument checks, the inputs dict "
        "and backend selection with every candidate's reasons. It does not include the custom-op call nor the "
        "kernels' launcher preparation (grid, strides, autotune lookup): timing those needs real tensors and a "
        "no-op launch hook in kernels/ (not there yet), and under FakeTensorMode a custom-op call costs "
        "milliseconds of fake-tensor bookkeeping that says nothing about the GPU path. Fake-tensor host times "
        "per step include FakeTensorMode's own per-op bookkeeping, paid alike by both libraries. The machine "
        "was shared with other jobs (2 cores), so host times are noisy.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", default="sd15,sdxl", help=f"comma-separated, from {sorted(ARCHS)}")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--out", default=None, help="folder for step_census.json/.md (default: print only)")
    args = parser.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"--archs: unknown {unknown}; expected from {sorted(ARCHS)}")
    report = census(archs, args.runs)
    text = markdown(report)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "step_census.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "step_census.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
