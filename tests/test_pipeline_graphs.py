"""The pipelines' graph layer: captured denoising loop, its opt-out, explain(), set_backend(), compile_unet().

On the CPU the capture runs through fastdiff.graphs.StandInBackend (set as the pipeline's
``_graph_backend``), which records a step's ATen ops and replays exactly those ops on the same
tensors: a stale graph gives stale numbers here as it would on a GPU. The fused scheduler step runs
on the CPU only when forced (``set_backend(scheduler_step="reference")``), so the captured loop and
its eager twin use the same kernels and are compared bitwise. GPU tests (gpu marker) run in
benchmarks/device_run.sh.
"""

import gc
import warnings

import pytest
import torch

import fastdiff
from _tiny_pipelines import one_torch_thread, save_sd_folder, save_sdxl_folder, tiny_unet_2d  # noqa: F401
from fastdiff.graphs import StandInBackend

pytest.importorskip("diffusers")  # the tiny pipelines are built with diffusers and transformers
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = 3


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _fastdiff_unet_2d(seed=0):
    reference = tiny_unet_2d(seed=seed)
    unet = fastdiff.UNet2DModel.from_config(reference.config)
    unet.load_state_dict(reference.state_dict())
    return unet.eval()


def _graph_pipe(pipe):
    """Capture through the CPU stand-in, with the fused step forced (it runs on CUDA only under auto)."""
    pipe._graph_backend = StandInBackend()
    pipe.set_backend(scheduler_step="reference")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ddim_pipe(seed=0):
    scheduler = fastdiff.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, beta_schedule="scaled_linear")
    return _graph_pipe(fastdiff.DDIMPipeline(_fastdiff_unet_2d(seed), scheduler))


def _ddim(pipe, seed=0, **kwargs):
    return pipe(generator=_gen(seed), num_inference_steps=STEPS, output_type="pt", **kwargs).images


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, one_torch_thread):
    return save_sd_folder(tmp_path_factory.mktemp("sd_graphs"), scheduler="DDIMScheduler")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, one_torch_thread):
    return save_sdxl_folder(tmp_path_factory.mktemp("sdxl_graphs"))


@pytest.fixture(scope="module")
def sd_pipe(sd_folder):
    return _graph_pipe(fastdiff.DiffusionPipeline.from_pretrained(sd_folder))


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_folder):
    return _graph_pipe(fastdiff.DiffusionPipeline.from_pretrained(sdxl_folder))


SD_ARGS = dict(prompt="a cat", num_inference_steps=STEPS, height=16, width=16, output_type="latent")


# ------------------------------------------------------------------------------ captured == eager


def test_ddim_captured_equals_eager_and_opt_out():
    pipe = _ddim_pipe()
    eager = _ddim(pipe, cuda_graph=False)
    assert pipe.graph_runner.stats == {"eager_calls": STEPS}
    captured = _ddim(pipe)
    stats = pipe.graph_runner.stats
    assert stats["warmups"] == 1 and stats["captures"] == 1 and stats["replays"] == STEPS - 1
    assert torch.equal(captured, eager)  # same kernels in the same order: bitwise
    assert pipe._last_loop_reasons == []

    # opting out for the pipeline: no new capture or replay, the same images
    pipe.enable_cuda_graph(False)
    assert torch.equal(_ddim(pipe), eager)
    assert pipe.graph_runner.stats["replays"] == STEPS - 1
    assert any("turned off" in r for r in pipe._last_loop_reasons)
    assert "turned off" in pipe.explain(batch_size=1)
    pipe.enable_cuda_graph(True)
    with pytest.raises(TypeError, match="enable_cuda_graph"):
        pipe.enable_cuda_graph("yes")
    with pytest.raises(TypeError, match="cuda_graph"):
        _ddim(pipe, cuda_graph="no")


