"""GroupNorm's per-(N, C) input bias in the Triton kernels (ResnetBlock2D's time embedding).

``group_norm(x, ..., input_bias=t)`` is ``group_norm(x + t[:, :, None, None], ...)`` with the
sum taken in x's dtype. The kernels add t on load, before the statistics, and the backward
recomputes x_hat from x + t and also returns d(t) = dx summed over space. Checked under the
interpreter (or on a GPU) against the reference twin on odd shapes, NCHW, channels_last and
1-D, fp32/fp16/bf16, on the single-pass and both split paths; gradients of x, weight, bias
and the input bias against float64 autograd.
"""

import pytest
import torch
import torch.nn.functional as F
from _utils import assert_fp32_close, assert_low_precision_ok, requires_triton

import fastdiff
from fastdiff import backends
from fastdiff.ops.group_norm import group_norm_ref, group_norm_stats_ref

pytestmark = requires_triton

G = 3
EPS = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_INTERPRETER = backends.triton_interpret_enabled() and not torch.cuda.is_available()

LAYOUTS = {
    "nchw": lambda: torch.randn(2, 6, 5, 7, device=DEVICE) * 2 + 0.5,
    "nhwc": lambda: (torch.randn(2, 6, 5, 3, device=DEVICE) * 2 - 0.5).to(memory_format=torch.channels_last),
    "1d": lambda: torch.randn(1, 6, 13, device=DEVICE) * 2 + 1.0,
}


def _kernels():
    from fastdiff.kernels import group_norm as kernels

    return kernels


def _config(path):
    if path == "single":
        return None  # the heuristic's choice for these shapes
    # 2-channel x 8-position tiles, 2 or 3 chunks: partial tiles and a short last chunk occur
    return _kernels().GroupNormConfig(single_pass=False, block_c=2, block_s=8, num_warps=1, split=2, fused_combine=path == "split_fused")


def _case(layout, dtype):
    x = LAYOUTS[layout]().to(dtype)
    c = x.shape[1]
    w, b = torch.randn(c, device=DEVICE).to(dtype), torch.randn(c, device=DEVICE).to(dtype)
    # a column slice: the kernels read input_bias through its strides
    t = (torch.randn(x.shape[0], 2 * c, device=DEVICE) * 3)[:, ::2].to(dtype)
    return x, w, b, t


