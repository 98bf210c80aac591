"""fastdiff.ops.attention: Triton vs reference under the interpreter, dispatch, validation, custom ops.

Every comparison is against a float64 reference. fp32 results must match to
~1e-5 relative; bf16/fp16 results may be at most 2x as far from it as SDPA's
result in the same dtype (flash-attention's rule).
"""

import inspect
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from _utils import assert_fp32_close, assert_low_precision_ok, requires_triton
from fastdiff import backends
from fastdiff.ops.attention import attention, attention_ref

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _qkv(b, h, lq, lk, d, dtype, device="cpu", fused=False):
    """Random q, k, v. ``fused`` self-attention takes strided views out of one
    (B, L, 3, H, D) projection output, as fastdiff.nn.Attention.fuse_projections does."""
    if fused:
        assert lq == lk
        qkv = torch.randn(b, lq, 3, h, d, dtype=dtype, device=device)
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    return (
        torch.randn(b, h, lq, d, dtype=dtype, device=device),
        torch.randn(b, h, lk, d, dtype=dtype, device=device),
        torch.randn(b, h, lk, d, dtype=dtype, device=device),
    )


def _mask(kind, b, h, lq, lk, dtype, device="cpu"):
    """None, or a boolean/additive mask with a broadcast shape (never all-ones/zeros)."""
    if kind is None:
        return None
    if kind == "bool":  # (B, 1, Lq, Lk): broadcast over heads
        keep = torch.rand(b, 1, lq, lk, device=device) > 0.3
        keep[..., 0] = True
        return keep
    if kind == "bool-keys":  # (B, 1, 1, Lk): a key-padding mask
        keep = torch.rand(b, 1, 1, lk, device=device) > 0.4
        keep[..., 0] = True
        return keep
    if kind == "bool-1d":  # (Lk,): SDPA itself rejects a 1-D mask; the op views it as (1, 1, 1, Lk)
        keep = torch.rand(lk, device=device) > 0.4
        keep[0] = True
        return keep
    if kind == "additive":  # (H, 1, Lk): broadcast over batch and queries
        return torch.randn(h, 1, lk, device=device).to(dtype)
    if kind == "additive-full":  # (B, H, Lq, Lk) with -inf entries
        bias = torch.randn(b, h, lq, lk, device=device)
        bias[torch.rand_like(bias) < 0.2] = float("-inf")
        bias[..., 0] = 0.0
        return bias.to(dtype)
    raise AssertionError(kind)


def _double(mask):
    return mask if mask is None or mask.dtype == torch.bool else mask.double()


def _check(out, q, k, v, mask, scale=None, what="output"):
    ref = attention_ref(q.double(), k.double(), v.double(), _double(mask), scale)
    if q.dtype == torch.float32:
        assert_fp32_close(out, ref, what=what)
    else:
        baseline = attention(q, k, v, mask, scale=scale, backend="sdpa")
        assert_low_precision_ok(out, baseline, ref, what=what)


# (head dim, Lk, mask kind, fused q/k/v views)
FORWARD_CASES = [
    pytest.param(8, 77, "bool", False, id="d8-lk77-bool"),
    pytest.param(40, 77, None, False, id="d40-lk77"),
    pytest.param(40, 37, None, True, id="d40-fused-qkv"),
    pytest.param(72, 13, "additive", False, id="d72-lk13-additive-bcast"),
    pytest.param(160, 77, "bool-keys", False, id="d160-lk77-keypad"),
    pytest.param(72, 37, "additive-full", True, id="d72-fused-additive-inf"),
]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,lk,mask_kind,fused", FORWARD_CASES)
def test_triton_forward_matches_reference(seed, d, lk, mask_kind, fused, dtype):
    b, h, lq = 2, 3, 37
    q, k, v = _qkv(b, h, lq, lk, d, dtype, fused=fused)
    mask = _mask(mask_kind, b, h, lq, lk, dtype)
    with backends.trace_dispatch() as calls:
        out = attention(q, k, v, mask, backend="triton")
    assert calls == [("attention", "triton")]
    assert out.shape == (b, h, lq, d) and out.dtype == dtype
    # The output is a (B, Lq, H, D) buffer seen as (B, H, Lq, D): the module's
    # transpose(1, 2).reshape back to (B, Lq, H * D) needs no copy.
    assert out.transpose(1, 2).is_contiguous()
    _check(out, q, k, v, mask)


def _has_tma_descriptors():
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


