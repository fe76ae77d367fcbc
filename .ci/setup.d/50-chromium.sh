#!/usr/bin/env bash
# Debian's headless-capable Chromium and the pip `playwright` driver, for
# tests/integration/test_webauthn_browser.py (a real browser with a CDP virtual authenticator signs the
# WebAuthn ceremonies). Playwright drives the system browser through executable_path="/usr/bin/chromium":
# `playwright install` (which downloads its own browser build) is never run. Idempotent.
set -euo pipefail

PY="${PYTHON:-python3}"  # scripts/setup.sh sets PYTHON to the project venv's python

if [ -x /usr/bin/chromium ]; then
  echo "50-chromium: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
else
  echo "50-chromium: installing chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-liberation
  /usr/bin/chromium --version || true
fi

if "$PY" -c "import playwright" >/dev/null 2>&1; then
  echo "50-chromium: playwright already installed"
else
  echo "50-chromium: installing the playwright driver (pip; no browser download)"
  "$PY" -m pip install -q "playwright>=1.45"
fi
