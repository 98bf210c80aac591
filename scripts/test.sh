#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k group_norm).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
# pytest exits 5 when no test ran; that is a failure here, never a pass.
# --durations: where the suite spends its time, so that CI stays within its budget.
exec "$PY" -m pytest -q --durations=25 "$@"
