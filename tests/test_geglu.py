"""fastdiff.ops.geglu: the Triton kernels (kernels/geglu.py) against the reference twin and an fp64 oracle.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest), so
shapes are small and deliberately odd (D = 40, 72, 37; 3 x 37 rows). On a GPU
machine the same tests run on CUDA tensors. fp32 results must match the fp64
oracle to ~1e-5 relative; fp16/bf16 results may be at most 2x as far from it as
plain PyTorch in the same dtype (diffusers' chunk + gelu + mul).
"""

import pytest
import torch
from _utils import assert_fp32_close, assert_low_precision_ok, requires_triton

import fastdiff
from fastdiff.backends import BackendNotSupportedError
from fastdiff.ops.geglu import geglu, geglu_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape, dtype=torch.float32):
    # Gates spread over GELU's curved region and tails; a non-zero mean.
    return (torch.randn(*shape, device=DEVICE, dtype=torch.float64) * 2 + 0.3).to(dtype)


# Each layout gives a fresh (..., 2D) input; the strided ones are views that the
# kernels must read in place.
LAYOUTS = {
    "3d_d40": lambda dt: _randn(3, 37, 2 * 40, dtype=dt),
    "2d_d72": lambda dt: _randn(5, 2 * 72, dtype=dt),
    "1d_d37": lambda dt: _randn(2 * 37, dtype=dt),
    "rows_of_wider": lambda dt: _randn(2, 13, 2 * 24 + 10, dtype=dt)[..., : 2 * 24],
    "every_other_row": lambda dt: _randn(3, 11, 2 * 20, dtype=dt)[:, ::2],
    "channels_last_rows": lambda dt: _randn(2, 2 * 12, 5, 3, dtype=dt).to(memory_format=torch.channels_last).permute(0, 2, 3, 1),
}


def _oracle(x):
    return geglu_ref(x.double())


@requires_triton
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_triton_forward_fp32(seed, layout):
    x = LAYOUTS[layout](torch.float32)
    y = geglu(x, backend="triton")
    assert y.shape == (*x.shape[:-1], x.shape[-1] // 2) and y.dtype == x.dtype and y.is_contiguous()
    assert_fp32_close(y, _oracle(x))
    assert_fp32_close(y, geglu(x, backend="reference"), what="vs reference backend")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["3d_d40", "every_other_row"])
def test_triton_forward_low_precision(seed, layout, dtype):
    x = LAYOUTS[layout](dtype)
    y = geglu(x, backend="triton")
    assert y.dtype == dtype
    assert_low_precision_ok(y, geglu_ref(x, upcast=False), _oracle(x))


