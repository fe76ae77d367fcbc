-- The slice of Kong's PDK the edge-verifier plugin uses, over plain ngx.*,
-- so its handler.lua runs unmodified in Debian's nginx + lua module.
--
-- Semantics follow Kong 3.x's kong/pdk/*.lua where the plugin can tell the
-- difference: header names are case-insensitive, kong.response.exit encodes
-- a table body as JSON, kong.response.error answers {"message": ...},
-- kong.client.authenticate stores consumer and credential in ngx.ctx.
-- Everything the plugin does to Kong's state is recorded per worker and can be
-- read back at /__shim/authenticated (the rig runs one worker).

local cjson = require "cjson.safe"

local ngx = ngx
local type = type
local pairs = pairs
local tostring = tostring
local setmetatable = setmetatable

local _M = {}

local handler
local conf
local consumers_by_id, consumers_by_username = {}, {}
local authenticated = {}   -- this worker's first kong.client.authenticate calls
local authenticated_count = 0
-- Calls kept for /__shim/authenticated; the rest are only counted, so a
-- benchmark's million requests do not grow the worker's heap (Kong's own
-- authenticate keeps nothing past the request).
local MAX_RECORDED_CALLS = 100
local preauthenticated     -- a consumer "an earlier plugin" authenticated


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
    end
    out[name] = v
  end
  for name in pairs(given) do
    if not known[name] then
      error("schema violation: config." .. name .. " is an unknown field")
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


local function make_kong()
  local request = {
    get_header = function(name) return first(ngx.req.get_headers()[name]) end,
    get_headers = function(max) return ngx.req.get_headers(max) end,
    get_method = function() return ngx.req.get_method() end,
    -- the path as the client sent it, before any decoding
    get_path = function() return (ngx.var.request_uri:match("^[^?]*")) end,
    get_raw_query = function() return ngx.var.args or "" end,
    get_scheme = function() return ngx.var.scheme end,
    get_host = function() return ngx.var.host end,
    get_port = function() return tonumber(ngx.var.server_port) end,
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
    authenticate = function(consumer, credential)
      if consumer == nil and credential == nil then
        error("either credential or consumer must be provided", 2)
      end
      local ctx = ngx.ctx
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
      local c = consumers_by_id[id]
      if not c and by_username then
        c = consumers_by_username[id]
      end
      return c
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
  }
end


--- Loads the plugin under the shim; `path` names the rig's JSON settings
-- ({plugin_conf = {...}, consumers = [{id, username, custom_id}],
-- preauthenticated = {id, username} or null}).
function _M.init(path)
  local f = assert(io.open(path, "rb"))
  local settings = assert(cjson.decode(f:read("*a")))
  f:close()

  _G.kong = make_kong()
  package.loaded["kong.db.schema.typedefs"] = typedefs_stub()

  for _, c in ipairs(settings.consumers or {}) do
    consumers_by_id[c.id] = c
    if c.username then
      consumers_by_username[c.username] = c
    end
  end

  if type(settings.preauthenticated) == "table" then
    preauthenticated = settings.preauthenticated
  end

  local schema = require "kong.plugins.edge-verifier.schema"
  conf = apply_schema(schema, settings.plugin_conf or {})
  handler = require "kong.plugins.edge-verifier.handler"
end


function _M.access()
  if preauthenticated then
    -- what an authenticator with a higher priority (key-auth) leaves behind
    kong.client.authenticate(preauthenticated, { id = "earlier-credential" })
    ngx.req.set_header("X-Consumer-ID", preauthenticated.id)
    ngx.req.set_header("X-Consumer-Username", preauthenticated.username)
  end
  return handler:access(conf)
end


function _M.header_filter()
  if handler.header_filter then
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
