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


def test_bench_lora_tiny_records_a_plumbing_switch(tmp_path, capsys, monkeypatch):
    """bench_lora's CPU mode runs fuse A -> unfuse -> fuse B on the tiny SD model and records it as plumbing."""
    import json

    assert _load("bench_lora", monkeypatch).main(["--tiny", "--archs", "tiny", "--steps", "2", "--out", str(tmp_path)]) == 0
    (line,) = (tmp_path / "bench_lora.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["plumbing_only"] is True
    assert record["switch_s"] > 0 and record["first_image_after_s"] > 0
    assert "not a performance figure" in capsys.readouterr().out
