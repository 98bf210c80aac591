"""Every down, mid and up block type diffusers' factories accept, against diffusers' own block:
the same state_dict keys and, with the same weights, the same outputs (fp32, 1e-5 relative).

Blocks are built through both libraries' ``get_down_block``/``get_mid_block``/``get_up_block``
with the same small, odd-sized configs, so a name that fastdiff builds differently, or not at
all, fails here.
"""

import pytest
import torch
from _utils import assert_fp32_close
from diffusers.models.unets import unet_2d_blocks as diffusers_blocks

from fastdiff.models import unet_2d_blocks as blocks

TEMB, CROSS, TOKENS = 20, 12, 5


def _perturbed(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.eval()


def _pair(factory: str, name: str, **kwargs):
    torch.manual_seed(0)
    reference = _perturbed(getattr(diffusers_blocks, factory)(name, **kwargs))
    ours = getattr(blocks, factory)(name, **kwargs)
    assert sorted(ours.state_dict()) == sorted(reference.state_dict()), name
    ours.load_state_dict(reference.state_dict())
    return reference, ours.eval()


def _assert_same(ours, reference, what):
    if isinstance(reference, torch.Tensor):
        assert_fp32_close(ours, reference, what=what)
        return
    assert type(ours) is type(reference) and len(ours) == len(reference), what
    for i, (a, b) in enumerate(zip(ours, reference)):
        if b is None or isinstance(b, int):
            assert a is None or a == b, f"{what}[{i}]"
        else:
            _assert_same(a, b, f"{what}[{i}]")


COMMON = dict(resnet_eps=1e-5, resnet_act_fn="silu", dropout=0.0)
# diffusers' get_down_block passes downsample_padding=None on to blocks that cannot take it.
PADDING = dict(downsample_padding=1)

# name -> (extra factory kwargs, in_channels, out_channels, forward kind)
DOWN = {
    "DownBlock2D": (dict(resnet_groups=4, resnet_time_scale_shift="scale_shift", **PADDING), 8, 16, "temb"),
    "ResnetDownsampleBlock2D": (dict(resnet_groups=4, resnet_skip_time_act=True, resnet_out_scale_factor=1.3), 8, 16, "temb"),
    "AttnDownBlock2D": (dict(resnet_groups=4, attention_head_dim=8, downsample_type="resnet"), 8, 16, "temb"),
    "CrossAttnDownBlock2D": (
        dict(resnet_groups=4, num_attention_heads=2, cross_attention_dim=CROSS, downsample_padding=0), 8, 16, "cross"
    ),
    "SimpleCrossAttnDownBlock2D": (
        dict(resnet_groups=4, attention_head_dim=8, cross_attention_dim=CROSS, cross_attention_norm=None, resnet_time_scale_shift="scale_shift"),
        8, 16, "cross",
    ),
    "SkipDownBlock2D": (dict(resnet_time_scale_shift="scale_shift"), 32, 32, "skip"),
    "AttnSkipDownBlock2D": (dict(attention_head_dim=8), 32, 32, "skip"),
    "DownEncoderBlock2D": (dict(resnet_groups=4, **PADDING), 8, 16, "plain"),
    "AttnDownEncoderBlock2D": (dict(resnet_groups=4, attention_head_dim=8, **PADDING), 8, 16, "plain"),
    "KDownBlock2D": (dict(), 32, 64, "temb"),
    "KCrossAttnDownBlock2D": (dict(attention_head_dim=16, cross_attention_dim=CROSS), 32, 64, "cross"),
}

UP = {
    "UpBlock2D": (dict(resnet_groups=4), "temb"),
    "ResnetUpsampleBlock2D": (dict(resnet_groups=4, resnet_skip_time_act=True), "temb"),
    "AttnUpBlock2D": (dict(resnet_groups=4, attention_head_dim=8, upsample_type="resnet"), "temb"),
    "CrossAttnUpBlock2D": (dict(resnet_groups=4, num_attention_heads=2, cross_attention_dim=CROSS), "cross"),
    "SimpleCrossAttnUpBlock2D": (
        dict(resnet_groups=4, attention_head_dim=8, cross_attention_dim=32, only_cross_attention=True,
             cross_attention_norm="group_norm"),
        "cross32",
    ),
    "SkipUpBlock2D": (dict(), "skip"),
    "AttnSkipUpBlock2D": (dict(attention_head_dim=8), "skip"),
    "UpDecoderBlock2D": (dict(resnet_groups=4), "plain"),
    "AttnUpDecoderBlock2D": (dict(resnet_groups=4, attention_head_dim=8), "plain"),
    "KUpBlock2D": (dict(), "k"),
    "KCrossAttnUpBlock2D": (dict(attention_head_dim=16, cross_attention_dim=CROSS), "kcross"),
}


# The last block of a UNet (no resampler) changes the wiring of these; the others just drop it.
LAST_DIFFERS = ("Skip", "K", "SimpleCross")


def _cases(table):
    return [(name, True) for name in sorted(table)] + [
        pytest.param(name, False, id=f"{name}-last") for name in sorted(table) if name.startswith(LAST_DIFFERS)
    ]


@pytest.mark.parametrize("name, add_downsample", _cases(DOWN))
@torch.no_grad()
def test_down_block_matches_diffusers(name, add_downsample):
    extra, cin, cout, kind = DOWN[name]
    reference, ours = _pair(
        "get_down_block", name, num_layers=2, in_channels=cin, out_channels=cout, temb_channels=TEMB,
        add_downsample=add_downsample, **COMMON, **extra,
    )
    torch.manual_seed(1)
    x, temb = torch.randn(2, cin, 6, 10), torch.randn(2, TEMB)
    if kind == "plain":
        _assert_same(ours(x), reference(x), name)
    elif kind == "temb":
        _assert_same(ours(x, temb), reference(x, temb), name)
    elif kind == "skip":
        image = torch.randn(2, 3, 6, 10)
        _assert_same(ours(x, temb, image), reference(x, temb, skip_sample=image), name)
    else:
        text, mask = torch.randn(2, TOKENS, CROSS), torch.zeros(2, 1, TOKENS)
        mask[1, :, -2:] = -10000.0
        expected = reference(x, temb, encoder_hidden_states=text, encoder_attention_mask=mask)
        _assert_same(ours(x, temb, text, None, mask), expected, name)


@pytest.mark.parametrize("name, add_upsample", _cases(UP))
@torch.no_grad()
def test_up_block_matches_diffusers(name, add_upsample):
    extra, kind = UP[name]
    cin, cout, prev = (32, 32, 32) if kind in ("skip", "k", "kcross") else (8, 16, 24)
    if kind == "kcross":
        cin, cout, prev = 64, 32, 32
    reference, ours = _pair(
        "get_up_block", name, num_layers=3, in_channels=cin, out_channels=cout, prev_output_channel=prev,
        temb_channels=None if kind == "plain" else TEMB, add_upsample=add_upsample, resolution_idx=1, **COMMON, **extra,
    )
    torch.manual_seed(1)
    temb = torch.randn(2, TEMB)
    if kind == "plain":
        x = torch.randn(2, cin, 6, 10)
        _assert_same(ours(x), reference(x), name)
        return
    if kind in ("k", "kcross"):
        x, res = torch.randn(2, cout, 6, 10), (torch.randn(2, cout, 6, 10),)
    else:
        x = torch.randn(2, prev, 6, 10)
        res = (torch.randn(2, cin, 6, 10), torch.randn(2, cout, 6, 10), torch.randn(2, cout, 6, 10))
    if kind in ("temb", "k"):
        _assert_same(ours(x, res, temb), reference(x, res, temb), name)
    elif kind == "skip":
        image = torch.randn(2, 3, 3, 5)
        _assert_same(ours(x, res, temb, image), reference(x, res, temb, image), name)
    else:
        text = torch.randn(2, TOKENS, 32 if kind == "cross32" else CROSS)
        _assert_same(ours(x, res, temb, text), reference(x, res, temb, encoder_hidden_states=text), name)


@pytest.mark.parametrize(
    "name, extra",
    [
        ("UNetMidBlock2DCrossAttn", dict(num_attention_heads=2, cross_attention_dim=CROSS)),
        ("UNetMidBlock2DSimpleCrossAttn", dict(attention_head_dim=8, cross_attention_dim=CROSS, resnet_skip_time_act=True)),
        ("UNetMidBlock2D", dict(resnet_time_scale_shift="scale_shift")),
    ],
)
@torch.no_grad()
def test_mid_block_matches_diffusers(name, extra):
    reference, ours = _pair(
        "get_mid_block", name, temb_channels=TEMB, in_channels=16, resnet_eps=1e-5, resnet_act_fn="silu",
        resnet_groups=4, output_scale_factor=1.2, **extra,
    )
    torch.manual_seed(1)
    x, temb, text = torch.randn(2, 16, 6, 10), torch.randn(2, TEMB), torch.randn(2, TOKENS, CROSS)
    if name == "UNetMidBlock2D":
        _assert_same(ours(x, temb), reference(x, temb), name)
    else:
        _assert_same(ours(x, temb, text), reference(x, temb, encoder_hidden_states=text), name)


@torch.no_grad()
def test_spatial_mid_and_decoder_blocks_match_diffusers():
    """MoVQ's ``resnet_time_scale_shift="spatial"``: norms conditioned on a feature map."""
    torch.manual_seed(0)
    kwargs = dict(in_channels=32, temb_channels=4, resnet_eps=1e-6, resnet_groups=32, resnet_time_scale_shift="spatial")
    reference = _perturbed(diffusers_blocks.UNetMidBlock2D(attention_head_dim=8, **kwargs))
    ours = blocks.UNetMidBlock2D(attention_head_dim=8, **kwargs).eval()
    ours.load_state_dict(reference.state_dict())
    x, zq = torch.randn(2, 32, 6, 10), torch.randn(2, 4, 3, 5)
    _assert_same(ours(x, zq), reference(x, zq), "UNetMidBlock2D spatial")
    up = dict(num_layers=2, in_channels=32, out_channels=32, add_upsample=True, resnet_eps=1e-6, resnet_act_fn="silu",
              resnet_groups=32, resnet_time_scale_shift="spatial", temb_channels=4, attention_head_dim=8)
    for name in ("UpDecoderBlock2D", "AttnUpDecoderBlock2D"):
        reference, ours = _pair("get_up_block", name, prev_output_channel=None, **up)
        _assert_same(ours(x, zq), reference(x, temb=zq), name)


def test_every_diffusers_block_name_is_known():
    """The names diffusers' factories dispatch on are exactly fastdiff's lists."""
    import inspect

    source = inspect.getsource(diffusers_blocks)
    for factory, names in (
        ("get_down_block", blocks.DOWN_BLOCK_TYPES),
        ("get_up_block", blocks.UP_BLOCK_TYPES),
        ("get_mid_block", blocks.MID_BLOCK_TYPES),
    ):
        body = inspect.getsource(getattr(diffusers_blocks, factory))
        variable = {"get_down_block": "down_block_type", "get_up_block": "up_block_type"}.get(factory, "mid_block_type")
        import re

        theirs = set(re.findall(rf'{variable} == "(\w+)"', body))
        assert theirs == set(names), (factory, sorted(theirs ^ set(names)))
    assert "def get_down_block" in source


def test_unknown_block_names_raise_with_the_list():
    common = dict(num_layers=1, in_channels=8, out_channels=8, temb_channels=8, resnet_eps=1e-5, resnet_act_fn="silu")
    with pytest.raises(ValueError, match=r"down_block_types: unknown block 'Down3D'.*'SkipDownBlock2D'"):
        blocks.get_down_block("Down3D", add_downsample=True, **common)
    with pytest.raises(ValueError, match=r"up_block_types: unknown block 'UpBlock3D'.*'KUpBlock2D'"):
        blocks.get_up_block("UpBlock3D", add_upsample=True, prev_output_channel=8, **common)
    with pytest.raises(ValueError, match=r"mid_block_type: unknown block 'Mid'"):
        blocks.get_mid_block("Mid", temb_channels=8, in_channels=8, resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=4)
    with pytest.raises(ValueError, match="cross_attention_dim must be specified for SimpleCrossAttnDownBlock2D"):
        blocks.get_down_block("SimpleCrossAttnDownBlock2D", add_downsample=True, resnet_groups=4, **common)