def test_ddim_eta_and_ddpm_noise_bank_give_eager_images():
    # stochastic steps: the noise is pre-drawn in diffusers' order, so the captured loop gives the eager draws
    pipe = _ddim_pipe()
    eager = _ddim(pipe, eta=0.7, cuda_graph=False)
    captured = _ddim(pipe, eta=0.7)
    assert pipe.graph_runner.stats["replays"] == STEPS - 1
    assert torch.equal(captured, eager)
    assert not torch.equal(captured, _ddim(pipe, seed=1, eta=0.7, cuda_graph=False))

    ddpm = _graph_pipe(fastdiff.DDPMPipeline(_fastdiff_unet_2d(), fastdiff.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)))
    eager = _ddim(ddpm, cuda_graph=False)
    captured = _ddim(ddpm)
    assert ddpm.graph_runner.stats["replays"] == STEPS - 1
    assert torch.equal(captured, eager)
    # the eager loop without the pipeline's forcing (plain step, draws per step) agrees to fp tolerance
    ddpm.set_backend(None)
    torch.testing.assert_close(_ddim(ddpm), eager, rtol=0, atol=1e-5)


def test_sd_captured_equals_eager(sd_pipe):
    eager = sd_pipe(generator=_gen(3), cuda_graph=False, **SD_ARGS).images
    captured = sd_pipe(generator=_gen(3), **SD_ARGS).images
    assert sd_pipe._last_loop_reasons == [] and sd_pipe.graph_runner.stats["replays"] >= STEPS - 1
    assert torch.equal(captured, eager)
    # CFG off is another graph (no guidance input)
    keys = len(sd_pipe.graph_runner)
    eager1 = sd_pipe(generator=_gen(3), guidance_scale=1.0, cuda_graph=False, **SD_ARGS).images
    assert torch.equal(sd_pipe(generator=_gen(3), guidance_scale=1.0, **SD_ARGS).images, eager1)
    assert len(sd_pipe.graph_runner) == keys + 1


def test_sdxl_captured_equals_eager_with_nested_added_cond_kwargs(sdxl_pipe):
    euler = sdxl_pipe.scheduler
    try:
        # Euler: scale_model_input reads sigma at the fused step's device index, so the step is captured
        eager = sdxl_pipe(generator=_gen(2), cuda_graph=False, **SD_ARGS).images
        captured = sdxl_pipe(generator=_gen(2), **SD_ARGS).images
        assert sdxl_pipe._last_loop_reasons == [] and sdxl_pipe.graph_runner.stats["replays"] >= STEPS - 1
        assert torch.equal(captured, eager)
        # Heun's scale_model_input still reads sigma at a host step index: eager, and explain() says why
        sdxl_pipe.scheduler = fastdiff.HeunDiscreteScheduler.from_config(euler.config)
        sdxl_pipe(generator=_gen(2), **SD_ARGS)
        assert any("scale_model_input" in r for r in sdxl_pipe._last_loop_reasons)
        assert "scale_model_input" in sdxl_pipe.explain(height=16, width=16)
        sdxl_pipe.scheduler = fastdiff.DDIMScheduler.from_config(euler.config, clip_sample=False)
        eager = sdxl_pipe(generator=_gen(2), cuda_graph=False, **SD_ARGS).images
        captured = sdxl_pipe(generator=_gen(2), **SD_ARGS).images
        assert sdxl_pipe._last_loop_reasons == []
        assert torch.equal(captured, eager)
    finally:
        sdxl_pipe.scheduler = euler


def test_euler_ancestral_captured_equals_eager(sd_pipe):
    ddim = sd_pipe.scheduler
    try:
        sd_pipe.scheduler = fastdiff.EulerAncestralDiscreteScheduler.from_config(ddim.config)
        eager = sd_pipe(generator=_gen(6), cuda_graph=False, **SD_ARGS).images
        captured = sd_pipe(generator=_gen(6), **SD_ARGS).images
        assert sd_pipe._last_loop_reasons == []
        assert torch.equal(captured, eager)  # ancestral noise from the bank, input scale from the device table
    finally:
        sd_pipe.scheduler = ddim


