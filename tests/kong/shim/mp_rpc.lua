-- Kong's side of an external plugin (kong/runloop/plugin_servers/rpc/mp_rpc.lua
-- of Kong 3.x), over the shim's PDK, so that a plugin under a REAL plugin server
-- (kong-python-pluginserver) runs in real nginx as Kong runs it.
--
-- As Kong: every RPC is [0, id, method, {args}] on its own connection to the
-- plugin server's unix socket (kept alive), answered [1, id, error, result];
-- `plugin.StartInstance` once per configuration in the worker (Config: the
-- configuration as JSON); then per request `plugin.HandleEvent` and one
-- `plugin.Step*` per PDK call the plugin makes, with the PDK method looked up
-- by its dotted name in the `kong` global and called with the args unpacked,
-- the header and query maps fixed (fix_mmap) and typed Step methods
-- (StepConsumer, StepCredential, StepMultiMap) as Kong's get_step_method. A
-- PDK call that raises is not caught: as in Kong, the access phase fails (500).
--
-- MessagePack: the subset Kong and the plugin server exchange (nil, booleans,
-- integers, floats, strings, binary, arrays, maps). A Lua string is packed as
-- a msgpack str, byte for byte, as lua-MessagePack does in Kong; a table with
-- keys 1..n (or none) is an array, any other a map.

local ffi = require "ffi"
local cjson = require "cjson.safe"

local ngx = ngx
local byte, char, sub = string.byte, string.char, string.sub
local concat = table.concat
local floor = math.floor
local unpack = unpack
local type, pairs, next = type, pairs, next

local _M = {}

local EMPTY_ARRAY, EMPTY_MAP = {}, {}  -- markers: fix_mmap's mp_empty_array / mp_empty_map

-- --------------------------------------------------------------------------- packing

local function be(n, bytes)
  local out = {}
  for i = bytes, 1, -1 do
    out[i] = char(n % 256)
    n = floor(n / 256)
  end
  return concat(out)
end

local double_buf = ffi.new("double[1]")
local function pack_double(x)
  double_buf[0] = x
  local raw = ffi.string(double_buf, 8)
  return char(0xcb) .. raw:reverse()  -- little-endian hosts (x86_64, aarch64)
end

local pack

local function is_array(t)
  local n = 0
  for _ in pairs(t) do
    n = n + 1
  end
  for i = 1, n do
    if t[i] == nil then
      return false, n
    end
  end
  return true, n
end

