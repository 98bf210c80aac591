#!/usr/bin/env bash
# Run HERE (a machine with PyPI) before a device run: the GPU image has no diffusers,
# which the oracle tests and the diffusers baselines need. Downloads the wheels into
# .whl/ (ignored by git); pass `carry: [".whl"]` to the device call, and
# benchmarks/device_run.sh installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata
ls -la .whl