# ------------------------------------------------------------------------------ keys, LRU, release


def test_keys_lru_and_release():
    pipe = _ddim_pipe()
    pipe._graph_max_graphs = 2
    for batch in (1, 2, 3):
        eager = _ddim(pipe, batch_size=batch, cuda_graph=False)
        assert torch.equal(_ddim(pipe, batch_size=batch), eager)
    runner = pipe.graph_runner
    assert len(runner) == 2 and runner.stats["evictions"] == 1 and runner.stats["captures"] == 3
    assert [k[1][1][1][0][0] for k in runner.keys()] == [2, 3]  # the image input's batch, oldest first
    # the scheduler config is in the key: another eta is another graph
    _ddim(pipe, batch_size=3, eta=0.5)
    assert runner.stats["captures"] == 4
    assert runner.nbytes > 0
    pipe.release_graphs()
    assert len(runner) == 0 and runner.nbytes == 0
    # deleting the pipeline frees its graphs
    _ddim(pipe)
    state = runner._state
    assert state.graphs
    del pipe, runner
    gc.collect()
    assert state.released and not state.graphs and state.pool is None


# ------------------------------------------------------------------------------ weights after capture


def _change_in_place_load_state_dict(pipe):
    state = {k: v * 0.8 for k, v in pipe.unet.state_dict().items()}
    pipe.unet.load_state_dict(state)


def _change_lora_copy(pipe):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                a, b = torch.randn(2, p.shape[1], generator=g), torch.randn(p.shape[0], 2, generator=g)
                p.copy_(p + 0.3 * b @ a)


def _change_assign(pipe):
    state = {k: v * 1.1 for k, v in pipe.unet.state_dict().items()}
    pipe.unet.load_state_dict(state, assign=True)


def _change_replace_unet(pipe):
    pipe.unet = _fastdiff_unet_2d(seed=9)


def _change_dtype(pipe):
    pipe.unet.to(torch.float64).to(torch.float32)  # new tensors, same values: must still give the right output
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.5)


@pytest.mark.parametrize(
    "change", [_change_in_place_load_state_dict, _change_lora_copy, _change_assign, _change_replace_unet, _change_dtype]
)
def test_weight_change_after_capture_shows_in_next_output(change):
    pipe = _ddim_pipe()
    before = _ddim(pipe)
    before = _ddim(pipe)  # captured and replayed
    assert pipe.graph_runner.stats["replays"] >= STEPS - 1
    change(pipe)
    after = _ddim(pipe)
    expected = _ddim(pipe, cuda_graph=False)
    assert not torch.equal(expected, before)
    assert torch.equal(after, expected)


# ------------------------------------------------------------------------------ eager fallbacks, explain


def test_callback_with_tensors_and_resampler_run_eagerly_with_reasons(sd_pipe):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append(i)
        return {"latents": kwargs["latents"] * 0.99}

    eager = sd_pipe(generator=_gen(4), callback_on_step_end=callback, cuda_graph=False, **SD_ARGS).images
    out = sd_pipe(generator=_gen(4), callback_on_step_end=callback, **SD_ARGS).images
    assert torch.equal(out, eager) and seen == list(range(STEPS)) * 2
    assert any("callback_on_step_end" in r for r in sd_pipe._last_loop_reasons)
    assert "callback_on_step_end" in sd_pipe.explain(callback_on_step_end=callback)

    sd_pipe.set_spatial_resampler(fastdiff.Resampler(fraction=0.5))
    try:
        sd_pipe(generator=_gen(4), **SD_ARGS)
        assert any("spatial resampler" in r for r in sd_pipe._last_loop_reasons)
        assert "spatial resampler" in sd_pipe.explain()
    finally:
        sd_pipe.set_spatial_resampler(None)


