"""The Python Kong plugin (kong/python/edge_verifier.py under the REAL `kong-python-pluginserver`, run by real nginx as
Kong runs an external plugin: tests/kong/python_edge.py) as the client and the upstream see it: how it answers when the
verifier cannot decide, how it relays the verifier's challenges, the Kong consumer it authenticates, and a request
with bytes that are not UTF-8 (sent by real nginx through Kong's MessagePack-RPC side, byte for byte).

The Lua plugin's answers, which these match (test_lua_plugin.py): an unreachable, too slow or unreadable verifier is
503 `{"message":"Authorization service unavailable"}`; a refusal is relayed with its status, every `WWW-Authenticate`
challenge (one field), `DPoP-Nonce`, `Retry-After` and `RateLimit*`; an allow's `DPoP-Nonce` reaches the client.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from gateways import EchoUpstream, free_port, http_request
from python_edge import pluginserver, start_python_plugin  # noqa: F401 - fixtures, requested by name
from rigs import fresh_upstream_log, upstream  # noqa: F401 - fixtures, requested by name
from test_python_plugin import _TARGETS_USED, ALICE, PluginServer, fake_verifier, slow_verifier

from verifier.v1 import verifier_pb2, verifier_pb2_grpc

pytestmark = pytest.mark.integration

UNAVAILABLE = {"message": "Authorization service unavailable"}
CHALLENGES = ('Bearer realm="verifier", error="invalid_token"', 'DPoP algs="ES256 EdDSA", error="use_dpop_nonce"')


class Answering(verifier_pb2_grpc.VerifierServicer):
    """Answers every Check with one fixed CheckResponse."""

    def __init__(self, answer: verifier_pb2.CheckResponse) -> None:
        self.answer = answer

    def Check(self, request: verifier_pb2.CheckRequest, context: grpc.ServicerContext) -> verifier_pb2.CheckResponse:
        return self.answer


def header(name: str, value: str) -> verifier_pb2.Header:
    return verifier_pb2.Header(name=name, value=value)


@contextlib.contextmanager
def unreadable_verifier(payload: bytes) -> Iterator[str]:
    """A gRPC server whose `Check` answers `payload` as the message, bytes a CheckResponse may not parse from."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: payload,
                                                   request_deserializer=lambda b: b,
                                                   response_serializer=lambda b: b)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("verifier.v1.Verifier", {"Check": handler}),))
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    _TARGETS_USED.add(target)
    server.start()
    try:
        yield target
    finally:
        server.stop(grace=None)


class Target:
    """Stands in for a verifier fixture: only its gRPC port is asked for."""

    def __init__(self, target: str) -> None:
        self.extra = {"grpc_port": int(target.rsplit(":", 1)[1])}


@pytest.fixture
def edge_to(start_nginx: Any, pluginserver: PluginServer, upstream: EchoUpstream) -> Callable[..., str]:  # noqa: F811
    """edge_to(target, **conf): the plugin's rig asking the gRPC verifier at `target`; its base URL."""
    return lambda target, **conf: start_python_plugin(start_nginx, pluginserver, Target(target), upstream.port, **conf)


def get(base: str) -> Any:
    return http_request(f"{base}/orders", headers={"Authorization": "Bearer t", "X-Authenticated-Userid": "root"})


def assert_unavailable(r: Any, upstream: EchoUpstream) -> None:  # noqa: F811
    assert r.status == 503, (r.status, r.headers, r.body)
    assert json.loads(r.body) == UNAVAILABLE
    assert upstream.requests == []


# ------------------------------------------------------------------------------------------------ fails closed


def test_a_verifier_that_is_down_is_a_503(edge_to, upstream):  # noqa: F811
    target = f"127.0.0.1:{free_port()}"
    _TARGETS_USED.add(target)
    assert_unavailable(get(edge_to(target)), upstream)


