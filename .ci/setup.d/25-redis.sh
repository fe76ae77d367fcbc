#!/usr/bin/env bash
# Debian's redis-server, for tests/integration/test_state_redis.py (the tests start their own server on
# a loopback port via tests/integration/redis_harness.py). Idempotent: does nothing when redis-server
# is already on PATH. Never starts or enables a system Redis service.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  echo "25-redis: $(redis-server --version | cut -d' ' -f1-3) already installed"
  exit 0
fi

echo "25-redis: installing redis-server"
export DEBIAN_FRONTEND=noninteractive
# The package's postinst would start a system Redis on :6379; keep it from starting.
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends redis-server
redis-server --version
