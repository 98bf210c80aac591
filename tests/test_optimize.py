"""fastdiff.optimize(pipe) / revert(pipe) on diffusers pipelines and models (CPU).

diffusers is the oracle: a second instance loaded from the same folder, never optimized, runs the
same prompts, seeds and LoRA operations. The graph path runs through the runner's CPU stand-in
backend (fastdiff.graphs.StandInBackend), which has a CUDA graph's static-buffer semantics.
"""

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny_pipelines as tiny  # noqa: E402

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

import fastdiff  # noqa: E402
from fastdiff.graphs import StandInBackend  # noqa: E402
from fastdiff.optimize_diffusers import (  # noqa: E402
    FastdiffDiffusersAttnProcessor,
    OptimizedGroupNorm,
    SiLUAfterFusedNorm,
    optimization_report,
    optimize,
    revert,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red cat"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster than two fighting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return tiny.save_sd_folder(tmp_path_factory.mktemp("sd"), scheduler="DDIMScheduler", seed=3)


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory):
    """Two tiny LoRAs for the tiny SD UNet, built with peft (random A and B) and saved as diffusers does."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folders = []
    for seed in (11, 12):
        unet = tiny.tiny_unet_2d_condition(seed=3)
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
        folder = str(tmp_path_factory.mktemp(f"lora{seed}"))
        diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
        folders.append(folder)
    return folders


def _load(folder, cls=None):
    pipe = (cls or diffusers.StableDiffusionPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, steps=3, **kwargs):
    kwargs.setdefault("height", 16)
    kwargs.setdefault("width", 16)
    out = pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), output_type="np", **kwargs)
    return out.images


def _assert_close(got, expected, what):
    err = float(np.abs(got.astype(np.float64) - expected.astype(np.float64)).max())
    assert err <= 2e-5, f"{what}: max abs difference {err:.3e} from diffusers' images"


def _layout(model):
    """Everything that identifies a model's modules and processors, to compare before/after."""
    modules = tuple((name, type(m)) for name, m in model.named_modules())
    processors = tuple((k, id(v)) for k, v in model.attn_processors.items()) if hasattr(model, "attn_processors") else ()
    return modules, processors


