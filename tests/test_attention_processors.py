"""The attention-processor API: diffusers' processors and users' own run on fastdiff.nn.Attention
unchanged, fastdiff's processors match diffusers' numerics, and models expose
attn_processors / set_attn_processor / set_default_attn_processor / set_attention_slice
with diffusers' semantics. diffusers is the oracle throughout (same weights, same inputs)."""

import logging

import pytest
import torch
from torch import nn

from _utils import assert_fp32_close
from fastdiff import backends
from fastdiff.nn.attention import Attention
from fastdiff.nn.attention_processor import FastdiffAttnAddedKVProcessor, FastdiffAttnProcessor, SlicedAttnAddedKVProcessor, SlicedAttnProcessor

dap = pytest.importorskip("diffusers.models.attention_processor")


def _pair(kwargs, processor=None):
    """diffusers' Attention with random weights, and fastdiff's with the same state_dict."""
    ref = dap.Attention(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = Attention(**kwargs).eval()
    result = ours.load_state_dict(ref.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    return ref, ours


# (constructor kwargs, hidden_states shape, encoder_hidden_states shape or None, temb shape or None)
CASES = {
    "self-groupnorm-d5": (dict(query_dim=15, heads=3, dim_head=5, norm_num_groups=3), (2, 11, 15), None, None),
    "cross-layernorm-upcast": (dict(query_dim=12, cross_attention_dim=10, heads=2, dim_head=6, bias=True, cross_attention_norm="layer_norm", upcast_attention=True, upcast_softmax=True), (2, 9, 12), (2, 7, 10), None),
    "cross-groupnorm": (dict(query_dim=12, cross_attention_dim=10, heads=2, dim_head=6, cross_attention_norm="group_norm", cross_attention_norm_num_groups=2), (2, 9, 12), (2, 7, 10), None),
    "vae-4d-residual": (dict(query_dim=16, heads=2, dim_head=8, norm_num_groups=4, bias=True, residual_connection=True, rescale_output_factor=2.0, _from_deprecated_attn_block=True), (2, 16, 3, 5), None, None),
    "spatial-norm-temb": (dict(query_dim=32, heads=1, dim_head=32, spatial_norm_dim=3, residual_connection=True), (1, 32, 4, 3), None, (1, 3, 2, 2)),
}

# (diffusers processor for both modules, or (diffusers processor, fastdiff processor) compared to each other)
PROCESSORS = {
    "AttnProcessor": lambda: (dap.AttnProcessor(), None),
    "AttnProcessor2_0": lambda: (dap.AttnProcessor2_0(), None),
    "diffusers-sliced-1": lambda: (dap.SlicedAttnProcessor(1), None),
    "fastdiff-default": lambda: (dap.AttnProcessor(), FastdiffAttnProcessor()),
    # diffusers' SlicedAttnProcessor skips spatial_norm (it takes no temb): compare with the plain math.
    "fastdiff-sliced-2": lambda: (dap.AttnProcessor(), SlicedAttnProcessor(2)),
}


def _inputs(shape, ctx_shape, temb_shape):
    x = torch.randn(shape)
    ctx = torch.randn(ctx_shape) if ctx_shape is not None else None
    temb = torch.randn(temb_shape) if temb_shape is not None else None
    mask = None
    if len(shape) == 3:  # additive (B, 1, Lk) key mask, as pipelines build it
        lk = (ctx_shape or shape)[1]
        mask = torch.where(torch.rand(shape[0], 1, lk) > 0.3, 0.0, -1e4) + 0.1 * torch.randn(shape[0], 1, lk)
    return x, ctx, temb, mask


@pytest.mark.parametrize("proc", sorted(PROCESSORS))
@pytest.mark.parametrize("case", sorted(CASES))
@torch.no_grad()
def test_processor_matches_diffusers(seed, case, proc):
    kwargs, shape, ctx_shape, temb_shape = CASES[case]
    ref, ours = _pair(kwargs)
    theirs_proc, ours_proc = PROCESSORS[proc]()
    ref.set_processor(theirs_proc)
    ours.set_processor(ours_proc if ours_proc is not None else theirs_proc)
    x, ctx, temb, mask = _inputs(shape, ctx_shape, temb_shape)
    extra = {"temb": temb} if temb is not None else {}
    with backends.trace_dispatch() as calls:
        out = ours(x, ctx, attention_mask=mask, **extra)
    assert calls[0] == ("attention_processor", type(ours.processor).__name__)
    expected = ref(x, ctx, attention_mask=mask, **extra)
    assert out.shape == expected.shape == x.shape
    assert_fp32_close(out, expected, what=f"{case} / {proc}")


@torch.no_grad()
def test_diffusers_processor_ignores_fused_projections(seed):
    """diffusers' processors read to_q/to_k/to_v, the parameters of record, so fusing
    (which only the fused processor uses) changes nothing for them."""
    kwargs, shape, _, _ = CASES["self-groupnorm-d5"]
    ref, ours = _pair(kwargs)
    ours.fuse_projections()
    x = torch.randn(shape)
    default = ours(x)
    ours.set_processor(dap.AttnProcessor2_0())
    assert_fp32_close(ours(x), ref(x))
    assert_fp32_close(default, ref(x))


ADDED_KV = {
    f"{'only-cross' if only else 'self+cross'}-{norm}": dict(
        query_dim=12,
        cross_attention_dim=12,
        heads=3,
        dim_head=4,
        added_kv_proj_dim=12 if norm == "layer_norm" else 10,  # diffusers' LayerNorm norms cross_attention_dim channels
        norm_num_groups=4,
        bias=True,
        upcast_softmax=True,
        only_cross_attention=only,
        cross_attention_norm=norm,
        cross_attention_norm_num_groups=2,
    )
    for only in (False, True)
    for norm in (None, "layer_norm", "group_norm")
}

ADDED_KV_PROCESSORS = {
    "AttnAddedKVProcessor": lambda: (dap.AttnAddedKVProcessor(), None),
    "AttnAddedKVProcessor2_0": lambda: (dap.AttnAddedKVProcessor2_0(), None),
    "diffusers-sliced-2": lambda: (dap.SlicedAttnAddedKVProcessor(2), None),
    "fastdiff-default": lambda: (dap.AttnAddedKVProcessor(), FastdiffAttnAddedKVProcessor()),
    "fastdiff-sliced-4": lambda: (dap.AttnAddedKVProcessor(), SlicedAttnAddedKVProcessor(4)),
}


@pytest.mark.parametrize("proc", sorted(ADDED_KV_PROCESSORS))
@pytest.mark.parametrize("case", sorted(ADDED_KV))
@torch.no_grad()
def test_added_kv_processor_matches_diffusers(seed, case, proc):
    """The SimpleCrossAttn / UnCLIP attention: added key/value projections of the text,
    optional self keys, cross norms; channels-first input."""
    kwargs = ADDED_KV[case]
    ref, ours = _pair(kwargs)
    assert isinstance(ours.processor, FastdiffAttnAddedKVProcessor)
    theirs_proc, ours_proc = ADDED_KV_PROCESSORS[proc]()
    ref.set_processor(theirs_proc)
    ours.set_processor(ours_proc if ours_proc is not None else theirs_proc)
    x, ctx = torch.randn(2, 12, 3, 5), torch.randn(2, 7, kwargs["added_kv_proj_dim"])
    # diffusers pads a (B, 1, Lenc) mask with Lq zeros to cover the self keys, so only
    # the self+cross layout takes one (with only_cross_attention it fails in diffusers too).
    mask = None if kwargs["only_cross_attention"] else torch.randn(2, 1, 7)
    out = ours(x, ctx, attention_mask=mask)
    assert_fp32_close(out, ref(x, ctx, attention_mask=mask), what=f"{case} / {proc}")


@torch.no_grad()
def test_helper_methods_match_diffusers(seed):
    kwargs = dict(query_dim=12, cross_attention_dim=10, heads=3, dim_head=4, upcast_attention=True, upcast_softmax=True, cross_attention_norm="group_norm", cross_attention_norm_num_groups=5)
    ref, ours = _pair(kwargs)
    t3 = torch.randn(2, 7, 12)
    assert torch.equal(ours.head_to_batch_dim(t3), ref.head_to_batch_dim(t3))
    assert torch.equal(ours.head_to_batch_dim(t3, out_dim=4), ref.head_to_batch_dim(t3, out_dim=4))
    t4 = torch.randn(2, 2, 5, 12)
    assert torch.equal(ours.head_to_batch_dim(t4), ref.head_to_batch_dim(t4))
    b = torch.randn(6, 7, 4)
    assert torch.equal(ours.batch_to_head_dim(b), ref.batch_to_head_dim(b))
    q, k = torch.randn(6, 7, 4).half(), torch.randn(6, 5, 4).half()
    mask = torch.randn(6, 1, 5)  # fp32: upcast_attention computes the scores in fp32
    for m in (None, mask):
        got, want = ours.get_attention_scores(q, k, m), ref.get_attention_scores(q, k, m)
        assert got.dtype == want.dtype == torch.float16 and torch.equal(got, want)
    for m, target, out_dim in [(torch.randn(2, 1, 5), 5, 3), (torch.randn(2, 1, 5), 5, 4), (torch.randn(2, 1, 3), 5, 3), (torch.randn(6, 7, 5), 5, 3)]:
        assert torch.equal(ours.prepare_attention_mask(m, target, 2, out_dim=out_dim), ref.prepare_attention_mask(m, target, 2, out_dim=out_dim))
    assert ours.prepare_attention_mask(None, 5, 2) is None
    ctx = torch.randn(2, 5, 10)
    assert_fp32_close(ours.norm_encoder_hidden_states(ctx), ref.norm_encoder_hidden_states(ctx))
    for name in ("heads", "scale", "sliceable_head_dim", "inner_dim", "inner_kv_dim", "is_cross_attention", "upcast_attention", "upcast_softmax",
                 "only_cross_attention", "added_kv_proj_dim", "residual_connection", "rescale_output_factor", "norm_q", "norm_k", "spatial_norm",
                 "group_norm", "add_k_proj", "add_v_proj", "add_q_proj", "to_add_out", "is_causal", "fused_projections"):
        assert getattr(ours, name) == getattr(ref, name), name


class ScaledProcessor:
    """A user's processor: diffusers' plain math through the helper methods, times a
    keyword it takes from cross_attention_kwargs."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, gain=1.0):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attn.prepare_attention_mask(attention_mask, key.shape[1], hidden_states.shape[0]))
        return gain * attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, value)))


@torch.no_grad()
def test_custom_processor_and_cross_attention_kwargs(seed, caplog):
    kwargs = dict(query_dim=12, cross_attention_dim=10, heads=2, dim_head=6)
    ref, ours = _pair(kwargs)
    ref.set_processor(ScaledProcessor())
    ours.set_processor(ScaledProcessor())
    x, ctx = torch.randn(2, 9, 12), torch.randn(2, 7, 10)
    with caplog.at_level(logging.WARNING), backends.trace_dispatch() as calls:
        out = ours(x, ctx, gain=0.7, not_a_kwarg=3, ip_adapter_masks=None)
    assert calls == [("attention_processor", "ScaledProcessor")]
    assert "['not_a_kwarg'] are not expected by ScaledProcessor" in caplog.text
    assert "ip_adapter_masks" not in caplog.text
    assert_fp32_close(out, ref(x, ctx, gain=0.7))
    assert_fp32_close(out / 0.7, ours(x, ctx))
    # A plain function works as a processor too.
    ours.set_processor(lambda attn, hidden_states, encoder_hidden_states=None, attention_mask=None: attn.to_out[0](attn.to_q(hidden_states)))
    assert_fp32_close(ours(x, ctx, gain=2.0), ours.to_out[0](ours.to_q(x)))


def test_module_processor_joins_the_state_dict_and_leaves_it():
    """As in diffusers: an nn.Module processor is a submodule until a plain one replaces it."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(0.5))

        def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
            return FastdiffAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask) * self.gain

    attn = Attention(query_dim=8, heads=2, dim_head=4)
    base = sorted(attn.state_dict())
    attn.set_processor(Gate())
    assert sorted(attn.state_dict()) == sorted(base + ["processor.gain"])
    x = torch.randn(1, 3, 8)
    assert_fp32_close(attn(x), 0.5 * attn.default_processor()(attn, x))
    attn.set_processor(FastdiffAttnProcessor())
    assert sorted(attn.state_dict()) == base
    assert attn.get_processor() is attn.processor and attn.get_processor(return_deprecated_lora=True) is None


def test_explain_and_trace_name_the_processor(seed):
    attn = Attention(query_dim=12, cross_attention_dim=10, heads=2, dim_head=6)
    x, ctx = torch.randn(2, 9, 12), torch.randn(2, 7, 10)
    text = attn.explain(x, ctx, attention_mask=torch.zeros(2, 1, 7))
    assert text.startswith("Attention processor: FastdiffAttnProcessor (fastdiff's default)")
    assert "would run 'sdpa'" in text and "triton:" in text
    with backends.trace_dispatch() as calls:
        attn(x, ctx)
    assert calls == [("attention_processor", "FastdiffAttnProcessor"), ("attention", "sdpa")]
    attn.set_processor(dap.AttnProcessor2_0())
    assert "AttnProcessor2_0 (the default is FastdiffAttnProcessor)" in attn.explain(x, ctx)
    with backends.trace_dispatch() as calls:
        attn(x, ctx)
    assert calls == [("attention_processor", "AttnProcessor2_0")]  # diffusers' processor calls SDPA itself
    added = Attention(query_dim=12, cross_attention_dim=12, heads=3, dim_head=4, added_kv_proj_dim=10, norm_num_groups=4)
    assert "FastdiffAttnAddedKVProcessor (fastdiff's default)" in added.explain(torch.randn(1, 12, 2, 3), torch.randn(1, 5, 10))


def test_default_processor_compiles_without_graph_breaks(seed):
    attn = Attention(query_dim=12, cross_attention_dim=10, heads=2, dim_head=6).eval()
    x, ctx = torch.randn(2, 9, 12), torch.randn(2, 7, 10)
    compiled = torch.compile(attn, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_fp32_close(compiled(x, ctx), attn(x, ctx))


def test_constructor_and_slice_errors():
    with pytest.raises(ValueError, match="only_cross_attention=True needs added_kv_proj_dim"):
        Attention(query_dim=8, only_cross_attention=True)
    with pytest.raises(ValueError, match="cross_attention_norm must be None, 'layer_norm' or 'group_norm', got 'batch_norm'"):
        Attention(query_dim=8, cross_attention_norm="batch_norm")
    with pytest.raises(ValueError, match="kv_heads=2 .* is not implemented"):
        Attention(query_dim=8, heads=4, kv_heads=2, dim_head=2)
    with pytest.raises(ValueError, match="qk_norm='rms_norm' is not implemented"):
        Attention(query_dim=8, qk_norm="rms_norm")
    assert Attention(query_dim=8, heads=4, kv_heads=4, dim_head=2).heads == 4
    attn = Attention(query_dim=8, heads=4, dim_head=2)
    with pytest.raises(ValueError, match="slice_size 5 has to be smaller or equal to 4"):
        attn.set_attention_slice(5)
    with pytest.raises(ValueError, match="slice_size must be a positive int or None, got 0"):
        attn.set_attention_slice(0)
    with pytest.raises(ValueError, match="processor must be callable"):
        attn.set_processor("AttnProcessor")
    only = Attention(query_dim=8, cross_attention_dim=8, heads=2, dim_head=4, added_kv_proj_dim=6, only_cross_attention=True, norm_num_groups=2)
    assert only.to_k is None and only.to_v is None
    assert sorted(only.state_dict()) == sorted(dap.Attention(query_dim=8, cross_attention_dim=8, heads=2, dim_head=4, added_kv_proj_dim=6, only_cross_attention=True, norm_num_groups=2).state_dict())
    only.set_attention_slice(1)
    assert isinstance(only.processor, SlicedAttnAddedKVProcessor)
    only.set_attention_slice(None)
    assert isinstance(only.processor, FastdiffAttnAddedKVProcessor)


# ---------------------------------------------------------------------------
# Model level: fastdiff's UNet2DConditionModel against diffusers' with the same weights
# ---------------------------------------------------------------------------

TEXT_DIM = 10
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(12, 24),
    layers_per_block=1,
    norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),  # heads (SD1 quirk): head dims 6, the tiny configs' odd sizes
    cross_attention_dim=TEXT_DIM,
)


