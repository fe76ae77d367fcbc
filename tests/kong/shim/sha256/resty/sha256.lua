-- Test double for lua-resty-string's resty.sha256 (Kong ships it; Debian
-- does not package it), so the rig can run the hashed-cache-key branch.
-- Calls the SHA256() one-shot of the OpenSSL libcrypto that nginx links.

local ffi = require "ffi"

ffi.cdef [[
unsigned char *SHA256(const unsigned char *d, size_t n, unsigned char *md);
]]

local _M = {}
local mt = { __index = _M }

function _M.new(_)
  return setmetatable({ parts = {} }, mt)
end

function _M:update(s)
  self.parts[#self.parts + 1] = s
  return true
end

function _M:final()
  local data = table.concat(self.parts)
  local md = ffi.new("unsigned char[32]")
  ffi.C.SHA256(data, #data, md)
  return ffi.string(md, 32)
end

return _M
