#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh, into .venv), then runs lint, types
# and the whole suite with the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
bash scripts/setup.sh
python -m ruff check .
python -m mypy
python -m vulture
python -m pytest -q -p no:cacheprovider "$@"