@pytest.fixture(scope="module")
def unets():
    """diffusers' tiny UNet with perturbed weights, fastdiff's with the same state_dict,
    inputs (with a text mask), and fastdiff's output on its default processors."""
    from diffusers import UNet2DConditionModel as DiffusersUNet2DConditionModel

    from fastdiff import UNet2DConditionModel

    torch.manual_seed(0)
    reference = DiffusersUNet2DConditionModel(**UNET)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = UNet2DConditionModel(**UNET)
    result = model.load_state_dict(reference.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    inputs = (torch.randn(2, 4, 8, 6), torch.tensor([3, 700]), torch.randn(2, 5, TEXT_DIM), torch.tensor([[1, 1, 1, 0, 1], [1, 0, 1, 1, 1]]))
    with torch.no_grad():
        default = model.eval()(*inputs[:3], encoder_attention_mask=inputs[3]).sample
    return reference.eval(), model, inputs, default


SETTINGS = {
    "AttnProcessor": lambda m: m.set_attn_processor(dap.AttnProcessor()),
    "AttnProcessor2_0": lambda m: m.set_attn_processor(dap.AttnProcessor2_0()),
    "per-layer-dict": lambda m: m.set_attn_processor({k: dap.AttnProcessor() if "attn1" in k else dap.AttnProcessor2_0() for k in m.attn_processors}),
    "slice-auto": lambda m: m.set_attention_slice("auto"),
    "slice-max": lambda m: m.set_attention_slice("max"),
    "slice-2": lambda m: m.set_attention_slice(2),
    "slice-list": lambda m: m.set_attention_slice([SLICE_BY_LAYER[key] for key in m.attn_processors]),
}
# One entry per layer, keyed by module path. A list maps to the layers in attn_processors
# order; fastdiff's UNet2DConditionModel registers mid_block before up_blocks where
# diffusers registers it after, so the orders differ and each model builds its list
# from its own order.
SLICE_BY_LAYER = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor": None,
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor": 1,
    "mid_block.attentions.0.transformer_blocks.0.attn1.processor": 3,
    "mid_block.attentions.0.transformer_blocks.0.attn2.processor": None,
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor": 2,
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor": 1,
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.processor": None,
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor": 2,
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
@torch.no_grad()
def test_unet_processors_match_diffusers(unets, setting):
    reference, model, (x, t, text, mask), default = unets
    assert sorted(model.attn_processors) == sorted(reference.attn_processors) == sorted(SLICE_BY_LAYER)
    SETTINGS[setting](reference)
    SETTINGS[setting](model)
    try:
        # Layers left on their default: fastdiff's fused processor where diffusers has AttnProcessor2_0.
        kinds = {key: ("AttnProcessor2_0" if type(p) is FastdiffAttnProcessor else type(p).__name__, getattr(p, "slice_size", None)) for key, p in model.attn_processors.items()}
        assert kinds == {key: (type(p).__name__, getattr(p, "slice_size", None)) for key, p in reference.attn_processors.items()}
        expected = reference(x, t, text, encoder_attention_mask=mask).sample
        with backends.trace_dispatch() as calls:
            out = model(x, t, text, encoder_attention_mask=mask).sample
        ran = {name for op, name in calls if op == "attention_processor"}
        assert ran == {type(p).__name__ for p in model.attn_processors.values()}
        assert_fp32_close(out, expected, what=setting)
        assert_fp32_close(default, expected, what=f"default vs {setting}")
    finally:
        reference.set_attn_processor(dap.AttnProcessor2_0())
        model.set_default_attn_processor()


@torch.no_grad()
def test_unet_set_default_attn_processor_restores_the_fused_path(unets):
    _, model, (x, t, text, mask), default = unets
    model.set_attention_slice([SLICE_BY_LAYER[key] for key in model.attn_processors])
    model.set_attn_processor({key: dap.AttnProcessor() if "attn2" in key else p for key, p in model.attn_processors.items()})
    assert {type(p) for p in model.attn_processors.values()} == {dap.AttnProcessor, SlicedAttnProcessor, FastdiffAttnProcessor}
    model.set_default_attn_processor()
    assert all(type(p) is FastdiffAttnProcessor for p in model.attn_processors.values())
    assert torch.equal(model(x, t, text, encoder_attention_mask=mask).sample, default)


def test_unet_slice_errors_match_diffusers(unets):
    reference, model, _, _ = unets
    layers = len(model.attn_processors)
    with pytest.raises(ValueError, match=f"You have provided 1, but .* has {layers} different attention layers"):
        reference.set_attention_slice([1])
    with pytest.raises(ValueError, match=f"You have provided 1, but UNet2DConditionModel has {layers} different attention layers"):
        model.set_attention_slice([1])
    for m in (reference, model):
        with pytest.raises(ValueError, match="size 5 has to be smaller or equal to 2"):
            m.set_attention_slice(5)
    with pytest.raises(ValueError, match="every slice size must be a positive int or None, got 0"):
        model.set_attention_slice(0)
    with pytest.raises(ValueError, match="slice_size must be 'auto', 'max'"):
        model.set_attention_slice("half")
    with pytest.raises(ValueError, match="one entry per attention layer"):
        model.set_attn_processor({"nope.processor": dap.AttnProcessor()})
    assert all(type(p) is FastdiffAttnProcessor for p in model.attn_processors.values())


UNCLIP = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
    up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
    attention_head_dim=8, cross_attention_dim=32, encoder_hid_dim=20, resnet_time_scale_shift="scale_shift",
    cross_attention_norm="group_norm",
)


