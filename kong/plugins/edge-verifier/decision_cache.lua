-- Per-worker reuse of the verifier's answers (RFC 9111 Cache-Control).
--
-- The verifier says how long an answer may be reused with
-- `Cache-Control: private, max-age=N` (never past the token's exp) and forbids
-- reuse with `no-store`; answers without max-age are never reused.
--
-- Keys are the exact bytes the answer depends on (request line parts and
-- credentials), each part length-prefixed so that no two different requests
-- give the same key, and compared in full: no digest to compute per request
-- and no collision to argue about. So the credentials of the answers kept are
-- in the worker's memory for as long as those answers (as in Kong's own
-- key-auth and oauth2 entity caches); the cache is bounded by entries and by
-- bytes, its keys' and its answers' (a token can be kilobytes, and so can an
-- answer's identity headers): least recently used answers go first.

local concat = table.concat
local lower = string.lower
local tonumber = tonumber
local type = type
local setmetatable = setmetatable
local pairs = pairs
local now = ngx.now

local _M = {}

-- Ceiling on any reuse (seconds): a revoked token is refused at the edge
-- within this long even if the verifier granted a longer max-age.
_M.MAX_TTL = 300

-- Bytes an answer may use on average (its key, its headers and body, plus
-- ENTRY_OVERHEAD): the byte bound of a configuration's cache is cache_entries
-- times this, so a flood of kilobyte tokens or answers holds fewer answers,
-- not more memory.
_M.BYTES_PER_ENTRY = 2048
-- what an entry costs besides its key and its answer's strings: the node, the
-- map slot, the answer's tables (built once per verifier answer)
_M.ENTRY_OVERHEAD = 256

-- one cache per plugin configuration; a new configuration starts empty
local caches = setmetatable({}, { __mode = "k" })

local stats = { hits = 0, misses = 0, stores = 0 }


--- A least-recently-used cache of at most `max_entries` entries and
--- `max_bytes` bytes: a map from key to node, and the nodes in a ring through
--- `head` (most recently used first).
local function new_lru(max_entries, max_bytes)
  local head = {}
  head.prev, head.next = head, head
  return { map = {}, head = head, count = 0, bytes = 0,
           max_entries = max_entries, max_bytes = max_bytes }
end


local function unlink(node)
  local prev, next = node.prev, node.next
  prev.next, next.prev = next, prev
end


local function link_first(head, node)
  local first = head.next
  node.prev, node.next = head, first
  first.prev, head.next = node, node
end


local function drop(lru, node)
  unlink(node)
  lru.map[node.key] = nil
  lru.count = lru.count - 1
  lru.bytes = lru.bytes - node.size
end


--- The cache for this plugin configuration, or nil when reuse is off.
function _M.for_conf(conf)
  local size = conf.cache_entries
  if not size or size <= 0 then
    return nil
  end
  local c = caches[conf]
  if not c then
    c = new_lru(size, size * _M.BYTES_PER_ENTRY)
    caches[conf] = c
  end
  return c
end


-- One length-prefixed part of a key: "<bytes>:<value>".
local function part(v)
  return #v .. ":" .. v
end


-- A credential header's part: "-" when absent, its value, or (repeated) "*"
-- and each value in order.
local function credential_part(v)
  if v == nil then
    return "-"
  end
  if type(v) ~= "table" then
    return #v .. ":" .. v
  end
  local out = { "*", #v, ":" }
  for i = 1, #v do
    out[#out + 1] = part(v[i])
  end
  return concat(out)
end


--- The cache key of a request: everything the answer depends on, each part
--- length-prefixed (`<bytes>:<value>`): the request as nginx holds it (method,
--- scheme, host, port, $request_uri, $args), the Authorization value(s) and the
--- client certificate thumbprint ("-" when absent). Distinct requests give
--- distinct keys whatever bytes their parts hold. The verifier URL is not in
--- it: each plugin configuration has a cache of its own.
function _M.key(method, scheme, host, port, uri, args, authorization, thumbprint)
  args = args or ""
  if type(authorization) == "string" and thumbprint == nil then
    -- the usual request: one concatenation
    return #method .. ":" .. method .. #scheme .. ":" .. scheme .. #host .. ":" .. host
        .. #port .. ":" .. port .. #uri .. ":" .. uri .. #args .. ":" .. args
        .. #authorization .. ":" .. authorization .. "-"
  end
  return part(method) .. part(scheme) .. part(host) .. part(port) .. part(uri) .. part(args)
      .. credential_part(authorization) .. credential_part(thumbprint)
end


--- Seconds an answer may be reused for, from its Cache-Control, or nil.
function _M.ttl(cache_control)
  if cache_control == nil then
    return nil
  end
  if type(cache_control) == "table" then
    cache_control = concat(cache_control, ",")
  end
  local max_age
  for directive in lower(cache_control):gmatch("[^,]+") do
    directive = directive:match("^%s*(.-)%s*$")
    if directive == "no-store" or directive == "no-cache" then
      return nil
    end
    local n = directive:match("^max%-age%s*=%s*\"?(%d+)\"?$")
    if n then
      max_age = tonumber(n)
    end
  end
  if not max_age or max_age <= 0 then
    return nil
  end
  if max_age > _M.MAX_TTL then
    return _M.MAX_TTL
  end
  return max_age
end


--- The answer kept for `key`, or nil (none, or past its time).
function _M.get(lru, key)
  local node = lru.map[key]
  if node then
    if node.expires > now() then
      stats.hits = stats.hits + 1
      local head = lru.head
      if head.next ~= node then
        unlink(node)
        link_first(head, node)
      end
      return node.value
    end
    drop(lru, node)
  end
  stats.misses = stats.misses + 1
  return nil
end


--- Keeps `value` (its bytes in `value.size`, its headers' and body's) under
--- `key` for `ttl` seconds from `asked_at` (ngx.now()
--- when the verifier was asked: the time an answer spends on its way is part
--- of its age, RFC 9111 section 4.2.3), evicting the least recently used
--- answers while the entry or byte bound would be passed. An answer larger
--- than the whole byte bound is not kept.
function _M.set(lru, key, value, ttl, asked_at)
  local size = #key + (value.size or 0) + _M.ENTRY_OVERHEAD
  if size > lru.max_bytes then
    return
  end
  stats.stores = stats.stores + 1
  local map, head = lru.map, lru.head
  local old = map[key]
  if old then
    drop(lru, old)
  end
  while lru.count >= lru.max_entries or lru.bytes + size > lru.max_bytes do
    drop(lru, head.prev)
  end
  local node = { key = key, value = value, expires = (asked_at or now()) + ttl, size = size }
  link_first(head, node)
  map[key] = node
  lru.count = lru.count + 1
  lru.bytes = lru.bytes + size
end


--- Hit/miss/store counters of this worker, and the answers and bytes it
--- holds now (over every configuration's cache).
function _M.stats()
  local entries, bytes = 0, 0
  for _, c in pairs(caches) do
    entries = entries + c.count
    bytes = bytes + c.bytes
  end
  return {
    hits = stats.hits,
    misses = stats.misses,
    stores = stats.stores,
    entries = entries,
    bytes = bytes,
  }
end


return _M
