-- Kong plugin: asks the edge verifier's HTTP forward-auth door whether a
-- request may pass, and hands the identity it proves to the upstream.
--
-- The plugin translates and decides nothing itself: the verifier's 2xx is an
-- allow, any other answer is relayed to the client as it came (status,
-- headers, body). A verifier that cannot be reached, or answers too late,
-- fails closed with 503 unless `fail_open` is set.
--
-- Uses only PDK functions present on every Kong 3.x, plus ngx.socket.tcp, so
-- it needs neither lua-resty-http nor a Kong newer than 3.0.

local http1 = require "kong.plugins.edge-verifier.http1"
local decision_cache = require "kong.plugins.edge-verifier.decision_cache"

local kong = kong
local ngx = ngx
local type = type
local pairs = pairs
local pcall = pcall
local concat = table.concat
local lower = string.lower
local sub = string.sub

local EdgeVerifierHandler = {
  VERSION = "0.1.0",
  -- after the bundled authenticators (jwt 1450, oauth2 1400, key-auth 1250,
  -- openid-connect 1050) and before what keys on the consumer we name (acl
  -- 950, rate-limiting 910)
  PRIORITY = 990,
}

local USER_AGENT = "kong-edge-verifier/" .. EdgeVerifierHandler.VERSION

-- Request headers that carry a credential or proof; forwarded to the verifier
-- byte for byte, and never changed on the way to the upstream.
local CREDENTIAL_HEADERS = { "Authorization", "DPoP", "X-WebAuthn-Assertion" }
local CERT_THUMBPRINT_HEADER = "x-client-cert-thumbprint"

