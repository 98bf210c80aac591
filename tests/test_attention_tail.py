"""The attention kernels' tail blocks under the interpreter: lengths that no block size divides.

The forward (and dQ) loop runs every full key block without bounds checks and
masks only the last one; dK/dV does the same along queries. The interpreter's
blocks are 32x16 (forward) and 16x32 (backward), so Lq=33 / Lk=77 leave a tail
in both directions, and Lk=13 (shorter than one block) runs the tail block alone.
Every result is compared with a float64 reference: fp32 to ~1e-5 relative,
fp16/bf16 at most 2x SDPA's error in the same dtype.
"""

import pytest
import torch

from _utils import assert_fp32_close, assert_low_precision_ok, requires_triton
from fastdiff.ops.attention import attention, attention_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(b, h, lq, lk, d, dtype, mask_kind):
    q = torch.randn(b, h, lq, d, dtype=dtype)
    k = torch.randn(b, h, lk, d, dtype=dtype)
    v = torch.randn(b, h, lk, d, dtype=dtype)
    if mask_kind is None:
        mask = None
    elif mask_kind == "bool":  # a full (B, 1, Lq, Lk) mask that also masks keys in the tail block
        mask = torch.rand(b, 1, lq, lk) > 0.3
        mask[..., 0] = True
        mask[..., -1] = False
    else:  # additive (B, H, Lq, Lk) with -inf entries
        mask = torch.randn(b, h, lq, lk)
        mask[torch.rand_like(mask) < 0.2] = float("-inf")
        mask[..., 0] = 0.0
        mask = mask.to(dtype)
    return q, k, v, mask


def _reference(q, k, v, mask):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m64 = mask if mask is None or mask.dtype == torch.bool else mask.double()
    return q64, k64, v64, attention_ref(q64, k64, v64, m64)


@requires_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("lq,lk", [(33, 77), (33, 13)], ids=["lq33-lk77", "lq33-lk13"])
def test_tail_blocks_forward_and_backward(seed, lq, lk, mask_kind, dtype):
    b, h, d = 1, 2, 40
    q, k, v, mask = _inputs(b, h, lq, lk, d, dtype, mask_kind)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mask, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64, ref = _reference(q, k, v, mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    if dtype == torch.float32:
        assert_fp32_close(out, ref)
        for name, g, r in zip("qkv", grads, ref_grads):
            assert_fp32_close(g, r, what=f"d{name}")
        return
    sdpa = attention(q, k, v, mask, backend="sdpa")
    assert_low_precision_ok(out, sdpa, ref)
    sdpa_grads = torch.autograd.grad(sdpa, (q, k, v), dout)
    for name, g, s, r in zip("qkv", grads, sdpa_grads, ref_grads):
        assert_low_precision_ok(g, s, r, what=f"d{name}")
