"""Training behaviour of the models: gradients, dropout, gradient checkpointing, memory format, dtype."""

import pytest
import torch
from _utils import assert_fp32_close, assert_low_precision_ok, requires_triton
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel as DiffusersUNet2DConditionModel

import fastdiff
from fastdiff import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from fastdiff.nn import GroupNorm

UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=24,
)
VAE = dict(
    block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=3,
    norm_num_groups=4,
    layers_per_block=1,
)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _pair(diffusers_cls, fastdiff_cls, config):
    """A diffusers model and a fastdiff model holding copies of the same weights."""
    torch.manual_seed(0)
    reference = _perturbed(diffusers_cls(**config))
    model = fastdiff_cls.from_config(dict(reference.config))
    model.load_state_dict(reference.state_dict())
    return reference, model


def _assert_grads_close(model, reference):
    """Parameter gradients within 1e-5 of diffusers'. Self-attention key biases are the exception:
    softmax ignores a constant shift per query, so their true gradient is 0 and both sides
    hold only rounding noise; they are checked to be that small."""
    theirs = dict(reference.named_parameters())
    scale = max(p.grad.abs().max().item() for p in theirs.values() if p.grad is not None)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient reached {name}"
        if name.endswith("to_k.bias"):
            assert p.grad.abs().max().item() <= 1e-5 * scale, f"grad {name} should be ~0"
            continue
        assert_fp32_close(p.grad, theirs[name].grad, what=f"grad {name}")


def _unet_loss(model, x, text, weight):
    return (model(x, 20, text).sample * weight).sum()


def test_unet_gradients_match_diffusers():
    reference, model = _pair(DiffusersUNet2DConditionModel, UNet2DConditionModel, UNET)
    x, text = torch.randn(2, 4, 8, 12), torch.randn(2, 5, 24)
    weight = torch.randn(2, 4, 8, 12)
    inputs = {}
    for name, net in (("ours", model), ("theirs", reference)):
        xi, ti = x.clone().requires_grad_(), text.clone().requires_grad_()
        _unet_loss(net, xi, ti, weight).backward()
        inputs[name] = (xi.grad, ti.grad)
    assert_fp32_close(inputs["ours"][0], inputs["theirs"][0], what="d sample")
    assert_fp32_close(inputs["ours"][1], inputs["theirs"][1], what="d encoder_hidden_states")
    _assert_grads_close(model, reference)


def test_vae_gradients_match_diffusers():
    reference, model = _pair(DiffusersAutoencoderKL, AutoencoderKL, VAE)
    x = torch.randn(2, 3, 16, 12)
    weight = torch.randn(2, 3, 16, 12)
    (model(x).sample * weight).sum().backward()
    (reference(x).sample * weight).sum().backward()
    _assert_grads_close(model, reference)


@requires_triton
def test_fused_paths_gradients_match_reference_backend():
    """Triton GroupNorm+SiLU and Triton attention (forward and backward) inside a whole UNet,
    against the reference ops."""
    config = dict(UNET, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=1)
    torch.manual_seed(0)
    model = _perturbed(UNet2DConditionModel(**config))
    x, text, weight = torch.randn(1, 4, 4, 4), torch.randn(1, 3, 24), torch.randn(1, 4, 4, 4)
    grads = {}
    for backend in ("reference", "triton"):
        model.zero_grad()
        with fastdiff.use_backend(backend), fastdiff.trace_dispatch() as calls:
            _unet_loss(model, x, text, weight).backward()
        ops = {call for call in calls if call[0] in ("group_norm", "attention", "geglu")}
        assert ops == {("group_norm", backend), ("attention", backend), ("geglu", backend)}
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, grad in grads["triton"].items():
        if name.endswith("to_k.bias"):  # true gradient 0, see _assert_grads_close
            continue
        assert_fp32_close(grad, grads["reference"][name], rtol=1e-4, what=f"grad {name}")


