-- The Kong consumer behind a verified identity.
--
-- The verifier names it in its allow answer (`upstream.consumer` in the
-- verifier's config): `X-Kong-Consumer-Username` or `X-Kong-Consumer-Custom-Id`.
-- This module finds that consumer in Kong's datastore through Kong's entity
-- cache and authenticates it the way Kong's own authenticators do
-- (kong.client.authenticate plus the X-Consumer-* upstream headers), so acl
-- (also by consumer group), rate-limiting by consumer and consumer-scoped
-- plugins after this one key on it.

local kong = kong
local ngx = ngx
local type = type
local pcall = pcall
local pairs = pairs
local require = require

local _M = {}

-- Answer headers naming the consumer, and the consumer field each names.
local NAMING_HEADERS = {
  { "x-kong-consumer-username", "username" },
  { "x-kong-consumer-custom-id", "custom_id" },
}

-- The upstream headers every Kong authenticator sets; a client sending them
-- is trying to pass as a consumer.
_M.HEADERS = {
  "X-Consumer-ID", "X-Consumer-Custom-ID", "X-Consumer-Username",
  "X-Credential-Identifier", "X-Anonymous-Consumer",
}


--- What the verifier's answer names: field ("username" or "custom_id") and
-- value; nil when it names no consumer; nil, nil, err when it names one
-- ambiguously (both ways, or a header repeated), which is a misconfiguration.
-- `headers`: lower-case name -> value, or array of values.
function _M.named(headers)
  local field, value
  for i = 1, #NAMING_HEADERS do
    local v = headers[NAMING_HEADERS[i][1]]
    if v ~= nil then
      if field or type(v) == "table" then
        return nil, nil, "the verifier's answer names more than one consumer"
      end
      field, value = NAMING_HEADERS[i][2], v
    end
  end
  return field, value
end


local function select_by_username(username)
  return kong.db.consumers:select_by_username(username)
end


local function select_by_custom_id(custom_id)
  return kong.db.consumers:select_by_custom_id(custom_id)
end


local SELECT_BY = { username = select_by_username, custom_id = select_by_custom_id }


-- This plugin's cache key for the consumer whose `field` is `value`; it
-- invalidates them itself (init_worker). Not Kong's consumers:cache_key(name),
-- which Kong's authenticators share for ids and usernames alike: a subject
-- equal to some consumer's id would read that consumer there, or, not found
-- as a username, leave a miss that hides that consumer from them all. The
-- second part keeps these keys apart from Kong's (one part, `value` not "").
local function key_for(field, value)
  return kong.db.consumers:cache_key(field, value)
end


--- The consumer whose `field` ("username" or "custom_id") is `value`, or
-- nil; or nil, err when the datastore failed. Not kong.client.load_consumer
-- (value, true): that tries the value as an id first, so a subject equal to
-- some consumer's id would become that consumer.
function _M.load(field, value)
  if value == "" then
    return nil  -- no consumer has an empty name, and "" would blur cache keys
  end
  return kong.cache:get(key_for(field, value), nil, SELECT_BY[field], value)
end


--- The `anonymous` consumer of the configuration (its id or username, Kong's
-- convention), or nil; or nil, err. Loaded as Kong's authenticators load theirs.
function _M.load_anonymous(name)
  return kong.cache:get(kong.db.consumers:cache_key(name), nil,
                        kong.client.load_consumer, name, true)
end


local function set_or_clear(name, value)
  if value == nil or value == ngx.null then
    return kong.service.request.clear_header(name)
  end
  return kong.service.request.set_header(name, value)
end


--- Authenticates `consumer` with `credential` (nil for the anonymous
-- consumer, or an identity without a user id) and sets the upstream headers
-- as Kong's authenticators do. The consumer groups an earlier authenticator's
-- consumer brought are dropped first: kong.client.authenticate keeps groups
-- already set, and they are not this consumer's.
function _M.authenticate(consumer, credential, anonymous)
  local client = kong.client
  if client.set_authenticated_consumer_groups then  -- Kong 3.4 and later
    client.set_authenticated_consumer_groups(nil)
  end
  client.authenticate(consumer, credential)
  set_or_clear("X-Consumer-ID", consumer.id)
  set_or_clear("X-Consumer-Custom-ID", consumer.custom_id)
  set_or_clear("X-Consumer-Username", consumer.username)
  set_or_clear("X-Credential-Identifier", credential and credential.id)
  if anonymous then
    kong.service.request.set_header("X-Anonymous-Consumer", "true")
  else
    kong.service.request.clear_header("X-Anonymous-Consumer")
  end
end


local function invalidate(entity)
  if not entity then
    return
  end
  for field in pairs(SELECT_BY) do
    local value = entity[field]
    if type(value) == "string" and value ~= "" then
      kong.cache:invalidate(key_for(field, value))
    end
  end
end


local function on_consumer_crud(data)
  -- cache keys carry the workspace: the event's, not whatever was current
  local ok, workspaces = pcall(require, "kong.workspaces")
  if ok and workspaces.set_workspace then
    workspaces.set_workspace(data.workspace)
  end
  invalidate(data.old_entity)
  invalidate(data.entity)
end


--- Drops the entries for a consumer's old and new username and custom_id
-- whenever it changes, as Kong's own handler does for its keys: the node that
-- wrote the consumer gets the "crud" event, and kong.cache:invalidate reaches
-- every node. A created consumer ends a remembered miss.
function _M.init_worker()
  kong.worker_events.register(on_consumer_crud, "crud", "consumers")
end


return _M