def test_sd_matches_diffusers_and_revert_is_bitwise(sd_folder):
    ref, pipe, other = _load(sd_folder), _load(sd_folder), _load(sd_folder)
    expected = _images(ref)
    unet_keys = {k: v.data_ptr() for k, v in pipe.unet.state_dict().items()}
    before = {name: _layout(getattr(pipe, name)) for name in ("unet", "vae")}
    original_scheduler = pipe.scheduler
    class_attrs = (
        diffusers.models.resnet.ResnetBlock2D.forward,
        torch.nn.GroupNorm.forward,
        torch.nn.SiLU.forward,
        diffusers.models.attention_processor.AttnProcessor2_0.__call__,
    )
    assert optimize(pipe) is pipe

    # the swaps: state_dict keys and tensors unchanged, fused norms and our processor in place
    assert {k: v.data_ptr() for k, v in pipe.unet.state_dict().items()} == unet_keys
    block = pipe.unet.down_blocks[0].resnets[0]
    assert isinstance(block.norm1, OptimizedGroupNorm) and block.norm1.activation == "silu"
    assert isinstance(block.norm2, OptimizedGroupNorm) and block.norm2.activation == "silu"
    assert isinstance(block.nonlinearity, SiLUAfterFusedNorm)
    transformer_norm = pipe.unet.down_blocks[1].attentions[0].norm
    assert isinstance(transformer_norm, OptimizedGroupNorm) and transformer_norm.activation is None
    assert all(isinstance(p, FastdiffDiffusersAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert all(isinstance(p, FastdiffDiffusersAttnProcessor) for p in pipe.vae.attn_processors.values())
    assert isinstance(pipe.scheduler, fastdiff.DDIMScheduler)
    assert dict(pipe.scheduler.config).items() >= {k: v for k, v in original_scheduler.config.items() if not k.startswith("_")}.items()

    with fastdiff.trace_dispatch() as calls:
        got = _images(pipe)
    _assert_close(got, expected, "optimized SD")
    ops = {op for op, _ in calls}
    assert {"group_norm", "attention"} <= ops
    assert ("attention_processor", "FastdiffDiffusersAttnProcessor") in calls

    # nothing global: other instances and the classes are untouched
    assert class_attrs == (
        diffusers.models.resnet.ResnetBlock2D.forward,
        torch.nn.GroupNorm.forward,
        torch.nn.SiLU.forward,
        diffusers.models.attention_processor.AttnProcessor2_0.__call__,
    )
    assert {name: _layout(getattr(other, name))[0] for name in ("unet", "vae")} == {n: v[0] for n, v in before.items()}
    assert type(other.scheduler) is diffusers.DDIMScheduler
    with fastdiff.trace_dispatch() as calls:
        untouched = _images(other)
    assert calls == [] and np.array_equal(untouched, expected)

    assert revert(pipe) is pipe
    assert {name: _layout(getattr(pipe, name)) for name in ("unet", "vae")} == before
    assert pipe.scheduler is original_scheduler
    assert pipe.config["scheduler"] == ref.config["scheduler"]
    assert np.array_equal(_images(pipe), expected), "revert: the next image must be bitwise the un-optimised one"
    with pytest.raises(ValueError, match="not optimized"):
        revert(pipe)


@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_sd_schedulers(sd_folder, scheduler):
    ref, pipe = _load(sd_folder), _load(sd_folder)
    for p in (ref, pipe):
        p.scheduler = getattr(diffusers, scheduler).from_config(p.scheduler.config)
    expected = _images(ref, steps=4, guidance_scale=1.0)  # no CFG: the scheduler sees the raw UNet output
    optimize(pipe, cuda_graph=StandInBackend())
    assert type(pipe.scheduler) is getattr(fastdiff, scheduler)
    _assert_close(_images(pipe, steps=4, guidance_scale=1.0), expected, f"optimized SD with {scheduler}")


def test_img2img_and_bare_vae(sd_folder):
    ref, pipe = (_load(sd_folder, diffusers.StableDiffusionImg2ImgPipeline) for _ in range(2))
    image = np.random.default_rng(0).random((1, 16, 16, 3)).astype(np.float32)
    expected = _images(ref, steps=5, image=image, strength=0.6)
    optimize(pipe, cuda_graph=StandInBackend())
    _assert_close(_images(pipe, steps=5, image=image, strength=0.6), expected, "optimized img2img")
    revert(pipe)
    assert np.array_equal(_images(pipe, steps=5, image=image, strength=0.6), expected)

    vae = ref.vae
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vae(x, sample_posterior=False).sample
        optimize(vae)
        with fastdiff.trace_dispatch() as calls:
            got = vae(x, sample_posterior=False).sample
        assert ("group_norm", "reference") in calls
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        report = optimization_report(vae)
        assert ("AutoencoderKL", "cuda_graph: only the UNet call is captured (the VAE runs once per image)") in report.left
        revert(vae)
        assert torch.equal(vae(x, sample_posterior=False).sample, want)


def test_sdxl(tmp_path):
    folder = tiny.save_sdxl_folder(tmp_path / "sdxl", seed=4)
    ref, pipe = _load(folder, diffusers.StableDiffusionXLPipeline), _load(folder, diffusers.StableDiffusionXLPipeline)
    expected = _images(ref)
    optimize(pipe, cuda_graph=StandInBackend())
    assert isinstance(pipe.scheduler, fastdiff.EulerDiscreteScheduler)
    runner = optimization_report(pipe).graph_runners["unet"]
    _assert_close(_images(pipe), expected, "optimized SDXL")
    assert runner.stats["captures"] == 1 and runner.stats["replays"] == 2
    revert(pipe)
    assert np.array_equal(_images(pipe), expected)


def test_lora_operations_through_captured_graphs(sd_folder, lora_folders):
    """Each LoRA operation after optimize gives diffusers' images, and no graph serves stale weights."""
    ref, pipe = _load(sd_folder), _load(sd_folder)
    optimize(pipe, cuda_graph=StandInBackend())
    runner = optimization_report(pipe).graph_runners["unet"]
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    base = _images(ref, steps=2)
    _assert_close(_images(pipe, steps=2), base, "before LoRA")
    replays = runner.stats["replays"]

    def both(operation):
        for p in (ref, pipe):
            operation(p)

    def check(what):
        nonlocal replays
        expected = _images(ref, steps=2)
        _assert_close(_images(pipe, steps=2), expected, what)
        assert runner.stats["replays"] > replays, f"{what}: the graph path did not run"
        replays = runner.stats["replays"]
        return expected

    both(lambda p: p.load_lora_weights(lora_folders[0], adapter_name="a"))
    assert type(attn.to_q).__module__.startswith("peft") and isinstance(attn.processor, FastdiffDiffusersAttnProcessor)
    with_a = check("load_lora_weights")
    assert np.abs(with_a - base).max() > 1e-3, "the LoRA must change the image for this test to mean anything"
    both(lambda p: p.set_adapters(["a"], [0.4]))
    check("set_adapters(0.4)")
    both(lambda p: p.load_lora_weights(lora_folders[1], adapter_name="b"))
    both(lambda p: p.set_adapters(["a", "b"], [0.7, -0.5]))
    check("two adapters")
    both(lambda p: p.fuse_lora(lora_scale=0.8))
    check("fuse_lora")
    both(lambda p: p.unfuse_lora())
    check("unfuse_lora")
    both(lambda p: p.unload_lora_weights())
    assert type(attn.to_q) is torch.nn.Linear
    _assert_close(check("unload_lora_weights"), base, "after unload (diffusers itself)")
    assert runner.stats["captures"] >= 5 and runner.stats.get("capture_failures", 0) == 0

    # a weight replaced outside LoRA: new storage recaptures; an in-place copy is read by the graph
    new_weight = torch.nn.Parameter(pipe.unet.conv_in.weight.detach() * 1.5)
    ref.unet.conv_in.weight = torch.nn.Parameter(new_weight.detach().clone())
    pipe.unet.conv_in.weight = new_weight
    check("conv_in.weight replaced")
    assert runner.stats["recaptures_weights"] >= 1
    with torch.no_grad():
        for p in (ref, pipe):
            p.unet.conv_out.bias.add_(0.25)
    check("conv_out.bias changed in place")
    revert(pipe)
    assert "forward" not in vars(pipe.unet) and len(runner) == 0


def test_lora_eager_path(sd_folder, lora_folders):
    ref, pipe = _load(sd_folder), _load(sd_folder)
    optimize(pipe)  # on the CPU: no graphs, the swapped modules only
    for p in (ref, pipe):
        p.load_lora_weights(lora_folders[1], adapter_name="b")
        p.set_adapters(["b"], [0.6])
    _assert_close(_images(pipe, cross_attention_kwargs={"scale": 0.5}), _images(ref, cross_attention_kwargs={"scale": 0.5}), "LoRA eager")


def test_bare_unets_graphs_and_unusual_blocks():
    """UNet2DModel with scale_shift time embedding (norm2 is followed by scale/shift, not SiLU:
    it stays unfused), a custom processor (left), and the stand-in graphs."""
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, attention_head_dim=8, resnet_time_scale_shift="scale_shift",
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    tiny._randomize_norms(unet, 5)

    class CustomProcessor(diffusers.models.attention_processor.AttnProcessor2_0):
        pass

    custom = CustomProcessor()
    unet.down_blocks[1].attentions[0].set_processor(custom)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 500])
    with torch.no_grad():
        want = unet(x, t).sample
        optimize(unet, cuda_graph=StandInBackend())
        block = unet.down_blocks[0].resnets[0]
        assert block.norm1.activation == "silu" and block.norm2.activation is None
        report = optimization_report(unet)
        assert any(w == "down_blocks.0.resnets.0.norm2" and "not followed directly by self.nonlinearity" in why for w, why in report.left)
        why = "processor CustomProcessor is not one fastdiff replaces (AttnProcessor2_0, AttnProcessor)"
        assert ("down_blocks.1.attentions.0", why) in report.left
        assert unet.down_blocks[1].attentions[0].processor is custom
        outs = [unet(x, t).sample for _ in range(3)]  # warm-up, capture + replay, replay
        runner = report.graph_runners["UNet2DModel"]
        assert runner.stats["captures"] == 1 and runner.stats["replays"] == 2
        for got in outs:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert outs[1].data_ptr() != outs[2].data_ptr(), "a replayed output must not alias the graph's static buffer"
        out = unet(x, 10, return_dict=False)  # a Python timestep becomes a tensor input, as in diffusers
        torch.testing.assert_close(out[0], unet.__class__.forward(unet, x, 10).sample, rtol=1e-5, atol=1e-5)
        revert(unet)
        assert torch.equal(unet(x, t).sample, want)

    cond = tiny.tiny_unet_2d_condition(seed=6)
    sample = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = cond(sample, 321, text).sample
        optimize(cond, backend="reference", cuda_graph=False)
        with fastdiff.trace_dispatch() as calls:
            got = cond(sample, 321, text).sample
        assert ("attention", "reference") in calls and ("group_norm", "reference") in calls
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_report(sd_folder, capsys):
    pipe = _load(sd_folder)
    optimize(pipe, scheduler=False, report=True)
    printed = capsys.readouterr().out
    report = optimization_report(pipe)
    assert printed.strip() == str(report)
    swapped = dict(report.swapped)
    assert "fused" in swapped["unet.down_blocks.0.resnets.0.norm1"]
    assert swapped["unet.conv_norm_out"].endswith("(fused)")
    assert "FastdiffDiffusersAttnProcessor" in swapped["unet.mid_block.attentions.0.transformer_blocks.0.attn2"]
    assert "scheduler" not in swapped
    left = dict(report.left)
    assert "not a diffusers model" in left["text_encoder"]
    assert "on cpu" in left["unet"]
    revert(pipe)

    optimize(pipe, group_norm=False, attention=False, cuda_graph=False)
    report = optimization_report(pipe)
    assert [w for w, _ in report.swapped] == ["scheduler"]
    assert "classifier-free guidance is not folded" in dict(report.left)["scheduler.guidance"]
    revert(pipe)


