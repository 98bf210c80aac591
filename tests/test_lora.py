"""LoRA in fastdiff's pipelines against diffusers/peft with the same LoRA tensors.

The oracle pipelines get their adapters from peft directly (diffusers' ``unet.add_adapter`` and
peft's ``inject_adapter_in_model`` for the text encoders: transformers 5 refuses peft 0.21 in
``load_adapter``, so diffusers' ``load_lora_weights`` is used for UNet-only files). The LoRA files are
written by diffusers' ``save_lora_weights`` from those adapters, and a kohya-format file by this test
from the same tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastdiff
from _tiny_pipelines import one_torch_thread, save_sd_folder, save_sdxl_folder  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ARGS = dict(prompt="a red cat", num_inference_steps=2, guidance_scale=5.0, output_type="np")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _add_peft(model, name, targets, seed, alpha, rank=4, diffusers_model=True):
    """Give ``model`` a peft adapter with seeded random A and B (peft's default zero B would be a no-op)."""
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    if diffusers_model:
        model.add_adapter(config, adapter_name=name)
    else:
        peft.inject_adapter_in_model(config, model, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".lora_A.{name}." in key or f".lora_B.{name}." in key:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return {"r": rank, "lora_alpha": alpha, "target_modules": targets}


def _peft_layers(model, name):
    """peft keys of one adapter without its name (what get_peft_model_state_dict gives)."""
    out = {}
    for key, p in model.named_parameters():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.{name}.weight"
            if key.endswith(tag):
                out[key[: -len(tag)] + f".{part}.weight"] = p.detach().clone()
    return out


def _to_kohya(layers, prefix, alpha):
    out = {}
    for key, value in layers.items():
        path, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        flat = prefix + path.replace(".", "_")
        out[f"{flat}.{'lora_down' if part == 'lora_A' else 'lora_up'}.weight"] = value
        out[f"{flat}.alpha"] = torch.tensor(float(alpha))
    return out


def _to_sgm(path):
    """diffusers UNet path -> the original UNet's (kohya's SDXL files), for layers_per_block=1."""
    import re

    path = re.sub(r"\.conv1$", ".in_layers.2", path) if ".resnets." in path else path
    rules = (
        (r"down_blocks\.(\d+)\.resnets\.0\.", lambda m: f"input_blocks.{1 + 2 * int(m[1])}.0."),
        (r"down_blocks\.(\d+)\.attentions\.0\.", lambda m: f"input_blocks.{1 + 2 * int(m[1])}.1."),
        (r"mid_block\.resnets\.(\d+)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
        (r"mid_block\.attentions\.0\.", lambda m: "middle_block.1."),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"output_blocks.{2 * int(m[1]) + int(m[2])}.0."),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"output_blocks.{2 * int(m[1]) + int(m[2])}.1."),
    )
    for pattern, repl in rules:
        path, n = re.subn("^" + pattern, repl, path)
        if n:
            return path
    raise AssertionError(f"no SGM name for {path}")


def _save_kohya(path, state_dict):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(path, "kohya.safetensors"))
    return os.path.join(path, "kohya.safetensors")


def _diffusers_set(ref, weights: dict, te_names=("text_encoder",)):
    """Activate adapters on the oracle: ``weights`` {adapter: weight}; text encoders carry adapter 'a' only."""
    from diffusers.utils.peft_utils import set_weights_and_activate_adapters

    ref.unet.set_adapters(list(weights), weights=list(weights.values()))
    for te in te_names:
        model = getattr(ref, te)
        if "a" in weights:
            set_weights_and_activate_adapters(model, ["a"], [weights["a"]])


