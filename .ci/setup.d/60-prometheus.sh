#!/usr/bin/env bash
# Debian's prometheus package, for its two binaries: `promtool` (tests/observe/test_monitoring.py runs
# `promtool check rules` and `promtool test rules` on deploy/prometheus/) and `prometheus` (the same test
# file runs one on a loopback port, with a temp config and a temp --storage.tsdb.path, to scrape a
# `verifier serve`). Idempotent: does nothing when both are on PATH. Never starts or enables the system
# Prometheus service (the package's postinst would start one on :9090).
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  echo "60-prometheus: $(prometheus --version 2>&1 | head -n1) already installed"
  exit 0
fi

echo "60-prometheus: installing prometheus (for promtool and the scrape test)"
export DEBIAN_FRONTEND=noninteractive
created_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus
prometheus --version 2>&1 | head -n1
