#!/usr/bin/env bash
# xds-protos (Envoy's API, for the gRPC door) ships its own older copy of opentelemetry-proto's modules
# under the same paths; whichever package pip writes last wins, and with xds-protos' copy the OTLP
# exporter cannot import (`cannot import name 'InstrumentationScope'`), so `tracing:` fails at start-up.
# This puts opentelemetry-proto's own files back (xds-protos only needs a subset of them). Idempotent:
# run it after any pip install of the project (scripts/setup.sh, scripts/dev.sh and the Dockerfile do).
set -euo pipefail
PY="${PYTHON:-python}"
if ! "$PY" -c 'from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope' 2>/dev/null; then
  version=$("$PY" -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')
  "$PY" -m pip install --disable-pip-version-check -q --force-reinstall --no-deps "opentelemetry-proto==$version"
fi
