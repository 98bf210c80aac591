"""diffusers' model API on fastdiff's models, with diffusers as the oracle: from_pretrained's
keywords, ModelMixin's public surface, and whole UNets built from the block families that
the SD-style tests do not cover (NCSN++, unCLIP-style added-KV attention, the K-upscaler).

accelerate is not installed here, so diffusers loads with ``low_cpu_mem_usage=False``; the
loaded weights are the same either way.
"""

import logging
import warnings

import pytest
import torch
from _utils import assert_fp32_close
from diffusers import UNet2DConditionModel as DiffusersUNet2DConditionModel
from diffusers import UNet2DModel as DiffusersUNet2DModel

from fastdiff import UNet2DConditionModel, UNet2DModel

TINY = dict(
    sample_size=8, in_channels=3, out_channels=2, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8, num_class_embeds=3,
)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    reference = _perturbed(DiffusersUNet2DModel(**TINY))
    folder = tmp_path_factory.mktemp("tiny")
    reference.save_pretrained(folder)
    return folder, reference


def _same_weights(a, b, dtype=None):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        expected = sb[key] if dtype is None else sb[key].to(dtype)
        assert sa[key].dtype == expected.dtype, key
        assert torch.equal(sa[key], expected), key


# ------------------------------------------------------------ from_pretrained keywords


@pytest.mark.parametrize("low_cpu_mem_usage", [True, False, None])
def test_low_cpu_mem_usage_loads_the_same_weights(tiny_folder, low_cpu_mem_usage):
    folder, reference = tiny_folder
    model = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=low_cpu_mem_usage)
    _same_weights(model, reference)
    assert not model.training and model.device == torch.device("cpu")


def test_dtype_is_torch_dtype_and_wins(tiny_folder):
    folder, reference = tiny_folder
    for kwargs in (dict(dtype=torch.bfloat16), dict(torch_dtype=torch.float16, dtype=torch.bfloat16)):
        model = UNet2DModel.from_pretrained(folder, **kwargs)
        theirs = DiffusersUNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False, **kwargs)
        assert model.dtype == theirs.dtype == torch.bfloat16
        _same_weights(model, theirs)
    with pytest.raises(ValueError, match="torch_dtype: expected a floating torch.dtype"):
        UNet2DModel.from_pretrained(folder, dtype=torch.int8)


@pytest.mark.parametrize("device_map", ["cpu", torch.device("cpu"), {"": "cpu"}, "auto", None])
def test_device_map_on_one_device(tiny_folder, device_map):
    folder, reference = tiny_folder
    model = UNet2DModel.from_pretrained(folder, device_map=device_map)
    expected = torch.device("cuda", torch.cuda.current_device()) if device_map == "auto" and torch.cuda.is_available() else torch.device("cpu")
    assert model.device == expected and all(t.device == expected for t in model.state_dict().values())
    _same_weights(model.cpu(), reference)


def test_bad_device_maps_raise(tiny_folder):
    folder, _ = tiny_folder
    with pytest.raises(NotImplementedError, match="per-module map"):
        UNet2DModel.from_pretrained(folder, device_map={"conv_in": "cpu", "conv_out": "cpu"})
    with pytest.raises(ValueError, match="device_map: expected a device name"):
        UNet2DModel.from_pretrained(folder, device_map="the-gpu")
    with pytest.raises(ValueError, match="negative int"):
        UNet2DModel.from_pretrained(folder, device_map=-1)
    with pytest.raises(ValueError, match="low_cpu_mem_usage: cannot be False with device_map"):
        UNet2DModel.from_pretrained(folder, device_map="cpu", low_cpu_mem_usage=False)


