"""The host path of ``fastdiff.ops.group_norm``: cached plans and the direct launch.

A repeat call with the same argument metadata takes the dispatcher's cached plan (no
argument checks, no reasons) and, in eager inference, calls the Triton launcher without
the custom op. These tests check that such calls give the same results, are still
recorded by ``trace_dispatch``, still go through the custom op when autograd needs it, and
that anything the checks or reasons read gets a plan of its own (so bad inputs still raise).
"""

import importlib

import pytest
import torch
from _utils import assert_fp32_close, requires_triton
import fastdiff
from fastdiff import backends
from fastdiff.ops.group_norm import group_norm_ref

gn_module = importlib.import_module("fastdiff.ops.group_norm")  # fastdiff.ops.group_norm is also the op's name

pytestmark = requires_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def custom_op_calls(monkeypatch):
    """Counts the calls of the Triton forward custom op."""
    calls = []
    op = gn_module._group_norm_fwd_triton

    def counting(*args):
        calls.append(args)
        return op(*args)

    monkeypatch.setattr(gn_module, "_group_norm_fwd_triton", counting)
    return calls


def _inputs(seed_offset=0):
    torch.manual_seed(1234 + seed_offset)
    x = (torch.randn(2, 6, 5, 7, device=DEVICE) * 2 + 1).to(memory_format=torch.channels_last)
    return x, torch.randn(6, device=DEVICE), torch.randn(6, device=DEVICE), torch.randn(2, 6, device=DEVICE)


def test_repeat_calls_match_and_are_traced(seed, custom_op_calls):
    backends.clear_plans()
    x, w, b, t = _inputs()
    with torch.no_grad(), fastdiff.use_backend("triton"), fastdiff.trace_dispatch() as calls:
        first = fastdiff.ops.group_norm(x, 3, w, b, 1e-5, "silu", input_bias=t)
        second = fastdiff.ops.group_norm(x, 3, w, b, 1e-5, "silu", input_bias=t)
        third = fastdiff.ops.group_norm(x, 3, w, b, 1e-5, "silu")
    assert calls == [("group_norm", "triton")] * 3
    assert custom_op_calls == [], "eager inference launches without the custom op"
    assert torch.equal(first, second)
    assert_fp32_close(first, group_norm_ref(x.double(), 3, w.double(), b.double(), 1e-5, "silu", input_bias=t.double()))
    assert_fp32_close(third, group_norm_ref(x.double(), 3, w.double(), b.double(), 1e-5, "silu"))


def test_autograd_still_takes_the_custom_op(seed, custom_op_calls):
    backends.clear_plans()
    x, w, b, t = _inputs(1)
    w.requires_grad_()
    with fastdiff.use_backend("triton"):
        for _ in range(2):  # the second call is a plan hit
            y = fastdiff.ops.group_norm(x, 3, w, b, 1e-5, "silu", input_bias=t)
    assert len(custom_op_calls) == 2 and y.grad_fn is not None
    (dw,) = torch.autograd.grad(y.sum(), [w])
    ref_w = w.detach().clone().requires_grad_()
    # x's gradient is asked for too: torch's CPU GroupNorm backward crashes on a channels_last
    # input when only the weight's is (torch 2.13).
    ref_x = x.clone().requires_grad_()
    _, want = torch.autograd.grad(group_norm_ref(ref_x, 3, ref_w, b, 1e-5, "silu", input_bias=t).sum(), [ref_x, ref_w])
    assert_fp32_close(dw, want, what="dw")


def test_a_cached_plan_never_skips_a_check_that_would_fail(seed, monkeypatch):
    backends.clear_plans()
    x, w, b, t = _inputs(2)
    with torch.no_grad(), fastdiff.use_backend("triton"):
        fastdiff.ops.group_norm(x, 1, w, b)
        with pytest.raises(ValueError, match="num_groups must be a positive int"):
            fastdiff.ops.group_norm(x, True, w, b)  # True == 1, but not an int group count
        with pytest.raises(ValueError, match="weight dtype"):
            fastdiff.ops.group_norm(x, 1, w.double(), b)
        with pytest.raises(ValueError, match="input_bias must have shape"):
            fastdiff.ops.group_norm(x, 1, w, b, input_bias=t[:, :5])
        if DEVICE == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "0")  # the triton backend's reasons read it
            with pytest.raises(backends.BackendNotSupportedError, match="TRITON_INTERPRET"):
                fastdiff.ops.group_norm(x, 1, w, b)
