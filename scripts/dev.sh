#!/usr/bin/env bash
# The main job: installs the package and runs the verifier against its embedded development provider.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --disable-pip-version-check -q -e .
exec python3 -m verifier dev "$@"
