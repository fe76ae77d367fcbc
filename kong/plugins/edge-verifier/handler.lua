-- Kong plugin: asks the edge verifier's HTTP forward-auth door whether a
-- request may pass, and hands the identity it proves to the upstream.
--
-- The plugin translates and decides nothing itself: the verifier's 2xx is an
-- allow, whose X-Authenticated-* headers (and nothing else) are set upstream;
-- any other answer up to 599 is relayed to the client as it came (status,
-- headers, body), one past it is a 503. A verifier that cannot be reached,
-- or answers too late, fails closed with 503; `fail_open` passes only when the connection failed
-- (never after a timeout: the credential may have been under check).
--
-- Uses only PDK functions present on every Kong 3.x, plus ngx.socket.tcp and
-- OpenResty's ngx.req / ngx.var (what those PDK functions call), so it needs
-- neither lua-resty-http nor a Kong newer than 3.0.

local http1 = require "kong.plugins.edge-verifier.http1"
local decision_cache = require "kong.plugins.edge-verifier.decision_cache"
local consumers = require "kong.plugins.edge-verifier.consumer"

local kong = kong
local ngx = ngx
local type = type
local next = next
local pcall = pcall
local concat = table.concat
local lower = string.lower
local sub = string.sub
local find = string.find
local gsub = string.gsub
local byte = string.byte
local setmetatable = setmetatable
local tostring = tostring
-- Raw ngx.* calls where the PDK wrapper only adds checks this plugin already
-- guarantees (phase, argument types): on a reused answer they are most of the
-- request's work. Kong's own kong.request / kong.service.request end in these.
local var = ngx.var
local get_headers = ngx.req.get_headers
local get_method = ngx.req.get_method
local set_header = ngx.req.set_header
local clear_header = ngx.req.clear_header

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

-- Request header lines read (the PDK's ceiling); a request with this many or
-- more is refused, since every one must be checked for spoofed identity. The
-- Python plugin, which cannot see truncation over the plugin server's RPC,
-- refuses at this many lines: so does this one (both refuse the same requests).
local MAX_REQUEST_HEADERS = 1000

-- Identity the upstream may trust only because this plugin set it.
local IDENTITY_PREFIX = "x-authenticated-"
local IDENTITY_PREFIX_LEN = #IDENTITY_PREFIX
local CONSUMER_HEADERS = consumers.HEADERS
local IS_CONSUMER_HEADER = {}
for i = 1, #CONSUMER_HEADERS do
  IS_CONSUMER_HEADER[lower(CONSUMER_HEADERS[i])] = true
end
-- Method overrides an application framework may honour: the verifier judged
-- the request's real method, so the upstream must not be told another one.
-- X-Forwarded-Method is what this plugin tells the verifier; Kong never sets
-- it for the upstream, so a client's would reach it (and a second verifier
-- hop behind it) as if it were what was checked.
local IS_METHOD_OVERRIDE = {
  ["x-http-method-override"] = true, ["x-http-method"] = true,
  ["x-method-override"] = true, ["x-forwarded-method"] = true,
}
-- Kong sets X-Forwarded-For/-Proto/-Host/-Port/-Path/-Prefix for the upstream
-- itself (overwritten from its own state, or kept from trusted_ips): those are
-- Kong's. An underscore spelling (X_Forwarded_Host) is never Kong's, and
-- CGI-style frameworks read it as the dashed one: cleared.
local FORWARDED_PREFIX = "x-forwarded-"
local FORWARDED_PREFIX_LEN = #FORWARDED_PREFIX
-- The request target in a header: applications behind IIS's ARR (X-Original-URL),
-- Symfony and Zend Framework before CVE-2018-14773's fixes (X-Original-URL,
-- X-Rewrite-URL) route by it instead of the request line the verifier judged;
-- X-Forwarded-Uri is what this plugin tells the verifier. Kong overwrites its
-- other X-Forwarded-* itself.
local IS_TARGET_HEADER = { ["x-rewrite-url"] = true, ["x-forwarded-uri"] = true }
local ORIGINAL_PREFIX = "x-original-"
local ORIGINAL_PREFIX_LEN = #ORIGINAL_PREFIX
-- Set by acl (priority 950, after this plugin) for the consumer it allowed;
-- from a client it is a claim to groups nobody checked.
local CONSUMER_GROUPS_HEADER = "x-consumer-groups"
-- How the verifier names the consumer to this plugin; from a client, a name
-- nobody checked.
local NAMING_PREFIX = "x-kong-consumer-"
local NAMING_PREFIX_LEN = #NAMING_PREFIX
-- first bytes of the header names the scan below looks at
local BYTE_X, BYTE_UPPER_X = byte("x"), byte("X")
local BYTE_A, BYTE_UPPER_A = byte("a"), byte("A")
local BYTE_D, BYTE_UPPER_D = byte("d"), byte("D")
local BYTE_LBRACKET = byte("[")

