-- kong-pongo spec for the edge-verifier plugin, for people with Docker; CI
-- runs the same plugin in plain nginx instead (tests/kong/).
--
--   cd kong && KONG_PLUGINS=bundled,edge-verifier pongo run ./spec
--
-- A mock verifier (an nginx server block) stands in for the real one.

local helpers = require "spec.helpers"
local cjson = require "cjson"

local PLUGIN_NAME = "edge-verifier"
local VERIFIER_PORT = 16989

local fixtures = {
  http_mock = {
    verifier = [[
      server {
        server_name edge_verifier_mock;
        listen ]] .. VERIFIER_PORT .. [[;
        keepalive_requests 1000;

        location /v1/forward-auth {
          content_by_lua_block {
            local auth = ngx.req.get_headers()["authorization"]
            ngx.header["X-Verifier-Reason"] = "ok"
            -- what the verifier's `upstream.consumer` adds to an allow
            local names = {
              ["Bearer consumer"] = { "X-Kong-Consumer-Username", "alice" },
              ["Bearer custom"] = { "X-Kong-Consumer-Custom-Id", "cust-9" },
              ["Bearer stranger"] = { "X-Kong-Consumer-Username", "mallory" },
            }
            if auth == "Bearer good" or names[auth] then
              ngx.header["X-Authenticated-Userid"] = "user-1"
              ngx.header["X-Authenticated-Scope"] = "read write"
              ngx.header["X-Authenticated-Issuer"] = "http://issuer.test"
              local named = names[auth]
              if named then
                -- (no two closing square brackets in a row here: they would end the long string)
                local name, value = named[1], named[2]
                ngx.header[name] = value
              end
              return ngx.exit(200)
            end
            ngx.status = 401
            ngx.header["X-Verifier-Reason"] = "invalid_token"
            ngx.header["WWW-Authenticate"] = 'Bearer realm="verifier", error="invalid_token"'
            ngx.header["Content-Type"] = "application/json"
            ngx.header["Cache-Control"] = "no-store"
            ngx.print('{"error":"invalid_token","error_description":"bad"}')
            return ngx.exit(401)
          }
        }
      }
    ]],
  },
}


