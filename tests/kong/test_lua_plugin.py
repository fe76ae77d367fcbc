"""The Kong plugin (kong/plugins/edge-verifier) in real nginx, unmodified, under the PDK shim.

Fixtures are in tests/kong/conftest.py. These cases drive the stand-in forward-auth server, which exists
for fault injection (slow, unreachable, chunked, counted connections); pointing `plugin_conf["url"]` at
the real verifier runs the same rig against it, as the last section ("headers for the client") does.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import (
    CLIENT_COPIES,
    GatewayProcess,
    LocalIssuer,
    start_strict_verifier,
    unique_token,
    with_a_half_aged_nonce,
)
from replicas import dpop_proof, public_jwk
from support import StallMeter, free_port

from verifier.binding.dpop import thumbprint

pytestmark = pytest.mark.integration

Headers = list[tuple[str, str]]
BIG_CLAIM_BYTES = 4096  # the stand-in verifier's `big-cached` claim (tests/kong/conftest.py)


def call(
    base: str, path: str = "/api/items?limit=5", headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, Headers, bytes]:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        conn.close()


def upstream_saw(body: bytes) -> dict[str, Any]:
    """The echo upstream's view: method, path and headers keyed by lower-case name (values in a list)."""
    data = json.loads(body)
    hdrs: dict[str, list[str]] = {}
    for k, v in data["headers"]:
        hdrs.setdefault(k.lower(), []).append(v)
    data["h"] = hdrs
    return data


