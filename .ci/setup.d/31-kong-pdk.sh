#!/usr/bin/env bash
# Kong's Python plugin server (kong-pdk: kong-python-pluginserver, msgpack, gevent) for
# tests/kong/test_python_plugin.py, which runs kong/python/edge_verifier.py under it. Idempotent.
set -euo pipefail

PY="${PYTHON:-python3}"

# The range pyproject.toml's `kong` extra pins (the releases kong/python/edge_verifier.py's listener fix is known for);
# pip leaves a kong-pdk already in it alone and replaces one outside it.
"$PY" -m pip install --quiet 'kong-pdk>=0.36,<0.37'
command -v kong-python-pluginserver >/dev/null 2>&1 \
  || "$PY" -c 'import kong_pdk.cli' \
  || { echo "kong-pdk: kong-python-pluginserver is not importable" >&2; exit 1; }
