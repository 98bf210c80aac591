"""The model contract: code written against diffusers' UNet2DConditionModel runs unchanged on
fastdiff's and gives the same results.

``user_code`` is what a diffusers user's script does with a model: build it, read its
config and properties, save and reload it (with diffusers' loading keywords), swap
attention processors, run it (dict-like outputs, ``return_dict=False``) and train a step
with gradient checkpointing. It runs on both libraries' classes; a narrowing of fastdiff's
API fails here, and so does a different number.
"""

import pytest
import torch
from _utils import assert_fp32_close
from diffusers import UNet2DConditionModel as DiffusersUNet2DConditionModel

from fastdiff import UNet2DConditionModel

CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2, cross_attention_dim=24,
)


def user_code(cls, weights_folder, work_folder):
    results = {}
    unet = cls.from_pretrained(
        weights_folder, subfolder="unet", torch_dtype=torch.float32, low_cpu_mem_usage=False, use_safetensors=True,
        variant=None, output_loading_info=False,
    )
    results["config"] = (unet.config.sample_size, unet.config["in_channels"], tuple(unet.config.block_out_channels))
    results["properties"] = (unet.dtype, unet.device, unet.num_parameters(), unet.num_parameters(only_trainable=True))
    unet = unet.to("cpu", torch.float32)
    unet.eval()
    unet.requires_grad_(False)
    results["n_processors"] = len(unet.attn_processors)
    unet.set_default_attn_processor()

    torch.manual_seed(3)
    sample, text = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 24)
    mask = torch.ones(2, 6)
    mask[0, -1] = 0
    with torch.no_grad():
        out = unet(sample, 981, encoder_hidden_states=text, encoder_attention_mask=mask, return_dict=True)
        results["dict_like"] = (isinstance(out, dict), list(out.keys()), out[0] is out["sample"] is out.sample)
        results["sample"] = out.sample
        results["tuple"] = unet(sample, torch.tensor(981), text, return_dict=False)[0]

    unet.save_pretrained(work_folder / "unet", safe_serialization=True, max_shard_size="100KB")
    again = cls.from_config(cls.load_config(work_folder / "unet"))
    again.load_state_dict(cls.from_pretrained(work_folder, subfolder="unet").state_dict())
    with torch.no_grad():
        results["reloaded"] = again.eval()(sample, 981, text, encoder_attention_mask=mask).sample

    unet.train()
    unet.requires_grad_(True)
    unet.enable_gradient_checkpointing()
    results["checkpointing"] = unet.is_gradient_checkpointing
    unet(sample, 10, text).sample.square().mean().backward()
    results["grad"] = unet.conv_in.weight.grad
    unet.disable_gradient_checkpointing()
    return results


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = DiffusersUNet2DConditionModel(**CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("weights")
    model.save_pretrained(folder / "unet")
    return folder


def test_diffusers_user_code_runs_unchanged_with_the_same_results(weights_folder, tmp_path):
    theirs = user_code(DiffusersUNet2DConditionModel, weights_folder, tmp_path / "diffusers")
    ours = user_code(UNet2DConditionModel, weights_folder, tmp_path / "fastdiff")
    assert ours.keys() == theirs.keys()
    for key in ("config", "properties", "n_processors", "dict_like", "checkpointing"):
        assert ours[key] == theirs[key], key
    for key in ("sample", "tuple", "reloaded"):
        assert_fp32_close(ours[key], theirs[key], what=key)
    assert_fp32_close(ours["grad"], theirs["grad"], rtol=1e-4, what="grad")
