"""The glue around the fused ops, fused or skipped, checked against diffusers (the reference) on the CPU."""

import sys

import pytest
import torch
from _utils import assert_fp32_close
from diffusers.models import attention_processor as dap

from fastdiff.nn.attention import Attention

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0] + "/benchmarks")
from bench_step_census import LaunchCounter  # noqa: E402


def _pair(kwargs):
    torch.manual_seed(0)
    ref = dap.Attention(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = Attention(**kwargs).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@torch.no_grad()
@pytest.mark.parametrize("rescale", [1.0, 2.5])
@pytest.mark.parametrize(
    "case",
    [
        (dict(query_dim=15, heads=3, dim_head=5), (2, 11, 15), False),
        (dict(query_dim=15, heads=3, dim_head=5, out_bias=False), (2, 11, 15), False),
        (dict(query_dim=12, heads=2, dim_head=6, residual_connection=True), (2, 9, 12), False),
        (dict(query_dim=12, heads=2, dim_head=6, norm_num_groups=3, residual_connection=True), (2, 12, 3, 5), False),
        (dict(query_dim=12, heads=2, dim_head=6, cross_attention_dim=7), (2, 9, 12), True),
    ],
    ids=["tokens", "tokens-no-bias", "residual", "spatial-residual", "cross"],
)
def test_rescale_output_factor_matches_diffusers(case, rescale):
    kwargs, shape, cross = case
    ref, ours = _pair({**kwargs, "rescale_output_factor": rescale})
    x = torch.randn(*shape)
    ctx = torch.randn(2, 5, 7) if cross else None
    with LaunchCounter() as counter:
        out = ours(x, ctx)
    assert_fp32_close(out, ref(x, ctx))
    divisions = sum(n for name, n in counter.ops.items() if name.startswith("aten::div"))
    if rescale == 1.0:
        assert divisions == 0  # skipped, not a full-tensor kernel


@torch.no_grad()
def test_rescale_folded_into_the_projection_is_one_gemm():
    """No residual, tokens layout: (x W^T + b) / r is one addmm with beta = alpha = 1/r."""
    _, ours = _pair(dict(query_dim=16, heads=2, dim_head=8, rescale_output_factor=3.0))
    _, plain = _pair(dict(query_dim=16, heads=2, dim_head=8))
    x = torch.randn(2, 10, 16)
    with LaunchCounter() as folded:
        out = ours(x)
    with LaunchCounter() as unfolded:
        expected = plain(x)
    assert not any(name.startswith("aten::div") for name in folded.ops)
    assert folded.launches == unfolded.launches
    assert_fp32_close(out, expected / 3.0)


def test_rescale_keeps_gradients():
    ref, ours = _pair(dict(query_dim=12, heads=2, dim_head=6, residual_connection=True, rescale_output_factor=1.7))
    x = torch.randn(2, 9, 12, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ours(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    assert_fp32_close(x.grad, x_ref.grad)


# ---------------------------------------------------------------------------
# Cross-attention K/V of the text embedding, computed once per generation
# ---------------------------------------------------------------------------

TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=24,
)


@pytest.fixture(scope="module")
def unet():
    from fastdiff import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_UNET).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-projections"])
def test_kv_cache_is_bitwise_equal_to_uncached(unet, fused):
    from fastdiff.nn import CrossAttentionKVCache

    if fused:
        unet.fuse_qkv_projections()
    try:
        text = torch.randn(2, 7, 24)
        cache = CrossAttentionKVCache(text)
        for step, t in enumerate([999, 500, 1]):
            x = torch.randn(2, 4, 8, 8)
            cached = unet(x, t, text, cross_attention_kwargs={"kv_cache": cache}).sample
            assert torch.equal(cached, unet(x, t, text).sample), f"step {step}"
        n_cross = sum(1 for name in unet.attn_processors if "attn2" in name)
        assert len(cache) == n_cross == 4
        assert cache.misses == n_cross and cache.hits == 2 * n_cross
    finally:
        if fused:
            unet.unfuse_qkv_projections()


@torch.no_grad()
def test_kv_cache_never_serves_a_changed_embedding(unet):
    from fastdiff.nn import CrossAttentionKVCache

    text = torch.randn(2, 7, 24)
    x = torch.randn(2, 4, 8, 8)
    cache = CrossAttentionKVCache(text)
    unet(x, 10, text, cross_attention_kwargs={"kv_cache": cache})
    with pytest.raises(ValueError, match="different encoder_hidden_states"):
        unet(x, 10, text.clone(), cross_attention_kwargs={"kv_cache": cache})
    text.mul_(1.5)
    with pytest.raises(ValueError, match="modified in place"):
        unet(x, 10, text, cross_attention_kwargs={"kv_cache": cache})


@torch.no_grad()
def test_kv_cache_recomputes_after_a_weight_change(unet):
    from fastdiff.nn import CrossAttentionKVCache

    text, x = torch.randn(2, 7, 24), torch.randn(2, 4, 8, 8)
    cache = CrossAttentionKVCache(text)
    unet(x, 10, text, cross_attention_kwargs={"kv_cache": cache})
    attn2 = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    saved = attn2.to_k.weight.clone()
    try:
        attn2.to_k.weight.add_(0.25)  # e.g. a LoRA fused in place
        cached = unet(x, 10, text, cross_attention_kwargs={"kv_cache": cache}).sample
        assert torch.equal(cached, unet(x, 10, text).sample)
        assert cache.misses == 5
    finally:
        attn2.to_k.weight.copy_(saved)


# ---------------------------------------------------------------------------
# The resnets' time-embedding projections as one GEMM
# ---------------------------------------------------------------------------


def _resnets(model):
    from fastdiff.models.resnet import ResnetBlock2D

    return [m for m in model.modules() if isinstance(m, ResnetBlock2D)]


@pytest.fixture
def fused_unet(unet):
    assert unet.fuse_time_projections()
    yield unet
    unet.unfuse_time_projections()


def test_time_projections_are_one_gemm_and_match_per_block(fused_unet):
    unet = fused_unet
    text, x = torch.randn(2, 7, 24), torch.randn(2, 4, 8, 8)
    n = len(_resnets(unet))
    with torch.no_grad(), LaunchCounter() as fused:
        out = unet(x, 321, text).sample
    with torch.enable_grad(), LaunchCounter() as per_block:  # autograd on: the per-block path
        expected = unet(x, 321, text).sample
    assert n == 8  # 2 down, 2 mid, 2 x 2 up
    gemms = lambda c: c.ops["aten::addmm"] + c.ops["aten::mm"]  # noqa: E731
    assert gemms(per_block) - gemms(fused) == n - 1
    assert_fp32_close(out, expected.detach())
    unet.unfuse_time_projections()
    with torch.no_grad(), LaunchCounter() as unfused:
        assert torch.equal(unet(x, 321, text).sample, expected.detach())
    assert gemms(unfused) == gemms(per_block)
    assert sorted(unet.state_dict()) == sorted(type(unet)(**TINY_UNET).state_dict())


@torch.no_grad()
def test_time_projections_follow_weight_changes(fused_unet):
    unet = fused_unet
    text, x = torch.randn(2, 7, 24), torch.randn(2, 4, 8, 8)
    unet(x, 5, text)
    proj = _resnets(unet)[3].time_emb_proj
    saved = proj.weight.clone()
    try:
        proj.weight.mul_(-2.0)  # in place: a new tensor version
        out = unet(x, 5, text).sample
        with torch.enable_grad():
            expected = unet(x, 5, text).sample.detach()
        assert_fp32_close(out, expected)
        proj.weight = torch.nn.Parameter(saved * 3)  # replaced: a new tensor
        out = unet(x, 5, text).sample
        with torch.enable_grad():
            expected = unet(x, 5, text).sample.detach()
        assert_fp32_close(out, expected)
    finally:
        proj.weight = torch.nn.Parameter(saved)


# ---------------------------------------------------------------------------
# The time embedding as GroupNorm's input bias
# ---------------------------------------------------------------------------


def _resnet_pair(**kwargs):
    from diffusers.models.resnet import ResnetBlock2D as RefBlock

    from fastdiff.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    ref = RefBlock(**kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    ours = ResnetBlock2D(**kwargs).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=6, out_channels=9, temb_channels=5, groups=3),
        dict(in_channels=6, temb_channels=5, groups=3, skip_time_act=True, output_scale_factor=2.0),
        dict(in_channels=6, out_channels=9, temb_channels=5, groups=3, time_embedding_norm="scale_shift"),
    ],
    ids=["default", "skip-act", "scale-shift"],
)
def test_resnet_time_embedding_as_input_bias_matches_diffusers(kwargs, channels_last):
    ref, ours = _resnet_pair(**kwargs)
    seen = []
    ours.norm2.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("input_bias") is not None), with_kwargs=True)
    torch.manual_seed(1)
    x, temb = torch.randn(2, 6, 5, 7), torch.randn(2, 5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xs, ts = [x.clone().requires_grad_() for _ in range(2)], [temb.clone().requires_grad_() for _ in range(2)]
    out, expected = ours(xs[0], ts[0]), ref(xs[1], ts[1])
    assert torch.equal(out, expected), "fp32 on the CPU must be bitwise diffusers'"
    assert seen == [kwargs.get("time_embedding_norm", "default") == "default"]
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [xs[0], ts[0], ours.time_emb_proj.weight], dy)
    want = torch.autograd.grad(expected, [xs[1], ts[1], ref.time_emb_proj.weight], dy)
    for g, w, name in zip(grads, want, ("x", "temb", "time_emb_proj.weight")):
        assert_fp32_close(g, w, what=name)


def test_resnet_without_temb_and_broadcast_temb_keep_the_plain_path():
    ref, ours = _resnet_pair(in_channels=6, temb_channels=None, groups=3)
    x = torch.randn(2, 6, 5, 7)
    assert torch.equal(ours(x, None), ref(x, None))
    ref, ours = _resnet_pair(in_channels=6, temb_channels=5, groups=3)
    one = torch.randn(1, 5)  # one embedding for the whole batch: broadcast, not per-(N, C)
    assert torch.equal(ours(x, one), ref(x, one))
