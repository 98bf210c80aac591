"""fastdiff.ops.group_norm: validation, the reference twin, dispatch on the CPU, and nn.GroupNorm.

The Triton kernels are tested in test_group_norm_triton.py, the CUDA kernel in
test_group_norm_cuda.py; both against the reference twin tested here.
"""

import pytest
import torch
import torch.nn.functional as F
from _utils import assert_fp32_close

import fastdiff
from fastdiff.backends import BackendNotSupportedError
from fastdiff.nn import GroupNorm, fuse_group_norm_silu
from fastdiff.ops.group_norm import group_norm_backward_ref, group_norm_ref, group_norm_stats_ref


def _x(*shape, dtype=torch.float32, channels_last=False):
    x = torch.randn(*shape, dtype=dtype) * 3 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def _affine(c, dtype=torch.float32):
    return torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)


# --- reference twin against a float64 computation written out by hand -------


@pytest.mark.parametrize("shape", [(1, 6, 7, 9), (3, 6, 11), (2, 6, 3, 5, 4)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_reference_matches_float64_math(seed, shape, activation):
    x = _x(*shape)
    w, b = _affine(shape[1])
    y = group_norm_ref(x, 3, w, b, 1e-5, activation)
    xd = x.double().reshape(shape[0], 3, -1)
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    expected = ((xd - mean) / torch.sqrt(var + 1e-5)).reshape(shape)
    expected = expected * w.double().reshape(1, -1, *[1] * (len(shape) - 2)) + b.double().reshape(1, -1, *[1] * (len(shape) - 2))
    if activation == "silu":
        expected = expected * torch.sigmoid(expected)
    assert_fp32_close(y, expected)


def test_reference_keeps_dtype_and_channels_last(seed):
    x = _x(3, 6, 7, 9, dtype=torch.bfloat16, channels_last=True)
    w, b = _affine(6, torch.bfloat16)
    y = group_norm_ref(x, 3, w, b, activation="silu")
    assert y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    x3 = _x(1, 6, 3, 4, 5, channels_last=True)
    assert group_norm_ref(x3, 2).is_contiguous(memory_format=torch.channels_last_3d)


def test_reference_stats(seed):
    x = _x(3, 6, 7, 9)
    mean, rstd = group_norm_stats_ref(x, 3, 1e-5)
    xg = x.double().reshape(3, 3, -1)
    assert_fp32_close(mean, xg.mean(-1))
    assert_fp32_close(rstd, 1 / torch.sqrt(xg.var(-1, unbiased=False) + 1e-5))


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reference_backward_matches_autograd(seed, activation, channels_last):
    x = _x(3, 6, 7, 9, dtype=torch.float64, channels_last=channels_last).requires_grad_()
    w, b = (t.requires_grad_() for t in _affine(6, torch.float64))
    y = group_norm_ref(x, 3, w, b, 1e-5, activation)
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    mean, rstd = group_norm_stats_ref(x.detach(), 3, 1e-5)
    dx, dw, db = group_norm_backward_ref(dy, x.detach(), w.detach(), b.detach(), mean, rstd, 3, activation)
    for got, want, name in ((dx, gx, "dx"), (dw, gw, "dw"), (db, gb, "db")):
        assert_fp32_close(got, want, what=name)


# --- the public op ----------------------------------------------------------


def test_op_on_cpu_runs_reference_and_matches_torch(seed):
    x = _x(2, 6, 7, 9)
    w, b = _affine(6)
    with fastdiff.trace_dispatch() as calls:
        y = fastdiff.ops.group_norm(x, 3, w, b, activation="silu")
    assert calls == [("group_norm", "reference")]
    assert torch.equal(y, F.silu(F.group_norm(x, 3, w, b)))


def test_op_gradients_on_cpu(seed):
    x = _x(2, 6, 5).requires_grad_()
    w, b = (t.requires_grad_() for t in _affine(6))
    fastdiff.ops.group_norm(x, 3, w, b, activation="silu").square().sum().backward()
    assert x.grad is not None and w.grad is not None and b.grad is not None
    assert x.grad.abs().sum() > 0


def test_forced_cuda_on_cpu_tensor_raises_with_reasons(seed):
    x = _x(2, 6, 5)
    with pytest.raises(BackendNotSupportedError) as info:
        fastdiff.ops.group_norm(x, 3, backend="cuda")
    message = str(info.value)
    assert "cuda: needs CUDA tensors" in message
    assert "reference: supported" in message
    assert "triton:" in message


def test_forced_triton_without_interpreter_raises(seed, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendNotSupportedError, match="TRITON_INTERPRET=1"):
        fastdiff.ops.group_norm(_x(2, 6, 5), 3, backend="triton")


def test_env_var_forces_reference_by_name(seed, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "group_norm=reference")
    with fastdiff.trace_dispatch() as calls:
        fastdiff.ops.group_norm(_x(1, 4, 3), 2)
    assert calls == [("group_norm", "reference")]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: fastdiff.ops.group_norm(x, 4), r"channel count \(6\).*num_groups \(4\)"),
        (lambda x: fastdiff.ops.group_norm(x, 0), "num_groups must be a positive int"),
        (lambda x: fastdiff.ops.group_norm(x, 3, weight=torch.randn(5)), r"weight must have shape \(6,\)"),
        (lambda x: fastdiff.ops.group_norm(x, 3, bias=torch.randn(6, 1)), r"bias must have shape \(6,\)"),
        (lambda x: fastdiff.ops.group_norm(x, 3, weight=torch.randn(6, dtype=torch.float64)), "weight dtype"),
        (lambda x: fastdiff.ops.group_norm(x[0, 0], 3), "x must have shape"),
        (lambda x: fastdiff.ops.group_norm(x.reshape(1, 1, 2, 6, 7, 9), 1), "x must have shape"),
        (lambda x: fastdiff.ops.group_norm(x[:0], 3), "x is empty"),
        (lambda x: fastdiff.ops.group_norm(x.long(), 3), "floating-point"),
        (lambda x: fastdiff.ops.group_norm(x, 3, eps=-1.0), "eps"),
        (lambda x: fastdiff.ops.group_norm(x, 3, activation="gelu"), "activation"),
        (lambda x: fastdiff.ops.group_norm([1.0], 3), "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_value_error(seed, call, match):
    with pytest.raises(ValueError, match=match):
        call(_x(2, 6, 7, 9))


# --- nn.GroupNorm -----------------------------------------------------------


def test_module_loads_torch_state_dict_and_matches(seed):
    torch_norm = torch.nn.GroupNorm(3, 6, eps=1e-6)
    torch.nn.init.normal_(torch_norm.weight)
    torch.nn.init.normal_(torch_norm.bias)
    ours = GroupNorm(3, 6, eps=1e-6)
    ours.load_state_dict(torch_norm.state_dict())
    assert list(ours.state_dict()) == list(torch_norm.state_dict()) == ["weight", "bias"]
    x = _x(3, 6, 7, 9, channels_last=True)
    assert_fp32_close(ours(x), torch_norm(x))
    assert GroupNorm(3, 6, affine=False).state_dict() == {}


def test_fused_silu_module_from_pair(seed):
    norm, act = torch.nn.GroupNorm(3, 6), torch.nn.SiLU()
    torch.nn.init.normal_(norm.weight)
    fused = fuse_group_norm_silu(norm, act)
    assert fused.activation == "silu" and fused.weight is norm.weight
    x = _x(1, 6, 7, 9)
    assert_fp32_close(fused(x), act(norm(x)))
    with pytest.raises(ValueError, match="nn.SiLU"):
        fuse_group_norm_silu(norm, torch.nn.GELU())
    with pytest.raises(ValueError, match="activation"):
        GroupNorm(3, 6, activation="relu")


# ---------------------------------------------------------------------------
# input_bias: a per-(N, C) bias added before the statistics (ResnetBlock2D's temb)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_input_bias_equals_adding_it_first(dtype, channels_last):
    torch.manual_seed(3)
    x = torch.randn(3, 12, 5, 7, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(12, dtype=dtype), torch.randn(12, dtype=dtype)
    t = torch.randn(3, 12, dtype=dtype) * 2
    with fastdiff.trace_dispatch() as calls:
        ours = fastdiff.ops.group_norm(x, 4, w, b, 1e-5, "silu", input_bias=t)
    expected = fastdiff.ops.group_norm(x + t[:, :, None, None], 4, w, b, 1e-5, "silu", backend="reference")
    assert calls == [("group_norm", "reference")]
    assert torch.equal(ours, expected)
    assert ours.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert not torch.equal(ours, fastdiff.ops.group_norm(x, 4, w, b, 1e-5, "silu"))


def test_input_bias_gradients_match_the_unfused_graph():
    torch.manual_seed(4)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    grads = torch.autograd.grad((fastdiff.ops.group_norm(x, 2, w, None, 1e-5, "silu", input_bias=t) * dy).sum(), (x, t, w))
    expected = torch.autograd.grad((torch.nn.functional.silu(torch.nn.functional.group_norm(x + t[:, :, None, None], 2, w, None, 1e-5)) * dy).sum(), (x, t, w))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert torch.autograd.gradcheck(lambda x, t: fastdiff.ops.group_norm(x, 2, None, None, 1e-5, None, input_bias=t), (x.detach()[:1, :, :2, :3].requires_grad_(), t.detach()[:1].requires_grad_()))


def test_input_bias_keeps_the_fused_backends():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastdiff import backends

    with FakeTensorMode(), backends.use_target("sm_90"):
        x = torch.empty(2, 32, 8, 8, device="cuda", dtype=torch.float16)
        t = torch.empty(2, 32, device="cuda", dtype=torch.float16)
        with_bias = fastdiff.explain_dispatch("group_norm", x, 8, input_bias=t)
        without = fastdiff.explain_dispatch("group_norm", x, 8)
    assert "would run 'triton'" in with_bias and "input_bias" not in with_bias.split("\n", 1)[1]
    assert "would run 'triton'" in without


def test_input_bias_bad_inputs_name_the_argument():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"input_bias must have shape \(N, C\) = \(2, 4\)"):
        fastdiff.ops.group_norm(x, 2, input_bias=torch.randn(4))
    with pytest.raises(ValueError, match="input_bias dtype"):
        fastdiff.ops.group_norm(x, 2, input_bias=torch.randn(2, 4, dtype=torch.float64))


def test_module_forwards_input_bias():
    torch.manual_seed(5)
    norm = GroupNorm(3, 9, activation="silu")
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x, t = torch.randn(2, 9, 4, 5), torch.randn(2, 9)
    assert torch.equal(norm(x, input_bias=t), norm(x + t[:, :, None, None]))


def test_reference_backward_of_a_frozen_channels_last_input(seed):
    # torch 2.13's CPU GroupNorm backward crashes on a channels_last input that does not
    # require grad when the weight does; the reference backend computes from an NCHW copy.
    x = torch.randn(2, 6, 5, 7).to(memory_format=torch.channels_last)
    w = torch.randn(6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    y = fastdiff.ops.group_norm(x, 3, w, b, 1e-5, "silu", backend="reference")
    assert y.is_contiguous(memory_format=torch.channels_last)
    dw, db = torch.autograd.grad(y.sum(), [w, b])
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    want = torch.autograd.grad(F.silu(F.group_norm(x.contiguous(), 3, w2, b2, 1e-5)).sum(), [w2, b2])
    assert torch.equal(dw, want[0]) and torch.equal(db, want[1])
    assert torch.equal(y, F.silu(F.group_norm(x.contiguous(), 3, w, b, 1e-5)))
