"""Tiny pipeline components built with diffusers and transformers, and a CLIP tokenizer built locally.

Shared by the pipeline tests (and read-only by other test files). Nothing is downloaded: the
tokenizer's vocab.json and merges.txt are written here, and every model gets seeded random weights.
Attention head dims are multiples of 8. Each ``save_*`` function writes a diffusers pipeline
folder with diffusers' own ``save_pretrained`` and returns its path.

Sizes are chosen for the CPU test budget: SD latents 8x8 (16x16 images, VAE factor 2).
"""

from __future__ import annotations

import json
import os

import torch

import pytest

TOKENIZER_MAX_LENGTH = 16
TEXT_VOCAB_SIZE = 600  # >= the tokenizer's 518 ids

_MERGES = ["a b", "ab c</w>", "t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread: on a shared 2-core machine, torch's default thread
    pool oversubscribes the cores and makes these tiny convolutions about 20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _bytes_to_unicode():
    """CLIP's byte -> printable-character table (GPT-2's), rebuilt here for the vocab."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_tokenizer_files(directory: str) -> str:
    """Write vocab.json and merges.txt of a small byte-level CLIP BPE vocabulary (518 ids)."""
    os.makedirs(directory, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for merge in _MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return directory


def clip_tokenizer(directory: str, max_length: int = TOKENIZER_MAX_LENGTH, pad_token=None):
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(directory)
    kwargs = {"model_max_length": max_length}
    if pad_token is not None:
        kwargs["pad_token"] = pad_token
    return CLIPTokenizer.from_pretrained(directory, **kwargs)


def clip_text_model(seed: int, hidden_size: int = 32, projection_dim=None, tokenizer=None):
    """A tiny CLIPTextModel (or CLIPTextModelWithProjection when ``projection_dim`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    bos, eos = (516, 517) if tokenizer is None else (tokenizer.bos_token_id, tokenizer.eos_token_id)
    config = CLIPTextConfig(
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        hidden_size=hidden_size,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=TEXT_VOCAB_SIZE,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act="gelu",
        projection_dim=projection_dim or hidden_size,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def tiny_unet_2d(in_channels: int = 3, sample_size: int = 8, seed: int = 0):
    """A diffusers UNet2DModel with one attention block (head dim 8)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def _randomize_norms(module, seed: int):
    """Give every norm layer non-trivial affine parameters (fresh models have ones and zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module


def tiny_unet_2d_condition(cross_attention_dim: int = 32, sample_size: int = 8, seed: int = 0, sdxl: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,  # 8 heads of dim 8 in the 64-channel blocks
        norm_num_groups=8,
    )
    if sdxl:
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            use_linear_projection=True,
        )
    return _randomize_norms(UNet2DConditionModel(**kwargs), seed + 1).eval()


def tiny_vae(seed: int = 0, force_upcast: bool = True, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        force_upcast=force_upcast,
        scaling_factor=scaling_factor,
    )
    return _randomize_norms(vae, seed + 1).eval()


def tiny_safety_checker(seed: int = 0):
    """diffusers' StableDiffusionSafetyChecker on a tiny CLIP vision tower, with its image processor."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(
            hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1, vocab_size=99,
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1, image_size=16, patch_size=8
        ),
        projection_dim=8,
    )
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(config).eval()
    extractor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return checker, extractor


_SD_SCHEDULER_EXTRAS = {
    "DDIMScheduler": dict(steps_offset=1, clip_sample=False, set_alpha_to_one=False),
    "DDPMScheduler": dict(steps_offset=1, clip_sample=False),
    "PNDMScheduler": dict(steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False),
}


def diffusers_scheduler(name: str, **overrides):
    """A diffusers scheduler with Stable Diffusion's training schedule."""
    import diffusers

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    config.update(_SD_SCHEDULER_EXTRAS.get(name, {}))
    config.update(overrides)
    return getattr(diffusers, name)(**config)


def save_unconditional_folder(path, pipeline: str = "DDPMPipeline", in_channels: int = 3, seed: int = 0) -> str:
    """A diffusers DDPM/DDIM pipeline folder with a tiny UNet2DModel."""
    import diffusers

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000) if pipeline == "DDPMPipeline" else (
        diffusers.DDIMScheduler(num_train_timesteps=1000)
    )
    pipe = getattr(diffusers, pipeline)(unet=tiny_unet_2d(in_channels=in_channels, seed=seed), scheduler=scheduler)
    pipe.save_pretrained(os.fspath(path))
    return os.fspath(path)


def sd_components(tmp_dir, scheduler: str = "PNDMScheduler", safety: bool = False, seed: int = 0):
    """The components of a tiny diffusers StableDiffusionPipeline."""
    tokenizer = clip_tokenizer(os.path.join(os.fspath(tmp_dir), "_tokenizer_src"))
    components = dict(
        unet=tiny_unet_2d_condition(seed=seed),
        vae=tiny_vae(seed=seed + 10),
        text_encoder=clip_text_model(seed + 20, tokenizer=tokenizer),
        tokenizer=tokenizer,
        scheduler=diffusers_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if safety:
        checker, extractor = tiny_safety_checker(seed + 30)
        components.update(safety_checker=checker, feature_extractor=extractor, requires_safety_checker=True)
    return components


def save_sd_folder(path, scheduler: str = "PNDMScheduler", safety: bool = False, seed: int = 0) -> str:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd_components(path, scheduler=scheduler, safety=safety, seed=seed))
    pipe.save_pretrained(os.fspath(path))
    return os.fspath(path)


def sdxl_components(tmp_dir, seed: int = 0):
    tokenizer = clip_tokenizer(os.path.join(os.fspath(tmp_dir), "_tokenizer_src"))
    tokenizer_2 = clip_tokenizer(os.path.join(os.fspath(tmp_dir), "_tokenizer_2_src"), pad_token="!")
    return dict(
        unet=tiny_unet_2d_condition(cross_attention_dim=64, seed=seed, sdxl=True),
        vae=tiny_vae(seed=seed + 10, scaling_factor=0.13025),
        text_encoder=clip_text_model(seed + 20, tokenizer=tokenizer),
        text_encoder_2=clip_text_model(seed + 21, projection_dim=32, tokenizer=tokenizer_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=diffusers_scheduler("EulerDiscreteScheduler", timestep_spacing="leading", steps_offset=1),
    )


def save_sdxl_folder(path, seed: int = 0) -> str:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**sdxl_components(path, seed=seed))
    pipe.save_pretrained(os.fspath(path))
    return os.fspath(path)
