"""benchmarks/bench_step_census.py: its counting logic, and one run on a tiny config (fake CUDA, target sm_90)."""

import os
import sys

import time

import pytest
import torch
import triton
import triton.language as tl
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


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)


_add_one_tuned = triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=["n"])(_add_one)


def test_noop_launches_stops_the_kernel_and_records_it():
    x = torch.randn(11, generator=torch.Generator().manual_seed(3))
    y = x.clone()
    with census.noop_launches() as launched:
        _add_one[(1,)](y, 11, BLOCK=16)
        _add_one_tuned[(1,)](y, 11)  # through Autotuner.run, which still runs
    assert launched == ["_add_one", "_add_one"]
    assert torch.equal(y, x)  # no kernel body ran
    _add_one[(1,)](y, 11, BLOCK=16)  # the hook is gone: the kernel runs again
    torch.testing.assert_close(y, x + 1)


def test_noop_launches_reaches_the_fused_ops_launch():
    """A public op call under the hook goes through its launcher to the launch, and
    the kernel does not run (the output is not GroupNorm's)."""
    from fastdiff import backends, ops
    from fastdiff.ops.group_norm import group_norm_ref

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, 6, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    with torch.no_grad(), backends.use_backend("triton"), census.noop_launches() as launched:
        y = ops.group_norm(x, 32, w, b, 1e-5, "silu")
    assert len(launched) >= 1
    assert not torch.allclose(y, group_norm_ref(x, 32, w, b, 1e-5, "silu"), atol=1e-3)


def test_host_path_measures_every_fused_op_up_to_the_launch():
    cases = census.fused_op_cases("cpu", sizes="small")
    result = census.fused_op_host_path_us(calls=3, cases=cases)
    assert set(result) == set(cases)
    measured = {name: e for name, e in result.items() if "error" not in e}
    # Plain GroupNorm, both attentions and GEGLU always run on triton when forced.
    assert sum(name.startswith(("group_norm (", "attention", "geglu")) for name in measured) == 4
    for name, e in measured.items():
        assert e["backend"] == "triton", name
        assert e["launches_per_call"] >= 1 and e["kernels"], name  # every timed call reached a launch
        assert 0 < e["us"] < 1e6 and 0 < e["us_no_plan_cache"] < 1e6 and 0 < e["us_p10"] <= e["us"], name
        shares = e["breakdown_percent"]
        assert abs(sum(shares.values()) - 100) < 1e-6 and shares["kernel launcher (kernels/)"] > 0, (name, shares)


def _launcher_names(module):
    return [name for name in dir(module) if name.startswith("group_norm_forward")]


def test_host_path_includes_the_launchers_preparation(monkeypatch):
    """Slowing the kernel launcher (the Python that prepares a launch) by 3 ms raises the
    measured host path by about that much: the measurement spans the launcher."""
    import fastdiff.kernels.group_norm as kernels
    import fastdiff.ops.group_norm as op_module

    name, (op_name, args, kwargs) = next(iter(census.fused_op_cases("cpu", sizes="small").items()))
    assert name.startswith("group_norm")
    cases = {name: (op_name, args, kwargs)}
    baseline = census.fused_op_host_path_us(calls=20, cases=cases)[name]["us"]

    slowed = []
    names = _launcher_names(kernels)
    assert names, "kernels/group_norm.py has no group_norm_forward* launcher"
    for launcher in names:
        original = getattr(kernels, launcher)

        def slow(*a, _original=original, **k):
            slowed.append(1)
            end = time.perf_counter() + 3e-3
            while time.perf_counter() < end:
                pass
            return _original(*a, **k)

        monkeypatch.setattr(kernels, launcher, slow)
        if getattr(op_module, launcher, None) is original:  # bound at import time in the op module
            monkeypatch.setattr(op_module, launcher, slow)
    result = census.fused_op_host_path_us(calls=20, cases=cases)[name]
    assert len(slowed) >= 2 * 20 + 1, "the op did not call its launcher through kernels.group_norm_forward*"
    assert result["us"] - baseline >= 2.5e3
    assert result["us_no_plan_cache"] >= 3e3


