"""The attention op's host path: cached plans, the direct launch, and the launchers'
index-range guard (checked on shapes and strides only, nothing huge is allocated)."""

import importlib

import pytest
import torch

from _utils import assert_fp32_close, requires_triton
from fastdiff import backends
from fastdiff.ops.attention import attention, attention_ref

attention_module = importlib.import_module("fastdiff.ops.attention")  # fastdiff.ops.attention is also the function


def _qkv(lq=19, lk=13, d=16, dtype=torch.float32):
    return torch.randn(2, 3, lq, d, dtype=dtype), torch.randn(2, 3, lk, d, dtype=dtype), torch.randn(2, 3, lk, d, dtype=dtype)


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("triton", marks=requires_triton)])
def test_repeat_call_uses_the_plan_and_is_recorded(seed, monkeypatch, backend):
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 1, 13) > 0.3
    mask[..., 0] = True
    backends.clear_plans()
    with torch.no_grad(), backends.trace_dispatch() as calls:
        first = attention(q, k, v, mask, backend=backend)

        def checked(*args):
            raise AssertionError("a repeat call with the same layout re-ran the argument checks")

        monkeypatch.setattr(attention_module, "_check_inputs", checked)
        second = attention(q, k, v, mask, backend=backend)
        assert torch.equal(first, second)
        # A new layout (here a transposed view of k) misses the plan and is checked.
        with pytest.raises(AssertionError, match="re-ran the argument checks"):
            attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, mask, backend=backend)
    assert calls == [("attention", backend)] * 2
    assert_fp32_close(second, attention_ref(q.double(), k.double(), v.double(), mask))


def test_plan_follows_the_request(seed):
    """A plan is per request: the same layout under another backend= or use_backend
    runs that backend, and a bad input is still reported after a plan exists."""
    q, k, v = _qkv()
    with backends.trace_dispatch() as calls:
        attention(q, k, v, backend="sdpa")
        attention(q, k, v, backend="reference")
        with backends.use_backend(attention="reference"):
            attention(q, k, v)
        attention(q, k, v)
    assert calls == [("attention", "sdpa"), ("attention", "reference"), ("attention", "reference"), ("attention", "sdpa")]
    with pytest.raises(ValueError, match="scale must be a float or None"):
        attention(q, k, v, scale="0.5")
    with pytest.raises(ValueError, match="k dtype torch.float16 does not match"):
        attention(q, k.half(), v)


@requires_triton
def test_eager_no_grad_call_skips_the_custom_op(seed, monkeypatch):
    """Without an autograd graph to record, the Triton launcher is called directly; with
    inputs that require grad the call goes through the custom op (and its backward)."""
    q, k, v = _qkv()
    through_op = []
    original = attention_module._attention_fwd_triton

    def spy(*args):
        through_op.append(1)
        return original(*args)

    monkeypatch.setattr(attention_module, "_attention_fwd_triton", spy)
    with torch.no_grad():
        direct = attention(q, k, v, backend="triton")
    assert through_op == []
    plain = attention(q, k, v, backend="triton")  # grad mode on, but nothing requires grad
    assert through_op == [] and torch.equal(plain, direct)
    q.requires_grad_()
    out = attention(q, k, v, backend="triton")
    assert through_op == [1] and torch.equal(out.detach(), direct)
    (dq,) = torch.autograd.grad(out.sum(), (q,))
    q64 = q.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(attention_ref(q64, k.double(), v.double()).sum(), (q64,))
    assert_fp32_close(dq, ref, what="dq")


# ---------------------------------------------------------------------------
# Index ranges: 64-bit plane offsets, 32-bit tile offsets, and the guard
# ---------------------------------------------------------------------------


def _kernels():
    from fastdiff.kernels import attention as kernels

    return kernels


def test_guard_accepts_sd_sizes():
    kernels = _kernels()
    q = torch.empty(2, 4096, 8 * 40, device="meta").view(2, 4096, 8, 40).transpose(1, 2)
    k = torch.empty(2, 77, 8 * 40, device="meta").view(2, 77, 8, 40).transpose(1, 2)
    assert kernels.index_range_problems(q, k, k, torch.empty(2, 1, 4096, 77, device="meta")) == []
    # B * H * Lq * D and Lq * Lk past 2^31 are fine: plane and row offsets are 64-bit.
    big = torch.empty(1, device="meta").expand(64, 16, 65536, 40)
    assert kernels.index_range_problems(big, big, big, torch.empty(1, device="meta").expand(64, 16, 65536, 65536)) == []


def test_guard_names_the_argument():
    kernels = _kernels()
    ok = torch.empty(1, 2, 8, 16, device="meta")
    long_q = torch.empty(1, device="meta").expand(1, 2, 2**31, 16)
    assert any(p.startswith("q has length 2147483648") for p in kernels.index_range_problems(long_q, ok, ok, None))
    wide_v = torch.empty(1, device="meta").as_strided((1, 2, 8, 16), (0, 0, 2**29, 1))
    problems = kernels.index_range_problems(ok, ok, wide_v, None)
    assert len(problems) == 1 and problems[0].startswith("v's strides (0, 0, 536870912, 1) are too large")
    # One row: the stride is never multiplied by more than 0.
    assert kernels.index_range_problems(ok, ok[:, :, :1], wide_v[:, :, :1], None) == []
    mask = torch.empty(1, device="meta", dtype=torch.bool).as_strided((1, 1, 8, 8), (0, 0, 2**29, 1))
    assert kernels.index_range_problems(ok, ok, ok, mask)[0].startswith("attn_mask's strides")


def test_launchers_raise_before_allocating():
    """A 2^31-long stride-0 view: the launcher raises a ValueError naming q before it
    allocates an output of that size (which would need terabytes)."""
    kernels = _kernels()
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 2**31, 16)
    k = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match=r"attention \(Triton\): q has length 2147483648"):
        kernels.attention_forward(q, k, k, None, 0.25)
    with pytest.raises(ValueError, match=r"q has length 2147483648"):
        kernels.attention_backward(q, q, k, k, None, q, torch.empty(1), 0.25)


@requires_triton
def test_layout_reasons_name_the_range_problem(seed):
    """The guard is also one of the Triton backend's reasons: a forced call says why,
    before anything is allocated (q is a 2^31-long stride-0 view of one row)."""
    q = torch.randn(1, 1, 1, 16).expand(1, 1, 2**31, 16)
    k = torch.randn(1, 1, 8, 16)
    reasons = backends.get_dispatcher("attention").reasons({"q": q, "k": k, "v": k, "attn_mask": None})
    assert any(r.startswith("q has length 2147483648") for r in reasons["triton"])
    assert reasons["sdpa"] == []
    with pytest.raises(backends.BackendNotSupportedError, match="q has length 2147483648"):
        attention(q, k, k, backend="triton")