def test_fail_open_passes_a_request_the_verifier_never_had_without_any_identity(edge_to, upstream):  # noqa: F811
    """With `fail_open`, a verifier that cannot be connected to lets the request pass as the Lua plugin does: with
    none of the identity or consumer headers the client sent."""
    target = f"127.0.0.1:{free_port()}"
    _TARGETS_USED.add(target)
    r = http_request(f"{edge_to(target, fail_open=True)}/orders",
                     headers={"Authorization": "Bearer t", **CLIENT_CONSUMER_HEADERS})

    assert r.status == 200, (r.status, r.body)
    (seen,) = upstream.requests
    assert not [k for k in seen.headers if k.startswith(("x-consumer", "x-credential", "x-anonymous", "x-kong",
                                                         "x-authenticated"))], seen.headers


def test_a_verifier_past_the_deadline_is_a_503(edge_to, upstream):  # noqa: F811
    with slow_verifier() as target:
        assert_unavailable(get(edge_to(target, timeout=500)), upstream)


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x08\x01\x12"], ids=["not-protobuf", "cut-short"])
def test_an_answer_that_is_not_a_check_response_is_a_503(edge_to, upstream, payload):  # noqa: F811
    with unreadable_verifier(payload) as target:
        assert_unavailable(get(edge_to(target)), upstream)


@pytest.mark.parametrize(
    "answer",
    [verifier_pb2.CheckResponse(),
     verifier_pb2.CheckResponse(allowed=False, http_status=200, body="{}"),
     verifier_pb2.CheckResponse(allowed=False, http_status=99),
     verifier_pb2.CheckResponse(allowed=False, http_status=600)],
    ids=["empty", "refusal-with-200", "status-99", "status-600"],
)
def test_a_refusal_without_a_refusals_status_is_a_503(edge_to, upstream, answer):  # noqa: F811
    """A refusal the Lua plugin could not be given (it reads any 2xx as an allow, anything else as the refusal's
    status): no status (an empty message: every field at its default), a success, or no HTTP status at all. The
    client gets the unavailable answer, as for any answer the plugin cannot act on, never a 2xx nor Kong's 500."""
    with fake_verifier(Answering(answer)) as target:
        assert_unavailable(get(edge_to(target)), upstream)


@pytest.mark.parametrize("answered", [0, 302, 401], ids=lambda s: f"allowed-with-{s}")
def test_an_allow_without_an_allows_status_is_a_503(edge_to, upstream, answered):  # noqa: F811
    """An allow the Lua plugin could not be given (only a 2xx is its allow): no identity reaches the upstream."""
    answer = verifier_pb2.CheckResponse(allowed=True, http_status=answered,
                                        upstream_headers=[header("X-Authenticated-Userid", "alice")])
    with fake_verifier(Answering(answer)) as target:
        assert_unavailable(get(edge_to(target)), upstream)


# ------------------------------------------------------------------------------------------------ challenges


def test_every_challenge_and_the_nonce_of_a_401_reach_the_client(edge_to, upstream):  # noqa: F811
    answer = verifier_pb2.CheckResponse(
        allowed=False, http_status=401, reason="use_dpop_nonce", body='{"error":"use_dpop_nonce"}',
        response_headers=[header("WWW-Authenticate", c) for c in CHALLENGES] + [header("DPoP-Nonce", "n-1")],
    )
    with fake_verifier(Answering(answer)) as target:
        r = get(edge_to(target))

    assert r.status == 401, (r.status, r.headers)
    assert r.headers["www-authenticate"] == ", ".join(CHALLENGES)
    assert r.headers["dpop-nonce"] == "n-1"
    assert r.headers["x-verifier-reason"] == "use_dpop_nonce"
    assert json.loads(r.body) == {"error": "use_dpop_nonce"}
    assert upstream.requests == []


def test_retry_after_and_the_rate_limit_of_a_429_reach_the_client(edge_to, upstream):  # noqa: F811
    answer = verifier_pb2.CheckResponse(
        allowed=False, http_status=429, reason="rate_limited", body='{"error":"rate_limited"}',
        response_headers=[header("Retry-After", "7"), header("RateLimit-Policy", '"default";q=10;w=60'),
                          header("RateLimit", '"default";r=0;t=7')],
    )
    with fake_verifier(Answering(answer)) as target:
        r = get(edge_to(target))

    assert r.status == 429, (r.status, r.headers)
    assert (r.headers["retry-after"], r.headers["ratelimit"]) == ("7", '"default";r=0;t=7')
    assert r.headers["ratelimit-policy"] == '"default";q=10;w=60'
    assert upstream.requests == []