def test_dispatch_only_runs_no_backend_and_decides_for_sm90():
    result = census.fused_op_dispatch_us(calls=2)
    backends_chosen = {name.split(" ")[0]: e["backend"] for name, e in result.items()}
    assert backends_chosen["attention"] == "triton"
    assert result[next(n for n in result if n.startswith("group_norm ("))]["backend"] == "triton"
    assert all(e["us"] > 0 and e["us_no_plan_cache"] > 0 for e in result.values())


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
    # Each fused call replayed through its launcher: every one reached at least one launch.
    kernels = ours["fused_kernels"]
    assert kernels["group_norm_sized_for_target"] is True
    assert kernels["failed"] == {} and kernels["fused_calls"] == 8 + ours["fused_ops"]["group_norm:triton"]
    assert sum(sum(c.values()) for c in kernels["launches_per_call"].values()) == kernels["fused_calls"]
    assert "0" not in kernels["launches_per_call"]["fastdiff::attention_fwd_triton"]
    assert kernels["kernel_launches"] >= kernels["fused_calls"]
    assert ours["launches_with_kernels"] == ours["launches"] - kernels["fused_calls"] + kernels["kernel_launches"]
    # Every count is of real work: no views or metadata made it in.
    for counts in (ours["top_ops"], theirs["top_ops"]):
        assert not any(name.startswith("prim::") or "view" in name for name in counts)


def _tiny_report(fastdiff_ops):
    return {
        "environment": {"card": "cpu", "torch": "t", "triton": "x", "diffusers": "d", "commit": "abc", "date": "today"},
        "target": "sm_90",
        "targets": census.TARGETS,
        "load_before": "load average 3.10, 2.00, 1.00 on 2 CPUs",
        "load_after": "load average 4.00, 2.50, 1.50 on 2 CPUs",
        "calls": 7,
        "python_speed": {"empty_call_ns": 48.0, "triton_cdiv_us": 3.25},
        "archs": {
            "tiny": {
                "launches": {
                    "fastdiff": {"launches": 50, "launches_kv_cache": 46, "dtype_copies": 1, "fused_ops": {"group_norm:triton": 3},
                                 "top_ops": dict(fastdiff_ops), "ops": dict(fastdiff_ops),
                                 "launches_with_kernels": 54, "launches_kv_cache_with_kernels": 50,
                                 "fused_kernels": {"launches_per_call": {"fastdiff::group_norm_fwd_triton": {"1": 1, "3": 2}}, "failed": {}}},
                    "diffusers": {"launches": 100, "dtype_copies": 4, "fused_ops": {}, "top_ops": {}, "ops": {}},
                },
                "host_time": {"fastdiff": {"meta_ms": 9.0, "fake_cuda_ms": 20.0, "meta_cpu_ms": 8.0, "fake_cuda_cpu_ms": 24.0},
                              "diffusers": {"meta_ms": 10.0, "fake_cuda_ms": 30.0, "meta_cpu_ms": 10.0, "fake_cuda_cpu_ms": 30.0}},
                "launch_ratio": 0.5,
                "launch_ratio_kv_cache": 0.46,
                "host_time_ratio_meta": 0.9,
                "host_time_ratio_fake_cuda": 2 / 3,
            }
        },
        "fused_op_host_path_us": {
            "group_norm x": {"op": "group_norm", "backend": "triton", "us": 5.0, "us_p10": 4.25, "us_no_plan_cache": 9.5, "launches_per_call": 2, "kernels": ["_apply", "_stats"],
                             "breakdown_percent": {"kernel launcher (kernels/)": 60.0, "other Python": 40.0}},
            "group_norm + input_bias": {"op": "group_norm", "backend": "triton", "error": "no"},
        },
        "fused_op_dispatch_us": {"group_norm x": {"op": "group_norm", "backend": "triton", "us": 1.5, "us_no_plan_cache": 4.25}},
    }


