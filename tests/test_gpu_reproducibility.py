"""On a GPU: bitwise reproducibility, the scheduler step's device counter at scale, and tuning refused in a capture.

* Attention (``triton``) and GroupNorm (``triton`` and ``cuda``), forward and backward, give the
  same bits on a second run at Stable Diffusion shapes (the first run autotunes; the second reuses
  its choice), and across two processes that share Triton's cache directory (the second reads the
  chosen config from disk and benchmarks nothing).
* The fused scheduler step advances its device step index right when one launch has 1,000+
  programs (each counts its arrival with an atomic; the last one advances the index), eagerly
  and replayed from a CUDA graph.
* A kernel that would start autotuning inside a CUDA graph capture raises
  ``TuningDuringCaptureError``; after ``fastdiff.warmup`` at those shapes the capture succeeds
  and replays the eager result bitwise.

Every test needs CUDA and is skipped without it; ``benchmarks/device_run.sh`` runs this file.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _utils import assert_low_precision_ok

import fastdiff
from fastdiff.ops.attention import attention, attention_ref
from fastdiff.ops.group_norm import group_norm, group_norm_ref
from fastdiff.ops.scheduler_step import NUM_COEFFS, scheduler_step, scheduler_step_ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU kernels); benchmarks/device_run.sh runs it"),
]


def _randn(*shape, dtype, seed, scale=1.0, shift=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, device="cuda", generator=g) * scale + shift).to(dtype)


def _assert_bitwise(first, second, names):
    for a, b, name in zip(first, second, names):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.isfinite(a.float()).all(), f"{name}: not finite"
        assert torch.equal(a, b), f"{name}: the second run differs in {int((a != b).sum())} of {a.numel()} elements"


# ---------------------------------------------------------------------------------------------- scheduler step

# 2 x 4 x 520 x 520 = 2,163,200 elements: the Triton launcher's 2048-element programs give 1,057
# programs; the CUDA kernel (128 threads x 16 bytes) 2,113 blocks in fp16 and 4,225 in fp32.
COUNTER_SHAPE = (2, 4, 520, 520)
COUNTER_STEPS = 30


def _step_inputs(dtype):
    coeffs = _randn(COUNTER_STEPS, NUM_COEFFS, dtype=torch.float32, seed=9, scale=0.5)
    x = _randn(*COUNTER_SHAPE, dtype=dtype, seed=10)
    mo = _randn(2 * COUNTER_SHAPE[0], *COUNTER_SHAPE[1:], dtype=dtype, seed=11)
    history = _randn(2, *COUNTER_SHAPE, dtype=dtype, seed=12)
    return coeffs, x, mo, history


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_scheduler_step_counter_with_over_a_thousand_programs(backend, dtype):
    import triton

    from fastdiff.kernels.scheduler_step import launch_settings

    n = torch.Size(COUNTER_SHAPE).numel()
    assert triton.cdiv(n, launch_settings(n)[0]) >= 1000  # Triton programs (the CUDA kernel has more blocks)
    coeffs, x, mo, history = _step_inputs(dtype)
    scale = torch.tensor(6.5, device="cuda")

    index, hist, out = torch.zeros((), dtype=torch.int64, device="cuda"), history.clone(), torch.empty_like(x)
    ref_index, ref_hist = torch.zeros((), dtype=torch.int64, device="cuda"), history.clone()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-5)
    for step in range(COUNTER_STEPS):
        scheduler_step(x, mo, coeffs, index, guidance_scale=scale, history=hist, out=out, advance_step_index=True, backend=backend)
        expected = scheduler_step_ref(x, mo, coeffs, ref_index, guidance_scale=scale, history=ref_hist, advance_step_index=True)
        # every program read row `step` (a wrong row is off by O(1)), and the word holds exactly step + 1
        torch.testing.assert_close(out, expected, **tol, msg=f"{backend} step {step}")
        torch.testing.assert_close(hist, ref_hist, **tol, msg=f"{backend} history after step {step}")
        assert index.item() == step + 1, f"{backend}: index word {index.item():#x} after step {step}"

    # the same from a CUDA graph of one step, replayed COUNTER_STEPS times
    index.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scheduler_step(x, mo, coeffs, index, guidance_scale=scale, history=hist, out=out, advance_step_index=True, backend=backend)
    index.zero_()
    for _ in range(COUNTER_STEPS):
        graph.replay()
    torch.cuda.synchronize()
    assert index.item() == COUNTER_STEPS, f"{backend} replayed: index word {index.item():#x}"


# ---------------------------------------------------------------------------------------------- capture


class _Attend(torch.nn.Module):
    def forward(self, q, k, v):
        return attention(q, k, v, backend="triton")


def test_tuning_inside_a_capture_raises_then_warmup_lets_it_capture():
    from fastdiff.kernels._tuning import TuningDuringCaptureError

    # A shape no other test tunes: (B*H, Lq, Lk, D) = (14, 1153, 1153, 48); at 1153 rows several
    # configs survive the pruner, so the first call would benchmark them.
    q, k, v = (_randn(2, 7, 1153, 48, dtype=torch.float16, seed=s) for s in (13, 14, 15))
    module = _Attend()
    static = [t.clone() for t in (q, k, v)]
    torch.cuda.synchronize()
    with pytest.raises(TuningDuringCaptureError, match="warmup"):
        with torch.no_grad(), torch.cuda.graph(torch.cuda.CUDAGraph()):
            module(*static)

    report = fastdiff.warmup(module, (q, k, v))
    assert ("attention", "triton") in report.ops
    assert any(1153 in key for key in report.tuned.get("attention._attn_fwd_tuned", [])), str(report)

    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = module(*static)
    fresh = [_randn(2, 7, 1153, 48, dtype=torch.float16, seed=s) for s in (16, 17, 18)]
    for buffer, value in zip(static, fresh):
        buffer.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = module(*fresh)
    assert torch.equal(static_out, expected)


# ---------------------------------------------------------------------------------------------- GroupNorm

# (N, C, H, W, groups, activation, channels_last, time-embedding input bias): SD1.5 UNet at 512x512
# with CFG (ResnetBlock2D's norm2 adds the time embedding on load), and a VAE decoder level.
GROUP_NORM_SHAPES = [
    (2, 320, 64, 64, 32, "silu", True, False),
    (2, 320, 64, 64, 32, "silu", True, True),
    (2, 640, 32, 32, 32, None, False, False),
    (2, 1280, 16, 16, 32, "silu", True, True),
    (1, 512, 128, 128, 32, "silu", False, False),
]


def _group_norm_fwd_bwd(x, weight, bias, input_bias, dy, groups, activation, backend):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, input_bias)]
    x, weight, bias, input_bias = leaves
    y = group_norm(x, groups, weight, bias, eps=1e-5, activation=activation, backend=backend, input_bias=input_bias)
    y.backward(dy)
    torch.cuda.synchronize()
    return [y.detach()] + [t.grad for t in leaves if t is not None]


def _group_norm_id(s):
    n, c, hgt, wid, groups, activation, channels_last, temb = s
    return f"{n}x{c}x{hgt}x{wid}-g{groups}-{activation}-{'nhwc' if channels_last else 'nchw'}" + ("-temb" if temb else "")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("shape", GROUP_NORM_SHAPES, ids=_group_norm_id)
def test_group_norm_is_bitwise_reproducible(shape, backend):
    n, c, hgt, wid, groups, activation, channels_last, temb = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _randn(n, c, hgt, wid, dtype=torch.float16, seed=5, scale=2.0, shift=0.5).to(memory_format=fmt)
    weight = _randn(c, dtype=torch.float16, seed=6, scale=0.2, shift=1.0)
    bias = _randn(c, dtype=torch.float16, seed=7, scale=0.2)
    input_bias = _randn(n, c, dtype=torch.float16, seed=8, scale=0.5) if temb else None
    dy = _randn(n, c, hgt, wid, dtype=torch.float16, seed=9).to(memory_format=fmt)

    runs = [_group_norm_fwd_bwd(x, weight, bias, input_bias, dy, groups, activation, backend) for _ in range(3)]
    names = ["y", "dx", "dweight", "dbias"] + (["dinput_bias"] if temb else [])
    assert len(runs[0]) == len(names)
    _assert_bitwise(runs[0], runs[1], names)
    _assert_bitwise(runs[1], runs[2], names)
    assert runs[0][0].is_contiguous(memory_format=fmt)
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref = group_norm_ref(x.double(), groups, weight.double(), bias.double(), 1e-5, activation, input_bias=as64(input_bias))
    baseline = group_norm_ref(x, groups, weight, bias, 1e-5, activation, upcast=False, input_bias=input_bias)  # plain fp16
    assert_low_precision_ok(runs[0][0], baseline, ref)


# ---------------------------------------------------------------------------------------------- attention

# (B, H, Lq, Lk, D): SD1.5 at 512x512 with CFG, the 64x64 level: self-attention and cross-attention on
# 77 tokens. (Each new specialisation tunes and compiles ~20 backward configs: the list is kept short.)
ATTENTION_SHAPES = [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40)]


def _attention_fwd_bwd(q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend="triton")
    out.backward(dout)
    torch.cuda.synchronize()
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_triton_is_bitwise_reproducible(shape):
    b, h, lq, lk, d = shape
    q = _randn(b, h, lq, d, dtype=torch.float16, seed=1)
    k = _randn(b, h, lk, d, dtype=torch.float16, seed=2)
    v = _randn(b, h, lk, d, dtype=torch.float16, seed=3)
    dout = _randn(b, h, lq, d, dtype=torch.float16, seed=4)

    first = _attention_fwd_bwd(q, k, v, dout)  # tunes this key (forward and both backward kernels)
    second = _attention_fwd_bwd(q, k, v, dout)
    third = _attention_fwd_bwd(q, k, v, dout)
    names = ["out", "dq", "dk", "dv"]
    _assert_bitwise(first, second, names)
    _assert_bitwise(second, third, names)
    # and the bits are right, not only repeated
    ref = attention_ref(q.float(), k.float(), v.float())
    assert_low_precision_ok(first[0], torch.nn.functional.scaled_dot_product_attention(q, k, v), ref)


# ---------------------------------------------------------------------------------------------- processes

_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import fastdiff
    from fastdiff.graphs import _autotuned_kernels
    from fastdiff.ops.attention import attention

    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, backend="triton")

    tuner = _autotuned_kernels()["attention._attn_fwd_tuned"]
    benchmarked = []
    bench = tuner._bench
    tuner._bench = lambda *args, **kwargs: benchmarked.append(1) or bench(*args, **kwargs)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 5, 1031, 64, device="cuda", generator=g).half() for _ in range(3))
    report = fastdiff.warmup(Attend(), (q, k, v))
    out = Attend()(q, k, v)
    torch.save(out.cpu(), sys.argv[1])
    print("enabled", report.autotune_cache["kernels"].get("attention._attn_fwd_tuned", False))
    print("tuned", report.tuned.get("attention._attn_fwd_tuned", []))
    print("benchmarked", len(benchmarked))
    """
)


def _run_process(tmp_path, name):
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", _PROCESS_SCRIPT, str(tmp_path / name)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    return lines, torch.load(tmp_path / name)


def test_attention_config_persists_between_processes(tmp_path):
    """fastdiff.warmup turns on Triton's autotune disk cache: a second process benchmarks nothing,
    picks the same config, and gives the same bits."""
    first, out_first = _run_process(tmp_path, "first.pt")
    second, out_second = _run_process(tmp_path, "second.pt")
    assert first["enabled"] == "True", first
    assert "1031" in first["tuned"] and first["tuned"] == second["tuned"], (first, second)
    assert int(first["benchmarked"]) > 0, first  # several configs survive pruning at this shape: it tuned
    assert int(second["benchmarked"]) == 0, second  # read from the disk cache
    assert list((tmp_path / "triton-cache").rglob("*.autotune.json"))
    assert torch.equal(out_first, out_second)