requires_tma = pytest.mark.skipif(not _has_tma_descriptors(), reason="this Triton has no host-side tensor descriptors (TMA), needs >= 3.4")


@requires_triton
@requires_tma
@pytest.mark.parametrize(
    "d,lq,lk,mask_kind,fused,dtype",
    [
        pytest.param(8, 37, 77, "bool", False, torch.bfloat16, id="d8-lk77-bool-bf16"),
        pytest.param(40, 37, 37, "bool-keys", True, torch.float32, id="d40-fused-keypad-fp32"),
        pytest.param(160, 64, 64, "additive-full", False, torch.float32, id="d160-even-additive-fp32"),
    ],
)
def test_triton_tma_matches_reference(seed, d, lq, lk, mask_kind, fused, dtype):
    """The TMA forward (tensor descriptors; the interpreter emulates them) and the shared backward."""
    b, h = 2, 3
    q, k, v = (t.detach().requires_grad_() for t in _qkv(b, h, lq, lk, d, dtype, fused=fused))
    mask = _mask(mask_kind, b, h, lq, lk, dtype)
    with backends.trace_dispatch() as calls:
        out = attention(q, k, v, mask, backend="triton_tma")
    assert calls == [("attention", "triton_tma")]
    _check(out, q, k, v, mask)
    expected = attention(q, k, v, mask, backend="triton")
    # Same math in the same order as the pointer kernel. Under the interpreter the TMA kernel's
    # tl.trans(k) is a transposed numpy view, and BLAS rounds an fp32 product of a transposed view
    # differently from one of a contiguous tile, so fp32 agrees to rounding (measured up to 1.5e-6 on
    # values of order 1, outputs and gradients); bf16 rounds that away.
    same = torch.equal if dtype != torch.float32 else (lambda a, e: torch.allclose(a, e, rtol=1e-5, atol=1e-5))
    assert same(out, expected)
    dout = torch.randn_like(out)
    grads = zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(expected, (q, k, v), dout))
    assert all(same(a, e) for a, e in grads)


@requires_triton
@requires_tma
def test_triton_tma_declines_unaligned_views():
    base = torch.randn(2, 3, 37, 44)
    q = base[..., :40]  # rows 44 fp32 = 176 bytes apart: fine; now shift the start by one element
    k = base[..., 1:41]
    with pytest.raises(backends.BackendNotSupportedError, match="k is not TMA-compatible"):
        attention(q, k, k, backend="triton_tma")
    # The pointer kernel takes it, without the ALIGNED hint.
    _check(attention(q, k, k, backend="triton"), q, k, k, None)


@requires_triton
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_triton_block_multiple_lengths(seed, mask_kind):
    """Lq and Lk multiples of every interpreter block size: the EVEN_M/EVEN_N paths
    (no bounds checks) that the SD shapes take on a GPU, forward and backward."""
    b, h, lq, lk, d = 1, 3, 64, 64, 40
    q, k, v = (t.requires_grad_() for t in _qkv(b, h, lq, lk, d, torch.float32))
    mask = _mask(mask_kind, b, h, lq, lk, torch.float32)
    out = attention(q, k, v, mask, backend="triton")
    _check(out, q, k, v, mask)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(attention_ref(q64, k64, v64, _double(mask)), (q64, k64, v64), dout.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_fp32_close(g, r, what=f"d{name}")


@requires_triton
def test_triton_custom_scale_and_fp16(seed):
    q, k, v = _qkv(1, 3, 37, 13, 40, torch.float16)
    out = attention(q, k, v, scale=0.37, backend="triton")
    _check(out, q, k, v, None, scale=0.37)


# (head dim, Lk, mask kind, fused)
BACKWARD_CASES = [
    pytest.param(8, 13, "bool-1d", False, id="d8-lk13-bool-1d"),
    pytest.param(40, 77, "additive", False, id="d40-lk77-additive"),
    pytest.param(72, 37, None, True, id="d72-fused-qkv"),
    pytest.param(160, 13, "bool-keys", False, id="d160-lk13-keypad"),
]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d,lk,mask_kind,fused", BACKWARD_CASES)
def test_triton_gradients_match_reference(seed, d, lk, mask_kind, fused, dtype):
    b, h, lq = 2, 3, 37
    q, k, v = (t.detach().requires_grad_() for t in _qkv(b, h, lq, lk, d, dtype, fused=fused))
    mask = _mask(mask_kind, b, h, lq, lk, dtype)
    out = attention(q, k, v, mask, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(attention_ref(q64, k64, v64, _double(mask)), (q64, k64, v64), dout.double())
    if dtype == torch.float32:
        for name, g, r in zip("qkv", grads, ref_grads):
            assert_fp32_close(g, r, what=f"d{name}")
    else:
        sdpa_out = attention(q, k, v, mask, backend="sdpa")
        sdpa_grads = torch.autograd.grad(sdpa_out, (q, k, v), dout)
        for name, g, s, r in zip("qkv", grads, sdpa_grads, ref_grads):
            assert_low_precision_ok(g, s, r, what=f"d{name}")


@requires_triton
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_rows_give_zeros(seed, kind):
    """A query row with every key masked out gives zeros and zero gradients (SDPA's
    behaviour since torch 2.5; torch 2.4 gave NaN, so SDPA is compared on the other rows)."""
    b, h, lq, lk, d = 1, 3, 37, 13, 16
    q, k, v = (t.requires_grad_() for t in _qkv(b, h, lq, lk, d, torch.float32))
    keep = torch.rand(b, h, lq, lk) > 0.5
    keep[..., 0] = True
    keep[:, :, 5] = False  # query row 5 sees no key at all
    mask = keep if kind == "bool" else torch.where(keep, 0.0, float("-inf"))
    out = attention(q, k, v, mask, backend="triton")
    assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))
    rows = [i for i in range(lq) if i != 5]
    assert_fp32_close(out[:, :, rows], F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, :, rows])
    assert_fp32_close(out, attention_ref(q.double(), k.double(), v.double(), _double(mask)))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert torch.equal(dq[:, :, 5], torch.zeros_like(dq[:, :, 5]))


