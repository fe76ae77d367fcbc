"""Rig for the Kong plugin: real nginx runs kong/plugins/edge-verifier/handler.lua unmodified.

Debian's nginx + libnginx-mod-http-lua load the plugin under tests/kong/shim/kong_shim.lua (the PDK
functions it uses, over ngx.*) in front of an echo upstream that answers with the headers it received.
With `external=`, the same nginx and PDK run an external plugin under its real plugin server instead
(tests/kong/shim/mp_rpc.lua plays Kong's MessagePack-RPC side; tests/kong/python_edge.py).

Fixtures:
  echo_upstream        -> port of a Python upstream answering JSON {"method", "path", "headers": [[k, v]...]}
  standin_verifier     -> StandinVerifier: a forward-auth stand-in for fault injection (slow, chunked, counts
                          TCP connections, records what it was sent); `.url` is its forward-auth URL
  start_nginx          -> start_nginx(plugin_conf, upstream_port, *, consumers=(), preauthenticated=None,
                          later=None, with_sha256=False) -> base URL
                          ("http://127.0.0.1:PORT"); plugin_conf["url"] picks the forward-auth target, so
                          pointing the same tests at the real verifier is one argument.
Shim endpoints on the base URL: GET /__shim/authenticated (kong.client.authenticate calls),
GET /__shim/cache (decision-cache counters), GET /__shim/later (what acl / rate-limiting after the plugin
saw), GET /__shim/db (datastore reads), POST /__shim/consumers (update a consumer, as the Admin API).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import free_port

REPO = Path(__file__).resolve().parents[2]
SHIM_DIR = Path(__file__).resolve().parent / "shim"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LUA_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")
# Debian's lua-resty-core / lrucache / cjson live here
SYSTEM_LUA_PATH = "/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua"
SYSTEM_LUA_CPATH = "/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;/usr/lib/aarch64-linux-gnu/lua/5.1/?.so"
# How long nginx may take to start listening (seconds)
NGINX_START_TIMEOUT = 10.0


def _module_dir() -> str | None:
    for d in LUA_MODULE_DIRS:
        if os.path.exists(os.path.join(d, "ngx_http_lua_module.so")):
            return d
    return None


@pytest.fixture(scope="session", autouse=True)
def _require_nginx_lua() -> None:
    if os.path.exists(NGINX) and _module_dir():
        return
    msg = "nginx with libnginx-mod-http-lua is missing (run .ci/setup.d/30-nginx-lua.sh)"
    if os.environ.get("CI"):
        pytest.fail(msg)  # CI installs it; a skip there would hide a broken setup
    pytest.skip(msg)


# --------------------------------------------------------------------------- echo upstream


# http.server answers 431 past 100 request headers; the spoofing tests send more
http.client._MAXHEADERS = 2000  # type: ignore[attr-defined]


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body": body.decode("utf-8", "replace"),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _echo

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def echo_upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- stand-in verifier

DENY_BODY = json.dumps({"error": "invalid_token", "error_description": "the token is not valid"})


BIG_CLAIM_BYTES = 4096  # the `big-cached` answer's claim: a mapped header may be up to 4 KiB


# The stand-in's `foreign` allow: the identity family (the signed assertion, a name twice) and names outside it that
# an answer might carry, none of which a plugin may hand to the upstream or (but for the nonce) to the client.
FOREIGN = (
    ("X-Authenticated-Identity", "eyJhbGciOiJFUzI1NiJ9.e30.sig"),
    ("X-Authenticated-Roles", "reader"),
    ("x-authenticated-roles", "admin"),
    ("X-Forwarded-User", "root"),
    ("X-Consumer-Groups", "admins"),
    ("X-Consumer-Username", "root"),
    ("X-Remote-User", "root"),
    ("Set-Cookie", "session=verifier"),
    ("Location", "https://evil.example/"),
    ("Access-Control-Allow-Origin", "*"),
)


class StandinVerifier:
    """A forward-auth stand-in: allows `Bearer good`, answers 401 otherwise; fault injection by token.

    Tokens: good (allow, identity headers), consumer (allow + X-Kong-Consumer-Username: alice),
    username=NAME / custom_id=VALUE (allow + X-Kong-Consumer-Username / -Custom-Id, as the verifier's
    `upstream.consumer` sends them), both (names alice both ways), twice (X-Kong-Consumer-Username twice),
    client-username=NAME (allow with an empty user id, naming consumer NAME),
    cached (allow with Cache-Control: private, max-age=30), chunked (allow, chunked body),
    slow (answers after `slow_seconds`), slow-cached (answers after `slow_seconds` with Cache-Control: private,
    max-age=`slow_max_age`), big-cached (allow with a 4 KiB X-Authenticated-Email, its own for each request target,
    and Cache-Control: private, max-age=30), ratelimited (429 with Retry-After and RateLimit headers),
    nonce (allow with a DPoP-Nonce for the client), nonce-cached (allow with a new DPoP-Nonce each time and
    Cache-Control: private, max-age=30), http10 (HTTP/1.0 allow, body delimited by close),
    deny-cached (403 with Cache-Control: private, max-age=30), client (allow with an empty user id),
    foreign (allow naming, besides identity, the signed assertion X-Authenticated-Identity, X-Authenticated-Roles
    twice and headers outside the X-Authenticated- family for the upstream and the client: `FOREIGN`),
    status=NNN (answers status NNN with a challenge, as an answer of no known meaning),
    crash (no answer: the connection closed and new ones refused, as when the verifier dies on the request);
    anything else: 401 with two challenges.
    """

    def __init__(self, *, idle_timeout: float | None = None, port: int = 0) -> None:
        self.connections = 0
        self.closed = 0  # connections this side has closed (its idle timeout, or the client's close)
        self.requests: list[dict[str, Any]] = []
        self.slow_seconds = 2.0
        self.slow_max_age = 2
        self.nonces = itertools.count()
        self._lock = threading.Lock()
        verifier = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # closes a keep-alive connection idle this long (seconds), like a server's idle timeout
            timeout = idle_timeout

            def setup(self) -> None:
                super().setup()
                with verifier._lock:
                    verifier.connections += 1

            def do_GET(self) -> None:
                verifier._record(self)
                verifier._answer(self)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def shutdown_request(self, request: Any) -> None:
                super().shutdown_request(request)
                with verifier._lock:
                    verifier.closed += 1

        self._server = Server(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/v1/forward-auth"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _record(self, h: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(
                {"method": h.command, "path": h.path, "headers": [[k, v] for k, v in h.headers.items()]}
            )

    @staticmethod
    def _send(h: http.server.BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], body: str) -> None:
        data = body.encode()
        h.send_response(status)
        for k, v in headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        auth = h.headers.get("Authorization", "")
        token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
        identity = [
            ("X-Authenticated-Userid", "user-1"),
            ("X-Authenticated-Scope", "read write"),
            ("X-Authenticated-Issuer", "http://127.0.0.1:9400"),
            ("X-Verifier-Reason", "ok"),
        ]
        if token == "good":
            self._send(h, 200, [*identity, ("Cache-Control", "no-store")], "")
        elif token == "consumer":
            self._send(h, 200, [*identity, ("X-Kong-Consumer-Username", "alice")], "")
        elif token.startswith(("username=", "custom_id=")):
            field, _, value = token.partition("=")
            name = "X-Kong-Consumer-Username" if field == "username" else "X-Kong-Consumer-Custom-Id"
            self._send(h, 200, [*identity, (name, value), ("Cache-Control", "no-store")], "")
        elif token.startswith("client-username="):
            client = [("X-Authenticated-Userid", ""), *identity[1:]]
            name = token.partition("=")[2]
            self._send(h, 200, [*client, ("X-Kong-Consumer-Username", name), ("Cache-Control", "no-store")], "")
        elif token == "both":
            both = [("X-Kong-Consumer-Username", "alice"), ("X-Kong-Consumer-Custom-Id", "cust-9")]
            self._send(h, 200, [*identity, *both], "")
        elif token == "twice":
            twice = [("X-Kong-Consumer-Username", "alice"), ("X-Kong-Consumer-Username", "bob")]
            self._send(h, 200, [*identity, *twice], "")
        elif token == "cached":
            self._send(h, 200, [*identity, ("Cache-Control", "private, max-age=30")], "")
        elif token == "client":  # a client-credentials token: no `sub`, so an empty user id
            client = [("X-Authenticated-Userid", ""), *identity[1:]]
            self._send(h, 200, [*client, ("Cache-Control", "no-store")], "")
        elif token == "nonce":
            self._send(h, 200, [*identity, ("DPoP-Nonce", "n-123")], "")
        elif token == "nonce-cached":
            nonce = ("DPoP-Nonce", f"n-{next(self.nonces)}")
            self._send(h, 200, [*identity, nonce, ("Cache-Control", "private, max-age=30")], "")
        elif token == "foreign":
            self._send(h, 200, [*identity, *FOREIGN, ("Cache-Control", "no-store")], "")
        elif token.startswith("status="):
            challenge = ("WWW-Authenticate", 'Bearer realm="verifier"')
            self._send(h, int(token.partition("=")[2]), [challenge, ("Cache-Control", "no-store")], "{}")
        elif token == "crash":  # the verifier dies holding this request: no answer, nothing accepted any more
            self.stop_accepting()
            h.close_connection = True
        elif token == "slow":
            time.sleep(self.slow_seconds)
            with contextlib.suppress(OSError):
                self._send(h, 200, identity, "")
        elif token == "slow-cached":
            time.sleep(self.slow_seconds)
            self._send(h, 200, [*identity, ("Cache-Control", f"private, max-age={self.slow_max_age}")], "")
        elif token == "big-cached":  # a large claim of the caller's own (a token each): kilobytes per answer
            email = ("X-Authenticated-Email", "a" * BIG_CLAIM_BYTES + h.headers.get("X-Forwarded-Uri", ""))
            self._send(h, 200, [*identity, email, ("Cache-Control", "private, max-age=30")], "")
        elif token == "chunked":
            h.send_response(200)
            for k, v in identity:
                h.send_header(k, v)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for part in (b'{"ok":', b"true}"):
                h.wfile.write(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
            h.wfile.write(b"0\r\nX-Trailer: t\r\n\r\n")
        elif token == "http10":
            # HTTP/1.0 answer with no length: the body runs to the close
            h.close_connection = True
            h.wfile.write(b"HTTP/1.0 200 OK\r\nX-Authenticated-Userid: user-10\r\n\r\nno length here")
        elif token == "deny-cached":
            self._send(
                h,
                403,
                [
                    ("WWW-Authenticate", 'Bearer realm="verifier", error="insufficient_scope"'),
                    ("Content-Type", "application/json"),
                    ("Cache-Control", "private, max-age=30"),
                    ("X-Verifier-Reason", "insufficient_scope"),
                ],
                json.dumps({"error": "insufficient_scope"}),
            )
        elif token == "ratelimited":
            self._send(
                h,
                429,
                [
                    ("Retry-After", "7"),
                    ("RateLimit-Policy", '"default";q=10;w=60'),
                    ("RateLimit", '"default";r=0;t=7'),
                    ("Content-Type", "application/json"),
                    ("Cache-Control", "no-store"),
                    ("X-Verifier-Reason", "rate_limited"),
                ],
                json.dumps({"error": "rate_limited"}),
            )
        else:
            self._send(
                h,
                401,
                [
                    ("WWW-Authenticate", 'Bearer realm="verifier", error="invalid_token"'),
                    ("WWW-Authenticate", 'DPoP algs="ES256 EdDSA"'),
                    ("Content-Type", "application/json"),
                    ("Cache-Control", "no-store"),
                    ("X-Verifier-Reason", "invalid_token"),
                ],
                DENY_BODY,
            )

    def stop_accepting(self) -> None:
        """Closes the listening socket: new connections are refused, the ones open keep being answered."""
        self._server.shutdown()
        self._server.socket.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def standin_verifier() -> Iterator[StandinVerifier]:
    v = StandinVerifier()
    yield v
    v.close()


@pytest.fixture
def make_standin_verifier() -> Iterator[Any]:
    """Factory for stand-ins with options (idle_timeout=...)."""
    made: list[StandinVerifier] = []

    def make(**kwargs: Any) -> StandinVerifier:
        v = StandinVerifier(**kwargs)
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


@pytest.fixture
def dead_url() -> str:
    """A forward-auth URL on a loopback port where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/v1/forward-auth"


