"""benchmarks/bench_step_census.py: its counting logic, and one run on a tiny config (fake CUDA, target sm_90)."""

import os
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_step_census as census  # noqa: E402


def test_counter_counts_work_and_skips_views_and_allocations():
    x = torch.randn(3, 5, 7)
    with census.LaunchCounter() as counter:
        y = x.transpose(1, 2).reshape(3, 35)  # a non-contiguous reshape: one copy
        z = torch.empty(4)  # an allocation: no work
        w = (y * 2).to(torch.float16)  # a multiply, a dtype copy
        v = x.view(15, 7).t()  # views only
        s = w.float().sum()  # a dtype copy, a reduction
    assert counter.ops["aten::mul.Tensor"] + counter.ops["aten::mul.Scalar"] == 1
    assert counter.ops["aten::_to_copy"] == 2 and counter.dtype_copies == 2
    assert counter.ops["aten::sum"] + counter.ops["aten::sum.default"] == 1
    assert not any(name.startswith(("aten::view", "aten::t", "aten::transpose", "aten::empty")) for name in counter.ops)
    assert counter.launches == sum(counter.ops.values()) == 5  # clone (reshape's copy), mul, 2 copies, sum
    assert z.shape == (4,) and v.shape == (7, 15) and torch.isfinite(s)


def test_same_dtype_to_copy_is_not_a_dtype_copy():
    x = torch.randn(4)
    with census.LaunchCounter() as counter:
        x.to(torch.float64, copy=True)
        x.to(torch.float32, copy=True)
    assert counter.ops["aten::_to_copy"] == 2 and counter.dtype_copies == 1


def test_basic_indexing_on_fake_cuda_tensors():
    with census.fake_cuda():
        t = torch.empty(3, 4, 5, device="cuda")
        assert t[1].shape == (4, 5)
        assert t[:, None, 1:3].shape == (3, 1, 2, 5)
        assert t[..., 0].shape == (3, 4)
        assert t[None, ::2, -1].shape == (1, 2, 5)
        assert t.permute(2, 0, 1).contiguous().is_contiguous()


def test_fused_op_host_path_runs_dispatch_for_sm90():
    result = census.fused_op_host_us(runs=1, inner=2)
    assert {e["backend"] for name, e in result.items() if name.startswith(("group_norm", "attention"))} == {"triton"}
    assert all(e["us"] > 0 for e in result.values())


def test_tiny_census_counts_both_unets_side_by_side():
    result = census.count_launches("tiny")
    ours, theirs = result["fastdiff"], result["diffusers"]
    # tiny: 2 resolutions, 1 layer per block -> 8 attentions (4 transformer blocks x attn1/attn2).
    assert ours["fused_ops"]["attention:triton"] == 8
    assert ours["top_ops"]["fastdiff::attention_fwd_triton"] == 8
    assert ours["fused_ops"]["group_norm:triton"] == ours["top_ops"]["fastdiff::group_norm_fwd_triton"]
    assert theirs["fused_ops"] == {}
    assert 0 < ours["launches"] < theirs["launches"]
    # The cached step skips the K and V projections of the 4 cross-attentions, and the
    # 8 resnets' silu + time projection become one silu and one GEMM.
    assert ours["launches"] - ours["launches_kv_cache"] == 2 * 4 + 2 * (8 - 1)
    assert theirs["dtype_copies"] > 0
    # Every count is of real work: no views or metadata made it in.
    for counts in (ours["top_ops"], theirs["top_ops"]):
        assert not any(name.startswith("prim::") or "view" in name for name in counts)


def test_markdown_states_proxies_and_targets():
    report = {
        "environment": {"card": "cpu", "torch": "t", "triton": "x", "diffusers": "d", "commit": "abc", "date": "today"},
        "target": "sm_90",
        "targets": census.TARGETS,
        "archs": {
            "tiny": {
                "launches": {
                    "fastdiff": {"launches": 50, "launches_kv_cache": 46, "dtype_copies": 1, "fused_ops": {"group_norm:triton": 3}},
                    "diffusers": {"launches": 100, "dtype_copies": 4, "fused_ops": {}},
                },
                "host_time": {"fastdiff": {"meta_ms": 9.0, "fake_cuda_ms": 20.0}, "diffusers": {"meta_ms": 10.0, "fake_cuda_ms": 30.0}},
                "launch_ratio": 0.5,
                "launch_ratio_kv_cache": 0.46,
                "host_time_ratio_meta": 0.9,
                "host_time_ratio_fake_cuda": 2 / 3,
            }
        },
        "fused_op_host_us": {"group_norm": {"us": 5.0, "backend": "triton"}},
    }
    text = census.markdown(report)
    assert "CPU proxies, not GPU timings" in text and "commit abc" in text
    assert "| 0.50 (met) | 46 (0.46) |" in text and "0.90 (missed (1.12x the target))" in text and "5.0 (met)" in text
