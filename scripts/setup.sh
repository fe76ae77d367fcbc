#!/usr/bin/env bash
# Installs everything the verifier, its tests and its benchmarks need on a fresh Debian machine:
# the Python package with its dev/bench extras, then each .ci/setup.d/*.sh (apt packages, npm).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --disable-pip-version-check -q -e '.[dev,bench]'
for script in .ci/setup.d/*.sh; do
  [ -e "$script" ] || continue
  echo "--- $script"
  bash "$script"
done
