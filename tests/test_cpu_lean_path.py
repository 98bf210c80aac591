"""The CPU fast path of ``group_norm`` and ``attention``: a CPU call that the dispatcher
would send to PyTorch's own ops (``reference`` for GroupNorm, ``sdpa`` for attention under
``auto``) goes there directly, before any plan key, lookup or dispatch.

Checked here: results and gradients are bitwise those of the dispatched path (the same op
forced through ``use_backend``, which takes the dispatcher's path), calls are still recorded
by ``trace_dispatch``, every bad input raises the very error the argument checks raise,
every other request (a forced backend, FASTDIFF_BACKEND, a watched or replaced dispatcher,
fake tensors) takes the dispatcher's path and gets its decision, and torch.compile traces
the ops without graph breaks.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import fastdiff
from _utils import requires_triton
from fastdiff import backends
from fastdiff.ops import attention, group_norm

gn_module = importlib.import_module("fastdiff.ops.group_norm")  # fastdiff.ops.group_norm is also the function
attn_module = importlib.import_module("fastdiff.ops.attention")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def dispatched(monkeypatch):
    """Counts the calls that took the dispatcher's path (they build a plan key; the fast path does not)."""
    counts = {"group_norm": 0, "attention": 0}
    for name, module in (("group_norm", gn_module), ("attention", attn_module)):
        original = module._plan_key

        def counting(*args, _name=name, _original=original):
            counts[_name] += 1
            return _original(*args)

        monkeypatch.setattr(module, "_plan_key", counting)
    return counts


# ---------------------------------------------------------------------------
# Bitwise the dispatched path, forward and backward
# ---------------------------------------------------------------------------


def _gn_inputs(dtype, channels_last, affine, with_input_bias, requires_grad, gen):
    x = (torch.randn(3, 12, 7, 5, generator=gen) * 3 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(12, generator=gen) + 1).to(dtype) if affine else None
    b = torch.randn(12, generator=gen).to(dtype) if affine else None
    t = torch.randn(3, 12, generator=gen).to(dtype) if with_input_bias else None
    tensors = [x, w, b, t]
    if requires_grad:
        for tensor in tensors:
            if tensor is not None:
                tensor.requires_grad_()
    return tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_input_bias", [False, True], ids=["no_bias", "input_bias"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "autograd"])
def test_group_norm_fast_path_is_bitwise_the_dispatched_path(seed, dispatched, dtype, channels_last, with_input_bias, requires_grad):
    gen = torch.Generator().manual_seed(seed)
    for activation in (None, "silu"):
        for affine in (True, False):
            x, w, b, t = _gn_inputs(dtype, channels_last, affine, with_input_bias, requires_grad, gen)
            before = dispatched["group_norm"]
            with backends.trace_dispatch() as calls:
                fast = group_norm(x, 4, w, b, 1e-5, activation, input_bias=t)
            assert dispatched["group_norm"] == before, "a plain CPU call went through the dispatcher"
            with backends.use_backend(group_norm="reference"), backends.trace_dispatch() as forced_calls:
                slow = group_norm(x, 4, w, b, 1e-5, activation, input_bias=t)
            assert dispatched["group_norm"] == before + 1
            assert calls == forced_calls == [("group_norm", "reference")]
            assert fast.dtype == slow.dtype and fast.stride() == slow.stride()
            assert torch.equal(fast, slow)
            if requires_grad:
                inputs = [tensor for tensor in (x, w, b, t) if tensor is not None]
                grad_out = torch.randn(fast.shape, generator=gen).to(dtype)
                fast_grads = torch.autograd.grad(fast, inputs, grad_out)
                slow_grads = torch.autograd.grad(slow, inputs, grad_out)
                for got, want in zip(fast_grads, slow_grads):
                    assert torch.equal(got, want)


def test_group_norm_fast_path_equals_plain_pytorch_in_fp32(seed):
    """fp32 without input_bias is exactly F.silu(F.group_norm(...)), in both layouts, 3 to 5 dims."""
    for shape in [(2, 8, 9), (2, 64, 13, 11), (1, 6, 3, 4, 5)]:
        x = torch.randn(shape) * 2 - 1
        w, b = torch.randn(shape[1]), torch.randn(shape[1])
        for layout in (x, x.contiguous(memory_format=torch.channels_last)) if len(shape) == 4 else (x,):
            assert torch.equal(group_norm(layout, 2, w, b, 1e-6, "silu"), F.silu(F.group_norm(layout, 2, w, b, 1e-6)))
            assert torch.equal(group_norm(layout, 2, w, b, 1e-6, backend="reference"), F.group_norm(layout, 2, w, b, 1e-6))