@pytest.fixture(scope="module")
def sd(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("sd_lora")
    folder = save_sd_folder(root / "pipe")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    base = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    meta_a = _add_peft(ref.unet, "a", UNET_TARGETS, 1, alpha=8)
    meta_te = _add_peft(ref.text_encoder, "a", TE_TARGETS, 2, alpha=2, diffusers_model=False)
    meta_b = _add_peft(ref.unet, "b", ["to_k", "to_v", "ff.net.2"], 3, alpha=4, rank=2)
    unet_a, te_a, unet_b = _peft_layers(ref.unet, "a"), _peft_layers(ref.text_encoder, "a"), _peft_layers(ref.unet, "b")
    files = {}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        root / "a", unet_lora_layers=unet_a, text_encoder_lora_layers=te_a,
        unet_lora_adapter_metadata=meta_a, text_encoder_lora_adapter_metadata=meta_te,
    )  # fmt: skip
    files["a"] = str(root / "a")
    diffusers.StableDiffusionPipeline.save_lora_weights(root / "b", unet_lora_layers=unet_b, unet_lora_adapter_metadata=meta_b)
    files["b"] = str(root / "b" / "pytorch_lora_weights.safetensors")
    files["a_kohya"] = _save_kohya(root / "k", {**_to_kohya(unet_a, "lora_unet_", 8), **_to_kohya(te_a, "lora_te_", 2)})
    ours = fastdiff.StableDiffusionPipeline.from_pretrained(folder)
    for p in (ref, base, ours):
        p.set_progress_bar_config(disable=True)
    return dict(folder=folder, root=root, ref=ref, base=base, ours=ours, files=files, unet_b=unet_b, meta_b=meta_b)


def _image(pipe, **kwargs):
    return pipe(generator=_gen(0), **{**ARGS, **kwargs}).images


def _close(a, b, tol=2e-4):
    err = abs(a - b).max()
    assert err <= tol, f"max abs error {err} > {tol}"