def test_output_loading_info_has_diffusers_keys(tiny_folder):
    folder, reference = tiny_folder
    model, info = UNet2DModel.from_pretrained(folder, output_loading_info=True)
    _, theirs = DiffusersUNet2DModel.from_pretrained(folder, output_loading_info=True, low_cpu_mem_usage=False)
    assert set(info) == set(theirs) == {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
    assert all(list(info[k]) == list(theirs[k]) == [] for k in info)
    _same_weights(model, reference)


def test_ignore_mismatched_sizes_lists_the_keys_as_diffusers(tiny_folder):
    folder, _ = tiny_folder
    model, info = UNet2DModel.from_pretrained(folder, output_loading_info=True, ignore_mismatched_sizes=True, out_channels=5)
    _, theirs = DiffusersUNet2DModel.from_pretrained(
        folder, output_loading_info=True, ignore_mismatched_sizes=True, out_channels=5, low_cpu_mem_usage=False
    )
    assert sorted(k for k, *_ in info["mismatched_keys"]) == sorted(k for k, *_ in theirs["mismatched_keys"])
    assert info["mismatched_keys"] and model.conv_out.weight.shape[0] == 5
    with pytest.raises(ValueError, match="conv_out.weight"):
        UNet2DModel.from_pretrained(folder, out_channels=5)


def test_config_overrides_as_diffusers(tiny_folder):
    folder, _ = tiny_folder
    model = UNet2DModel.from_pretrained(folder, sample_size=32)
    theirs = DiffusersUNet2DModel.from_pretrained(folder, sample_size=32, low_cpu_mem_usage=False)
    assert model.config.sample_size == theirs.config.sample_size == 32
    with pytest.raises(ValueError, match="no_such_option"):
        UNet2DModel.from_pretrained(folder, no_such_option=1)


def test_hub_options_are_ignored_for_a_local_folder(tiny_folder):
    folder, reference = tiny_folder
    model = UNet2DModel.from_pretrained(
        folder, revision="v2", cache_dir="/nonexistent", local_files_only=True, force_download=True, token="x"
    )
    _same_weights(model, reference)


def test_hub_id_not_in_cache_with_local_files_only(monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as info:
        UNet2DModel.from_pretrained("fastdiff-tests/absent", local_files_only=True, cache_dir=tmp_path)
    assert "\n" not in str(info.value) and "local_files_only=True" in str(info.value)


class _Fp32TimeEmbedding(UNet2DModel):
    _keep_in_fp32_modules = ["time_embedding"]


def test_keep_in_fp32_modules(tiny_folder):
    folder, reference = tiny_folder
    model = _Fp32TimeEmbedding.from_pretrained(folder, torch_dtype=torch.float16)
    for key, tensor in model.state_dict().items():
        expected = torch.float32 if key.split(".")[0] == "time_embedding" else torch.float16
        assert tensor.dtype == expected, key
        assert torch.equal(tensor, reference.state_dict()[key].to(expected)), key
    assert model.dtype == torch.float16
    with pytest.raises(ValueError, match="low_cpu_mem_usage: cannot be False"):
        _Fp32TimeEmbedding.from_pretrained(folder, low_cpu_mem_usage=False)


# ------------------------------------------------------------------ ModelMixin surface


def test_num_parameters_dtype_device_as_diffusers():
    torch.manual_seed(0)
    reference = DiffusersUNet2DModel(**TINY)
    model = UNet2DModel(**TINY)
    for m in (reference, model):
        m.conv_in.requires_grad_(False)
    for kwargs in ({}, {"only_trainable": True}, {"exclude_embeddings": True}, {"only_trainable": True, "exclude_embeddings": True}):
        assert model.num_parameters(**kwargs) == reference.num_parameters(**kwargs), kwargs
    assert model.num_parameters(exclude_embeddings=True) < model.num_parameters()
    assert (model.dtype, model.device) == (reference.dtype, reference.device)
    assert model.to(torch.float16).dtype == torch.float16
    assert model.get_memory_footprint() == reference.to(torch.float16).get_memory_footprint()


def test_gradient_checkpointing_api_as_diffusers():
    torch.manual_seed(0)
    reference, model = DiffusersUNet2DModel(**TINY), UNet2DModel(**TINY)
    model.load_state_dict(reference.state_dict())
    for m in (reference, model):
        assert not m.is_gradient_checkpointing
    calls = []

    def recording_checkpoint(module, *args):
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)

    model.enable_gradient_checkpointing(recording_checkpoint)
    reference.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing and reference.is_gradient_checkpointing
    x, labels = torch.randn(1, 3, 8, 8), torch.tensor([2])
    model(x, 10, class_labels=labels).sample.square().sum().backward()
    assert calls and set(calls) == {"ResnetBlock2D"}
    reference(x, 10, class_labels=labels).sample.square().sum().backward()
    theirs = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("to_k.bias"):  # true gradient 0 (softmax is shift-invariant): both are rounding noise
            continue
        assert_fp32_close(p.grad, theirs[name].grad, rtol=1e-4, what=name)
    model.disable_gradient_checkpointing()
    reference.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing and not reference.is_gradient_checkpointing


def test_config_keys_read_as_attributes_with_a_future_warning():
    model, reference = UNet2DModel(**TINY), DiffusersUNet2DModel(**TINY)
    with pytest.warns(FutureWarning, match="in_channels"):
        ours = model.in_channels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours == reference.in_channels == 3
    with pytest.raises(AttributeError):
        model.no_such_attribute


def test_save_pretrained_keywords(tmp_path):
    torch.manual_seed(0)
    model = _perturbed(UNet2DModel(**TINY))
    model.save_pretrained(tmp_path / "worker", is_main_process=False)
    assert not (tmp_path / "worker" / "config.json").exists()
    assert (tmp_path / "worker" / "diffusion_pytorch_model.safetensors").exists()

    saved = []

    def save_function(state_dict, path):
        saved.append(path)
        torch.save(state_dict, path)

    model.save_pretrained(tmp_path / "bin", safe_serialization=False, save_function=save_function, variant="fp32")
    assert saved == [str(tmp_path / "bin" / "diffusion_pytorch_model.fp32.bin")]
    theirs = DiffusersUNet2DModel.from_pretrained(tmp_path / "bin", variant="fp32", use_safetensors=False)
    _same_weights(model, theirs)
    with pytest.raises(NotImplementedError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(TypeError, match="no_such_keyword"):
        model.save_pretrained(tmp_path / "x", no_such_keyword=1)


# ------------------------------------------------------------- whole UNets, other families

NCSNPP = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32, 32), layers_per_block=1,
    down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipDownBlock2D"),
    up_block_types=("SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D"), attention_head_dim=8,
    time_embedding_type="fourier", norm_num_groups=4, mid_block_scale_factor=2**0.5,
    resnet_time_scale_shift="scale_shift", norm_eps=1e-6,
)
RESNET_RESAMPLING = dict(
    sample_size=16, in_channels=3, out_channels=2, block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4,
    attention_head_dim=8, act_fn="mish", down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"), downsample_type="resnet", upsample_type="resnet",
)
UNCLIP = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    attention_head_dim=8, cross_attention_dim=32, encoder_hid_dim=20, resnet_time_scale_shift="scale_shift",
    resnet_skip_time_act=True, resnet_out_scale_factor=1.2, cross_attention_norm="group_norm",
)
K_UPSCALER = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
    up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"), mid_block_type=None, act_fn="gelu",
    norm_num_groups=None, attention_head_dim=16, cross_attention_dim=24, resnet_time_scale_shift="scale_shift",
    time_embedding_type="fourier", time_embedding_dim=64, timestep_post_act="gelu", time_embedding_act_fn="gelu",
    conv_in_kernel=1, conv_out_kernel=1,
)


