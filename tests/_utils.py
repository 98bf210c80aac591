"""Helpers shared by the kernel tests (import as ``from _utils import ...``)."""

import pytest
import torch

from fastdiff import backends

requires_triton = pytest.mark.skipif(
    not (backends.triton_available() and (torch.cuda.is_available() or backends.triton_interpret_enabled())),
    reason="needs triton with a GPU or TRITON_INTERPRET=1",
)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FP32_RTOL = 1e-5


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_fp32_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = FP32_RTOL, what: str = "output") -> None:
    """fp32 check: max error relative to the reference's scale stays within rtol."""
    scale = ref.double().abs().max().item()
    err = max_abs_err(out, ref)
    assert err <= rtol * max(scale, 1e-6), f"{what}: max abs error {err:.3e} exceeds {rtol:g} x scale {scale:.3e}"


def assert_low_precision_ok(out: torch.Tensor, baseline: torch.Tensor, ref: torch.Tensor, factor: float = 2.0, what: str = "output") -> None:
    """Low-precision check (flash-attention's rule): the fused result's error is at
    most ``factor`` x the error of plain PyTorch in the same dtype, both measured
    against an fp32/fp64 reference. A tiny absolute floor absorbs the case where the
    baseline happens to be exact."""
    err = max_abs_err(out, ref)
    base = max_abs_err(baseline, ref)
    floor = 1e-6 * ref.double().abs().max().item()
    assert err <= factor * base + floor, f"{what}: error {err:.3e} > {factor} x PyTorch's {base:.3e}"
