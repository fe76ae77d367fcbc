#!/usr/bin/env bash
# The main job: installs the package into .venv (see scripts/venv.sh) and runs the verifier against its
# embedded development provider.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pip install --disable-pip-version-check -q -e .
bash scripts/otel_proto.sh
exec python -m verifier dev "$@"
