#!/usr/bin/env bash
# Installs everything the verifier, its tests and its benchmarks need on a fresh Debian machine:
# the Python package with its dev/bench extras into the project venv .venv (scripts/venv.sh), then each
# .ci/setup.d/*.sh (apt packages, npm, more pip packages: they run with .venv/bin first on PATH and
# $PYTHON set to the venv's python).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install --disable-pip-version-check -q -e '.[dev,bench]'
for script in .ci/setup.d/*.sh; do
  [ -e "$script" ] || continue
  echo "--- $script"
  bash "$script"
done
# The compiled parts (setup.py) build only where gcc was there at the pip install above; .ci/setup.d installs gcc
# where it was missing, so they are built now if they were skipped (a test fails where they are not built).
python -c "import verifier.doors._envoy_key, verifier.doors._http_head" 2>/dev/null \
  || python setup.py -q build_ext --inplace
bash scripts/otel_proto.sh  # after every pip install above: xds-protos overwrites opentelemetry-proto
