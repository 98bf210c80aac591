#!/usr/bin/env bash
# Build, link and import the CUDA extension fastdiff._C for real, on a machine without a GPU:
#   1. a separate venv (.venv-cuda) with a CUDA build of torch (the CPU test venv .venv is untouched);
#   2. `pip install --no-build-isolation .` into it compiles and links fastdiff._C for FASTDIFF_CUDA_ARCHS (80;90);
#   3. fastdiff.tools.check_extension --prebuilt: import it, every op fastdiff/ops calls is registered
#      with the schema of its Triton twin;
#   4. fastdiff.tools.check_extension --jit: fastdiff._extension's ninja JIT build, once, with
#      TORCH_CUDA_ARCH_LIST set (no GPU to ask), and a second load that must reuse the cache.
#
# A missing nvcc or CUDA torch fails under CI=true (exit 1) and skips with the reason elsewhere (exit 3).
#
# Usage: scripts/check_cuda_extension.sh
# Env:   FASTDIFF_CUDA_VENV (default .venv-cuda), FASTDIFF_CUDA_TORCH (default torch==2.14.1: on these
#        machines pip takes it from local disk), FASTDIFF_CUDA_ARCHS (default "80;90"),
#        FASTDIFF_JIT_ARCH (default "9.0", the JIT check's TORCH_CUDA_ARCH_LIST), MAX_JOBS (default nproc)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FASTDIFF_CUDA_VENV:-$ROOT/.venv-cuda}
TORCH_SPEC=${FASTDIFF_CUDA_TORCH:-torch==2.14.1}
export FASTDIFF_CUDA_ARCHS=${FASTDIFF_CUDA_ARCHS:-"80;90"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

unavailable() {
  if [ "${CI:-}" = "true" ]; then
    echo "check_cuda_extension.sh: FAILED: $* (required in CI)" >&2
    exit 1
  fi
  echo "check_cuda_extension.sh: SKIPPED: $*" >&2
  exit 3
}

# CUDA_HOME: as set, else the toolkit nvcc lives in, else /usr/local/cuda; it must have nvcc and the headers.
CANDIDATES=("${CUDA_HOME:-}")
if command -v nvcc >/dev/null 2>&1; then CANDIDATES+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"); fi
CANDIDATES+=(/usr/local/cuda)
CUDA_HOME=
for home in "${CANDIDATES[@]}"; do
  if [ -n "$home" ] && [ -x "$home/bin/nvcc" ] && [ -f "$home/include/cuda_runtime.h" ]; then CUDA_HOME=$home; break; fi
done
[ -n "$CUDA_HOME" ] || unavailable "no CUDA toolkit with nvcc and cuda_runtime.h found (set CUDA_HOME)"
export CUDA_HOME

t0=$(date +%s)
STAMP="$VENV/.fastdiff-cuda-venv"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$TORCH_SPEC" ]; then
  echo "== setting up $VENV ($TORCH_SPEC)"
  python3 -m venv "$VENV"
  echo '*' >"$VENV/.gitignore"  # the venv ignores itself
  "$VENV/bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel ninja numpy ||
    unavailable "could not install the build tools into $VENV"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC" || unavailable "could not install $TORCH_SPEC into $VENV"
  echo "$TORCH_SPEC" >"$STAMP"
fi
export PATH="$VENV/bin:$PATH"
"$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)" ||
  unavailable "$TORCH_SPEC in $VENV is not a CUDA build of torch"
t1=$(date +%s)

echo "== building fastdiff._C (archs $FASTDIFF_CUDA_ARCHS, $MAX_JOBS jobs) into $VENV"
# Not editable: an editable install would put _C*.so into the source tree, where the CPU venv would find it.
(cd "$ROOT" && FASTDIFF_SKIP_CUDA_BUILD=0 "$VENV/bin/python" -m pip install -q --no-build-isolation --no-deps . 2>&1 |
  grep -v -e "BuildBackendWarning" -e "^ *!!" -e "^ *\*\*\*" -e "^ *$" || true)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-ext-XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
# From outside the source tree, whose fastdiff/ (without _C) would shadow the installed package.
(cd "$SCRATCH" && "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fastdiff._C') is None)") || {
  echo "check_cuda_extension.sh: FAILED: pip did not build fastdiff._C (see above)" >&2
  exit 1
}
t2=$(date +%s)

echo "== importing fastdiff._C, checking op schemas"
(cd "$SCRATCH" && "$VENV/bin/python" -m fastdiff.tools.check_extension --prebuilt)
t3=$(date +%s)

echo "== JIT build (fastdiff._extension, TORCH_CUDA_ARCH_LIST=${FASTDIFF_JIT_ARCH:-9.0}) and a cached reload"
(cd "$ROOT" && TORCH_CUDA_ARCH_LIST="${FASTDIFF_JIT_ARCH:-9.0}" TORCH_EXTENSIONS_DIR="$SCRATCH/jit" \
  "$VENV/bin/python" -m fastdiff.tools.check_extension --jit)
t4=$(date +%s)
echo "check_cuda_extension.sh: OK (venv $((t1 - t0)) s, build $((t2 - t1)) s, import + schemas $((t3 - t2)) s, JIT + reload $((t4 - t3)) s)"
