"""UNet2DModel against diffusers: same weights, same outputs (fp32, 1e-5 relative)."""

import pytest
import torch
from _utils import assert_fp32_close
from diffusers import UNet2DModel as DiffusersUNet2DModel

from fastdiff import UNet2DModel

BASE = dict(
    sample_size=16,
    in_channels=3,
    out_channels=2,
    block_out_channels=(8, 16, 24),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
)

CONFIGS = {
    "positional_attention": {},
    "fourier_classes_scale_shift": dict(
        time_embedding_type="fourier", num_class_embeds=5, resnet_time_scale_shift="scale_shift", layers_per_block=2
    ),
    "timestep_class_head_dim_none_no_mid_attention": dict(
        class_embed_type="timestep", attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, add_attention=False
    ),
    "learned_mid_attention_groups": dict(
        time_embedding_type="learned", num_train_timesteps=1000, center_input_sample=True, attn_norm_num_groups=2
    ),
}


def _inputs(name, batch=3):
    x = torch.randn(batch, 3, 12, 20)
    if name.startswith("fourier"):
        return x, torch.rand(batch) + 0.05, {"class_labels": torch.randint(0, 5, (batch,))}
    if name.startswith("timestep_class"):
        return x, torch.tensor(17), {"class_labels": torch.rand(batch) * 100}
    return x, 421, {}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    torch.manual_seed(0)
    reference = DiffusersUNet2DModel(**{**BASE, **CONFIGS[request.param]})
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference.eval()
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return request.param, reference, UNet2DModel.from_pretrained(folder)


@torch.no_grad()
def test_forward_matches_diffusers(case):
    name, reference, model = case
    x, t, kwargs = _inputs(name)
    ours = model(x, t, **kwargs).sample
    assert ours.shape == (3, 2, 12, 20)
    assert_fp32_close(ours, reference(x, t, **kwargs).sample, what=name)
    assert torch.equal(model(x, t, return_dict=False, **kwargs)[0], ours)
    assert torch.equal(model(x, t, **kwargs)["sample"], ours)


def test_state_dict_identical(case):
    _, reference, model = case
    assert model.num_parameters() == reference.num_parameters()
    assert model.num_parameters(only_trainable=True) == reference.num_parameters(only_trainable=True)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@torch.no_grad()
def test_fastdiff_folder_loads_in_diffusers(case, tmp_path):
    name, _, model = case
    model.save_pretrained(tmp_path)
    reloaded = DiffusersUNet2DModel.from_pretrained(tmp_path).eval()
    x, t, kwargs = _inputs(name, batch=1)
    assert_fp32_close(model(x, t, **kwargs).sample, reloaded(x, t, **kwargs).sample, what=name)


def test_from_config_builds_same_architecture(case):
    _, reference, model = case
    rebuilt = UNet2DModel.from_config(model.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }


def test_bad_inputs_name_the_argument():
    torch.manual_seed(0)
    model = UNet2DModel(**BASE)
    with pytest.raises(ValueError, match=r"sample: expected a \(B, 3, H, W\)"):
        model(torch.randn(1, 4, 8, 8), 1)
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.randn(1, 3, 10, 8), 1)
    with pytest.raises(ValueError, match="timestep"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="class_labels: this model is not class-conditioned"):
        model(torch.randn(1, 3, 8, 8), 1, class_labels=torch.tensor([0]))
    classy = UNet2DModel(**{**BASE, "num_class_embeds": 3})
    with pytest.raises(ValueError, match="class_labels: required"):
        classy(torch.randn(1, 3, 8, 8), 1)
    with pytest.raises(ValueError, match="down_block_types: unknown block 'SkipDownBlock3D'.*'SkipDownBlock2D'"):
        UNet2DModel(**{**BASE, "down_block_types": ("DownBlock2D", "SkipDownBlock3D", "DownBlock2D")})


def test_registration_order_matches_diffusers(case):
    """down_blocks, up_blocks, then mid_block, as diffusers registers them."""
    _, reference, model = case
    blocks = ("down_blocks", "up_blocks", "mid_block")
    assert [n for n, _ in model.named_children() if n in blocks] == [n for n, _ in reference.named_children() if n in blocks]
    assert list(dict.fromkeys(k.split(".")[0] for k in model.state_dict())) == list(dict.fromkeys(k.split(".")[0] for k in reference.state_dict()))
