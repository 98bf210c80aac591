"""Packaging: kernels/ installs as fastdiff.kernels (never as a top-level 'kernels'),
and `import fastdiff` stays cheap."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_puts_kernels_under_fastdiff(tmp_path):
    env = dict(os.environ, FASTDIFF_SKIP_CUDA_BUILD="1")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path), ROOT],
        check=True,
        env=env,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fastdiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastdiff/kernels/__init__.py" in names
    assert "fastdiff/kernels/group_norm.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level 'kernels' package must not be installed"


def test_installed_package_has_no_top_level_kernels():
    code = "import importlib.util, fastdiff.kernels; print(importlib.util.find_spec('kernels') is None)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_import_fastdiff_is_light():
    code = (
        "import sys, fastdiff; heavy = [m for m in ('triton', 'fastdiff.kernels', 'fastdiff.ops', 'fastdiff._extension',"
        " 'torch.utils.cpp_extension', 'diffusers', 'transformers') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["use_backend", "trace_dispatch", "explain_dispatch"])
def test_lazy_exports_resolve(name):
    import fastdiff

    assert callable(getattr(fastdiff, name))