function pack(v, out)
  local t = type(v)
  if v == nil or v == cjson.null then
    out[#out + 1] = char(0xc0)
  elseif t == "boolean" then
    out[#out + 1] = char(v and 0xc3 or 0xc2)
  elseif t == "number" then
    if v == floor(v) and v >= -2^63 and v < 2^64 then
      if v >= 0 then
        if v < 128 then out[#out + 1] = char(v)
        elseif v < 2^8 then out[#out + 1] = char(0xcc) .. be(v, 1)
        elseif v < 2^16 then out[#out + 1] = char(0xcd) .. be(v, 2)
        elseif v < 2^32 then out[#out + 1] = char(0xce) .. be(v, 4)
        else out[#out + 1] = char(0xcf) .. be(v, 8) end
      elseif v >= -32 then
        out[#out + 1] = char(256 + v)
      elseif v >= -2^31 then
        out[#out + 1] = char(0xd2) .. be(2^32 + v, 4)
      else
        out[#out + 1] = char(0xd3) .. be(2^64 + v, 8)
      end
    else
      out[#out + 1] = pack_double(v)
    end
  elseif t == "string" then
    local n = #v
    if n < 32 then out[#out + 1] = char(0xa0 + n)
    elseif n < 2^8 then out[#out + 1] = char(0xd9) .. be(n, 1)
    elseif n < 2^16 then out[#out + 1] = char(0xda) .. be(n, 2)
    else out[#out + 1] = char(0xdb) .. be(n, 4) end
    out[#out + 1] = v
  elseif t == "table" then
    if v == EMPTY_ARRAY then
      out[#out + 1] = char(0x90)
      return
    elseif v == EMPTY_MAP then
      out[#out + 1] = char(0x80)
      return
    end
    local array, n = is_array(v)
    if array then
      if n < 16 then out[#out + 1] = char(0x90 + n)
      elseif n < 2^16 then out[#out + 1] = char(0xdc) .. be(n, 2)
      else out[#out + 1] = char(0xdd) .. be(n, 4) end
      for i = 1, n do
        pack(v[i], out)
      end
    else
      if n < 16 then out[#out + 1] = char(0x80 + n)
      elseif n < 2^16 then out[#out + 1] = char(0xde) .. be(n, 2)
      else out[#out + 1] = char(0xdf) .. be(n, 4) end
      for k, x in pairs(v) do
        pack(k, out)
        pack(x, out)
      end
    end
  else
    error("cannot pack a " .. t)
  end
end

local function packed(v)
  local out = {}
  pack(v, out)
  return concat(out)
end

-- --------------------------------------------------------------------------- unpacking

local SHORT = {}  -- raised when the buffer ends inside an object: read more

local function uint(s, i, bytes)
  if i + bytes - 1 > #s then
    error(SHORT)
  end
  local n = 0
  for j = i, i + bytes - 1 do
    n = n * 256 + byte(s, j)
  end
  return n
end

local function signed(s, i, bytes)
  local n = uint(s, i, bytes)
  local top = 2 ^ (8 * bytes)
  return n >= top / 2 and n - top or n
end

local unpack_at

local function raw(s, i, n)
  if i + n - 1 > #s then
    error(SHORT)
  end
  return sub(s, i, i + n - 1), i + n
end

local function array(s, i, n)
  local t = {}
  for k = 1, n do
    t[k], i = unpack_at(s, i)
  end
  return t, i
end

local function map(s, i, n)
  local t = {}
  for _ = 1, n do
    local k, v
    k, i = unpack_at(s, i)
    v, i = unpack_at(s, i)
    if k ~= nil then
      t[k] = v
    end
  end
  return t, i
end

local float_buf = ffi.new("float[1]")

function unpack_at(s, i)
  local b = byte(s, i)
  if not b then
    error(SHORT)
  end
  i = i + 1
  if b < 0x80 then return b, i
  elseif b >= 0xe0 then return b - 256, i
  elseif b >= 0xa0 and b < 0xc0 then return raw(s, i, b - 0xa0)
  elseif b >= 0x90 and b < 0xa0 then return array(s, i, b - 0x90)
  elseif b >= 0x80 and b < 0x90 then return map(s, i, b - 0x80)
  elseif b == 0xc0 then return nil, i
  elseif b == 0xc2 then return false, i
  elseif b == 0xc3 then return true, i
  elseif b == 0xc4 or b == 0xd9 then return raw(s, i + 1, uint(s, i, 1))
  elseif b == 0xc5 or b == 0xda then return raw(s, i + 2, uint(s, i, 2))
  elseif b == 0xc6 or b == 0xdb then return raw(s, i + 4, uint(s, i, 4))
  elseif b == 0xca then
    local r = raw(s, i, 4)
    ffi.copy(float_buf, r:reverse(), 4)
    return tonumber(float_buf[0]), i + 4
  elseif b == 0xcb then
    local r = raw(s, i, 8)
    ffi.copy(double_buf, r:reverse(), 8)
    return tonumber(double_buf[0]), i + 8
  elseif b == 0xcc then return uint(s, i, 1), i + 1
  elseif b == 0xcd then return uint(s, i, 2), i + 2
  elseif b == 0xce then return uint(s, i, 4), i + 4
  elseif b == 0xcf then return uint(s, i, 8), i + 8
  elseif b == 0xd0 then return signed(s, i, 1), i + 1
  elseif b == 0xd1 then return signed(s, i, 2), i + 2
  elseif b == 0xd2 then return signed(s, i, 4), i + 4
  elseif b == 0xd3 then return signed(s, i, 8), i + 8
  elseif b == 0xdc then return array(s, i + 2, uint(s, i, 2))
  elseif b == 0xdd then return array(s, i + 4, uint(s, i, 4))
  elseif b == 0xde then return map(s, i + 2, uint(s, i, 2))
  elseif b == 0xdf then return map(s, i + 4, uint(s, i, 4))
  end
  error(("msgpack type 0x%02x is not one Kong and its plugin servers exchange"):format(b))
end

-- --------------------------------------------------------------------------- Kong's Rpc

local socket_path
local msg_id = 0
local instances = {}  -- plugin name -> instance id (this worker's, as Kong's get_instance_id)

local function call(method, args)
  msg_id = msg_id + 1
  local id = msg_id
  local c, err = ngx.socket.connect("unix:" .. socket_path)
  if not c then
    return nil, "trying to connect: " .. tostring(err)
  end
  local ok, serr = c:send(packed({ 0, id, method, { args } }))
  if not ok then
    c:close()
    return nil, serr
  end
  local buf = ""
  while true do
    local done, msg, _ = pcall(unpack_at, buf, 1)
    if done then
      assert(msg[1] == 1 and msg[2] == id, "unexpected RPC response from the plugin server")
      c:setkeepalive()
      if msg[3] ~= nil then
        return nil, tostring(msg[3])
      end
      return msg[4]
    elseif msg ~= SHORT then
      c:close()
      error(msg)
    end
    local data, rerr = c:receiveany(65536)
    if not data then
      c:close()
      return nil, "no data: " .. tostring(rerr)
    end
    buf = buf .. data
  end
end

local function fix_mmap(t)
  if type(t) ~= "table" or next(t) == nil then
    return EMPTY_MAP
  end
  local o = {}
  for k, v in pairs(t) do
    if v == true then
      o[k] = EMPTY_ARRAY
    elseif type(v) == "string" then
      o[k] = { v }
    else
      o[k] = v
    end
  end
  return o
end

local MUST_FIX = {
  ["kong.request.get_query"] = fix_mmap,
  ["kong.request.get_headers"] = fix_mmap,
  ["kong.response.get_headers"] = fix_mmap,
}

local STEP_FOR = {
  ["kong.client.get_credential"] = "plugin.StepCredential",
  ["kong.client.load_consumer"] = "plugin.StepConsumer",
  ["kong.client.get_consumer"] = "plugin.StepConsumer",
  ["kong.client.authenticate"] = "plugin.StepCredential",
  ["kong.request.get_query"] = "plugin.StepMultiMap",
  ["kong.request.get_headers"] = "plugin.StepMultiMap",
  ["kong.response.get_headers"] = "plugin.StepMultiMap",
}

local function pdk_method(name)
  local f = _G
  for part in name:gmatch("[^%.]+") do
    f = type(f) == "table" and f[part] or nil
  end
  return f
end

local function call_pdk_method(name, args)
  local method = pdk_method(name)
  if not method then
    kong.log.err("could not find pdk method: ", name)
    return
  end
  local ret
  if type(args) == "table" then
    ret = method(unpack(args))
  else
    ret = method(args)
  end
  local fix = MUST_FIX[name]
  if fix then
    ret = fix(ret)
  end
  return ret
end

local function instance_id(name, conf)
  local id = instances[name]
  if id then
    return id
  end
  local status, err = call("plugin.StartInstance", { Name = name, Config = cjson.encode(conf) })
  if not status then
    -- Kong's get_instance_id raises: the access phase fails, the request is answered 500
    error("could not start an instance of " .. name .. ": " .. tostring(err))
  end
  instances[name] = status.Id
  return status.Id
end

--- Runs `phase` of the external plugin `name` (configuration `conf`) served on
-- the unix socket `path`, as Kong's Rpc:handle_event: an RPC error is logged
-- and the request goes on (Kong's behaviour), a PDK call that raises fails it.
function _M.handle_event(path, name, conf, phase)
  socket_path = path
  local step, err = call("plugin.HandleEvent", { InstanceId = instance_id(name, conf), EventName = phase })
  if not step then
    return kong.log.err(err)
  end
  local event_id = step.EventId
  while step.Data ~= "ret" do
    local method = step.Data.Method
    local res = call_pdk_method(method, step.Data.Args)
    step, err = call(STEP_FOR[method] or "plugin.Step", { EventId = event_id, Data = res })
    if not step then
      return kong.log.err(err)
    end
  end
end


return _M