@requires_triton
def test_opcheck_custom_ops(seed):
    q, k, v = _qkv(1, 3, 37, 13, 40, torch.float32)
    mask = _mask("bool", 1, 3, 37, 13, torch.float32)
    fwd = torch.ops.fastdiff.attention_fwd_triton.default
    torch.library.opcheck(fwd, (q, k, v, mask, 0.25), test_utils=("test_schema", "test_faketensor"))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(fwd, (q, k, v, None, 0.25))  # every default check, aot_dispatch_dynamic included
    out, lse = fwd(q.detach(), k.detach(), v.detach(), mask, 0.25)
    if _has_tma_descriptors():
        tma = torch.ops.fastdiff.attention_fwd_triton_tma.default
        torch.library.opcheck(tma, (q, k, v, mask, 0.25), test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    bwd = torch.ops.fastdiff.attention_bwd_triton.default
    torch.library.opcheck(bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), mask, out, lse, 0.25), test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------
# Backends that run everywhere
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "bool-1d", "additive-full"])
def test_cpu_backends_match_fp64(seed, backend, mask_kind):
    q, k, v = _qkv(2, 3, 37, 77, 40, torch.float32)
    mask = _mask(mask_kind, 2, 3, 37, 77, torch.float32)
    _check(attention(q, k, v, mask, backend=backend), q, k, v, mask)