# --------------------------------------------------------------------------- nginx


def shipped_kong_header_buffers() -> str:
    """nginx's `large_client_header_buffers` as the shipped Kong settings set it (in deploy/docker-compose.yml,
    `KONG_NGINX_HTTP_LARGE_CLIENT_HEADER_BUFFERS`; deploy/k8s says the same, tests/kong/test_deploy_files.py): Kong
    itself runs on nginx, and reads a client's header lines into these before any plugin runs."""
    kong = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())["services"]["kong"]
    return str(kong["environment"]["KONG_NGINX_HTTP_LARGE_CLIENT_HEADER_BUFFERS"])


NGINX_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;

events {{ worker_connections 256; }}

http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;

    # as Kong runs with the shipped settings (deploy/docker-compose.yml, deploy/k8s): KONG_NGINX_HTTP_*
    large_client_header_buffers {header_buffers};

    lua_package_path "{repo}/?.lua;{shim}/?.lua;{lua_path};;";
    lua_package_cpath "{lua_cpath};;";
    lua_socket_log_errors off;

    init_by_lua_block {{ require("kong_shim").init("{tmp}/shim.json") }}
    init_worker_by_lua_block {{ require("kong_shim").init_worker() }}

    upstream echo {{
        server 127.0.0.1:{upstream_port};
        keepalive 8;
    }}

    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        underscores_in_headers {underscores};

        location = /__shim/authenticated {{
            content_by_lua_block {{ require("kong_shim").report_authenticated() }}
        }}
        location = /__shim/cache {{
            content_by_lua_block {{ require("kong_shim").report_cache() }}
        }}
        location = /__shim/later {{
            content_by_lua_block {{ require("kong_shim").report_later() }}
        }}
        location = /__shim/db {{
            content_by_lua_block {{ require("kong_shim").report_db() }}
        }}
        location = /__shim/consumers {{
            content_by_lua_block {{ require("kong_shim").update_consumer() }}
        }}
        location / {{
            access_by_lua_block {{ require("kong_shim").access() }}
            header_filter_by_lua_block {{ require("kong_shim").header_filter() }}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            set $upstream_uri "";
            proxy_pass {proxy_target};
        }}
    }}
}}
"""


class NginxRig:
    """Starts nginx instances for one test and stops them after it; see start_nginx in the module doc."""

    def __init__(self) -> None:
        self._procs: list[tuple[subprocess.Popen[bytes], str]] = []
        self.error_logs: list[Path] = []

    def __call__(
        self,
        plugin_conf: dict[str, Any],
        upstream_port: int,
        *,
        consumers: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
        preauthenticated: dict[str, Any] | None = None,
        later: dict[str, Any] | None = None,
        with_sha256: bool = False,
        underscores_in_headers: bool = False,
        external: dict[str, str] | None = None,
        kong_upstream_uri: bool = False,
        public_port: int | None = None,
        trusted_proxy: bool = False,
    ) -> str:
        """Starts nginx running the plugin with `plugin_conf` in front of 127.0.0.1:`upstream_port`.

        consumers: the Kong consumers in the datastore ({"id", "username", "custom_id"}, and "groups": the
            names of its consumer groups).
        preauthenticated: a consumer an earlier authenticator (key-auth, say) authenticated already
            (same keys; need not be in `consumers`).
        later: what Kong's plugins after this one do with the consumer, reduced to that:
            {"acl": {"allow": [...], "deny": [...]}} (by consumer group) and/or
            {"rate_limiting": {"minute": N}} (limit_by consumer); see /__shim/later.
        with_sha256: make resty.sha256 available (Kong ships it; Debian does not): client certificate thumbprints.
        underscores_in_headers: let header names with `_` through (nginx drops them by default).
        external: {"socket", "name"}: run the external plugin `name` of the plugin server on unix socket `socket`
            instead of the Lua plugin, `plugin_conf` its configuration (tests/kong/python_edge.py).
        kong_upstream_uri: send the upstream the target Kong 3.x's router builds (the path normalized as Kong's
            router matched it, then escaped; the query as sent: kong_shim.lua's kong_upstream_target) instead of
            the raw target, which nginx's `proxy_pass` without a URI passes on.
        public_port: Kong's `port_maps` maps the rig's listening port to this one (`80:8000` behind a Kubernetes
            Service): what `kong.request.get_forwarded_port` answers.
        trusted_proxy: Kong's `trusted_ips` takes the rig's client for a proxy: its X-Forwarded-Proto/-Port are what
            `kong.request.get_forwarded_scheme`/`_port` answer (a TLS-terminating load balancer in front).
        Returns the base URL, "http://127.0.0.1:PORT".
        """
        modules = _module_dir()
        assert modules is not None
        # nginx workers run as nobody when started as root: the prefix must be traversable
        tmp = tempfile.mkdtemp(prefix="kong-rig-")
        os.chmod(tmp, 0o755)
        port = free_port()
        Path(tmp, "shim.json").write_text(
            json.dumps(
                {
                    "plugin_conf": plugin_conf,
                    "consumers": list(consumers),
                    "preauthenticated": preauthenticated,
                    "later": later,
                    "external": external,
                    "kong_upstream_uri": kong_upstream_uri,
                    "host_ports": {str(port): public_port} if public_port else {},
                    "trusted_proxy": trusted_proxy,
                }
            )
        )
        Path(tmp, "nginx.conf").write_text(
            NGINX_CONF.format(
                tmp=tmp,
                modules=modules,
                repo=REPO,
                shim=f"{SHIM_DIR}/sha256/?.lua;{SHIM_DIR}" if with_sha256 else SHIM_DIR,
                lua_path=SYSTEM_LUA_PATH,
                lua_cpath=SYSTEM_LUA_CPATH,
                upstream_port=upstream_port,
                port=port,
                underscores="on" if underscores_in_headers else "off",
                header_buffers=shipped_kong_header_buffers(),
                proxy_target="http://echo$upstream_uri" if kong_upstream_uri else "http://echo",
            )
        )
        error_log = Path(tmp, "error.log")
        self.error_logs.append(error_log)
        proc = subprocess.Popen(
            [NGINX, "-p", tmp, "-c", "nginx.conf", "-e", str(error_log), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._procs.append((proc, tmp))
        deadline = time.monotonic() + NGINX_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                log = error_log.read_text() if error_log.exists() else ""
                raise RuntimeError(f"nginx exited with {proc.returncode}:\n{err}\n{log}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return f"http://127.0.0.1:{port}"
            time.sleep(0.02)
        raise RuntimeError("nginx did not start listening in time:\n" + error_log.read_text())

    def error_log_text(self) -> str:
        return "\n".join(p.read_text() for p in self.error_logs if p.exists())

    def close(self) -> None:
        for proc, tmp in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr:
                proc.stderr.close()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def start_nginx(request: pytest.FixtureRequest) -> Iterator[NginxRig]:
    rig = NginxRig()
    yield rig
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print("---- nginx error.log ----\n" + rig.error_log_text())
    rig.close()


@pytest.fixture
def plugin_before_verifier(start_nginx: NginxRig, verifier: Any, upstream: Any) -> str:
    """The plugin's rig (answer reuse off: every request reaches the verifier) in front of the requesting module's
    own `verifier` fixture, passing to its `upstream`: a module that runs another module's gateway tests through
    the plugin (`test_admin_boundary_lua`, `test_identity_size_lua`) wraps its URL as that module's `edge`."""
    return str(start_nginx({"url": f"{verifier.url}/v1/forward-auth", "cache_entries": 0}, upstream.port))


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
