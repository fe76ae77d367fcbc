-- nginx + Debian's Lua module (libnginx-mod-http-lua): asks the edge verifier's forward-auth door whether a
-- request may pass, and reuses its answer for exactly as long as the verifier allowed (RFC 9111
-- `Cache-Control: max-age`), from a bounded lua_shared_dict shared by every worker.
-- Loaded by deploy/nginx/nginx-lua.conf.template (`init_by_lua_block`, then `access_by_lua_block`).
--
-- Why: the same job as nginx.conf.template's auth_request + proxy_cache, for less CPU per reused answer
-- (no cache file, no md5 of the key, no parsing of a stored HTTP head; issue #23, docs/BENCHMARKS.md).
--
-- Contract with the verifier (the same as deploy/envoy/verifier-reuse.lua's and the Kong plugin's):
--  * 2xx with X-Verifier-Reason is an allow: its X-Authenticated-* headers go to the upstream (the
--    template's more_clear_input_headers removed every client copy first); nothing else of the answer
--    does (X-Kong-Consumer-* is for the Kong plugin only). Its DPoP-Nonce (a rotated server nonce, RFC 9449
--    section 9) and RateLimit-* go to the client with the upstream's answer (set on the response before
--    the request is proxied; nothing per request when there are none); such an answer is about this
--    request alone and never stored;
--  * anything else with X-Verifier-Reason is a refusal relayed to the client: status, challenge, reason,
--    body, with `Cache-Control: no-store` (the verifier's Cache-Control is meant for this cache);
--  * a 431 (the request's header block past what the verifier reads; it has no reason) is a 431;
--  * no answer of the verifier's (unreachable, timeout, nginx's own 502/504): 503, fail closed;
--  * `Cache-Control: private, max-age=N` may be reused for N seconds at most (and MAX_TTL), `no-store`
--    never. DPoP, WebAuthn, rate-limited and certificate-bound answers are no-store (the verifier decides);
--    on top of that a request carrying a DPoP or X-WebAuthn-Assertion header never touches the cache.
--
-- The key is $verifier_reuse_key, built by the template's map: everything the answer depends on (method,
-- scheme, host as nginx chose the server, port, the raw request target, Authorization), or "" for a request
-- with DPoP or X-WebAuthn-Assertion. The shared dict holds the key itself (no hash): a lookup is exact.

local M = {}

local MAX_TTL = 300 -- seconds; a ceiling on any reuse, whatever the verifier says
local MAX_KEY_BYTES = 16384 -- a longer key (a huge credential) is asked about every time, never stored
local IDENTITY_PREFIX = "x-authenticated-"
-- refusal headers relayed to the client (besides the reason); the rest of the answer stays here
local CLIENT_HEADERS = {
  ["www-authenticate"] = true, ["dpop-nonce"] = true, ["retry-after"] = true, ["content-type"] = true,
  ["ratelimit"] = true, ["ratelimit-policy"] = true, ["ratelimit-limit"] = true,
  ["ratelimit-remaining"] = true, ["ratelimit-reset"] = true,
}
-- allow headers meant for the client, not the upstream (the same names as deploy/envoy/verifier-reuse.lua's);
-- an answer with any of them, allow or refusal, is never stored
local CLIENT_HEADERS_ON_ALLOW = {
  ["dpop-nonce"] = true, ["ratelimit"] = true, ["ratelimit-policy"] = true, ["ratelimit-limit"] = true,
  ["ratelimit-remaining"] = true, ["ratelimit-reset"] = true,
}
-- answers a worker keeps decoded in front of the shared dict, each with the dict entry's own expiry: at
-- most this many, and this many bytes of keys and stored answers; a full table starts over (the dict still
-- holds the answers)
local MAX_LOCAL = 1000
local MAX_LOCAL_BYTES = 4 * 1024 * 1024

local ngx = ngx
local var = ngx.var
local req = ngx.req
local concat = table.concat
local find, sub, lower, match, gmatch = string.find, string.sub, string.lower, string.match, string.gmatch

local answers = ngx.shared.verifier_answers
if answers == nil then
  error("verifier-reuse.lua needs `lua_shared_dict verifier_answers <size>;` in the http block")
end

local here, here_count, here_bytes = {}, 0, 0

local function ttl_of(cache_control)
  if type(cache_control) ~= "string" then -- absent, or sent twice: not reusable
    return nil
  end
  local max_age
  for directive in gmatch(lower(cache_control), "[^,]+") do
    directive = match(directive, "^%s*(.-)%s*$")
    if directive == "no-store" or directive == "no-cache" then
      return nil
    end
    local n = match(directive, "^max%-age%s*=%s*(%d+)$")
    if n then
      max_age = tonumber(n)
    end
  end
  if not max_age or max_age <= 0 then
    return nil
  end
  return math.min(max_age, MAX_TTL)
end

-- The stored form: "<expires>\n<status>\n" then "name\tvalue\n" per header, "\n", the body; expires in
-- epoch seconds (ngx.now(), millisecond resolution).
local function encode(expires, status, headers, body)
  local out = { string.format("%.3f", expires), "\n", tostring(status), "\n" }
  for i = 1, #headers, 2 do
    out[#out + 1] = headers[i] .. "\t" .. headers[i + 1] .. "\n"
  end
  out[#out + 1] = "\n"
  out[#out + 1] = body
  return concat(out)
end

local function decode(packed)
  local eol = find(packed, "\n", 1, true)
  local expires = tonumber(sub(packed, 1, eol - 1))
  local at = eol + 1
  eol = find(packed, "\n", at, true)
  local answer = { expires = expires, status = tonumber(sub(packed, at, eol - 1)), headers = {} }
  at = eol + 1
  while true do
    eol = find(packed, "\n", at, true)
    if eol == at then
      break
    end
    local tab = find(packed, "\t", at, true)
    answer.headers[#answer.headers + 1] = sub(packed, at, tab - 1)
    answer.headers[#answer.headers + 1] = sub(packed, tab + 1, eol - 1)
    at = eol + 1
  end
  answer.body = sub(packed, eol + 1)
  return answer
end

-- `size`: the stored answer's length
local function remember(key, answer, size)
  if here[key] == nil then
    if here_count >= MAX_LOCAL or here_bytes >= MAX_LOCAL_BYTES then
      here, here_count, here_bytes = {}, 0, 0
    end
    here_count, here_bytes = here_count + 1, here_bytes + #key + size
  end
  here[key] = answer
end

-- A fresh answer for `key`: this worker's copy, else the shared dict's; nil when there is none.
local function lookup(key, now)
  local answer = here[key]
  if answer ~= nil then
    if answer.expires > now then
      return answer
    end
    here[key], here_count = nil, here_count - 1
  end
  local packed = answers:get(key)
  if packed == nil then
    return nil
  end
  answer = decode(packed)
  if answer.expires <= now then -- the dict's own expiry is the same instant; never trust one past it
    return nil
  end
  remember(key, answer, #packed)
  return answer
end

-- The verifier's answer (status, the headers this file uses as a flat name/value list, body, ttl),
-- or nil when it never answered. An allow's headers for the client are in `to_client` (name -> value).
local function ask()
  -- The subrequest rebuilds its headers from the request's, and takes its $host from Host: for an
  -- absolute-form target (`GET http://admin.example.test/ HTTP/1.1`, `Host: api.example.test`) it would
  -- tell the verifier another host than the one nginx chose the server by. Host := $host first.
  req.set_header("Host", var.host)
  local res = ngx.location.capture("/_auth")
  local reason = res.header["X-Verifier-Reason"] or res.header["x-verifier-reason"]
  if res.status == 431 then
    -- the verifier's refusal of the request's header block (past its 32 KiB or 128 fields), answered before
    -- any reason: a request-header refusal (RFC 6585), not an outage; never stored
    return { status = 431, headers = { "content-type", "application/json" },
             body = '{"error":"request_header_fields_too_large"}' }, nil
  end
  if type(reason) ~= "string" then
    return nil -- no answer of the verifier's (connection failure, timeout, nginx's own 502/504)
  end
  local allowed = res.status >= 200 and res.status < 300
  local headers, cache_control, to_client, per_request = {}, nil, nil, false
  for name, value in pairs(res.header) do
    name = lower(name)
    per_request = per_request or CLIENT_HEADERS_ON_ALLOW[name] == true
    if name == "cache-control" then
      cache_control = value
    elseif allowed and CLIENT_HEADERS_ON_ALLOW[name] then
      to_client = to_client or {}
      to_client[name] = value
    elseif name == "x-verifier-reason" or (allowed and sub(name, 1, #IDENTITY_PREFIX) == IDENTITY_PREFIX)
        or (not allowed and CLIENT_HEADERS[name]) then
      if type(value) == "table" then
        for _, v in ipairs(value) do
          headers[#headers + 1], headers[#headers + 2] = name, v
        end
      else
        headers[#headers + 1], headers[#headers + 2] = name, value
      end
    end
  end
  local body = allowed and "" or (res.body or "")
  -- a nonce or rate-limit state is about this request alone: never replayed to another one
  local ttl = not per_request and ttl_of(cache_control) or nil
  return { status = res.status, headers = headers, body = body, to_client = to_client }, ttl
end

-- Ends the request with ngx.status, the headers set so far and `body`, never to be stored by a client.
local function respond(body)
  ngx.header["Cache-Control"] = "no-store"
  ngx.header["Content-Length"] = #body
  ngx.send_headers()
  ngx.print(body)
  return ngx.exit(ngx.HTTP_OK)
end

local function apply(answer)
  local headers = answer.headers
  if answer.status >= 200 and answer.status < 300 then
    for i = 1, #headers, 2 do
      if headers[i] ~= "x-verifier-reason" then
        req.set_header(headers[i], headers[i + 1])
      end
    end
    local to_client = answer.to_client -- a fresh answer's only: a stored one has none
    if to_client ~= nil then
      -- on the response now: nginx adds the upstream's headers to these, it does not drop them
      for name, value in pairs(to_client) do
        ngx.header[name] = value
      end
    end
    return
  end
  ngx.status = answer.status
  for i = 1, #headers, 2 do
    local name, value = headers[i], headers[i + 1]
    local had = ngx.header[name]
    if had == nil then
      ngx.header[name] = value
    elseif type(had) == "table" then
      had[#had + 1] = value
      ngx.header[name] = had
    else
      ngx.header[name] = { had, value }
    end
  end
  return respond(answer.body)
end

function M.access()
  if ngx.is_subrequest then
    return -- the /_auth subrequest itself
  end
  local key = var.verifier_reuse_key -- "" with DPoP or X-WebAuthn-Assertion: never reused
  if key == "" or #key > MAX_KEY_BYTES then
    key = nil
  end
  local now = ngx.now()
  if key ~= nil then
    local answer = lookup(key, now)
    if answer ~= nil then
      return apply(answer)
    end
  end
  local answer, ttl = ask()
  if answer == nil then
    ngx.status = ngx.HTTP_SERVICE_UNAVAILABLE
    ngx.header["Retry-After"] = "1"
    ngx.header["Content-Type"] = "application/json"
    return respond('{"error":"temporarily_unavailable","reason":""}')
  end
  if key ~= nil and ttl ~= nil then
    -- Fresh until ttl seconds after the question was asked (`now`, millisecond resolution): never longer
    -- than the verifier meant. The dict's own expiry is a little later; lookup() checks `expires` first.
    -- set() evicts the least recently used entries when the dict is full: the cache stays bounded.
    answer.expires = now + ttl
    local packed = encode(answer.expires, answer.status, answer.headers, answer.body)
    if answers:set(key, packed, ttl) then
      remember(key, answer, #packed)
    end
  end
  return apply(answer)
end

return M
