-- Envoy Lua filter: asks the edge verifier's HTTP forward-auth door whether a request may pass, and
-- reuses its answer for exactly as long as the verifier allowed (RFC 9111 `Cache-Control: max-age`).
--
-- Why Lua and not ext_authz: no released Envoy lets ext_authz reuse an answer (envoyproxy/envoy #3023),
-- and its HTTP cache filter cannot stand in front of the verifier safely (docs/ENVOY.md: a request with
-- Authorization is never cacheable, `private` answers are not stored, and the in-memory store has no
-- bound). This filter does what our Kong plugin does: one bounded cache per Envoy worker thread, keyed
-- on everything the answer depends on (method, scheme, host, path and query, every credential header).
--
-- Contract with the verifier (the same as the Kong plugin's):
--  * 200 is an allow: its X-Authenticated-* headers go to the upstream (the header_mutation filter in
--    front of this one removed every client copy), its DPoP-Nonce / RateLimit-* go to the client;
--  * anything else is a refusal relayed to the client (status, challenge, reason, body) with
--    `Cache-Control: no-store`: the verifier's Cache-Control (and X-Accel-Expires) is meant for this cache,
--    never for the client's (a browser keeping a reusable 401 for its max-age would refuse the user's next
--    token: the key of a client's cache is the URL, not the Authorization header), as nginx answers;
--  * a 431 (the credential headers past what the verifier reads; it has no reason) is a 431;
--  * no answer at all (unreachable, timeout): 503, fail closed;
--  * `Cache-Control: private, max-age=N` may be reused for N seconds, `no-store` never (DPoP, WebAuthn,
--    rate-limited and certificate-bound answers are no-store: the verifier decides, not this filter);
--    an answer carrying a DPoP-Nonce or RateLimit-* is never stored either, whatever it says: a nonce or
--    a budget is about one request, and another request must get its own.

local VERIFIER_CLUSTER = "verifier_http"
local FORWARD_AUTH_PATH = "/v1/forward-auth"
local TIMEOUT_MS = 2000
-- Answers kept per worker thread, and their bytes (keys are the client's bytes: up to MAX_KEY_BYTES each,
-- 10,000 of them would be some 160 MiB); a full cache drops its expired entries, then everything (bounded).
local MAX_ENTRIES = 10000
local MAX_BYTES = 20 * 1024 * 1024 -- MAX_ENTRIES x 2 KiB, as the Kong plugin's default
-- what an entry costs besides its key, headers and body: the tables, the map slot
local ENTRY_OVERHEAD = 256
local MAX_KEY_BYTES = 16384 -- a longer key (a huge credential) is checked every time, never stored
local MAX_TTL = 300 -- seconds; a ceiling on any reuse, whatever the verifier says

local CREDENTIAL_HEADERS = { "authorization", "dpop", "x-webauthn-assertion" }
-- W3C trace context, passed so the verifier's decision span joins the request's trace; never part of the
-- cache key (the answer does not depend on it), never a decision input. The client's, sampled flag
-- included: the verifier's sample_ratio decides what is recorded (tracing.honour_parent_sampled: false)
local TRACE_HEADERS = { "traceparent", "tracestate" }
-- refusal headers relayed to the client (the rest of the verifier's answer stays here: its Cache-Control and
-- X-Accel-Expires are for this cache; the client gets `Cache-Control: no-store`)
local CLIENT_HEADERS = {
  "www-authenticate", "dpop-nonce", "content-type", "retry-after",
  "ratelimit", "ratelimit-policy", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset",
  "x-verifier-reason",
}
-- allow headers meant for the client, not the upstream; an answer with any of them is never stored
local CLIENT_HEADERS_ON_ALLOW = {
  "dpop-nonce", "ratelimit", "ratelimit-policy", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset",
}
local IDENTITY_PREFIX = "x-authenticated-"

local cache = {}   -- key -> {expires = epoch seconds, status, headers, body, size}
local entries = 0
local bytes = 0    -- the entries' sizes (`size_of`)

local function ttl_of(cache_control)
  if cache_control == nil then
    return nil
  end
  local max_age
  for directive in string.lower(cache_control):gmatch("[^,]+") do
    directive = directive:match("^%s*(.-)%s*$")
    if directive == "no-store" or directive == "no-cache" then
      return nil
    end
    local n = directive:match("^max%-age%s*=%s*(%d+)$")
    if n then
      max_age = tonumber(n)
    end
  end
  if not max_age or max_age <= 0 then
    return nil
  end
  return math.min(max_age, MAX_TTL)
end

-- The bytes an entry holds: its key, the answer's headers and body, and ENTRY_OVERHEAD.
local function size_of(key, answer)
  local size = #key + #answer.body + ENTRY_OVERHEAD
  for name, value in pairs(answer.headers) do
    size = size + #name + (type(value) == "string" and #value or 0)
  end
  return size
end

local function drop(key)
  local old = cache[key]
  if old ~= nil then
    cache[key] = nil
    entries = entries - 1
    bytes = bytes - old.size
  end
end

local function store(key, answer, ttl, now)
  if #key > MAX_KEY_BYTES then
    return
  end
  drop(key)
  local size = size_of(key, answer)
  if entries >= MAX_ENTRIES or bytes + size > MAX_BYTES then
    for k, v in pairs(cache) do
      if v.expires <= now then
        drop(k)
      end
    end
    if entries >= MAX_ENTRIES or bytes + size > MAX_BYTES then
      cache = {}
      entries = 0
      bytes = 0
    end
  end
  entries = entries + 1
  bytes = bytes + size
  answer.size = size
  -- os.time() counts whole seconds: an entry stored at second S is used while os.time() < S + ttl,
  -- so it never outlives ttl real seconds (it may end up to a second early).
  answer.expires = now + ttl
  cache[key] = answer
end

-- Whether an answer carries something about this request alone (a nonce, a rate-limit state).
local function per_request(answer)
  for _, name in ipairs(CLIENT_HEADERS_ON_ALLOW) do
    if answer.headers[name] ~= nil then
      return true
    end
  end
  return false
end

local function client_address(handle)
  local address = handle:streamInfo():downstreamRemoteAddress() or ""
  local v6 = address:match("^%[(.*)%]:%d+$")
  if v6 then
    return v6
  end
  return (address:gsub(":%d+$", ""))
end

-- The verifier's answer as a plain table, or nil when it never answered.
local function ask(handle, headers, method, path, host, proto)
  local request = {
    [":method"] = method,
    [":path"] = FORWARD_AUTH_PATH .. path,
    [":authority"] = "verifier",
    ["x-forwarded-method"] = method,
    ["x-forwarded-uri"] = path,
    ["x-forwarded-host"] = host,
    ["x-forwarded-proto"] = proto,
    ["x-forwarded-for"] = client_address(handle),
    ["content-length"] = "0",
  }
  for _, names in ipairs({ CREDENTIAL_HEADERS, TRACE_HEADERS }) do
    for _, name in ipairs(names) do
      local value = headers:get(name)
      if value ~= nil then
        request[name] = value
      end
    end
  end
  local ok, response_headers, body = pcall(handle.httpCall, handle, VERIFIER_CLUSTER, request, "", TIMEOUT_MS)
  if ok and response_headers ~= nil and response_headers[":status"] == "431" then
    -- the verifier's refusal of the question's header block (a credential past its 32 KiB), answered before any
    -- reason: a request-header refusal (RFC 6585), not an outage; never stored (no Cache-Control)
    return { status = "431", headers = { ["content-type"] = "application/json" },
             body = '{"error":"request_header_fields_too_large"}' }
  end
  if not ok or response_headers == nil or response_headers["x-verifier-reason"] == nil then
    return nil -- no answer of the verifier's (connection failure, timeout, Envoy's own 503)
  end
  return { status = response_headers[":status"], headers = response_headers, body = body or "" }
end

-- This filter's own 503: no answer of the verifier's (no reason), never to be stored by a client.
local function unavailable(handle)
  handle:respond({ [":status"] = "503", ["retry-after"] = "1", ["cache-control"] = "no-store" }, "")
end

local function relay_refusal(handle, answer)
  local out = { [":status"] = answer.status, ["cache-control"] = "no-store" }
  for _, name in ipairs(CLIENT_HEADERS) do
    local value = answer.headers[name]
    if value ~= nil then
      out[name] = value
    end
  end
  handle:respond(out, answer.body)
end

local function apply_allow(handle, headers, answer)
  local remove = answer.headers["x-envoy-auth-headers-to-remove"]
  if remove ~= nil then
    for name in string.lower(remove):gmatch("[^,%s]+") do
      headers:remove(name)
    end
  end
  for name, value in pairs(answer.headers) do
    if name:sub(1, #IDENTITY_PREFIX) == IDENTITY_PREFIX then
      headers:replace(name, value)
    end
  end
  local to_client = nil
  for _, name in ipairs(CLIENT_HEADERS_ON_ALLOW) do
    local value = answer.headers[name]
    if value ~= nil then
      to_client = to_client or {}
      to_client[name] = value
    end
  end
  if to_client ~= nil then
    local meta = handle:streamInfo():dynamicMetadata()
    for name, value in pairs(to_client) do
      meta:set("edge.verifier", name, value)
    end
  end
end

local function on_request(handle)
  local headers = handle:headers()
  for _, name in ipairs(CREDENTIAL_HEADERS) do
    if headers:getNumValues(name) > 1 then -- which one would the upstream read? refuse, as the verifier does
      handle:respond({ [":status"] = "400", ["x-verifier-reason"] = "invalid_request",
                       ["cache-control"] = "no-store" }, "")
      return
    end
  end
  local method = headers:get(":method") or ""
  local path = headers:get(":path") or ""
  local host = headers:get(":authority") or ""
  local proto = headers:get("x-forwarded-proto") or "http"
  local key = table.concat({
    method, proto, host, path,
    headers:get("authorization") or "", headers:get("dpop") or "", headers:get("x-webauthn-assertion") or "",
  }, "\0")
  local now = os.time()
  local answer = cache[key]
  if answer ~= nil and answer.expires <= now then
    drop(key)
    answer = nil
  end
  if answer == nil then
    answer = ask(handle, headers, method, path, host, proto)
    if answer == nil then
      unavailable(handle)
      return
    end
    local ttl = ttl_of(answer.headers["cache-control"])
    if ttl ~= nil and not per_request(answer) then
      store(key, answer, ttl, now)
    end
    headers = handle:headers() -- a header map taken before httpCall yielded is stale: take it again
  end
  if answer.status ~= "200" then
    relay_refusal(handle, answer)
    return
  end
  apply_allow(handle, headers, answer)
end

-- Envoy's Lua filter answers a script error by logging it and letting the request go on to the upstream:
-- unchecked, and without the identity an allow would set. Any error here is a 503 instead (fail closed).
function envoy_on_request(handle)
  local ok, err = pcall(on_request, handle)
  if not ok then
    handle:logErr("verifier-reuse.lua: " .. tostring(err))
    unavailable(handle)
  end
end

function envoy_on_response(handle)
  local meta = handle:streamInfo():dynamicMetadata():get("edge.verifier")
  if meta ~= nil then
    for name, value in pairs(meta) do
      handle:headers():replace(name, value)
    end
  end
end
