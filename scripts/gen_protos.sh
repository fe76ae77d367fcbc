#!/usr/bin/env bash
# Regenerates the Python code for protos/ into verifier/v1/ (committed; tests check it matches).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/verifier/v1/verifier.proto
# the Envoy door's key schema: messages only, no service
python -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" protos/verifier/v1/envoy_key.proto
touch "$out/verifier/v1/__init__.py"