def _biased(x, t):
    """x + t in x's dtype: what the kernels normalise. Triton's interpreter truncates
    fp32 -> bf16 casts (see test_group_norm_triton), so there the bf16 sum is truncated too."""
    t = t.view(*t.shape, *([1] * (x.dim() - 2)))
    if x.dtype == torch.bfloat16 and ON_INTERPRETER:
        exact = (x.float() + t.float()).contiguous(memory_format=torch.contiguous_format)
        return (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(x.dtype).reshape(x.shape)
    return x + t


FORWARD_CASES = [(layout, path, torch.float32) for layout in LAYOUTS for path in ("single", "split", "split_fused")] + [
    ("nhwc", "split_fused", torch.float16),
    ("nchw", "single", torch.float16),
    ("nhwc", "split", torch.bfloat16),
    ("1d", "single", torch.bfloat16),
]


@pytest.mark.parametrize("layout, path, dtype", FORWARD_CASES)
def test_forward_matches_the_reference(seed, layout, path, dtype):
    x, w, b, t = _case(layout, dtype)
    y, mean, rstd = _kernels().group_norm_forward(x, w, b, G, EPS, True, _config(path), input_bias=t)
    assert y.dtype == dtype and y.stride() == torch.empty_like(x).stride()
    xb = _biased(x, t)
    mean_ref, rstd_ref = group_norm_stats_ref(xb, G, EPS)
    assert_fp32_close(mean, mean_ref, what="mean")
    assert_fp32_close(rstd, rstd_ref, what="rstd")
    oracle = group_norm_ref(xb.double(), G, w.double(), b.double(), EPS, "silu")
    if dtype == torch.float32:
        assert_fp32_close(y, group_norm_ref(x, G, w, b, EPS, "silu", input_bias=t))
        assert_fp32_close(y, oracle, what="output vs float64")
    elif dtype == torch.bfloat16 and ON_INTERPRETER:
        # The bar is the fp32 result truncated as the interpreter casts.
        exact = group_norm_ref(xb.float(), G, w.float(), b.float(), EPS, "silu").contiguous()
        truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
        assert_low_precision_ok(y, truncated, oracle)
    else:
        plain = group_norm_ref(x, G, w, b, EPS, "silu", upcast=False, input_bias=t)
        assert_low_precision_ok(y, plain, oracle)
    assert (y.double() - group_norm_ref(x.double(), G, w.double(), b.double(), EPS, "silu")).abs().max() > 0.1, "the bias must change y"


def _float64_grads(x, w, b, t, dy, silu):
    """Float64 autograd of GroupNorm(+SiLU) at the value x + t rounded to x's dtype (the op's
    definition), with d/dx = d/dt = identity through that rounding."""
    leaves = [v.detach().double().requires_grad_() for v in (x, w, b, t)]
    xt, tt = leaves[0], leaves[3].view(*t.shape, *([1] * (x.dim() - 2)))
    value = _biased(x, t).double()
    z = F.group_norm(value + (xt - xt.detach()) + (tt - tt.detach()), G, leaves[1], leaves[2], EPS)
    y = F.silu(z) if silu else z
    return torch.autograd.grad(y, leaves, dy.double())


@pytest.mark.parametrize("layout, path, silu", [("nchw", "single", True), ("nhwc", "split", True), ("1d", "split", False), ("nchw", "split", False)])
def test_backward_fp32_matches_float64_autograd(seed, layout, path, silu):
    kernels = _kernels()
    x, w, b, t = _case(layout, torch.float32)
    config = _config(path)
    y, mean, rstd = kernels.group_norm_forward(x, w, b, G, EPS, silu, config, input_bias=t)
    dy = torch.randn_like(y)
    dx, dw, db, dt = kernels.group_norm_backward(dy, x, w, b, mean, rstd, G, silu, config, input_bias=t)
    assert dt.shape == t.shape and dt.dtype == t.dtype
    for got, want, name in zip((dx, dw, db, dt), _float64_grads(x, w, b, t, dy, silu), ("dx", "dw", "db", "d_input_bias")):
        assert_fp32_close(got, want, what=name)


@pytest.mark.parametrize("layout, dtype", [("nhwc", torch.float16), ("nchw", torch.bfloat16)])
def test_backward_low_precision(seed, layout, dtype):
    kernels = _kernels()
    x, w, b, t = _case(layout, dtype)
    y, mean, rstd = kernels.group_norm_forward(x, w, b, G, EPS, True, input_bias=t)
    dy = torch.randn_like(y)
    got = kernels.group_norm_backward(dy, x, w, b, mean, rstd, G, True, _config("split"), input_bias=t)
    # The same gradients from fp32 math on the same (rounded) inputs are the oracle; plain
    # PyTorch autograd in the low dtype is the baseline the kernel must stay within 2x of.
    want = _float64_grads(x, w, b, t, dy, True)
    leaves = [v.detach().clone().requires_grad_() for v in (x, w, b, t)]
    plain = torch.autograd.grad(group_norm_ref(leaves[0], G, leaves[1], leaves[2], EPS, "silu", upcast=False, input_bias=leaves[3]), leaves, dy)
    for g, base, ref, name in zip(got, plain, want, ("dx", "dw", "db", "d_input_bias")):
        assert g.dtype == dtype
        # the interpreter's truncating casts cost up to one more ulp than PyTorch's rounding
        assert_low_precision_ok(g, base, ref, factor=3.0 if ON_INTERPRETER else 2.0, what=name)


@pytest.mark.parametrize("layout, activation", [("nchw", None), ("nhwc", "silu")])
def test_op_autograd_through_triton_matches_the_reference(seed, layout, activation):
    x, w, b, t = _case(layout, torch.float32)
    leaves = [v.detach().clone().requires_grad_() for v in (x, w, b, t)]
    with fastdiff.trace_dispatch() as calls:
        y = fastdiff.ops.group_norm(leaves[0], G, leaves[1], leaves[2], EPS, activation, backend="triton", input_bias=leaves[3])
    assert calls == [("group_norm", "triton")]
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [v.detach().clone().requires_grad_() for v in (x, w, b, t)]
    y_ref = fastdiff.ops.group_norm(ref_leaves[0], G, ref_leaves[1], ref_leaves[2], EPS, activation, backend="reference", input_bias=ref_leaves[3])
    assert_fp32_close(y, y_ref)
    want = torch.autograd.grad(y_ref, ref_leaves, dy)
    for g, r, name in zip(got, want, ("dx", "dw", "db", "d_input_bias")):
        assert_fp32_close(g, r, what=name)


def test_op_without_affine_gradients_flow_to_x_and_the_bias_only(seed):
    x, _, _, t = _case("nchw", torch.float32)
    xl, tl_ = x.clone().requires_grad_(), t.clone().requires_grad_()
    y = fastdiff.ops.group_norm(xl, G, eps=EPS, backend="triton", input_bias=tl_)
    dy = torch.randn_like(y)
    dx, dt = torch.autograd.grad(y, (xl, tl_), dy)
    want = _float64_grads(x, torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE), t, dy, False)
    assert_fp32_close(dx, want[0], what="dx")
    assert_fp32_close(dt, want[3], what="d_input_bias")


def test_opcheck_with_input_bias(seed):
    x, w, b, t = (v[:1] if v.dim() > 1 else v for v in _case("nhwc", torch.float32))
    args = [v.requires_grad_() for v in (x, w, b)]
    torch.library.opcheck(torch.ops.fastdiff.group_norm_fwd_triton.default, (*args, t.contiguous().requires_grad_(), G, EPS, "silu"))
    _, mean, rstd = torch.ops.fastdiff.group_norm_fwd_triton(x.detach(), w.detach(), b.detach(), t, G, EPS, "silu")
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_bwd_triton.default, (dy, x.detach(), w.detach(), b.detach(), t, mean, rstd, G, "silu"))


def test_bad_input_bias_names_the_argument(seed):
    x, w, b, t = _case("nchw", torch.float32)
    with pytest.raises(ValueError, match=r"input_bias must be a \(2, 6\) torch.float32"):
        _kernels().group_norm_forward(x, w, b, G, EPS, False, input_bias=t[:, :5])
