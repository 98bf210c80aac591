"""Every Triton kernel compiles for real GPUs (sm_80 and sm_90) with the Triton in this venv, no GPU needed.

Runs ``python -m fastdiff.tools.aot_check --matrix smoke --check`` in a subprocess
(the interpreter replaces the kernels in this process): every kernel in kernels/,
every variant its launchers pass for the SD / SDXL shapes, at the configs the
pruners keep for them on an A100 / H100. The tool's --check fails on compile
errors, shared memory over the target's limit, spills without a written
allowance and serialised wgmma in the attention forward and backward (sm_90)
without one; this test also checks what the compiler emitted (wgmma, TMA)
against what the kernels are meant to use. Results are cached by kernel source
(JITFunction.cache_key, which covers the @triton.jit helpers a kernel calls) and
Triton version under ~/.cache/fastdiff-aot, so only changed kernels are
recompiled (test_cache_is_keyed_by_kernel_source_and_triton_version). The other
Triton versions, and the `every` matrix (every config of every autotune list at
every SD dtype, mask and layout) with all three Tritons, run in scripts/aot_check.sh
(CI, beside this suite). The `reachable` matrix (every config any real shape can
reach) is tens of thousands of compiles and is not run here;
benchmarks/results/aot_compile.md gives its size.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has_aot_compile():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def aot(tmp_path_factory):
    if not _has_aot_compile():
        if os.environ.get("CI") == "true":
            pytest.fail("this Triton cannot compile ahead of time (no ASTSource/GPUTarget)")
        pytest.skip("this Triton cannot compile ahead of time (no ASTSource/GPUTarget)")
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fastdiff.tools.aot_check", "--matrix", "smoke", "--check", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    with open(out) as f:
        data = json.load(f)
    return result, data["instances"]


def test_every_kernel_compiles_without_violations(aot):
    result, _ = aot
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "0 failed" in result.stdout


def test_every_kernel_is_compiled_for_both_targets(aot):
    import ast

    _, instances = aot
    compiled = {(i["kernel"], i["arch"]) for i in instances if i["result"]["ok"]}
    kernels_dir = os.path.join(REPO, "kernels")
    jitted = set()
    for name in os.listdir(kernels_dir):
        if name.endswith(".py"):
            with open(os.path.join(kernels_dir, name)) as f:
                tree = ast.parse(f.read())
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                    jitted.add(node.name)
    # Helpers called from kernels (_load, _rows, _to_dtype, ...) are compiled inside them, never launched.
    launched = {i["kernel"] for i in instances}
    helpers = jitted - launched
    assert launched <= jitted
    assert {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_geglu_fwd_kernel", "_scheduler_step_kernel", "_bwd_dx_kernel"} <= launched
    for kernel in launched - {"_attn_fwd_tma"}:
        assert {(kernel, 80), (kernel, 90)} <= compiled, kernel
    for helper in helpers:
        assert helper.startswith("_") and not helper.endswith("_kernel"), f"{helper} is never launched by a launcher"


def test_attention_forward_uses_wgmma_on_sm90(aot):
    _, instances = aot
    fwd = [i for i in instances if i["kernel"] == "_attn_fwd" and i["arch"] == 90]
    # wgmma takes 64 rows per warpgroup; the 16/32-row tiles (short sequences) use mma.sync.
    half = [i for i in fwd if dict(i["args"])["PRECISION"][1] != "ieee" and i["config"]["BLOCK_M"] >= 64]
    assert half and all(i["result"]["wgmma"] for i in half)
    head_dims = {dict(i["args"])["HEAD_DIM"][1] for i in half}
    assert head_dims == {40, 64, 80, 160}
    assert not any(i["result"]["wgmma"] for i in instances if i["arch"] == 80)


def test_tma_forward_loads_through_tma(aot):
    _, instances = aot
    tma = [i for i in instances if i["kernel"] == "_attn_fwd_tma"]
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        assert not tma
        return
    assert tma and all(i["arch"] == 90 and i["result"]["tma"] for i in tma)


_PROBE_KERNELS = '''
import triton
import triton.language as tl


@triton.jit
def _scale(x, F: tl.constexpr):
    return x * F


@triton.jit
def _a_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(Y + offs, _scale(tl.load(X + offs, mask=ok), 2.0), mask=ok)


@triton.jit
def _b_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=ok) + 1.0, mask=ok)
'''

_PROBE_DRIVER = '''
import json, sys
import triton
from fastdiff.tools import aot_check as tool

def instances():
    out = []
    for kernel in ("_a_kernel", "_b_kernel"):
        inst = {
            "package": "aotprobe", "module": "kern", "kernel": kernel, "arch": 80, "num_warps": 4, "num_stages": None,
            "config": {}, "sd": True, "cases": ["probe"],
            "args": [["X", ["ptr", "fp16", True]], ["Y", ["ptr", "fp16", True]], ["n", ["int", "i32", "any"]], ["BLOCK", ["constexpr", 256]]],
        }
        inst["key"] = tool._instance_key(inst)
        out.append(inst)
    return out

runs = []
for _ in range(int(sys.argv[1])):
    insts = instances()
    tool.run_all(insts, 1)
    runs.append({i["kernel"]: {"key": i["key"], "cached": i["result"]["cached"], "ok": i["result"]["ok"],
                               "registers": i["result"].get("registers")} for i in insts})
real = triton.__version__
triton.__version__ = real + ".other"
other = {i["kernel"]: i["key"] for i in instances()}
print(json.dumps({"runs": runs, "other_version_keys": other}))
'''


def _probe_package(tmp_path):
    """A throwaway kernel package (aotprobe.kern) and the environment that runs the tool on it
    with its own cache; skips where this Triton cannot compile ahead of time."""
    if not _has_aot_compile():
        pytest.skip("this Triton cannot compile ahead of time (no ASTSource/GPUTarget)")
    package = tmp_path / "aotprobe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "kern.py").write_text(_PROBE_KERNELS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), REPO])
    env["FASTDIFF_AOT_CACHE"] = str(tmp_path / "cache")
    return package, env


def test_cache_is_keyed_by_kernel_source_and_triton_version(tmp_path):
    """Editing a @triton.jit helper recompiles exactly the kernels that call it; another Triton
    version gets other keys. Every figure asserted here comes from the tool and Triton's compiler."""
    package, env = _probe_package(tmp_path)

    def run(times):
        result = subprocess.run(
            [sys.executable, "-c", _PROBE_DRIVER, str(times)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    first = run(2)
    cold, warm = first["runs"]
    assert all(cold[k]["ok"] and not cold[k]["cached"] and cold[k]["registers"] for k in cold)
    assert all(warm[k]["cached"] and warm[k]["key"] == cold[k]["key"] and warm[k]["registers"] == cold[k]["registers"] for k in warm)
    assert cold["_a_kernel"]["key"] != cold["_b_kernel"]["key"]
    assert all(first["other_version_keys"][k] != cold[k]["key"] for k in cold)

    # Lines added above the kernels (a launcher or pruner edited) move them without changing them: every key stays, all cached.
    (package / "kern.py").write_text("# a comment\n\n\nPLAIN = 3  # a global no kernel reads\n" + _PROBE_KERNELS)
    (moved,) = run(1)["runs"]
    assert all(moved[k]["cached"] and moved[k]["key"] == cold[k]["key"] for k in cold), moved

    # Change only the helper that _a_kernel calls: _a_kernel recompiles under a new key, _b_kernel is served from the cache.
    source = (package / "kern.py").read_text().replace("return x * F\n", "return x * F + 0.5\n")
    (package / "kern.py").write_text(source)
    (after,) = run(1)["runs"]
    assert after["_a_kernel"]["key"] != cold["_a_kernel"]["key"] and not after["_a_kernel"]["cached"] and after["_a_kernel"]["ok"]
    assert after["_b_kernel"]["key"] == cold["_b_kernel"]["key"] and after["_b_kernel"]["cached"]


_DEFER_DRIVER = _PROBE_DRIVER.split("runs = []")[0] + '''
import os
stop = sys.argv[1]
out = {}
for step in ("stopped", "open", "stopped-again"):
    if step == "open":
        os.remove(stop)
    elif not os.path.exists(stop):
        open(stop, "w").close()
    tool._DEFER.update(deadline=None, stop_file=stop)
    insts = instances()
    tool.run_all(insts, 1)
    out[step] = {i["kernel"]: None if i["result"] is None else {"cached": i["result"]["cached"], "ok": i["result"]["ok"]} for i in insts}
tool._DEFER.update(deadline=0.0, stop_file=None)
insts = instances()
tool.run_all(insts, 1)
out["past-deadline"] = {i["kernel"]: None if i["result"] is None else i["result"]["cached"] for i in insts}
print(json.dumps(out))
'''


def test_a_stop_file_defers_what_is_not_cached_and_a_later_run_compiles_it(tmp_path):
    """CI's every-config matrix runs until the tests end (--stop-file): an uncached compile is then
    deferred (no result, not checked), a run without the stop compiles it, and a cached one is
    always served, stop or not (--deadline alike)."""
    package, env = _probe_package(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", _DEFER_DRIVER, str(tmp_path / "stop")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["stopped"] == {"_a_kernel": None, "_b_kernel": None}
    assert all(r == {"cached": False, "ok": True} for r in out["open"].values()), out["open"]
    assert all(r == {"cached": True, "ok": True} for r in out["stopped-again"].values()), out["stopped-again"]
    assert out["past-deadline"] == {"_a_kernel": True, "_b_kernel": True}


def test_the_cli_lists_deferred_compiles_and_checks_none_of_them(tmp_path):
    """With the stop file present and an empty cache, nothing is compiled: the tool says how many
    compiles it deferred, per kernel, and --check passes on what it did check (nothing)."""
    stop = tmp_path / "stop"
    stop.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FASTDIFF_AOT_CACHE"] = str(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-m", "fastdiff.tools.aot_check", "--matrix", "smoke", "--families", "geglu", "--check",
         "--stop-file", str(stop), "--json", str(tmp_path / "out.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "compiles DEFERRED" in result.stdout and "_geglu_fwd_kernel" in result.stdout, result.stdout
    with open(tmp_path / "out.json") as f:
        assert json.load(f)["instances"] == []
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.json"))