def test_explain_names_each_op_and_the_loop_without_running(sd_pipe, sdxl_pipe):
    calls = sd_pipe.graph_runner.stats if sd_pipe.graph_runner is not None else {}
    text = sd_pipe.explain(height=32, width=24, batch_size=2)
    assert sd_pipe.graph_runner is None or sd_pipe.graph_runner.stats == calls  # nothing ran through the runner
    assert "batch_size=2, 32x24" in text
    # 32x24 images -> 16x12 latents -> attention at 8x6 = 48 tokens (64-channel blocks: 8 heads of dim 8)
    assert "head dim 8, query length 48, key length 48" in text  # self-attention
    assert "head dim 8, query length 48, key length 16" in text  # cross-attention on 16 text tokens
    assert "group_norm" in text and "activation=silu" in text and "geglu" in text
    assert "scheduler step DDIMScheduler, fused" in text and "would run 'reference'" in text
    assert "denoising loop: captured" in text
    # without the pipeline's forcing, auto runs the plain step on the CPU and says why the loop is eager
    sd_pipe.set_backend(None)
    try:
        text = sd_pipe.explain()
        assert "plain PyTorch step" in text and "runs eagerly" in text and "fused step runs on CUDA" in text
    finally:
        sd_pipe.set_backend(scheduler_step="reference")
    # the real CUDA backend on a CPU pipeline: eager, with the reason
    plain = fastdiff.DDIMPipeline(_fastdiff_unet_2d(), fastdiff.DDIMScheduler(clip_sample=False))
    assert "CUDA graphs need CUDA tensors" in plain.explain()
    xl_text = sdxl_pipe.explain(height=16, width=16)
    assert "head dim 8" in xl_text and "scheduler step EulerDiscreteScheduler" in xl_text