@pytest.mark.parametrize("backend", ["reference", "sdpa", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("d", [1, 5, 12, 20, 100])
def test_any_head_dim_forward_and_gradients(seed, backend, d):
    """Head dims that are not multiples of 8 (diffusers' tiny test configs use 2-7;
    real ones 12, 20, 100): every backend takes them; Triton pads to its tile."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 3, 19, 23, d, torch.float32))
    mask = _mask("bool-keys", 2, 3, 19, 23, torch.float32)
    with backends.trace_dispatch() as calls:
        out = attention(q, k, v, mask, backend=backend)
    assert calls == [("attention", backend)] and out.shape == (2, 3, 19, d)
    _check(out, q, k, v, mask)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(attention_ref(q64, k64, v64, mask), (q64, k64, v64), dout.double())
    for name, g, r in zip("qkv", grads, ref_grads):
        assert_fp32_close(g, r, what=f"d{name} at head dim {d}")


@requires_triton
@pytest.mark.parametrize("d,dtype", [(6, torch.float16), (12, torch.bfloat16)], ids=["d6-fp16", "d12-bf16"])
def test_triton_odd_head_dim_low_precision(seed, d, dtype):
    q, k, v = _qkv(2, 3, 37, 13, d, dtype)
    _check(attention(q, k, v, backend="triton"), q, k, v, None)


def test_triton_tma_declines_unaligned_head_dim_and_auto_falls_back(seed):
    """D=12 in fp16 gives 24-byte rows, which a TMA descriptor cannot address: the
    backend says so, a forced call raises with every backend's reasons, auto runs."""
    q, k, v = _qkv(1, 2, 9, 11, 12, torch.float16)
    reasons = backends.get_dispatcher("attention").reasons({"q": q, "k": k, "v": v, "attn_mask": None})
    if backends.triton_available():
        assert any("not TMA-compatible" in r for r in reasons["triton_tma"]) or any("tensor descriptors" in r for r in reasons["triton_tma"])
    with pytest.raises(backends.BackendNotSupportedError, match=r"(?s)backend 'triton_tma'.*cannot run.*reference: supported.*sdpa: supported.*triton_tma: "):
        attention(q, k, v, backend="triton_tma")
    with backends.trace_dispatch() as calls:
        out = attention(q.float(), k.float(), v.float())
    assert calls == [("attention", "sdpa")]
    _check(out, q.float(), k.float(), v.float(), None)


def test_head_dim_260_runs_on_sdpa(seed):
    q, k, v = _qkv(1, 1, 3, 5, 260, torch.float32)
    with backends.trace_dispatch() as calls:
        out = attention(q, k, v)
    assert calls == [("attention", "sdpa")]
    _check(out, q, k, v, None)
    assert "triton: head dim 260 > 256" in attention.explain(q, k, v)


def test_reference_upcasts_low_precision(seed):
    q, k, v = _qkv(1, 3, 37, 13, 8, torch.bfloat16)
    out = attention_ref(q, k, v)
    assert out.dtype == torch.bfloat16
    assert_low_precision_ok(out, F.scaled_dot_product_attention(q, k, v), attention_ref(q.double(), k.double(), v.double()))


def test_head_dim_chunks_pad_minimally():
    from fastdiff.kernels.attention import head_dim_chunks

    padded = {d: head_dim_chunks(d) for d in (8, 16, 40, 64, 72, 80, 112, 160, 256)}
    assert padded == {8: (16, 0), 16: (16, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 80: (64, 16), 112: (64, 64), 160: (128, 32), 256: (256, 0)}


def _tiles(configs):
    return sorted({(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in configs})


@pytest.mark.parametrize(
    "lq,bh,d,expected_rows",
    [
        (4096, 16, 40, {64, 128}),  # big tiles fill a wave: the 16/32-row ones go
        (256, 16, 160, {16, 64}),  # 160: no 32-row tiles (spills); 128-row ones leave most SMs idle
        (256, 16, 80, {16, 32, 64}),
        (64, 16, 160, {16, 64, 128}),  # nothing fills a wave: the tuner sees every fitting tile
    ],
)
def test_forward_config_pruning(monkeypatch, lq, bh, d, expected_rows):
    """The autotune pruner (not exercised by the interpreter, which has one config)."""
    from fastdiff.kernels import attention as kernels

    monkeypatch.setattr(kernels, "_sms_for", lambda t: 132)
    kept = kernels._prune_fwd_configs(kernels._gpu_fwd_configs(), {"Lse": None, "Lq": lq, "BH": bh}, HEAD_DIM=d)
    assert {bm for bm, _, _ in _tiles(kept)} == expected_rows
    if d == 160:
        assert all(bn <= 64 for _, bn, _ in _tiles(kept))


def test_backward_config_pruning():
    from fastdiff.kernels import attention as kernels

    for tiles, large in ((kernels._DKDV_TILES, kernels._DKDV_TILES_LARGE_D), (kernels._DQ_TILES, kernels._DQ_TILES_LARGE_D)):
        configs = kernels._bwd_configs(tiles, large, interpret=False)
        prune = kernels._bwd_pruner(tiles, large)
        assert _tiles(prune(configs, {}, HEAD_DIM=80)) == sorted(tiles)
        assert _tiles(prune(configs, {}, HEAD_DIM=160)) == sorted(large)


# ---------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------


def test_auto_on_cpu_is_sdpa(seed):
    q, k, v = _qkv(1, 3, 37, 13, 8, torch.float32)
    with backends.trace_dispatch() as calls:
        attention(q, k, v)
    assert calls == [("attention", "sdpa")]
    assert "auto order ['sdpa']" in attention.explain(q, k, v)


def test_use_backend_and_env_pick_reference(seed, monkeypatch):
    q, k, v = _qkv(1, 3, 37, 13, 8, torch.float32)
    with backends.trace_dispatch() as calls:
        with backends.use_backend(attention="reference"):
            attention(q, k, v)
        monkeypatch.setenv("FASTDIFF_BACKEND", "attention=reference")
        attention(q, k, v)
    assert calls == [("attention", "reference"), ("attention", "reference")]


def test_forced_triton_without_interpreter_lists_reasons(monkeypatch):
    q, k, v = _qkv(1, 3, 37, 13, 8, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends.clear_plans()  # plans do not cover the interpreter setting, fixed at import in real use
    with pytest.raises(backends.BackendNotSupportedError, match=r"triton.*needs CUDA tensors") as info:
        attention(q, k, v, backend="triton")
    assert "sdpa: supported" in str(info.value)


def test_head_dim_512_runs_on_sdpa_and_triton_declines(seed):
    """The SD VAE mid-block has one 512-wide head: auto takes it (sdpa), Triton says why not."""
    q, k, v = _qkv(1, 1, 37, 37, 512, torch.float32)
    with backends.trace_dispatch() as calls:
        out = attention(q, k, v)
    assert calls == [("attention", "sdpa")]
    _check(out, q, k, v, None)
    assert "triton: head dim 512 > 256" in attention.explain(q, k, v)


@requires_triton
def test_triton_declines_fp64_and_mask_with_grad():
    q, k, v = _qkv(1, 3, 37, 13, 8, torch.float64)
    with pytest.raises(backends.BackendNotSupportedError, match="float64 not supported"):
        attention(q, k, v, backend="triton")
    q, k, v = _qkv(1, 3, 37, 13, 8, torch.float32)
    bias = torch.randn(13, requires_grad=True)
    with pytest.raises(backends.BackendNotSupportedError, match="attn_mask requires grad"):
        attention(q, k, v, bias, backend="triton")


def test_unknown_backend_is_an_error():
    q, k, v = _qkv(1, 3, 37, 13, 8, torch.float32)
    with pytest.raises(backends.BackendNotSupportedError, match="unknown backend 'cuda'"):
        attention(q, k, v, backend="cuda")


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _good():
    return _qkv(2, 3, 5, 7, 16, torch.float32)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda q, k, v: (q[0], k, v, None), r"q must have shape \(B, H, L, D\)"),
        (lambda q, k, v: (q, k.unsqueeze(0), v, None), r"k must have shape \(B, H, L, D\)"),
        (lambda q, k, v: (q, k[:1], v[:1], None), "k has batch size B 1 but q has 2"),
        (lambda q, k, v: (q, k[:, :2], v, None), "k has head count H 2 but q has 3"),
        (lambda q, k, v: (q, k, v[..., :8], None), "v has head dim D 8 but q has 16"),
        (lambda q, k, v: (q, k, v[:, :, :6], None), "v has length 6 but k has 7"),
        (lambda q, k, v: (q, k.half(), v, None), "k dtype torch.float16 does not match"),
        (lambda q, k, v: (q.int(), k, v, None), "q must be fp16, bf16, fp32 or fp64"),
        (lambda q, k, v: (q, k, v, torch.ones(5, 6, dtype=torch.bool)), r"attn_mask of shape \(5, 6\) does not broadcast"),
        (lambda q, k, v: (q, k, v, torch.ones(2, 3, 5, 7, 1, dtype=torch.bool)), "does not broadcast"),
        (lambda q, k, v: (q, k, v, torch.zeros(5, 7, dtype=torch.float16)), "attn_mask must be bool or q's dtype"),
        (lambda q, k, v: (q, k, v, [[True]]), "attn_mask must be a torch.Tensor"),
        (lambda q, k, v: (q[:, :, :0], k, v, None), "q is empty"),
    ],
)
def test_bad_inputs_raise_value_error(mutate, match):
    args = mutate(*_good())
    with pytest.raises(ValueError, match=match):
        attention(*args)


def test_bad_scale_raises():
    q, k, v = _good()
    with pytest.raises(ValueError, match="scale must be a float or None"):
        attention(q, k, v, scale="0.5")


# ---------------------------------------------------------------------------
# Compilation for real GPUs (no GPU needed): catches what the interpreter cannot
# ---------------------------------------------------------------------------


_AOT_SCRIPT = """
import re
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdiff.kernels import attention as kernels

# Compile as Triton's JIT would specialise a launch on D=40 fp16 tensors: pointers
# 16-byte aligned, head-dim strides equal to 1 (constexpr), row strides such as
# 40 not divisible by 16; Lk=77 leaves a tail block.
capability = int(sys.argv[1])
d0, d1 = kernels.head_dim_chunks(40)
meta = dict(HEAD_DIM=40, D0=d0, D1=d1, EVEN_D0=True, EVEN_D1=False, MASK_KIND=1, MASK_KEYS_ONLY=False, PRECISION="tf32", UPCAST=False,
            ALIGNED=True, SPLIT_D=True, BLOCK_M=64, BLOCK_N=64, EVEN_M=True, EVEN_N=False)
pointers = dict(Q="*fp16", K="*fp16", V="*fp16", Mask="*u8", Out="*fp16", Lse="*fp32", DOut="*fp16", Delta="*fp32",
                DQ="*fp16", DK="*fp16", DV="*fp16")
for fn in (kernels._attn_fwd, kernels._attn_bwd_dkdv, kernels._attn_bwd_dq):
    # Each kernel takes the constexprs it declares (the forwards derive EVEN_D0/EVEN_D1 from D0/D1).
    constexprs = {name: value for name, value in meta.items() if name in fn.arg_names}
    constexprs.update({name: 1 for name in fn.arg_names if re.fullmatch(r"stride_\\w*d", name)})
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in ("qk_scale", "sm_scale") else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4, "num_stages": 3})
    mma = "wgmma" if "wgmma.mma_async" in compiled.asm["ptx"] else "mma"
    pipelined = "pipelined" if "async_copy_global_to_local" in compiled.asm["ttgir"] else "not-pipelined"
    print(fn.__name__, mma, pipelined)

try:
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    has_tma = True
except ImportError:
    has_tma = False
if capability >= 90 and has_tma:
    # The TMA forward: q/k/v arrive as tensor descriptors with the block shapes
    # _tma_block_shapes gives BLOCK_M=BLOCK_N=64 and chunks 32 + 16.
    fn = kernels._attn_fwd_tma
    blocks = dict(q_desc0=d0, q_desc1=d1, k_desc0=d0, k_desc1=d1, v_desc0=d0, v_desc1=d1)
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in meta or name == "stride_od":
            signature[name] = "constexpr"
        elif name in blocks:
            signature[name] = "tensordesc<fp16[1, 1, 64, %d]>" % blocks[name]
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "qk_scale" else "i32"
    constexprs = dict({name: value for name, value in meta.items() if name in fn.arg_names}, stride_od=1)
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4, "num_stages": 3})
    mma = "wgmma" if "wgmma.mma_async" in compiled.asm["ptx"] else "mma"
    tma = "tma" if "async_tma_copy_global_to_local" in compiled.asm["ttgir"] else "no-tma"
    print(fn.__name__, mma, tma)
"""


def _aot_supported():
    try:
        from triton.compiler import ASTSource
    except ImportError:
        return False
    return "constexprs" in inspect.signature(ASTSource.__init__).parameters


@pytest.mark.skipif(not _aot_supported(), reason="this Triton's ASTSource takes another signature format")
@pytest.mark.parametrize("capability", [80, 90])
def test_kernels_compile_for_gpus(capability):
    """Compile forward and backward to cubin for sm_80 and sm_90 (ptxas included) with a
    two-chunk head dim, a bool mask and a tail. Every kernel must pipeline its loads
    (cp.async), which needs the ALIGNED hint when D=40, and on sm_90 use wgmma; the
    TMA forward (sm_90, Triton >= 3.4) must load through TMA.
    Runs in a subprocess because the interpreter replaces the kernels in this one."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(capability)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    mma = "wgmma" if capability == 90 else "mma"
    expected = [f"{name} {mma} pipelined" for name in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")]
    if capability == 90 and _has_tma_descriptors():
        expected.append("_attn_fwd_tma wgmma tma")
    assert result.stdout.splitlines() == expected


# ---------------------------------------------------------------------------
# GPU: the shapes Stable Diffusion and SDXL run
# ---------------------------------------------------------------------------

SD_SHAPES = [
    # (B, H, Lq, Lk, D)
    (2, 8, 4096, 4096, 40),
    (2, 8, 1024, 1024, 80),
    (2, 8, 256, 256, 160),
    (2, 8, 64, 64, 160),
    (2, 8, 4096, 77, 40),
    (2, 8, 1024, 77, 80),
    (2, 10, 4096, 4096, 64),
    (2, 20, 1024, 1024, 64),
    (2, 20, 1024, 77, 64),
]


def _skip_unless_runs(backend, q, k, v, mask=None):
    """Skip (with the backend's own reasons) when e.g. triton_tma meets a pre-Hopper card."""
    reasons = backends.get_dispatcher("attention").backends[backend].not_supported_reasons({"q": q, "k": k, "v": v, "attn_mask": mask})
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


# Every shape in fp16, two in bf16: each new (head dim, dtype) costs an autotune
# of ~10 compiled configs, so the matrix is kept to what adds coverage.
GPU_SHAPE_CASES = [pytest.param(s, torch.float16, id="x".join(map(str, s)) + "-fp16") for s in SD_SHAPES] + [
    pytest.param(s, torch.bfloat16, id="x".join(map(str, s)) + "-bf16") for s in (SD_SHAPES[0], SD_SHAPES[6])
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_tma"])
@pytest.mark.parametrize("shape,dtype", GPU_SHAPE_CASES)
def test_gpu_sd_shapes(seed, shape, dtype, backend):
    b, h, lq, lk, d = shape
    q, k, v = _qkv(b, h, lq, lk, d, dtype, device="cuda")
    _skip_unless_runs(backend, q, k, v)
    out = attention(q, k, v, backend=backend)
    ref = attention_ref(q.float(), k.float(), v.float())
    assert_low_precision_ok(out, F.scaled_dot_product_attention(q, k, v), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_tma"])
@pytest.mark.parametrize(
    "dtype,mask_kind",
    [(torch.float16, "bool-keys"), (torch.bfloat16, "additive-full"), (torch.float32, "bool-keys")],
    ids=["fp16-keypad", "bf16-additive-full", "fp32-keypad"],
)
def test_gpu_gradients_with_mask(seed, dtype, mask_kind, backend):
    b, h, lq, lk, d = 2, 8, 1024, 77, 80
    q, k, v = (t.requires_grad_() for t in _qkv(b, h, lq, lk, d, dtype, device="cuda"))
    mask = _mask(mask_kind, b, h, lq, lk, dtype, device="cuda")
    _skip_unless_runs(backend, q, k, v, mask)
    out = attention(q, k, v, mask, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(attention_ref(q64, k64, v64, _double(mask)), (q64, k64, v64), dout.double())
    if dtype == torch.float32:
        for name, g, r in zip("qkv", grads, ref_grads):
            assert_fp32_close(g, r, what=f"d{name}")
        return
    sdpa_grads = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), dout)
    for name, g, s, r in zip("qkv", grads, sdpa_grads, ref_grads):
        assert_low_precision_ok(g, s, r, what=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "triton_tma"])
@pytest.mark.parametrize("d,dtype", [(4, torch.float32), (12, torch.float16), (20, torch.bfloat16), (24, torch.float16)], ids=["d4-fp32", "d12-fp16", "d20-bf16", "d24-fp16"])
def test_gpu_odd_head_dims(seed, d, dtype, backend):
    """Head dims below or between the tile widths: padded (triton) or, where a TMA
    descriptor cannot address the rows, declined with reasons (triton_tma)."""
    q, k, v = (t.requires_grad_() for t in _qkv(2, 4, 300, 77, d, dtype, device="cuda"))
    _skip_unless_runs(backend, q, k, v)
    out = attention(q, k, v, backend=backend)
    ref = attention_ref(q.double(), k.double(), v.double())
    if dtype == torch.float32:
        assert_fp32_close(out, ref)
    else:
        assert_low_precision_ok(out, F.scaled_dot_product_attention(q, k, v), ref)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(attention_ref(q64, k64, v64), (q64, k64, v64), dout.double())
    sdpa_grads = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v), dout)
    for name, g, s, r in zip("qkv", grads, sdpa_grads, ref_grads):
        if dtype == torch.float32:
            assert_fp32_close(g, r, what=f"d{name}")
        else:
            assert_low_precision_ok(g, s, r, what=f"d{name}")


@pytest.mark.gpu
def test_gpu_auto_picks_triton(seed):
    q, k, v = _qkv(2, 8, 256, 77, 40, torch.float16, device="cuda")
    with backends.trace_dispatch() as calls:
        attention(q, k, v)
    assert calls == [("attention", "triton")]
