"""What both Kong plugins answer on their OWN, with no verifier decision to relay, as the client sees it through real
nginx: the Lua plugin (kong/plugins/edge-verifier) under the PDK shim, the Python plugin (kong/python/edge_verifier.py)
under the real plugin server (tests/kong/python_edge.py).

The verifier's refusals reach the client with `Cache-Control: no-store` (test_gateway_cache_headers.py). The plugins'
own answers must too: a verifier that is down, too slow or answers garbage (503), a request refused before the
verifier is asked (400: too many headers to check, a credential that is not UTF-8), a consumer Kong does not know
(403), the plugin's own failure (500). Each is about this moment, not this URL: a browser or a shared cache in front
of Kong that kept one would answer the retry that would pass. A 503 also says when to retry, `Retry-After: 1`, as the
shipped nginx and Envoy configurations answer theirs (deploy/nginx `@auth_unavailable`, deploy/envoy's local reply).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from gateways import EchoUpstream, free_port
from python_edge import start_python_plugin
from rigs import fresh_upstream_log, upstream  # noqa: F401 - fixtures, requested by name
from test_python_plugin import _TARGETS_USED, PluginServer, fake_verifier, slow_verifier
from test_python_plugin_in_nginx import Answering, Target, header, naming, unreadable_verifier

from verifier.v1 import verifier_pb2

pytestmark = pytest.mark.integration

PLUGINS = ("lua", "python")
UNAVAILABLE = {"message": "Authorization service unavailable"}


@pytest.fixture(scope="module")
def python_server() -> Iterator[PluginServer]:
    """One plugin server for the Python plugin's cases (its return conventions are test_python_plugin.py's)."""
    server = PluginServer("--no-lua-style")
    yield server
    server.stop()


@contextlib.contextmanager
def garbage_verifier(answer: bytes) -> Iterator[str]:
    """An HTTP 'verifier' answering every request with the bytes `answer`, then closing; yields its forward-auth URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/forward-auth"
    finally:
        done.set()
        thread.join(5)
        listener.close()


@contextlib.contextmanager
def standin_http(token_answers: dict[str, tuple[int, list[tuple[str, str]]]]) -> Iterator[str]:
    """A forward-auth stand-in answering by the bearer token: status and headers (no body); yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            status, headers = token_answers.get(token, (401, []))
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/forward-auth"
    finally:
        server.shutdown()
        server.server_close()


def edge(request: pytest.FixtureRequest, kind: str, start_nginx: Any, upstream: EchoUpstream,  # noqa: F811
         verifier: str, **conf: Any) -> str:
    """The `kind` plugin in real nginx, asking `verifier` (Lua: a forward-auth URL; Python: a gRPC target), passing
    to `upstream`; its base URL."""
    if kind == "lua":
        return str(start_nginx({"url": verifier, **conf}, upstream.port))
    server = request.getfixturevalue("python_server")
    return start_python_plugin(start_nginx, server, Target(verifier), upstream.port, **conf)


def dead_target(kind: str) -> str:
    port = free_port()
    if kind == "lua":
        return f"http://127.0.0.1:{port}/v1/forward-auth"
    target = f"127.0.0.1:{port}"
    _TARGETS_USED.add(target)
    return target


def send(base: str, headers: dict[str, str] | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    u = base.rsplit(":", 1)
    conn = http.client.HTTPConnection("127.0.0.1", int(u[1]), timeout=10)
    try:
        conn.request("GET", "/orders", headers={"Authorization": "Bearer t", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        conn.close()


def send_raw(base: str, lines: list[bytes]) -> tuple[int, list[tuple[str, str]]]:
    """`lines` (request line, header lines) byte for byte; the answer's status and headers."""
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"\r\n".join([*lines, b"Connection: close", b"", b""]))
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(4096)):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = [tuple(s.strip() for s in line.split(":", 1)) for line in head[1:]]
    return int(head[0].split()[1]), [(k, v) for k, v in fields]


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def assert_own_answer(status: int, headers: list[tuple[str, str]], want: int, upstream: EchoUpstream) -> None:  # noqa: F811
    assert status == want, (status, headers)
    assert values(headers, "cache-control") == ["no-store"], headers
    assert values(headers, "retry-after") == (["1"] if want == 503 else []), headers
    assert upstream.requests == []


def assert_unavailable(answer: tuple[int, list[tuple[str, str]], bytes], upstream: EchoUpstream) -> None:  # noqa: F811
    status, headers, body = answer
    assert_own_answer(status, headers, 503, upstream)
    assert json.loads(body) == UNAVAILABLE


# ------------------------------------------------------------------------------------------------ 503


@pytest.mark.parametrize("kind", PLUGINS)
def test_a_verifier_that_is_down_is_a_503_no_cache_keeps_and_that_says_when_to_retry(
    request, kind, start_nginx, upstream  # noqa: F811
):
    base = edge(request, kind, start_nginx, upstream, dead_target(kind))

    assert_unavailable(send(base), upstream)


@pytest.mark.parametrize("kind", PLUGINS)
def test_a_verifier_past_the_deadline_is_a_503_no_cache_keeps(request, kind, start_nginx, upstream):  # noqa: F811
    if kind == "lua":
        # the kernel completes the connection (its backlog); nothing ever reads the request nor answers
        with socket.create_server(("127.0.0.1", 0)) as stalled:
            url = f"http://127.0.0.1:{stalled.getsockname()[1]}/v1/forward-auth"
            assert_unavailable(send(edge(request, kind, start_nginx, upstream, url, timeout=300)), upstream)
    else:
        with slow_verifier() as target:
            assert_unavailable(send(edge(request, kind, start_nginx, upstream, target, timeout=500)), upstream)


