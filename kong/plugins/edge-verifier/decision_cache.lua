-- Per-worker reuse of the verifier's answers (RFC 9111 Cache-Control).
--
-- The verifier says how long an answer may be reused with
-- `Cache-Control: private, max-age=N` (never past the token's exp) and forbids
-- reuse with `no-store`; answers without max-age are never reused. Keys are the
-- SHA-256 of everything the answer depends on, so tokens are not kept as keys,
-- where resty.sha256 (lua-resty-string) exists; without it the key is the
-- concatenated string itself (never MD5 or SHA-1).

local lrucache = require "resty.lrucache"

local concat = table.concat
local lower = string.lower
local tonumber = tonumber
local type = type
local setmetatable = setmetatable
local pairs = pairs

local has_sha256, resty_sha256 = pcall(require, "resty.sha256")
if has_sha256 and type(resty_sha256) ~= "table" then
  has_sha256 = false
end

local _M = {}

-- Ceiling on any reuse (seconds): a revoked token is refused at the edge
-- within this long even if the verifier granted a longer max-age.
_M.MAX_TTL = 300

-- one LRU per plugin configuration; a new configuration starts empty
local caches = setmetatable({}, { __mode = "k" })

local stats = { hits = 0, misses = 0, stores = 0 }


--- The LRU for this plugin configuration, or nil when reuse is off.
function _M.for_conf(conf)
  local size = conf.cache_entries
  if not size or size <= 0 then
    return nil
  end
  local c = caches[conf]
  if not c then
    c = lrucache.new(size)
    caches[conf] = c
  end
  return c
end


-- One hasher per worker, reset before each key: a request never yields
-- between reset and final, so no two requests share it mid-digest.
-- lua-resty-string's resty.sha256 has reset(); a build without it gets a new
-- hasher per key.
local hasher

local function new_hasher()
  local h = hasher
  if h then
    h:reset()
  else
    h = resty_sha256:new()
    if h.reset then
      hasher = h
    end
  end
  return h
end


-- One credential header's part of the key: its values in order, each byte
-- for byte (a repeated header is several values).
local function joined_values(v)
  if type(v) == "table" then
    return concat(v, "\0")
  end
  return v
end


--- The cache key of a request: everything the answer depends on, joined with
--- NUL (which cannot occur in header values or URIs, so the join is
--- unambiguous): `head` (the verifier URL and the request as nginx holds it:
--- method, scheme, host, port, $request_uri, $args; already joined), then `"\0Authorization:" .. values` and `"\0cnf:" .. thumbprint`
--- when present. Its SHA-256 where resty.sha256 exists, so tokens are not kept
--- as keys; the pieces are fed to the hash one by one, so the credential is
--- never copied into a longer string. The joined string itself otherwise
--- (bounded by cache_entries).
function _M.key(head, authorization, thumbprint)
  if not has_sha256 then
    return head
        .. (authorization ~= nil and "\0Authorization:" .. joined_values(authorization) or "")
        .. (thumbprint and "\0cnf:" .. thumbprint or "")
  end
  local h = new_hasher()
  h:update(head)
  if authorization ~= nil then
    h:update("\0Authorization:")
    h:update(joined_values(authorization))
  end
  if thumbprint then
    h:update("\0cnf:")
    h:update(thumbprint)
  end
  return h:final()
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


function _M.get(cache, key)
  local v = cache:get(key)
  if v then
    stats.hits = stats.hits + 1
  else
    stats.misses = stats.misses + 1
  end
  return v
end


function _M.set(cache, key, value, ttl)
  stats.stores = stats.stores + 1
  cache:set(key, value, ttl)
end


--- Hit/miss/store counters of this worker, the answers it holds now (over
--- every configuration's LRU) and whether keys are hashed.
function _M.stats()
  local entries = 0
  for _, c in pairs(caches) do
    entries = entries + c:count()
  end
  return {
    hits = stats.hits,
    misses = stats.misses,
    stores = stats.stores,
    entries = entries,
    hashed_keys = has_sha256,
  }
end


return _M
