#!/bin/sh
# Install the Node.js dependencies of the integration-test OpenID Provider
# (tests/integration/op: panva/node-oidc-provider, pinned in package.json / package-lock.json).
# Idempotent: does nothing when the pinned version is already installed. Run from anywhere.
set -eu

root=$(cd "$(dirname "$0")/../.." && pwd)
op="$root/tests/integration/op"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "20-oidc-provider: node/npm not found; skipping (the OpenID Provider tests will be skipped)" >&2
    exit 0
fi

wanted=$(node -p "require('$op/package.json').dependencies['oidc-provider']")
installed=$(node -p "try { require('$op/node_modules/oidc-provider/package.json').version } catch { '' }")
if [ "$installed" = "$wanted" ] && [ "$op/node_modules/.package-lock.json" -nt "$op/package-lock.json" ]; then
    echo "20-oidc-provider: oidc-provider $installed already installed"
    exit 0
fi

npm ci --prefix "$op" --no-audit --no-fund --loglevel=error
echo "20-oidc-provider: installed oidc-provider $wanted"
