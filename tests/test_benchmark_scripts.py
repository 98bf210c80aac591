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


def test_bench_unet_tiny_runs_every_provider_and_the_ablation(tmp_path, capsys, monkeypatch):
    """bench_unet's CPU plumbing mode: every provider's code path (diffusers channels_last, its graph, the
    compile providers through Dynamo's eager backend, fastdiff eager and graph, the per-op ablation inside
    the graph through the stand-in capture), each output matching diffusers' in fp32; nothing recorded."""
    module = _load("bench_unet", monkeypatch)
    rows = []
    bench_arch = module.bench_arch
    monkeypatch.setattr(module, "bench_arch", lambda *args, **kwargs: rows.extend(bench_arch(*args, **kwargs)) or list(rows))

    assert module.main(["--tiny", "--compile", "--out", str(tmp_path)]) == 0

    out = capsys.readouterr().out
    assert "== table ==" in out and "not GPU timings" in out
    assert not list(tmp_path.iterdir())  # plumbing is never written to the results
    by_name = {r["provider"]: r for r in rows}
    assert {
        "diffusers-eager", "diffusers-eager-cl", "diffusers-graph-cl", "diffusers-compile-cl",
        "diffusers-compile-max-autotune-cl", "fastdiff", "fastdiff-graph", "fastdiff-graph[all=reference]",
    } <= set(by_name)  # fmt: skip
    assert all("error" not in r and r["p50_ms"] > 0 for r in rows), [r for r in rows if "error" in r]
    ablations = [r for r in rows if r.get("ablation") not in (None, "all")]
    assert ablations, "no fused op to ablate"
    for r in ablations:
        op = r["ablation"]
        # the graph was captured with that op on reference, and the default graph used something else
        assert (op, "reference") in r["dispatch"] and not {b for o, b in r["dispatch"] if o == op} - {"reference"}
        assert {b for o, b in by_name["fastdiff-graph"]["dispatch"] if o == op} - {"reference"}
        assert "gain_ms" in r
    assert by_name["diffusers-eager-cl"]["channels_last"] is True


def test_bench_lora_tiny_records_a_plumbing_switch(tmp_path, capsys, monkeypatch):
    """bench_lora's CPU mode runs fuse A -> unfuse -> fuse B on the tiny SD model and records it as plumbing."""
    import json

    assert _load("bench_lora", monkeypatch).main(["--tiny", "--archs", "tiny", "--steps", "2", "--out", str(tmp_path)]) == 0
    (line,) = (tmp_path / "bench_lora.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert record["plumbing_only"] is True
    assert record["switch_s"] > 0 and record["first_image_after_s"] > 0
    assert "not a performance figure" in capsys.readouterr().out
