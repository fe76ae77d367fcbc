-- Configuration of the edge-verifier plugin (Kong 3.x schema format).

local typedefs = require "kong.db.schema.typedefs"

-- Connect, send and each read towards the verifier (milliseconds): the
-- verifier answers from memory on loopback, so a second is already generous.
local DEFAULT_TIMEOUT_MS = 1000
-- How long an idle connection to the verifier stays pooled (milliseconds).
local DEFAULT_KEEPALIVE_MS = 60000
-- After a failed connection attempt, no new one to that verifier address
-- from this worker for this long (milliseconds), x1.6 after each further
-- failed attempt (+-20% jitter) up to the ceiling: the Python plugin's and
-- gRPC's connection back-off, so a verifier that is down or overloaded is not
-- met with a connection per request. Requests meanwhile use the worker's idle
-- pooled connections, else fail at once (503).
local DEFAULT_RECONNECT_BACKOFF_MS = 250
local DEFAULT_RECONNECT_BACKOFF_MAX_MS = 5000
-- Answers reused per worker when the verifier allows it (entries).
local DEFAULT_CACHE_ENTRIES = 10000

return {
  name = "edge-verifier",
  fields = {
    -- the verifier names the consumer; configuring one per consumer is meaningless
    { consumer = typedefs.no_consumer },
    { protocols = typedefs.protocols_http },
    { config = {
        type = "record",
        fields = {
          -- the verifier's forward-auth URL, e.g. http://127.0.0.1:8080/v1/forward-auth
          { url = typedefs.url { required = true } },
          { timeout = { type = "integer", default = DEFAULT_TIMEOUT_MS,
                        between = { 1, 60000 }, required = true } },
          -- 0 closes the connection after every answer
          { keepalive_timeout = { type = "integer", default = DEFAULT_KEEPALIVE_MS,
                                  between = { 0, 3600000 }, required = true } },
          -- 0 turns the back-off off (a connection attempt per request)
          { reconnect_backoff = { type = "integer", default = DEFAULT_RECONNECT_BACKOFF_MS,
                                  between = { 0, 600000 }, required = true } },
          -- the back-off's ceiling; a value below reconnect_backoff is read as it
          { reconnect_backoff_max = { type = "integer", default = DEFAULT_RECONNECT_BACKOFF_MAX_MS,
                                      between = { 1, 600000 }, required = true } },
          -- let requests through (without identity) when the verifier is unreachable
          { fail_open = { type = "boolean", default = false, required = true } },
          -- 0 turns decision reuse off
          { cache_entries = { type = "integer", default = DEFAULT_CACHE_ENTRIES,
                              between = { 0, 1000000 }, required = true } },
          -- forward the client's X-Client-Cert-Thumbprint; only behind a proxy
          -- that terminates mTLS and overwrites that header
          { trust_client_cert_header = { type = "boolean", default = false, required = true } },
          -- the verifier named a consumer Kong does not know: refuse (403), or
          -- authenticate the `anonymous` consumer (X-Anonymous-Consumer: true)
          { consumer_not_found = { type = "string", default = "refuse", required = true,
                                   one_of = { "refuse", "anonymous" } } },
          -- the anonymous consumer's id or username (Kong's convention)
          { anonymous = { type = "string", len_min = 1 } },
        },
    } },
  },
  entity_checks = {
    { conditional = {
        if_field = "config.consumer_not_found", if_match = { eq = "anonymous" },
        then_field = "config.anonymous", then_match = { required = true },
    } },
  },
}
