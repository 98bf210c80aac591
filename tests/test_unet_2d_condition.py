"""UNet2DConditionModel against diffusers: SD1-, SD2- and SDXL-style tiny configs, and the real SD1.5 config."""

import pytest
import torch
from _utils import assert_fp32_close
from diffusers import UNet2DConditionModel as DiffusersUNet2DConditionModel

from fastdiff import UNet2DConditionModel

TEXT_DIM = 24
BASE = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,  # SD1 quirk: this is the number of heads
    cross_attention_dim=TEXT_DIM,
)
SDXL_TEXT_EMBEDS, SDXL_TIME_IDS, SDXL_TIME_DIM = 20, 6, 8

CONFIGS = {
    "sd1": {},
    "sd2": dict(use_linear_projection=True, upcast_attention=True, attention_head_dim=(2, 4)),
    "sdxl": dict(
        block_out_channels=(16, 32, 48),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 3),
        attention_head_dim=(2, 2, 6),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_TEXT_EMBEDS + SDXL_TIME_IDS * SDXL_TIME_DIM,
    ),
    "lcm_classes_scale_shift": dict(
        time_cond_proj_dim=10,
        num_class_embeds=3,
        resnet_time_scale_shift="scale_shift",
        only_cross_attention=(True, False),
        timestep_post_act="silu",
        time_embedding_act_fn="silu",
    ),
    "projection_class_concat_mid_resnet": dict(
        class_embed_type="projection",
        projection_class_embeddings_input_dim=12,
        class_embeddings_concat=True,
        mid_block_type="UNetMidBlock2D",
        conv_in_kernel=1,
        conv_out_kernel=1,
        layers_per_block=(2, 1),
        cross_attention_dim=(TEXT_DIM, TEXT_DIM),
    ),
}


def _kwargs(name, batch):
    if name == "sdxl":
        return {
            "added_cond_kwargs": {
                "text_embeds": torch.randn(batch, SDXL_TEXT_EMBEDS),
                "time_ids": torch.rand(batch, SDXL_TIME_IDS) * 1024,
            }
        }
    if name.startswith("lcm"):
        return {"timestep_cond": torch.randn(batch, 10), "class_labels": torch.randint(0, 3, (batch,))}
    if name.startswith("projection"):
        return {"class_labels": torch.randn(batch, 12)}
    return {}


def _diffusers_unet(config, seed=0):
    torch.manual_seed(seed)
    model = DiffusersUNet2DConditionModel(**config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    reference = _diffusers_unet({**BASE, **CONFIGS[request.param]})
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return request.param, reference, UNet2DConditionModel.from_pretrained(folder)


@torch.no_grad()
@pytest.mark.parametrize("size", [(16, 24), (13, 19)], ids=["even", "odd"])
def test_forward_matches_diffusers(case, size):
    name, reference, model = case
    x = torch.randn(3, 4, *size)
    text = torch.randn(3, 7, TEXT_DIM)
    t = torch.tensor([1, 500, 999])
    kwargs = _kwargs(name, 3)
    ours = model(x, t, text, **kwargs).sample
    assert ours.shape == (3, 4, *size)
    assert_fp32_close(ours, reference(x, t, text, **kwargs).sample, what=name)


def test_state_dict_identical(case):
    _, reference, model = case
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@torch.no_grad()
def test_fastdiff_folder_loads_in_diffusers(case, tmp_path):
    name, _, model = case
    model.save_pretrained(tmp_path, max_shard_size="400KB")
    reloaded = DiffusersUNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, TEXT_DIM)
    kwargs = _kwargs(name, 1)
    assert_fp32_close(model(x, 3.5, text, **kwargs).sample, reloaded(x, 3.5, text, **kwargs).sample, what=name)


@torch.no_grad()
def test_masks_residuals_and_lora_scale_match_diffusers(tmp_path):
    reference = _diffusers_unet(BASE)
    reference.save_pretrained(tmp_path, variant="fp16")
    model = UNet2DConditionModel.from_pretrained(tmp_path, variant="fp16")
    x, text = torch.randn(2, 4, 8, 12), torch.randn(2, 6, TEXT_DIM)
    mask = torch.tensor([[1, 1, 1, 0, 0, 1], [1, 0, 1, 1, 1, 1]])
    down = tuple(torch.randn(2, c, h, w) for c, h, w in [(16, 8, 12), (16, 8, 12), (16, 4, 6), (32, 4, 6)])
    mid = torch.randn(2, 32, 4, 6)
    kwargs = dict(
        encoder_attention_mask=mask,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        cross_attention_kwargs={"scale": 0.5},
    )
    ours = model(x, 10, text, **kwargs).sample
    assert_fp32_close(ours, reference(x, 10, text, **kwargs).sample, what="masked + controlnet")
    assert not torch.allclose(ours, model(x, 10, text).sample), "mask and residuals had no effect"

    adapter = (torch.randn(2, 16, 8, 12), torch.randn(2, 32, 4, 6))
    ours = model(x, 10, text, down_intrablock_additional_residuals=adapter).sample
    theirs = reference(x, 10, text, down_intrablock_additional_residuals=list(adapter)).sample
    assert_fp32_close(ours, theirs, what="T2I-Adapter residuals")
    with pytest.raises(ValueError, match="ControlNet passes both"):
        model(x, 10, text, down_block_additional_residuals=down)


@torch.no_grad()
def test_fused_qkv_projections_keep_outputs_and_keys(case):
    name, _, model = case
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, TEXT_DIM)
    kwargs = _kwargs(name, 2)
    expected = model(x, 7, text, **kwargs).sample
    keys = list(model.state_dict())
    model.fuse_qkv_projections()
    try:
        assert list(model.state_dict()) == keys
        assert_fp32_close(model(x, 7, text, **kwargs).sample, expected, what="fused qkv")
    finally:
        model.unfuse_qkv_projections()


