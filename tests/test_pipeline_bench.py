"""benchmarks/bench_pipeline.py cannot rot unseen: its CPU plumbing mode and drift metrics run here."""

import importlib.util
import math
import os

import numpy as np
import pytest

from _tiny_pipelines import one_torch_thread  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # as when run as a script
    spec = importlib.util.spec_from_file_location("bench_pipeline", os.path.join(ROOT, "benchmarks", "bench_pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_plumbing_matches_diffusers(capsys, monkeypatch):
    assert _load(monkeypatch).main(["--cpu"]) == 0
    out = capsys.readouterr().out
    assert "== table ==" in out and "diffusers-eager" in out and "fastdiff" in out


def test_drift_metrics(monkeypatch):
    bench = _load(monkeypatch)
    rng = np.random.default_rng(0)
    image = rng.random((24, 20, 3))
    noisy = np.clip(image + 0.05 * rng.standard_normal(image.shape), 0, 1)
    assert bench.psnr(image, image) == math.inf and bench.ssim(image, image) == pytest.approx(1.0)
    mse = np.mean((image - noisy) ** 2)
    assert bench.psnr(image, noisy) == pytest.approx(10 * math.log10(1 / mse))
    assert 0.2 < bench.ssim(image, noisy) < 0.99
    assert bench.ssim(image, rng.random(image.shape)) < bench.ssim(image, noisy)
