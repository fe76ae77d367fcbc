#!/usr/bin/env bash
# Debian's nginx with the Lua module, for tests/kong (the Kong plugin run under a PDK shim), and the
# headers-more module that deploy/nginx/nginx.conf.template loads (more_clear_input_headers).
# Idempotent: installs only what is missing, and refreshes the package lists only then.
# Never install Debian's `luajit` package here: it conflicts with libluajit2 that the Lua module uses.
set -euo pipefail

packages=(nginx libnginx-mod-http-lua lua-resty-core lua-resty-lrucache lua-cjson
          libnginx-mod-http-headers-more-filter gettext-base)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "nginx-lua: all present"
  exit 0
fi

echo "nginx-lua: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# the nginx package starts a system nginx on :80; tests run their own, so keep it from starting
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}"
