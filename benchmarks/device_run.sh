#!/usr/bin/env bash
# The one script to run on a GPU machine, inside one device call:
#   bash benchmarks/device_run.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/device-<date>)
# A session has about 15 minutes of device time, machine start included, so the whole run stops at
# FASTDIFF_DEVICE_BUDGET_S (default 480 s): every step runs under min(its own limit, the time left), in
# priority order, and a step with under 20 s left is skipped and named in the summary. A second call
# can run the rest: FASTDIFF_DEVICE_SKIP="tests kernels" skips steps by group (build, tests, graphs,
# kernels, pipeline, optimize, lora, resampler, repro).
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
BUDGET_S=${FASTDIFF_DEVICE_BUDGET_S:-480}
SKIP=" ${FASTDIFF_DEVICE_SKIP:-} "
t0=$(date +%s)
skipped=()
left() { echo $(( BUDGET_S - ($(date +%s) - t0) )); }
# limit GROUP SECONDS: sets LIM to the seconds this step may run; returns 1 (skip it) when skipped or out of time
limit() {
  local group=$1 want=$2 l
  LIM=0
  if [[ "$SKIP" == *" $group "* ]]; then skipped+=("$group (FASTDIFF_DEVICE_SKIP)"); return 1; fi
  l=$(left); [ "$l" -lt "$want" ] && want=$l
  if [ "$want" -lt 20 ]; then skipped+=("$group: $3 (out of time)"); return 1; fi
  LIM=$want
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== environment =="
PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}" python3 -c "import bench_utils; print(bench_utils.environment())" | tee "$OUT_DIR/setup.log"

arch=$(python3 -c 'import torch; a,b=torch.cuda.get_device_capability(0); print(f"{a}{b}")')
echo "== build: CUDA extension (sm_$arch) =="
start=$(date +%s)
if ! limit build 150 "CUDA extension"; then
  echo "build skipped"
elif FASTDIFF_CUDA_ARCHS="$arch" timeout "$LIM" python3 -m pip install -q --no-build-isolation --no-deps -e . \
    >>"$OUT_DIR/setup.log" 2>&1; then
  echo "built in $(( $(date +%s) - start )) s"
else
  echo "BUILD FAILED (see setup.log)"; tail -30 "$OUT_DIR/setup.log"; status=1
fi

echo "== GPU tests =="
tests=(tests/test_group_norm.py tests/test_group_norm_triton.py tests/test_group_norm_cuda.py tests/test_attention.py
       tests/test_nn_attention.py tests/test_scheduler_step.py tests/test_scheduler_fused.py tests/test_geglu.py)
existing=(); for t in "${tests[@]}"; do [ -f "$t" ] && existing+=("$t"); done
run_tests() {  # group, seconds, pytest arguments...
  local group=$1
  limit "$1" "$2" "pytest ${*:3}" || return 0
  shift 2
  echo "#### pytest $*" >>"$OUT_DIR/tests.log"
  timeout "$LIM" python3 -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee -a "$OUT_DIR/tests.log" | tail -8
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "$group tests FAILED"; status=1; }
}
run_tests tests 150 "${existing[@]}"
run_tests tests 40 tests/test_schedulers.py -k sync
# bitwise-reproducible attention/GroupNorm (fwd+bwd, SD shapes, and across two processes through the
# autotune disk cache), the scheduler-step counter at 1,000+ programs, tuning refused inside a capture
run_tests repro 240 tests/test_gpu_reproducibility.py
# the pipelines' CUDA graphs: captured == eager (SD, SDXL), weight changes, memory bound, release
# and fastdiff.optimize's captured diffusers UNet with LoRA
run_tests graphs 120 tests/test_graphs.py tests/test_pipeline_graphs.py tests/test_optimize.py -m gpu

echo "== benchmarks =="
run_bench() {  # group, name, timeout seconds, script arguments...
  local group=$1 name=$2
  limit "$1" "$3" "$name ${*:4}" || return 0
  shift 3
  echo "#### $name $*" >>"$OUT_DIR/bench.log"
  timeout "$LIM" python3 "benchmarks/$name.py" --out "$OUT_DIR" "$@" >"$OUT_DIR/.current.log" 2>&1 \
    || { echo "$name $* FAILED"; tail -20 "$OUT_DIR/.current.log"; status=1; }
  cat "$OUT_DIR/.current.log" >>"$OUT_DIR/bench.log"
  # each benchmark prints its own short table last, after a line '== table =='
  { echo "-- $name $*"; sed -n '/^== table ==$/,$p' "$OUT_DIR/.current.log" | tail -n +2; } >>"$OUT_DIR/.summary"
  rm -f "$OUT_DIR/.current.log"
}
run_bench kernels bench_group_norm 75 --time-budget-s 60
run_bench kernels bench_attention 75
run_bench kernels bench_scheduler_step 40
run_bench kernels bench_geglu 40
# UNet step: diffusers NCHW / channels_last / graph, fastdiff eager / graph, and the per-op ablation in the graph.
# The torch.compile providers (default and max-autotune) take minutes: a later call, e.g.
#   python3 benchmarks/bench_unet.py --archs sd15 --compile
run_bench kernels bench_unet 120 --archs sd15,sdxl
# SD1.5 pipeline, fastdiff eager and graphs against diffusers eager. The compile providers, SDXL,
# first-image times and the resolution cycle take many minutes (max-autotune): run them in a
# later call, e.g. FASTDIFF_DEVICE_SKIP="build tests graphs kernels" with a larger budget, or by hand:
#   python3 benchmarks/bench_pipeline.py --archs sd15,sdxl --steps 50 --sdxl-steps 30 --first-image --cycle
run_bench pipeline bench_pipeline 150 --archs sd15 --steps 50 --repeats 2 \
  --providers diffusers-eager,fastdiff-eager,fastdiff-graphs
run_bench optimize bench_optimize 120 --archs sd15
run_bench lora bench_lora 90 --archs sd15
run_bench resampler bench_pipeline 90 --resampler-table --archs sd15 --steps 50 --seeds 2 --repeats 1
echo "== summary ($(( $(date +%s) - t0 )) s of a ${BUDGET_S} s budget) =="
cat "$OUT_DIR/.summary" 2>/dev/null
[ ${#skipped[@]} -eq 0 ] || printf 'skipped: %s\n' "${skipped[@]}"
rm -f "$OUT_DIR/.summary"
exit $status
