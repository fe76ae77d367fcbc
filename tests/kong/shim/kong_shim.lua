-- The slice of Kong's PDK the edge-verifier plugin uses, over plain ngx.*,
-- so its handler.lua runs unmodified in Debian's nginx + lua module.
--
-- Semantics follow Kong 3.x's kong/pdk/*.lua where the plugin can tell the
-- difference: header names are case-insensitive, kong.response.exit encodes
-- a table body as JSON, kong.response.error answers {"message": ...},
-- kong.client.authenticate stores consumer and credential in ngx.ctx and
-- sets the consumer's groups unless groups are set already,
-- kong.client.load_consumer tries a UUID as an id before a username.
-- kong.db.consumers, kong.cache (values and misses kept until invalidated)
-- and kong.worker_events ("crud" events, with Kong's own invalidation of
-- consumers by username) stand in for Kong's datastore and entity cache.
-- Everything the plugin does to Kong's state is recorded per worker and can be
-- read back at /__shim/authenticated (the rig runs one worker).
--
-- After the plugin, the rig can run what Kong's acl (priority 950) and
-- rate-limiting (910) do with the consumer, reduced to that: acl allows or
-- refuses by the consumer's groups (include_consumer_groups), rate-limiting
-- counts per consumer (limit_by = consumer). What they saw is at
-- /__shim/later.

local cjson = require "cjson.safe"

local ngx = ngx
local type = type
local pairs = pairs
local tostring = tostring
local setmetatable = setmetatable

local _M = {}

