"""CPU microbenchmarks (pytest-benchmark) of what runs on the CPU: the group_norm
reference path against calling PyTorch directly, and the dispatch overhead.

Each benchmark still checks its result. Timings are reported, never asserted.
"""

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.ops import group_norm

SHAPES = {"sd15-unet-64x64": (1, 320, 64, 64), "vae-128x128": (1, 128, 128, 128)}


@pytest.fixture(params=list(SHAPES))
def gn_inputs(request):
    shape = SHAPES[request.param]
    x = torch.randn(shape)
    return x, torch.randn(shape[1]), torch.randn(shape[1])


def test_bench_torch_group_norm_silu(benchmark, gn_inputs):
    x, w, b = gn_inputs
    y = benchmark(lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5)))
    assert y.shape == x.shape


def test_bench_fastdiff_group_norm_silu(benchmark, gn_inputs):
    x, w, b = gn_inputs
    y = benchmark(lambda: group_norm(x, 32, w, b, 1e-5, activation="silu"))
    assert torch.allclose(y, F.silu(F.group_norm(x, 32, w, b, 1e-5)), rtol=1e-5, atol=1e-6)


def test_bench_dispatch_overhead(benchmark):
    """Validation + backend selection + tracing bookkeeping on a tiny tensor, where the op itself is negligible."""
    x = torch.randn(1, 4, 2)

    def call():
        with fastdiff.trace_dispatch() as calls:
            group_norm(x, 2)
        return calls

    assert benchmark(call) == [("group_norm", "reference")]
