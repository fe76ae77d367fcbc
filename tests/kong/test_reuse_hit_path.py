"""The Kong Lua plugin's reused-answer path (#24 goal 5) keeps every guard of the path that asks the verifier.

Real nginx running kong/plugins/edge-verifier under the PDK shim (tests/kong/conftest.py), the stand-in verifier's
`cached` token (an allow with `Cache-Control: private, max-age=30`); keys are the request's parts, length-prefixed.
Each test first puts an answer in the plugin's cache with a clean request, then sends what an
attacker would send with the same credential on the same route: a request served from reuse must be cleaned exactly
like one that reached the verifier, and anything the key does not cover must reach the verifier.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from typing import Any

import pytest

pytestmark = pytest.mark.integration

Header = tuple[str, str]
TOKEN = "Bearer cached"


def send(base: str, path: str, headers: list[Header], method: str = "GET") -> tuple[int, list[Header], bytes]:
    """One request with `headers` sent exactly as listed: repeated names and any spelling."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=any(n.lower() == "host" for n, _ in headers), skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        conn.close()


def upstream_headers(body: bytes) -> dict[str, list[str]]:
    """The echo upstream's request headers, keyed by lower-case name."""
    out: dict[str, list[str]] = {}
    for k, v in json.loads(body)["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def shim(base: str, what: str) -> Any:
    status, _, body = send(base, f"/__shim/{what}", [])
    assert status == 200
    return json.loads(body)


@pytest.fixture
def rig(start_nginx: Any, echo_upstream: int, standin_verifier: Any) -> Any:
    """(base URL, the stand-in verifier) with reuse on; one answer for TOKEN on /a already kept."""
    base = start_nginx({"url": standin_verifier.url}, echo_upstream, with_sha256=True)
    assert send(base, "/a", [("Authorization", TOKEN)])[0] == 200
    assert len(standin_verifier.requests) == 1
    return base, standin_verifier


SPOOFED: list[Header] = [
    ("X-Authenticated-Userid", "admin"),
    ("x-authenticated-userid", "root"),  # the same name again, another spelling
    ("X-AUTHENTICATED-ROLES", "superuser"),
    ("X-Authenticated-Roles", "auditor"),
    ("x-Authenticated-Scope", "admin:all"),
    ("X-Authenticated-Identity", "forged.assertion"),
    ("X-Consumer-ID", "0000"),
    ("X-Consumer-Username", "root"),
    ("X-Credential-Identifier", "root"),
    ("X-Anonymous-Consumer", "false"),
    ("X-Consumer-Groups", "admins"),
    ("X-Kong-Consumer-Username", "root"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("x-method-override", "DELETE"),
]


def test_a_reused_allow_clears_every_spoofed_header_like_a_fresh_one(rig: Any) -> None:
    base, verifier = rig

    status, _, body = send(base, "/a", [("Authorization", TOKEN), *SPOOFED])

    assert status == 200
    assert len(verifier.requests) == 1  # served from reuse: the verifier never saw this request
    seen = upstream_headers(body)
    assert seen["x-authenticated-userid"] == ["user-1"]
    assert seen["x-authenticated-scope"] == ["read write"]
    assert seen["x-authenticated-issuer"] == ["http://127.0.0.1:9400"]
    assert "x-authenticated-roles" not in seen
    assert "x-authenticated-identity" not in seen
    leaked = [n for n in seen if n.startswith(("x-consumer-", "x-credential-", "x-anonymous-", "x-kong-consumer-"))]
    assert not leaked, seen
    assert not [n for n in seen if "method" in n], seen


def test_a_reused_allow_authenticates_the_verified_user_on_every_request(rig: Any) -> None:
    base, verifier = rig

    assert send(base, "/a", [("Authorization", TOKEN)])[0] == 200

    assert len(verifier.requests) == 1
    calls = shim(base, "authenticated")
    assert calls["count"] == 2
    assert [c["credential"] for c in calls["calls"]] == [{"id": "user-1"}] * 2
    assert all(c["consumer"] is None for c in calls["calls"])


@pytest.mark.parametrize(
    "authorizations",
    [
        [("Authorization", TOKEN), ("Authorization", TOKEN)],
        [("Authorization", TOKEN), ("authorization", "Bearer other")],
        [("authorization", "Bearer other"), ("AUTHORIZATION", TOKEN)],
    ],
    ids=["same-twice", "odd-case-second", "odd-case-first"],
)
def test_a_repeated_authorization_is_never_served_a_single_ones_answer(rig: Any, authorizations: list[Header]) -> None:
    base, verifier = rig

    status, _, body = send(base, "/a", authorizations)

    # nginx refuses a repeated Authorization (any spelling) before any phase runs: no kept allow, no upstream
    assert status == 400, (status, body)
    assert b"x-authenticated" not in body.lower()
    assert len(verifier.requests) == 1
    assert shim(base, "cache")["hits"] == 0


@pytest.mark.parametrize(
    ("method", "path", "host"),
    [
        ("GET", "/a?x=1", None),
        ("GET", "/a/", None),
        ("GET", "/A", None),
        ("POST", "/a", None),
        ("GET", "/a", "other.example"),
    ],
    ids=["query", "trailing-slash", "case", "method", "host"],
)
def test_a_request_the_key_tells_apart_reaches_the_verifier(rig: Any, method: str, path: str, host: str | None) -> None:
    base, verifier = rig
    headers = [("Authorization", TOKEN)] + ([("Host", host)] if host else [])

    assert send(base, path, headers, method)[0] == 200
    assert len(verifier.requests) == 2
    asked = dict((k.lower(), v) for k, v in verifier.requests[-1]["headers"])
    assert asked["x-forwarded-method"] == method
    if host:
        assert asked["x-forwarded-host"] == host

    # and that request's own answer is reused for it
    assert send(base, path, headers, method)[0] == 200
    assert len(verifier.requests) == 2


@pytest.mark.parametrize("proof", ["DPoP", "dpop", "X-WebAuthn-Assertion", "x-webauthn-assertion"])
def test_a_request_with_a_proof_is_never_served_from_reuse(rig: Any, proof: str) -> None:
    base, verifier = rig

    for _ in range(2):
        send(base, "/a", [("Authorization", TOKEN), (proof, "same-proof")])

    assert len(verifier.requests) == 3


def test_client_headers_of_one_answer_never_reach_a_reused_one(rig: Any) -> None:
    base, verifier = rig

    _, first, _ = send(base, "/a", [("Authorization", "Bearer nonce")])
    _, reused, _ = send(base, "/a", [("Authorization", TOKEN)])

    assert ("DPoP-Nonce", "n-123") in first
    assert not [k for k, _ in reused if k.lower() == "dpop-nonce"]
    assert len(verifier.requests) == 2


def test_bytes_moved_from_the_query_into_the_credential_never_reach_a_kept_answer(rig: Any) -> None:
    # joined without lengths, "/a?x" + "x" + "Bearer cached" and "/a?" + "" + "xxBearer cached" are the same bytes
    base, verifier = rig
    assert send(base, "/a?x", [("Authorization", TOKEN)])[0] == 200
    asked = len(verifier.requests)

    status, _, body = send(base, "/a?", [("Authorization", "xxBearer cached")])

    assert status == 401, body
    assert len(verifier.requests) == asked + 1


def test_bytes_moved_from_the_credential_into_the_thumbprint_never_reach_a_kept_answer(
    start_nginx: Any, echo_upstream: int, standin_verifier: Any
) -> None:
    # behind a proxy that terminates mTLS the thumbprint is a key part too: "Bearer cached" + no thumbprint and
    # "Bearer cache" + "d" must stay two keys
    base = start_nginx({"url": standin_verifier.url, "trust_client_cert_header": True}, echo_upstream)
    assert send(base, "/a", [("Authorization", TOKEN)])[0] == 200

    status, _, body = send(base, "/a", [("Authorization", "Bearer cache"), ("X-Client-Cert-Thumbprint", "d")])

    assert status == 401, body
    assert len(standin_verifier.requests) == 2


def big_path(i: int) -> str:
    """A distinct path of about 5 KB (the request line stays under nginx's 8 KB header buffer)."""
    return f"/big/{i}/" + "p" * 5000


def test_kilobyte_keys_are_bounded_by_bytes_not_only_by_entries(
    start_nginx: Any, echo_upstream: int, standin_verifier: Any
) -> None:
    # 20 entries may hold 20 x 2 KiB: a flood of 5 KB keys keeps the newest few answers, never 100 KB of keys
    base = start_nginx({"url": standin_verifier.url, "cache_entries": 20}, echo_upstream)

    for i in range(20):
        assert send(base, big_path(i), [("Authorization", TOKEN)])[0] == 200
    stats = shim(base, "cache")

    assert stats["stores"] == 20
    assert stats["bytes"] <= 20 * 2048, stats
    assert stats["entries"] < 20, stats
    # the newest answer is reused, the oldest was evicted
    assert send(base, big_path(19), [("Authorization", TOKEN)])[0] == 200
    assert len(standin_verifier.requests) == 20
    assert send(base, big_path(0), [("Authorization", TOKEN)])[0] == 200
    assert len(standin_verifier.requests) == 21


def test_a_key_larger_than_the_whole_byte_bound_is_asked_every_time(
    start_nginx: Any, echo_upstream: int, standin_verifier: Any
) -> None:
    base = start_nginx({"url": standin_verifier.url, "cache_entries": 2}, echo_upstream)

    for _ in range(2):
        assert send(base, big_path(0), [("Authorization", TOKEN)])[0] == 200
    assert send(base, "/a", [("Authorization", TOKEN)])[0] == 200
    assert send(base, "/a", [("Authorization", TOKEN)])[0] == 200

    assert len(standin_verifier.requests) == 3  # the big one twice, the small one once
    assert shim(base, "cache")["entries"] == 1


@pytest.mark.parametrize("spoofed", range(1, 8))
def test_a_spoofed_identity_header_is_cleared_at_every_position_of_the_scan(rig: Any, spoofed: int) -> None:
    # the scan takes the first headers one by one and the rest in a loop: whatever the number of headers (Host and
    # Authorization plus 1-7 spoofed ones), every spoofed one is cleared on a reused allow
    base, verifier = rig
    headers = [("Authorization", TOKEN)] + [(f"X-Authenticated-Role{i}", "admin") for i in range(spoofed)]

    status, _, body = send(base, "/a", headers)

    assert status == 200
    assert len(verifier.requests) == 1
    seen = upstream_headers(body)
    assert not [n for n in seen if n.startswith("x-authenticated-role")], seen
    assert seen["x-authenticated-userid"] == ["user-1"]