local handler
local conf
local consumers_by_id, consumers_by_username, consumers_by_custom_id = {}, {}, {}
local groups_by_consumer_id = {}  -- consumer id -> { {id, name}, ... }
local db_selects = 0               -- datastore reads (kong.cache misses end here)
local cache_store = {}             -- kong.cache: key -> value, or MISS
local MISS = {}
local is_uuid, make_consumers_dao, make_cache
local crud_handlers = {}           -- kong.worker_events "crud"/"consumers" handlers
local later                        -- {acl = {...}, rate_limiting = {...}} or nil
local later_seen, later_count = {}, 0
local rate_counts = {}             -- rate-limiting: identifier -> requests
local authenticated = {}   -- this worker's first kong.client.authenticate calls
local authenticated_count = 0
-- Calls kept for /__shim/authenticated; the rest are only counted, so a
-- benchmark's million requests do not grow the worker's heap (Kong's own
-- authenticate keeps nothing past the request).
local MAX_RECORDED_CALLS = 100
local preauthenticated     -- a consumer "an earlier plugin" authenticated
local external             -- {socket, name}: an external plugin under a plugin server
local kong_upstream_uri    -- true: the upstream gets the target Kong 3.x's router builds (kong_upstream_target)
-- Kong's `port_maps` (`80:8000`: clients reach port 80, Kong listens on
-- 8000) as kong/pdk/request.lua's HOST_PORTS: listening port -> public port.
-- No `trusted_ips` (Kong's default): no client's X-Forwarded-Port is read.
local host_ports = {}
-- Kong's `trusted_ips` as all or nothing: true, every peer is a trusted proxy
-- (the rig's client stands for a TLS-terminating load balancer), whose
-- X-Forwarded-Proto/-Port kong/pdk/request.lua's get_forwarded_* then take.
local trusted_proxy = false


-- kong.db.schema.typedefs, as far as the schema uses it
local function typedefs_stub()
  local function field(spec)
    return setmetatable(spec, {
      __call = function(self, overrides)
        local copy = {}
        for k, v in pairs(self) do copy[k] = v end
        for k, v in pairs(overrides or {}) do copy[k] = v end
        return copy
      end,
    })
  end
  return {
    no_consumer = { type = "foreign", reference = "consumers", eq = ngx.null },
    protocols_http = { type = "set", elements = { type = "string" },
                       default = { "grpc", "grpcs", "http", "https" } },
    url = field({ type = "string" }),
  }
end


-- Fills defaults and checks types, `required` and `between` the way Kong's
-- schema validation would before the plugin ever sees its conf.
local function apply_schema(schema, given)
  local record
  for _, f in ipairs(schema.fields) do
    if f.config then
      record = f.config
    end
  end
  local out, known = {}, {}
  for _, f in ipairs(record.fields) do
    local name, spec = next(f)
    known[name] = true
    local v = given[name]
    if v == nil or v == ngx.null then
      v = spec.default
    end
    if v == nil then
      if spec.required then
        error("schema violation: config." .. name .. " is required")
      end
    else
      local want = spec.type == "integer" and "number" or spec.type
      if type(v) ~= want then
        error("schema violation: config." .. name .. " must be a " .. spec.type)
      end
      if spec.type == "integer" and v ~= math.floor(v) then
        error("schema violation: config." .. name .. " must be an integer")
      end
      if spec.between and (v < spec.between[1] or v > spec.between[2]) then
        error("schema violation: config." .. name .. " out of range")
      end
      if spec.len_min and #v < spec.len_min then
        error("schema violation: config." .. name .. " is too short")
      end
      if spec.one_of then
        local ok = false
        for _, allowed in ipairs(spec.one_of) do
          ok = ok or v == allowed
        end
        if not ok then
          error("schema violation: config." .. name .. " must be one of: "
                .. table.concat(spec.one_of, ", "))
        end
      end
    end
    out[name] = v
  end
  for name in pairs(given) do
    if not known[name] then
      error("schema violation: config." .. name .. " is an unknown field")
    end
  end
  -- `conditional` entity checks on config fields (eq -> required)
  for _, check in ipairs(schema.entity_checks or {}) do
    local c = check.conditional
    if c then
      local if_name = c.if_field:match("^config%.(.+)$")
      local then_name = c.then_field:match("^config%.(.+)$")
      if out[if_name] == c.if_match.eq and c.then_match.required and out[then_name] == nil then
        error("schema violation: config." .. then_name .. " is required when config."
              .. if_name .. " is '" .. tostring(c.if_match.eq) .. "'")
      end
    end
  end
  return out
end


local function first(v)
  if type(v) == "table" then
    return v[1]
  end
  return v
end


local function make_log()
  local function at(level)
    return function(...)
      return ngx.log(level, "[kong] [edge-verifier] ", ...)
    end
  end
  local log = {
    err = at(ngx.ERR), warn = at(ngx.WARN), notice = at(ngx.NOTICE),
    info = at(ngx.INFO), debug = at(ngx.DEBUG), crit = at(ngx.CRIT),
    alert = at(ngx.ALERT), emerg = at(ngx.EMERG),
  }
  return setmetatable(log, { __call = function(_, ...) return log.notice(...) end })
end


local function exit(status, body, headers)
  -- Kong's kong.response.exit refuses a status it could not send
  if type(status) ~= "number" then
    error("code must be a number", 2)
  elseif status < 100 or status > 599 then
    error("code must be a number between 100 and 599", 2)
  end
  ngx.ctx.shim_exited = true
  ngx.status = status
  if headers then
    for k, v in pairs(headers) do
      ngx.header[k] = v
    end
  end
  if type(body) == "table" then
    body = cjson.encode(body)
    ngx.header["Content-Type"] = "application/json; charset=utf-8"
  end
  if body ~= nil then
    ngx.header["Content-Length"] = #body
    ngx.print(body)
  end
  return ngx.exit(status)
end


function is_uuid(s)
  return type(s) == "string" and s:lower():match(
    "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$") ~= nil
end


-- kong.db.consumers: the entities of the rig's settings, by primary and
-- unique keys; cache_key as Kong's DAO builds it (workspace left empty).
function make_consumers_dao()
  local dao = {}
  function dao:select(pk)
    db_selects = db_selects + 1
    return consumers_by_id[pk.id]
  end
  function dao:select_by_username(username)
    db_selects = db_selects + 1
    return consumers_by_username[username]
  end
  function dao:select_by_custom_id(custom_id)
    db_selects = db_selects + 1
    return consumers_by_custom_id[custom_id]
  end
  function dao:cache_key(key, a2, a3, a4, a5)
    if type(key) == "table" then
      key = key.id
    end
    return "consumers:" .. tostring(key) .. ":" .. (a2 or "") .. ":" .. (a3 or "")
           .. ":" .. (a4 or "") .. ":" .. (a5 or "") .. ":"
  end
  return dao
end


-- kong.cache: get(key, opts, cb, ...) calls cb on a miss and keeps its
-- answer, a nil one too, until invalidated (db_cache_ttl = 0).
function make_cache()
  local cache = {}
  function cache:get(key, _, cb, ...)
    local v = cache_store[key]
    if v ~= nil then
      if v == MISS then
        return nil, nil, 1
      end
      return v, nil, 1
    end
    local value, err = cb(...)
    if err then
      return nil, err
    end
    cache_store[key] = value == nil and MISS or value
    return value, nil, 3
  end
  function cache:invalidate(key)
    cache_store[key] = nil
  end
  return cache
end


local function add_consumer(c)
  local entity = { id = c.id, username = c.username, custom_id = c.custom_id }
  consumers_by_id[c.id] = entity
  if c.username then
    consumers_by_username[c.username] = entity
  end
  if c.custom_id then
    consumers_by_custom_id[c.custom_id] = entity
  end
  return entity
end


local function set_groups(c)
  if c.groups then
    local groups = {}
    for i, name in ipairs(c.groups) do
      groups[i] = { id = "group-" .. name, name = name }
    end
    groups_by_consumer_id[c.id] = groups
  end
end


-- kong.tools.uri.normalize(uri, true) of Kong 3.x: percent-encoded triplets
-- decoded unless the character is reserved (those upper-cased), dot segments
-- removed (RFC 3986 section 5.2.4), runs of slashes merged.
local KONG_RESERVED = {}
for c in ("!#$%&'()*+,/:;=?@[]"):gmatch(".") do
  KONG_RESERVED[c:byte()] = true
end

local function kong_normalize(uri)
  uri = uri:gsub("%%(%x%x)", function(hex)
    local num = tonumber(hex, 16)
    if KONG_RESERVED[num] then
      return "%" .. hex:upper()
    end
    return string.char(num)
  end)
  uri = uri:gsub("//+", "/")
  local out = {}
  local segments = {}
  for seg in (uri:sub(2) .. "/"):gmatch("([^/]*)/") do
    segments[#segments + 1] = seg
  end
  local trailing = false
  for i, seg in ipairs(segments) do
    if seg == "." then
      trailing = i == #segments
    elseif seg == ".." then
      out[#out] = nil
      trailing = i == #segments
    else
      out[#out + 1] = seg
      trailing = false
    end
  end
  local path = "/" .. table.concat(out, "/")
  if trailing and path:sub(-1) ~= "/" then
    path = path .. "/"
  end
  return path
end


-- kong.tools.uri.escape of Kong 3.x: a byte normalizing decoded that may not
-- stand in a request target as it is (a space, a control, a backslash, a quote,
-- a byte past ASCII) percent-encoded again, upper-case.
local function kong_escape(path)
  return (path:gsub("[^%w!#$&'()*+,/:;=?@%[%]%-_.~%%]", function(c)
    return string.format("%%%02X", c:byte())
  end))
end


-- The target Kong 3.x's router sends upstream for a route with `strip_path:
-- false` and a service without a path (deploy/kong/kong.yml): its router
-- matches on kong.tools.uri.normalize(path, true) (kong/router/utils.lua's
-- strip_uri_args), builds the upstream URI from that same normalized path
-- (atc.lua's set_upstream_uri, get_upstream_uri_v0) and escapes it
-- (runloop/handler.lua: var.upstream_uri = escape(match_t.upstream_uri)),
-- the query appended as the client sent it. Not the raw target.
local function kong_upstream_target()
  local path, query = ngx.var.request_uri:match("^([^?]*)(.*)$")
  return kong_escape(kong_normalize(path)) .. query
end


local function make_kong()
  local request = {
    get_header = function(name) return first(ngx.req.get_headers()[name]) end,
    get_headers = function(max) return ngx.req.get_headers(max) end,
    get_method = function() return ngx.req.get_method() end,
    -- Kong's get_path normalizes (kong.tools.uri.normalize(raw, true): a
    -- percent-encoded non-reserved character decoded, dot segments removed,
    -- slashes merged); get_raw_path is the path as the client sent it
    get_path = function() return kong_normalize((ngx.var.request_uri:match("^[^?]*"))) end,
    get_raw_path = function() return (ngx.var.request_uri:match("^[^?]*")) end,
    get_raw_query = function() return ngx.var.args or "" end,
    get_scheme = function() return ngx.var.scheme end,
    get_host = function() return ngx.var.host end,
    get_port = function() return tonumber(ngx.var.server_port) end,
    get_forwarded_scheme = function()
      local sent = trusted_proxy and first(ngx.req.get_headers()["x-forwarded-proto"])
      return sent and sent:lower() or ngx.var.scheme
    end,
    get_forwarded_port = function()
      local sent = trusted_proxy and tonumber(first(ngx.req.get_headers()["x-forwarded-port"]), 10)
      if sent and sent >= 1 and sent <= 65535 then
        return sent
      end
      local port = tonumber(ngx.var.server_port)
      return host_ports[port] or port
    end,
    get_path_with_query = function() return ngx.var.request_uri or "" end,
  }

  local function check_header_value(value)
    local t = type(value)
    if t ~= "string" and t ~= "number" and t ~= "boolean" then
      error("invalid header value: " .. t, 3)
    end
    return tostring(value)
  end

  local service_request = {
    set_header = function(name, value)
      ngx.req.set_header(name, check_header_value(value))
    end,
    clear_header = function(name) ngx.req.clear_header(name) end,
    -- another line of the header, the lines already there kept
    add_header = function(name, value)
      local v = check_header_value(value)
      local old = ngx.req.get_headers()[name]
      if old == nil then
        ngx.req.set_header(name, v)
      elseif type(old) == "table" then
        old[#old + 1] = v
        ngx.req.set_header(name, old)
      else
        ngx.req.set_header(name, { old, v })
      end
    end,
    -- Kong validates every name and value first, then sets them
    set_headers = function(headers)
      if type(headers) ~= "table" then
        error("headers must be a table", 2)
      end
      for k, v in pairs(headers) do
        if type(k) ~= "string" then
          error("invalid header name: " .. type(k), 2)
        end
        if type(v) ~= "table" then
          check_header_value(v)
        end
      end
      for k, v in pairs(headers) do
        ngx.req.set_header(k, v)
      end
    end,
  }

  local response = {
    exit = exit,
    error = function(status, message, headers)
      return exit(status, { message = message }, headers)
    end,
    set_header = function(name, value) ngx.header[name] = tostring(value) end,
  }

  local client = {
    get_ip = function() return ngx.var.remote_addr end,
    get_consumer = function() return ngx.ctx.authenticated_consumer end,
    get_credential = function() return ngx.ctx.authenticated_credential end,
    get_consumer_groups = function() return ngx.ctx.authenticated_consumer_groups end,
    set_authenticated_consumer_groups = function(groups)
      if groups ~= nil and type(groups) ~= "table" then
        error("consumer group must be a table or nil", 2)
      end
      ngx.ctx.authenticated_consumer_groups = groups
    end,
    authenticate = function(consumer, credential)
      if consumer ~= nil and type(consumer) ~= "table" then
        error("consumer must be a table or nil", 2)
      elseif credential ~= nil and type(credential) ~= "table" then
        error("credential must be a table or nil", 2)
      elseif consumer == nil and credential == nil then
        error("either credential or consumer must be provided", 2)
      end
      local ctx = ngx.ctx
      -- authenticate_consumer_group_by_consumer_id: groups already set stay
      if not ctx.authenticated_consumer_groups then
        ctx.authenticated_consumer_groups = consumer and groups_by_consumer_id[consumer.id]
      end
      ctx.authenticated_consumer = consumer
      ctx.authenticated_credential = credential
      authenticated_count = authenticated_count + 1
      if authenticated_count <= MAX_RECORDED_CALLS then
        authenticated[authenticated_count] = {
          consumer = consumer or cjson.null,
          credential = credential or cjson.null,
          uri = ngx.var.request_uri,
        }
      end
    end,
    load_consumer = function(id, by_username)
      if type(id) ~= "string" then
        error("consumer_id must be a string", 2)
      end
      local uuid = is_uuid(id)
      if not uuid and not by_username then
        error("cannot load a consumer with an id that is not a uuid", 2)
      end
      if uuid then
        local c = kong.db.consumers:select({ id = id })
        if c then
          return c
        end
      end
      if by_username then
        return kong.db.consumers:select_by_username(id)
      end
    end,
  }

  local ctx = setmetatable({}, {
    __index = function(_, k)
      local c = ngx.ctx
      if k == "shared" then
        c.kong_shared = c.kong_shared or {}
        return c.kong_shared
      elseif k == "plugin" then
        c.kong_plugin = c.kong_plugin or {}
        return c.kong_plugin
      end
    end,
  })

  return {
    request = request,
    service = { request = service_request },
    response = response,
    client = client,
    ctx = ctx,
    log = make_log(),
    -- what Kong exposes to external plugins (kong/runloop/plugin_servers: exposed_api)
    nginx = { get_var = function(name) return ngx.var[name] end },
    db = { consumers = make_consumers_dao() },
    cache = make_cache(),
    worker_events = {
      register = function(fn, source, event)
        if source == "crud" and event == "consumers" then
          crud_handlers[#crud_handlers + 1] = fn
        end
      end,
    },
  }
end


--- Loads the plugin under the shim; `path` names the rig's JSON settings
-- ({plugin_conf = {...}, consumers = [{id, username, custom_id}],
-- preauthenticated = {id, username} or null, external = {socket, name} or
-- null}). With `external`, the plugin is the one named `name` under a plugin
-- server listening on the unix socket `socket` (mp_rpc.lua plays Kong's side),
-- given `plugin_conf` as is: its own schema is its plugin server's business.
function _M.init(path)
  local f = assert(io.open(path, "rb"))
  local settings = assert(cjson.decode(f:read("*a")))
  f:close()

  _G.kong = make_kong()
  package.loaded["kong.db.schema.typedefs"] = typedefs_stub()

  for _, c in ipairs(settings.consumers or {}) do
    add_consumer(c)
    set_groups(c)
  end

  if type(settings.preauthenticated) == "table" then
    local p = settings.preauthenticated
    preauthenticated = { id = p.id, username = p.username }
    set_groups(p)
  end
  if type(settings.later) == "table" then
    later = settings.later
  end

  kong_upstream_uri = settings.kong_upstream_uri == true
  trusted_proxy = settings.trusted_proxy == true
  for listening, public in pairs(settings.host_ports or {}) do
    host_ports[tonumber(listening)] = public
  end

  if type(settings.external) == "table" then
    external = settings.external
    conf = settings.plugin_conf or {}
    return
  end
  local schema = require "kong.plugins.edge-verifier.schema"
  conf = apply_schema(schema, settings.plugin_conf or {})
  handler = require "kong.plugins.edge-verifier.handler"
end


function _M.init_worker()
  if handler and handler.init_worker then
    handler:init_worker()
  end
end


-- What Kong's acl does with the consumer (include_consumer_groups = true):
-- none -> 401 (403 with a credential), groups outside `allow` or inside
-- `deny` -> 403, otherwise X-Consumer-Groups upstream.
local function later_acl(acl, seen)
  local consumer = kong.client.get_consumer()
  local credential = kong.client.get_credential()
  local consumer_id = (consumer or {}).id or (credential or {}).consumer_id
  if not consumer_id then
    seen.acl = credential and 403 or 401
    if credential then
      return kong.response.error(403, "You cannot consume this service")
    end
    return kong.response.error(401, "Unauthorized")
  end
  local names, member = {}, {}
  for i, g in ipairs(kong.client.get_consumer_groups() or {}) do
    names[i] = g.name
    member[g.name] = true
  end
  local allowed = acl.allow == nil
  for _, name in ipairs(acl.allow or {}) do
    allowed = allowed or member[name] == true
  end
  for _, name in ipairs(acl.deny or {}) do
    allowed = allowed and not member[name]
  end
  seen.acl = allowed and 200 or 403
  if not allowed then
    return kong.response.error(403, "You cannot consume this service")
  end
  ngx.req.set_header("X-Consumer-Groups", table.concat(names, ", "))
end


-- What Kong's rate-limiting does with the consumer (limit_by = consumer):
-- the identifier is the consumer's id, else the credential's, else the IP.
local function later_rate_limiting(rl, seen)
  local identifier = (kong.client.get_consumer() or kong.client.get_credential() or {}).id
                     or kong.client.get_ip()
  rate_counts[identifier] = (rate_counts[identifier] or 0) + 1
  seen.rate_limit_identifier = identifier
  if rate_counts[identifier] > rl.minute then
    return kong.response.error(429, "API rate limit exceeded")
  end
end


local function run_later()
  local consumer = kong.client.get_consumer()
  local seen = {
    uri = ngx.var.request_uri,
    consumer = consumer or cjson.null,
    credential = kong.client.get_credential() or cjson.null,
    groups = kong.client.get_consumer_groups() or cjson.null,
  }
  later_count = later_count + 1
  if later_count <= MAX_RECORDED_CALLS then
    later_seen[later_count] = seen
  end
  if later.acl then
    later_acl(later.acl, seen)
    if ngx.ctx.shim_exited then
      return
    end
  end
  if later.rate_limiting then
    later_rate_limiting(later.rate_limiting, seen)
  end
end


function _M.access()
  if kong_upstream_uri then
    -- Kong's router runs before any plugin's access phase
    ngx.var.upstream_uri = kong_upstream_target()
  end
  if preauthenticated then
    -- what an authenticator with a higher priority (key-auth) leaves behind
    kong.client.authenticate(preauthenticated, { id = "earlier-credential" })
    ngx.req.set_header("X-Consumer-ID", preauthenticated.id)
    ngx.req.set_header("X-Consumer-Username", preauthenticated.username)
  end
  if external then
    require("mp_rpc").handle_event(external.socket, external.name, conf, "access")
  else
    handler:access(conf)
  end
  if later and not ngx.ctx.shim_exited then
    return run_later()
  end
end


--- GET /__shim/later: what the plugins after this one saw, per request.
function _M.report_later()
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode({ seen = later_seen, count = later_count }))
end


--- GET /__shim/db: datastore reads so far (what kong.cache did not answer).
function _M.report_db()
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode({ selects = db_selects }))
end


--- POST /__shim/consumers {id, username?, custom_id?}: an Admin API update
-- of one consumer, then the "crud" event every worker gets (Kong's own
-- handler first: it invalidates the consumer's username keys).
function _M.update_consumer()
  ngx.req.read_body()
  local new = assert(cjson.decode(ngx.req.get_body_data()))
  local old = consumers_by_id[new.id]
  if old then
    consumers_by_id[old.id] = nil
    if old.username then consumers_by_username[old.username] = nil end
    if old.custom_id then consumers_by_custom_id[old.custom_id] = nil end
  end
  local entity = add_consumer(new)
  local dao = kong.db.consumers
  for _, e in ipairs({ old or {}, entity }) do
    if e.username then
      kong.cache:invalidate(dao:cache_key(e.username))
    end
  end
  kong.cache:invalidate(dao:cache_key(entity.id))
  local data = { operation = old and "update" or "create", entity = entity, old_entity = old }
  for _, fn in ipairs(crud_handlers) do
    fn(data)
  end
  ngx.say("{}")
end


function _M.header_filter()
  if handler and handler.header_filter then
    return handler:header_filter(conf)
  end
end


--- GET /__shim/authenticated: this worker's kong.client.authenticate calls.
function _M.report_authenticated()
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode({ calls = authenticated, count = authenticated_count }))
end


--- GET /__shim/cache: the decision cache's counters in this worker.
function _M.report_cache()
  ngx.header["Content-Type"] = "application/json"
  ngx.say(cjson.encode(require("kong.plugins.edge-verifier.decision_cache").stats()))
end


return _M
