#!/usr/bin/env bash
# Compile every csrc/**/*.cu with plain nvcc (no torch headers), compile only,
# for each arch in FASTDIFF_COMPILE_ARCHS (default "80 90"), in parallel.
#
# Prints each compile's `-Xptxas -v` report (registers, spills, shared memory
# per kernel), then one summary line per (file, arch). Exits non-zero if any
# compile fails, 2 if nvcc is missing. Objects and logs go to OUT_DIR
# (default: a fresh temporary directory).
#
# Usage: scripts/compile_cuda.sh [OUT_DIR]
# Env:   NVCC (default nvcc), FASTDIFF_COMPILE_ARCHS (default "80 90"), JOBS (default nproc)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NVCC=${NVCC:-nvcc}
ARCHS=${FASTDIFF_COMPILE_ARCHS:-"80 90"}
JOBS=${JOBS:-$(nproc)}
OUT=${1:-$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-cuda-XXXXXX")}

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda.sh: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 2
fi
mkdir -p "$OUT"
mapfile -t SOURCES < <(cd "$ROOT" && find csrc -name '*.cu' | sort)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "compile_cuda.sh: no .cu files under $ROOT/csrc" >&2
  exit 1
fi
echo "compile_cuda.sh: $("$NVCC" --version | tail -n 1); ${#SOURCES[@]} file(s) x archs [$ARCHS], $JOBS job(s), output in $OUT"

compile_one() {  # compile_one SOURCE ARCH TAG
  local src=$1 arch=$2 tag=$3 start
  start=$(date +%s)
  (cd "$ROOT" && "$NVCC" -std=c++17 -O3 -lineinfo -Icsrc \
      -gencode "arch=compute_${arch},code=sm_${arch}" -Xptxas -v \
      -c "$src" -o "$OUT/$tag.o") >"$OUT/$tag.log" 2>&1
  echo "$? $(( $(date +%s) - start ))" >"$OUT/$tag.status"
}

TAGS=()
for src in "${SOURCES[@]}"; do
  for arch in $ARCHS; do
    tag="$(echo "${src%.cu}" | tr '/' '_').sm_${arch}"
    TAGS+=("$src|$arch|$tag")
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    compile_one "$src" "$arch" "$tag" &
  done
done
wait

failed=0
for entry in "${TAGS[@]}"; do
  IFS='|' read -r src arch tag <<<"$entry"
  echo "===== $src sm_$arch ====="
  cat "$OUT/$tag.log"
done
echo "===== summary ====="
for entry in "${TAGS[@]}"; do
  IFS='|' read -r src arch tag <<<"$entry"
  read -r rc secs <"$OUT/$tag.status"
  kernels=$(grep -c "Compiling entry function" "$OUT/$tag.log")
  max_regs=$(grep -o "Used [0-9]* registers" "$OUT/$tag.log" | awk '{print $2}' | sort -n | tail -n 1)
  spills=$(grep -o "[0-9]* bytes spill stores" "$OUT/$tag.log" | awk '{s += $1} END {print s + 0}')
  if [ "$rc" -eq 0 ]; then
    echo "OK     $src sm_$arch: ${secs}s, $kernels kernels, max ${max_regs:-0} registers, $spills bytes spill stores in total"
  else
    echo "FAILED $src sm_$arch (nvcc exit $rc), see the log above"
    failed=1
  fi
done
exit "$failed"