def _unet_snapshot(pipe):
    return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_sd_files_match_diffusers(sd):
    ours, ref, base = sd["ours"], sd["ref"], sd["base"]
    plain = _image(ours)
    original = _unet_snapshot(ours)
    ours.load_lora_weights(sd["files"]["a"], adapter_name="a")
    assert ours.get_active_adapters() == ["a"]
    assert ours.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    _diffusers_set(ref, {"a": 1.0})
    with_a = _image(ours)
    _close(with_a, _image(ref))
    assert abs(with_a - plain).max() > 0.02  # the LoRA changes the image
    # cross_attention_kwargs scale reaches the UNet and the text encoder, as in diffusers
    _close(_image(ours, cross_attention_kwargs={"scale": 0.5}), _image(ref, cross_attention_kwargs={"scale": 0.5}))
    # encode_prompt's lora_scale scales the text encoder's LoRA layers, as in diffusers
    embeds = ours.encode_prompt("a red cat", "cpu", 1, False, lora_scale=0.3)[0]
    _close(embeds, ref.encode_prompt("a red cat", "cpu", 1, False, lora_scale=0.3)[0], tol=1e-5)
    assert not torch.allclose(embeds, ours.encode_prompt("a red cat", "cpu", 1, False)[0])
    # two adapters with weights; b is UNet-only
    ours.load_lora_weights(sd["files"]["b"], adapter_name="b")
    assert ours.get_active_adapters() == ["b"]  # as diffusers: the adapter just loaded
    ours.set_adapters(["a", "b"], adapter_weights=[0.7, -0.6])
    _diffusers_set(ref, {"a": 0.7, "b": -0.6})
    _close(_image(ours), _image(ref))
    assert ours.get_active_adapters() == ["a", "b"]
    # disable / enable: bitwise the plain pipeline while disabled
    ours.disable_lora()
    assert (_image(ours) == plain).all()
    ours.enable_lora()
    _close(_image(ours), _image(ref))
    # delete b: a alone again
    ours.delete_adapters("b")
    ours.set_adapters("a")
    assert ours.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}
    _close(_image(ours), with_a, tol=1e-6)
    # fuse / unfuse: fused with lora_scale equals the unfused scale; unfuse restores the weights bitwise
    unfused_08 = _image(ours, cross_attention_kwargs={"scale": 0.8})
    ours.fuse_lora(lora_scale=0.8)
    fused_weight = ours.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.clone()
    assert not torch.equal(fused_weight, original["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    _close(_image(ours), unfused_08, tol=5e-4)
    ours.unfuse_lora()
    for key, value in ours.unet.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, original[key.replace(".base_layer", "")]), key
    _close(_image(ours), with_a, tol=1e-6)
    # unload: the original modules, keys and weights, bitwise
    ours.unload_lora_weights()
    assert ours.get_active_adapters() == [] and ours.get_list_adapters() == {}
    now = ours.unet.state_dict()
    assert list(now) == list(original) and all(torch.equal(now[k], original[k]) for k in original)
    assert (_image(ours) == plain).all()
    assert abs(_image(base) - plain).max() < 2e-4  # the plain fastdiff pipeline is diffusers' too


def test_kohya_file_equals_peft_file(sd):
    ours = sd["ours"]
    ours.load_lora_weights(sd["files"]["a"], adapter_name="peft")
    from_peft = _image(ours)
    ours.unload_lora_weights()
    folder, name = os.path.split(sd["files"]["a_kohya"])
    ours.load_lora_weights(folder, weight_name=name)
    assert ours.get_active_adapters() == ["default_0"]
    _close(_image(ours), from_peft, tol=1e-6)
    ours.unload_lora_weights()


def test_save_and_load_both_ways(sd, tmp_path):
    ours, base = sd["ours"], sd["base"]
    ours.load_lora_weights(sd["files"]["b"], adapter_name="b")
    with_b = _image(ours)
    # ours -> diffusers: diffusers' load_lora_weights reads the file fastdiff writes
    from fastdiff.loaders import get_lora_adapter_metadata, get_lora_state_dict

    layers = get_lora_state_dict(ours.unet, "b")
    assert set(layers) == set(sd["unet_b"]) and all(torch.equal(layers[k], sd["unet_b"][k]) for k in layers)
    fastdiff.StableDiffusionPipeline.save_lora_weights(
        tmp_path / "ours", unet_lora_layers=layers, unet_lora_adapter_metadata=get_lora_adapter_metadata(ours.unet, "b")
    )
    fresh = diffusers.StableDiffusionPipeline.from_pretrained(sd["folder"])
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(tmp_path / "ours", adapter_name="b")
    _close(_image(fresh), with_b)
    # and back: the whole adapter (with the text encoder part) round-trips through fastdiff
    ours.load_lora_weights(sd["files"]["a"], adapter_name="a")
    ours.set_adapters("a")
    with_a = _image(ours)
    ours.save_lora_adapter(tmp_path / "a", "a")
    state_dict, alphas, metadata = fastdiff.StableDiffusionPipeline.lora_state_dict(tmp_path / "a", return_lora_metadata=True)
    assert alphas is None and metadata["unet"]["lora_alpha"] == 8 and metadata["text_encoder"]["lora_alpha"] == 2
    ref_sd, _ = diffusers.StableDiffusionPipeline.lora_state_dict(sd["files"]["a"])
    assert set(state_dict) == set(ref_sd)
    ours.unload_lora_weights()
    ours.load_lora_weights(tmp_path / "a")
    _close(_image(ours), with_a, tol=1e-6)
    ours.unload_lora_weights()


def _expect_unchanged(pipe, call, error, match):
    before = _unet_snapshot(pipe)
    adapters, active = pipe.get_list_adapters(), pipe.get_active_adapters()
    with pytest.raises(error, match=match):
        call()
    now = pipe.unet.state_dict()
    assert list(now) == list(before) and all(torch.equal(now[k], before[k]) for k in before)
    assert pipe.get_list_adapters() == adapters and pipe.get_active_adapters() == active


def test_bad_input_leaves_the_pipeline_unchanged(sd, sdxl, tmp_path):
    ours = sd["ours"]
    ours.load_lora_weights(sd["files"]["b"], adapter_name="b")
    _expect_unchanged(ours, lambda: ours.load_lora_weights(tmp_path / "missing.safetensors"), FileNotFoundError, "missing")
    _expect_unchanged(ours, lambda: ours.load_lora_weights(tmp_path), FileNotFoundError, "pytorch_lora_weights")
    state_dict, _ = fastdiff.StableDiffusionPipeline.lora_state_dict(sd["files"]["a"])
    bad = dict(state_dict)
    bad["unet.mid_block.nonexistent.lora_A.weight"] = torch.randn(4, 8)
    bad["something_else"] = torch.randn(3)
    _expect_unchanged(ours, lambda: ours.load_lora_weights(bad), ValueError, "nonexistent.*something_else|something_else")
    # another architecture: same module names, other widths (an SDXL-sized LoRA on SD)
    wrong = {k: torch.randn(v.shape[0] + 3 if "lora_B" in k else v.shape[0], *v.shape[1:]) for k, v in state_dict.items()}
    _expect_unchanged(ours, lambda: ours.load_lora_weights(wrong), ValueError, "does not fit.*expected lora_A")
    # the SDXL LoRA on SD: modules SD lacks (text_encoder_2, a second transformer block) are named
    _expect_unchanged(ours, lambda: ours.load_lora_weights(sdxl["file"]), ValueError, "match no module.*text_encoder_2")
    _expect_unchanged(ours, lambda: ours.set_adapters(["b", "nope"]), ValueError, "no adapter named \\['nope'\\]")
    _expect_unchanged(ours, lambda: ours.delete_adapters("nope"), ValueError, "nope")
    _expect_unchanged(ours, lambda: ours.load_lora_weights(sd["files"]["b"], adapter_name="b"), ValueError, "already loaded")
    _expect_unchanged(ours, lambda: ours.set_adapters("b", adapter_weights=[1.0, 2.0]), ValueError, "one weight per adapter")
    ours.unload_lora_weights()


def test_fused_qkv_projections_with_lora(sd):
    ours = sd["ours"]
    ours.load_lora_weights(sd["files"]["a"], adapter_name="a")
    expected = _image(ours)
    ours.unet.fuse_qkv_projections()  # after loading: the LoRA must still run
    _close(_image(ours), expected, tol=1e-5)
    attn = ours.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert not attn.fused_projections  # an unfused adapter runs on q/k/v: un-fused at the UNet call
    ours.fuse_lora()  # fused LoRA: the projections fuse again, and their fused weight has the LoRA
    _close(_image(ours), expected, tol=5e-4)
    assert attn.fused_projections
    ours.unfuse_lora()  # unfused LoRA active again: un-fused projections
    _close(_image(ours), expected, tol=1e-5)
    assert not attn.fused_projections
    ours.unload_lora_weights()
    assert attn.fused_projections  # fastdiff put back what it un-fused
    ours.unet.unfuse_qkv_projections()


def test_switches_under_the_graph_runner(sd):
    """A CPU stand-in for CUDA graphs: a captured UNet call sees adapter switches; fused switches reuse it."""
    from fastdiff.graphs import GraphRunner, StandInBackend

    ours = sd["ours"]
    ours.load_lora_weights(sd["files"]["a"], adapter_name="a")
    ours.load_lora_weights(sd["files"]["b"], adapter_name="b")
    ours.set_adapters(["a", "b"], [1.0, 0.5])
    g = torch.Generator().manual_seed(5)
    inputs = dict(
        sample=torch.randn(2, 4, 8, 8, generator=g), t=torch.tensor(500), text=torch.randn(2, 16, 32, generator=g)
    )
    unet = ours.unet

    def step(sample, t, text):
        return unet(sample, t, encoder_hidden_states=text, return_dict=False)[0]

    def eager():
        with torch.no_grad():
            return step(**inputs)

    runner = GraphRunner(owner=ours, backend=StandInBackend())

    def run():
        region = runner.region("unet", step, inputs, modules=[unet])
        return region(**inputs).clone(), region

    run()  # warm-up
    out, region = run()
    assert region.captured and runner.stats["captures"] == 1
    _close(out, eager(), tol=1e-6)
    # unfused: new weights for the same adapters are written in place -> the same graph, new output
    ours.set_adapters(["a", "b"], [0.3, -1.0])
    run()  # one eager step after the in-place change
    out, region = run()
    assert region.captured and runner.stats["captures"] == 1
    _close(out, eager(), tol=1e-6)
    # which adapters run changes -> recapture, never a stale graph
    ours.set_adapters("a")
    out, _ = run()
    _close(out, eager(), tol=1e-6)
    run()
    captures = runner.stats["captures"]
    # fused switching is in place: fuse a -> unfuse -> fuse b reuses the graph
    ours.set_adapters(["a", "b"], [1.0, 1.0])
    ours.disable_lora()
    run()
    run()
    unet.fuse_qkv_projections()  # fused switches refresh the fused QKV weight in place too
    eager()  # builds the fused QKV weights (a new tensor each: the runner recaptures once)
    run()
    _, region = run()
    assert region.captured
    captures = runner.stats["captures"]
    for names in (["a"], ["b"], ["a", "b"]):
        ours.unfuse_lora()
        ours.fuse_lora(adapter_names=names)
        run()
        out, region = run()
        assert region.captured
        _close(out, eager(), tol=1e-6)
    assert runner.stats["captures"] == captures, (captures, runner.stats)
    assert runner.stats["in_place_weight_updates"] >= 4, runner.stats
    assert unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.fused_projections
    ours.unfuse_lora()
    ours.unload_lora_weights()
    unet.unfuse_qkv_projections()


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("sdxl_lora")
    folder = save_sdxl_folder(root / "pipe")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    meta = _add_peft(ref.unet, "a", UNET_TARGETS, 11, alpha=8)
    meta_te = _add_peft(ref.text_encoder, "a", TE_TARGETS, 12, alpha=2, diffusers_model=False)
    meta_te2 = _add_peft(ref.text_encoder_2, "a", TE_TARGETS, 13, alpha=6, diffusers_model=False)
    layers = dict(unet=_peft_layers(ref.unet, "a"), te=_peft_layers(ref.text_encoder, "a"), te2=_peft_layers(ref.text_encoder_2, "a"))
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        root / "a", unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers["te"],
        text_encoder_2_lora_layers=layers["te2"], unet_lora_adapter_metadata=meta,
        text_encoder_lora_adapter_metadata=meta_te, text_encoder_2_lora_adapter_metadata=meta_te2,
    )  # fmt: skip
    kohya = {
        **_to_kohya(layers["unet"], "lora_unet_", 8), **_to_kohya(layers["te"], "lora_te1_", 2),
        **_to_kohya(layers["te2"], "lora_te2_", 6),
    }  # fmt: skip
    ours = fastdiff.StableDiffusionXLPipeline.from_pretrained(folder)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    sgm = {f"{_to_sgm(k.rsplit('.', 2)[0])}.{k.rsplit('.', 2)[1]}.weight": v for k, v in layers["unet"].items()}
    kohya_sgm = {**_to_kohya(sgm, "lora_unet_", 8), **_to_kohya(layers["te"], "lora_te1_", 2)}
    kohya_sgm.update(_to_kohya(layers["te2"], "lora_te2_", 6))
    return dict(
        ref=ref, ours=ours, file=str(root / "a"), kohya=_save_kohya(root / "k", kohya),
        kohya_sgm=_save_kohya(root / "ksgm", kohya_sgm),
    )  # fmt: skip