def test_bad_inputs(sd_folder):
    with pytest.raises(TypeError, match="pipe must be a diffusers pipeline"):
        optimize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="already run fastdiff's kernels"):
        optimize(fastdiff.nn.GroupNorm(2, 4))
    unet = tiny.tiny_unet_2d(seed=1)
    with pytest.raises(TypeError, match="group_norm must be True or False"):
        optimize(unet, group_norm="yes")
    with pytest.raises(TypeError, match="cuda_graph must be True, False or a fastdiff.graphs capture backend"):
        optimize(unet, cuda_graph="cuda")
    with pytest.raises(ValueError, match="backend='nope'"):
        optimize(unet, backend="nope")
    with pytest.raises(ValueError, match="backend has an unknown op 'geglu'"):
        optimize(unet, backend={"geglu": "triton"})
    with pytest.raises(ValueError, match="not optimized"):
        revert(unet)
    assert not any(isinstance(m, OptimizedGroupNorm) for m in unet.modules()), "a refused call must change nothing"
    optimize(unet)
    with pytest.raises(ValueError, match="already optimized"):
        optimize(unet)
    revert(unet)
    pipe = _load(sd_folder)
    optimize(pipe)
    with pytest.raises(ValueError, match="call fastdiff.revert\\(pipe\\) on the pipeline"):
        revert(pipe.unet)
    pipe.unet.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="attention processor was changed after optimize"):
        revert(pipe)
    assert not any(isinstance(m, (OptimizedGroupNorm, SiLUAfterFusedNorm)) for m in pipe.unet.modules())