def test_an_allows_nonce_reaches_the_client_and_never_the_upstream(edge_to, upstream):  # noqa: F811
    answer = verifier_pb2.CheckResponse(
        allowed=True, http_status=200, reason="ok", upstream_headers=[header("X-Authenticated-Userid", "alice")],
        response_headers=[header("DPoP-Nonce", "n-2")],
    )
    with fake_verifier(Answering(answer)) as target:
        r = get(edge_to(target))

    assert r.status == 200, (r.status, r.headers, r.body)
    assert r.headers["dpop-nonce"] == "n-2"
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"
    assert "dpop-nonce" not in seen.headers


def test_a_refusal_tells_the_client_no_store_and_its_type_as_the_lua_plugin_relays_them(edge_to, upstream):  # noqa: F811
    answer = verifier_pb2.CheckResponse(
        allowed=False, http_status=403, reason="insufficient_scope", body='{"error":"insufficient_scope"}',
        cache_max_age_seconds=30,
        response_headers=[header("WWW-Authenticate", 'Bearer realm="verifier", error="insufficient_scope"'),
                          header("X-Accel-Expires", "600"), header("Server", "verifier")],
    )
    with fake_verifier(Answering(answer)) as target:
        r = get(edge_to(target))

    assert r.status == 403, (r.status, r.headers)
    assert r.headers["cache-control"] == "no-store"  # the verifier's reuse is a gateway's, never the client's
    assert r.headers["content-type"] == "application/json"
    assert "x-accel-expires" not in r.headers and r.headers.get("server") != "verifier", r.headers
    assert upstream.requests == []


ASSERTION = "eyJhbGciOiJFUzI1NiJ9.e30.sig"


def test_an_allow_hands_the_upstream_only_the_identity_family_and_the_client_only_its_own(edge_to, upstream):  # noqa: F811
    """The Lua plugin's rule (test_lua_plugin.py's test of the stand-in's `foreign` allow): X-Authenticated-* only for
    the upstream, the signed assertion among them and a repeated name once with its last value; only the nonce and
    the rate-limit state for the client."""
    foreign = {"X-Forwarded-User": "root", "X-Consumer-Groups": "admins", "X-Consumer-Username": "root",
               "X-Remote-User": "root", "Set-Cookie": "session=verifier", "Location": "https://evil.example/"}
    answer = verifier_pb2.CheckResponse(
        allowed=True, http_status=200, reason="ok",
        upstream_headers=[header("X-Authenticated-Userid", "alice"), header("X-Authenticated-Identity", ASSERTION),
                          header("X-Authenticated-Roles", "reader"), *[header(k, v) for k, v in foreign.items()],
                          header("x-authenticated-roles", "admin")],
        response_headers=[header("DPoP-Nonce", "n-3"), header("Set-Cookie", "session=verifier"),
                          header("Location", "https://evil.example/"), header("Access-Control-Allow-Origin", "*")],
    )
    with fake_verifier(Answering(answer)) as target:
        r = get(edge_to(target))

    assert r.status == 200, (r.status, r.headers, r.body)
    (seen,) = upstream.requests
    assert {k: v for k, v in seen.headers.items() if k.startswith("x-authenticated-")} == {
        "x-authenticated-userid": "alice", "x-authenticated-identity": ASSERTION, "x-authenticated-roles": "admin"}
    assert not [k for k in foreign if k.lower() in seen.headers], seen.headers
    assert r.headers["dpop-nonce"] == "n-3"
    assert not [k for k in ("set-cookie", "location", "access-control-allow-origin") if k in r.headers], r.headers


# ------------------------------------------------------------------------------------------------ consumers

CLIENT_CONSUMER_HEADERS = {
    "X-Consumer-ID": "0000", "X-Consumer-Username": "root", "X-Consumer-Custom-ID": "root",
    "X-Credential-Identifier": "root", "X-Anonymous-Consumer": "true", "X-Consumer-Groups": "admins",
    "X-Kong-Consumer-Id": "0000", "X-Authenticated-Roles": "admin",
}


