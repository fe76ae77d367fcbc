#!/usr/bin/env bash
# A C compiler and the Python headers, for scripts/build_native.py (mypyc compiles the hot path; run by
# scripts/setup.sh after this). Idempotent: does nothing when gcc is on PATH and Python.h is where the
# venv's python looks for it. Installs with apt-get when run as root; otherwise says what is missing.
set -euo pipefail

PY="${PYTHON:-python3}"  # scripts/setup.sh sets PYTHON to the project venv's python
include="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"

if command -v gcc >/dev/null 2>&1 && [ -e "$include/Python.h" ]; then
  echo "70-native-toolchain: gcc and $include/Python.h present"
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "70-native-toolchain: need gcc and $include/Python.h (Debian: apt-get install gcc python3-dev)" >&2
  exit 1
fi
echo "70-native-toolchain: installing gcc and python3-dev"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends gcc libc6-dev python3-dev
[ -e "$include/Python.h" ] || { echo "70-native-toolchain: $include/Python.h still missing" >&2; exit 1; }
