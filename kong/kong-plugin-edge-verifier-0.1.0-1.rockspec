-- Build from this folder: `cd kong && luarocks make`.
package = "kong-plugin-edge-verifier"
version = "0.1.0-1"

source = {
  -- `luarocks make` builds the checkout it is run in and fetches nothing
  url = ".",
}

description = {
  summary = "Kong plugin that asks the edge verifier's forward-auth door about each request",
  detailed = [[
    Access-phase plugin (priority 990: after Kong's authenticators, before acl and
    rate-limiting). Calls the verifier over pooled HTTP/1.1 cosockets, passes the proved
    identity upstream as X-Authenticated-*, authenticates the Kong consumer the verifier
    names, relays denials exactly and fails closed when the verifier cannot be reached.
  ]],
  license = "Apache-2.0",
}

dependencies = {
  "lua >= 5.1",
  -- cjson comes with Kong's OpenResty; resty.sha256 (lua-resty-string)
  -- hashes a client certificate when Kong terminates mutual TLS
}

build = {
  type = "builtin",
  modules = {
    ["kong.plugins.edge-verifier.handler"] = "plugins/edge-verifier/handler.lua",
    ["kong.plugins.edge-verifier.schema"] = "plugins/edge-verifier/schema.lua",
    ["kong.plugins.edge-verifier.http1"] = "plugins/edge-verifier/http1.lua",
    ["kong.plugins.edge-verifier.decision_cache"] = "plugins/edge-verifier/decision_cache.lua",
    ["kong.plugins.edge-verifier.consumer"] = "plugins/edge-verifier/consumer.lua",
  },
}
