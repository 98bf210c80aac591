"""fastdiff.warmup: one eager run that dispatches and tunes every op, its report, and its errors (CPU).

What needs a GPU (a capture that tunes raises, then warmup and the capture succeeds; the configs
persist between processes) is in tests/test_gpu_reproducibility.py.
"""

import pytest
import torch

import fastdiff
import fastdiff.graphs
import fastdiff.tuning
from _tiny_pipelines import one_torch_thread, save_sd_folder, save_unconditional_folder  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 2


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = fastdiff.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=24, attention_head_dim=8, norm_num_groups=8,
    )  # fmt: skip
    return unet.eval()


def _unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(2, 4, 7, 9, generator=g),
        timestep=torch.tensor(417),
        encoder_hidden_states=torch.randn(2, 5, 24, generator=g),
    )


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory, one_torch_thread):
    return save_unconditional_folder(tmp_path_factory.mktemp("ddpm"), "DDPMPipeline", seed=3)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, one_torch_thread):
    return save_sd_folder(tmp_path_factory.mktemp("sd"), scheduler="DDIMScheduler", seed=4)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- models


def test_module_report_lists_the_dispatched_ops_and_outputs_are_unchanged():
    unet = _tiny_unet()
    kwargs = _unet_inputs()
    with torch.no_grad(), fastdiff.trace_dispatch() as calls:
        before = unet(**kwargs).sample

    report = fastdiff.warmup(unet, kwargs)

    assert isinstance(report, fastdiff.tuning.WarmupReport) and report.kind == "module"
    # the same ops, on the same backends, as many times as a plain forward dispatches them
    ops = [call for call in calls if call[0] != "attention_processor"]
    assert report.ops == {key: ops.count(key) for key in set(ops)}
    assert {"group_norm", "attention"} <= set(report.backends) and "attention_processor" not in report.backends
    processors = [name for op, name in calls if op == "attention_processor"]
    assert processors and report.processors == {name: processors.count(name) for name in set(processors)}
    assert report.seconds > 0
    text = str(report)
    assert "group_norm -> " in text and "attention -> " in text
    with torch.no_grad():
        after = unet(**kwargs).sample
    assert torch.equal(after, before)
    assert unet.training is False


def test_module_with_positional_inputs_keeps_training_mode_and_grads():
    unet = _tiny_unet().train()
    kwargs = _unet_inputs()
    args = (kwargs["sample"], kwargs["timestep"], kwargs["encoder_hidden_states"])
    report = fastdiff.warmup(unet, args, persist=False)
    assert report.ops and report.autotune_cache == {}
    assert unet.training is True  # warmup does not switch modes
    assert all(p.grad is None for p in unet.parameters())  # no_grad: nothing accumulated


def test_rng_is_restored():
    """A module that draws from the global generator: the draws after warmup are those without it."""

    class Noisy(torch.nn.Module):
        def forward(self, x):
            return fastdiff.ops.group_norm(x + torch.randn_like(x), 2)

    x = torch.randn(1, 4, 3, 5)
    torch.manual_seed(11)
    expected = torch.randn(3)
    torch.manual_seed(11)
    fastdiff.warmup(Noisy(), (x,), persist=False)
    assert torch.equal(torch.randn(3), expected)


# ---------------------------------------------------------------------------------------------- tuned keys

triton = pytest.importorskip("triton")
tl = triton.language


@triton.jit
def _scale_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 3.0, mask=offs < n)


def _first_config_wins(kernel_call, quantiles):
    kernel_call()  # runs the candidate once (under the interpreter on the CPU)
    return [1.0, 1.0, 1.0]


_scale_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=1)],
    key=["n"],
    do_bench=_first_config_wins,
)(_scale_kernel)


class _Scale(torch.nn.Module):
    def forward(self, x):
        y = torch.empty_like(x)
        _scale_tuned[lambda meta: (triton.cdiv(x.numel(), meta["BLOCK"]),)](x, y, x.numel())
        return y


@pytest.mark.skipif(not fastdiff.backends.triton_interpret_enabled() and not torch.cuda.is_available(), reason="needs TRITON_INTERPRET=1 or a GPU")
def test_report_names_the_keys_each_autotuner_gained(monkeypatch):
    """warmup reads the autotuners' caches before and after: only the keys of this run are reported."""
    monkeypatch.setattr(fastdiff.tuning, "_autotuned_kernels", lambda: {"test._scale_tuned": _scale_tuned})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(37, device=device)

    first = fastdiff.warmup(_Scale(), (x,), persist=False)
    assert first.tuned == {"test._scale_tuned": [(37, "torch.float32", "torch.float32")]}
    assert "tuned test._scale_tuned: 1 new key(s)" in str(first)
    assert torch.equal(_Scale()(x), x * 3)

    assert fastdiff.warmup(_Scale(), (x,), persist=False).tuned == {}  # tuned already
    third = fastdiff.warmup(_Scale(), (torch.randn(50, device=device),), persist=False)
    assert third.tuned == {"test._scale_tuned": [(50, "torch.float32", "torch.float32")]}


def test_persist_turns_on_the_autotune_disk_cache_once(monkeypatch):
    calls = []

    def fake_enable():
        calls.append(1)
        return {"triton": triton.__version__, "knob": True, "kernels": {"attention._attn_fwd_tuned": True}, "skipped": {}}

    monkeypatch.setattr(fastdiff.graphs, "_AUTOTUNE_CACHE_REPORT", None)
    monkeypatch.setattr(fastdiff.graphs, "enable_triton_autotune_cache", fake_enable)
    x = torch.randn(1, 4, 3, 5)
    module = torch.nn.GroupNorm(2, 4)
    first = fastdiff.warmup(module, (x,))
    second = fastdiff.warmup(module, (x,))
    assert calls == [1]  # once per process
    assert first.autotune_cache["kernels"] == {"attention._attn_fwd_tuned": True}
    assert "autotune disk cache: on for ['attention._attn_fwd_tuned']" in str(second)


