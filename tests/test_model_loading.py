"""The loading layer: config handling, weights files, shards, variants, errors."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastdiff.models.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from fastdiff.models.modeling_utils import ModelMixin, parse_size


class _Attention(nn.Module):
    """Stands in for an attention block that diffusers once saved as query/key/value/proj_attn."""

    def __init__(self, dim):
        super().__init__()
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self._from_deprecated_attn_block = True


class TinyModel(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, width: int = 6, depth: int = 2, block_types=("a", "b")):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.attn = _Attention(width)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.attn.to_out[0](x)


def _random_model(**kwargs):
    model = TinyModel(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------- config


def test_register_to_config_records_given_and_default_arguments():
    model = TinyModel(7)
    assert model.config == {"width": 7, "depth": 2, "block_types": ("a", "b")}
    assert model.config.width == 7
    with pytest.raises(TypeError):
        model.config["width"] = 3


def test_frozen_dict_survives_deepcopy():
    import copy

    config = FrozenDict(a=1, b=[2])
    assert copy.deepcopy(config) == config


def test_from_config_overrides_and_rejects_unknown_kwargs():
    model = TinyModel.from_config(TinyModel(width=5).config, depth=3)
    assert (model.config.width, model.config.depth, len(model.layers)) == (5, 3, 3)
    with pytest.raises(ValueError, match="widht"):
        TinyModel.from_config({}, widht=4)


def test_unknown_config_key_warns_like_diffusers(caplog):
    with caplog.at_level(logging.WARNING):
        model = TinyModel.from_config({"width": 4, "mystery": 1, "_class_name": "TinyModel"})
    assert model.config.width == 4
    assert "The config attributes {'mystery': 1} were passed to TinyModel, but are not expected" in caplog.text


def test_config_json_round_trip(tmp_path):
    TinyModel(width=3).save_config(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "TinyModel"
    assert saved["block_types"] == ["a", "b"]
    assert TinyModel.from_config(TinyModel.load_config(tmp_path)).config.width == 3


# ------------------------------------------------------------- round trips


def test_save_load_round_trip_is_identical(tmp_path):
    model = _random_model(width=5)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = TinyModel.from_pretrained(tmp_path)
    _assert_same_state(model, loaded)
    assert not loaded.training
    x = torch.randn(3, 5)
    assert torch.equal(model(x), loaded(x))


def test_subfolder_and_torch_dtype(tmp_path):
    model = _random_model()
    model.save_pretrained(tmp_path / "unet")
    loaded = TinyModel.from_pretrained(tmp_path, subfolder="unet", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.layers[0].weight, model.layers[0].weight.to(torch.bfloat16))
    with pytest.raises(ValueError, match="torch_dtype"):
        TinyModel.from_pretrained(tmp_path, subfolder="unet", torch_dtype=torch.int8)


def test_sharded_save_and_load(tmp_path):
    model = _random_model(width=16, depth=4)
    model.save_pretrained(tmp_path, max_shard_size=2000)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    _assert_same_state(model, TinyModel.from_pretrained(tmp_path))

    # Saving again unsharded removes the old shards and index.
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_variant_save_and_load(tmp_path):
    model = _random_model()
    model.half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = TinyModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    _assert_same_state(model, loaded)


def test_sharded_variant(tmp_path):
    model = _random_model(width=16, depth=3)
    model.save_pretrained(tmp_path, variant="fp16", max_shard_size="1KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert any(name.startswith("diffusion_pytorch_model.fp16-00001-of-") for name in os.listdir(tmp_path))
    _assert_same_state(model, TinyModel.from_pretrained(tmp_path, variant="fp16"))


def test_sharded_bin_weights(tmp_path):
    model = _random_model(width=16, depth=3)
    model.save_pretrained(tmp_path, max_shard_size="1KB", safe_serialization=False)
    index = json.loads((tmp_path / "diffusion_pytorch_model.bin.index.json").read_text())
    assert all(name.endswith(".bin") for name in index["weight_map"].values())
    _assert_same_state(model, TinyModel.from_pretrained(tmp_path))


def test_bin_weights_load_through_weights_only(tmp_path):
    model = _random_model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file()
    _assert_same_state(model, TinyModel.from_pretrained(tmp_path))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        TinyModel.from_pretrained(tmp_path, use_safetensors=True)


def test_bin_with_pickled_code_is_refused(tmp_path):
    TinyModel().save_config(tmp_path)
    torch.save({"layers.0.weight": torch.randn(2), "evil": _Attention}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="refusing to load .*diffusion_pytorch_model.bin"):
        TinyModel.from_pretrained(tmp_path)


def test_legacy_attention_names_are_renamed(tmp_path):
    model = _random_model()
    model.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, tensor in load_file(path).items():
        for new_name, old_name in renames.items():
            key = key.replace(f"attn.{new_name}.", f"attn.{old_name}.")
        old[key] = tensor
    assert "attn.proj_attn.weight" in old and "attn.query.bias" in old
    save_file(old, path)
    _assert_same_state(model, TinyModel.from_pretrained(tmp_path))


# ------------------------------------------------------------------ errors


def test_missing_config_names_the_folder(tmp_path):
    _random_model().save_pretrained(tmp_path)
    os.remove(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=f"no file named config.json in {tmp_path}"):
        TinyModel.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    _random_model().save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["layers.1.bias"]
    state["layers.9.weight"] = torch.randn(3)
    save_file(state, path)
    with pytest.raises(ValueError, match=r"missing keys \[layers.1.bias\]; unexpected keys \[layers.9.weight\]"):
        TinyModel.from_pretrained(tmp_path)


def test_shape_mismatch_names_key_and_file(tmp_path):
    _random_model(width=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["width"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"key 'layers.0.weight' in .*safetensors has shape \(4, 4\), the model expects \(5, 5\)"):
        TinyModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    _random_model().save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x13\x37" * 50)
    with pytest.raises(OSError, match="diffusion_pytorch_model.safetensors: it is truncated or corrupt"):
        TinyModel.from_pretrained(tmp_path)


def test_corrupt_bin_names_the_file(tmp_path):
    _random_model().save_pretrained(tmp_path, safe_serialization=False)
    path = tmp_path / "diffusion_pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(OSError, match="diffusion_pytorch_model.bin: it is truncated or corrupt"):
        TinyModel.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    _random_model(width=16, depth=3).save_pretrained(tmp_path, max_shard_size="1KB")
    os.remove(tmp_path / sorted(p for p in os.listdir(tmp_path) if "-00002-of-" in p)[0])
    with pytest.raises(FileNotFoundError, match="shard diffusion_pytorch_model-00002-of-.* is missing"):
        TinyModel.from_pretrained(tmp_path)


def test_corrupt_index_is_named(tmp_path):
    _random_model(width=16, depth=3).save_pretrained(tmp_path, max_shard_size="1KB")
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}, "weight_')
    with pytest.raises(OSError, match="index file .*safetensors.index.json is corrupt"):
        TinyModel.from_pretrained(tmp_path)


def test_missing_variant_lists_what_exists(tmp_path):
    _random_model().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"variant 'fp16' not found .*present: \['diffusion_pytorch_model.safetensors'\]"):
        TinyModel.from_pretrained(tmp_path, variant="fp16")


def test_unreachable_hub_id_is_one_line(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError) as info:
        TinyModel.from_pretrained("fastdiff-tests/no-such-model")
    message = str(info.value)
    assert "\n" not in message
    assert "fastdiff-tests/no-such-model" in message and "cannot be reached" in message


def test_hub_id_resolves_through_the_local_cache(monkeypatch, tmp_path):
    """Offline, a Hub id is served from huggingface_hub's cache (laid out here by hand)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--fastdiff-tests--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model = _random_model()
    model.save_pretrained(repo / "snapshots" / commit / "unet")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    _assert_same_state(model, TinyModel.from_pretrained("fastdiff-tests/tiny", subfolder="unet"))


def test_bad_max_shard_size():
    assert parse_size("2MB") == 2_000_000 and parse_size("1GiB") == 2**30 and parse_size(77) == 77
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# ------------------------------------------------------- diffusers folders


def test_diffusers_sharded_variant_folder_loads(tmp_path):
    from diffusers import UNet2DModel as DiffusersUNet2DModel

    from fastdiff import UNet2DModel

    torch.manual_seed(0)
    config = dict(
        block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    reference = DiffusersUNet2DModel(**config).to(torch.float16)
    reference.save_pretrained(tmp_path, variant="fp16", max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    model = UNet2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == torch.float16 and torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(FileNotFoundError, match="variant 'bf16' not found"):
        UNet2DModel.from_pretrained(tmp_path, variant="bf16")
