-- A small HTTP/1.1 client over ngx.socket.tcp cosockets (RFC 9112).
--
-- Kong ships lua-resty-http, but a bare OpenResty (and the nginx test rig) may
-- not; the verifier speaks plain HTTP/1.1 on loopback, so one request/response
-- exchange with keep-alive pooling is all we need. Bodies are read by
-- Content-Length, chunked transfer coding (RFC 9112 section 7.1) or, for
-- HTTP/1.0-style answers, until the peer closes.

local ngx = ngx
local tcp = ngx.socket.tcp
local concat = table.concat
local lower = string.lower
local tonumber = tonumber
local type = type

local _M = {}

-- An answer bigger than this is not a forward-auth answer; refusing it bounds
-- the memory one misbehaving verifier can make each worker hold (bytes).
local MAX_BODY_BYTES = 1024 * 1024
-- Headers per answer, for the same reason.
local MAX_HEADERS = 100
-- Idle connections kept per worker and per verifier address; nginx's own
-- default (lua_socket_pool_size 30) is sized for many upstreams, we have one.
local POOL_SIZE = 64

local DEFAULT_PORTS = { http = 80, https = 443 }

-- Reconnect back-off (gRPC's connection back-off, as the Python plugin's):
-- each further failed attempt multiplies the wait, jittered +-20% so
-- workers and nodes do not come back in step.
local BACKOFF_MULTIPLIER = 1.6
local BACKOFF_JITTER = 0.2
-- Per worker, per verifier address (the pool name): after a failed
-- connection attempt, when the next one may be made and how many failed in
-- a row. A new connection made removes the entry.
local down = {}
-- Per worker, per verifier address: idle connections this worker put in the
-- pool (at most POOL_SIZE). While backing off, a request may still take one:
-- the back-off keeps new connections from a verifier in trouble, not the
-- answers it still gives on the connections it has.
local idle = {}


--- Splits "http://host:port/path?query" into its parts, or returns nil, err.
function _M.parse_url(url)
  if type(url) ~= "string" then
    return nil, "url must be a string"
  end
  local scheme, authority, path = url:match("^(https?)://([^/?#]+)([^#]*)")
  if not scheme then
    return nil, "url must be http:// or https:// with a host: " .. url
  end
  local host, port
  if authority:sub(1, 1) == "[" then
    host, port = authority:match("^(%[[^%]]+%]):?(%d*)$")
  else
    host, port = authority:match("^([^:@]+):?(%d*)$")
  end
  if not host then
    return nil, "bad host in url: " .. url
  end
  port = tonumber(port) or DEFAULT_PORTS[scheme]
  if port < 1 or port > 65535 then
    return nil, "bad port in url: " .. url
  end
  if path == "" then
    path = "/"
  elseif path:sub(1, 1) == "?" then
    path = "/" .. path
  end
  local host_header = host
  if port ~= DEFAULT_PORTS[scheme] then
    host_header = host .. ":" .. port
  end
  -- cosockets take a bare IPv6 literal without brackets
  local connect_host = host:match("^%[(.*)%]$") or host
  return {
    scheme = scheme,
    host = connect_host,
    port = port,
    pool = scheme .. ":" .. connect_host .. ":" .. port,
    path = path,
    host_header = host_header,
  }
end