def test_sdxl_files_match_diffusers(sdxl):
    ours, ref = sdxl["ours"], sdxl["ref"]
    args = dict(ARGS, height=16, width=16)
    plain = _image(ours, **args)
    ours.load_lora_weights(sdxl["file"], adapter_name="a")
    assert ours.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"], "text_encoder_2": ["a"]}
    _diffusers_set(ref, {"a": 1.0}, te_names=("text_encoder", "text_encoder_2"))
    with_a = _image(ours, **args)
    _close(with_a, _image(ref, **args))
    assert abs(with_a - plain).max() > 0.02
    _close(_image(ours, cross_attention_kwargs={"scale": 0.6}, **args), _image(ref, cross_attention_kwargs={"scale": 0.6}, **args))
    ours.unload_lora_weights()
    ours.load_lora_weights(sdxl["kohya"], adapter_name="k")
    _close(_image(ours, **args), with_a, tol=1e-6)
    ours.unload_lora_weights()
    # kohya's SDXL files name the UNet's modules as the original (SGM) UNet does
    ours.load_lora_weights(sdxl["kohya_sgm"], adapter_name="k")
    assert ours.get_list_adapters() == {"unet": ["k"], "text_encoder": ["k"], "text_encoder_2": ["k"]}
    _close(_image(ours, **args), with_a, tol=1e-6)
    ours.unload_lora_weights()
    assert (_image(ours, **args) == plain).all()