def header(headers: Headers, name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


def shim_json(base: str, what: str) -> dict[str, Any]:
    status, _, body = call(base, f"/__shim/{what}")
    assert status == 200
    return json.loads(body)


# --------------------------------------------------------------------------- allow


def test_allow_passes_identity_upstream_and_leaves_authorization_untouched(
    start_nginx, echo_upstream, standin_verifier
):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    status, _, body = call(base, "/api/items?limit=5", {"Authorization": "Bearer good", "DPoP": "proof-1"})

    assert status == 200
    seen = upstream_saw(body)
    assert seen["path"] == "/api/items?limit=5"
    assert seen["h"]["authorization"] == ["Bearer good"]
    assert seen["h"]["dpop"] == ["proof-1"]
    assert seen["h"]["x-authenticated-userid"] == ["user-1"]
    assert seen["h"]["x-authenticated-scope"] == ["read write"]
    assert seen["h"]["x-authenticated-issuer"] == ["http://127.0.0.1:9400"]
    # the verifier's own headers that are not identity stay out of the upstream request
    assert "x-verifier-reason" not in seen["h"]


def test_verifier_is_asked_with_the_original_method_uri_and_credentials(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    call(
        base,
        "/api/items/7?x=1&y=%20z",
        {"Authorization": "Bearer good", "X-WebAuthn-Assertion": "assert-1", "Cookie": "s=1"},
        method="DELETE",
    )

    (req,) = standin_verifier.requests
    h = {k.lower(): v for k, v in req["headers"]}
    assert req["path"] == "/v1/forward-auth"
    assert h["x-forwarded-method"] == "DELETE"
    assert h["x-forwarded-uri"] == "/api/items/7?x=1&y=%20z"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == "127.0.0.1"
    assert h["authorization"] == "Bearer good"
    assert h["x-webauthn-assertion"] == "assert-1"
    assert "cookie" not in h


def test_chunked_verifier_answer_is_read(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    for _ in range(3):  # and the connection stays usable after the trailer section
        status, _, body = call(base, headers={"Authorization": "Bearer chunked"})
        assert status == 200
        assert upstream_saw(body)["h"]["x-authenticated-userid"] == ["user-1"]
    assert standin_verifier.connections == 1


def test_dpop_nonce_from_an_allow_reaches_the_client(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    status, headers, body = call(base, headers={"Authorization": "Bearer nonce"})

    assert status == 200
    assert header(headers, "DPoP-Nonce") == ["n-123"]
    assert "dpop-nonce" not in upstream_saw(body)["h"]


# --------------------------------------------------------------------------- spoofing


def test_client_supplied_identity_headers_are_stripped(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    status, _, body = call(
        base,
        headers={
            "Authorization": "Bearer good",
            "X-Authenticated-Userid": "admin",
            "X-Authenticated-Roles": "superuser",
            "X-Consumer-Username": "root",
            "X-Consumer-ID": "0000",
        },
    )

    assert status == 200
    h = upstream_saw(body)["h"]
    assert h["x-authenticated-userid"] == ["user-1"]
    assert "x-authenticated-roles" not in h
    assert "x-consumer-username" not in h
    assert "x-consumer-id" not in h


# What an allow hands on, the same rule as the Python plugin's (test_python_plugin.py, test_python_plugin_in_nginx.py):
# the upstream gets the reserved identity family only (X-Authenticated-*, the signed assertion among it), a name the
# answer repeats once with its last value; the client gets a DPoP nonce and rate-limit state only.
FOREIGN_UPSTREAM = ("x-forwarded-user", "x-consumer-groups", "x-consumer-username", "x-remote-user", "set-cookie",
                    "location", "access-control-allow-origin")
FOREIGN_CLIENT = ("set-cookie", "location", "access-control-allow-origin", "x-forwarded-user", "x-authenticated-roles")


def test_an_allow_hands_the_upstream_only_the_identity_family_and_the_client_none_of_it(
    start_nginx, echo_upstream, standin_verifier
):
    base = start_nginx({"url": standin_verifier.url, "cache_entries": 0}, echo_upstream)

    status, headers, body = call(base, headers={"Authorization": "Bearer foreign"})

    assert status == 200
    h = upstream_saw(body)["h"]
    assert {k: v for k, v in h.items() if k.startswith("x-authenticated-")} == {
        "x-authenticated-userid": ["user-1"],
        "x-authenticated-scope": ["read write"],
        "x-authenticated-issuer": ["http://127.0.0.1:9400"],
        "x-authenticated-identity": ["eyJhbGciOiJFUzI1NiJ9.e30.sig"],
        "x-authenticated-roles": ["admin"],
    }
    assert not [k for k in FOREIGN_UPSTREAM if k in h], h
    assert not [k for k in FOREIGN_CLIENT if header(headers, k)], headers


@pytest.mark.parametrize("answered", [600, 999])
def test_an_answer_with_a_status_no_refusal_has_is_a_503(start_nginx, echo_upstream, standin_verifier, answered):
    """A status Kong could not send (the verifier's answer has no meaning the plugin knows): the verifier is as
    unavailable as when it answers nothing readable, 503, as the Python plugin answers an unknown status (never
    Kong's 500 from kong.response.exit's own check, and never relayed)."""
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    status, headers, body = call(base, headers={"Authorization": f"Bearer status={answered}"})

    assert status == 503, (status, headers, body)
    assert json.loads(body) == {"message": "Authorization service unavailable"}
    assert header(headers, "WWW-Authenticate") == []
    assert "verifier answered with status" in start_nginx.error_log_text()


def test_spoofed_identity_is_stripped_even_when_failing_open(start_nginx, echo_upstream, dead_url):
    base = start_nginx({"url": dead_url, "fail_open": True}, echo_upstream)

    status, _, body = call(base, headers={"Authorization": "Bearer good", "X-Authenticated-Userid": "admin"})

    assert status == 200
    h = upstream_saw(body)["h"]
    assert "x-authenticated-userid" not in h
    assert h["authorization"] == ["Bearer good"]


# --------------------------------------------------------------------------- deny


def direct_answer(standin, token: str) -> tuple[int, Headers, bytes]:
    u = urllib.parse.urlsplit(standin.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    try:
        conn.request("GET", u.path, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        conn.close()


# connection-level headers that each hop writes for itself
#: What a kept answer counts besides its key (decision_cache.lua ENTRY_OVERHEAD).
ENTRY_OVERHEAD = 256
HOP_HEADERS = {"date", "server", "connection", "keep-alive", "content-length", "transfer-encoding"}


def end_to_end(headers: Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        if k.lower() not in HOP_HEADERS:
            # repeated fields equal one comma-joined field (RFC 9110 section 5.3)
            out[k.lower()] = f"{out[k.lower()]}, {v}" if k.lower() in out else v
    return out


@pytest.mark.parametrize("token", ["bad", "ratelimited"])
def test_deny_relays_status_headers_and_body_exactly(start_nginx, echo_upstream, standin_verifier, token):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)
    want_status, want_headers, want_body = direct_answer(standin_verifier, token)
    assert want_status in (401, 429)

    status, headers, body = call(base, headers={"Authorization": f"Bearer {token}"})

    assert status == want_status
    assert body == want_body
    assert end_to_end(headers) == end_to_end(want_headers)
    assert header(headers, "Content-Length") == [str(len(want_body))]


def test_deny_without_a_token_never_reaches_the_upstream(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    status, headers, body = call(base)

    assert status == 401
    assert header(headers, "WWW-Authenticate")[0].startswith('Bearer realm="verifier"')
    assert json.loads(body)["error"] == "invalid_token"


# --------------------------------------------------------------------------- faults


def test_unreachable_verifier_fails_closed_with_503(start_nginx, echo_upstream, dead_url):
    base = start_nginx({"url": dead_url}, echo_upstream)

    status, _headers, body = call(base, headers={"Authorization": "Bearer good"})

    assert status == 503
    assert json.loads(body) == {"message": "Authorization service unavailable"}
    assert start_nginx.error_log_text().count("verifier unavailable") == 1


def test_slow_verifier_fails_closed_after_the_timeout(start_nginx, echo_upstream, standin_verifier):
    standin_verifier.slow_seconds = 3.0
    base = start_nginx({"url": standin_verifier.url, "timeout": 300}, echo_upstream)

    with StallMeter() as machine:
        started = time.monotonic()
        status, _, _ = call(base, headers={"Authorization": "Bearer slow"})
        elapsed = time.monotonic() - started

    assert status == 503
    # one read timeout, not two: a timeout is never retried (counted, not timed: a loaded machine stretches both)
    assert len(standin_verifier.requests) == 1
    assert elapsed > 0.25  # no sooner than the timeout (a stall only adds time)
    # the timeout's answer, not the slow verifier's, less how long a loaded machine held this process
    assert elapsed - machine.late < standin_verifier.slow_seconds, (elapsed, machine.late)
    assert "timeout" in start_nginx.error_log_text()


def test_fail_open_lets_requests_pass_without_identity(start_nginx, echo_upstream, dead_url):
    base = start_nginx({"url": dead_url, "fail_open": True}, echo_upstream)

    status, _, body = call(base, headers={"Authorization": "Bearer good"})

    assert status == 200
    assert "x-authenticated-userid" not in upstream_saw(body)["h"]
    assert "fail_open lets the request pass" in start_nginx.error_log_text()


def test_fail_open_passes_none_of_the_clients_identity_headers(start_nginx, echo_upstream, dead_url):
    """A refusal turned into a pass (nothing reached the verifier): the client's own identity, its forged
    assertion included, in any spelling, is cleared before the verifier is asked, so none of it arrives."""
    base = start_nginx({"url": dead_url, "fail_open": True}, echo_upstream)
    forged = {
        "X-Authenticated-Identity": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJib3NzIn0.",
        "X-Authenticated-Userid": "root",
        "X-Authenticated-Email": "boss@example.test",
        "X_Authenticated_Roles": "admin",
    }

    status, _, body = call(base, headers={"Authorization": "Bearer good", **forged})

    assert status == 200
    seen = upstream_saw(body)["h"]
    assert not [n for n in seen if n.replace("_", "-").startswith("x-authenticated-")], seen


def test_fail_open_never_passes_a_request_whose_check_timed_out(start_nginx, echo_upstream, standin_verifier):
    # issue #26 G9: the request reached the verifier, which was still checking the credential;
    # only an unreachable verifier (nothing sent) may fail open
    standin_verifier.slow_seconds = 3.0
    base = start_nginx({"url": standin_verifier.url, "timeout": 300, "fail_open": True}, echo_upstream)

    status, _, _ = call(base, headers={"Authorization": "Bearer slow", "X-Authenticated-Userid": "admin"})

    assert status == 503
    assert "fail_open lets the request pass" not in start_nginx.error_log_text()


def test_fail_open_never_passes_a_request_the_verifier_had_when_it_went_away(
    start_nginx, echo_upstream, standin_verifier
):
    """A token that makes the verifier crash, sent on a pooled keep-alive connection: the plugin sees the
    connection closed, sends again on a fresh one (as for a connection the verifier closed while idle), and that
    connect is refused. The first send may have been read (it was: the verifier died on it), so this is not
    "nothing reached the verifier": fail_open must not pass it."""
    base = start_nginx({"url": standin_verifier.url, "fail_open": True, "cache_entries": 0}, echo_upstream)
    assert call(base, headers={"Authorization": "Bearer good"})[0] == 200  # leaves a pooled connection

    status, _, body = call(base, headers={"Authorization": "Bearer crash", "X-Authenticated-Userid": "admin"})

    assert any(("Authorization", "Bearer crash") in map(tuple, r["headers"]) for r in standin_verifier.requests)
    assert status == 503, body
    assert "fail_open lets the request pass" not in start_nginx.error_log_text()


def test_fail_open_does_not_override_a_deny(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url, "fail_open": True}, echo_upstream)

    status, _, _ = call(base, headers={"Authorization": "Bearer bad"})

    assert status == 401


# --------------------------------------------------------------------------- reconnect back-off


def test_after_a_refused_connection_the_worker_backs_off_then_comes_back(
    start_nginx, echo_upstream, make_standin_verifier
):
    port = free_port()
    base = start_nginx({"url": f"http://127.0.0.1:{port}/v1/forward-auth", "cache_entries": 0,
                        "reconnect_backoff": 5000, "reconnect_backoff_max": 5000}, echo_upstream)
    assert call(base, headers={"Authorization": "Bearer good"})[0] == 503  # refused: the back-off starts
    failed = time.monotonic()
    standin = make_standin_verifier(port=port)  # the verifier is back at once
    status, _, body = call(base, headers={"Authorization": "Bearer good"})
    assert status == 503 and json.loads(body) == {"message": "Authorization service unavailable"}
    assert standin.connections == 0  # nothing was attempted while backing off (4 to 6 s)
    assert "connect: backing off" in start_nginx.error_log_text()
    deadline = failed + 30
    while (status := call(base, headers={"Authorization": "Bearer good"})[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200 and time.monotonic() - failed >= 5 * 0.8  # not before the (jittered) back-off ended
    assert [call(base, headers={"Authorization": "Bearer good"})[0] for _ in range(3)] == [200] * 3  # it ended


def test_while_backing_off_an_idle_pooled_connection_is_still_used(start_nginx, echo_upstream, standin_verifier):
    """The back-off keeps new connections from a verifier in trouble, not the answers it still gives on the
    connections the worker has: here it refuses new ones while its open connection keeps answering."""
    standin_verifier.slow_seconds = 3.0
    base = start_nginx({"url": standin_verifier.url, "cache_entries": 0, "timeout": 5000,
                        "reconnect_backoff": 20000, "reconnect_backoff_max": 20000}, echo_upstream)
    assert call(base, headers={"Authorization": "Bearer good"})[0] == 200  # one connection, now idle in the pool
    standin_verifier.stop_accepting()
    slow: list[int] = []
    busy = threading.Thread(target=lambda: slow.append(call(base, headers={"Authorization": "Bearer slow"})[0]))
    busy.start()  # takes the pooled connection for 3 s
    deadline = time.monotonic() + 10
    while len(standin_verifier.requests) < 2 and time.monotonic() < deadline:  # the slow one has arrived
        time.sleep(0.02)
    assert call(base, headers={"Authorization": "Bearer good"})[0] == 503  # a new connection: refused, back-off
    busy.join(timeout=30)
    assert slow == [200]  # its connection is idle in the pool again
    assert call(base, headers={"Authorization": "Bearer good"})[0] == 200  # backing off, yet answered on it
    assert call(base, headers={"Authorization": "Bearer good"})[0] == 200
    assert standin_verifier.connections == 1


def test_without_the_back_off_every_request_tries_to_connect(start_nginx, echo_upstream, make_standin_verifier):
    port = free_port()
    base = start_nginx({"url": f"http://127.0.0.1:{port}/v1/forward-auth", "cache_entries": 0,
                        "reconnect_backoff": 0}, echo_upstream)
    assert call(base, headers={"Authorization": "Bearer good"})[0] == 503
    standin = make_standin_verifier(port=port)
    assert call(base, headers={"Authorization": "Bearer good"})[0] == 200
    assert standin.connections == 1


def test_fail_open_passes_without_identity_while_backing_off(start_nginx, echo_upstream, dead_url):
    base = start_nginx({"url": dead_url, "fail_open": True, "reconnect_backoff": 5000}, echo_upstream)
    for _ in range(2):  # a refused connect, then the back-off: nothing reached the verifier either time
        status, _, body = call(base, headers={"Authorization": "Bearer good", "X-Authenticated-Userid": "admin"})
        assert status == 200 and "x-authenticated-userid" not in upstream_saw(body)["h"]
    assert "connect: backing off" in start_nginx.error_log_text()


def test_a_verifier_that_takes_no_connections_costs_one_connect_timeout_not_one_per_request(
    start_nginx, echo_upstream
):
    """A verifier overloaded past its accept queue leaves SYNs unanswered: without the back-off every request
    would wait out the connect timeout (here 1 s each); with it, one does and the rest are answered at once."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: a queue of one
        port = listener.getsockname()[1]
        for _ in range(3):  # fill the accept queue; later SYNs are dropped
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        base = start_nginx({"url": f"http://127.0.0.1:{port}/v1/forward-auth", "timeout": 1000, "cache_entries": 0,
                            "reconnect_backoff": 10000, "reconnect_backoff_max": 10000}, echo_upstream)
        with StallMeter() as machine:
            started = time.monotonic()
            first = call(base, headers={"Authorization": "Bearer good"})[0]
            waited = time.monotonic() - started
            started = time.monotonic()
            rest = [call(base, headers={"Authorization": "Bearer good"})[0] for _ in range(5)]
            after = time.monotonic() - started
    assert first == 503 and waited > 0.9  # the connect timed out: the queue was full
    assert rest == [503] * 5
    assert after - machine.late < 2.5, (after, machine.late)  # five connect timeouts would be 5 s
    assert "connect: backing off" in start_nginx.error_log_text()


# --------------------------------------------------------------------------- keep-alive


def test_keepalive_reuses_few_connections_for_many_requests(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    statuses = [call(base, headers={"Authorization": f"Bearer {t}"})[0] for t in ["good", "bad"] * 25]

    assert statuses == [200, 401] * 25
    assert len(standin_verifier.requests) == 50
    assert standin_verifier.connections <= 2


def test_a_pooled_connection_the_verifier_closed_is_replaced(start_nginx, echo_upstream, make_standin_verifier):
    verifier = make_standin_verifier(idle_timeout=0.2)
    base = start_nginx({"url": verifier.url}, echo_upstream)

    assert call(base, headers={"Authorization": "Bearer good"})[0] == 200
    deadline = time.monotonic() + 30
    while verifier.closed < 1:  # the verifier closes the idle connection still in the plugin's pool
        assert time.monotonic() < deadline, "the stand-in never closed its idle connection"
        time.sleep(0.05)
    assert call(base, headers={"Authorization": "Bearer good"})[0] == 200

    assert verifier.connections == 2


# --------------------------------------------------------------------------- decision cache


def test_answers_marked_reusable_are_reused(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    for _ in range(3):
        status, _, body = call(base, "/a", headers={"Authorization": "Bearer cached"})
        assert status == 200
        assert upstream_saw(body)["h"]["x-authenticated-userid"] == ["user-1"]
    call(base, "/b", headers={"Authorization": "Bearer cached"})

    assert len(standin_verifier.requests) == 2  # one per path
    stats = shim_json(base, "cache")
    assert stats["hits"] == 2
    assert stats["stores"] == 2


def test_a_slow_answers_max_age_counts_from_when_it_was_asked_not_from_when_it_came(
    start_nginx, echo_upstream, standin_verifier
):
    # RFC 9111 section 4.2.3: the time an answer spent on its way is part of its age. The verifier gives the max-age
    # its token has left when it decides; counted from the answer's arrival instead, a slow answer was reused past
    # that, up to the whole wait (a token's `exp`, a route's max_auth_age) for an allow the verifier now refuses.
    standin_verifier.slow_seconds, standin_verifier.slow_max_age = 2.5, 2
    base = start_nginx({"url": standin_verifier.url, "timeout": 5000}, echo_upstream)

    asked_at = time.monotonic()
    assert call(base, "/a", headers={"Authorization": "Bearer slow-cached"})[0] == 200
    # 0.8 s past max-age since it was asked (room for a stalled runner), 1.7 s before max-age since it came
    time.sleep(max(0.0, asked_at + standin_verifier.slow_max_age + 0.8 - time.monotonic()))
    assert call(base, "/a", headers={"Authorization": "Bearer slow-cached"})[0] == 200

    assert len(standin_verifier.requests) == 2  # past max-age since it was asked: asked again, never reused


def test_the_cache_bound_in_bytes_counts_the_answers_it_keeps_not_only_their_keys(
    start_nginx, echo_upstream, standin_verifier
):
    # The bound is cache_entries x 2 KiB (BYTES_PER_ENTRY). An answer's identity headers can be kilobytes (a mapped
    # claim up to 4 KiB, an identity assertion) and each caller's are its own: counted by their keys alone, a flood
    # of valid tokens with large claims held cache_entries answers of any size per worker, past the bound.
    entries = 10
    base = start_nginx({"url": standin_verifier.url, "cache_entries": entries}, echo_upstream)

    for i in range(entries):
        assert call(base, f"/a{i}", headers={"Authorization": "Bearer big-cached"})[0] == 200

    stats = shim_json(base, "cache")
    assert stats["entries"] * BIG_CLAIM_BYTES <= stats["bytes"] <= entries * 2048, stats


def test_no_store_answers_are_not_reused(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    for token in ["good", "good", "bad", "bad"]:
        call(base, "/a", headers={"Authorization": f"Bearer {token}"})

    assert len(standin_verifier.requests) == 4


def test_requests_with_a_dpop_proof_always_reach_the_verifier(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    for _ in range(2):
        call(base, "/a", headers={"Authorization": "Bearer cached", "DPoP": "same-proof"})

    assert len(standin_verifier.requests) == 2


def test_cache_entries_zero_turns_reuse_off(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url, "cache_entries": 0}, echo_upstream)

    for _ in range(2):
        call(base, "/a", headers={"Authorization": "Bearer cached"})

    assert len(standin_verifier.requests) == 2


# --------------------------------------------------------------------------- configuration


def test_schema_rejects_an_unknown_field(start_nginx, echo_upstream, standin_verifier):
    with pytest.raises(RuntimeError, match="unknown field"):
        start_nginx({"url": standin_verifier.url, "timeuot": 5}, echo_upstream)


def test_schema_requires_the_url(start_nginx, echo_upstream):
    with pytest.raises(RuntimeError, match="url is required"):
        start_nginx({}, echo_upstream)


# --------------------------------------------------------------------------- more framing and state


def test_close_delimited_http10_answer_is_read_and_not_pooled(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    for _ in range(2):
        status, _, body = call(base, headers={"Authorization": "Bearer http10"})
        assert status == 200
        assert upstream_saw(body)["h"]["x-authenticated-userid"] == ["user-10"]

    assert standin_verifier.connections == 2


def test_denials_marked_reusable_are_reused(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    answers = [call(base, "/a", headers={"Authorization": "Bearer deny-cached"}) for _ in range(2)]

    assert len(standin_verifier.requests) == 1
    assert answers[0][0] == answers[1][0] == 403
    assert answers[0][2] == answers[1][2]
    assert end_to_end(answers[0][1]) == end_to_end(answers[1][1])


def test_cache_keys_are_the_request_parts_length_prefixed(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, with_sha256=True)

    for path in ["/a", "/a", "/b?q=1"]:
        assert call(base, path, headers={"Authorization": "Bearer cached"})[0] == 200

    port = urllib.parse.urlsplit(base).port
    parts = ["GET", "http", "127.0.0.1", str(port)]
    keys = [[*parts, "/a", "", "Bearer cached"], [*parts, "/b?q=1", "q=1", "Bearer cached"]]
    expected = sum(len("".join(f"{len(p)}:{p}" for p in k) + "-") + ENTRY_OVERHEAD for k in keys)
    stats = shim_json(base, "cache")
    assert stats["hits"] == 1
    assert len(standin_verifier.requests) == 2
    # each entry also counts its answer's bytes (its header names and values, its body): the stand-in's, asked directly
    u = urllib.parse.urlsplit(standin_verifier.url)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request("GET", u.path, headers={"Authorization": "Bearer cached"})
        r = conn.getresponse()
        answer = sum(len(k) + len(v) for k, v in r.getheaders()) + len(r.read())
    finally:
        conn.close()
    assert stats["bytes"] == expected + 2 * answer


def test_a_kept_answer_is_never_reused_for_another_credential(start_nginx, echo_upstream, standin_verifier):
    # the first token's allow is kept for 30 s; the same route with another credential (a refused token, an
    # unknown one, none) must reach the verifier and get its own answer
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, with_sha256=True)
    assert call(base, "/a", headers={"Authorization": "Bearer cached"})[0] == 200

    assert call(base, "/a", headers={"Authorization": "Bearer deny-cached"})[0] == 403
    assert call(base, "/a", headers={"Authorization": "Bearer cached-not"})[0] == 401
    assert call(base, "/a")[0] == 401
    assert len(standin_verifier.requests) == 4


def test_spoofed_identity_behind_many_headers_is_still_stripped(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)
    headers = {f"X-Filler-{i}": "1" for i in range(150)}
    headers.update({"Authorization": "Bearer good", "X-Authenticated-Roles": "superuser"})

    status, _, body = call(base, headers=headers)

    assert status == 200
    assert "x-authenticated-roles" not in upstream_saw(body)["h"]


def test_a_request_with_too_many_headers_to_check_is_refused(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)
    # 1000 lines with http.client's Host and Accept-Encoding: the plugin's limit (MAX_REQUEST_HEADERS). A few more are
    # refused by the rig's nginx itself ("client sent too many header lines"), before the plugin runs.
    headers = {f"X-F{i}": "1" for i in range(996)}
    headers.update({"Authorization": "Bearer good", "X-Authenticated-Roles": "superuser"})

    status, _, body = call(base, headers=headers)

    assert status == 400
    assert json.loads(body) == {"message": "Too many request headers"}
    assert standin_verifier.requests == []


@pytest.mark.parametrize(("trust", "forwarded"), [(False, None), (True, "dGh1bWJwcmludA")])
def test_client_cert_thumbprint_header_is_forwarded_only_when_trusted(
    start_nginx, echo_upstream, standin_verifier, trust, forwarded
):
    base = start_nginx({"url": standin_verifier.url, "trust_client_cert_header": trust}, echo_upstream)

    call(base, headers={"Authorization": "Bearer good", "X-Client-Cert-Thumbprint": "dGh1bWJwcmludA"})

    (req,) = standin_verifier.requests
    assert {k.lower(): v for k, v in req["headers"]}.get("x-client-cert-thumbprint") == forwarded


def test_keepalive_timeout_zero_closes_after_each_answer(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url, "keepalive_timeout": 0}, echo_upstream)

    for _ in range(3):
        assert call(base, headers={"Authorization": "Bearer good"})[0] == 200

    assert standin_verifier.connections == 3


# --------------------------------------------------------------------------- headers for the client
# The verifier's DPoP-Nonce, RateLimit-* and 429 reach the client (and nothing of the client's does): the REAL
# verifier (`dpop.require_nonce`, a rate limit) or, for answers that say they may be reused, the stand-in. The
# same cases through Envoy and nginx: tests/integration/test_gateway_client_headers.py.

RATE_BURST = 2
PATH = "/api/items?limit=5"


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    server = LocalIssuer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_strict_verifier(tmp_path_factory.mktemp("verifier"), issuer=issuer.issuer, rate_burst=RATE_BURST)
    yield proc
    proc.stop()


def one(headers: list[tuple[str, str]], name: str) -> str:
    values = header(headers, name)
    assert len(values) <= 1, (name, values)
    return values[0] if values else ""


def test_the_use_dpop_nonce_challenge_carries_the_nonce_and_a_proof_with_it_passes(
    start_nginx, echo_upstream, verifier, issuer
):
    base = start_nginx({"url": f"{verifier.url}/v1/forward-auth"}, echo_upstream)
    key = ec.generate_private_key(ec.SECP256R1())
    tok = unique_token(issuer, cnf={"jkt": thumbprint(public_jwk(key))})
    url = f"{base}/api/items"

    status, headers, _ = call(base, PATH, {"Authorization": f"DPoP {tok}", "DPoP": dpop_proof(key, "GET", url, tok)})

    assert status == 401, headers
    assert 'error="use_dpop_nonce"' in one(headers, "WWW-Authenticate"), headers
    nonce = one(headers, "DPoP-Nonce")
    assert nonce, headers

    proof = dpop_proof(key, "GET", url, tok, nonce=nonce)
    status, headers, body = call(base, PATH, {"Authorization": f"DPoP {tok}", "DPoP": proof})

    assert status == 200, (headers, body)
    assert upstream_saw(body)["h"]["x-authenticated-userid"][0].startswith("user-")


def test_an_allow_renews_an_old_nonce_for_the_client(start_nginx, echo_upstream, verifier, issuer):
    base = start_nginx({"url": f"{verifier.url}/v1/forward-auth"}, echo_upstream)
    url = f"{base}/api/items"

    def first():
        key = ec.generate_private_key(ec.SECP256R1())
        tok = unique_token(issuer, cnf={"jkt": thumbprint(public_jwk(key))})
        _, headers, _ = call(base, PATH, {"Authorization": f"DPoP {tok}", "DPoP": dpop_proof(key, "GET", url, tok)})
        nonce = one(headers, "DPoP-Nonce")
        return (key, tok, nonce), nonce

    def then(sent, nonce):
        key, tok, _ = sent
        return call(base, PATH, {"Authorization": f"DPoP {tok}", "DPoP": dpop_proof(key, "GET", url, tok, nonce=nonce)})

    (_, _, nonce), (status, headers, body) = with_a_half_aged_nonce(first, then)  # past half its lifetime, still good

    assert status == 200, (headers, body)
    assert one(headers, "DPoP-Nonce") not in ("", nonce), headers
    assert "dpop-nonce" not in upstream_saw(body)["h"]


def test_an_identity_under_a_rate_limit_sees_its_budget_on_allows_and_the_verifiers_429(
    start_nginx, echo_upstream, verifier, issuer
):
    base = start_nginx({"url": f"{verifier.url}/v1/forward-auth"}, echo_upstream)
    tok = unique_token(issuer)
    allowed = [call(base, PATH, {"Authorization": f"Bearer {tok}"}) for _ in range(RATE_BURST)]

    status, headers, _ = call(base, PATH, {"Authorization": f"Bearer {tok}", **CLIENT_COPIES})

    assert [a[0] for a in allowed] == [200] * RATE_BURST
    for left, (_, allow_headers, _) in zip(range(RATE_BURST - 1, -1, -1), allowed, strict=True):
        assert one(allow_headers, "RateLimit-Policy") == f'"default";q={RATE_BURST};w=2000', allow_headers
        assert one(allow_headers, "RateLimit").startswith(f'"default";r={left};'), allow_headers
    assert status == 429, headers
    assert int(one(headers, "Retry-After")) > 100, headers
    assert one(headers, "RateLimit-Policy").startswith(f'"default";q={RATE_BURST}'), headers
    assert one(headers, "RateLimit").startswith('"default";r=0'), headers
    assert one(headers, "X-Verifier-Reason") == "rate_limited"


def test_a_refusal_never_reflects_the_clients_copies(start_nginx, echo_upstream, verifier):
    base = start_nginx({"url": f"{verifier.url}/v1/forward-auth"}, echo_upstream)

    status, headers, _ = call(base, PATH, {"Authorization": "Bearer garbage", **CLIENT_COPIES})

    assert status == 401
    for name in CLIENT_COPIES:
        assert header(headers, name) == [], (name, headers)


def test_an_allow_gives_the_client_the_verifiers_nonce_not_the_clients(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    status, headers, body = call(base, PATH, {"Authorization": "Bearer nonce", **CLIENT_COPIES})

    assert status == 200
    assert header(headers, "DPoP-Nonce") == ["n-123"]
    for name in ("ratelimit-policy", "ratelimit", "retry-after"):
        assert header(headers, name) == [], (name, headers)
    assert upstream_saw(body)["h"]["dpop-nonce"] == [CLIENT_COPIES["dpop-nonce"]]  # the client's, for the upstream


def test_an_answer_carrying_a_nonce_is_never_reused(start_nginx, echo_upstream, standin_verifier):
    """A nonce is about one request: even an answer that says max-age=30 is asked again each time."""
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)
    before = len(standin_verifier.requests)

    answers = [call(base, PATH, {"Authorization": "Bearer nonce-cached"}) for _ in range(2)]

    assert [a[0] for a in answers] == [200, 200]
    assert len(standin_verifier.requests) - before == 2, "an answer carrying a nonce was reused"
    assert header(answers[0][1], "DPoP-Nonce") != header(answers[1][1], "DPoP-Nonce")
