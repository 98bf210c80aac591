"""The graph runner (fastdiff.graphs) on the CPU through the stand-in backend, and on CUDA (gpu marker).

The stand-in records the ATen ops of a capture and replays exactly those ops on the same tensors, so a
graph that is stale (captured against old weights, or a host value) gives stale numbers here as it
would on a GPU: the tests compare every captured run with an eager run of the same weights.
"""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.graphs import (
    CUDAGraphBackend,
    GraphRunner,
    StandInBackend,
    capture_reasons,
    enable_triton_autotune_cache,
    graph_key,
    scheduler_state_tensors,
    weights_fingerprint,
)
from fastdiff.schedulers import DDIMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, UniPCMultistepScheduler

STEPS = 4


class TinyDenoiser(torch.nn.Module):
    """Conv -> GroupNorm+SiLU -> Linear over channels -> conv, times a buffer; runs in its weights' dtype."""

    def __init__(self, channels=3, hidden=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.conv_out = torch.nn.Conv2d(hidden, channels, 3, padding=1)
        self.register_buffer("scale", torch.rand(channels) + 0.5)

    def forward(self, x, t):
        dtype = x.dtype
        h = self.conv_in(x.to(self.conv_in.weight.dtype))
        h = h * (1 + t.to(h.dtype) / 1000)
        h = F.silu(self.norm(h))
        h = self.proj(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return (self.conv_out(h) * self.scale.view(1, -1, 1, 1)).to(dtype)


class TinyPipe:
    """The shape of a pipeline's loop: one step = UNet on the CFG batch + fused step with guidance."""

    def __init__(self, seed=0):
        self.unet = TinyDenoiser(seed=seed)
        self.scheduler = DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear")

    def step(self, latents, t, guidance):
        noise_pred = self.unet(torch.cat([latents] * 2), t)
        return self.scheduler.step(noise_pred, t, latents, guidance_scale=guidance, return_dict=False)[0]


def _latents(seed=1, shape=(2, 3, 7, 9)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


GUIDANCE = torch.full((1,), 6.5)


def graph_loop(pipe, runner, latents, new_schedule=True, **region_kwargs):
    """One denoising loop through the runner (forced reference fused step: the fused path on the CPU)."""
    with fastdiff.use_backend(scheduler_step="reference"), torch.no_grad():
        if new_schedule:
            pipe.scheduler.set_timesteps(STEPS)
        else:
            pipe.scheduler.reset_fused_step()
        timesteps = pipe.scheduler.timesteps
        region = runner.region(
            "denoise_step", pipe.step, dict(latents=latents, t=timesteps[0], guidance=GUIDANCE),
            modules=[pipe.unet], scheduler=pipe.scheduler, watch=lambda: scheduler_state_tensors(pipe.scheduler),
            **region_kwargs,
        )  # fmt: skip
        for t in timesteps:
            latents = region(latents=latents, t=t, guidance=GUIDANCE)
        return latents.clone(), region


def eager_loop(unet, latents):
    """The same loop with a fresh scheduler and no runner."""
    scheduler = DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear")
    with fastdiff.use_backend(scheduler_step="reference"), torch.no_grad():
        scheduler.set_timesteps(STEPS)
        for t in scheduler.timesteps:
            noise_pred = unet(torch.cat([latents] * 2), t)
            latents = scheduler.step(noise_pred, t, latents, guidance_scale=GUIDANCE, return_dict=False)[0]
    return latents


def _runner(owner=None, **kwargs):
    return GraphRunner(owner, backend=StandInBackend(), **kwargs)


# ---------------------------------------------------------------------------- capture and replay


def test_captured_loop_equals_eager_and_second_call_only_replays():
    pipe, x = TinyPipe(), _latents()
    runner = _runner(pipe)
    out, region = graph_loop(pipe, runner, x)
    assert region.reasons == [] and region.captured
    assert torch.equal(out, eager_loop(pipe.unet, x))
    # step 0 is the eager warm-up, step 1 captures, every step from 1 on replays
    assert runner.stats == {"warmups": 1, "captures": 1, "replays": STEPS - 1}

    # a new loop over the same scheduler buffers (reset_fused_step) replays from step 0: no capture
    x2 = _latents(seed=7)
    out2, _ = graph_loop(pipe, runner, x2, new_schedule=False)
    assert torch.equal(out2, eager_loop(pipe.unet, x2))
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 2 * STEPS - 1


def test_whole_loop_as_one_region():
    # The whole loop in one graph: per-step timesteps are views of the device table (fixed indices),
    # the fused step reads its device step index; reset_fused_step() rewinds it between replays.
    pipe, runner = TinyPipe(), _runner()
    with fastdiff.use_backend(scheduler_step="reference"), torch.no_grad():
        pipe.scheduler.set_timesteps(STEPS)
        timesteps = pipe.scheduler.timesteps

        def whole_loop(latents, guidance):
            for i in range(STEPS):
                latents = pipe.step(latents, timesteps[i], guidance)
            return latents

        region = None
        for seed in (1, 2, 3):
            x = _latents(seed=seed)
            if region is None:
                region = runner.region(
                    "loop", whole_loop, dict(latents=x, guidance=GUIDANCE), modules=[pipe.unet],
                    scheduler=pipe.scheduler, watch=lambda: scheduler_state_tensors(pipe.scheduler),
                )  # fmt: skip
            else:
                pipe.scheduler.reset_fused_step()
            out = region(latents=x, guidance=GUIDANCE)
            assert torch.equal(out, eager_loop(pipe.unet, x)), seed
    assert runner.stats == {"warmups": 1, "captures": 1, "replays": 2}


def test_new_scheduler_buffers_recapture():
    # set_timesteps() gives the fused step new device tensors; the graph read the old ones: recapture
    pipe, x = TinyPipe(), _latents()
    runner = _runner(pipe)
    graph_loop(pipe, runner, x)
    out, _ = graph_loop(pipe, runner, x, new_schedule=True)
    assert torch.equal(out, eager_loop(pipe.unet, x))
    assert runner.stats["recaptures_watch"] == 1 and runner.stats["captures"] == 2


def _new_state_dict(module, seed):
    g = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.3 + (k == "scale") for k, v in state.items()}


def _load_in_place(pipe):
    pipe.unet.load_state_dict(_new_state_dict(pipe.unet, 11))


def _fuse_lora_in_place(pipe):
    g = torch.Generator().manual_seed(12)
    weight = pipe.unet.proj.weight
    down, up = torch.randn(2, weight.shape[1], generator=g), torch.randn(weight.shape[0], 2, generator=g)
    with torch.no_grad():
        weight.copy_(weight + 0.8 * up @ down)


def _load_assign(pipe):
    pipe.unet.load_state_dict(_new_state_dict(pipe.unet, 13), assign=True)


def _replace_submodule(pipe):
    torch.manual_seed(14)
    pipe.unet.proj = torch.nn.Linear(6, 6)


def _replace_unet(pipe):
    pipe.unet = TinyDenoiser(seed=15)


def _to_dtype(pipe):
    pipe.unet.to(torch.float64)


WEIGHT_CHANGES = {
    # name: (change, whether the existing graph serves it)
    "load_state_dict_in_place": (_load_in_place, True),
    "fused_lora_copied_in": (_fuse_lora_in_place, True),
    "load_state_dict_assign": (_load_assign, False),
    "replace_submodule": (_replace_submodule, False),
    "replace_unet": (_replace_unet, False),
    "to_dtype": (_to_dtype, False),
}


@pytest.mark.parametrize("change", list(WEIGHT_CHANGES))
def test_weight_change_shows_in_next_output(change):
    apply, served_in_place = WEIGHT_CHANGES[change]
    pipe, x = TinyPipe(), _latents()
    runner = _runner(pipe)
    before, _ = graph_loop(pipe, runner, x)
    apply(pipe)
    expected = eager_loop(pipe.unet, x)
    assert not torch.equal(expected, before)  # the change matters
    after, region = graph_loop(pipe, runner, x, new_schedule=False)
    assert region.captured
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
    stats = runner.stats
    if served_in_place:
        assert stats["captures"] == 1 and stats["in_place_weight_updates"] == 1
        assert "recaptures_weights" not in stats
    else:
        assert stats["captures"] == 2 and stats["recaptures_weights"] == 1 and stats["warmups"] == 2


def test_in_place_update_refreshes_fused_qkv_weight():
    # fastdiff's Attention.fuse_projections() keeps a concatenated q/k/v weight, rebuilt on the host when
    # its sources' versions change: the eager step after an in-place update rebuilds it, and since it is
    # a new tensor, the graph is recaptured. A replay of the old graph would have used the old weight.
    from fastdiff.nn import Attention

    torch.manual_seed(4)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    attn.fuse_projections()
    x = torch.randn(2, 5, 16)
    runner = _runner()

    def run():
        region = runner.region("attn", attn, dict(hidden_states=x), modules=[attn])
        outs = [region(hidden_states=x).clone() for _ in range(3)]
        return outs, region

    outs, region = run()
    assert region.captured and all(torch.equal(o, outs[0]) for o in outs)
    with torch.no_grad():
        attn.to_q.weight.mul_(-1.5)  # in place, as a fused LoRA copy is
        expected = copy.deepcopy(attn)(x)  # (a call of attn itself would rebuild the fused weight here)
    assert not torch.equal(expected, outs[0])
    outs, region = run()
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert region.captured and runner.stats["in_place_weight_updates"] == 1 and runner.stats["recaptures_weights"] == 1


def test_stale_region_replays_the_old_weights():
    # The fingerprint is taken when a region is made (once per pipeline call). A region made before a
    # swap replays the graph captured on the old tensors, as a real CUDA graph would: that is why the
    # pipeline makes a region per call. Shows the stand-in has graph semantics.
    pipe, x = TinyPipe(), _latents()
    runner = _runner(pipe)
    old_unet = TinyDenoiser(seed=0)
    out, region = graph_loop(pipe, runner, x)
    _load_assign(pipe)
    with fastdiff.use_backend(scheduler_step="reference"), torch.no_grad():
        pipe.scheduler.reset_fused_step()
        y = x
        for t in pipe.scheduler.timesteps:
            y = region(latents=y, t=t, guidance=GUIDANCE)
    assert torch.equal(y, eager_loop(old_unet, x))
    assert not torch.equal(y, eager_loop(pipe.unet, x))


def test_weights_fingerprint_layout_and_versions():
    unet = TinyDenoiser()
    first = weights_fingerprint([unet])
    _fuse_lora_in_place(type("P", (), {"unet": unet}))
    in_place = weights_fingerprint([unet])
    assert in_place.layout == first.layout and in_place.versions != first.versions
    unet.load_state_dict(_new_state_dict(unet, 3), assign=True)
    assert weights_fingerprint([unet]).layout != first.layout
    with pytest.raises(TypeError, match="modules"):
        weights_fingerprint([object()])


# ---------------------------------------------------------------------------- static buffers


def test_inputs_enter_only_through_the_copy_in():
    weight = torch.randn(5, 5)
    runner = _runner()

    def fn(x):
        return torch.tanh(x @ weight)

    a, b = torch.randn(3, 5), torch.randn(3, 5)
    region = runner.region("f", fn, dict(x=a))
    region(x=a)  # warm-up
    out = region(x=a)  # capture + replay
    assert region.captured
    static = runner._state.graphs[region.key].static_inputs["x"]
    assert static is not a and torch.equal(static, a)
    a.add_(1.0)  # changing the caller's tensor after the call does not reach the graph
    assert not torch.equal(static, a)
    assert torch.equal(region(x=b), fn(b))
    assert region(x=a) is out  # outputs are the graph's static buffers, overwritten by each replay
    torch.testing.assert_close(out, fn(a), rtol=0, atol=0)
    # a tensor fn closes over is read in place (like a weight); a new tensor under its name is not
    weight.mul_(2)
    torch.testing.assert_close(region(x=b), torch.tanh(b @ weight), rtol=0, atol=0)
    baked = weight.clone()
    weight = torch.randn(5, 5)  # noqa: F841 - rebinding: the graph keeps reading the captured tensor
    torch.testing.assert_close(region(x=b), torch.tanh(b @ baked), rtol=0, atol=0)


def test_region_refuses_other_shapes_and_non_tensor_inputs():
    runner = _runner()
    region = runner.region("f", torch.sin, dict(input=torch.randn(3, 4)))
    with pytest.raises(ValueError, match=r"region input \['input'\]: expected shape"):
        region(input=torch.randn(4, 3))
    with pytest.raises(ValueError, match="expected the tensors"):
        region(other=torch.randn(3, 4))
    with pytest.raises(TypeError, match=r"inputs\['scale'\]: expected a tensor or None.*extra="):
        runner.region("f", torch.sin, dict(input=torch.randn(3), scale=2.0))


def test_nested_inputs_with_none_entries():
    # SDXL's added_cond_kwargs (a dict of tensors) and an absent timestep_cond travel as one region input
    runner = _runner()

    def fn(latents, added_cond_kwargs, timestep_cond):
        assert timestep_cond is None
        return {"out": latents * added_cond_kwargs["text_embeds"].sum() + added_cond_kwargs["time_ids"].mean()}

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        return dict(
            timestep_cond=None,  # keyword order does not matter
            latents=torch.randn(2, 3, generator=g),
            added_cond_kwargs={
                "time_ids": torch.randn(2, 6, generator=g),
                "text_embeds": torch.randn(2, 4, generator=g),
            },
        )

    region = runner.region("f", fn, inputs(0))
    for seed in range(3):
        out = region(**inputs(seed))["out"]
        torch.testing.assert_close(out, fn(**inputs(seed))["out"], rtol=0, atol=0)
    assert region.captured and runner.stats["captures"] == 1
    with pytest.raises(ValueError, match="same None entries"):
        region(**{**inputs(0), "timestep_cond": torch.randn(2)})
    with pytest.raises(ValueError, match=r"region input \['added_cond_kwargs'\]\['time_ids'\]: expected shape"):
        region(**{**inputs(0), "added_cond_kwargs": {"time_ids": torch.randn(1, 6), "text_embeds": torch.randn(2, 4)}})


def test_stand_in_capture_runs_nothing_until_replay():
    counter = torch.zeros(1, dtype=torch.int64)
    base = torch.randn(4)

    def fn():
        counter.add_(1)  # a device step index advancing in place
        return base * counter

    backend = StandInBackend()
    handle, out, growth = backend.capture(fn, backend.new_pool(base.device), base.device)
    assert counter.item() == 0  # the capture left tensors from before it as they were
    assert torch.isnan(out).all()  # outputs are undefined until the first replay
    assert growth >= out.untyped_storage().nbytes()
    backend.replay(handle)
    backend.replay(handle)
    assert counter.item() == 2
    torch.testing.assert_close(out, base * 2, rtol=0, atol=0)


def test_host_sync_inside_capture_falls_back_to_eager_with_a_reason():
    runner = _runner()

    def fn(x):
        return x * x.sum().item()  # a host read: a CUDA graph capture fails on it

    x = torch.randn(6)
    region = runner.region("f", fn, dict(x=x))
    region(x=x)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        out = region(x=x)
    torch.testing.assert_close(out, fn(x))
    assert not region.captured and "_local_scalar_dense" in region.reasons[0]
    assert len(runner) == 0 and runner.stats["capture_failures"] == 1
    # the same key is not retried: a new region says why up front
    again = runner.region("f", fn, dict(x=x))
    assert any("capture failed" in r for r in again.reasons)


def test_random_draw_inside_capture_falls_back_to_eager():
    runner = _runner()

    def fn(x):
        return x + torch.randn(x.shape, generator=torch.Generator().manual_seed(5))

    x = torch.randn(4)
    region = runner.region("f", fn, dict(x=x))
    region(x=x)
    with pytest.warns(RuntimeWarning, match="prepare_noise_bank"):
        torch.testing.assert_close(region(x=x), fn(x), rtol=0, atol=0)
    assert "aten::randn" in region.reasons[0]


def test_stochastic_scheduler_with_noise_bank_gives_eager_numbers():
    from fastdiff.schedulers import DDPMScheduler

    unet, x = TinyDenoiser(), _latents()

    def loop(runner):
        scheduler = DDPMScheduler(clip_sample=False)
        generator = torch.Generator().manual_seed(21)
        with fastdiff.use_backend(scheduler_step="reference"), torch.no_grad():
            scheduler.set_timesteps(STEPS)

            def step(latents, t, guidance):
                noise_pred = unet(torch.cat([latents] * 2), t)
                out = scheduler.step(noise_pred, t, latents, generator=generator, guidance_scale=guidance)
                return out.prev_sample

            if runner is None:
                latents = x
                for t in scheduler.timesteps:
                    latents = step(latents, t, GUIDANCE)
                return latents
            scheduler.prepare_noise_bank(x.shape, generator=generator, dtype=x.dtype)
            region = runner.region(
                "step", step, dict(latents=x, t=scheduler.timesteps[0], guidance=GUIDANCE), modules=[unet],
                scheduler=scheduler, watch=lambda: scheduler_state_tensors(scheduler),
            )  # fmt: skip
            latents = x
            for t in scheduler.timesteps:
                latents = region(latents=latents, t=t, guidance=GUIDANCE)
            assert region.captured
            return latents.clone()

    runner = _runner()
    assert torch.equal(loop(runner), loop(None))
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == STEPS - 1


def test_fastdiff_custom_ops_are_captured():
    # Triton kernels (under the interpreter here) run inside torch.library custom ops, which the
    # stand-in records and replays, in-place step index advance included.
    from fastdiff.nn import GroupNorm

    norm = GroupNorm(2, 6, activation="silu")
    conv_in, conv_out = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(6, 3, 1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    model = torch.nn.Sequential(conv_in, norm, conv_out)
    x = _latents(shape=(1, 3, 5, 6))

    def run(runner):
        scheduler = DDIMScheduler(clip_sample=False)
        with fastdiff.use_backend(group_norm="triton", scheduler_step="triton"), torch.no_grad():
            scheduler.set_timesteps(3)

            def step(latents):
                return scheduler.step(model(latents), scheduler.timesteps[0], latents, return_dict=False)[0]

            watch = lambda: scheduler_state_tensors(scheduler)  # noqa: E731
            region = runner.region("s", step, dict(latents=x), modules=[model], watch=watch)
            latents = x
            for _ in range(3):
                latents = region(latents=latents)
            return latents.clone(), region

    captured, region = run(_runner())
    assert region.reasons == [] and region.captured
    eager, eager_region = run(_runner(enabled=False))
    assert not eager_region.captured
    assert torch.equal(captured, eager)


# ---------------------------------------------------------------------------- keys


def test_graph_key_holds_everything_that_changes_the_work():
    x, t, g = torch.randn(2, 4, 8, 8), torch.tensor(999), torch.full((1,), 7.5)
    ddim = DDIMScheduler(clip_sample=False)

    def key(name="step", extra=("a",), scheduler=ddim, scheduler_kwargs=None, **inputs):
        inputs = {"latents": x, "t": t, "guidance": g, **inputs}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        return graph_key(name, inputs, scheduler=scheduler, scheduler_kwargs=scheduler_kwargs, extra=extra)

    base = key()
    assert key(latents=torch.randn(2, 4, 8, 8)) == base  # values are not part of it
    variants = {
        "batch": key(latents=torch.randn(4, 4, 8, 8)),
        "height": key(latents=torch.randn(2, 4, 16, 8)),
        "width": key(latents=torch.randn(2, 4, 8, 16)),
        "dtype": key(latents=x.double()),
        "layout": key(latents=x.to(memory_format=torch.channels_last)),
        "cfg_off": key(guidance=None),
        "scheduler_class": key(scheduler=EulerDiscreteScheduler()),
        "scheduler_config": key(scheduler=DDIMScheduler(clip_sample=False, beta_end=0.03)),
        "step_kwargs": key(scheduler_kwargs={"eta": 0.3}),
        "extra": key(extra=("b",)),
        "name": key(name="loop"),
    }
    with fastdiff.use_backend(group_norm="reference"):
        variants["forced_backend"] = key()
    for name, value in variants.items():
        assert value != base, name
    assert len(set(variants.values())) == len(variants)
    # the step count is not part of the key: a new schedule is a new watched table, which recaptures
    ddim.set_timesteps(10)
    assert key() == base


# ---------------------------------------------------------------------------- the cache


def _square_region(runner, n, name="f"):
    x = torch.randn(n, 3)
    region = runner.region(name, lambda x: (x * 2 + 1).sin(), dict(x=x))
    region(x=x)
    region(x=x)
    assert region.captured
    return region


def test_lru_count_limit():
    runner = _runner(max_graphs=2)
    first, second = _square_region(runner, 3), _square_region(runner, 4)
    assert runner.keys() == [first.key, second.key]
    x = torch.randn(3, 3)
    first(x=x)  # touched: now the most recent
    third = _square_region(runner, 5)
    assert runner.keys() == [first.key, third.key]
    assert runner.stats["evictions"] == 1
    torch.testing.assert_close(first(x=x), (x * 2 + 1).sin(), rtol=0, atol=0)


def test_lru_byte_budget():
    sizes = {}
    probe = _runner()
    for n in (40, 50, 60):
        _square_region(probe, n)
        sizes[n] = probe.nbytes - sum(sizes.values())
    assert sizes[40] < sizes[50] < sizes[60]
    runner = _runner(max_graphs=10, max_bytes=sizes[50] + sizes[60] + sizes[40] // 2)
    for n in (40, 50, 60):
        _square_region(runner, n)
    assert len(runner) == 2 and runner.nbytes == sizes[50] + sizes[60] <= runner._state.max_bytes
    assert runner.stats["evictions"] == 1

    tiny = _runner(max_bytes=sizes[40] // 2)
    x = torch.randn(40, 3)
    region = tiny.region("f", lambda x: (x * 2 + 1).sin(), dict(x=x))
    region(x=x)
    with pytest.warns(RuntimeWarning, match="over the byte budget"):
        out = region(x=x)
    torch.testing.assert_close(out, (x * 2 + 1).sin(), rtol=0, atol=0)
    assert len(tiny) == 0 and tiny.nbytes == 0 and not region.captured


def test_release_and_owner_deletion_free_everything():
    pipe, x = TinyPipe(), _latents()
    runner = _runner(pipe)
    _, region = graph_loop(pipe, runner, x)
    graph = runner._state.graphs[region.key]
    static_ref, output_ref = weakref.ref(graph.static_inputs["latents"]), weakref.ref(graph.outputs[0])
    del graph
    runner.release()
    gc.collect()
    assert len(runner) == 0 and runner.nbytes == 0 and runner.stats["pool_releases"] == 1
    assert static_ref() is None and output_ref() is None
    out, region = graph_loop(pipe, runner, x)  # usable again after release(): warms up and recaptures
    assert region.captured and torch.equal(out, eager_loop(pipe.unet, x)) and runner.stats["warmups"] == 2

    graph = runner._state.graphs[region.key]
    static_ref = weakref.ref(graph.static_inputs["latents"])
    del graph, region
    state = runner._state
    del pipe
    gc.collect()
    assert static_ref() is None and len(state.graphs) == 0 and state.released


# ---------------------------------------------------------------------------- eager fallbacks


def test_capture_reasons():
    cpu = torch.device("cpu")
    stand_in = StandInBackend()
    ddim = DDIMScheduler(clip_sample=False)
    ddim.set_timesteps(5)
    with fastdiff.use_backend(scheduler_step="reference"):
        assert capture_reasons(cpu, backend=stand_in, scheduler=ddim) == []
        assert "turned off" in capture_reasons(cpu, backend=stand_in, enabled=False)[0]

        def callback(pipe, i, t, tensors):
            return tensors

        edits = capture_reasons(
            cpu, backend=stand_in, callback_on_step_end=callback, callback_tensor_inputs=["latents"]
        )
        assert "callback_on_step_end" in edits[0] and "latents" in edits[0]
        # a callback that receives no tensors changes nothing
        assert capture_reasons(cpu, backend=stand_in, callback_on_step_end=callback, callback_tensor_inputs=[]) == []
    # the real backend on the CPU
    assert "CUDA graphs need CUDA tensors" in capture_reasons(cpu, backend=CUDAGraphBackend())[0]
    # auto on the CPU runs the plain step with host step counters
    assert "plain step" in " ".join(capture_reasons(cpu, backend=stand_in, scheduler=ddim))

    clipped = DDIMScheduler(clip_sample=True)
    clipped.set_timesteps(5)
    unipc = UniPCMultistepScheduler()
    unipc.set_timesteps(5)
    heun = HeunDiscreteScheduler()
    heun.set_timesteps(5)
    euler = EulerDiscreteScheduler()
    euler.set_timesteps(5)
    with fastdiff.use_backend(scheduler_step="reference"):
        assert "clip_sample" in " ".join(capture_reasons(cpu, backend=stand_in, scheduler=clipped))
        unipc_reasons = " ".join(capture_reasons(cpu, backend=stand_in, scheduler=unipc))
        assert "UniPCMultistepScheduler has no fused step" in unipc_reasons
        assert "scale_model_input" in " ".join(capture_reasons(cpu, backend=stand_in, scheduler=heun))
        # Euler scales the input at the fused step's device index: capturable
        assert capture_reasons(cpu, backend=stand_in, scheduler=euler) == []
    assert heun.step_index is None  # the probe did not move the scheduler

    compiled = torch.compile(TinyDenoiser())  # not run: compiling happens at the first call
    not_warmed = " ".join(capture_reasons(cpu, backend=stand_in, modules=[compiled], warmed=False))
    assert "torch.compile'd TinyDenoiser has not run at these shapes" in not_warmed
    warmed = capture_reasons(cpu, backend=stand_in, modules=[compiled], warmed=True)
    assert warmed == ["the stand-in backend cannot replay torch.compile'd code (its kernels bypass the dispatcher)"]
    assert capture_reasons(cpu, backend=stand_in, modules=[TinyDenoiser()], warmed=False) == []


def test_region_with_reasons_runs_eagerly_and_says_why():
    pipe, x = TinyPipe(), _latents()
    runner = _runner(pipe)
    out, region = graph_loop(pipe, runner, x, enabled=False)
    assert "turned off" in region.reasons[0] and not region.captured
    assert torch.equal(out, eager_loop(pipe.unet, x))
    assert runner.stats == {"eager_calls": STEPS} and len(runner) == 0
    # the runner-wide switch
    off = _runner(pipe, enabled=False)
    assert "turned off" in graph_loop(pipe, off, x)[1].reasons[0]


def test_runner_arguments_are_checked():
    with pytest.raises(ValueError, match="max_graphs"):
        GraphRunner(max_graphs=0)
    with pytest.raises(ValueError, match="max_bytes"):
        GraphRunner(max_bytes=-5)
    with pytest.raises(ValueError, match="one device"):
        _runner().region("f", torch.add, dict(input=torch.randn(2), other=torch.randn(2, device="meta")))


# ---------------------------------------------------------------------------- Triton autotune cache


def test_triton_autotune_cache_report():
    pytest.importorskip("triton")
    import triton
    from fastdiff.graphs import _autotuned_kernels

    report = enable_triton_autotune_cache()
    assert report["triton"] == triton.__version__
    tuners = _autotuned_kernels()
    assert "attention._attn_fwd_tuned" in tuners
    assert set(report["kernels"]) | set(report["skipped"]) == set(tuners)
    if fastdiff.backends.triton_interpret_enabled():
        assert report["kernels"] == {} and all("TRITON_INTERPRET" in why for why in report["skipped"].values())
    else:
        assert "pre_hook" in report["skipped"]["attention._attn_fwd_tma_tuned"]
        assert all(tuners[name].cache_results for name in report["kernels"])


# ---------------------------------------------------------------------------- on a GPU


def _tiny_sd_unet(device, dtype):
    torch.manual_seed(0)
    unet = fastdiff.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    return unet.to(device, dtype).eval()


def _sd_loop(unet, scheduler, runner, latents, text, guidance, new_schedule=True):
    def step(latents, t, text, guidance):
        noise_pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=text).sample
        return scheduler.step(noise_pred, t, latents, guidance_scale=guidance, return_dict=False)[0]

    with torch.no_grad():
        if new_schedule:
            scheduler.set_timesteps(STEPS, device=latents.device)
        else:
            scheduler.reset_fused_step()
        inputs = dict(latents=latents, t=scheduler.timesteps[0], text=text, guidance=guidance)
        if runner is None:
            for t in scheduler.timesteps:
                latents = step(latents, t, text, guidance)
            return latents, None
        region = runner.region(
            "denoise_step", step, inputs, modules=[unet], scheduler=scheduler,
            watch=lambda: scheduler_state_tensors(scheduler),
        )  # fmt: skip
        for t in scheduler.timesteps:
            latents = region(latents=latents, t=t, text=text, guidance=guidance)
        return latents.clone(), region


def _check_sd_capture_equals_eager(device, dtype, backend):
    unet = _tiny_sd_unet(device, dtype)
    g = torch.Generator(device="cpu").manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g).to(device, dtype)
    text = torch.randn(4, 7, 32, generator=g).to(device, dtype)
    guidance = torch.full((1,), 7.5, device=device)
    scheduler = DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear")
    eager, _ = _sd_loop(unet, DDIMScheduler.from_config(scheduler.config), None, latents, text, guidance)
    runner = GraphRunner(unet, backend=backend)
    captured, region = _sd_loop(unet, scheduler, runner, latents, text, guidance)
    assert region.reasons == [] and region.captured
    # same kernels in the same order: bitwise
    assert torch.equal(captured, eager)
    # an in-place weight change is served by the same graph, and shows
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(0.9)
    eager2, _ = _sd_loop(unet, DDIMScheduler.from_config(scheduler.config), None, latents, text, guidance)
    captured2, _ = _sd_loop(unet, scheduler, runner, latents, text, guidance, new_schedule=False)
    assert torch.equal(captured2, eager2) and not torch.equal(eager2, eager)
    assert runner.stats["captures"] == 1 and runner.stats["in_place_weight_updates"] == 1


def test_sd_unet_capture_equals_eager_stand_in():
    # fastdiff's UNet2DConditionModel (GroupNorm+SiLU, attention, GEGLU through our ops) through the stand-in
    with fastdiff.use_backend(scheduler_step="reference"):
        _check_sd_capture_equals_eager(torch.device("cpu"), torch.float32, StandInBackend())


@pytest.mark.gpu
def test_cuda_capture_equals_eager_tiny_unet():
    _check_sd_capture_equals_eager(torch.device("cuda"), torch.float16, None)


@pytest.mark.gpu
def test_cuda_graph_memory_bounded_over_cycled_resolutions():
    device, dtype = torch.device("cuda"), torch.float16
    unet = _tiny_sd_unet(device, dtype)
    text = torch.randn(4, 7, 32, device=device, dtype=dtype)
    guidance = torch.full((1,), 7.5, device=device)
    scheduler = DDIMScheduler(clip_sample=False)
    runner = GraphRunner(unet, max_graphs=2)
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_reserved()
    after_cycle, graph_bytes = [], []
    for _ in range(3):
        for size in (32, 48, 64, 80, 96):  # the 96x96 step's activations are tens of MiB
            latents = torch.randn(2, 4, size, size, device=device, dtype=dtype)
            _, region = _sd_loop(unet, scheduler, runner, latents, text, guidance)
            assert region.captured
        torch.cuda.synchronize()
        after_cycle.append(torch.cuda.memory_reserved() - baseline)
        graph_bytes.append(runner.nbytes)
    assert len(runner) == 2 and runner.stats["evictions"] > 0
    # the LRU keeps two graphs in one shared pool: later cycles need no more memory than the first
    mib = 1024 * 1024
    assert after_cycle[2] <= after_cycle[0] + 4 * mib, (after_cycle, graph_bytes)
    runner.release()
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() - baseline <= 4 * mib, (torch.cuda.memory_reserved() - baseline, after_cycle)
