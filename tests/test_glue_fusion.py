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