def test_dropout_in_train_mode_only():
    reference, model = _pair(DiffusersUNet2DConditionModel, UNet2DConditionModel, dict(UNET, dropout=0.3))
    x, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 24)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x, 5, text).sample, model(x, 5, text).sample)
        model.eval()
        reference.eval()
        ours = model(x, 5, text).sample
        assert torch.equal(ours, model(x, 5, text).sample)
        assert_fp32_close(ours, reference(x, 5, text).sample, what="eval with dropout configured")


@pytest.mark.parametrize("kind", ["unet_condition", "unet", "vae"])
def test_gradient_checkpointing_recomputes_and_keeps_gradients(kind):
    torch.manual_seed(0)
    if kind == "unet_condition":
        model = _perturbed(UNet2DConditionModel(**UNET))
        x, extra = torch.randn(2, 4, 8, 8), (7, torch.randn(2, 5, 24))
        block = model.down_blocks[0].resnets[0]
    elif kind == "unet":
        model = _perturbed(
            UNet2DModel(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1, attention_head_dim=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        )
        x, extra = torch.randn(2, 3, 8, 8), (7,)
        block = model.up_blocks[1].resnets[0]
    else:
        model = _perturbed(AutoencoderKL(**VAE))
        x, extra = torch.randn(2, 3, 8, 8), ()
        block = model.decoder.up_blocks[0].resnets[0]
    calls = []
    block.register_forward_pre_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        model(x, *extra).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = grads()
    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed, checkpointed_calls = grads()
    assert (plain_calls, checkpointed_calls) == (1, 2), "the checkpointed block was not recomputed in backward"
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert_fp32_close(checkpointed[name], plain[name], what=f"grad {name}")
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


def _group_norm_input_layouts(model, *args):
    layouts = []
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, inp: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last))
        )
        for m in model.modules()
        if isinstance(m, GroupNorm) and m.activation == "silu"
    ]
    with torch.no_grad():
        out = model(*args).sample
    for h in hooks:
        h.remove()
    return out, layouts


def test_channels_last_runs_end_to_end_without_layout_changes():
    torch.manual_seed(0)
    model = _perturbed(UNet2DConditionModel(**UNET)).eval()
    x, text = torch.randn(2, 4, 8, 12), torch.randn(2, 5, 24)
    expected, _ = _group_norm_input_layouts(model, x, 3, text)
    model.to(memory_format=torch.channels_last)
    out, layouts = _group_norm_input_layouts(model, x.to(memory_format=torch.channels_last), 3, text)
    assert_fp32_close(out, expected, what="channels_last output")
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} fused GroupNorm+SiLU inputs were not channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_vae_channels_last_runs_end_to_end_without_layout_changes():
    torch.manual_seed(0)
    model = _perturbed(AutoencoderKL(**VAE)).eval()
    x = torch.randn(1, 3, 16, 12)
    expected, _ = _group_norm_input_layouts(model, x)
    model.to(memory_format=torch.channels_last)
    out, layouts = _group_norm_input_layouts(model, x.to(memory_format=torch.channels_last))
    assert_fp32_close(out, expected, what="VAE channels_last")
    assert layouts and all(layouts), f"{layouts.count(False)} of {len(layouts)} fused GroupNorm+SiLU inputs were not channels_last"


def test_bf16_error_is_within_twice_diffusers(tmp_path):
    """Low precision on the CPU: our bf16 error vs fp32 is at most 2x diffusers' bf16 error."""
    reference, model = _pair(DiffusersUNet2DConditionModel, UNet2DConditionModel, UNET)
    reference.eval()
    model.save_pretrained(tmp_path)
    ours_bf16 = UNet2DConditionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert ours_bf16.dtype == torch.bfloat16
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 24)
    with torch.no_grad():
        exact = reference(x, 11, text).sample
        theirs = reference.to(torch.bfloat16)(x.bfloat16(), 11, text.bfloat16()).sample
        ours = ours_bf16(x.bfloat16(), 11, text.bfloat16()).sample
    assert ours.dtype == torch.bfloat16
    assert_low_precision_ok(ours.float(), theirs.float(), exact, what="bf16 UNet")
    model.to(torch.float64)
    assert model.dtype == torch.float64 and model.device.type == "cpu"
