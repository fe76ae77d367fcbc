"""How long a gateway may reuse each decision: `Cache-Control` on forward-auth, a field on our gRPC Check."""

from __future__ import annotations

import time

import grpc
import pytest
from doorkit import http_exchange, running_verifier

from verifier.settings import (
    EdgeCacheSettings,
    PolicySettings,
    RateLimit,
    RateLimitSettings,
    Requirements,
    RouteMatch,
)
from verifier.v1 import verifier_pb2, verifier_pb2_grpc


def _request(token: str | None, path: str = "/x", extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nX-Forwarded-Uri: {path}\r\n{auth}{extra}\r\n".encode()


def _cache_control(answer: bytes) -> str:
    for line in answer.split(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"cache-control:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError("no cache-control")


async def _reused_until(port: int, token: str, ends: float) -> None:
    """The token's allow may be reused for what is left until `ends` (wall clock) when the verifier decided, whole
    seconds (no-store at 0): at most what was left as the request went out, at least what was left as the answer
    came back (a loaded machine may take long between the two)."""
    sent = time.time()
    value = _cache_control(await http_exchange(port, _request(token)))
    answered = time.time()
    max_age = 0 if value == "no-store" else int(value.removeprefix("private, max-age="))
    assert max(0, int(ends - answered)) <= max_age <= ends - sent, (value, ends - sent, ends - answered)


async def test_allow_is_reusable_for_the_ceiling_and_refusals_as_configured() -> None:
    edge = EdgeCacheSettings(max_age_seconds=10, refusal_max_age_seconds=4)
    async with running_verifier({"edge_cache": edge}) as (app, idp):
        port = app.ports.http
        assert _cache_control(await http_exchange(port, _request(idp.mint()))) == "private, max-age=10"
        garbage = await http_exchange(port, _request("not.a.jwt"))
        assert garbage.startswith(b"HTTP/1.1 401") and _cache_control(garbage) == "private, max-age=4"
        forged = idp.mint()[:-6] + "AAAAAA"
        assert _cache_control(await http_exchange(port, _request(forged))) == "private, max-age=4"
        # A missing token is never reused; nor is an expiry (it carries no information worth reusing).
        assert _cache_control(await http_exchange(port, _request(None))) == "no-store"
        expired = idp.mint(claims={"exp": int(time.time()) - 3600})
        assert _cache_control(await http_exchange(port, _request(expired))) == "no-store"


async def test_reuse_never_outlives_the_token() -> None:
    async with running_verifier({"edge_cache": EdgeCacheSettings(max_age_seconds=60)}) as (app, idp):
        exp = int(time.time()) + 3
        await _reused_until(app.ports.http, idp.mint(claims={"exp": exp}), exp)


async def test_zero_turns_reuse_off() -> None:
    async with running_verifier({"edge_cache": EdgeCacheSettings(max_age_seconds=0, refusal_max_age_seconds=0)}) as (
        app,
        idp,
    ):
        assert _cache_control(await http_exchange(app.ports.http, _request(idp.mint()))) == "no-store"
        assert _cache_control(await http_exchange(app.ports.http, _request("a.b.c"))) == "no-store"


@pytest.mark.parametrize(
    ("options", "claims", "extra"),
    [
        ({"rate_limits": RateLimitSettings(default=RateLimit(per_second=100, burst=100))}, {}, ""),
        (
            {"mtls_thumbprint_header": "x-client-cert-thumbprint"},
            {"cnf": {"x5t#S256": "abc"}},
            "X-Client-Cert-Thumbprint: abc\r\n",
        ),
    ],
    ids=["rate-limited", "certificate-bound"],
)
async def test_per_request_decisions_are_never_reused(
    options: dict[str, object], claims: dict[str, object], extra: str
) -> None:
    async with running_verifier(options) as (app, idp):
        answer = await http_exchange(app.ports.http, _request(idp.mint(claims=claims), extra=extra))
        assert answer.startswith(b"HTTP/1.1 200") and _cache_control(answer) == "no-store"


async def test_max_auth_age_bounds_reuse() -> None:
    policies = (
        PolicySettings(name="fresh", match=RouteMatch(path_prefix="/"), require=Requirements(max_auth_age_seconds=100)),
    )
    async with running_verifier({"policies": policies, "edge_cache": EdgeCacheSettings(max_age_seconds=60)}) as (
        app,
        idp,
    ):
        auth_time = int(time.time()) - 95
        await _reused_until(app.ports.http, idp.mint(claims={"auth_time": auth_time}), auth_time + 100)


async def test_an_auth_time_ahead_of_the_login_gets_no_allow_and_no_longer_reuse() -> None:
    """A token whose `auth_time` lies in the future (beyond the leeway) was allowed on a `max_auth_age_seconds` route,
    its allow reusable by the gateway for the whole ceiling on every request until that time: now a 401, never
    reused. One whose `auth_time` is after its `iat` (within the leeway) is aged from its `iat`."""
    policies = (
        PolicySettings(name="fresh", match=RouteMatch(path_prefix="/"), require=Requirements(max_auth_age_seconds=100)),
    )
    async with running_verifier({"policies": policies, "edge_cache": EdgeCacheSettings(max_age_seconds=60)}) as (
        app,
        idp,
    ):
        now = int(time.time())
        ahead = await http_exchange(app.ports.http, _request(idp.mint(claims={"auth_time": now + 86_400})))
        assert ahead.startswith(b"HTTP/1.1 401") and _cache_control(ahead) == "no-store", ahead
        iat = now - 95
        await _reused_until(app.ports.http, idp.mint(claims={"iat": iat, "auth_time": now + 20}), iat + 100)


async def test_grpc_check_carries_the_same_lifetime() -> None:
    async with running_verifier({"edge_cache": EdgeCacheSettings(max_age_seconds=7)}) as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            allowed = verifier_pb2.CheckRequest(path="/", headers={"authorization": f"Bearer {idp.mint()}"})
            ok = await stub.Check(allowed)
            assert ok.allowed and ok.cache_max_age_seconds == 7
            no = await stub.Check(verifier_pb2.CheckRequest(path="/"))
            assert not no.allowed and no.cache_max_age_seconds == 0
