"""Autotuning and CUDA graph capture.

Triton's autotuner benchmarks every candidate config the first time it sees a
key. Inside a CUDA graph capture that would record the benchmark launches into
the graph (or fail with an opaque capture error), so fastdiff refuses it: the
pruners of our autotuned kernels call :func:`refuse_tuning_during_capture`,
which Triton runs only when a key is not tuned yet. ``fastdiff.warmup`` (or one
eager call per shape) tunes beforehand.
"""

from __future__ import annotations

import torch


class TuningDuringCaptureError(RuntimeError):
    """A kernel would have started autotuning while a CUDA graph was being captured."""


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def refuse_tuning_during_capture(kernel: str, key: object) -> None:
    """Raise :class:`TuningDuringCaptureError` if a CUDA graph capture is under way.

    ``kernel`` and ``key`` (the autotune key's values) name what would have been tuned.
    """
    if capturing():
        raise TuningDuringCaptureError(
            f"{kernel}: autotuning for {key} would start inside a CUDA graph capture; "
            "run fastdiff.warmup(module_or_pipeline, example_inputs) or one eager call with these shapes first"
        )