@torch.no_grad()
def test_added_kv_unet_processors_match_diffusers():
    """An unCLIP-style UNet (SimpleCrossAttn blocks, added key/value projections): diffusers'
    AttnAddedKVProcessor and sliced attention give diffusers' outputs; the default comes back."""
    from diffusers import UNet2DConditionModel as DiffusersUNet2DConditionModel

    from fastdiff import UNet2DConditionModel

    torch.manual_seed(0)
    reference = DiffusersUNet2DConditionModel(**UNCLIP)
    for p in reference.parameters():
        p.add_(0.1 * torch.randn_like(p))
    model = UNet2DConditionModel(**UNCLIP)
    model.load_state_dict(reference.state_dict())
    reference.eval(), model.eval()
    assert all(type(p) is FastdiffAttnAddedKVProcessor for p in model.attn_processors.values())
    x, t, text = torch.randn(2, 4, 8, 6), torch.tensor([3, 700]), torch.randn(2, 5, 20)
    default = model(x, t, text).sample
    assert_fp32_close(default, reference(x, t, text).sample, what="default")
    for setting in ("AttnAddedKVProcessor", "max"):
        for m in (reference, model):
            m.set_attn_processor(dap.AttnAddedKVProcessor()) if setting == "AttnAddedKVProcessor" else m.set_attention_slice(setting)
        if setting != "AttnAddedKVProcessor":
            assert {type(p) for p in model.attn_processors.values()} == {SlicedAttnAddedKVProcessor}
        assert_fp32_close(model(x, t, text).sample, reference(x, t, text).sample, what=setting)
    model.set_default_attn_processor()
    assert all(type(p) is FastdiffAttnAddedKVProcessor for p in model.attn_processors.values())
    assert torch.equal(model(x, t, text).sample, default)
