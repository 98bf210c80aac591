"""Exact Welford counts in the GroupNorm merge, past 2^24 elements per group.

A VAE decoder GroupNorm at 2048x2048 holds 4 x 2^22 elements per group and more: an fp32
element count stops counting there (2^24 + 1 rounds to 2^24). The merge helpers keep
counts as int32. They are called directly through a tiny kernel with a handful of partials
that stand for huge chunks, so no large tensor is needed.
"""

import pytest
import torch
from _utils import requires_triton

pytestmark = requires_triton
triton = pytest.importorskip("triton")
tl = triton.language

from fastdiff.kernels.group_norm import _merge_partials, _welford_combine  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _merge_rows_kernel(PMEAN, PM2, MEAN, M2, CNT, total, S, chunk, n_chunks, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.arange(0, BLOCK_R)
    mean, m2, cnt = _merge_partials(PMEAN, PM2, rows * total, rows < BLOCK_R, total, S, chunk, n_chunks, BLOCK_R, BLOCK_P)
    tl.store(MEAN + rows, mean)
    tl.store(M2 + rows, m2)
    tl.store(CNT + rows, cnt)


@triton.jit
def _combine_pair_kernel(A, B, OUT_MEAN, OUT_M2, OUT_N):
    # A, B: (mean, M2, count) as three fp32 values and an int32 count each
    i = tl.arange(0, 2)
    mean, m2, n = _welford_combine(
        tl.load(A + 0 * i), tl.load(A + 1 + 0 * i), tl.load(A + 2 + 0 * i).to(tl.int32),
        tl.load(B + 0 * i), tl.load(B + 1 + 0 * i), tl.load(B + 2 + 0 * i).to(tl.int32),
    )
    tl.store(OUT_MEAN + i, mean)
    tl.store(OUT_M2 + i, m2)
    tl.store(OUT_N + i, n)


def test_merge_counts_exactly_past_2_to_the_24(seed):
    # Two rows (groups) of 2 channels x 6 chunks: chunks of 2^22 positions, the last one 3.
    chunk, n_chunks = 2**22, 6
    s = 5 * chunk + 3
    cpg = 2
    total = cpg * n_chunks
    pmean = torch.randn(2, total, dtype=torch.float64, device=DEVICE) + 4
    pm2 = torch.rand(2, total, dtype=torch.float64, device=DEVICE) * 1e6
    counts = torch.tensor([min(chunk, s - (p % n_chunks) * chunk) for p in range(total)], dtype=torch.float64, device=DEVICE)
    mean, m2 = torch.empty(2, device=DEVICE), torch.empty(2, device=DEVICE)
    cnt = torch.empty(2, dtype=torch.int32, device=DEVICE)
    _merge_rows_kernel[(1,)](pmean.float(), pm2.float(), mean, m2, cnt, total, s, chunk, n_chunks, BLOCK_R=2, BLOCK_P=4)
    assert cnt.tolist() == [cpg * s] * 2 == [41943046] * 2  # not a multiple of 4: fp32 cannot hold it
    want_mean = (counts * pmean.float().double()).sum(1) / counts.sum()
    want_m2 = (pm2.float().double() + counts * (pmean.float().double() - want_mean[:, None]) ** 2).sum(1)
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(m2.double(), want_m2, rtol=1e-5, atol=0)


def test_pairwise_merge_keeps_an_odd_count_past_2_to_the_24(seed):
    a = torch.tensor([1.5, 10.0, 2.0**24], device=DEVICE)
    b = torch.tensor([-2.0, 3.0, 1.0], device=DEVICE)
    mean, m2, n = torch.empty(2, device=DEVICE), torch.empty(2, device=DEVICE), torch.empty(2, dtype=torch.int32, device=DEVICE)
    _combine_pair_kernel[(1,)](a, b, mean, m2, n)
    assert n.tolist() == [2**24 + 1] * 2
    na, nb = 2.0**24, 1.0
    want_mean = 1.5 + (-2.0 - 1.5) * nb / (na + nb)
    want_m2 = 10.0 + 3.0 + 3.5**2 * na * nb / (na + nb)
    torch.testing.assert_close(mean.double(), torch.full((2,), want_mean, dtype=torch.float64, device=DEVICE), rtol=1e-7, atol=0)
    torch.testing.assert_close(m2.double(), torch.full((2,), want_m2, dtype=torch.float64, device=DEVICE), rtol=1e-6, atol=0)