def naming(name: str) -> verifier_pb2.CheckResponse:
    """An allow for user-1 naming the Kong consumer `name` (the verifier's `upstream.consumer`, in answer_headers)."""
    return verifier_pb2.CheckResponse(
        allowed=True, http_status=200, reason="ok", upstream_headers=[header("X-Authenticated-Userid", "user-1")],
        answer_headers=[header("X-Kong-Consumer-Username", name)],
    )


def test_the_named_consumer_replaces_every_consumer_header_the_client_sent(start_nginx, pluginserver, upstream):  # noqa: F811
    with fake_verifier(Answering(naming("alice"))) as target:
        base = start_python_plugin(start_nginx, pluginserver, Target(target), upstream.port, consumers=(ALICE,))
        r = http_request(f"{base}/orders", headers={"Authorization": "Bearer t", **CLIENT_CONSUMER_HEADERS})
        authenticated = json.loads(http_request(f"{base}/__shim/authenticated").body)

    assert r.status == 200, (r.status, r.body)
    (seen,) = upstream.requests
    sent = {k: v for k, v in seen.headers.items() if k.startswith(("x-consumer", "x-credential", "x-anonymous",
                                                                    "x-kong", "x-authenticated"))}
    assert sent == {"x-consumer-id": ALICE["id"], "x-consumer-username": "alice", "x-consumer-custom-id": "cust-9",
                    "x-credential-identifier": "user-1", "x-authenticated-userid": "user-1"}
    (call,) = authenticated["calls"]
    assert call["consumer"]["username"] == "alice"
    assert call["credential"] == {"id": "user-1", "consumer_id": ALICE["id"]}


def test_a_consumer_kong_does_not_know_is_refused(start_nginx, pluginserver, upstream):  # noqa: F811
    with fake_verifier(Answering(naming("mallory"))) as target:
        base = start_python_plugin(start_nginx, pluginserver, Target(target), upstream.port, consumers=(ALICE,))
        r = http_request(f"{base}/orders", headers={"Authorization": "Bearer t", **CLIENT_CONSUMER_HEADERS})

    assert r.status == 403, (r.status, r.body)
    assert json.loads(r.body) == {"message": "The verified identity is not a known consumer"}
    assert upstream.requests == []


# ------------------------------------------------------------------------------------------------ bytes not UTF-8


def raw(base: str, lines: list[bytes]) -> bytes:
    """`lines` (the request line, then header lines) sent byte for byte; the status line."""
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=10) as sock:
        sock.sendall(b"\r\n".join([*lines, b"Connection: close", b"", b""]))
        data = b""
        while b"\r\n" not in data and (chunk := sock.recv(4096)):
            data += chunk
    return data.split(b"\r\n", 1)[0]


def test_a_latin1_header_reaches_the_plugin_and_the_check(edge_to, upstream):  # noqa: F811
    """kong-python-pdk#146 as Kong meets it: a Latin-1 byte in a header the plugin does not read. Strictly decoded, the
    plugin server closed Kong's connection and Kong proxied the request unchecked, with the client's identity."""
    answer = verifier_pb2.CheckResponse(allowed=True, http_status=200, reason="ok",
                                        upstream_headers=[header("X-Authenticated-Userid", "alice")])
    with fake_verifier(Answering(answer)) as target:
        base = edge_to(target)
        status = raw(base, [b"GET /orders HTTP/1.1", b"Host: api.example.test", b"Authorization: Bearer t",
                            b"User-Agent: 3V\xe4xel/1.5", b"X-Authenticated-Userid: root"])

    assert status.split()[1] == b"200", status
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"


def test_a_latin1_credential_is_refused_unchecked_never_passed(edge_to, upstream):  # noqa: F811
    with fake_verifier(Answering(naming("alice"))) as target:
        status = raw(edge_to(target), [b"GET /orders HTTP/1.1", b"Host: api.example.test",
                                       b"Authorization: Bearer t\xe4", b"X-Authenticated-Userid: root"])

    assert status.split()[1] == b"400", status
    assert upstream.requests == []