def test_set_backend_is_scoped_to_the_pipeline():
    from fastdiff.backends import trace_dispatch

    pipe, other = _ddim_pipe(), _ddim_pipe()
    other.set_backend(None)
    with trace_dispatch() as calls:
        _ddim(pipe, cuda_graph=False)
    assert ("scheduler_step", "reference") in calls
    with trace_dispatch() as calls:
        _ddim(other, cuda_graph=False)
    assert not any(op == "scheduler_step" for op, _ in calls)  # auto on the CPU: the plain step
    pipe.set_backend(attention="reference")
    with trace_dispatch() as calls:
        _ddim(pipe, cuda_graph=False)
    assert ("attention", "reference") in calls and not any(op == "scheduler_step" for op, _ in calls)
    with pytest.raises(ValueError, match="unknown ops"):
        pipe.set_backend(not_an_op="reference")
    with pytest.raises(ValueError, match="attention='nope'"):
        pipe.set_backend(attention="nope")


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.slow
def test_compile_unet_fullgraph_on_cpu_inductor_matches_eager():
    # the smallest UNet with our ops inside (GroupNorm+SiLU in every resnet, attention in the mid block):
    # CPU inductor's compile time grows with the number of kernels (~20-80 s here on a loaded 2-core machine)
    torch.manual_seed(0)
    unet = fastdiff.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
        attention_head_dim=8, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",),
    ).eval()  # fmt: skip
    pipe = _graph_pipe(fastdiff.DDIMPipeline(unet, fastdiff.DDIMScheduler(clip_sample=False)))
    pipe.set_backend(None)
    eager = _ddim(pipe, cuda_graph=False)
    with pytest.raises(ValueError, match="reduce-overhead"):
        pipe.compile_unet(mode="reduce-overhead")
    torch._dynamo.reset()
    pipe.compile_unet(mode="default", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = _ddim(pipe)
    # inductor reorders the convolution epilogues and reductions: fp32 tolerance (measured 9.5e-7)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert not torch.equal(compiled, _ddim(pipe, seed=1, cuda_graph=False))
    # the stand-in cannot replay inductor's kernels: the loop ran eagerly and says why
    assert any("torch.compile" in r for r in pipe._last_loop_reasons)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ on a GPU (device_run.sh)


def _cuda_pipe(folder, ddim=True):
    """A pipeline on CUDA in fp16 with real CUDA graphs and auto dispatch (the fused step runs on CUDA)."""
    pipe = fastdiff.DiffusionPipeline.from_pretrained(folder).to("cuda", torch.float16)
    if ddim:
        pipe.scheduler = fastdiff.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cuda_latents(pipe, seed=0, **kwargs):
    args = {**SD_ARGS, "height": 64, "width": 64, "num_inference_steps": 6, **kwargs}
    return pipe(generator=_gen(seed), **args).images


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_cuda_captured_equals_eager(arch, sd_folder, sdxl_folder):
    pipe = _cuda_pipe(sd_folder if arch == "sd" else sdxl_folder)
    eager = _cuda_latents(pipe, cuda_graph=False)
    captured = _cuda_latents(pipe)
    assert pipe._last_loop_reasons == [] and pipe.graph_runner.stats["captures"] >= 1
    assert torch.equal(captured, eager)  # the graph replays the eager kernels: bitwise
    again = _cuda_latents(pipe)
    assert torch.equal(again, eager) and pipe.graph_runner.stats["replays"] >= 5
    # ancestral noise: pre-drawn in diffusers' order
    eager_eta = _cuda_latents(pipe, seed=1, eta=1.0, cuda_graph=False)
    assert torch.equal(_cuda_latents(pipe, seed=1, eta=1.0), eager_eta)


@pytest.mark.gpu
@pytest.mark.parametrize("change", ["load_state_dict", "lora_copy", "assign", "replace_unet", "to_dtype"])
def test_cuda_weight_change_after_capture(change, sd_folder):
    pipe = _cuda_pipe(sd_folder)
    _cuda_latents(pipe)
    before = _cuda_latents(pipe)
    unet = pipe.unet
    if change == "load_state_dict":
        unet.load_state_dict({k: v * 0.8 for k, v in unet.state_dict().items()})
    elif change == "lora_copy":
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if name.endswith("weight") and p.dim() == 2:
                    p.add_(0.05 * torch.randn(p.shape[0], 2, device="cuda", dtype=p.dtype) @ torch.randn(2, p.shape[1], device="cuda", dtype=p.dtype))
    elif change == "assign":
        unet.load_state_dict({k: v * 1.1 for k, v in unet.state_dict().items()}, assign=True)
    elif change == "replace_unet":
        other = fastdiff.DiffusionPipeline.from_pretrained(sd_folder).unet.to("cuda", torch.float16)
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(0.9)
        pipe.unet = other
    else:
        unet.to(torch.float32).to(torch.float16)
        with torch.no_grad():
            unet.conv_in.weight.mul_(1.5)
    after = _cuda_latents(pipe)
    expected = _cuda_latents(pipe, cuda_graph=False)
    assert not torch.equal(expected, before)
    assert torch.equal(after, expected)


@pytest.mark.gpu
def test_cuda_memory_bounded_over_cycled_resolutions_and_release(sd_folder):
    pipe = _cuda_pipe(sd_folder)
    pipe._graph_max_graphs = 2
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_reserved()
    after_cycle = []
    for _ in range(3):
        for size in (64, 96, 128, 160, 192):
            _cuda_latents(pipe, height=size, width=size, num_inference_steps=3)
            assert pipe._last_loop_reasons == []
        torch.cuda.synchronize()
        after_cycle.append(torch.cuda.memory_reserved() - baseline)
    runner = pipe.graph_runner
    assert len(runner) == 2 and runner.stats["evictions"] > 0
    mib = 1024 * 1024
    assert after_cycle[2] <= after_cycle[0] + 8 * mib, after_cycle
    pipe.release_graphs()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert len(runner) == 0
    assert torch.cuda.memory_reserved() - baseline <= after_cycle[0], (torch.cuda.memory_reserved() - baseline, after_cycle)
    state = runner._state
    del pipe, runner
    gc.collect()
    assert state.released
