"""GroupNorm forward launches: the last-arriving program merges a group's partial statistics.

The split forward never takes a separate merge launch: either the normalise kernel merges
(few partials, NCHW) or the last program of the statistics kernel to finish a group does,
through an int32 arrival counter per group that it resets to 0 for the next launch. Checked
under the interpreter (programs run one after another, the atomics still count) on small
odd shapes, and by counting launches on Stable Diffusion shapes with fake CUDA tensors
under ``use_target("sm_90")`` and a launch hook that skips the kernels.
"""

import pytest
import torch
from _utils import assert_fp32_close, requires_triton
from torch._subclasses.fake_tensor import FakeTensorMode

from fastdiff import backends
from fastdiff.ops.group_norm import group_norm_ref, group_norm_stats_ref

pytestmark = requires_triton

EPS = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels():
    from fastdiff.kernels import group_norm as kernels

    return kernels


class _Launches:
    """A launch hook that records each kernel's name and, unless ``run`` is False, launches it."""

    def __init__(self, run=True):
        self.names, self.run = [], run

    def __call__(self, kernel, grid, args, kwargs):
        self.names.append(kernel.__name__)
        if self.run:
            kernel[grid](*args, **kwargs)


def _last_program_config(block_c):
    return _kernels().GroupNormConfig(single_pass=False, block_c=block_c, block_s=8, num_warps=1, split=3, last_program_combine=True)


@pytest.mark.parametrize(
    "shape, groups, channels_last, block_c",
    [
        ((2, 12, 7, 5), 4, True, 8),  # 3 channels per group: groups straddle the 8-wide channel blocks
        ((1, 10, 9, 4), 5, False, 4),
        ((3, 6, 11), 3, False, 2),
    ],
    ids=["nhwc-straddling", "nchw", "1d"],
)
@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "input_bias"])
def test_last_program_merge_matches_the_reference(seed, shape, groups, channels_last, block_c, with_bias):
    kernels = _kernels()
    x = torch.randn(*shape, device=DEVICE) * 2 + torch.linspace(-3, 5, shape[-1], device=DEVICE)  # chunks differ in mean
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.randn(c, device=DEVICE), torch.randn(c, device=DEVICE)
    t = torch.randn(shape[0], c, device=DEVICE) if with_bias else None
    config = _last_program_config(block_c)
    assert kernels._chunking(x[0, 0].numel(), config)[1] >= 2, "several chunks must merge"
    launches = _Launches()
    with kernels.launch_hook(launches):
        y, mean, rstd = kernels.group_norm_forward(x, w, b, groups, EPS, True, config, input_bias=t)
    assert launches.names == ["_stats_kernel", "_apply_kernel"]
    assert kernels.forward_launches(config) == 2
    xb = x if t is None else x + t.view(*t.shape, *([1] * (x.dim() - 2)))
    mean_ref, rstd_ref = group_norm_stats_ref(xb.double(), groups, EPS)
    assert_fp32_close(mean, mean_ref, what="mean")
    assert_fp32_close(rstd, rstd_ref, what="rstd")
    assert_fp32_close(y, group_norm_ref(xb.double(), groups, w.double(), b.double(), EPS, "silu"))
    # Every counter is back at 0, so the next launch reuses the buffer; and the merge order
    # is fixed, so a second launch gives the same bits.
    counters = kernels._group_counters(x, shape[0] * groups)
    assert int(counters.abs().sum()) == 0
    y2, mean2, rstd2 = kernels.group_norm_forward(x, w, b, groups, EPS, True, config, input_bias=t)
    assert torch.equal(y, y2) and torch.equal(mean, mean2) and torch.equal(rstd, rstd2)


def test_the_three_merges_agree(seed):
    kernels = _kernels()
    x = (torch.randn(1, 12, 6, 7, device=DEVICE) + 3).to(memory_format=torch.channels_last)
    w, b = torch.randn(12, device=DEVICE), torch.randn(12, device=DEVICE)
    base = dict(single_pass=False, block_c=4, block_s=8, num_warps=1, split=3)
    results = {}
    for name, flags in {"kernel": {}, "apply": {"fused_combine": True}, "last": {"last_program_combine": True}}.items():
        launches = _Launches()
        with kernels.launch_hook(launches):
            results[name] = kernels.group_norm_forward(x, w, b, 4, EPS, False, kernels.GroupNormConfig(**base, **flags))
        assert len(launches.names) == (3 if name == "kernel" else 2)
    for name in ("apply", "last"):
        for got, want in zip(results[name], results["kernel"]):
            assert_fp32_close(got, want)


def test_exclusive_merge_flags_raise(seed):
    kernels = _kernels()
    x = torch.randn(1, 4, 9, device=DEVICE)
    config = kernels.GroupNormConfig(False, 2, 4, 1, 2, fused_combine=True, last_program_combine=True)
    with pytest.raises(ValueError, match="exclusive"):
        kernels.group_norm_forward(x, torch.ones(4, device=DEVICE), torch.zeros(4, device=DEVICE), 2, EPS, False, config)


# Stable Diffusion 1.5 / SDXL UNet and VAE GroupNorm shapes at batch 2 (CFG), 32 groups.
SD_SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (2, 1280, 8, 8), (2, 320, 128, 128), (2, 512, 128, 128), (2, 256, 256, 256)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_sd_shapes_take_at_most_two_launches_on_sm90(channels_last):
    kernels = _kernels()
    launches = _Launches(run=False)
    with FakeTensorMode(), backends.use_target("sm_90"), kernels.launch_hook(launches):
        for shape in SD_SHAPES:
            x = torch.empty(shape, device="cuda", dtype=torch.float16)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            w, b = torch.empty(shape[1], device="cuda", dtype=torch.float16), torch.empty(shape[1], device="cuda", dtype=torch.float16)
            launches.names.clear()
            kernels.group_norm_forward(x, w, b, 32, EPS, True)
            config = kernels.launch_config(shape[0], shape[1], shape[2] * shape[3], 32, channels_last, 132)
            assert len(launches.names) == kernels.forward_launches(config) <= 2, (shape, launches.names)
            assert "_combine_kernel" not in launches.names
            if not config.single_pass and channels_last:
                assert config.last_program_combine, f"{shape}: NHWC merges in the last program"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_vae_sized_tensors_take_8_to_16_kib_tiles(channels_last):
    kernels = _kernels()
    for shape in [(1, 512, 256, 256), (2, 256, 512, 512), (1, 128, 1024, 1024)]:
        n, c, h, w = shape
        config = kernels.launch_config(n, c, h * w, 32, channels_last, 132)
        elems = config.block_c * config.block_s
        assert elems == kernels.LARGE_TILE_ELEMS and config.num_warps == kernels.LARGE_NUM_WARPS, shape
        assert 8 * 1024 <= elems * 2 and elems * 4 <= 16 * 1024, "fp16 and fp32 tiles of 8-16 KiB"
        programs = n * kernels._chunking(h * w, config)[1] * -(-c // config.block_c)
        assert programs >= 2 * 132
    # UNet-sized tensors keep the smaller tiles: more programs to fill the GPU.
    small = kernels.launch_config(2, 320, 64 * 64, 32, channels_last, 132)
    assert small.block_c * small.block_s == kernels.SPLIT_TILE_ELEMS and small.num_warps == kernels.SPLIT_NUM_WARPS
