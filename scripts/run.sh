#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the GroupNorm benchmark
# (the real GPU benchmark on a CUDA machine, a small CPU smoke run elsewhere).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
exec "$PY" benchmarks/bench_group_norm.py "$@"
