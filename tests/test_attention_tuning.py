"""The attention kernels' autotuning on the CPU: config lists, pruning, the head-dim
split as a config choice, and the refusal to tune inside a CUDA graph capture.

Triton's autotuner calls a kernel's ``early_config_prune`` only for a key it has
not tuned yet (``Autotuner.run``: ``if key not in self.cache: ... prune_configs``),
so the pruners are where a tune is refused during a capture; a tuned key never
reaches them. The interpreter has one config per kernel (no tuning), so these
tests drive the pruners directly, or give the autotuner two configs and record
what it does.
"""

import pytest
import torch
import triton

from _utils import assert_fp32_close, requires_triton
from fastdiff.ops.attention import attention, attention_ref


def _kernels():
    from fastdiff.kernels import attention as kernels

    return kernels


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}


def _prune(monkeypatch, capability, head_dim=64, mask_kind=0, keys_only=False, sms=None, lq=4096, bh=16):
    kernels = _kernels()
    monkeypatch.setattr(kernels, "_capability_for", lambda t: capability)
    monkeypatch.setattr(kernels, "_sms_for", lambda t: sms)
    args = {"Lse": None, "Lq": lq, "Lk": lq, "BH": bh}
    return kernels._prune_fwd_configs(
        kernels._gpu_fwd_configs(), args, HEAD_DIM=head_dim, MASK_KIND=mask_kind, MASK_KEYS_ONLY=keys_only
    )


def test_forward_key_covers_what_the_pruner_reads():
    kernels = _kernels()
    for tuner in (kernels._attn_fwd_tuned, kernels._attn_fwd_tma_tuned):
        assert {"BH", "Lq", "Lk", "HEAD_DIM", "MASK_KIND", "MASK_KEYS_ONLY"} <= set(tuner.keys)
    for tuner in (kernels._attn_bwd_dkdv_tuned, kernels._attn_bwd_dq_tuned):
        assert {"Lq", "Lk", "HEAD_DIM", "MASK_KIND"} <= set(tuner.keys)


def test_hopper_list_is_the_full_product(monkeypatch):
    kept = {t for t in _tiles(_prune(monkeypatch, (9, 0))) if t[0] >= 64}
    expected = {
        (bm, bn, w, s)
        for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)
        if not (bm == 128 and bn == 128 and w == 4)
    }
    assert kept == expected
    assert (128, 64, 4, 4) in kept  # 4 warps at 128x64


def test_ampere_list_keeps_two_or_three_stages(monkeypatch):
    kept = _tiles(_prune(monkeypatch, (8, 0)))
    assert kept and all(s in (2, 3) for _, _, _, s in kept)
    assert all(w == (8 if bm == 128 else 4) for bm, _, w, _ in kept)
    assert {bm for bm, _, _, _ in kept} == {16, 32, 64, 128}


