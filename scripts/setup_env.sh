# Sourced by scripts/run.sh and scripts/test.sh: create .venv and install fastdiff into it once.
# Re-running is cheap: it reinstalls only when setup.py/pyproject.toml changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTDIFF_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# A CPU build of torch by default (on these machines pip takes it from local disk);
# set FASTDIFF_TORCH="torch" (or any spec) to choose another build.
TORCH_SPEC="${FASTDIFF_TORCH:-torch==2.13.0}"
STAMP="$VENV/.fastdiff-installed"
want="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ ! -x "$PY" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "setting up $VENV (torch: $TORCH_SPEC)" >&2
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip "setuptools>=64" wheel
  "$PY" -m pip install -q "$TORCH_SPEC"
  # No build isolation: setup.py looks at the venv's torch to decide whether to build the CUDA extension.
  "$PY" -m pip install -q --no-build-isolation -e "$ROOT[test]"
  echo "$want" > "$STAMP"
fi
# Everything the sourcing script runs (and what that runs: pytest's subprocesses, bash helpers calling
# a bare `python`) finds .venv first, never a Python installed elsewhere on the machine.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
