"""Triton GroupNorm(+SiLU) kernels (kernels/group_norm.py) against the reference twin.

On a machine without a GPU these run under TRITON_INTERPRET=1 (set by conftest),
so shapes are small and deliberately odd: C=6 with 3 groups, 7x9 spatial, batch
1 and 3, 1-D and 3-D spatial, NCHW, channels_last and non-contiguous views.
On a GPU machine the same tests run on CUDA tensors.

Every forward path runs on every layout: the single pass (the heuristic's
choice for these small shapes, asserted), and the split path forced through a
GroupNormConfig with the partial merge in its own kernel or fused into the
normalise kernel. The heuristic itself is tested on SD shapes separately.
Results are compared with a float64 oracle: fp32 to ~1e-5 relative, bf16 to at
most 2x the error of plain PyTorch in bf16 (under the interpreter, whose
fp32 -> bf16 cast truncates, of the fp32 result cast the same way).
"""

import pytest
import torch
from _utils import assert_fp32_close, assert_low_precision_ok, requires_triton

import fastdiff
from fastdiff import backends
from fastdiff.backends import BackendNotSupportedError
from fastdiff.ops.group_norm import group_norm_backward_ref, group_norm_ref, group_norm_stats_ref

pytestmark = requires_triton

G = 3
EPS = 1e-5
# The kernels' device: CUDA on a GPU machine, else the CPU through the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels():
    from fastdiff.kernels import group_norm as kernels

    return kernels


def _config(path):
    """Force a forward path. The split configs use tiny tiles and 3 chunks so
    that several programs, partial tiles and a short last chunk all occur;
    "split_fused" merges the partials in the normalise kernel (2 launches),
    "split" in the separate combine kernel (3 launches)."""
    kernels = _kernels()
    if path == "single":
        return None  # every test shape below is small enough for the heuristic's single pass
    return kernels.GroupNormConfig(single_pass=False, block_c=2, block_s=4, num_warps=1, split=3, fused_combine=path == "split_fused")


# Each layout builds x from fresh random numbers with a non-zero mean.
def _randn(*shape, dtype):
    return (torch.randn(*shape, device=DEVICE) * 3 + 0.5).to(dtype)


LAYOUTS = {
    "nchw_b1": lambda dt: _randn(1, 6, 7, 9, dtype=dt),
    "nhwc_b3": lambda dt: _randn(3, 6, 7, 9, dtype=dt).to(memory_format=torch.channels_last),
    "1d": lambda dt: _randn(3, 6, 11, dtype=dt),
    "3d_ncdhw": lambda dt: _randn(1, 6, 3, 4, 5, dtype=dt),
    "3d_channels_last": lambda dt: _randn(3, 6, 3, 4, 5, dtype=dt).to(memory_format=torch.channels_last_3d),
    "channel_slice": lambda dt: _randn(2, 8, 7, 9, dtype=dt)[:, 1:7],
    "channel_slice_nhwc": lambda dt: _randn(2, 8, 7, 9, dtype=dt).to(memory_format=torch.channels_last)[:, 2:8],
    "batch_stride": lambda dt: _randn(6, 6, 7, 9, dtype=dt)[::2],
    "step2_two_d": lambda dt: _randn(2, 6, 7, 9, dtype=dt)[..., ::2],  # odd last dim: needs 2 (size, stride) pairs
}


def _affine(c, dtype):
    return torch.randn(c, device=DEVICE).to(dtype), torch.randn(c, device=DEVICE).to(dtype)


def _activation(silu):
    return "silu" if silu else None


def _truncate_to_bf16(t):
    """fp32 -> bf16 rounding toward zero: the cast Triton's interpreter performs."""
    bits = t.float().contiguous().view(torch.int32) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16).reshape(t.shape)


def _bf16_baseline(plain_bf16, exact_fp32):
    """The low-precision baseline the kernel must stay within 2x of.

    On a GPU it is plain PyTorch in bf16. Triton's interpreter truncates
    fp32 -> bf16 casts instead of rounding to nearest (up to 1 ulp instead of
    0.5), so there the baseline is the fp32 result cast the same way.
    """
    if backends.triton_interpret_enabled() and not torch.cuda.is_available():
        return _truncate_to_bf16(exact_fp32)
    return plain_bf16


def _oracle(x, w, b, silu):
    return group_norm_ref(x.double(), G, w.double(), b.double(), EPS, _activation(silu))


