#!/usr/bin/env bash
# The Triton version matrix of the ahead-of-time compile check (fastdiff.tools.aot_check --check):
# every Triton kernel compiled for sm_80 and sm_90 with each Triton in FASTDIFF_AOT_TRITONS
# (default: 3.0.0, the oldest pyproject.toml declares, and 3.6.0, the GPU image's), each in a small
# venv .venv-triton-<version> that holds only that triton (and an editable fastdiff) and reads torch
# (CPU) and everything else from .venv through a .pth file. The word `venv` stands for the Triton in
# .venv itself (whose `smoke` matrix tests/test_aot_compile.py checks in the test suite).
#
# Results are cached by kernel source hash under ~/.cache/fastdiff-aot, so a rerun compiles only what
# changed. Reports go to OUT_DIR (default: a temporary directory).
#
# Usage: scripts/aot_check.sh [OUT_DIR]
# Env:   FASTDIFF_AOT_TRITONS (default "3.0.0 3.6.0"; `venv`: .venv's Triton),
#        FASTDIFF_AOT_MATRIX (default smoke: the configs the pruners keep for the standard SD shapes;
#        `every`: every config of every autotune list and launch plan at every SD dtype, mask and layout,
#        see fastdiff/tools/aot_check.py; `reachable`: every config any real SD/SDXL/VAE shape can reach,
#        tens of thousands of compiles), FASTDIFF_AOT_STOP_FILE (start no new compile once this file
#        exists: what is left is deferred, listed and compiled by a later run from the cache),
#        FASTDIFF_AOT_DEADLINE (the same from a time, in seconds since the epoch),
#        FASTDIFF_AOT_REDUCE (e.g. "bf16,intclass": merge compiles that a sampled check found identical;
#        default none), JOBS (default nproc)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
OUT=${1:-$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-aot-XXXXXX")}
mkdir -p "$OUT"
VERSIONS=${FASTDIFF_AOT_TRITONS:-"3.0.0 3.6.0"}
MATRIX=${FASTDIFF_AOT_MATRIX:-smoke}
BASE_SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

failed=0
STOP_ARGS=()
[ -n "${FASTDIFF_AOT_STOP_FILE:-}" ] && STOP_ARGS+=(--stop-file "$FASTDIFF_AOT_STOP_FILE")
[ -n "${FASTDIFF_AOT_DEADLINE:-}" ] && STOP_ARGS+=(--deadline "$FASTDIFF_AOT_DEADLINE")
for version in $VERSIONS; do
  if [ "$version" = venv ]; then
    # .venv's own Triton: the full check (registers, spills and wgmma as well as compile and shared memory).
    version=$("$PY" -c "import triton; print(triton.__version__)")
    echo "== triton $version (.venv): fastdiff.tools.aot_check --matrix $MATRIX --check (sm_80, sm_90)"
    if ! "$PY" -m fastdiff.tools.aot_check --matrix "$MATRIX" --reduce "${FASTDIFF_AOT_REDUCE:-}" --check --jobs "${JOBS:-$(nproc)}" \
        "${STOP_ARGS[@]}" --json "$OUT/aot_triton-$version-$MATRIX.json" --report "$OUT/aot_triton-$version-$MATRIX.md"; then
      echo "aot_check.sh: triton $version FAILED (report: $OUT/aot_triton-$version-$MATRIX.md)" >&2
      failed=1
    fi
    continue
  fi
  venv="$ROOT/.venv-triton-$version"
  want="triton==$version $BASE_SITE $(sha256sum "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.fastdiff-stamp" 2>/dev/null)" != "$want" ]; then
    echo "== setting up $venv (triton $version; torch and the rest from .venv)"
    rm -rf "$venv"
    "$PY" -m venv --without-pip "$venv"
    echo '*' >"$venv/.gitignore"  # the venv ignores itself
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "$BASE_SITE" >"$site/zz_fastdiff_base.pth"  # appended after the venv's own site-packages: its triton wins
    "$PY" -m pip --python "$venv/bin/python" install -q --no-deps "triton==$version"
    FASTDIFF_SKIP_CUDA_BUILD=1 "$PY" -m pip --python "$venv/bin/python" install -q --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null
    echo "$want" >"$venv/.fastdiff-stamp"
  fi
  got=$("$venv/bin/python" -c "import triton; print(triton.__version__)")
  [ "$got" = "$version" ] || { echo "aot_check.sh: $venv has triton $got, expected $version" >&2; exit 1; }
  echo "== triton $version: fastdiff.tools.aot_check --matrix $MATRIX --check (sm_80, sm_90)"
  if ! "$venv/bin/python" -m fastdiff.tools.aot_check --matrix "$MATRIX" --reduce "${FASTDIFF_AOT_REDUCE:-}" --check --compile-only --jobs "${JOBS:-$(nproc)}" \
      "${STOP_ARGS[@]}" --json "$OUT/aot_triton-$version-$MATRIX.json" --report "$OUT/aot_triton-$version-$MATRIX.md"; then
    echo "aot_check.sh: triton $version FAILED (report: $OUT/aot_triton-$version-$MATRIX.md)" >&2
    failed=1
  fi
done
exit "$failed"