@pytest.mark.parametrize("name, config", [("ncsnpp", NCSNPP), ("resnet_resampling", RESNET_RESAMPLING)])
@torch.no_grad()
def test_unet_2d_families_match_diffusers(name, config, tmp_path):
    torch.manual_seed(0)
    reference = _perturbed(DiffusersUNet2DModel(**config))
    reference.save_pretrained(tmp_path)
    model = UNet2DModel.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 8, 12)
    t = torch.tensor([0.3, 0.8]) if name == "ncsnpp" else torch.tensor([5, 900])
    assert_fp32_close(model(x, t).sample, reference(x, t).sample, what=name)


@pytest.mark.parametrize("name, config", [("unclip", UNCLIP), ("k_upscaler", K_UPSCALER)])
@torch.no_grad()
def test_unet_2d_condition_families_match_diffusers(name, config, tmp_path):
    torch.manual_seed(0)
    reference = _perturbed(DiffusersUNet2DConditionModel(**config))
    reference.save_pretrained(tmp_path)
    model = UNet2DConditionModel.from_pretrained(tmp_path)
    x = torch.randn(2, 4, 8, 12)
    text = torch.randn(2, 5, 20 if name == "unclip" else 24)
    mask = torch.ones(2, 5)
    mask[1, -2:] = 0
    t = torch.tensor([3, 700])
    expected = reference(x, t, text, encoder_attention_mask=mask).sample
    assert_fp32_close(model(x, t, text, encoder_attention_mask=mask).sample, expected, what=name)


