# Sourced by scripts/dev.sh, scripts/test.sh and scripts/setup.sh (not run on its own).
#
# Creates the project's virtual environment `.venv` (or $VERIFIER_VENV) on first use and puts it first
# on PATH, so every `python`, `python3`, `pip`, `verifier`, `envoy` and `kong-python-pluginserver` that
# the scripts, .ci/setup.d/*.sh and the tests run is the venv's. Debian 12/13 mark the system Python
# "externally managed" (PEP 668): pip refuses to install into it, but installs into a venv freely.
# Debian ships `venv`'s ensurepip in the python3-venv package: installed here with apt-get when it is
# missing and we run as root.
# The venv does not see the system site-packages (no --system-site-packages): what the project needs
# is installed into it from pyproject.toml and .ci/setup.d, so nothing installed by hand elsewhere can
# make the tests pass on one machine and fail on a fresh one.

venv_dir="${VERIFIER_VENV:-$PWD/.venv}"
venv_base="${VERIFIER_BASE_PYTHON:-python3}"

_venv_usable() { [ -x "$venv_dir/bin/python" ] && "$venv_dir/bin/python" -c 'import sys, pip' >/dev/null 2>&1; }

_venv_can_create() { "$venv_base" -c 'import venv, ensurepip' >/dev/null 2>&1; }

if ! _venv_usable; then
  if ! command -v "$venv_base" >/dev/null 2>&1; then
    echo "venv: $venv_base not found; install Python 3.11 or newer (Debian: apt-get install python3)" >&2
    exit 1
  fi
  if ! _venv_can_create; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "venv: '$venv_base -m venv' is unavailable; installing Debian's python3-venv"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends python3-venv
    else
      echo "venv: '$venv_base -m venv' is unavailable; install it first (Debian: sudo apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  echo "venv: creating $venv_dir with $("$venv_base" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  rm -rf "$venv_dir"
  "$venv_base" -m venv "$venv_dir"
fi

export VIRTUAL_ENV="$venv_dir"
export PATH="$venv_dir/bin:$PATH"
export PYTHON="$venv_dir/bin/python"
unset PYTHONHOME
hash -r