def _check_forward(x, y, mean, rstd, w, b, silu):
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.stride() == torch.empty_like(x).stride(), "output must keep x's memory format"
    mean_ref, rstd_ref = group_norm_stats_ref(x, G, EPS)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (x.shape[0], G)
    assert_fp32_close(mean, mean_ref, what="mean")
    assert_fp32_close(rstd, rstd_ref, what="rstd")
    oracle = _oracle(x, w, b, silu)
    if x.dtype == torch.float32:
        assert_fp32_close(y, oracle)
        assert_fp32_close(y, group_norm_ref(x, G, w, b, EPS, _activation(silu)), what="output vs upcast reference")
    else:
        plain = group_norm_ref(x, G, w, b, EPS, _activation(silu), upcast=False)
        baseline = _bf16_baseline(plain, group_norm_ref(x.float(), G, w.float(), b.float(), EPS, _activation(silu)))
        assert_low_precision_ok(y, baseline, oracle)


# --- forward -----------------------------------------------------------------


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("path", ["single", "split", "split_fused"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_fp32(seed, layout, path, silu):
    kernels = _kernels()
    x = LAYOUTS[layout](torch.float32)
    w, b = _affine(x.shape[1], x.dtype)
    config = _config(path)
    if path == "single":
        chosen = kernels.launch_config(x.shape[0], x.shape[1], x[0, 0].numel(), G, x.stride(1) == 1, kernels.INTERPRET_NUM_SMS)
        assert chosen.single_pass, "these shapes are meant to take the single-pass path"
    y, mean, rstd = kernels.group_norm_forward(x, w, b, G, EPS, silu, config)
    _check_forward(x, y, mean, rstd, w, b, silu)


@pytest.mark.parametrize("path", ["single", "split", "split_fused"])
@pytest.mark.parametrize("layout", ["nchw_b1", "nhwc_b3", "step2_two_d", "3d_channels_last"])
def test_forward_bf16(seed, layout, path):
    kernels = _kernels()
    x = LAYOUTS[layout](torch.bfloat16)
    w, b = _affine(x.shape[1], x.dtype)
    y, mean, rstd = kernels.group_norm_forward(x, w, b, G, EPS, True, _config(path))
    _check_forward(x, y, mean, rstd, w, b, True)


@pytest.mark.parametrize("fused_combine", [False, True])
def test_forward_statistics_survive_a_large_offset(seed, fused_combine):
    # sum / sum-of-squares in fp32 loses the variance entirely at this offset
    # (E[x^2] ~ 1e6, fp32 spacing 0.06); Chan merging of tile partials does not.
    kernels = _kernels()
    x = torch.randn(2, 6, 20, 25, device=DEVICE) + 1000.0
    w, b = _affine(6, x.dtype)
    config = kernels.GroupNormConfig(single_pass=False, block_c=2, block_s=32, num_warps=1, split=5, fused_combine=fused_combine)
    _, mean, rstd = kernels.group_norm_forward(x, w, b, G, EPS, False, config)
    xg = x.double().reshape(2, G, -1)
    assert_fp32_close(mean, xg.mean(-1), what="mean")
    rstd_ref = 1 / torch.sqrt(xg.var(-1, unbiased=False) + EPS)
    assert ((rstd.double() - rstd_ref).abs() / rstd_ref).max() < 1e-4


@pytest.mark.parametrize("fused_combine", [False, True])
def test_forward_merges_many_partials(seed, fused_combine):
    # 150 chunks x 4 channels = 600 partials per group: several merge steps
    # of 256 in both the combine kernel and the fused path.
    # A trend along s gives every chunk a different mean, so the merge matters.
    kernels = _kernels()
    x = torch.randn(1, 4, 600, device=DEVICE) + torch.linspace(-15, 25, 600, device=DEVICE)
    w, b = _affine(4, x.dtype)
    config = kernels.GroupNormConfig(single_pass=False, block_c=4, block_s=4, num_warps=1, split=150, fused_combine=fused_combine)
    assert kernels._chunking(600, config)[1] == 150
    y, mean, rstd = kernels.group_norm_forward(x, w, b, 1, EPS, True, config)
    mean_ref, rstd_ref = group_norm_stats_ref(x.double(), 1, EPS)
    assert_fp32_close(mean, mean_ref, what="mean")
    assert_fp32_close(rstd, rstd_ref, what="rstd")
    assert_fp32_close(y, group_norm_ref(x.double(), 1, w.double(), b.double(), EPS, "silu"))


@pytest.mark.parametrize("layout", ["nchw_b1", "nhwc_b3", "1d", "3d_channels_last", "channel_slice", "step2_two_d"])
def test_op_forced_triton_matches_reference(seed, layout):
    x = LAYOUTS[layout](torch.float32)
    w, b = _affine(x.shape[1], x.dtype)
    with fastdiff.trace_dispatch() as calls:
        y = fastdiff.ops.group_norm(x, G, w, b, EPS, "silu", backend="triton")
    assert calls == [("group_norm", "triton")]
    assert y.stride() == torch.empty_like(x).stride()
    assert_fp32_close(y, _oracle(x, w, b, True))


def test_op_without_affine(seed):
    x = LAYOUTS["nhwc_b3"](torch.float32)
    y = fastdiff.ops.group_norm(x, G, backend="triton")
    assert_fp32_close(y, group_norm_ref(x.double(), G, eps=EPS))


# --- launch heuristic ----------------------------------------------------------


def _programs(kernels, config, n, c, s):
    if config.single_pass:
        return None
    _, n_chunks = kernels._chunking(s, config)
    return n * n_chunks * -(-c // config.block_c)


# Stable Diffusion 1.5 / SDXL UNet and VAE-decoder GroupNorm shapes at batch 2 (CFG).
SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 320, 128, 128), (2, 640, 64, 64), (2, 1280, 32, 32), (2, 512, 128, 128), (2, 256, 512, 512), (2, 128, 1024, 1024)]


@pytest.mark.parametrize("channels_contiguous", [False, True])
@pytest.mark.parametrize("shape", SD_SHAPES)
def test_heuristic_fills_an_h100_on_sd_shapes(shape, channels_contiguous):
    kernels = _kernels()
    n, c, h, w = shape
    config = kernels.launch_config(n, c, h * w, 32, channels_contiguous, num_sms=132)
    assert not config.single_pass
    for v in (config.block_c, config.block_s):
        assert v & (v - 1) == 0
    assert config.block_c * config.block_s <= kernels.LARGE_TILE_ELEMS
    programs = _programs(kernels, config, n, c, h * w)
    assert programs >= 2 * 132, f"{shape}: {programs} programs is under two waves of 132 SMs"
    _, n_chunks = kernels._chunking(h * w, config)
    partial_loads = config.block_c * (c // 32) * n_chunks
    assert config.fused_combine == (partial_loads <= kernels.FUSED_COMBINE_MAX_PARTIALS)
    if not channels_contiguous:
        assert config.fused_combine, "NCHW SD shapes should need only 2 launches"
    if channels_contiguous:
        assert config.block_c >= 32, "NHWC tiles must be wide along the contiguous channel axis"
    else:
        assert config.block_s >= 256, "NCHW tiles must be wide along the contiguous spatial axis"


def test_heuristic_single_pass_when_a_group_fits():
    kernels = _kernels()
    config = kernels.launch_config(2, 1280, 8 * 8, 32, False, num_sms=132)  # 40 channels x 64 positions
    assert config.single_pass and config.block_c >= 40 and config.block_s >= 64
    assert config.block_c * config.block_s <= kernels.SINGLE_PASS_MAX_ELEMS
    backward = kernels.launch_config(2, 1280, 8 * 8, 32, False, num_sms=132, allow_single_pass=False)
    assert not backward.single_pass and backward.block_c * backward.block_s <= kernels.SPLIT_TILE_ELEMS


def test_heuristic_knobs():
    # The benchmark's --sweep varies these; each must move the launch the documented way.
    kernels = _kernels()
    args = (2, 320, 64 * 64, 32, False, 132)
    default = kernels.launch_config(*args)
    assert (default.block_c * default.block_s, default.num_warps) == (kernels.SPLIT_TILE_ELEMS, kernels.SPLIT_NUM_WARPS)
    more = kernels.launch_config(*args, programs_per_sm=2 * kernels.PROGRAMS_PER_SM)
    assert _programs(kernels, more, 2, 320, 64 * 64) == 2 * _programs(kernels, default, 2, 320, 64 * 64)
    big = kernels.launch_config(*args, tile_elems=4096, num_warps=8)
    assert big.block_c * big.block_s == 4096 and big.num_warps == 8


def test_heuristic_split_runs_unforced(seed):
    # Under the interpreter the heuristic assumes INTERPRET_NUM_SMS; a group of
    # 2 x 2250 elements does not fit a single-pass tile, so it splits on its own.
    kernels = _kernels()
    x = torch.randn(1, 4, 50, 45, device=DEVICE)
    config = kernels.launch_config(1, 4, 50 * 45, 2, False, kernels.INTERPRET_NUM_SMS)
    assert not config.single_pass and _programs(kernels, config, 1, 4, 50 * 45) > 2
    w, b = _affine(4, x.dtype)
    y, mean, rstd = kernels.group_norm_forward(x, w, b, 2, EPS, True)
    assert_fp32_close(y, group_norm_ref(x.double(), 2, w.double(), b.double(), EPS, "silu"))


def test_bad_config_raises():
    kernels = _kernels()
    x = LAYOUTS["nchw_b1"](torch.float32)
    w, b = _affine(6, x.dtype)
    with pytest.raises(ValueError, match="single_pass needs block_c >= 2 and block_s >= 63"):
        kernels.group_norm_forward(x, w, b, G, EPS, False, kernels.GroupNormConfig(True, 2, 32, 1))
    with pytest.raises(ValueError, match="block_s must be a power of two"):
        kernels.group_norm_forward(x, w, b, G, EPS, False, kernels.GroupNormConfig(False, 2, 6, 1, 2))


# --- layouts ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_read_in_place(layout):
    assert _kernels().layout_reasons(LAYOUTS[layout](torch.float32), G) == []


def test_layout_needing_three_strides_is_refused(seed):
    kernels = _kernels()
    x = torch.randn(1, 6, 5, 6, 9, device=DEVICE)[:, :, ::2, ::2, ::2]  # no two adjacent spatial dims merge
    reasons = kernels.layout_reasons(x, G)
    assert len(reasons) == 1 and "3 (size, stride) pairs" in reasons[0]
    with pytest.raises(BackendNotSupportedError, match="triton: .*collapse to 3"):
        fastdiff.ops.group_norm(x, G, backend="triton")
    w, b = _affine(6, x.dtype)
    with pytest.raises(ValueError, match="collapse to 3"):
        kernels.group_norm_forward(x, w, b, G, EPS, False)


def test_bad_direct_arguments_raise(seed):
    kernels = _kernels()
    x = LAYOUTS["nchw_b1"](torch.float32)
    w, b = _affine(6, x.dtype)
    with pytest.raises(ValueError, match="x dtype must be fp32, fp16 or bf16"):
        kernels.group_norm_forward(x.double(), w.double(), b.double(), G, EPS, False)
    with pytest.raises(ValueError, match=r"weight must be a \(6,\) torch.float32"):
        kernels.group_norm_forward(x, w[:5], b, G, EPS, False)
    with pytest.raises(ValueError, match=r"num_groups \(4\) must divide"):
        kernels.group_norm_forward(x, w, b, 4, EPS, False)
    y, mean, rstd = kernels.group_norm_forward(x, w, b, G, EPS, False)
    with pytest.raises(ValueError, match="dy must match x"):
        kernels.group_norm_backward(y[:, :, :3], x, w, b, mean, rstd, G, False)
    with pytest.raises(ValueError, match=r"rstd must be fp32 of shape \(1, 3\)"):
        kernels.group_norm_backward(y, x, w, b, mean, rstd.double(), G, False)


# --- backward ----------------------------------------------------------------


def _backward_oracle(dy, x, w, b, silu):
    mean, rstd = group_norm_stats_ref(x.double(), G, EPS)
    return group_norm_backward_ref(dy.double(), x.double(), w.double(), b.double(), mean, rstd, G, _activation(silu))


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("layout", ["nchw_b1", "nhwc_b3", "1d", "3d_channels_last", "channel_slice", "step2_two_d"])
def test_backward_fp32(seed, layout, path, silu):
    kernels = _kernels()
    x = LAYOUTS[layout](torch.float32)
    w, b = _affine(x.shape[1], x.dtype)
    config = _config(path)
    y, mean, rstd = kernels.group_norm_forward(x, w, b, G, EPS, silu, config)
    dy = torch.randn_like(y)
    dx, dw, db, dib = kernels.group_norm_backward(dy, x, w, b, mean, rstd, G, silu, config)
    assert dib is None
    assert dx.stride() == torch.empty_like(x).stride() and dw.dtype == dx.dtype == db.dtype == torch.float32
    for got, want, name in zip((dx, dw, db), _backward_oracle(dy, x, w, b, silu), ("dx", "dw", "db")):
        assert_fp32_close(got, want, what=name)


@pytest.mark.parametrize(
    "layout, make_dy",
    [
        ("nchw_b1", lambda x: torch.randn(x.shape[0], x.shape[1], x.shape[3], x.shape[2], device=x.device).transpose(2, 3)),
        ("nchw_b1", lambda x: torch.randn_like(x).to(memory_format=torch.channels_last)),
        ("nhwc_b3", lambda x: torch.randn(x.shape[1], 1, 1, device=x.device).expand_as(x)),
        # strides that do not collapse to 2 pairs together with x's: dy is copied into x's layout first
        ("3d_ncdhw", lambda x: torch.randn(x.shape[0], x.shape[1], *x.shape[:1:-1], device=x.device).permute(0, 1, 4, 3, 2)),
    ],
    ids=["transposed", "channels_last", "expanded", "permuted_3d"],
)
def test_backward_with_strided_dy(seed, layout, make_dy):
    kernels = _kernels()
    x = LAYOUTS[layout](torch.float32)
    w, b = _affine(6, x.dtype)
    y, mean, rstd = kernels.group_norm_forward(x, w, b, G, EPS, True)
    dy = make_dy(x)
    assert dy.shape == x.shape and not dy.is_contiguous()
    dx, dw, db, _ = kernels.group_norm_backward(dy, x, w, b, mean, rstd, G, True, _config("split"))
    for got, want, name in zip((dx, dw, db), _backward_oracle(dy, x, w, b, True), ("dx", "dw", "db")):
        assert_fp32_close(got, want, what=name)


@pytest.mark.parametrize("layout", ["nchw_b1", "nhwc_b3"])
def test_backward_bf16(seed, layout):
    kernels = _kernels()
    x = LAYOUTS[layout](torch.bfloat16)
    w, b = _affine(6, x.dtype)
    y, mean, rstd = kernels.group_norm_forward(x, w, b, G, EPS, True)
    dy = torch.randn_like(y)
    got = kernels.group_norm_backward(dy, x, w, b, mean, rstd, G, True, _config("split"))[:3]
    # Plain PyTorch autograd in bf16 is the baseline; the fp64 closed form is the oracle.
    xb, wb, bb = (t.clone().requires_grad_() for t in (x, w, b))
    baseline = torch.autograd.grad(group_norm_ref(xb, G, wb, bb, EPS, "silu", upcast=False), (xb, wb, bb), dy)
    mean32, rstd32 = group_norm_stats_ref(x, G, EPS)
    exact32 = group_norm_backward_ref(dy.float(), x.float(), w.float(), b.float(), mean32, rstd32, G, "silu")
    baseline = [_bf16_baseline(plain, exact) for plain, exact in zip(baseline, exact32)]
    for g, base, want, name in zip(got, baseline, _backward_oracle(dy, x, w, b, True), ("dx", "dw", "db")):
        assert g.dtype == torch.bfloat16
        assert_low_precision_ok(g, base, want, what=name)


@pytest.mark.parametrize("layout", ["nchw_b1", "nhwc_b3", "step2_two_d"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_op_autograd_matches_torch_autograd(seed, layout, activation):
    x = LAYOUTS[layout](torch.float32)
    w, b = _affine(x.shape[1], x.dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fastdiff.ops.group_norm(*leaves[:1], G, *leaves[1:], EPS, activation, backend="triton")
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad(group_norm_ref(ref_leaves[0], G, *ref_leaves[1:], EPS, activation), ref_leaves, dy)
    for g, r, name in zip(got, want, ("dx", "dw", "db")):
        assert_fp32_close(g, r, what=name)


# --- custom ops and dispatch ------------------------------------------------------------


def test_opcheck_forward_op(seed):
    x = LAYOUTS["nhwc_b3"](torch.float32).requires_grad_()
    w, b = (t.requires_grad_() for t in _affine(6, x.dtype))
    torch.library.opcheck(torch.ops.fastdiff.group_norm_fwd_triton.default, (x, w, b, None, G, EPS, "silu"))


def test_opcheck_backward_op(seed):
    x = LAYOUTS["step2_two_d"](torch.float32)
    w, b = _affine(6, x.dtype)
    _, mean, rstd = torch.ops.fastdiff.group_norm_fwd_triton(x, w, b, None, G, EPS, "silu")
    dy = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_bwd_triton.default, (dy, x, w, b, None, mean, rstd, G, "silu"))


def test_use_backend_dispatches_to_triton(seed):
    x = LAYOUTS["nchw_b1"](torch.float32)
    with fastdiff.use_backend("triton"), fastdiff.trace_dispatch() as calls:
        y = fastdiff.ops.group_norm(x, G, activation="silu")
    assert calls == [("group_norm", "triton")]
    assert_fp32_close(y, group_norm_ref(x.double(), G, eps=EPS, activation="silu"))


def test_env_var_dispatches_to_triton(seed, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
    x = LAYOUTS["1d"](torch.float32)
    with fastdiff.trace_dispatch() as calls:
        fastdiff.ops.group_norm(x, G)
    assert calls == [("group_norm", "triton")]
