#!/usr/bin/env bash
# The main job: set up .venv if needed, generate a grid of samples from the embedded default model
# (out/fastdiff_samples.png), then print the speed table of `fastdiff bench` (kernels beside their
# baselines, and a whole pipeline) for this device. Extra arguments go to `fastdiff bench`
# (for example --json or --csv).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$VENV/bin/fastdiff" generate --out out/fastdiff_samples.png
exec "$VENV/bin/fastdiff" bench "$@"
