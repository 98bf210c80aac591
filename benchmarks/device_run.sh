#!/usr/bin/env bash
# The one script to run on a GPU machine (fits in ~12 minutes on an H100):
#   bash benchmarks/device_run.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/device-<date>)
# 1. builds the CUDA extension for this card,
# 2. runs the GPU tests (the same test files as CI, now on CUDA instead of the interpreter),
# 3. runs every benchmark: one JSON-lines file each under OUT_DIR, their logs in bench.log,
#    (OUT_DIR ends with at most 9 files: setup.log, tests.log, bench.log and the .jsonl files),
# 4. prints a short summary table last.
# Wheels the device image lacks (e.g. diffusers for the oracle tests) can travel in .whl/
# (see the device tool's README); they are installed to /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/device-$(date -u +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
# The device copy of the tree has no .git: pass FASTDIFF_COMMIT=$(git rev-parse --short HEAD) from here.
export FASTDIFF_COMMIT="${FASTDIFF_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
status=0

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== environment =="
PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import bench_utils; print(bench_utils.environment())" | tee "$OUT_DIR/setup.log"

arch=$(python3 -c 'import torch; a,b=torch.cuda.get_device_capability(0); print(f"{a}{b}")')
echo "== build: CUDA extension (sm_$arch) =="
start=$(date +%s)
if FASTDIFF_CUDA_ARCHS="$arch" python3 -m pip install -q --no-build-isolation --no-deps -e . >>"$OUT_DIR/setup.log" 2>&1; then
  echo "built in $(( $(date +%s) - start )) s"
else
  echo "BUILD FAILED (see setup.log)"; tail -30 "$OUT_DIR/setup.log"; status=1
fi

echo "== GPU tests =="
tests=(tests/test_group_norm.py tests/test_group_norm_triton.py tests/test_group_norm_cuda.py tests/test_attention.py
       tests/test_nn_attention.py tests/test_scheduler_step.py tests/test_scheduler_fused.py tests/test_geglu.py)
existing=(); for t in "${tests[@]}"; do [ -f "$t" ] && existing+=("$t"); done
{ timeout 180 python3 -m pytest -q -p no:cacheprovider "${existing[@]}" \
  && timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_schedulers.py -k sync; } 2>&1 | tee "$OUT_DIR/tests.log" | tail -15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# the pipelines' CUDA graphs: captured == eager (SD, SDXL), weight changes, memory bound, release
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_pipeline_graphs.py -m gpu 2>&1 \
  | tee -a "$OUT_DIR/tests.log" | tail -8
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks =="
run_bench() {  # name, timeout seconds, script arguments...
  local name=$1 limit=$2; shift 2
  echo "#### $name $*" >>"$OUT_DIR/bench.log"
  timeout "$limit" python3 "benchmarks/$name.py" --out "$OUT_DIR" "$@" >"$OUT_DIR/.current.log" 2>&1 \
    || { echo "$name $* FAILED"; tail -20 "$OUT_DIR/.current.log"; status=1; }
  cat "$OUT_DIR/.current.log" >>"$OUT_DIR/bench.log"
  # each benchmark prints its own short table last, after a line '== table =='
  { echo "-- $name $*"; sed -n '/^== table ==$/,$p' "$OUT_DIR/.current.log" | tail -n +2; } >>"$OUT_DIR/.summary"
  rm -f "$OUT_DIR/.current.log"
}
run_bench bench_group_norm 90 --time-budget-s 70
run_bench bench_attention 90
run_bench bench_scheduler_step 45
run_bench bench_geglu 45
run_bench bench_unet 120 --archs sd15,sdxl
# five providers (diffusers eager / + compile, fastdiff eager / + graphs / + compile + graphs), first-image
# cold and warm (new processes), memory after a 5-resolution cycle; max-autotune compiles take minutes
run_bench bench_pipeline 1500 --archs sd15,sdxl --steps 50 --sdxl-steps 30 --repeats 2 --first-image --cycle
run_bench bench_pipeline 150 --resampler-table --archs sd15 --steps 50 --seeds 2 --repeats 1
echo "== summary =="
cat "$OUT_DIR/.summary" 2>/dev/null
rm -f "$OUT_DIR/.summary"
exit $status
