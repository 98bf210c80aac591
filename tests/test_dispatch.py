"""Backend dispatch: auto selection, the three ways to force, tracing, and error reports."""

import threading

import pytest
import torch

import fastdiff
from fastdiff import backends
from fastdiff.backends import Backend, BackendNotSupportedError, Dispatcher


def _toy_dispatcher(name="toy"):
    """Two backends: 'fast' runs only on even-length inputs, 'slow' runs on anything."""
    return Dispatcher(
        name,
        [
            Backend("fast", lambda i: [] if i["x"].numel() % 2 == 0 else ["odd length"], lambda i: ("fast", i["x"] * 2)),
            Backend("slow", lambda i: [], lambda i: ("slow", i["x"] * 2)),
        ],
        lambda i: ["fast", "slow"],
    )


def test_auto_takes_first_backend_without_reasons():
    d = _toy_dispatcher()
    assert d({"x": torch.randn(4)})[0] == "fast"
    assert d({"x": torch.randn(5)})[0] == "slow"


def test_forced_backend_that_cannot_run_lists_every_backend():
    d = _toy_dispatcher()
    with pytest.raises(BackendNotSupportedError) as info:
        d({"x": torch.randn(5)}, backend="fast")
    message = str(info.value)
    assert "fast: odd length" in message and "slow: supported" in message and "backend= argument" in message


def test_unknown_backend_name_is_an_error():
    d = _toy_dispatcher()
    with pytest.raises(BackendNotSupportedError, match="unknown backend 'nope'"):
        d({"x": torch.randn(4)}, backend="nope")


def test_precedence_argument_then_context_then_env(monkeypatch):
    d = _toy_dispatcher()
    x = {"x": torch.randn(4)}
    monkeypatch.setenv("FASTDIFF_BACKEND", "slow")
    assert d(x)[0] == "slow"
    with fastdiff.use_backend("fast"):
        assert d(x)[0] == "fast"
        assert d(x, backend="slow")[0] == "slow"
        with fastdiff.use_backend(toy="slow"):
            assert d(x)[0] == "slow"
        assert d(x)[0] == "fast"


def test_env_var_per_op_syntax(monkeypatch):
    d = _toy_dispatcher()
    monkeypatch.setenv("FASTDIFF_BACKEND", "other_op=fast,toy=slow")
    assert d({"x": torch.randn(4)})[0] == "slow"
    monkeypatch.setenv("FASTDIFF_BACKEND", "toy=")
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        d({"x": torch.randn(4)})


def test_use_backend_rejects_ambiguous_arguments():
    with pytest.raises(ValueError):
        with fastdiff.use_backend("fast", toy="slow"):
            pass
    with pytest.raises(ValueError):
        with fastdiff.use_backend():
            pass


def test_use_backend_is_thread_local():
    d = _toy_dispatcher()
    x = {"x": torch.randn(4)}
    inside, outside = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        inside.wait(5)
        seen["other"] = d(x)[0]
        outside.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with fastdiff.use_backend("slow"):
        inside.set()
        outside.wait(5)
        seen["main"] = d(x)[0]
    t.join()
    assert seen == {"other": "fast", "main": "slow"}


def test_trace_dispatch_records_each_call_and_nests():
    d = _toy_dispatcher()
    with fastdiff.trace_dispatch() as outer:
        d({"x": torch.randn(4)})
        with fastdiff.trace_dispatch() as inner:
            d({"x": torch.randn(3)})
    assert outer == [("toy", "fast"), ("toy", "slow")]
    assert inner == [("toy", "slow")]
    d({"x": torch.randn(4)})
    assert len(outer) == 2


def test_explain_names_request_and_reasons():
    d = _toy_dispatcher()
    text = d.explain({"x": torch.randn(5)})
    assert "requested 'auto'" in text and "fast: odd length" in text


def test_group_norm_is_registered_and_explainable():
    x = torch.randn(2, 6, 5)
    text = fastdiff.explain_dispatch("group_norm", x, 3)
    assert "reference: supported" in text
    assert "cuda:" in text and "needs CUDA tensors" in text


def test_device_reasons():
    cpu = torch.randn(3)
    assert backends.device_reasons([cpu], allow_cpu_interpret=False)
    meta = torch.empty(3, device="meta")
    assert "different devices" in backends.device_reasons([cpu, meta], allow_cpu_interpret=True)[0]


