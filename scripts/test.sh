#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k group_norm).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
# pytest exits 5 when no test ran; that is a failure here, never a pass.
# --durations: where the suite spends its time, so that CI stays within its budget.
# Workers (pytest-xdist): one per core, at most 4 (FASTDIFF_TEST_WORKERS overrides; 0 runs in this
# process). --dist loadfile keeps each test file on one worker, so a module's fixtures (the AOT compile,
# the nvcc build) run once.
workers=${FASTDIFF_TEST_WORKERS:-$(n=$(nproc); echo $(( n < 4 ? n : 4 )))}
exec "$PY" -m pytest -q --durations=25 -n "$workers" --dist loadfile "$@"
