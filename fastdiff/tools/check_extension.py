"""Check the CUDA extension ``fastdiff._C`` on a machine without a GPU (run by scripts/check_cuda_extension.sh).

Needs a CUDA build of torch (and nvcc for ``--jit``); no GPU is used.

``--prebuilt`` (run outside the source tree, against the installed package):

* ``fastdiff._extension.load()`` imports the prebuilt ``fastdiff._C``;
* every CUDA op that ``fastdiff/ops/*.py`` calls (``torch.ops.fastdiff.<name>`` and
  ``"fastdiff::<name>"`` in their source, read here, not a copy) is registered
  with a CUDA kernel;
* its schema (argument names, types, defaults, mutability, returns) equals the
  schema of its Triton twin (``<op>_triton``, the custom op the same Python code
  calls with the same arguments and that the CPU suite tests);
* the ops modules' own ``_register_cuda_op()`` (fake kernel, autograd) succeeds on it.

``--jit`` (run from the source tree, with ``TORCH_CUDA_ARCH_LIST`` set since there is
no GPU to ask): ``fastdiff._extension``'s ninja build compiles and loads the
extension into ``TORCH_EXTENSIONS_DIR``; a second load in a fresh process reuses
the cached build without recompiling anything (no file in the build directory
changes).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
import subprocess
import sys
import time
from typing import Dict, List


def _fail(message: str) -> None:
    print(f"check_extension: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def cuda_ops_called() -> Dict[str, List[str]]:
    """{op name: [ops modules calling it]} for every ``*_cuda`` op in fastdiff/ops/*.py."""
    import fastdiff.ops

    found: Dict[str, List[str]] = {}
    for path in sorted(glob.glob(os.path.join(os.path.dirname(fastdiff.ops.__file__), "*.py"))):
        with open(path) as f:
            source = f.read()
        names = set(re.findall(r"torch\.ops\.fastdiff\.(\w+_cuda)\b", source)) | set(re.findall(r"[\"']fastdiff::(\w+_cuda)[\"']", source))
        module = "fastdiff.ops." + os.path.basename(path)[: -len(".py")]
        for name in names:
            found.setdefault(name, []).append(module)
    return found


def _describe(schema) -> List[str]:
    args = []
    for a in schema.arguments:
        write = a.alias_info is not None and a.alias_info.is_write
        default = f"={a.default_value!r}" if a.has_default_value() else ""
        args.append(f"{a.type}{'(mutated)' if write else ''} {a.name}{default}")
    returns = [str(r.type) for r in schema.returns]
    return args + ["-> (" + ", ".join(returns) + ")"]


def check_prebuilt() -> None:
    import torch

    from fastdiff import _extension

    if torch.version.cuda is None:
        _fail(f"torch {torch.__version__} is a CPU build; this check needs torch with CUDA")
    if os.path.isdir(os.path.join(os.getcwd(), "fastdiff")):
        _fail("run --prebuilt outside the source tree (it would shadow the installed package)")
    if not _extension._prebuilt_available():
        _fail("fastdiff._C is not installed")
    how = _extension.load()
    if how != "prebuilt fastdiff._C":
        _fail(f"load() gave {how!r}, expected the prebuilt module")
    import fastdiff._C as ext

    print(f"imported {ext.__file__} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    ops = cuda_ops_called()
    if not ops:
        _fail("found no torch.ops.fastdiff.*_cuda call in fastdiff/ops/")
    problems = []
    for name, modules in sorted(ops.items()):
        qualified = f"fastdiff::{name}"
        if not hasattr(torch.ops.fastdiff, name):
            problems.append(f"{qualified} (called by {', '.join(modules)}) is not registered by fastdiff._C")
            continue
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CUDA"):
            problems.append(f"{qualified} has no CUDA kernel")
        schema = getattr(torch.ops.fastdiff, name).default._schema
        twin_name = name[: -len("_cuda")] + "_triton"
        twin = getattr(torch.ops.fastdiff, twin_name, None)
        if twin is None:
            problems.append(f"{qualified}: no Triton twin fastdiff::{twin_name} to compare its schema with")
            continue
        mine, theirs = _describe(schema), _describe(twin.default._schema)
        if mine != theirs:
            problems.append(f"{qualified} schema differs from fastdiff::{twin_name}:\n    cuda:   {mine}\n    triton: {theirs}")
        for module in modules:
            register = getattr(importlib.import_module(module), "_register_cuda_op", None)
            if register is None:
                problems.append(f"{module} calls {qualified} but has no _register_cuda_op()")
                continue
            try:
                register()
            except Exception as exc:  # noqa: BLE001 - reported as a finding
                problems.append(f"{module}._register_cuda_op() failed: {type(exc).__name__}: {exc}")
        print(f"OK   {qualified}({', '.join(_describe(schema))}) matches fastdiff::{twin_name}; called by {', '.join(modules)}")
    if problems:
        _fail("\n  " + "\n  ".join(problems))
    print(f"check_extension: {len(ops)} CUDA ops registered with the schemas the Python side uses")


def _snapshot(folder: str) -> Dict[str, float]:
    return {
        os.path.relpath(os.path.join(root, name), folder): os.stat(os.path.join(root, name)).st_mtime_ns
        for root, _, files in os.walk(folder)
        for name in files
        if not name.endswith(".lock") and not name.startswith(".ninja_")  # ninja's own log and deps database
    }


def check_jit(reload: bool) -> None:
    import logging

    import torch

    from fastdiff import _extension

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") or not os.environ.get("TORCH_EXTENSIONS_DIR"):
        _fail("set TORCH_CUDA_ARCH_LIST (there is no GPU to ask) and TORCH_EXTENSIONS_DIR (a scratch cache)")
    if _extension._prebuilt_available():
        _fail("a prebuilt fastdiff._C is importable here; run --jit from the source tree")
    if _extension.extension_reasons():
        _fail("; ".join(_extension.extension_reasons()))
    build_dir = _extension.build_directory()
    before = _snapshot(build_dir) if os.path.isdir(build_dir) else {}
    start = time.time()
    how = _extension.load()
    seconds = time.time() - start
    if "JIT build" not in how:
        _fail(f"load() gave {how!r}, expected a JIT build")
    for name in ("group_norm_fwd_cuda", "scheduler_step_cuda"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdiff::{name}", "CUDA"):
            _fail(f"the JIT-built extension did not register fastdiff::{name}")
    after = _snapshot(build_dir)
    library = os.path.join(build_dir, f"{_extension.JIT_NAME}.so")
    if not os.path.exists(library):
        _fail(f"no {library} after the JIT build")
    if reload:
        changed = sorted(path for path, mtime in after.items() if before.get(path) != mtime)
        if changed:
            _fail(f"the second load rebuilt instead of using the cache: changed {changed}")
        print(f"check_extension: the second load reused the cached JIT build in {seconds:.1f} s (nothing recompiled)")
        return
    print(f"check_extension: JIT-built {library} in {seconds:.0f} s ({how})")
    # A second load in a fresh process must find the cache and compile nothing.
    result = subprocess.run([sys.executable, "-m", "fastdiff.tools.check_extension", "--jit", "--reload"], text=True, capture_output=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        _fail("the second (cached) load failed")
    if "loading the cached CUDA extension" not in result.stdout + result.stderr:
        _fail("the second load did not log that it used the cached build")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prebuilt", action="store_true", help="check the installed fastdiff._C and its op schemas")
    mode.add_argument("--jit", action="store_true", help="JIT-build from the source tree, then check a second load is cached")
    parser.add_argument("--reload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prebuilt:
        check_prebuilt()
    else:
        check_jit(args.reload)


if __name__ == "__main__":
    main()