class _IgnoresExtraKeys(UNet2DModel):
    _keys_to_ignore_on_load_unexpected = [r"^extra\."]


def test_keys_to_ignore_on_load_unexpected(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = _perturbed(UNet2DModel(**TINY))
    model.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(path), "extra.weight": torch.randn(3)}, path)
    _same_weights(_IgnoresExtraKeys.from_pretrained(tmp_path), model)
    with pytest.raises(ValueError, match=r"unexpected keys \[extra.weight\]"):
        UNet2DModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------- outputs


def _output_behaviour(cls, field, value):
    import copy
    import pickle

    out = cls(**{field: value})
    seen = [isinstance(out, dict), list(out.keys()), out[0] is value, out[field] is value, out.to_tuple() == (value,)]
    seen.append(list(out) == [field] and len(out) == 1)
    restored = pickle.loads(pickle.dumps(out))
    seen.append((type(restored).__name__, torch.equal(getattr(restored, field), value)))
    seen.append(torch.equal(copy.deepcopy(out)[field], value))
    setattr(out, field, value + 1)
    seen.append(torch.equal(out[field], value + 1))
    empty = cls(**{field: None})
    seen.append((list(empty.keys()), empty.to_tuple()))
    for method in ("pop", "update", "setdefault", "__delitem__"):
        with pytest.raises(Exception):
            getattr(out, method)(field)
    import torch.utils._pytree as pytree

    leaves, _ = pytree.tree_flatten(cls(**{field: value}))
    seen.append(len(leaves))
    return seen


@pytest.mark.parametrize(
    "ours, theirs, field",
    [
        ("fastdiff.models.unet_2d:UNet2DOutput", "diffusers.models.unets.unet_2d:UNet2DOutput", "sample"),
        (
            "fastdiff.models.unet_2d_condition:UNet2DConditionOutput",
            "diffusers.models.unets.unet_2d_condition:UNet2DConditionOutput",
            "sample",
        ),
        ("fastdiff.models.autoencoder_kl:DecoderOutput", "diffusers.models.autoencoders.vae:DecoderOutput", "sample"),
        (
            "fastdiff.models.autoencoder_kl:AutoencoderKLOutput",
            "diffusers.models.modeling_outputs:AutoencoderKLOutput",
            "latent_dist",
        ),
    ],
)
def test_model_outputs_behave_as_diffusers(ours, theirs, field):
    import importlib

    def load(spec):
        module, name = spec.split(":")
        return getattr(importlib.import_module(module), name)

    value = torch.randn(2, 3)
    assert _output_behaviour(load(ours), field, value) == _output_behaviour(load(theirs), field, value)


@torch.no_grad()
def test_autoencoder_with_attention_encoder_decoder_blocks_matches_diffusers(tmp_path):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from fastdiff import AutoencoderKL

    config = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), act_fn="mish",
    )
    torch.manual_seed(0)
    reference = _perturbed(DiffusersAutoencoderKL(**config))
    reference.save_pretrained(tmp_path)
    model = AutoencoderKL.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 12, 16)
    latents = model.encode(x).latent_dist.mean
    assert_fp32_close(latents, reference.encode(x).latent_dist.mean, what="encode")
    assert_fp32_close(model.decode(latents).sample, reference.decode(latents).sample, what="decode")
