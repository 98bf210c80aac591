"""The optional CUDA extension: csrc/ kernels registered as ``torch.ops.fastdiff.*_cuda``.

Two ways to get it, tried in this order by :func:`load`:

1. **Prebuilt**: ``fastdiff._C``, built by ``setup.py`` when torch has CUDA and
   nvcc is found. Importing it registers the ops.
2. **JIT**: on a CUDA machine without the prebuilt module, the first use
   compiles every ``csrc/**/*.cu`` and ``csrc/**/*.cpp`` with
   ``torch.utils.cpp_extension.load`` (nvcc + ninja) into a cache directory,
   ``$TORCH_EXTENSIONS_DIR`` if set, else ``~/.cache/fastdiff``, one
   sub-directory per Python / torch / CUDA version and GPU architecture list.
   It logs one INFO line saying so. Later runs reuse the cached library
   (ninja rebuilds only what changed in csrc/).

The architectures compiled are those of ``TORCH_CUDA_ARCH_LIST`` when set, else
the capability of every visible GPU (torch's own rule).

Nothing here runs at ``import fastdiff``: the ``cuda`` backend of an op calls
:func:`extension_reasons` (cheap; it never compiles) when asked whether it can
run, and :func:`load` on first use.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import threading
from typing import List, Optional

import torch

logger = logging.getLogger(__name__)

PREBUILT_MODULE = "fastdiff._C"
JIT_NAME = "fastdiff_C"
CSRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")

_lock = threading.Lock()
_loaded: Optional[str] = None  # how the extension was loaded, once it is


def _prebuilt_available() -> bool:
    try:
        return importlib.util.find_spec(PREBUILT_MODULE) is not None
    except (ImportError, ValueError):
        return False


def _find_nvcc() -> Optional[str]:
    """nvcc the way torch.utils.cpp_extension finds CUDA_HOME, without importing it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def _sources() -> List[str]:
    patterns = (os.path.join(CSRC_DIR, "**", "*.cu"), os.path.join(CSRC_DIR, "**", "*.cpp"))
    return [path for pattern in patterns for path in sorted(glob.glob(pattern, recursive=True))]


def extension_reasons() -> List[str]:
    """Why the CUDA extension cannot be used here; ``[]`` when it can.

    ``[]`` when the extension is already loaded, when a prebuilt ``fastdiff._C``
    is importable, or when it can be JIT-built (torch has CUDA, nvcc and ninja
    are found, and the csrc/ sources are present). Cheap: it compiles and
    imports nothing.
    """
    if _loaded is not None or _prebuilt_available():
        return []
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"no prebuilt fastdiff._C, and torch {torch.__version__} was built without CUDA, so it cannot be JIT-built")
    if _find_nvcc() is None:
        reasons.append("no prebuilt fastdiff._C, and nvcc was not found (set CUDA_HOME) to JIT-build it")
    if shutil.which("ninja") is None:
        reasons.append("no prebuilt fastdiff._C, and ninja was not found on PATH (pip install ninja) to JIT-build it")
    if not any(path.endswith(".cu") for path in _sources()):
        reasons.append(f"no prebuilt fastdiff._C, and the CUDA sources are not in {CSRC_DIR} (install from a source checkout)")
    return reasons


def _arch_tag() -> str:
    """The architectures a JIT build targets, as a directory-name-safe tag."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        return "arch-" + re.sub(r"[^0-9A-Za-z.+]+", "_", arch_list.strip())
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if not capabilities:
        raise RuntimeError("fastdiff: cannot JIT-build the CUDA extension: no GPU is visible and TORCH_CUDA_ARCH_LIST is not set")
    return "sm" + "_".join(f"{major}{minor}" for major, minor in capabilities)


def build_directory() -> str:
    """Where the JIT build of this Python / torch / CUDA / arch combination lives."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastdiff")
    version = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-cu{torch.version.cuda}-{_arch_tag()}"
    return os.path.join(root, f"{JIT_NAME}-" + re.sub(r"[^0-9A-Za-z._-]+", "_", version))


def _jit_build() -> str:
    from torch.utils import cpp_extension

    build_dir = build_directory()
    os.makedirs(build_dir, exist_ok=True)
    sources = _sources()
    if os.path.exists(os.path.join(build_dir, f"{JIT_NAME}.so")):
        logger.info("fastdiff: loading the cached CUDA extension from %s (ninja rebuilds it if csrc/ changed)", build_dir)
    else:
        logger.info("fastdiff: building the CUDA extension from %d csrc/ sources into %s (first use; takes a minute, then cached)", len(sources), build_dir)
    cpp_extension.load(
        name=JIT_NAME,
        sources=sources,
        extra_include_paths=[CSRC_DIR],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        build_directory=build_dir,
        is_python_module=False,
        verbose=False,
    )
    return f"JIT build in {build_dir}"


def load() -> str:
    """Make ``torch.ops.fastdiff.*_cuda`` available, once per process; thread-safe.

    Imports the prebuilt ``fastdiff._C`` if it is installed, else JIT-builds
    (or loads the cached build of) the csrc/ sources. Returns how it was
    loaded. Raises RuntimeError, with the reasons, when neither is possible or
    the prebuilt module fails to import; it never falls back silently.
    """
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if _prebuilt_available():
            try:
                importlib.import_module(PREBUILT_MODULE)
            except ImportError as exc:
                raise RuntimeError(
                    f"fastdiff: the prebuilt {PREBUILT_MODULE} failed to import ({exc}); it was probably built against "
                    "another torch. Reinstall fastdiff, or set FASTDIFF_SKIP_CUDA_BUILD=1 when installing to JIT-build instead."
                ) from exc
            _loaded = f"prebuilt {PREBUILT_MODULE}"
            return _loaded
        reasons = extension_reasons()
        if reasons:
            raise RuntimeError("fastdiff: cannot load the CUDA extension: " + "; ".join(reasons))
        _loaded = _jit_build()
        return _loaded