local function read_headers(sock)
  local list, map = {}, {}
  for _ = 1, MAX_HEADERS + 1 do
    local line, err = sock:receive("*l")
    if not line then
      return nil, nil, "reading headers: " .. err
    end
    if line == "" then
      return list, map
    end
    local name, value = line:match("^([^:%s]+)%s*:%s*(.-)%s*$")
    if not name then
      return nil, nil, "malformed header line"
    end
    list[#list + 1] = { name, value }
    local key = lower(name)
    local prev = map[key]
    if prev == nil then
      map[key] = value
    elseif type(prev) == "table" then
      prev[#prev + 1] = value
    else
      map[key] = { prev, value }
    end
  end
  return nil, nil, "too many headers"
end


local function read_chunked(sock)
  local parts, total = {}, 0
  while true do
    local line, err = sock:receive("*l")
    if not line then
      return nil, "reading chunk size: " .. err
    end
    -- chunk extensions (";name=value") are allowed and meaningless to us
    local size = tonumber(line:match("^%s*(%x+)"), 16)
    if not size then
      return nil, "malformed chunk size"
    end
    if size == 0 then
      -- trailer section, then the empty line that ends the message
      for _ = 1, MAX_HEADERS + 1 do
        local trailer, terr = sock:receive("*l")
        if not trailer then
          return nil, "reading trailers: " .. terr
        end
        if trailer == "" then
          return concat(parts)
        end
      end
      return nil, "too many trailers"
    end
    total = total + size
    if total > MAX_BODY_BYTES then
      return nil, "body too large"
    end
    local data, derr = sock:receive(size)
    if not data then
      return nil, "reading chunk: " .. derr
    end
    parts[#parts + 1] = data
    local crlf, cerr = sock:receive(2)
    if crlf ~= "\r\n" then
      return nil, "malformed chunk end" .. (cerr and (": " .. cerr) or "")
    end
  end
end


local function first_value(v)
  if type(v) == "table" then
    return v[1]
  end
  return v
end


local function has_token(v, token)
  if v == nil then
    return false
  end
  if type(v) == "table" then
    v = concat(v, ",")
  end
  for item in lower(v):gmatch("[^,%s]+") do
    if item == token then
      return true
    end
  end
  return false
end


-- Reads one response. Returns res, reusable (may the connection go back to
-- the pool?) or nil, err, stage; stage "stale" means the peer closed before
-- answering, which on a reused connection means it had closed it while idle.
local function read_response(sock, method)
  local line, err = sock:receive("*l")
  if not line then
    -- only a closed/reset peer marks a stale pooled connection; a timeout
    -- means a slow verifier, and must not be waited out twice
    local stale = err == "closed" or err:find("reset", 1, true) ~= nil
    return nil, "reading status line: " .. err, stale and "stale" or nil
  end
  local version, status = line:match("^HTTP/(%d%.%d) (%d%d%d)")
  status = tonumber(status)
  if not status then
    return nil, "malformed status line"
  end
  -- 1xx interim answers (100 Continue, 103 Early Hints) precede the real one
  while status >= 100 and status < 200 do
    local _, _, herr = read_headers(sock)
    if herr then
      return nil, herr
    end
    line, err = sock:receive("*l")
    if not line then
      return nil, "reading status line: " .. err
    end
    version, status = line:match("^HTTP/(%d%.%d) (%d%d%d)")
    status = tonumber(status)
    if not status then
      return nil, "malformed status line"
    end
  end

  local list, map, herr = read_headers(sock)
  if herr then
    return nil, herr
  end

  local connection = map["connection"]
  local reusable
  if version == "1.1" then
    reusable = not has_token(connection, "close")
  else
    reusable = has_token(connection, "keep-alive")
  end

  local body = ""
  local te = map["transfer-encoding"]
  local cl = first_value(map["content-length"])
  if method == "HEAD" or status == 204 or status == 304 then
    body = ""
  elseif te ~= nil then
    if not has_token(te, "chunked") then
      return nil, "unsupported transfer-encoding"
    end
    local b, berr = read_chunked(sock)
    if not b then
      return nil, berr
    end
    body = b
  elseif cl ~= nil then
    local n = tonumber(cl)
    if not n or n < 0 or n ~= math.floor(n) then
      return nil, "malformed content-length"
    end
    if n > MAX_BODY_BYTES then
      return nil, "body too large"
    end
    if n > 0 then
      local b, berr = sock:receive(n)
      if not b then
        return nil, "reading body: " .. berr
      end
      body = b
    end
  else
    -- no framing: the body runs to the end of the connection
    reusable = false
    local b, berr = sock:receive("*a")
    if not b then
      return nil, "reading body: " .. berr
    end
    if #b > MAX_BODY_BYTES then
      return nil, "body too large"
    end
    body = b
  end

  return {
    status = status,
    headers = map,       -- lower-case name -> value, or array of values
    header_list = list,  -- { {name, value}, ... } in wire order
    body = body,
  }, reusable
end


local function build_request(target, method, headers)
  local buf = {
    method, " ", target.path, " HTTP/1.1\r\n",
    "Host: ", target.host_header, "\r\n",
  }
  local n = #buf
  for i = 1, #headers do
    local h = headers[i]
    n = n + 1
    buf[n] = h[1] .. ": " .. h[2] .. "\r\n"
  end
  buf[n + 1] = "\r\n"
  return concat(buf)
end


-- The wait after `failures` failed attempts in a row (milliseconds).
local function backoff_ms(opts, failures)
  local wait = opts.reconnect_backoff * BACKOFF_MULTIPLIER ^ math.min(failures - 1, 64)
  wait = math.min(wait, math.max(opts.reconnect_backoff_max, opts.reconnect_backoff))
  return wait * (1 + BACKOFF_JITTER * (2 * math.random() - 1))
end


local function connect(target, opts)
  local pool = target.pool
  -- an idle pooled connection is taken, if the count says there is one:
  -- counted off before connect yields, so concurrent requests never take
  -- more than the count (a count gone stale, its connection closed idle,
  -- costs one fresh attempt and corrects itself)
  local pooled = idle[pool] or 0
  if pooled > 0 then
    idle[pool] = pooled - 1
  end
  local state = down[pool]
  if state and pooled == 0 then
    local now = ngx.now() * 1000
    if now < state.retry_at then
      -- nothing was sent: a connection storm against a verifier that is
      -- down or overloaded helps nobody (and fail_open may pass, as for
      -- any connection that failed)
      return nil, "connect: backing off after a failed connection attempt"
    end
    -- this request makes the one attempt; the others keep backing off
    -- until it ends (its connect timeout bounds it)
    state.retry_at = now + opts.timeout
  end
  local sock = tcp()
  sock:settimeouts(opts.timeout, opts.timeout, opts.timeout)
  local ok, err = sock:connect(target.host, target.port, { pool = pool, pool_size = POOL_SIZE })
  if not ok then
    idle[pool] = 0  -- a pooled one would have been taken: none is left
    if (opts.reconnect_backoff or 0) > 0 then
      state = down[pool] or { failures = 0 }
      state.failures = state.failures + 1
      ngx.update_time()
      state.retry_at = ngx.now() * 1000 + backoff_ms(opts, state.failures)
      down[pool] = state
    end
    return nil, "connect: " .. err
  end
  -- a new connection made ends the back-off (this attempt, or one that began
  -- before a failure); a pooled one proves nothing about new ones
  if down[pool] and sock:getreusedtimes() == 0 then
    down[pool] = nil
  end
  if target.scheme == "https" and sock:getreusedtimes() == 0 then
    -- verify the verifier's certificate (lua_ssl_trusted_certificate)
    ok, err = sock:sslhandshake(nil, target.host, true)
    if not ok then
      sock:close()
      return nil, "tls handshake: " .. err
    end
  end
  return sock
end


--- Sends one request without a body and reads the answer.
-- target: a table from parse_url. headers: array of {name, value}.
-- opts: timeout (ms, for connect, each send and each read), keepalive_timeout
-- (ms an idle pooled connection is kept; 0: close after each answer),
-- reconnect_backoff (ms without a connection attempt to this address after
-- one failed, x1.6 after each further failure, +-20%; 0 or nil: none) and
-- reconnect_backoff_max (ms, its ceiling). While backing off, a request takes
-- an idle pooled connection if this worker holds one, else nothing is sent:
-- the error is "connect: backing off ...", as for a connection that failed.
-- An error starting "connect: " means nothing reached the verifier: a resend
-- after a pooled connection closed under a delivered request never says so.
-- Returns res ({status, headers, header_list, body}) or nil, err.
function _M.request(target, method, headers, opts)
  local raw = build_request(target, method, headers)

  -- A pooled connection the verifier closed while idle fails on first use;
  -- a GET without a body is safe to send again, once, on a fresh connection.
  local delivered = false  -- the first attempt's request was written before its connection closed
  for attempt = 1, 2 do
    local sock, err = connect(target, opts)
    if not sock then
      if delivered then
        -- not "connect: ": the closed connection may have been a verifier
        -- that read the request and died on it (a token that crashes it),
        -- so this is not "nothing reached the verifier" (fail_open passes
        -- only that)
        return nil, "resending after the verifier closed the connection: " .. err
      end
      return nil, err
    end
    local reused = sock:getreusedtimes() > 0

    local sent
    sent, err = sock:send(raw)
    local res, reusable, stage
    if sent then
      res, reusable, stage = read_response(sock, method)
      if not res then
        err = reusable
      end
    else
      stage = (err == "closed" or err:find("reset", 1, true)) and "stale" or nil
      err = "send: " .. err
    end

    if res then
      -- setkeepalive(0) would pool forever; 0 here means no pooling
      if reusable and opts.keepalive_timeout > 0 then
        local ok = sock:setkeepalive(opts.keepalive_timeout, POOL_SIZE)
        if ok then
          idle[target.pool] = math.min((idle[target.pool] or 0) + 1, POOL_SIZE)
        else
          sock:close()
        end
      else
        sock:close()
      end
      return res
    end

    sock:close()
    if not (reused and stage == "stale" and attempt == 1) then
      return nil, err
    end
    delivered = sent ~= nil
  end
end


return _M