LUA_GARBAGE = {
    "not-http": b"garbage\r\n\r\n",
    "too-many-headers": b"HTTP/1.1 401 Unauthorized\r\n" + b"X-Filler: 1\r\n" * 150 + b"Content-Length: 0\r\n\r\n",
    "body-too-large": b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2000000\r\n\r\n",
    "status-past-599": b"HTTP/1.1 700 Nope\r\nContent-Length: 0\r\n\r\n",
}
PYTHON_GARBAGE = {"not-protobuf": b"\xff\xff\xff\xff", "cut-short": b"\x08\x01\x12"}


@pytest.mark.parametrize(("kind", "garbage"), [*(("lua", g) for g in LUA_GARBAGE),
                                               *(("python", g) for g in PYTHON_GARBAGE)])
def test_a_verifier_answering_garbage_is_a_503_no_cache_keeps(request, kind, garbage, start_nginx, upstream):  # noqa: F811
    if kind == "lua":
        with garbage_verifier(LUA_GARBAGE[garbage]) as url:
            assert_unavailable(send(edge(request, kind, start_nginx, upstream, url)), upstream)
    else:
        with unreadable_verifier(PYTHON_GARBAGE[garbage]) as target:
            assert_unavailable(send(edge(request, kind, start_nginx, upstream, target)), upstream)


@pytest.mark.parametrize("kind", PLUGINS)
def test_an_answer_with_no_status_the_plugin_can_act_on_is_a_503_no_cache_keeps(
    request, kind, start_nginx, upstream  # noqa: F811
):
    if kind == "lua":
        with standin_http({"t": (999, [("Cache-Control", "private, max-age=30")])}) as url:
            assert_unavailable(send(edge(request, kind, start_nginx, upstream, url)), upstream)
    else:
        with fake_verifier(Answering(verifier_pb2.CheckResponse(allowed=False, http_status=600))) as target:
            assert_unavailable(send(edge(request, kind, start_nginx, upstream, target)), upstream)


# ------------------------------------------------------------------------------------------------ refused unasked


@pytest.mark.parametrize("kind", PLUGINS)
def test_a_request_with_too_many_headers_to_check_is_a_400_no_cache_keeps(
    request, kind, start_nginx, upstream  # noqa: F811
):
    base = edge(request, kind, start_nginx, upstream, dead_target(kind))

    # 1000 lines with Host and Connection (both plugins' MAX_REQUEST_HEADERS), as test_plugin_parity.py's
    # "many-headers-at-limit": a few more are nginx's own 400 ("too many header lines"), not the plugin's
    status, headers = send_raw(base, [b"GET /orders HTTP/1.1", b"Host: api.example.test", b"Authorization: Bearer t",
                                      *[b"X-F: 1"] * 997])

    assert_own_answer(status, headers, 400, upstream)
    assert values(headers, "content-type") == ["application/json; charset=utf-8"], headers  # the plugin's answer


@pytest.mark.parametrize("kind", PLUGINS)
def test_a_credential_that_is_not_utf8_is_a_400_no_cache_keeps(request, kind, start_nginx, upstream):  # noqa: F811
    base = edge(request, kind, start_nginx, upstream, dead_target(kind))

    status, headers = send_raw(base, [b"GET /orders HTTP/1.1", b"Host: api.example.test",
                                      b"Authorization: Bearer t\xe4"])

    assert_own_answer(status, headers, 400, upstream)


# ------------------------------------------------------------------------------------------------ consumers


@pytest.mark.parametrize("kind", PLUGINS)
def test_a_consumer_kong_does_not_know_is_a_403_no_cache_keeps(request, kind, start_nginx, upstream):  # noqa: F811
    """The consumer may be created a moment later: the next request must reach the plugin again."""
    if kind == "lua":
        answer = (200, [("X-Authenticated-Userid", "user-1"), ("X-Kong-Consumer-Username", "mallory"),
                        ("Cache-Control", "no-store")])
        with standin_http({"t": answer}) as url:
            status, headers, body = send(edge(request, kind, start_nginx, upstream, url))
    else:
        with fake_verifier(Answering(naming("mallory"))) as target:
            status, headers, body = send(edge(request, kind, start_nginx, upstream, target))

    assert_own_answer(status, headers, 403, upstream)
    assert json.loads(body) == {"message": "The verified identity is not a known consumer"}


@pytest.mark.parametrize("kind", PLUGINS)
def test_the_plugins_own_failure_is_a_500_no_cache_keeps(request, kind, start_nginx, upstream):  # noqa: F811
    """An answer naming the consumer twice (Lua) or by custom_id (Python, which cannot look one up by it)."""
    if kind == "lua":
        answer = (200, [("X-Authenticated-Userid", "user-1"), ("X-Kong-Consumer-Username", "alice"),
                        ("X-Kong-Consumer-Username", "bob")])
        with standin_http({"t": answer}) as url:
            status, headers, body = send(edge(request, kind, start_nginx, upstream, url))
    else:
        custom = verifier_pb2.CheckResponse(
            allowed=True, http_status=200, upstream_headers=[header("X-Authenticated-Userid", "user-1")],
            answer_headers=[header("X-Kong-Consumer-Custom-Id", "cust-9")])
        with fake_verifier(Answering(custom)) as target:
            status, headers, body = send(edge(request, kind, start_nginx, upstream, target))

    assert_own_answer(status, headers, 500, upstream)
    assert json.loads(body) == {"message": "An unexpected error occurred"}
