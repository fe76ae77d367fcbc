-- Test double for lua-resty-string's resty.sha256 (Kong ships it; Debian
-- does not package it), so the rig can hash client certificates (mutual TLS).
-- Same API and the same calls as the real module (new/update/final/reset over
-- SHA256_Init/Update/Final of the OpenSSL libcrypto that nginx links, one
-- digest buffer per worker), so what the rig measures is what Kong would run.

local ffi = require "ffi"

local ffi_new = ffi.new
local ffi_str = ffi.string
local C = ffi.C
local setmetatable = setmetatable

ffi.cdef [[
typedef struct SHA256state_st {
  unsigned int h[8];
  unsigned int Nl, Nh;
  unsigned int data[16];
  unsigned int num, md_len;
} SHA256_CTX;

int SHA256_Init(SHA256_CTX *c);
int SHA256_Update(SHA256_CTX *c, const void *data, size_t len);
int SHA256_Final(unsigned char *md, SHA256_CTX *c);
]]

local DIGEST_LEN = 32
local buf = ffi_new("char[?]", DIGEST_LEN)
local ctx_ptr_type = ffi.typeof("SHA256_CTX[1]")

local _M = { _VERSION = "0.0-test-double" }
local mt = { __index = _M }

function _M.new(_)
  local ctx = ffi_new(ctx_ptr_type)
  if C.SHA256_Init(ctx) == 0 then
    return nil
  end
  return setmetatable({ _ctx = ctx }, mt)
end

function _M.update(self, s)
  return C.SHA256_Update(self._ctx, s, #s) == 1
end

function _M.final(self)
  if C.SHA256_Final(buf, self._ctx) == 1 then
    return ffi_str(buf, DIGEST_LEN)
  end
  return nil
end

function _M.reset(self)
  return C.SHA256_Init(self._ctx) == 1
end

return _M