@requires_triton
@pytest.mark.parametrize("layout", ["3d_d40", "2d_d72", "every_other_row", "channels_last_rows"])
def test_triton_backward_fp32(seed, layout):
    x = LAYOUTS[layout](torch.float32).requires_grad_()
    dy = _randn(*x.shape[:-1], x.shape[-1] // 2)
    (dx,) = torch.autograd.grad(geglu(x, backend="triton"), x, dy)
    x64 = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(geglu_ref(x64), x64, dy.double())
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_fp32_close(dx[..., : x.shape[-1] // 2], dx_ref[..., : x.shape[-1] // 2], what="d(hidden)")
    assert_fp32_close(dx[..., x.shape[-1] // 2 :], dx_ref[..., x.shape[-1] // 2 :], what="d(gate)")


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_backward_low_precision(seed, dtype):
    x = LAYOUTS["3d_d40"](dtype).requires_grad_()
    dy = _randn(*x.shape[:-1], x.shape[-1] // 2, dtype=dtype)
    (dx,) = torch.autograd.grad(geglu(x, backend="triton"), x, dy)
    (dx_torch,) = torch.autograd.grad(geglu_ref(x, upcast=False), x, dy)
    x64 = x.detach().double().requires_grad_()
    (dx_ref,) = torch.autograd.grad(geglu_ref(x64), x64, dy.double())
    assert dx.dtype == dtype
    assert_low_precision_ok(dx, dx_torch, dx_ref, what="dx")


@requires_triton
def test_gradient_through_a_view_reaches_the_base(seed):
    base = _randn(4, 9, 2 * 16 + 6).requires_grad_()
    y = geglu(base[:, 1::2, : 2 * 16], backend="triton")
    dy = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, base, dy)
    (grad_ref,) = torch.autograd.grad(geglu_ref(base[:, 1::2, : 2 * 16]), base, dy)
    assert_fp32_close(grad, grad_ref)
    assert grad[:, ::2].abs().max() == 0 and grad[..., 2 * 16 :].abs().max() == 0


@requires_triton
def test_backward_with_a_non_contiguous_dy(seed):
    x = LAYOUTS["3d_d40"](torch.float32).requires_grad_()
    dy_t = _randn(37, 3, 40)  # y's gradient arrives as dy_t.transpose(0, 1): not contiguous
    grads = []
    for fn in (lambda t: geglu(t, backend="triton"), geglu_ref):
        (grad,) = torch.autograd.grad((fn(x).transpose(0, 1) * dy_t).sum(), x)
        grads.append(grad)
    assert_fp32_close(grads[0], grads[1])


@requires_triton
def test_launch_covers_rows_and_columns_over_several_programs(seed):
    from fastdiff.kernels.geglu import launch_config

    x = _randn(1100, 2 * 300)  # more rows and columns than one tile: partial tiles on both axes
    config = launch_config(1100, 300)
    assert 1100 % config.block_m and 300 % config.block_d and config.block_d < 300
    assert_fp32_close(geglu(x, backend="triton"), _oracle(x))


def test_launch_config_tiles_sd_widths_exactly():
    from fastdiff.kernels.geglu import launch_config

    for d in (1280, 2560, 5120):
        config = launch_config(2 * 4096, d)
        assert d % config.block_d == 0 and config.block_m * config.block_d <= 2048 and config.num_warps == 4
    small = launch_config(1, 37)
    assert (small.block_m, small.block_d, small.num_warps) == (1, 64, 1)


@requires_triton
def test_opcheck_forward_op(seed):
    x = LAYOUTS["every_other_row"](torch.float32).requires_grad_()
    torch.library.opcheck(torch.ops.fastdiff.geglu_fwd_triton.default, (x,))


@requires_triton
def test_opcheck_backward_op(seed):
    x = LAYOUTS["3d_d40"](torch.float32)
    dy = _randn(*x.shape[:-1], x.shape[-1] // 2)
    torch.library.opcheck(torch.ops.fastdiff.geglu_bwd_triton.default, (dy, x))


@requires_triton
def test_compiles_without_graph_break(seed):
    """The custom op's fake and autograd let Dynamo trace forward and backward in one graph."""
    fn = torch.compile(lambda t: geglu(t, backend="triton"), backend="aot_eager", fullgraph=True)
    x = LAYOUTS["every_other_row"](torch.float32).requires_grad_()
    dy = _randn(*x.shape[:-1], x.shape[-1] // 2)
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y_ref = geglu_ref(x64)
    (dx_ref,) = torch.autograd.grad(y_ref, x64, dy.double())
    assert_fp32_close(y, y_ref)
    assert_fp32_close(dx, dx_ref, what="dx")


# --- reference backend and dispatch ----------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True])
def test_reference_is_diffusers_eager(seed, grad):
    x = LAYOUTS["3d_d40"](torch.float32).requires_grad_(grad)
    hidden, gate = x.chunk(2, dim=-1)
    expected = hidden * torch.nn.functional.gelu(gate)
    y = geglu(x, backend="reference")
    assert torch.equal(y, expected)
    assert y.requires_grad == grad


def test_auto_picks_reference(seed):
    x = LAYOUTS["2d_d72"](torch.float32)
    with fastdiff.trace_dispatch() as calls:
        geglu(x)
    assert calls == [("geglu", "reference")]
    assert "would run 'reference'" in geglu.explain(x)


@requires_triton
def test_forced_triton_is_traced(seed):
    x = LAYOUTS["2d_d72"](torch.float32)
    with fastdiff.use_backend(geglu="triton"), fastdiff.trace_dispatch() as calls:
        y = geglu(x)
    assert calls == [("geglu", "triton")]
    assert_fp32_close(y, _oracle(x))


@requires_triton
def test_forced_triton_refuses_what_it_cannot_read():
    x = _randn(3, 5, 7, 2 * 8)[:, ::2, ::2]  # three strided leading dims that cannot merge
    with pytest.raises(BackendNotSupportedError, match="collapse to 3 strided dims"):
        geglu(x, backend="triton")
    with pytest.raises(BackendNotSupportedError, match="last dim of x must have stride 1"):
        geglu(_randn(5, 2 * 8 * 2)[:, ::2], backend="triton")
    with pytest.raises(BackendNotSupportedError, match="dtype torch.float64 not supported"):
        geglu(_randn(5, 2 * 8, dtype=torch.float64), backend="triton")


@pytest.mark.parametrize(
    "bad, match",
    [
        ([1.0, 2.0], "x must be a torch.Tensor"),
        (torch.tensor(1.0), "at least one dim"),
        (torch.ones(4, 6, dtype=torch.int32), "floating-point"),
        (torch.ones(0, 6), "x is empty"),
        (torch.ones(4, 7), "must be even"),
    ],
)
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        geglu(bad)