def test_bench_optimize_cpu_plumbing(capsys, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_optimize", os.path.join(ROOT, "benchmarks", "bench_optimize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.bench_arch(
        "tiny", torch.device("cpu"), torch.float32, steps=2, iters=1, with_compile=False, compile_mode=None, lora_rank=4
    )
    assert [r["provider"] for r in rows] == ["diffusers-eager", "fastdiff-optimize"]
    assert rows[1]["swaps"] > 20 and rows[0]["swaps"] == 0
    for r in rows:
        assert r["it_per_s"] > 0 and r["first_call_s"] > 0 and r["lora_load_s"] > 0
        assert r["max_abs_diff_vs_eager"] <= 1e-4 * r["latent_scale"] and r["lora_max_abs_diff_vs_eager"] <= 1e-4 * r["latent_scale"]
    module.print_table({"card": "cpu", "torch": torch.__version__, "triton": None, "commit": "test"}, torch.float32, rows)
    out = capsys.readouterr().out
    assert "== table ==" in out and "fastdiff-optimize" in out
    with pytest.raises(SystemExit):
        module.main(["--tiny", "--archs", "sd3"])


def test_fusion_reads_the_forward():
    """A GroupNorm is fused with a SiLU only where the parent's forward feeds the norm's output
    straight into the activation and uses it nowhere else."""
    from torch import nn

    from fastdiff.optimize_diffusers import _fusion_partner

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.GroupNorm(2, 4)
            self.act = nn.SiLU()
            self.mode = "plain"

    class Fusable(Block):
        def forward(self, x):
            h = self.norm(x)
            h = self.act(h)
            return h + self.act(x)

    class NormOutputReused(Block):
        def forward(self, x):
            h = self.norm(x)
            skip = h * 2
            h = self.act(h)
            return h + skip

    class NormReadElsewhere(Block):
        def forward(self, x):
            h = self.norm(x)
            h = self.act(h)
            return h * self.norm.weight.mean()

    class DeadBranch(Block):
        def forward(self, x):
            if self.mode == "scale":
                h = self.norm(x)
                h = h * 3
            else:
                h = self.norm(x)
            h = self.act(h)
            return h

    assert _fusion_partner(Fusable(), "norm") == ("act", None)
    assert _fusion_partner(DeadBranch(), "norm") == ("act", None)
    scaled = DeadBranch()
    scaled.mode = "scale"
    for block in (NormOutputReused(), NormReadElsewhere(), scaled):
        partner, why = _fusion_partner(block, "norm")
        assert partner is None and "self.norm" in why, (type(block).__name__, why)


@pytest.mark.gpu
def test_cuda_graphs_fp16_and_lora(sd_folder, lora_folders):
    """On CUDA in fp16: real CUDA graphs capture the UNet call, images match diffusers' within
    fp16 tolerance, a LoRA scale change after capture is seen, revert is bitwise."""

    def cuda_pipe():
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, torch_dtype=torch.float16).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def images(pipe, steps=4):
        g = torch.Generator("cuda").manual_seed(7)
        return pipe(PROMPT, num_inference_steps=steps, generator=g, output_type="np", height=16, width=16).images

    ref, pipe = cuda_pipe(), cuda_pipe()
    expected = images(ref)
    optimize(pipe)
    runner = optimization_report(pipe).graph_runners["unet"]
    got = images(pipe)
    assert runner.stats["captures"] == 1 and runner.stats["replays"] >= 2, runner.stats
    assert np.abs(got - expected).max() < 1e-2
    for p in (ref, pipe):
        p.load_lora_weights(lora_folders[0], adapter_name="a")
    for scale in (1.0, 0.3):
        for p in (ref, pipe):
            p.set_adapters(["a"], [scale])
        assert np.abs(images(pipe) - images(ref)).max() < 1e-2, f"LoRA scale {scale}"
    for p in (ref, pipe):
        p.unload_lora_weights()
    revert(pipe)
    assert np.array_equal(images(pipe), expected)