def test_ops_trace_under_torch_compile_without_graph_breaks(seed):
    """Dispatch is resolved at trace time, so a compiled region holds the op with no graph break."""
    from fastdiff.ops import group_norm

    def f(x, w, b):
        return group_norm(x, 2, w, b, activation="silu") * 2

    x, w, b = torch.randn(2, 4, 5, 3), torch.randn(4), torch.randn(4)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    with fastdiff.use_backend(group_norm="reference"):
        assert torch.allclose(compiled(x, w, b), f(x, w, b), rtol=1e-5, atol=1e-6)


def test_explain_names_the_backend_that_would_run():
    x = torch.randn(2, 6, 5)
    assert "would run 'reference'" in fastdiff.explain_dispatch("group_norm", x, 3)
    assert ": cannot run" in fastdiff.explain_dispatch("group_norm", x, 3, backend="cuda")


# ---------------------------------------------------------------------------
# Device description: dispatch for a named target on fake CUDA tensors.
# ---------------------------------------------------------------------------


def _fake_cuda_attention_inputs(dtype=torch.float16):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    with mode:
        q = torch.empty(2, 5, 97, 40, device="cuda", dtype=dtype)
        k = torch.empty(2, 5, 77, 40, device="cuda", dtype=dtype)
    return mode, q, k


def test_use_target_sets_the_description_and_restores_it():
    assert backends.current_target() is None
    with backends.use_target("sm_90") as description:
        assert description.capability == (9, 0) and description.sm_count == 132
        assert backends.current_target() is description
        with backends.use_target("sm_80"):
            assert backends.current_target().sm_count == 108
        assert backends.current_target() is description
    assert backends.current_target() is None
    with pytest.raises(ValueError, match="target"):
        with backends.use_target("sm_1000"):
            pass


def test_fake_cuda_dispatch_follows_the_target():
    mode, q, k = _fake_cuda_attention_inputs()
    with mode:
        h100 = fastdiff.explain_dispatch("attention", q, k, k, target="sm_90")
        a100 = fastdiff.explain_dispatch("attention", q, k, k, target="sm_80")
        old = fastdiff.explain_dispatch("attention", q, k, k, target=backends.DeviceDescription((7, 5), 40, "T4"))
        with backends.use_target("sm_90"), fastdiff.trace_dispatch() as calls:
            out = fastdiff.ops.attention(q, k, k)
    assert "132 SMs" in h100 and "would run 'triton'" in h100
    assert "triton_tma: supported" in h100
    assert "triton_tma: needs compute capability 9.0" in a100 and "would run 'triton'" in a100
    assert "would run 'sdpa'" in old and "needs compute capability 8.0" in old
    assert calls == [("attention", "triton")] and out.shape == q.shape and out.device.type == "cuda"


def test_fake_cuda_dispatch_without_target_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible; its own description applies")
    mode, q, k = _fake_cuda_attention_inputs()
    with mode:
        text = fastdiff.explain_dispatch("attention", q, k, k)
    assert "would run 'sdpa'" in text and "use_target" in text


def test_plans_skip_reasons_on_a_repeat_and_follow_the_request(monkeypatch):
    calls = []

    def fast_reasons(i):
        calls.append(i["x"].numel())
        return [] if i["x"].numel() % 2 == 0 else ["odd length"]

    d = Dispatcher(
        "toy_plans",
        [Backend("fast", fast_reasons, lambda i: "fast"), Backend("slow", lambda i: [], lambda i: "slow")],
        lambda i: ["fast", "slow"],
    )
    x = {"x": torch.randn(6)}
    assert d.lookup(("n", 6)) is None
    assert d.select(x, cache_key=("n", 6)).name == "fast"
    assert calls == [6]
    with fastdiff.trace_dispatch() as traced:
        assert d.lookup(("n", 6)).name == "fast"
    assert calls == [6], "a cached plan must not ask the reasons again"
    assert traced == [("toy_plans", "fast")], "a cached plan is still traced"
    # Another request, env var or target is another plan.
    assert d.lookup(("n", 6), backend="slow") is None
    with fastdiff.use_backend(toy_plans="slow"):
        assert d.lookup(("n", 6)) is None
    monkeypatch.setenv("FASTDIFF_BACKEND", "slow")
    assert d.lookup(("n", 6)) is None
    monkeypatch.delenv("FASTDIFF_BACKEND")
    with backends.use_target("sm_90"):
        assert d.lookup(("n", 6)) is None
    assert d.lookup(("n", 6)).name == "fast"
    backends.clear_plans()
    assert d.lookup(("n", 6)) is None