def _qkv(dtype, d, gen, lq=11, lk=7, view_of_projection=False):
    if view_of_projection:  # (B, L, H*D) projections viewed as (B, H, L, D), as Attention passes them
        q = torch.randn(2, lq, 3 * d, generator=gen).to(dtype).view(2, lq, 3, d).transpose(1, 2)
        kv = torch.randn(2, lk, 2 * 3 * d, generator=gen).to(dtype).view(2, lk, 2, 3, d)
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    return tuple(torch.randn(2, 3, length, d, generator=gen).to(dtype) for length in (lq, lk, lk))


def _masks(dtype, gen, lq=11, lk=7):
    keep = torch.rand(2, 1, lq, lk, generator=gen) > 0.3
    keep[..., 0] = True
    return {
        "none": None,
        "bool_4d": keep,
        "additive_4d": torch.randn(2, 3, lq, lk, generator=gen).to(dtype),
        "additive_2d": torch.randn(lq, lk, generator=gen).to(dtype),  # made 4-D as a view
        "bool_key_padding": keep[:, :, :1],  # (B, 1, 1, Lk)
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "autograd"])
def test_attention_fast_path_is_bitwise_the_dispatched_path(seed, dispatched, dtype, requires_grad):
    """Head dims 40 (SDPA's default scale is the same double as D ** -0.5: the fast path leaves
    it out), 8 and 13 (it is not: the fast path passes D ** -0.5, as the sdpa backend does)."""
    gen = torch.Generator().manual_seed(seed)
    assert 40 in attn_module._SDPA_SAME_DEFAULT_SCALE and 8 not in attn_module._SDPA_SAME_DEFAULT_SCALE
    for d in (40, 8, 13):
        for view in (False, True):
            q, k, v = _qkv(dtype, d, gen, view_of_projection=view)
            for mask_name, mask in _masks(dtype, gen).items():
                for scale in (None, 0.3):
                    leaves = [q, k, v]
                    if requires_grad:
                        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                    before = dispatched["attention"]
                    with backends.trace_dispatch() as calls:
                        fast = attention(*leaves, attn_mask=mask, scale=scale)
                    assert dispatched["attention"] == before, f"a plain CPU call went through the dispatcher ({mask_name})"
                    with backends.use_backend(attention="sdpa"), backends.trace_dispatch() as forced_calls:
                        slow = attention(*leaves, attn_mask=mask, scale=scale)
                    assert dispatched["attention"] == before + 1
                    assert calls == forced_calls == [("attention", "sdpa")]
                    assert torch.equal(fast, slow), f"d={d} mask={mask_name} scale={scale}"
                    if requires_grad:
                        grad_out = torch.randn(fast.shape, generator=gen).to(dtype)
                        for got, want in zip(torch.autograd.grad(fast, leaves, grad_out), torch.autograd.grad(slow, leaves, grad_out)):
                            assert torch.equal(got, want)


def test_attention_fast_path_keeps_an_additive_mask_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(torch.float32, 16, gen)
    mask = torch.randn(2, 1, 11, 7, generator=gen, requires_grad=True)
    fast = attention(q, k, v, mask)
    (fast_grad,) = torch.autograd.grad(fast.sum(), [mask])
    with backends.use_backend(attention="sdpa"):
        slow = attention(q, k, v, mask)
    (slow_grad,) = torch.autograd.grad(slow.sum(), [mask])
    assert torch.equal(fast, slow) and torch.equal(fast_grad, slow_grad)