for _, strategy in helpers.all_strategies() do
  if strategy ~= "cassandra" then
    describe(PLUGIN_NAME .. ": (access) [#" .. strategy .. "]", function()
      local client

      lazy_setup(function()
        local bp = helpers.get_db_utils(strategy == "off" and "postgres" or strategy,
                                        nil, { PLUGIN_NAME, "acl" })

        local alice = bp.consumers:insert { username = "alice", custom_id = "cust-9" }
        bp.acls:insert { consumer = { id = alice.id }, group = "readers" }
        local guest = bp.consumers:insert { username = "guest" }

        local anonymous = bp.routes:insert { hosts = { "anonymous.test" } }
        bp.plugins:insert {
          name = PLUGIN_NAME,
          route = { id = anonymous.id },
          config = { url = "http://127.0.0.1:" .. VERIFIER_PORT .. "/v1/forward-auth",
                     consumer_not_found = "anonymous", anonymous = guest.id },
        }

        local limited = bp.routes:insert { hosts = { "limited.test" } }
        bp.plugins:insert {
          name = PLUGIN_NAME,
          route = { id = limited.id },
          config = { url = "http://127.0.0.1:" .. VERIFIER_PORT .. "/v1/forward-auth" },
        }
        bp.plugins:insert {
          name = "rate-limiting",
          route = { id = limited.id },
          config = { minute = 1, limit_by = "consumer", policy = "local" },
        }

        local open = bp.routes:insert { hosts = { "open.test" } }
        bp.plugins:insert {
          name = PLUGIN_NAME,
          route = { id = open.id },
          config = { url = "http://127.0.0.1:" .. VERIFIER_PORT .. "/v1/forward-auth" },
        }

        local guarded = bp.routes:insert { hosts = { "acl.test" } }
        bp.plugins:insert {
          name = PLUGIN_NAME,
          route = { id = guarded.id },
          config = { url = "http://127.0.0.1:" .. VERIFIER_PORT .. "/v1/forward-auth" },
        }
        bp.plugins:insert {
          name = "acl",
          route = { id = guarded.id },
          config = { allow = { "readers" } },
        }

        local down = bp.routes:insert { hosts = { "down.test" } }
        bp.plugins:insert {
          name = PLUGIN_NAME,
          route = { id = down.id },
          config = { url = "http://127.0.0.1:1/v1/forward-auth", timeout = 200 },
        }

        local open_fail = bp.routes:insert { hosts = { "failopen.test" } }
        bp.plugins:insert {
          name = PLUGIN_NAME,
          route = { id = open_fail.id },
          config = { url = "http://127.0.0.1:1/v1/forward-auth", timeout = 200, fail_open = true },
        }

        assert(helpers.start_kong({
          database = strategy,
          nginx_conf = "spec/fixtures/custom_nginx.template",
          plugins = "bundled," .. PLUGIN_NAME,
          declarative_config = strategy == "off" and helpers.make_yaml_file() or nil,
        }, nil, nil, fixtures))
      end)

      lazy_teardown(function()
        helpers.stop_kong(nil, true)
      end)

      before_each(function()
        client = helpers.proxy_client()
      end)

      after_each(function()
        if client then client:close() end
      end)

      it("passes the verified identity upstream and the token untouched", function()
        local res = client:get("/request", {
          headers = {
            host = "open.test",
            authorization = "Bearer good",
            ["X-Authenticated-Userid"] = "spoofed",
          },
        })
        local body = assert.res_status(200, res)
        local json = cjson.decode(body)
        assert.equal("user-1", json.headers["x-authenticated-userid"])
        assert.equal("read write", json.headers["x-authenticated-scope"])
        assert.equal("Bearer good", json.headers["authorization"])
      end)

      it("relays the verifier's denial exactly", function()
        local res = client:get("/request", {
          headers = { host = "open.test", authorization = "Bearer bad" },
        })
        local body = assert.res_status(401, res)
        assert.equal('Bearer realm="verifier", error="invalid_token"', res.headers["WWW-Authenticate"])
        assert.equal("invalid_token", res.headers["X-Verifier-Reason"])
        assert.equal("no-store", res.headers["Cache-Control"])
        assert.equal('{"error":"invalid_token","error_description":"bad"}', body)
      end)

      it("authenticates the named consumer so acl can key on it", function()
        local res = client:get("/request", {
          headers = { host = "acl.test", authorization = "Bearer consumer" },
        })
        local body = assert.res_status(200, res)
        local json = cjson.decode(body)
        assert.equal("alice", json.headers["x-consumer-username"])
      end)

      it("finds the consumer by custom_id too", function()
        local res = client:get("/request", {
          headers = { host = "acl.test", authorization = "Bearer custom" },
        })
        local body = assert.res_status(200, res)
        local json = cjson.decode(body)
        assert.equal("alice", json.headers["x-consumer-username"])
        assert.equal("cust-9", json.headers["x-consumer-custom-id"])
        assert.equal("user-1", json.headers["x-credential-identifier"])
        assert.is_nil(json.headers["x-kong-consumer-custom-id"])
      end)

      it("refuses a consumer Kong does not know", function()
        local res = client:get("/request", {
          headers = { host = "open.test", authorization = "Bearer stranger" },
        })
        local body = assert.res_status(403, res)
        assert.same({ message = "The verified identity is not a known consumer" }, cjson.decode(body))
        assert.equal("no-store", res.headers["Cache-Control"])  -- the consumer may exist on the next request
      end)

      it("passes a consumer Kong does not know as the anonymous consumer when configured", function()
        local res = client:get("/request", {
          headers = { host = "anonymous.test", authorization = "Bearer stranger",
                      ["X-Consumer-Username"] = "root" },
        })
        local body = assert.res_status(200, res)
        local json = cjson.decode(body)
        assert.equal("guest", json.headers["x-consumer-username"])
        assert.equal("true", json.headers["x-anonymous-consumer"])
        assert.is_nil(json.headers["x-credential-identifier"])
      end)

      it("lets rate-limiting count by the named consumer", function()
        local first = client:get("/request", {
          headers = { host = "limited.test", authorization = "Bearer consumer" },
        })
        assert.res_status(200, first)
        local second = client:get("/request", {
          headers = { host = "limited.test", authorization = "Bearer custom" },
        })
        assert.res_status(429, second)  -- the same consumer, named by custom_id
      end)

      it("lets acl refuse an identity that names no consumer", function()
        local res = client:get("/request", {
          headers = { host = "acl.test", authorization = "Bearer good" },
        })
        assert.is_true(res.status == 401 or res.status == 403)
      end)

      it("fails closed when the verifier is unreachable", function()
        local res = client:get("/request", {
          headers = { host = "down.test", authorization = "Bearer good" },
        })
        assert.res_status(503, res)
        -- never kept by a cache, and when to retry, as nginx's and Envoy's shipped configurations answer
        assert.equal("no-store", res.headers["Cache-Control"])
        assert.equal("1", res.headers["Retry-After"])
      end)

      it("fails open only when configured to", function()
        local res = client:get("/request", {
          headers = { host = "failopen.test", authorization = "Bearer good" },
        })
        local body = assert.res_status(200, res)
        local json = cjson.decode(body)
        assert.is_nil(json.headers["x-authenticated-userid"])
      end)
    end)
  end
end