@pytest.mark.parametrize("head_dim,tunable", [(40, True), (48, True), (64, False), (80, False), (160, False), (8, False)])
def test_head_dim_split_is_a_config_choice_where_it_exists(monkeypatch, head_dim, tunable):
    kept = _prune(monkeypatch, (9, 0), head_dim=head_dim)
    splits = {c.kwargs["SPLIT_D"] for c in kept}
    assert splits == ({True, False} if tunable else {True})
    kernels = _kernels()
    if tunable:
        assert kernels.head_dim_chunks(head_dim) == (32, 16)
        assert kernels.head_dim_chunks(head_dim, split=False) == (64, 0)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_masked_calls_keep_the_tiles_that_do_not_spill(monkeypatch, capability):
    """Issue 8's findings: masked calls take 64-key steps; full masks also at most 64 rows;
    D=160 never gets 128 rows on 4 warps, 32-row tiles or 128-key steps."""
    for head_dim in (40, 64, 80, 160):
        keypad = _prune(monkeypatch, capability, head_dim=head_dim, mask_kind=1, keys_only=True)
        full = _prune(monkeypatch, capability, head_dim=head_dim, mask_kind=1, keys_only=False)
        assert keypad and all(c.kwargs["BLOCK_N"] <= 64 for c in keypad)
        assert full and all(c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_M"] <= 64 for c in full)
    wide = _prune(monkeypatch, capability, head_dim=160)
    assert all(c.kwargs["BLOCK_N"] <= 64 and c.kwargs["BLOCK_M"] != 32 for c in wide)
    assert not any(c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4 for c in wide)


def test_device_is_read_from_the_description(monkeypatch):
    """_sms_for / _smem_limit_for / _capability_for ask fastdiff.backends, not torch.cuda,
    so a fake CUDA tensor under use_target("sm_80") reads as an A100."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastdiff import backends

    kernels = _kernels()
    with FakeTensorMode():
        lse = torch.empty(2, 8, 64, device="cuda")
    with backends.use_target("sm_80"):
        assert (kernels._sms_for(lse), kernels._smem_limit_for(lse), kernels._capability_for(lse)) == (108, 166912, (8, 0))
    with backends.use_target("sm_90"):
        assert (kernels._sms_for(lse), kernels._smem_limit_for(lse), kernels._capability_for(lse)) == (132, 232448, (9, 0))
    with backends.use_target("sm_89"):
        assert kernels._smem_limit_for(lse) == 101376
    assert kernels._sms_for(torch.empty(3)) is None and kernels._capability_for(torch.empty(3)) is None
    # A stand-in device known only by its shared memory (fastdiff.tools.aot_check) is classified by it.
    monkeypatch.setattr(kernels, "_smem_limit_for", lambda t: 166912)
    assert kernels._capability_for(torch.empty(3)) == (8, 0)
    monkeypatch.setattr(kernels, "_smem_limit_for", lambda t: 232448)
    assert kernels._capability_for(torch.empty(3)) == (9, 0)


@requires_triton
def test_unsplit_head_dim_matches_reference(seed, monkeypatch):
    """SPLIT_D=False (D=40 padded to one 64-wide chunk) computes the same attention."""
    kernels = _kernels()
    config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "SPLIT_D": False}, num_warps=4, num_stages=1)
    monkeypatch.setattr(kernels._attn_fwd_tuned, "configs", [config])
    q, k, v = torch.randn(1, 2, 33, 40), torch.randn(1, 2, 77, 40), torch.randn(1, 2, 77, 40)
    mask = torch.rand(1, 1, 33, 77) > 0.3
    mask[..., 0] = True
    with torch.no_grad():
        out = attention(q, k, v, mask, backend="triton")
    assert kernels._attn_fwd_tuned.best_config is config
    assert_fp32_close(out, attention_ref(q.double(), k.double(), v.double(), mask))


# ---------------------------------------------------------------------------
# No tuning inside a CUDA graph capture
# ---------------------------------------------------------------------------


def test_pruners_refuse_during_capture(monkeypatch):
    from fastdiff.kernels import _tuning

    kernels = _kernels()
    monkeypatch.setattr(_tuning, "capturing", lambda: True)
    args = {"Lse": None, "Lq": 4096, "Lk": 77, "BH": 16}
    with pytest.raises(_tuning.TuningDuringCaptureError, match=r"attention forward: autotuning for \(16, 4096, 77, 40"):
        kernels._prune_fwd_configs(kernels._gpu_fwd_configs(), args, HEAD_DIM=40, MASK_KIND=0, MASK_KEYS_ONLY=False)
    for tuner, name in ((kernels._attn_bwd_dkdv_tuned, "dK/dV"), (kernels._attn_bwd_dq_tuned, "dQ")):
        with pytest.raises(_tuning.TuningDuringCaptureError, match=f"attention backward {name}"):
            tuner.early_config_prune(tuner.configs, {"Lq": 64, "Lk": 77}, HEAD_DIM=80, MASK_KIND=0, MASK_KEYS_ONLY=False)
    monkeypatch.setattr(_tuning, "capturing", lambda: False)
    assert kernels._prune_fwd_configs(kernels._gpu_fwd_configs(), args, HEAD_DIM=40, MASK_KIND=0, MASK_KEYS_ONLY=False)


@requires_triton
def test_tuned_key_never_reaches_the_pruner(seed, monkeypatch):
    """With two configs the autotuner calls the pruner for a new key (here it keeps one, so
    nothing is benchmarked), caches the choice, and skips the pruner for that key from then
    on: a capture after one eager call per shape runs; a new shape inside it raises."""
    from fastdiff.kernels import _tuning

    kernels = _kernels()
    tuner = kernels._attn_fwd_tuned
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 16, "SPLIT_D": True}, num_warps=4, num_stages=1) for bm in (32, 16)]
    pruned_keys = []

    def prune(configs, named_args, **kwargs):
        kept = kernels._prune_fwd_configs(configs, named_args, **kwargs)  # refuses during a capture
        pruned_keys.append(kernels._fwd_tuning_key({**named_args, **kwargs}))
        return kept[:1]

    monkeypatch.setattr(tuner, "configs", configs)
    monkeypatch.setattr(tuner, "early_config_prune", prune)
    monkeypatch.setattr(tuner, "cache", {})
    q, k, v = torch.randn(1, 2, 19, 16), torch.randn(1, 2, 13, 16), torch.randn(1, 2, 13, 16)
    with torch.no_grad():
        eager = attention(q, k, v, backend="triton")
        assert len(pruned_keys) == 1 and pruned_keys[0] in tuner.cache  # our key is Triton's key
        monkeypatch.setattr(_tuning, "capturing", lambda: True)
        again = attention(q, k, v, backend="triton")
        assert torch.equal(again, eager) and len(pruned_keys) == 1
        with pytest.raises(_tuning.TuningDuringCaptureError, match="fastdiff.warmup"):
            attention(q[:, :, :7], k, v, backend="triton")


# Shared memory that ptxas reported for forward configs (fastdiff.tools.aot_check, Triton 3.9):
# (arch, dtype, head dim, mask kind, BLOCK_M, BLOCK_N, stages, bytes).
MEASURED_SMEM = [
    (80, torch.float32, 160, 0, 64, 64, 3, 221440),  # over sm_80's 166912
    (80, torch.float32, 160, 0, 128, 64, 2, 197120),  # over
    (90, torch.float32, 40, 0, 128, 128, 4, 238080),  # over sm_90's 232448
    (90, torch.float16, 160, 0, 128, 64, 4, 204800),  # fits
    (90, torch.float16, 160, 1, 64, 64, 4, 196608),  # fits (full bool mask)
    (90, torch.float16, 40, 0, 64, 128, 4, 104448),  # fits
]


@pytest.mark.parametrize("arch,dtype,head_dim,mask_kind,bm,bn,stages,measured", MEASURED_SMEM)
def test_shared_memory_estimate_covers_ptxas(arch, dtype, head_dim, mask_kind, bm, bn, stages, measured):
    """The pruner's estimate is never below what ptxas needs, and prunes exactly the configs over the limit."""
    kernels = _kernels()
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_D": True}, num_warps=8, num_stages=stages)
    args = {"HEAD_DIM": head_dim, "Out": torch.empty(1, dtype=dtype), "Mask": torch.empty(1, dtype=torch.uint8),
            "MASK_KIND": mask_kind, "MASK_KEYS_ONLY": False}
    estimate = kernels._fwd_smem_estimate(config, args, (arch // 10, 0))
    limit = {80: 166912, 90: 232448}[arch]
    assert estimate >= measured
    assert (estimate > limit) == (measured > limit)


# ---------------------------------------------------------------------------
# The backward pruner: shared memory and the tiles that spill on sm_80
# ---------------------------------------------------------------------------

_A100, _H100 = 166912, 232448  # shared memory per block (opt-in) of sm_80 / sm_90


def _prune_bwd(monkeypatch, kind, smem, head_dim, dtype=torch.float16, mask_kind=0, keys_only=False):
    """The backward pruner of ``kind`` on a card known by its shared memory (as
    fastdiff.tools.aot_check stands one in), as (BLOCK_M, BLOCK_N, warps, stages)."""
    kernels = _kernels()
    monkeypatch.setattr(kernels, "_smem_limit_for", lambda t: smem)
    tuner = kernels._attn_bwd_dkdv_tuned if kind == "dkdv" else kernels._attn_bwd_dq_tuned
    tiles = (kernels._DKDV_TILES, kernels._DKDV_TILES_LARGE_D) if kind == "dkdv" else (kernels._DQ_TILES, kernels._DQ_TILES_LARGE_D)
    configs = kernels._bwd_configs(*tiles, interpret=False)
    args = {"Q": torch.empty(3, dtype=dtype), "Mask": torch.empty(3, dtype=torch.bool), "Lse": None, "Lq": 256, "Lk": 256}
    return _tiles(tuner.early_config_prune(configs, args, HEAD_DIM=head_dim, MASK_KIND=mask_kind, MASK_KEYS_ONLY=keys_only))


def test_backward_pruner_drops_what_exceeds_shared_memory(monkeypatch):
    """fp32 at D=160 (issue 8's over-limit backward compiles, Triton 3.9): on sm_80 the dK/dV
    tiles 16x128 and 32x64 with 3 stages and the dQ tiles 64x64, 128x32 and every 3-stage one
    exceed 163 KB; on sm_90 only the 3-stage dQ 64x64 and 128x32 (262 KB) exceed 227 KB."""
    # (32x64 w8 s2 fits too, but on sm_80 the D=160 dK/dV keeps 16-row tiles for their spills, below.)
    assert _prune_bwd(monkeypatch, "dkdv", _A100, 160, torch.float32) == {(16, 64, 4, 2), (16, 64, 4, 3)}
    assert _prune_bwd(monkeypatch, "dq", _A100, 160, torch.float32) == {(64, 32, 4, 2), (64, 32, 8, 2)}
    kernels = _kernels()
    every_large_dkdv = {(bm, bn, w, s) for bm, bn, w in kernels._DKDV_TILES_LARGE_D for s in (2, 3)}
    assert _prune_bwd(monkeypatch, "dkdv", _H100, 160, torch.float32) == every_large_dkdv
    every_large_dq = {(bm, bn, w, s) for bm, bn, w in kernels._DQ_TILES_LARGE_D for s in (2, 3)}
    assert _prune_bwd(monkeypatch, "dq", _H100, 160, torch.float32) == every_large_dq - {(64, 64, 8, 3), (128, 32, 8, 3)}
    # 16-bit inputs fit everywhere: nothing is dropped for shared memory (on sm_80 the dQ
    # 64x64 tile at D=160 goes for its spills, below).
    assert _prune_bwd(monkeypatch, "dq", _H100, 160, torch.float16) == every_large_dq
    assert _prune_bwd(monkeypatch, "dq", _A100, 160, torch.float16) == {t for t in every_large_dq if t[1] <= 32}
    for smem in (_A100, _H100):
        assert _prune_bwd(monkeypatch, "dkdv", smem, 80, torch.bfloat16) == {
            (bm, bn, w, s) for bm, bn, w in kernels._DKDV_TILES for s in (2, 3)
        }


def test_backward_pruner_keeps_the_smallest_config_when_none_fits_and_says_so(monkeypatch):
    """A 99 KB card (sm_86/sm_89) cannot hold any fp32 D=160 dQ tile (the smallest needs 131 KB)."""
    with pytest.warns(RuntimeWarning, match=r"attention backward dQ: no config fits the card's 101376 B .* 64x32 w[48] s2"):
        kept = _prune_bwd(monkeypatch, "dq", 101376, 160, torch.float32)
    assert len(kept) == 1 and next(iter(kept))[:2] == (64, 32) and next(iter(kept))[3] == 2


@pytest.mark.parametrize("smem", [_A100, _H100])
def test_backward_pruner_drops_the_tiles_that_spill_on_sm80(monkeypatch, smem):
    """Issue 8's spills (sm_80, fp16, Triton 3.9): with a full mask the 64-row dK/dV query steps
    spill at D=40/64/80; with a key-padding mask the 64x64 dK/dV tile spills at D=80; the dQ
    64x64 tile spills at D=160 with or without a mask. sm_90 keeps them all (no spills there)."""
    kernels = _kernels()
    small_dkdv = {(bm, bn, w, s) for bm, bn, w in kernels._DKDV_TILES for s in (2, 3)}
    ampere = smem == _A100
    for head_dim in (40, 64, 80):
        full = _prune_bwd(monkeypatch, "dkdv", smem, head_dim, mask_kind=1)
        assert full == ({t for t in small_dkdv if t[0] <= 32} if ampere else small_dkdv)
        additive = _prune_bwd(monkeypatch, "dkdv", smem, head_dim, mask_kind=2)
        assert additive == full
        keypad = _prune_bwd(monkeypatch, "dkdv", smem, head_dim, mask_kind=1, keys_only=True)
        assert keypad == ({t for t in small_dkdv if t[0] <= 32} if ampere and head_dim > 64 else small_dkdv)
        assert _prune_bwd(monkeypatch, "dkdv", smem, head_dim) == small_dkdv  # no mask
    large_dq = {(bm, bn, w, s) for bm, bn, w in kernels._DQ_TILES_LARGE_D for s in (2, 3)}
    full_dq = _prune_bwd(monkeypatch, "dq", smem, 160, mask_kind=1)
    assert full_dq == ({t for t in large_dq if t[1] <= 32} if ampere else large_dq)
    assert _prune_bwd(monkeypatch, "dq", smem, 160, mask_kind=1, keys_only=True) == full_dq
    assert _prune_bwd(monkeypatch, "dq", smem, 160) == full_dq
    small_dq = {(bm, bn, w, s) for bm, bn, w in kernels._DQ_TILES for s in (2, 3)}
    assert _prune_bwd(monkeypatch, "dq", smem, 80, mask_kind=1) == small_dq
    # dK/dV at D=160: 32x64 w8 spills 32-104 B on sm_80 without a mask or with a key-padding one
    # (the every-config matrix); the 16-row tiles do not.
    large_dkdv = {(bm, bn, w, s) for bm, bn, w in kernels._DKDV_TILES_LARGE_D for s in (2, 3)}
    for mask in ({}, {"mask_kind": 1, "keys_only": True}, {"mask_kind": 2, "keys_only": True}):
        kept = _prune_bwd(monkeypatch, "dkdv", smem, 160, **mask)
        assert kept == ({t for t in large_dkdv if t[0] <= 16} if ampere else large_dkdv)


def test_tma_forward_estimate_counts_the_fp32_transpose_scratch(monkeypatch):
    """The TMA forward at fp32, D=160, on sm_90 (Triton 3.9): 64x64 with 3 stages needs 237,632 B,
    over 227 KB, and is dropped; with 2 stages, and 128x64 with 2, it fits and stays. The
    pointer forward's 64x64 3-stage tile (221,440 B) fits and stays."""
    kernels = _kernels()
    monkeypatch.setattr(kernels, "_smem_limit_for", lambda t: _H100)
    monkeypatch.setattr(kernels, "_sms_for", lambda t: None)
    configs = [c for c in kernels._gpu_fwd_configs() if c.kwargs["BLOCK_M"] >= 64]
    base = {"Lse": None, "Lq": 256, "Lk": 256, "BH": 16, "Out": torch.empty(3, dtype=torch.float32)}
    consts = dict(HEAD_DIM=160, MASK_KIND=0, MASK_KEYS_ONLY=False)
    tma = _tiles(kernels._prune_fwd_configs(configs, {**base, "q_desc0": None}, **consts))
    plain = _tiles(kernels._prune_fwd_configs(configs, base, **consts))
    assert (64, 64, 4, 2) in tma and (64, 64, 8, 2) in tma and (128, 64, 8, 2) in tma
    assert (64, 64, 4, 3) not in tma and (64, 64, 8, 3) not in tma
    assert (64, 64, 4, 3) in plain and (64, 64, 8, 3) in plain
