"""DDPMPipeline, DDIMPipeline and DiffusionPipeline's loading, saving and errors, against diffusers."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import fastdiff
from _tiny_pipelines import one_torch_thread, save_unconditional_folder  # noqa: F401 (fixture)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 4


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory, one_torch_thread):
    return save_unconditional_folder(tmp_path_factory.mktemp("ddpm"), "DDPMPipeline", seed=1)


@pytest.fixture(scope="module")
def ddim_gray_folder(tmp_path_factory, one_torch_thread):
    return save_unconditional_folder(tmp_path_factory.mktemp("ddim_gray"), "DDIMPipeline", in_channels=1, seed=2)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_both(folder, klass, **kwargs):
    ours = _quiet(getattr(fastdiff, klass).from_pretrained(folder))
    ref = _quiet(getattr(diffusers, klass).from_pretrained(folder))
    gen = kwargs.pop("generator_seed", 0)

    def generator():
        if isinstance(gen, list):
            return [torch.Generator().manual_seed(s) for s in gen]
        return torch.Generator().manual_seed(gen)

    out = ours(generator=generator(), num_inference_steps=STEPS, **kwargs).images
    expected = ref(generator=generator(), num_inference_steps=STEPS, **kwargs).images
    return out, expected


def test_ddpm_matches_diffusers_np(ddpm_folder):
    out, expected = _run_both(ddpm_folder, "DDPMPipeline", batch_size=2, output_type="np")
    assert out.shape == expected.shape == (2, 8, 8, 3)
    assert out.std() > 0.01
    np.testing.assert_allclose(out, expected, atol=1e-3, rtol=0)


def test_ddpm_generator_list_and_pt(ddpm_folder):
    out, expected = _run_both(ddpm_folder, "DDPMPipeline", batch_size=2, output_type="pt", generator_seed=[5, 9])
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=0)
    # each image depends only on its own generator
    single = _quiet(fastdiff.DDPMPipeline.from_pretrained(ddpm_folder))(
        generator=torch.Generator().manual_seed(9), num_inference_steps=STEPS, output_type="pt"
    ).images
    torch.testing.assert_close(out[1:], single, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_grayscale_matches_diffusers(ddim_gray_folder, eta):
    out, expected = _run_both(ddim_gray_folder, "DDIMPipeline", batch_size=2, eta=eta, output_type="np")
    assert out.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(out, expected, atol=1e-3, rtol=0)


def test_grayscale_pil_images_are_mode_L(ddim_gray_folder):
    pipe = _quiet(fastdiff.DiffusionPipeline.from_pretrained(ddim_gray_folder))
    assert type(pipe) is fastdiff.DDIMPipeline
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2).images
    assert [im.mode for im in images] == ["L", "L"] and images[0].size == (8, 8)
    ref = _quiet(diffusers.DDIMPipeline.from_pretrained(ddim_gray_folder))
    expected = ref(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2).images
    for a, b in zip(images, expected):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_return_dict_false_gives_a_tuple(ddpm_folder):
    pipe = _quiet(fastdiff.DDPMPipeline.from_pretrained(ddpm_folder))
    out = pipe(num_inference_steps=2, output_type="np", return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (1, 8, 8, 3)


def test_ddim_pipeline_converts_scheduler(ddpm_folder):
    pipe = fastdiff.DDIMPipeline.from_pretrained(ddpm_folder)  # a DDPM folder, as diffusers allows
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.config["scheduler"] == ["diffusers", "DDIMScheduler"]


def test_fastdiff_save_loads_in_diffusers(ddpm_folder, tmp_path):
    pipe = _quiet(fastdiff.DiffusionPipeline.from_pretrained(ddpm_folder))
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    ref = _quiet(diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved"))
    assert type(ref).__name__ == "DDPMPipeline"
    kwargs = dict(batch_size=1, num_inference_steps=STEPS, output_type="np")
    out = pipe(generator=torch.Generator().manual_seed(3), **kwargs).images
    expected = ref(generator=torch.Generator().manual_seed(3), **kwargs).images
    np.testing.assert_allclose(out, expected, atol=1e-3, rtol=0)


def test_components_to_and_register_modules(ddpm_folder):
    pipe = fastdiff.DDPMPipeline.from_pretrained(ddpm_folder)
    assert set(pipe.components) == {"unet", "scheduler"}
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    assert pipe.to(torch.float64) is pipe and pipe.dtype == torch.float64 and pipe.unet.dtype == torch.float64
    pipe.to("cpu", torch.float32)
    assert pipe.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        pipe.to(torch.int32)
    other = fastdiff.DDIMPipeline(**pipe.components)
    assert other.unet is pipe.unet
    new_scheduler = fastdiff.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = new_scheduler
    assert pipe.config["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    pipe.register_modules(scheduler=fastdiff.DDPMScheduler())
    assert pipe.config["scheduler"] == ["diffusers", "DDPMScheduler"]


def test_torch_dtype_and_override(ddpm_folder):
    scheduler = fastdiff.DDPMScheduler(num_train_timesteps=500)
    pipe = fastdiff.DiffusionPipeline.from_pretrained(ddpm_folder, torch_dtype=torch.float64, scheduler=scheduler)
    assert pipe.unet.dtype == torch.float64 and pipe.scheduler is scheduler


def test_progress_bar_is_on_by_default(ddpm_folder, capsys):
    pipe = fastdiff.DDPMPipeline.from_pretrained(ddpm_folder)
    pipe(num_inference_steps=3, output_type="np")
    assert "3/3" in capsys.readouterr().err
    pipe.set_progress_bar_config(disable=True)
    pipe(num_inference_steps=3, output_type="np")
    assert "3/3" not in capsys.readouterr().err


def test_hub_id_gets_a_clear_error():
    with pytest.raises(FileNotFoundError, match="local folders only and never downloads"):
        fastdiff.DiffusionPipeline.from_pretrained("some-org/some-model")


def test_broken_folders(ddpm_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ddpm_folder, broken)
    index_path = broken / "model_index.json"
    index = json.loads(index_path.read_text())

    def write(**changes):
        index_path.write_text(json.dumps({**index, **changes}))

    write(unet=["diffusers", "UNet3DConditionModel"])
    with pytest.raises(ValueError, match="fastdiff has no class 'UNet3DConditionModel'"):
        fastdiff.DiffusionPipeline.from_pretrained(broken)
    write(_class_name="KandinskyPipeline")
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        fastdiff.DiffusionPipeline.from_pretrained(broken)
    write(unet=["somelib", "UNet2DModel"])
    with pytest.raises(ValueError, match="unknown library 'somelib'"):
        fastdiff.DiffusionPipeline.from_pretrained(broken)
    index_path.write_text(json.dumps({k: v for k, v in index.items() if k != "unet"}))
    with pytest.raises(ValueError, match="needs the component 'unet'"):
        fastdiff.DiffusionPipeline.from_pretrained(broken)
    write()
    shutil.rmtree(broken / "unet")
    with pytest.raises(FileNotFoundError, match="unet"):
        fastdiff.DiffusionPipeline.from_pretrained(broken)
    os.remove(index_path)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        fastdiff.DiffusionPipeline.from_pretrained(broken)
    with pytest.raises(TypeError, match="text_encoder"):
        fastdiff.DDPMPipeline.from_pretrained(ddpm_folder, text_encoder=None)


def test_bad_call_arguments(ddpm_folder):
    pipe = _quiet(fastdiff.DDPMPipeline.from_pretrained(ddpm_folder))
    with pytest.raises(ValueError, match="batch_size"):
        pipe(batch_size=0)
    with pytest.raises(ValueError, match="generator"):
        pipe(batch_size=2, generator=[torch.Generator()], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(num_inference_steps=2, output_type="jpeg")
    with pytest.raises(TypeError, match="unet"):
        fastdiff.DDPMPipeline(unet=torch.nn.Linear(2, 2), scheduler=pipe.scheduler)


def test_temperature_scheduler_on_ddpm(ddpm_folder):
    pipe = _quiet(fastdiff.DDPMPipeline.from_pretrained(ddpm_folder))
    kwargs = dict(num_inference_steps=STEPS, output_type="np")
    plain = pipe(generator=torch.Generator().manual_seed(4), **kwargs).images
    pipe.set_temperature_scheduler(fastdiff.TemperatureScheduler("constant", tau=1.0))
    np.testing.assert_array_equal(pipe(generator=torch.Generator().manual_seed(4), **kwargs).images, plain)
    pipe.set_temperature_scheduler(fastdiff.TemperatureScheduler("constant", tau=0.5))
    cooled = pipe(generator=torch.Generator().manual_seed(4), **kwargs).images
    assert np.abs(cooled - plain).max() > 1e-3
    pipe.set_temperature_scheduler(None)
    np.testing.assert_array_equal(pipe(generator=torch.Generator().manual_seed(4), **kwargs).images, plain)
