#!/usr/bin/env bash
# The test command: installs what the tests need, then runs lint, types and the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check .
python3 -m mypy
python3 -m pytest -q -p no:cacheprovider "$@"