def test_bad_inputs_name_the_argument(case):
    name, _, model = case
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, TEXT_DIM)
    kwargs = _kwargs(name, 2)
    with pytest.raises(ValueError, match=r"sample: expected a \(B, 4, H, W\)"):
        model(torch.randn(2, 3, 8, 8), 1, text, **kwargs)
    with pytest.raises(ValueError, match="encoder_hidden_states: expected last dim 24"):
        model(x, 1, torch.randn(2, 5, 7), **kwargs)
    with pytest.raises(ValueError, match="encoder_hidden_states: batch 1 does not match"):
        model(x, 1, text[:1], **kwargs)
    with pytest.raises(ValueError, match=r"cross_attention_kwargs: unsupported keys \['gligen'\]"):
        model(x, 1, text, cross_attention_kwargs={"gligen": {}}, **kwargs)
    if name.startswith("lcm"):
        with pytest.raises(ValueError, match=r"timestep_cond: expected \(B, 10\)"):
            model(x, 1, text, timestep_cond=torch.randn(2, 9), class_labels=kwargs["class_labels"])
    else:
        with pytest.raises(ValueError, match="timestep_cond: this model has no time_cond_proj_dim"):
            model(x, 1, text, timestep_cond=torch.randn(2, 10), **kwargs)
    if name == "sdxl":
        with pytest.raises(ValueError, match="added_cond_kwargs: required"):
            model(x, 1, text)
        with pytest.raises(ValueError, match="added_cond_kwargs: missing 'time_ids'"):
            model(x, 1, text, added_cond_kwargs={"text_embeds": kwargs["added_cond_kwargs"]["text_embeds"]})
        with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
            model(x, 1, text, added_cond_kwargs={"text_embeds": torch.randn(2, 3), "time_ids": torch.randn(2, 6)})


def test_unsupported_config_values_raise():
    with pytest.raises(ValueError, match="dual_cross_attention"):
        UNet2DConditionModel(**BASE, dual_cross_attention=True)
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNet2DConditionModel(**BASE, addition_embed_type="image")
    with pytest.raises(ValueError, match="num_attention_heads"):
        UNet2DConditionModel(**BASE, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"attention_head_dim: expected one entry per down block \(2\)"):
        UNet2DConditionModel(**{**BASE, "attention_head_dim": (2, 2, 2)})


SD15_UNET_CONFIG = dict(
    sample_size=64,
    cross_attention_dim=768,
    # everything else is UNet2DConditionModel's default, which is the SD1.5 UNet
)


@pytest.mark.slow
@torch.no_grad()
def test_real_sd15_config_random_weights():
    """The full SD1.5 UNet (860M parameters) with random weights at a 16x16 latent.

    The fastdiff model is built on the meta device and takes diffusers' tensors
    (assign, no copy), so the test holds one copy of the weights.
    """
    torch.manual_seed(0)
    reference = DiffusersUNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(reference.config)
    model.load_state_dict(reference.state_dict(), strict=True, assign=True)
    model.eval()
    x, text = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 768)
    ours = model(x, 981, text).sample
    assert_fp32_close(ours, reference(x, 981, text).sample, what="SD1.5 UNet")


def test_registration_order_matches_diffusers(case):
    """down_blocks, up_blocks, then mid_block, as diffusers registers them: attn_processors
    (and a list given to set_attention_slice) follow the same order, and so do the keys."""
    _, reference, model = case
    assert list(model.attn_processors) == list(reference.attn_processors)
    blocks = ("down_blocks", "up_blocks", "mid_block")
    assert [n for n, _ in model.named_children() if n in blocks] == [n for n, _ in reference.named_children() if n in blocks]
    assert list(dict.fromkeys(k.split(".")[0] for k in model.state_dict())) == list(dict.fromkeys(k.split(".")[0] for k in reference.state_dict()))


class _GainProcessor:
    """A processor that takes a keyword from cross_attention_kwargs (diffusers' plain math, times gain)."""

    def __init__(self):
        self.gains = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, gain=1.0):
        self.gains.append(gain)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attn.prepare_attention_mask(attention_mask, key.shape[1], hidden_states.shape[0]))
        return gain * attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value)))


@torch.no_grad()
def test_cross_attention_kwargs_reach_attn1_and_attn2(case):
    name, reference, model = case
    ours_proc, theirs_proc = _GainProcessor(), _GainProcessor()
    saved_ours, saved_theirs = model.attn_processors, reference.attn_processors
    model.set_attn_processor(ours_proc)
    reference.set_attn_processor(theirs_proc)
    try:
        x, text, t = torch.randn(2, 4, 8, 12), torch.randn(2, 5, TEXT_DIM), torch.tensor([3, 700])
        kwargs = _kwargs(name, 2)
        ours = model(x, t, text, cross_attention_kwargs={"gain": 0.6}, **kwargs).sample
        theirs = reference(x, t, text, cross_attention_kwargs={"gain": 0.6}, **kwargs).sample
        plain = model(x, t, text, **kwargs).sample
    finally:
        model.set_attn_processor(saved_ours)
        reference.set_attn_processor(saved_theirs)
    n = len(model.attn_processors)
    assert ours_proc.gains[:n] == [0.6] * n and len(ours_proc.gains) == 2 * n
    assert_fp32_close(ours, theirs, what=name)
    assert not torch.allclose(ours, plain, atol=1e-3)
