#!/usr/bin/env bash
# Kong's Python plugin server (kong-pdk: kong-python-pluginserver, msgpack, gevent) for
# tests/kong/test_python_plugin.py, which runs kong/python/edge_verifier.py under it. Idempotent.
set -euo pipefail

PY="${PYTHON:-python3}"

"$PY" -m pip show kong-pdk >/dev/null 2>&1 || "$PY" -m pip install --quiet 'kong-pdk>=0.36'
command -v kong-python-pluginserver >/dev/null 2>&1 \
  || "$PY" -c 'import kong_pdk.cli' \
  || { echo "kong-pdk: kong-python-pluginserver is not importable" >&2; exit 1; }