def test_the_real_disk_cache_report_under_this_triton(monkeypatch):
    monkeypatch.setattr(fastdiff.graphs, "_AUTOTUNE_CACHE_REPORT", None)
    report = fastdiff.warmup(torch.nn.GroupNorm(2, 4), (torch.randn(1, 4, 3, 5),))
    tuners = fastdiff.graphs._autotuned_kernels()
    assert set(report.autotune_cache["kernels"]) | set(report.autotune_cache["skipped"]) == set(tuners)
    if fastdiff.backends.triton_interpret_enabled():
        assert all("TRITON_INTERPRET" in why for why in report.autotune_cache["skipped"].values())


# ---------------------------------------------------------------------------------------------- pipelines


def test_ddpm_pipeline_runs_eagerly_and_leaves_the_generator_as_it_was(ddpm_folder):
    pipe = _quiet(fastdiff.DDPMPipeline.from_pretrained(ddpm_folder))
    kwargs = dict(batch_size=2, num_inference_steps=STEPS, output_type="pt")
    expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images

    generator = torch.Generator().manual_seed(0)
    report = fastdiff.warmup(pipe, dict(generator=generator, **kwargs))

    assert report.kind == "pipeline"
    assert {"group_norm", "attention"} <= set(report.backends)
    assert any("CUDA graphs are turned off" in reason for reason in pipe._last_loop_reasons)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())
    assert torch.equal(pipe(generator=generator, **kwargs).images, expected)


def test_optimized_diffusers_pipeline_runs_with_its_graphs_off(ddpm_folder):
    diffusers = pytest.importorskip("diffusers")
    pipe = _quiet(diffusers.DDPMPipeline.from_pretrained(ddpm_folder))
    fastdiff.optimize(pipe, cuda_graph=fastdiff.graphs.StandInBackend())  # the CPU stand-in would capture at step 2
    (runner,) = fastdiff.optimization_report(pipe).graph_runners.values()
    kwargs = dict(batch_size=1, num_inference_steps=STEPS, output_type="np")
    report = fastdiff.warmup(pipe, dict(generator=torch.Generator().manual_seed(2), **kwargs))
    assert report.kind == "pipeline" and {"group_norm", "attention"} <= set(report.backends)
    assert runner.stats.get("captures", 0) == 0 and runner.stats["eager_calls"] == STEPS
    assert runner.enabled is True  # switched back on
    with pytest.raises(TypeError, match=r"DDPMPipeline.__call__ takes no argument\(s\) \['guidance_scale'\]"):
        fastdiff.warmup(pipe, dict(guidance_scale=3.0, **kwargs))


def test_sd_pipeline_with_prompt_and_global_rng(sd_folder):
    pipe = _quiet(fastdiff.StableDiffusionPipeline.from_pretrained(sd_folder))
    kwargs = dict(prompt="a red cat", num_inference_steps=STEPS, guidance_scale=6.0, output_type="pt", height=16, width=16)
    torch.manual_seed(21)
    expected = pipe(**kwargs).images

    torch.manual_seed(21)
    report = fastdiff.warmup(pipe, kwargs)

    calls = sum(n for (op, _), n in report.ops.items() if op == "attention")
    assert calls >= 2 * STEPS  # self- and cross-attention at every step (and the VAE's)
    assert torch.equal(pipe(**kwargs).images, expected)


# ---------------------------------------------------------------------------------------------- errors


def test_errors_name_the_argument(ddpm_folder):
    unet = _tiny_unet()
    with pytest.raises(TypeError, match="module_or_pipeline: expected a model .* got str"):
        fastdiff.warmup("unet", ())
    with pytest.raises(TypeError, match="module_or_pipeline: .* got function"):
        fastdiff.warmup(lambda x: x, (torch.randn(2),))
    with pytest.raises(TypeError, match=r"example_inputs: .* got Tensor \(wrap a single tensor as \(x,\)\)"):
        fastdiff.warmup(torch.nn.GroupNorm(2, 4), torch.randn(1, 4, 3))
    with pytest.raises(TypeError, match=r"example_inputs: UNet2DConditionModel.forward takes no argument\(s\) \['latents'\]"):
        fastdiff.warmup(unet, dict(latents=torch.randn(1, 4, 8, 8)))
    with pytest.raises(TypeError, match="persist: expected True or False"):
        fastdiff.warmup(unet, _unet_inputs(), persist="yes")

    pipe = _quiet(fastdiff.DDPMPipeline.from_pretrained(ddpm_folder))
    with pytest.raises(TypeError, match=r"example_inputs: for a pipeline, expected a dict of DDPMPipeline.__call__ keyword"):
        fastdiff.warmup(pipe, (1,))
    with pytest.raises(TypeError, match=r"DDPMPipeline.__call__ takes no argument\(s\) \['prompt'\]"):
        fastdiff.warmup(pipe, dict(prompt="a cat"))
    with pytest.raises(ValueError, match="leave out cuda_graph"):
        fastdiff.warmup(pipe, dict(num_inference_steps=1, cuda_graph=True))


def test_refused_inside_a_capture(monkeypatch):
    import fastdiff.kernels._tuning as tuning

    monkeypatch.setattr(tuning, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
        fastdiff.warmup(torch.nn.GroupNorm(2, 4), (torch.randn(1, 4, 3),))