def test_pipeline_graph_loop_sees_switches_and_reuses_graphs_for_fused_ones(sd):
    """The pipeline's own captured loop (CPU stand-in backend, fused scheduler step forced)."""
    from fastdiff.graphs import StandInBackend

    pipe = fastdiff.StableDiffusionPipeline.from_pretrained(sd["folder"])
    pipe.scheduler = fastdiff.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe._graph_backend = StandInBackend()
    pipe.set_backend(scheduler_step="reference")
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red cat", num_inference_steps=3, output_type="latent")

    def both(**kwargs):
        captured = pipe(generator=_gen(0), **args, **kwargs).images
        assert pipe._last_loop_reasons == [] and pipe.graph_runner.stats.get("replays", 0) > 0
        eager = pipe(generator=_gen(0), cuda_graph=False, **args, **kwargs).images
        assert torch.equal(captured, eager)
        return captured

    pipe.load_lora_weights(sd["files"]["a"], adapter_name="a")
    pipe.load_lora_weights(sd["files"]["b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 0.5])
    first = both()
    weight_recaptures = lambda: pipe.graph_runner.stats.get("recaptures_weights", 0)  # noqa: E731
    # (each call recaptures for the scheduler's new per-call tensors, "recaptures_watch"; the LoRA
    # switches below must add no recapture for the weights)
    pipe.set_adapters(["a", "b"], [0.3, -1.0])  # in place
    second = both()
    assert not torch.equal(first, second) and weight_recaptures() == 0
    both(cross_attention_kwargs={"scale": 0.4})
    pipe.set_adapters("a")
    pipe.disable_lora()
    both()
    assert weight_recaptures() == 1  # which adapters run changed: new scale buffers, a recapture
    outs = []
    for names in (["a"], ["b"], ["a"]):
        pipe.unfuse_lora()
        pipe.fuse_lora(adapter_names=names)
        outs.append(both())
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])
    assert weight_recaptures() == 1  # fused switches work in place


def test_img2img_pipeline_takes_the_same_lora(sd):
    ours = fastdiff.StableDiffusionImg2ImgPipeline(**sd["ours"].components)
    ref = diffusers.StableDiffusionImg2ImgPipeline(**sd["ref"].components)
    for p in (ours, ref):
        p.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16, generator=_gen(7))
    args = dict(image=image, strength=0.7, num_inference_steps=3, cross_attention_kwargs={"scale": 0.7})
    ours.load_lora_weights(sd["files"]["a"], adapter_name="a")
    _diffusers_set(ref, {"a": 1.0})
    try:
        _close(_image(ours, **args), _image(ref, **args))
    finally:
        ours.unload_lora_weights()