def test_attention_fp64_and_default_scale_equal_plain_sdpa(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _qkv(torch.float64, 40, gen)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q, k, v = _qkv(torch.float32, 64, gen)
    assert torch.equal(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


# ---------------------------------------------------------------------------
# Bad inputs: the errors the checks raise, unchanged
# ---------------------------------------------------------------------------


def _error(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - compared below
        return type(error), str(error)
    raise AssertionError("no error was raised")


def _gn_bad_calls():
    x = torch.randn(2, 6, 5, 4)
    w, b, t = torch.randn(6), torch.randn(6), torch.randn(2, 6)
    return {
        "x_not_tensor": (x.tolist(), 3, w, b, 1e-5, None, None),
        "x_2d": (torch.randn(2, 6), 3, w, b, 1e-5, None, None),
        "x_6d": (torch.randn(1, 6, 1, 1, 1, 2), 3, w, b, 1e-5, None, None),
        "x_empty": (torch.randn(0, 6, 5, 4), 3, w, b, 1e-5, None, None),
        "x_int": (torch.ones(2, 6, 5, 4, dtype=torch.int64), 3, None, None, 1e-5, None, None),
        "groups_zero": (x, 0, w, b, 1e-5, None, None),
        "groups_bool": (x, True, w, b, 1e-5, None, None),
        "groups_float": (x, 3.0, w, b, 1e-5, None, None),
        "groups_not_dividing": (x, 4, w, b, 1e-5, None, None),
        "weight_shape": (x, 3, torch.randn(5), b, 1e-5, None, None),
        "weight_dtype": (x, 3, w.double(), b, 1e-5, None, None),
        "weight_device": (x, 3, w.to("meta"), b, 1e-5, None, None),
        "weight_list": (x, 3, w.tolist(), b, 1e-5, None, None),
        "bias_shape": (x, 3, w, torch.randn(6, 1), 1e-5, None, None),
        "eps_negative": (x, 3, w, b, -1e-5, None, None),
        "eps_string": (x, 3, w, b, "1e-5", None, None),
        "activation": (x, 3, w, b, 1e-5, "gelu", None),
        "input_bias_shape": (x, 3, w, b, 1e-5, "silu", t[:1]),
        "input_bias_dtype": (x, 3, w, b, 1e-5, "silu", t.half()),
        "input_bias_list": (x, 3, w, b, 1e-5, "silu", t.tolist()),
    }


@pytest.mark.parametrize("case", list(_gn_bad_calls()))
@pytest.mark.parametrize("backend", [None, "auto", "reference"])
def test_group_norm_bad_input_raises_the_checks_error(case, backend):
    x, groups, w, b, eps, activation, t = _gn_bad_calls()[case]
    got = _error(lambda: group_norm(x, groups, w, b, eps, activation, backend=backend, input_bias=t))
    want = _error(lambda: gn_module._check_inputs(x, groups, w, b, eps, activation, t))
    assert got == want and got[0] is ValueError


def test_group_norm_errors_past_the_checks_are_unchanged():
    """An unknown backend, a malformed FASTDIFF_BACKEND and PyTorch's own error for a
    one-element input: the same as the dispatched path's."""
    x = torch.randn(2, 6, 5, 4)
    unknown = _error(lambda: group_norm(x, 3, backend="nope"))
    assert unknown[0] is backends.BackendNotSupportedError and "unknown backend 'nope'" in unknown[1]
    one = torch.randn(1, 1, 1)
    with backends.use_backend(group_norm="reference"):
        want = _error(lambda: group_norm(one, 1))
    assert _error(lambda: group_norm(one, 1)) == want


def test_malformed_env_var_raises_as_before(monkeypatch):
    monkeypatch.setenv("FASTDIFF_BACKEND", "group_norm=")
    x, q = torch.randn(2, 6, 5, 4), torch.randn(1, 2, 3, 8)
    for call in (lambda: group_norm(x, 3), lambda: attention(q, q, q)):
        error = _error(call)
        assert error[0] is ValueError and "FASTDIFF_BACKEND: expected 'backend' or 'op=backend,op=backend'" in error[1]


def _attn_bad_calls():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)
    return {
        "q_not_tensor": (q.tolist(), k, v, None, None),
        "q_3d": (q[0], k, v, None, None),
        "v_5d": (q, k, v[None], None, None),
        "q_empty": (q[:, :, :0], k, v, None, None),
        "q_int": (q.long(), k.long(), v.long(), None, None),
        "k_dtype": (q, k.double(), v, None, None),
        "v_dtype": (q, k, v.half(), None, None),
        "k_device": (q, k.to("meta"), v, None, None),
        "k_batch": (q, k[:1], v[:1], None, None),
        "k_heads": (q, k[:, :1], v[:, :1], None, None),
        "k_head_dim": (q, k[..., :4], v, None, None),
        "v_head_dim": (q, k, v[..., :4], None, None),
        "v_length": (q, k, v[:, :, :3], None, None),
        "mask_list": (q, k, v, [[True]], None),
        "mask_dtype": (q, k, v, torch.zeros(5, 4, dtype=torch.float64), None),
        "mask_device": (q, k, v, torch.ones(5, 4, dtype=torch.bool, device="meta"), None),
        "mask_shape": (q, k, v, torch.ones(5, 3, dtype=torch.bool), None),
        "mask_5d": (q, k, v, torch.ones(1, 2, 3, 5, 4, dtype=torch.bool), None),
        "scale_string": (q, k, v, None, "0.5"),
        "scale_nan": (q, k, v, None, float("nan")),
        "scale_bool": (q, k, v, None, True),
    }


@pytest.mark.parametrize("case", list(_attn_bad_calls()))
@pytest.mark.parametrize("backend", [None, "auto"])
def test_attention_bad_input_raises_the_checks_error(case, backend):
    q, k, v, mask, scale = _attn_bad_calls()[case]
    got = _error(lambda: attention(q, k, v, mask, scale, backend=backend))
    want = _error(lambda: attn_module._check_inputs(q, k, v, mask, scale))
    assert got == want and got[0] is ValueError


# ---------------------------------------------------------------------------
# Every other request takes the dispatcher's path and gets its decision
# ---------------------------------------------------------------------------


def test_forced_backends_take_the_dispatcher(dispatched, monkeypatch):
    x, q = torch.randn(2, 6, 5, 4), torch.randn(1, 2, 6, 8)
    with backends.trace_dispatch() as calls:
        attention(q, q, q, backend="sdpa")  # a forced backend, even auto's own choice
        attention(q, q, q, backend="reference")
        with fastdiff.use_backend(attention="reference"):
            attention(q, q, q)
        with fastdiff.use_backend(geglu="reference"):  # an override for another op: dispatched, auto's choice
            attention(q, q, q)
            group_norm(x, 3)
        monkeypatch.setenv("FASTDIFF_BACKEND", "attention=reference")
        attention(q, q, q)
        group_norm(x, 3)
        monkeypatch.setenv("FASTDIFF_BACKEND", "")  # empty: auto, and the fast path again
        attention(q, q, q)
        group_norm(x, 3)
    assert calls == [
        ("attention", "sdpa"),
        ("attention", "reference"),
        ("attention", "reference"),
        ("attention", "sdpa"),
        ("group_norm", "reference"),
        ("attention", "reference"),
        ("group_norm", "reference"),
        ("attention", "sdpa"),
        ("group_norm", "reference"),
    ]
    assert dispatched == {"attention": 5, "group_norm": 2}


@requires_triton
def test_forced_triton_on_cpu_tensors_still_runs_triton(seed, monkeypatch):
    """Under TRITON_INTERPRET (as the tests run) a forced triton still runs the Triton kernels."""
    x, w, b = torch.randn(2, 4, 3, 5), torch.randn(4), torch.randn(4)
    q = torch.randn(1, 2, 5, 16)
    with backends.trace_dispatch() as calls:
        group_norm(x, 2, w, b, backend="triton")
        attention(q, q, q, backend="triton")
        monkeypatch.setenv("FASTDIFF_BACKEND", "triton")
        group_norm(x, 2, w, b)
    assert calls == [("group_norm", "triton"), ("attention", "triton"), ("group_norm", "triton")]


def test_watched_dispatchers_see_every_call(monkeypatch):
    """Pipeline explain replaces select (and lookup) on the dispatcher instance; the step
    census replaces backends' run. Both must still see every call."""
    x, q = torch.randn(2, 6, 5, 4), torch.randn(1, 2, 6, 8)
    for op_name, call in (("group_norm", lambda: group_norm(x, 3)), ("attention", lambda: attention(q, q, q))):
        dispatcher = backends.get_dispatcher(op_name)
        seen = []
        select = dispatcher.select

        def spy(inputs, backend=None, cache_key=None, _select=select, _seen=seen):
            _seen.append(backend)
            return _select(inputs, backend, cache_key=cache_key)

        monkeypatch.setattr(dispatcher, "select", spy)
        monkeypatch.setattr(dispatcher, "lookup", lambda cache_key, backend=None: None)
        call()
        assert seen == [None]
        monkeypatch.undo()

        sentinel = torch.full((1,), 7.0)
        chosen = dispatcher.backends["reference" if op_name == "group_norm" else "sdpa"]
        monkeypatch.setattr(chosen, "run", lambda inputs: sentinel)
        assert call() is sentinel
        monkeypatch.undo()


def test_fake_tensors_take_the_dispatcher(dispatched):
    with FakeTensorMode():
        x, q = torch.randn(2, 6, 5, 4), torch.randn(1, 2, 6, 8)
        with backends.trace_dispatch() as calls:
            assert group_norm(x, 3).shape == x.shape
            assert attention(q, q, q).shape == q.shape
    assert calls == [("group_norm", "reference"), ("attention", "sdpa")]
    assert dispatched == {"group_norm": 1, "attention": 1}


def test_explain_is_unchanged():
    x, q = torch.randn(2, 6, 5, 4), torch.randn(1, 2, 6, 8)
    assert "requested 'auto' (from auto), auto order ['reference']: would run 'reference'" in group_norm.explain(x, 3)
    assert "requested 'auto' (from auto), auto order ['sdpa']: would run 'sdpa'" in attention.explain(q, q, q)


def test_ops_compile_without_graph_breaks(seed):
    x, w, b = torch.randn(2, 6, 5, 4), torch.randn(6), torch.randn(6)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)

    def f(x, q, k, v):
        return group_norm(x, 3, w, b, 1e-5, "silu"), attention(q, k, v)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    for got, want in zip(compiled(x, q, k, v), f(x, q, k, v)):
        assert torch.equal(got, want)