def test_markdown_states_proxies_targets_load_and_history():
    old = _tiny_report({"aten::add.Tensor": 8, "aten::convolution": 20})
    del old["archs"]["tiny"]["launches"]["fastdiff"]["ops"]  # an older report: top 12 only
    old["environment"]["commit"] = "old"
    report = _tiny_report({"aten::add.Tensor": 0, "aten::convolution": 20})
    report["history"] = [census.history_entry("round 1 (old)", old)]
    text = census.markdown(report)
    assert "CPU proxies, not GPU timings" in text and "commit abc" in text
    assert "| tiny | 50 / 54 | 100 | 0.50 / 0.54 (met) | 46 / 50 (0.46 / 0.50) | 1 / 4 |" in text
    assert "| tiny | 8 / 10 (0.80, met) | 9 / 10 (0.90) | 24 / 30 (0.80) | 20 / 30 (0.67) |" in text
    assert "  * fastdiff::group_norm_fwd_triton: 1 kernel (1), 3 kernels (2)" in text
    assert "| group_norm x | 5.0 (met); p10 4.2 | 9.5 | 2 (_apply, _stats) | 1.5 / 4.2 (triton) |" in text
    assert "| group_norm + input_bias | not measured: triton cannot run it (no) |" in text
    assert "| group_norm x | 0 | 0 | 60 | 0 | 0 | 40 |" in text
    assert "* Launches per step <= 0.6x diffusers' (every kernel counted): tiny 0.54x: met." in text
    assert "* Host time per step <= 0.8x diffusers' (meta device, CPU time): tiny 0.80x: met." in text
    assert "* Each fused op's host path <= 6 us (repeat calls): met." in text
    report["fused_op_host_path_us"]["group_norm x"]["us"] = 13.5
    assert "host path <= 6 us (repeat calls): missed: 14-14 us, 2.2x to 2.2x the target." in census.markdown(report)
    assert "empty Python function call costs 48 ns" in text and "`triton.cdiv` costs 3.2 us" in text
    assert "load average 3.10, 2.00, 1.00 on 2 CPUs" in text and "over 7 calls" in text
    # Before/after: launches and the tracked ops per round; an op absent from a top-12 list is "<floor".
    assert "| tiny | 50 -> 50 | 46 -> 46 | 100 | 8 -> 0 | <8 -> 0 |" in text
    old["archs"]["tiny"]["launches"]["fastdiff"]["launches_kv_cache"] = None  # a report from before the K/V cache
    report["history"] = [census.history_entry("before", old)]
    assert "| tiny | 50 -> 50 | - -> 46 | 100 |" in census.markdown(report)


def test_host_time_alternates_and_records_wall_and_cpu_time():
    result = census.host_time("tiny", runs=1)
    for library in ("fastdiff", "diffusers"):
        for where in ("meta", "fake_cuda"):
            wall, cpu = result[library][f"{where}_ms"], result[library][f"{where}_cpu_ms"]
            # One thread's CPU time cannot exceed the wall time it ran in (1 ms of clock granularity).
            assert 0 < cpu <= wall + 1.0, (library, where, cpu, wall)
            assert result[library][f"{where}_ops"] > 0
    # On meta fastdiff runs its reference paths; on fake CUDA its fused ops, one custom op each: fewer ops.
    assert result["fastdiff"]["fake_cuda_ops"] < result["fastdiff"]["meta_ops"]


@pytest.mark.parametrize("op_name", ["group_norm", "attention"])
def test_fused_ops_under_a_dispatch_mode_are_one_custom_op(op_name):
    """Under a TorchDispatchMode (FakeTensorMode, this census) a fused op must go through its
    custom op, not call its launcher on fake tensors: the census counts it as one op, and a
    launcher cannot run on fake CUDA tensors (it would reach torch.cuda or the interpreter)."""
    from fastdiff import backends, ops

    with census.fake_cuda():
        cases = census.fused_op_cases("cuda", real=False, sizes="small")
        name = next(n for n, case in cases.items() if case[0] == op_name)
        _, args, kwargs = cases[name]
        with torch.no_grad(), census.LaunchCounter() as counter, backends.trace_dispatch() as chosen:
            getattr(ops, op_name)(*args, **kwargs)
    assert chosen == [(op_name, "triton")]
    assert counter.ops[f"fastdiff::{op_name}_fwd_triton"] == 1, dict(counter.ops)
