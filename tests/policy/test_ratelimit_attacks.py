"""Rate limits under attack, through the forward-auth door: whose bucket a request can take from.

- A request the verifier refuses takes nothing from the bucket of the identity its token names: a victim's
  leaked token without its certificate (401 `sender_constraint_failed`), a revoked session's token (401
  `token_revoked`), a token without the route's scope (403 `scope_missing`) cannot drain
  the victim's budget, however often it is sent. The rate limit is the last check.
- A caller gets no fresh bucket by rotating tokens (another `jti`, another client, other scopes, other roles)
  or by spelling the route another way (host case, a port, a doubled slash, another path): one bucket per
  identity (issuer and `sub`), whatever the token and the route.
- The 429 tells the client its budget and nothing of the identity's: no identity header, no subject, issuer
  or client in the body.
"""

from __future__ import annotations

import asyncio
import json

from doorkit import http_exchange, running_verifier

from verifier.revocation import parse_revocation_config
from verifier.settings import (
    PolicySettings,
    RateLimit,
    RateLimitSettings,
    Requirements,
    RouteMatch,
)

POLICIES = (
    PolicySettings(name="mtls", match=RouteMatch(path_prefix="/bank"), require=Requirements(sender_constraint="mtls")),
    PolicySettings(name="api", match=RouteMatch(path_prefix="/api"), require=Requirements(scopes_all=("read",))),
)
# A bucket of 3 that refills once in ~17 minutes: nothing comes back within a test.
LIMITS = RateLimitSettings(
    default=RateLimit(per_second=0.001, burst=3), roles=(("vip", RateLimit(per_second=0.002, burst=3)),)
)


def _request(path: str, token: str, *, host: str = "api.example.test", extra: str = "") -> bytes:
    return (
        f"GET /v1/forward-auth HTTP/1.1\r\nHost: verifier\r\nX-Forwarded-Method: GET\r\n"
        f"X-Forwarded-Proto: https\r\nX-Forwarded-Host: {host}\r\nX-Forwarded-Uri: {path}\r\n"
        f"Authorization: Bearer {token}\r\n{extra}\r\n"
    ).encode()


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def test_refused_requests_never_drain_the_bucket_of_the_identity_their_token_names() -> None:
    options = {
        "policies": POLICIES,
        "rate_limits": LIMITS,
        "mtls_thumbprint_header": "x-client-cert-thumbprint",
        "revocation": parse_revocation_config({}),
    }
    async with running_verifier(options) as (app, idp):
        port = app.ports.http
        assert app.revocation is not None
        await app.revocation.admin.create({"subject": {"format": "opaque", "id": "stolen-laptop"}})
        # What an attacker may hold of the victim's: a certificate-bound token without the certificate, a token of a
        # session the operator revoked, a token that lacks the route's scope.
        bound = idp.mint(sub="victim", scope="read", claims={"cnf": {"x5t#S256": "victims-cert"}})
        revoked = idp.mint(sub="victim", scope="read", claims={"sid": "stolen-laptop"})
        narrow = idp.mint(sub="victim", scope="profile")
        attempts = [
            (_request("/bank", bound), 401, "sender_constraint_failed"),
            (
                _request("/bank", bound, extra="X-Client-Cert-Thumbprint: attackers-cert\r\n"),
                401,
                "sender_constraint_failed",
            ),
            (_request("/api/x", bound), 401, "sender_constraint_failed"),
            (_request("/api/x", revoked), 401, "token_revoked"),
            (_request("/api/x", narrow), 403, "scope_missing"),
        ]
        for _ in range(3):  # the bucket's size, times each kind: any one of them taking a token would empty it
            for raw, status, reason in attempts:
                got, headers, _ = _parse(await http_exchange(port, raw))
                assert (got, headers.get("x-verifier-reason")) == (status, reason)
                assert "ratelimit" not in headers  # no bucket was looked at, so none is reported
        # The victim, with their own token, still has the whole budget.
        own = idp.mint(sub="victim", scope="read", claims={"sid": "own-phone"})
        left = []
        for _ in range(3):
            status, headers, _ = _parse(await http_exchange(port, _request("/api/x", own)))
            assert status == 200
            left.append(headers["ratelimit"].split(";")[1])
        assert left == ["r=2", "r=1", "r=0"]


