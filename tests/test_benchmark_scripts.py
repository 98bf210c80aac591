"""The GPU benchmark scripts cannot rot unseen: their CPU plumbing modes run here."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))  # as when run as a script
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_unet_tiny_matches_diffusers(capsys, monkeypatch):
    assert _load("bench_unet", monkeypatch).main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "== table ==" in out and "diffusers-eager" in out and "fastdiff" in out
