#!/usr/bin/env bash
# Syntax-check every csrc/**/*.cpp (the torch bindings and module.cpp) with the
# host compiler against the installed torch's headers and the CUDA headers, so
# that the bindings cannot rot unseen on machines without a GPU or a CUDA torch.
# `-fsyntax-only`: nothing is linked, so a CPU-only torch is enough.
#
# A CPU-only torch wheel ships c10/cuda headers but not the generated
# c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in is supplied when it is
# missing (it only carries build-configuration macros).
#
# Usage: scripts/check_cuda_binding.sh
# Env:   CXX (default g++), PYTHON (default python), CUDA_HOME (default: from nvcc, else /usr/local/cuda),
#        FASTDIFF_CXX_STD (default c++20, what torch >= 2.10 requires; c++17 also works for older torch)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CXX=${CXX:-g++}
PYTHON=${PYTHON:-python}
STD=${FASTDIFF_CXX_STD:-c++20}

CANDIDATES=("${CUDA_HOME:-}")
if command -v nvcc >/dev/null 2>&1; then CANDIDATES+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"); fi
CANDIDATES+=(/usr/local/cuda)
CUDA_INCLUDE=
for home in "${CANDIDATES[@]}"; do
  if [ -n "$home" ] && [ -f "$home/include/cuda_runtime_api.h" ]; then CUDA_INCLUDE="$home/include"; break; fi
done
if [ -z "$CUDA_INCLUDE" ]; then
  echo "check_cuda_binding.sh: CUDA headers (cuda_runtime_api.h) not found; set CUDA_HOME" >&2
  exit 2
fi

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "check_cuda_binding.sh: $PYTHON ($(command -v "$PYTHON" || echo 'not found')) cannot import torch; set PYTHON to the venv's python" >&2
  exit 1
fi
mapfile -t TORCH_INCLUDES < <("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
PY_INCLUDE=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
STUB=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-binding-XXXXXX")
trap 'rm -rf "$STUB"' EXIT
FLAGS=(-std="$STD" -fsyntax-only -Wall -Wextra -Werror -I"$ROOT/csrc")
for dir in "${TORCH_INCLUDES[@]}"; do FLAGS+=(-isystem "$dir"); done
FLAGS+=(-isystem "$CUDA_INCLUDE" -isystem "$PY_INCLUDE")
if ! find "${TORCH_INCLUDES[@]}" -path '*c10/cuda/impl/cuda_cmake_macros.h' 2>/dev/null | grep -q .; then
  mkdir -p "$STUB/c10/cuda/impl"
  echo "#pragma once" >"$STUB/c10/cuda/impl/cuda_cmake_macros.h"
  FLAGS+=(-isystem "$STUB")
fi

mapfile -t SOURCES < <(cd "$ROOT" && find csrc -name '*.cpp' | sort)
failed=0
for src in "${SOURCES[@]}"; do
  if (cd "$ROOT" && "$CXX" "${FLAGS[@]}" "$src"); then
    echo "OK     $src"
  else
    echo "FAILED $src"
    failed=1
  fi
done
exit "$failed"
