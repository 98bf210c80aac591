"""Methods marked ``# Copied from module.Class.method`` in fastdiff/pipelines stay identical to their source
(diffusers' single-file convention: shared helpers are copied, and this keeps the copies honest)."""

import ast
import importlib
import inspect
import os
import re
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINES = os.path.join(ROOT, "fastdiff", "pipelines")
MARK = re.compile(r"^\s*# Copied from (fastdiff\.[\w.]+)\s*$")


def _copies():
    found = []
    for folder, _, files in os.walk(PIPELINES):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            lines = open(path, encoding="utf-8").read().splitlines()
            for i, line in enumerate(lines):
                match = MARK.match(line)
                if match:
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found.append((module, i + 1, match.group(1)))
    return found


def _function_source_after(module: str, line: int) -> str:
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    tree = ast.parse(open(path, encoding="utf-8").read())
    source = open(path, encoding="utf-8").read().splitlines(keepends=True)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            if start == line + 1:
                return textwrap.dedent("".join(source[start - 1 : node.end_lineno]))
    raise AssertionError(f"{module}:{line}: '# Copied from' is not directly above a function")


def _target_source(dotted: str) -> str:
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = inspect.getattr_static(obj, attr)
        obj = getattr(obj, "__func__", getattr(obj, "fget", obj))
        return textwrap.dedent(inspect.getsource(obj))
    raise AssertionError(f"cannot import {dotted}")


COPIES = _copies()


def test_there_are_copies():
    assert len(COPIES) >= 10


@pytest.mark.parametrize("module,line,target", COPIES, ids=[f"{m}:{n}" for m, n, _ in COPIES])
def test_copy_matches_its_source(module, line, target):
    pytest.importorskip("transformers")
    assert _function_source_after(module, line) == _target_source(target), (
        f"{module}:{line} differs from {target}; update the copy (or drop its '# Copied from' mark)"
    )
