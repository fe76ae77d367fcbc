#!/usr/bin/env bash
# atheris (libFuzzer for Python), for tests/fuzz and tests/test_hostile_input.py::test_atheris_targets_run_clean.
# Wheels exist for CPython 3.11 on Linux x86_64; elsewhere the install may fail, and then the fuzz test
# skips with a note. Idempotent: does nothing when atheris already imports. Never fails the setup.
set -uo pipefail

PY="${PYTHON:-python3}"  # scripts/setup.sh sets PYTHON to the project venv's python

if "$PY" -c "import atheris" >/dev/null 2>&1; then
  echo "45-fuzz: atheris $("$PY" -c 'import importlib.metadata as m; print(m.version("atheris"))') already installed"
  exit 0
fi
if "$PY" -m pip install --disable-pip-version-check -q --only-binary=:all: atheris; then
  echo "45-fuzz: installed atheris"
else
  echo "45-fuzz: NOTE: atheris could not be installed here (no wheel for this Python/platform?);" \
       "the atheris fuzz test will be skipped" >&2
fi
exit 0