-- Headers a single proof or challenge makes single-use: such requests are
-- never answered from the decision cache (a replayed DPoP proof must reach
-- the verifier's replay check).
local SINGLE_USE_HEADERS = { "dpop", "x-webauthn-assertion" }

-- Request headers read (the PDK's ceiling); a request with more is refused,
-- since every one must be checked for spoofed identity.
local MAX_REQUEST_HEADERS = 1000

-- Identity the upstream may trust only because this plugin set it.
local IDENTITY_PREFIX = "x-authenticated-"
local CONSUMER_HEADERS = {
  "X-Consumer-ID", "X-Consumer-Custom-ID", "X-Consumer-Username",
  "X-Credential-Identifier", "X-Anonymous-Consumer",
}

-- Verifier answer headers that describe the connection, not the answer (RFC
-- 9110 section 7.6.1), or that nginx computes itself on the way out.
local NOT_RELAYED = {
  ["connection"] = true, ["keep-alive"] = true, ["proxy-connection"] = true,
  ["te"] = true, ["trailer"] = true, ["transfer-encoding"] = true,
  ["upgrade"] = true, ["content-length"] = true, ["date"] = true,
  ["server"] = true,
}

-- Headers of an allow answer meant for the client, not the upstream: a fresh
-- DPoP nonce (RFC 9449 section 8.2) and rate-limit state.
local function is_client_header(lname)
  return lname == "dpop-nonce"
      or sub(lname, 1, 9) == "ratelimit"
      or sub(lname, 1, 12) == "x-ratelimit-"
end

-- parsed verifier URLs, per worker (a URL's parts never change)
local targets = {}


local function target_for(url)
  local t = targets[url]
  if t then
    return t
  end
  local err
  t, err = http1.parse_url(url)
  if not t then
    return nil, err
  end
  targets[url] = t
  return t
end


local function header_values(v)
  if type(v) == "table" then
    return v
  end
  return { v }
end


local function joined(v)
  if type(v) == "table" then
    return concat(v, ", ")
  end
  return v
end


-- The client's certificate thumbprint (base64url SHA-256 of the DER, RFC 8705
-- section 3.1) when this nginx terminated mutual TLS itself; nil otherwise.
-- The second result says whether the connection carried a certificate.
local function tls_thumbprint()
  local ok, pem = pcall(function() return ngx.var.ssl_client_raw_cert end)
  if not ok or not pem or pem == "" then
    return nil, false
  end
  local has_sha, sha256 = pcall(require, "resty.sha256")
  if not has_sha then
    kong.log.warn("client certificate not forwarded: resty.sha256 is missing")
    return nil, true
  end
  local b64 = pem:match("%-%-%-%-%-BEGIN CERTIFICATE%-%-%-%-%-(.-)%-%-%-%-%-END")
  local der = b64 and ngx.decode_base64((b64:gsub("%s", "")))
  if not der then
    return nil, true
  end
  local h = sha256:new()
  h:update(der)
  return (ngx.encode_base64(h:final(), true):gsub("%+", "-"):gsub("/", "_")), true
end


-- Clears identity headers only this plugin may set: a client sending them is
-- trying to pass as someone.
local function strip_spoofed(headers)
  local clear = kong.service.request.clear_header
  for name in pairs(headers) do
    if sub(lower(name), 1, #IDENTITY_PREFIX) == IDENTITY_PREFIX then
      clear(name)
    end
  end
end


-- The request the verifier sees: the credential headers untouched plus the
-- original method and URI, Traefik forward-auth style.
local function build_request(conf, headers)
  local method = kong.request.get_method()
  local scheme = kong.request.get_scheme()
  local host = kong.request.get_host()
  local port = kong.request.get_port()
  local path = kong.request.get_path()
  local query = kong.request.get_raw_query()
  local uri = path
  if query and query ~= "" then
    uri = path .. "?" .. query
  end

  local out = {
    { "User-Agent", USER_AGENT },
    { "X-Forwarded-Method", method },
    { "X-Forwarded-Proto", scheme },
    { "X-Forwarded-Host", host },
    { "X-Forwarded-Port", tostring(port) },
    { "X-Forwarded-Uri", uri },
    { "X-Forwarded-For", kong.client.get_ip() },
  }
  local key_parts = { conf.url, method, scheme, host, tostring(port), uri }
  local cacheable = true

  for i = 1, #CREDENTIAL_HEADERS do
    local name = CREDENTIAL_HEADERS[i]
    local v = headers[lower(name)]
    if v ~= nil then
      local values = header_values(v)
      for j = 1, #values do
        out[#out + 1] = { name, values[j] }
      end
      key_parts[#key_parts + 1] = name .. ":" .. concat(values, "\0")
    end
  end

  -- A thumbprint header from the client is a claim anyone can make; it is
  -- forwarded only when a trusted proxy in front is known to set it.
  local thumbprint, had_cert = tls_thumbprint()
  if not had_cert and conf.trust_client_cert_header then
    thumbprint = joined(headers[CERT_THUMBPRINT_HEADER])
  end
  if thumbprint then
    out[#out + 1] = { "X-Client-Cert-Thumbprint", thumbprint }
    key_parts[#key_parts + 1] = "cnf:" .. thumbprint
  end

  for i = 1, #SINGLE_USE_HEADERS do
    if headers[SINGLE_USE_HEADERS[i]] ~= nil then
      cacheable = false
    end
  end

  return out, cacheable and key_parts or nil
end


-- Turns the verifier's answer into what this plugin acts on; the result is
-- immutable once built, so it can be reused from the cache.
local function to_decision(res)
  if res.status >= 200 and res.status < 300 then
    local identity, to_client = {}, {}
    local list = res.header_list
    for i = 1, #list do
      local name, value = list[i][1], list[i][2]
      local lname = lower(name)
      if sub(lname, 1, #IDENTITY_PREFIX) == IDENTITY_PREFIX then
        identity[#identity + 1] = { name, value }
      elseif is_client_header(lname) then
        to_client[#to_client + 1] = { name, value }
      end
    end
    return {
      allow = true,
      identity = identity,
      to_client = to_client,
      userid = joined(res.headers["x-authenticated-userid"]),
      consumer_id = joined(res.headers["x-kong-consumer-id"]),
      consumer_username = joined(res.headers["x-kong-consumer-username"]),
    }
  end

  -- Relayed as it came, under the spelling the verifier used; repeated
  -- headers stay repeated.
  local headers, spelling = {}, {}
  local list = res.header_list
  for i = 1, #list do
    local name, value = list[i][1], list[i][2]
    local lname = lower(name)
    if not NOT_RELAYED[lname] then
      local key = spelling[lname]
      if not key then
        spelling[lname] = name
        headers[name] = value
      elseif lname == "www-authenticate" then
        -- nginx before 1.23 (Kong 3.0 to 3.5's OpenResty) keeps one
        -- WWW-Authenticate and drops the rest; one field listing every
        -- challenge means the same (RFC 9110 section 11.6.1)
        headers[key] = headers[key] .. ", " .. value
      else
        local prev = headers[key]
        if type(prev) == "table" then
          prev[#prev + 1] = value
        else
          headers[key] = { prev, value }
        end
      end
    end
  end
  return { allow = false, status = res.status, headers = headers, body = res.body }
end


-- The Kong consumer the verifier named, as an entity Kong's acl and
-- rate-limiting plugins recognise, or nil.
local function load_consumer(id, username)
  local load = kong.client.load_consumer
  if not load then
    -- no datastore behind this PDK: the verifier's word is the entity
    return { id = id or username, username = username }
  end
  local key, by_username = id, false
  if not key then
    key, by_username = username, true
  end
  local ok, consumer, err
  local cache, db = kong.cache, kong.db
  if cache and db and db.consumers then
    -- the same cache entry Kong's own authenticators fill
    ok, consumer, err = pcall(cache.get, cache, db.consumers:cache_key(key), nil,
                              load, key, by_username)
  else
    ok, consumer, err = pcall(load, key, by_username)
  end
  if not ok then
    return nil, consumer
  end
  return consumer, err
end


-- With no consumer authenticated by anyone, X-Consumer-* from the client are
-- as spoofed as X-Authenticated-* would be.
local function strip_consumer_headers_if_unauthenticated()
  local get_consumer = kong.client.get_consumer
  if get_consumer and get_consumer() == nil then
    for i = 1, #CONSUMER_HEADERS do
      kong.service.request.clear_header(CONSUMER_HEADERS[i])
    end
  end
end


-- Entity fields may be nil or, from some DAO calls, ngx.null.
local function set_or_clear(name, value)
  if value == nil or value == ngx.null then
    return kong.service.request.clear_header(name)
  end
  return kong.service.request.set_header(name, value)
end


local function apply_allow(decision)
  local set_header = kong.service.request.set_header
  local identity = decision.identity
  for i = 1, #identity do
    set_header(identity[i][1], identity[i][2])
  end

  local shared = kong.ctx.shared
  -- for plugins that run after this one (custom logging, say)
  shared.edge_verifier_userid = decision.userid

  if #decision.to_client > 0 then
    kong.ctx.plugin.to_client = decision.to_client
  end

  local consumer
  if decision.consumer_id or decision.consumer_username then
    local err
    consumer, err = load_consumer(decision.consumer_id, decision.consumer_username)
    if err then
      kong.log.err("loading consumer named by the verifier: ", err)
      return kong.response.error(500, "An unexpected error occurred")
    end
    if not consumer then
      kong.log.warn("verifier named consumer '",
                    decision.consumer_id or decision.consumer_username,
                    "', which Kong does not know; continuing without one")
    end
  end

  local get_consumer = kong.client.get_consumer
  local earlier = get_consumer and get_consumer()
  -- authenticate() replaces what an earlier authenticator set; a verifier
  -- that names no consumer leaves that consumer in place
  if consumer or (decision.userid and not earlier) then
    local credential = decision.userid and {
      id = decision.userid,
      consumer_id = consumer and consumer.id or nil,
    } or nil
    kong.client.authenticate(consumer, credential)
  end

  if consumer then
    -- the upstream headers every Kong authenticator sets
    set_or_clear("X-Consumer-ID", consumer.id)
    set_or_clear("X-Consumer-Custom-ID", consumer.custom_id)
    set_or_clear("X-Consumer-Username", consumer.username)
    set_or_clear("X-Credential-Identifier", decision.userid)
    kong.service.request.clear_header("X-Anonymous-Consumer")
  end

  strip_consumer_headers_if_unauthenticated()
end


function EdgeVerifierHandler:access(conf)
  local headers, herr = kong.request.get_headers(MAX_REQUEST_HEADERS)
  if herr == "truncated" then
    -- a spoofed identity header past the limit could not be seen to be cleared
    return kong.response.exit(400, { message = "Too many request headers" })
  end
  strip_spoofed(headers)

  local target, perr = target_for(conf.url)
  if not target then
    kong.log.err("bad verifier url: ", perr)
    return kong.response.error(500, "An unexpected error occurred")
  end

  local verifier_headers, key_parts = build_request(conf, headers)

  local cache = key_parts and decision_cache.for_conf(conf)
  local key, decision
  if cache then
    key = decision_cache.key(key_parts)
    decision = decision_cache.get(cache, key)
  end

  if not decision then
    local res, err = http1.request(target, "GET", verifier_headers, {
      timeout = conf.timeout,
      keepalive_timeout = conf.keepalive_timeout,
    })
    if not res then
      if conf.fail_open then
        kong.log.warn("verifier unavailable (", err, "); fail_open lets the request pass")
        strip_consumer_headers_if_unauthenticated()
        return
      end
      kong.log.err("verifier unavailable: ", err)
      return kong.response.error(503, "Authorization service unavailable")
    end
    decision = to_decision(res)
    if cache then
      local ttl = decision_cache.ttl(res.headers["cache-control"])
      if ttl then
        decision_cache.set(cache, key, decision, ttl)
      end
    end
  end

  if not decision.allow then
    return kong.response.exit(decision.status, decision.body, decision.headers)
  end

  return apply_allow(decision)
end


function EdgeVerifierHandler:header_filter(conf) -- luacheck: ignore 212
  local to_client = kong.ctx.plugin.to_client
  if not to_client then
    return
  end
  for i = 1, #to_client do
    kong.response.set_header(to_client[i][1], to_client[i][2])
  end
end


return EdgeVerifierHandler
