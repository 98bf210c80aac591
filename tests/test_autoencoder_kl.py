"""AutoencoderKL against diffusers: same weights, same outputs (fp32, 1e-5 relative)."""

import pytest
import torch
from _utils import assert_fp32_close
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from safetensors.torch import load_file, save_file

from fastdiff import AutoencoderKL

CONFIGS = {
    "two_blocks_mid_attention": dict(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=3,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ),
    "three_blocks_no_quant_no_attention": dict(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
        scaling_factor=0.13025,
        force_upcast=False,
    ),
}


def _diffusers_vae(config, seed=0):
    """A diffusers VAE with non-trivial weights (default init leaves norms at 1/0)."""
    torch.manual_seed(seed)
    model = DiffusersAutoencoderKL(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    reference = _diffusers_vae(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return reference, AutoencoderKL.from_pretrained(folder)


def test_state_dict_identical(pair):
    reference, model = pair
    ours = model.state_dict()
    theirs = reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@torch.no_grad()
def test_encode_decode_match(pair):
    reference, model = pair
    x = torch.randn(3, 3, 23, 17)  # odd sizes go through the padding=0 downsampler
    ours, theirs = model.encode(x).latent_dist, reference.encode(x).latent_dist
    assert_fp32_close(ours.mean, theirs.mean, what="latent mean")
    assert_fp32_close(ours.std, theirs.std, what="latent std")
    assert torch.equal(ours.mode(), ours.mean)
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert_fp32_close(ours.sample(gen_a), theirs.sample(gen_b), what="posterior sample")
    assert_fp32_close(ours.kl(), theirs.kl(), what="kl")

    z = torch.randn(2, model.config.latent_channels, 5, 7)
    assert_fp32_close(model.decode(z).sample, reference.decode(z).sample, what="decode")
    assert_fp32_close(model(x).sample, reference(x).sample, what="forward")
    assert model.decode(z, return_dict=False)[0].shape == (2, 3, 5 * 2 ** (len(model.config.block_out_channels) - 1), 7 * 2 ** (len(model.config.block_out_channels) - 1))


@torch.no_grad()
def test_slicing_matches_diffusers(pair):
    reference, model = pair
    model.enable_slicing()
    reference.enable_slicing()
    try:
        x = torch.randn(3, 3, 16, 16)
        assert_fp32_close(model.encode(x).latent_dist.mean, reference.encode(x).latent_dist.mean, what="sliced encode")
        z = torch.randn(3, model.config.latent_channels, 4, 4)
        assert_fp32_close(model.decode(z).sample, reference.decode(z).sample, what="sliced decode")
    finally:
        model.disable_slicing()
        reference.disable_slicing()


@torch.no_grad()
def test_tiling_matches_diffusers(tmp_path):
    config = dict(CONFIGS["two_blocks_mid_attention"], sample_size=16)
    reference = _diffusers_vae(config)
    reference.save_pretrained(tmp_path)
    model = AutoencoderKL.from_pretrained(tmp_path)
    model.enable_tiling()
    reference.enable_tiling()
    x = torch.randn(1, 3, 40, 36)  # several overlapping 16x16 tiles
    ours = model.encode(x).latent_dist.mean
    assert_fp32_close(ours, reference.encode(x).latent_dist.mean, what="tiled encode")
    z = torch.randn(1, 3, 20, 14)  # latent tiles of 8
    assert_fp32_close(model.decode(z).sample, reference.decode(z).sample, what="tiled decode")
    model.disable_tiling()
    assert not torch.allclose(model.encode(x).latent_dist.mean, ours), "tiling had no effect on this input"


def test_config_carries_pipeline_fields(pair):
    reference, model = pair
    for key in ("scaling_factor", "force_upcast", "shift_factor", "latents_mean", "sample_size"):
        assert model.config[key] == reference.config[key]


@torch.no_grad()
def test_fastdiff_folder_loads_in_diffusers(pair, tmp_path):
    _, model = pair
    model.save_pretrained(tmp_path)
    reloaded = DiffusersAutoencoderKL.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 16, 16)
    assert_fp32_close(model(x).sample, reloaded(x).sample, what="diffusers reload")


def test_legacy_attention_names_load(tmp_path):
    reference = _diffusers_vae(CONFIGS["two_blocks_mid_attention"])
    reference.save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for key, tensor in load_file(path).items():
        if ".attentions." in key:
            for new, legacy in renames.items():
                key = key.replace(new, legacy)
        old[key] = tensor
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    save_file(old, path)
    ours, theirs = AutoencoderKL.from_pretrained(tmp_path).state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bad_inputs_name_the_argument(pair):
    _, model = pair
    with pytest.raises(ValueError, match=r"x: expected a \(B, 3, H, W\)"):
        model.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"z: expected a \(B, \d, H, W\)"):
        model.decode(torch.randn(1, 9, 4, 4))
    with pytest.raises(ValueError, match="act_fn"):
        AutoencoderKL(act_fn="softsign")  # not an activation diffusers names


SD_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    sample_size=512,
)


@pytest.mark.slow
@torch.no_grad()
def test_real_sd_vae_config_random_weights():
    """The SD VAE architecture (84M parameters, a single 512-wide attention head) at a small image."""
    torch.manual_seed(0)
    reference = DiffusersAutoencoderKL(**SD_VAE_CONFIG).eval()
    with torch.device("meta"):
        model = AutoencoderKL.from_config(reference.config)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    x = torch.randn(1, 3, 24, 16)
    assert_fp32_close(model(x).sample, reference(x).sample, what="SD VAE")
