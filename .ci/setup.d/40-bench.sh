#!/usr/bin/env bash
# Install what bench/ needs: the C load generators (wrk, h2load; gcc and libnghttp2-dev to build bench/c/openloop.c), valgrind (instruction counts) and the Python packages of the bench
# extra. Idempotent: installs only what is missing.
set -euo pipefail

PY="${PYTHON:-python3}"  # scripts/setup.sh sets PYTHON to the project venv's python

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)  # bench/openloop.py builds bench/c/openloop.c on demand
[ -f /usr/include/nghttp2/nghttp2.h ] || missing+=(libnghttp2-dev)
command -v callgrind_control >/dev/null 2>&1 || missing+=(valgrind)  # bench.nginx_ab --instructions
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

pip_missing=()
for spec in "hdrhistogram:hdrh" "matplotlib:matplotlib" "tqdm:tqdm" "cachetools:cachetools" "httptools:httptools" "uvloop:uvloop" \
            "xds-protos:envoy.service.auth.v3.external_auth_pb2" "grpcio:grpc" "PyJWT:jwt" "cryptography:cryptography"; do
  pkg=${spec%%:*}; mod=${spec#*:}
  "$PY" -c "import ${mod}" >/dev/null 2>&1 || pip_missing+=("$pkg")
done
if ((${#pip_missing[@]})); then
  "$PY" -m pip install -q "${pip_missing[@]}"
fi