async def test_rotating_tokens_and_route_spellings_gives_no_fresh_bucket() -> None:
    async with running_verifier({"policies": POLICIES, "rate_limits": LIMITS}) as (app, idp):
        port = app.ports.http
        tokens = [
            idp.mint(sub="greedy", scope="read", claims={"azp": "client-a"}),
            idp.mint(sub="greedy", scope="read write", claims={"client_id": "client-b", "roles": ["vip"]}),
            idp.mint(sub="greedy", scope="read", claims={"sid": "another-session"}),
        ]
        spellings = [
            ("/api/x", "api.example.test"),
            ("/api//y?page=2", "API.Example.TEST"),
            ("/api/z", "api.example.test:8443"),
        ]
        for token, (path, host) in zip(tokens, spellings, strict=True):
            status, headers, _ = _parse(await http_exchange(port, _request(path, token, host=host)))
            assert status == 200, headers
        # A fourth token, a fourth spelling: the same identity's bucket, empty.
        fresh = idp.mint(sub="greedy", scope="read", claims={"azp": "client-c", "roles": ["vip", "other"]})
        raw = _request("/api/./w", fresh, host="api.example.test.")
        status, headers, _ = _parse(await http_exchange(port, raw))
        assert (status, headers.get("x-verifier-reason")) == (429, "rate_limited")
        # Another user of the same clients is untouched.
        status, _, _ = _parse(await http_exchange(port, _request("/api/x", idp.mint(sub="bystander", scope="read"))))
        assert status == 200


async def test_the_429_tells_the_budget_and_nothing_of_the_identity() -> None:
    async with running_verifier({"rate_limits": LIMITS}) as (app, idp):
        port = app.ports.http
        token = idp.mint(sub="secret-subject-7", claims={"azp": "secret-client-9", "email": "who@example.test"})
        for _ in range(3):
            assert _parse(await http_exchange(port, _request("/x", token)))[0] == 200
        status, headers, body = _parse(await http_exchange(port, _request("/x", token)))
        assert status == 429
        assert json.loads(body) == {"error": "rate_limited", "error_description": "rate limit exceeded"}
        assert headers["ratelimit-policy"] == '"default";q=3;w=3000'
        assert headers["ratelimit"].startswith('"default";r=0;t=')
        assert int(headers["retry-after"]) >= 1
        assert not [name for name in headers if name.startswith("x-authenticated-")], headers
        raw = (json.dumps(headers) + body.decode()).lower()
        for secret in ("secret-subject-7", "secret-client-9", "who@example.test", idp.issuer.lower()):
            assert secret not in raw


async def test_a_token_of_another_limit_does_not_empty_the_bucket_early() -> None:
    """One bucket per identity, but its tokens may carry roles of different limits (a user holding a token with
    the `partner` role and one without): the bucket is kept until it would be full under each limit. Before, a
    take under the quick limit (a token back every 0.25 s, a bucket of 1) let the bucket expire a quarter second
    later, and the next take under the default found it gone: a whole new default burst, as often as the caller
    liked (5 requests every 0.3 s where the most generous limit allows 2)."""
    limits = RateLimitSettings(
        default=RateLimit(per_second=0.001, burst=5), roles=(("partner", RateLimit(per_second=4, burst=1)),)
    )
    async with running_verifier({"rate_limits": limits}) as (app, idp):
        port = app.ports.http
        plain = idp.mint(sub="mixer")
        partner = idp.mint(sub="mixer", claims={"roles": ["partner"]})
        statuses = [_parse(await http_exchange(port, _request("/x", plain)))[0] for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        await http_exchange(port, _request("/x", partner))  # a take under the quick limit (allowed or not)
        await asyncio.sleep(0.4)  # the quick limit's bucket would be full again: the default's is not
        status, headers, _ = _parse(await http_exchange(port, _request("/x", plain)))
        assert (status, headers.get("x-verifier-reason")) == (429, "rate_limited")