-- Verifier answer headers that describe the connection, not the answer (RFC
-- 9110 section 7.6.1), or that nginx computes itself on the way out.
local NOT_RELAYED = {
  ["connection"] = true, ["keep-alive"] = true, ["proxy-connection"] = true,
  ["te"] = true, ["trailer"] = true, ["transfer-encoding"] = true,
  ["upgrade"] = true, ["content-length"] = true, ["date"] = true,
  ["server"] = true,
  -- for deploy/nginx's auth cache only: an nginx cache in front of Kong would
  -- honour it over `Cache-Control: private`
  ["x-accel-expires"] = true,
  -- how long this plugin may reuse the answer, never the client: a browser
  -- keeping a reusable 401 for its max-age would refuse the user's next token
  -- (a client's cache is keyed by the URL, not Authorization); every refusal
  -- goes out with `Cache-Control: no-store` instead, as nginx's
  ["cache-control"] = true,
}

-- What goes with an answer this plugin gives itself, with no verifier decision to relay (a request it
-- refuses before asking, an unknown consumer, its own failure): never to be kept by a browser or a shared
-- cache in front of Kong, since a retry may be answered otherwise. Its 503 (the verifier unreachable, too
-- slow or unreadable) also says when to retry: `Retry-After: 1`, as nginx's and Envoy's shipped
-- configurations answer theirs. Never changed (Kong's exit and error only read them).
local OWN_ANSWER_HEADERS = { ["Cache-Control"] = "no-store" }
local UNAVAILABLE_HEADERS = { ["Cache-Control"] = "no-store", ["Retry-After"] = "1" }

-- Headers of an allow answer meant for the client, not the upstream: a fresh
-- DPoP nonce (RFC 9449 section 8.2) and rate-limit state. An answer with any
-- of them (allow or refusal) is about one request: never stored for another.
local function is_client_header(lname)
  return lname == "dpop-nonce"
      or sub(lname, 1, 9) == "ratelimit"
      or sub(lname, 1, 12) == "x-ratelimit-"
end

-- What never changes for one plugin configuration, computed on its first
-- request: the parsed verifier URL and the decision cache. Weak keys, so a
-- replaced configuration takes its entry (and its cache) with it.
local per_conf = setmetatable({}, { __mode = "k" })


local function constants_for(conf)
  local c = per_conf[conf]
  if c then
    return c
  end
  local target, err = http1.parse_url(conf.url)
  c = {
    target = target,
    target_err = err,
    cache = decision_cache.for_conf(conf),
    request_opts = {
      timeout = conf.timeout,
      keepalive_timeout = conf.keepalive_timeout,
      reconnect_backoff = conf.reconnect_backoff,
      reconnect_backoff_max = conf.reconnect_backoff_max,
    },
  }
  per_conf[conf] = c
  return c
end


local function joined(v)
  if type(v) == "table" then
    return concat(v, ", ")
  end
  return v
end


-- Whether `s` is well-formed UTF-8 (RFC 3629: no overlong form, no surrogate,
-- nothing past U+10FFFF), as Python's decoder reads it.
local function is_utf8(s)
  if not find(s, "[\128-\255]") then
    return true -- ASCII: what nearly every request is
  end
  local i, n = 1, #s
  while i <= n do
    local c = byte(s, i)
    local len, lo, hi = 1, 0x80, 0xBF
    if c < 0x80 then
      len = 0
    elseif c >= 0xC2 and c <= 0xDF then
      len = 1
    elseif c >= 0xE0 and c <= 0xEF then
      len = 2
      if c == 0xE0 then lo = 0xA0 elseif c == 0xED then hi = 0x9F end
    elseif c >= 0xF0 and c <= 0xF4 then
      len = 3
      if c == 0xF0 then lo = 0x90 elseif c == 0xF4 then hi = 0x8F end
    else
      return false
    end
    for j = 1, len do
      local b = byte(s, i + j)
      if not b or b < lo or b > hi then
        return false
      end
      lo, hi = 0x80, 0xBF
    end
    i = i + len + 1
  end
  return true
end


-- What of the request the verifier would be told that is not UTF-8, or nil.
-- The Python plugin cannot tell the verifier such bytes (a gRPC string is
-- UTF-8) and refuses the request (400): so does this one, with its words, so
-- both plugins refuse the same requests. The upstream would get the raw bytes,
-- which the verifier never judged as such.
local function not_utf8(host, headers, uri)
  if not is_utf8(host) then
    return "the host"
  end
  for i = 1, #CREDENTIAL_HEADERS do
    local name = lower(CREDENTIAL_HEADERS[i])
    local v = headers[name]
    if v ~= nil and not is_utf8(joined(v)) then
      return "the " .. name .. " header"
    end
  end
  if not is_utf8(uri) then
    return "the request target"
  end
  return nil
end


-- ngx.var.ssl_client_raw_cert, which a build without the SSL module may not
-- know; a named function so the pcall below allocates no closure.
local function client_raw_cert()
  return ngx.var.ssl_client_raw_cert
end


-- The client's certificate thumbprint (base64url SHA-256 of the DER, RFC 8705
-- section 3.1) when this nginx terminated mutual TLS itself; nil otherwise.
-- The second result says whether the connection carried a certificate.
local function tls_thumbprint()
  local ok, pem = pcall(client_raw_cert)
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


-- One request header (the PDK's get_headers: names lower-cased, repeated
-- headers as arrays), folded into what scan_headers returns. Clears identity
-- headers only this plugin may set, since a client sending them is trying to
-- pass as someone, X-Consumer-Groups, X-Kong-Consumer-*, and method overrides.
-- Names are told apart by their first byte before any string is built; a
-- lookup of an absent name in the PDK's table would go through its
-- normalising __index instead.
local function scan_header(name, value, authorization, single_use, consumer_sent, thumbprint)
  local b = byte(name, 1)
  if b == BYTE_X or b == BYTE_UPPER_X then
    local lname = lower(name)
    -- `x_authenticated_roles` is X-Authenticated-Roles to CGI-style
    -- frameworks (nginx drops such names unless underscores_in_headers is on)
    local dashed = gsub(lname, "_", "-")
    -- (an underscore spelling of a consumer or X-Forwarded-* header is never
    -- Kong's own: cleared whoever authenticated the consumer, whoever is trusted)
    if sub(dashed, 1, IDENTITY_PREFIX_LEN) == IDENTITY_PREFIX
        or IS_METHOD_OVERRIDE[dashed] or dashed == CONSUMER_GROUPS_HEADER
        or IS_TARGET_HEADER[dashed] or sub(dashed, 1, ORIGINAL_PREFIX_LEN) == ORIGINAL_PREFIX
        or sub(dashed, 1, NAMING_PREFIX_LEN) == NAMING_PREFIX
        or (dashed ~= lname and (IS_CONSUMER_HEADER[dashed]
          or sub(dashed, 1, FORWARDED_PREFIX_LEN) == FORWARDED_PREFIX)) then
      clear_header(name)
    elseif IS_CONSUMER_HEADER[lname] then
      consumer_sent = true
    elseif lname == "x-webauthn-assertion" then
      single_use = true
    elseif lname == CERT_THUMBPRINT_HEADER then
      thumbprint = value
    end
  elseif b == BYTE_A or b == BYTE_UPPER_A then
    if lower(name) == "authorization" then
      authorization = value
    end
  elseif b == BYTE_D or b == BYTE_UPPER_D then
    if lower(name) == "dpop" then
      single_use = true
    end
  end
  return authorization, single_use, consumer_sent, thumbprint
end


-- One pass over every request header (scan_header above), returning what the
-- rest of the request needs:
--   authorization   the Authorization value(s), or nil
--   single_use      a DPoP proof or X-WebAuthn-Assertion is present: the
--                   answer must never come from the cache (a replayed proof
--                   must reach the verifier's replay check)
--   consumer_sent   the client sent X-Consumer-* / X-Credential-Identifier /
--                   X-Anonymous-Consumer (cleared unless a consumer is
--                   authenticated)
--   thumbprint      the X-Client-Cert-Thumbprint value(s), or nil
-- The first four headers are taken without a loop: LuaJIT compiles no trace
-- from a function's entry into an inner loop that has a trace of its own, so
-- with a loop here everything of the request before it (the shim or Kong's
-- runloop, access, get_headers) would stay interpreted on every request. A
-- request with more headers scans the rest in the loop (and runs as before).
local function scan_step(headers, name, value, a, s, c, t)
  a, s, c, t = scan_header(name, value, a, s, c, t)
  local next_name, next_value = next(headers, name)
  return next_name, next_value, a, s, c, t
end

local function scan_headers(headers)
  local a, s, c, t
  local name, value = next(headers)
  if name ~= nil then name, value, a, s, c, t = scan_step(headers, name, value, a, s, c, t) end
  if name ~= nil then name, value, a, s, c, t = scan_step(headers, name, value, a, s, c, t) end
  if name ~= nil then name, value, a, s, c, t = scan_step(headers, name, value, a, s, c, t) end
  if name ~= nil then name, value, a, s, c, t = scan_step(headers, name, value, a, s, c, t) end
  while name ~= nil do
    name, value, a, s, c, t = scan_step(headers, name, value, a, s, c, t)
  end
  return a, s, c, t
end


-- What the verifier is told about the request (asked only when no answer is
-- reused). Returns method, scheme, host, port, uri: the request target as the
-- client sent it (path and query, raw). Kong 3.x's router sends the upstream
-- its normalized path, escaped, and the query as sent: one of the readings the
-- verifier weighs (tests/kong/test_gateway_differential_lua.py).
-- Never kong.request.get_path(): that is Kong's one normalized reading (dot
-- segments resolved with `#` and `;` plain bytes), so `/admin/x#/../../health`
-- would be judged as /health while an upstream that drops the fragment serves
-- /admin/x; the verifier weighs every reading of the raw path itself.
-- The scheme and port the verifier is told: the ones the client used, read
-- alike -- Kong's own, the port `port_maps` maps Kong's to (`80:8000` behind a
-- Kubernetes Service, whose clients name no port), or a trusted proxy's
-- X-Forwarded-Proto/-Port (`trusted_ips`: a TLS-terminating load balancer),
-- as Kong tells the upstream. Else DPoP's htu and WebAuthn's request binding
-- name a URL no client used.
local function told_origin()
  local req = kong.request
  return req.get_forwarded_scheme(), tostring(req.get_forwarded_port())
end


-- The host the verifier is told: nginx's $host (kong.request.get_host: an
-- absolute-form request line's authority, else Host). Kong's router routes by
-- the Host header instead, and preserve_host passes that header upstream, so
-- when the two name different hosts (`GET http://api.example.test/ HTTP/1.1`
-- with `Host: admin.example.test`) both are told, comma-joined: the verifier
-- refuses a request whose host readings fall under different policies.
local function judged_host()
  local host = var.host
  local header = var.http_host
  if header == nil or header == host then
    return host
  end
  local name = lower(header)
  if byte(name, 1) ~= BYTE_LBRACKET then
    name = gsub(name, ":%d*$", "")
  else
    name = gsub(name, "%]:%d*$", "]")
  end
  name = gsub(name, "%.$", "")
  if name == host then
    return host
  end
  return host .. "," .. name
end


-- The certificate thumbprint to forward, or nil. A thumbprint header from the
-- client (`sent`) is a claim anyone can make; it is forwarded only when a
-- trusted proxy in front is known to set it. A plain-http connection carries
-- no client certificate, so only https looks for one.
local function thumbprint_for(conf, sent, scheme)
  local thumbprint, had_cert
  if scheme == "https" then
    thumbprint, had_cert = tls_thumbprint()
  end
  if not had_cert and conf.trust_client_cert_header then
    thumbprint = joined(sent)
  end
  return thumbprint
end


-- The request the verifier sees: the credential headers untouched plus the
-- original method and URI, Traefik forward-auth style. Built only when the
-- verifier is asked.
local function build_request(headers, method, scheme, host, port, uri, thumbprint)
  local out = {
    { "User-Agent", USER_AGENT },
    { "X-Forwarded-Method", method },
    { "X-Forwarded-Proto", scheme },
    { "X-Forwarded-Host", host },
    { "X-Forwarded-Port", tostring(port) },
    { "X-Forwarded-Uri", uri },
    { "X-Forwarded-For", kong.client.get_ip() },
  }
  for i = 1, #CREDENTIAL_HEADERS do
    local name = CREDENTIAL_HEADERS[i]
    local v = headers[lower(name)]
    if v ~= nil then
      -- a repeated header as one field, its values comma-joined (RFC 9110
      -- section 5.3): what the verifier reads (two proofs or credentials are
      -- then refused, never one picked), and what the Python plugin sends it
      out[#out + 1] = { name, joined(v) }
    end
  end
  if thumbprint then
    out[#out + 1] = { "X-Client-Cert-Thumbprint", thumbprint }
  end
  return out
end


-- Turns the verifier's answer into what this plugin acts on; the result is
-- immutable once built, so it can be reused from the cache.
local function to_decision(res)
  if res.status >= 200 and res.status < 300 then
    local consumer_field, consumer_value, consumer_err = consumers.named(res.headers)
    -- identity: the headers to set upstream, as two arrays; a name the
    -- verifier repeats (in any spelling) keeps its last spelling and value,
    -- as setting them one after another would
    local names, values, at, n = {}, {}, {}, 0
    local to_client = {}
    local list = res.header_list
    local size = 0 -- the answer's bytes, counted against the cache's byte bound
    for i = 1, #list do
      local name, value = list[i][1], list[i][2]
      local lname = lower(name)
      size = size + #name + #value
      if sub(lname, 1, IDENTITY_PREFIX_LEN) == IDENTITY_PREFIX then
        local j = at[lname]
        if not j then
          n = n + 1
          j = n
          at[lname] = j
        end
        names[j], values[j] = name, value
      elseif is_client_header(lname) then
        to_client[#to_client + 1] = { name, value }
      end
    end
    local userid = joined(res.headers["x-authenticated-userid"])
    if userid == "" then
      -- a client-credentials token names no user: no Kong credential with an empty id
      userid = nil
    end
    return {
      allow = true,
      per_request = #to_client > 0,
      identity_names = names,
      identity_values = values,
      identity_count = n,
      to_client = #to_client > 0 and to_client or nil,
      userid = userid,
      -- what kong.client.authenticate gets when no consumer is named; built
      -- once per answer, as Kong's authenticators pass their cached entity
      credential = userid and { id = userid } or nil,
      consumer_field = consumer_field,
      consumer_value = consumer_value,
      consumer_err = consumer_err,
      size = size,
    }
  end

  -- Relayed as it came, under the spelling the verifier used; repeated
  -- headers stay repeated; never to be stored by the client.
  local headers, spelling, per_request = { ["Cache-Control"] = "no-store" }, {}, false
  local list = res.header_list
  local size = #res.body
  for i = 1, #list do
    local name, value = list[i][1], list[i][2]
    local lname = lower(name)
    size = size + #name + #value
    per_request = per_request or is_client_header(lname)
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
  return { allow = false, per_request = per_request, status = res.status, headers = headers, body = res.body,
           size = size }
end


-- With no consumer authenticated by anyone, X-Consumer-* from the client are
-- as spoofed as X-Authenticated-* would be. `consumer_sent`: the client sent
-- at least one of them (scan_headers saw every request header).
local function strip_consumer_headers(consumer_sent)
  if consumer_sent then
    local clear = kong.service.request.clear_header
    for i = 1, #CONSUMER_HEADERS do
      clear(CONSUMER_HEADERS[i])
    end
  end
end


local function strip_consumer_headers_if_unauthenticated(consumer_sent)
  if consumer_sent and kong.client.get_consumer() == nil then
    strip_consumer_headers(consumer_sent)
  end
end


local function unexpected(...)
  kong.log.err(...)
  return kong.response.error(500, "An unexpected error occurred", OWN_ANSWER_HEADERS)
end


-- The verifier named a consumer: authenticate it, or follow
-- `consumer_not_found` when Kong does not know it.
local function authenticate_named(conf, decision, userid)
  local field, value = decision.consumer_field, decision.consumer_value
  local consumer, err = consumers.load(field, value)
  if err then
    return unexpected("loading the consumer the verifier named: ", err)
  end
  if consumer then
    local credential = userid and { id = userid, consumer_id = consumer.id } or nil
    return consumers.authenticate(consumer, credential)
  end

  if conf.consumer_not_found ~= "anonymous" then
    kong.log.info("verifier named the consumer with ", field, " '", value,
                  "', which Kong does not know: refused (consumer_not_found = refuse)")
    return kong.response.error(403, "The verified identity is not a known consumer", OWN_ANSWER_HEADERS)
  end
  local anonymous, aerr = consumers.load_anonymous(conf.anonymous)
  if aerr then
    return unexpected("loading the anonymous consumer: ", aerr)
  end
  if not anonymous then
    return unexpected("anonymous consumer '", conf.anonymous, "' is configured but doesn't exist")
  end
  kong.log.info("verifier named the consumer with ", field, " '", value,
                "', which Kong does not know: anonymous consumer")
  return consumers.authenticate(anonymous, nil, true)
end


local function apply_allow(conf, c, decision, consumer_sent)
  local names, values = decision.identity_names, decision.identity_values
  for i = 1, decision.identity_count do
    set_header(names[i], values[i])
  end

  local userid = decision.userid
  if userid then
    -- for plugins that run after this one (custom logging, say)
    kong.ctx.shared.edge_verifier_userid = userid
  end

  if decision.to_client then
    c.to_client_seen = true
    kong.ctx.plugin.to_client = decision.to_client
  end

  if decision.consumer_err then
    return unexpected(decision.consumer_err)
  end
  if decision.consumer_field then
    return authenticate_named(conf, decision, userid)
  end

  -- the verifier names no consumer: one an earlier authenticator set stays
  if kong.client.get_consumer() == nil then
    if userid then
      kong.client.authenticate(nil, decision.credential)
    end
    strip_consumer_headers(consumer_sent)
  end
end


function EdgeVerifierHandler:init_worker()
  consumers.init_worker()
end


function EdgeVerifierHandler:access(conf)
  -- truncated: MAX_REQUEST_HEADERS lines or more
  local headers, herr = get_headers(MAX_REQUEST_HEADERS - 1)
  if herr == "truncated" then
    -- a spoofed identity header past the limit could not be seen to be cleared
    return kong.response.exit(400, { message = "Too many request headers" }, OWN_ANSWER_HEADERS)
  end
  local authorization, single_use, consumer_sent, sent_thumbprint = scan_headers(headers)

  local c = constants_for(conf)
  local target = c.target
  if not target then
    return unexpected("bad verifier url: ", c.target_err)
  end

  -- a client certificate is on Kong's own TLS connection only
  local thumbprint = thumbprint_for(conf, sent_thumbprint, var.scheme)
  local scheme, port = told_origin()

  local host = judged_host()
  local cache = not single_use and c.cache
  local key, decision
  if cache then
    -- everything the answer depends on: the verifier is told method, scheme,
    -- host, port, path and query, each a function of these
    key = decision_cache.key(get_method(), scheme, host, port, var.request_uri,
                             var.args, authorization, thumbprint)
    decision = decision_cache.get(cache, key)
  end

  if not decision then
    -- the verifier's max-age counts from here, not from its answer's arrival:
    -- never reused past what it meant (a token's exp), however slow it was
    local asked_at = ngx.now()
    local method, uri = kong.request.get_method(), var.request_uri
    -- (only when asking: a reused answer was asked with bytes that passed)
    local malformed = not_utf8(host, headers, uri)
    if malformed then
      return kong.response.exit(400, { message = malformed .. " is not UTF-8" }, OWN_ANSWER_HEADERS)
    end
    local res, err = http1.request(target, "GET",
                                   build_request(headers, method, scheme, host, port, uri, thumbprint),
                                   c.request_opts)
    if not res then
      -- fail_open only when nothing reached the verifier (connect failed): a
      -- request already sent may be a credential still being checked, and a
      -- timeout there must never become a pass (issue #26 G9)
      if conf.fail_open and sub(err, 1, 9) == "connect: " then
        kong.log.warn("verifier unavailable (", err, "); fail_open lets the request pass")
        strip_consumer_headers_if_unauthenticated(consumer_sent)
        return
      end
      kong.log.err("verifier unavailable: ", err)
      return kong.response.error(503, "Authorization service unavailable", UNAVAILABLE_HEADERS)
    end
    if res.status >= 600 then
      -- a status no answer of the verifier has, and kong.response.exit could
      -- not send (Kong's 500 from its own check): an answer this plugin cannot
      -- act on is as unavailable as an unreadable one, never relayed nor kept
      -- (the Python plugin answers the same)
      kong.log.err("verifier unavailable: verifier answered with status ", res.status)
      return kong.response.error(503, "Authorization service unavailable", UNAVAILABLE_HEADERS)
    end
    decision = to_decision(res)
    if cache and not decision.per_request then
      local ttl = decision_cache.ttl(res.headers["cache-control"])
      if ttl then
        decision_cache.set(cache, key, decision, ttl, asked_at)
      end
    end
  end

  if not decision.allow then
    return kong.response.exit(decision.status, decision.body, decision.headers)
  end

  return apply_allow(conf, c, decision, consumer_sent)
end


function EdgeVerifierHandler:header_filter(conf) -- luacheck: ignore 212
  -- no answer of this configuration has had headers for the client yet:
  -- nothing to look up for this request
  local c = per_conf[conf]
  if not (c and c.to_client_seen) then
    return
  end
  local to_client = kong.ctx.plugin.to_client
  if not to_client then
    return
  end
  for i = 1, #to_client do
    kong.response.set_header(to_client[i][1], to_client[i][2])
  end
end


return EdgeVerifierHandler
