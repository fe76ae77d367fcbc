# ruff: noqa: F811 - the forward-auth memo tests' fixtures (`app`, `transmitter`) are imported by name
"""The gRPC doors' remembered answers (`GrpcDoors`, `verifier/doors/answer_memo.py`): our own door keyed by the
request's bytes, Envoy's by the request without its per-request fields (`verifier/doors/envoy_request.py`).

Differential, as the forward-auth memo's tests: the composition root's doors (with the memos) and doors
without them over ONE pipeline (its caches, revocation index, clock) must give byte-identical answers whatever
happens between calls; Envoy's requests each carry a new request id, time and stream id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from doorkit import running_verifier
from envoy.service.auth.v3 import external_auth_pb2 as ea
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import FrozenClock
from test_answer_memo import (  # the forward-auth memo's composition root and state changes
    app,  # noqa: F401 - a fixture
    assertion_app,
    backchannel_logout,
    change_state,
    differential_app,
    differential_tokens,
    kill_switch,
    replica_broadcast,
    ssf_session_revoked,
    transmitter,  # noqa: F401 - a fixture
)
from tokenkit import NOW, FakeFetcher, Mint, claims

from verifier.app import App
from verifier.doors.grpc import ENVOY_SERVICE, GrpcDoors, attributes_from_envoy, envoy_response
from verifier.settings import RateLimit, RateLimitSettings
from verifier.v1 import verifier_pb2

DOORS = ("grpc", "ext_authz")
_serial = iter(range(1, 1 << 30))  # every Envoy request its own request id, time and stream id


def envoy_request(token: str | None, path: str = "/api/orders/42", method: str = "GET", **headers: str) -> bytes:
    """A CheckRequest as Envoy sends it, with fresh per-request fields."""
    serial = next(_serial)
    request = ea.CheckRequest()
    attributes = request.attributes
    attributes.source.address.socket_address.address = "192.0.2.10"
    attributes.source.address.socket_address.port_value = 40_000  # one keep-alive connection
    attributes.request.time.seconds = int(NOW) + serial
    http = attributes.request.http
    http.id = str(serial)
    http.method, http.scheme, http.host, http.path = method, "https", "api.example.test", path
    http.headers.update({"x-request-id": f"req-{serial}", ":path": path, **headers})
    if token:
        http.headers["authorization"] = f"Bearer {token}"
    return request.SerializeToString()  # type: ignore[no-any-return]


def own_request(token: str | None, path: str = "/api/orders/42", method: str = "GET", **headers: str) -> bytes:
    """Our own CheckRequest, as the Kong plugin sends it (the same bytes for the same request)."""
    if token:
        headers["Authorization"] = f"Bearer {token}"
    message = verifier_pb2.CheckRequest(method=method, scheme="https", host="api.example.test", path=path)
    message.headers.update(headers)
    return message.SerializeToString()  # type: ignore[no-any-return]


REQUEST = {"grpc": own_request, "ext_authz": envoy_request}


def ask(doors: GrpcDoors, door: str) -> Callable[[bytes], Any]:
    """The door's method as grpc.aio calls it, without a servicer context (none is read on a cached check)."""
    check = doors.check_own if door == "grpc" else doors.check_envoy
    return lambda data: check(data, None)


def allowed(door: str, answer: bytes) -> bool:
    if door == "grpc":
        return bool(verifier_pb2.CheckResponse.FromString(answer).allowed)
    return ea.CheckResponse.FromString(answer).status.code == 0


def reason(door: str, answer: bytes) -> str:
    if door == "grpc":
        return str(verifier_pb2.CheckResponse.FromString(answer).reason)
    denied = ea.CheckResponse.FromString(answer).denied_response
    return next((h.header.value for h in denied.headers if h.header.key == "x-verifier-reason"), "ok")


def memo_of(doors: GrpcDoors, door: str) -> Any:
    return doors._own_answers if door == "grpc" else doors._envoy_answers


def reference(built: App, door: str) -> Callable[[bytes], Any]:
    """What every answer is compared with, over the same pipeline: our own door without remembered answers;
    for Envoy's, the path before keys (the whole request parsed and translated, nothing cleared)."""
    doors = GrpcDoors(built.pipeline, built.metrics, built.ready)
    assert doors._envoy_answers is None and built.grpc._envoy_answers is not None
    if door == "grpc":
        return ask(doors, door)

    async def whole(data: bytes) -> bytes:
        attrs = attributes_from_envoy(ea.CheckRequest.FromString(data))
        return envoy_response(await built.pipeline.decide(attrs, door), attrs.headers)

    return whole


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize(
    "change",
    [kill_switch, ssf_session_revoked, backchannel_logout, replica_broadcast],
    ids=["kill_switch", "ssf_session_revoked", "backchannel_logout", "replica_broadcast"],
)
async def test_a_revoked_token_is_refused_on_the_very_next_identical_check(
    app: App,
    mint: Mint,
    transmitter: Any,
    change: Callable[..., Any],
    door: str,
) -> None:
    token = mint(claims(sid="s-1"))
    check, make = ask(app.grpc, door), REQUEST[door]
    first = await check(make(token))
    assert allowed(door, first)
    assert await check(make(token)) == first and len(memo_of(app.grpc, door)) == 1  # remembered, and reused
    await change(app, mint, transmitter)
    data = make(token)
    answer = await check(data)
    assert not allowed(door, answer) and reason(door, answer) in {"token_revoked", "session_revoked"}
    assert await reference(app, door)(data) == answer


@pytest.mark.parametrize("door", DOORS)
async def test_a_token_at_the_end_of_its_life_is_refused_as_without_the_memo(
    app: App,
    mint: Mint,
    clock: FrozenClock,
    door: str,
) -> None:
    token = mint(claims(exp=int(NOW) + 30))
    check, plain, make = ask(app.grpc, door), reference(app, door), REQUEST[door]
    seen = []
    for _ in range(160):  # half-second steps past `exp` (+ leeway)
        data = make(token)
        answer = await check(data)
        assert answer == await plain(data), clock.now() - NOW
        seen.append(reason(door, answer))
        clock.advance(0.5)
    assert seen[0] == "ok" and seen[-1] == "token_expired"


async def test_a_client_smuggling_identity_headers_is_never_answered_from_an_honest_request(
    app: App,
    mint: Mint,
) -> None:
    token = mint()
    check = ask(app.grpc, "ext_authz")
    honest = await check(envoy_request(token))
    assert await check(envoy_request(token)) == honest  # remembered
    data = envoy_request(token, **{"x-authenticated-userid": "admin", "x-authenticated-tenant": "acme"})
    for _ in range(2):  # and the smuggling request's own answer, remembered too, names them every time
        answer = await check(data)
        assert answer == await reference(app, "ext_authz")(data)
        removed = ea.CheckResponse.FromString(answer).ok_response.headers_to_remove
        assert "x-authenticated-tenant" in removed


@pytest.mark.parametrize("door", DOORS)
async def test_hits_are_counted_as_decisions_and_cache_hits(app: App, mint: Mint, door: str) -> None:
    token = mint()
    check, make = ask(app.grpc, door), REQUEST[door]
    await check(make(token))
    hot = app.metrics._hot
    decisions, cached = hot.decisions[(door, "allow", "ok")], hot.cache[("positive", "hit")]
    for _ in range(5):
        await check(make(token))
    assert len(memo_of(app.grpc, door)) == 1
    assert hot.decisions[(door, "allow", "ok")] == decisions + 5
    assert hot.cache[("positive", "hit")] == cached + 5
    assert sum(hot.buckets[door]) == hot.decisions[(door, "allow", "ok")]


async def test_tracing_turns_the_memos_off(app: App) -> None:
    from verifier.observe.tracing import NO_TRACING, Tracing

    tracing: Tracing = NO_TRACING  # any Tracing: the doors hold one only when tracing is on
    doors = GrpcDoors(app.pipeline, app.metrics, app.ready, tracing, answers=lambda: app.grpc._envoy_answers)  # type: ignore[arg-type,return-value]
    assert doors._own_answers is None and doors._envoy_answers is None


async def test_an_identity_assertion_is_handed_out_until_its_renewal_exactly_as_without_the_memo(
    tmp_path: Path, fetcher: FakeFetcher, mint: Mint
) -> None:
    app = await assertion_app(tmp_path, fetcher)
    try:
        clock: FrozenClock = app.clock  # type: ignore[assignment]
        check, plain = ask(app.grpc, "ext_authz"), reference(app, "ext_authz")
        token = mint(claims(exp=int(NOW) + 3600))
        assertions = set()
        for _ in range(60):
            data = envoy_request(token)
            answer = await check(data)
            assert answer == await plain(data), clock.now() - NOW
            headers = ea.CheckResponse.FromString(answer).ok_response.headers
            assertions.add(next(h.header.value for h in headers if h.header.key == "x-authenticated-identity"))
            clock.advance(0.5)
        assert len(assertions) >= 4  # renewed every ~6 s, and the memo followed each renewal
    finally:
        await app.stop(grace=0.1)


# -- a rate limit counts every call, over a real channel --------------------------------------------------------


@pytest.mark.parametrize("door", DOORS)
async def test_a_rate_limit_counts_every_identical_call(door: str) -> None:
    limits = RateLimitSettings(default=RateLimit(per_second=0.001, burst=2))
    async with running_verifier({"rate_limits": limits}) as (verifier, idp):
        token = idp.mint(sub="erin")
        method = f"/{ENVOY_SERVICE}/Check" if door == "ext_authz" else "/verifier.v1.Verifier/Check"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{verifier.ports.grpc}") as channel:
            check = channel.unary_unary(method)
            answers = [await check(REQUEST[door](token, path="/x")) for _ in range(3)]
        assert [allowed(door, a) for a in answers] == [True, True, False]
        assert reason(door, answers[2]) == "rate_limited"
        assert len(memo_of(verifier.grpc, door)) == 0  # a per-request check's answer is never remembered


# -- the differential property: any sequence, byte-identical answers ---------------------------------------------

STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 7), st.integers(0, 2)),
        st.tuples(st.just("advance"), st.sampled_from([0.2, 1.0, 3.0, 9.5, 40.0, 200.0]), st.just(0)),
        st.tuples(st.sampled_from(["revoke", "lift", "claims", "forget"]), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=STEPS, door=st.sampled_from(DOORS))
@example(steps=[("send", 0, 0), ("revoke", 0, 0), ("send", 0, 0)], door="ext_authz")
@example(
    steps=[("send", 0, 0), ("advance", 9.5, 0), ("send", 0, 0), ("advance", 9.5, 0), ("send", 0, 0)], door="ext_authz"
)
@example(steps=[("send", 0, 2), ("claims", 0, 0), ("send", 0, 2), ("lift", 0, 0), ("send", 0, 2)], door="ext_authz")
@example(steps=[("send", 0, 0), ("forget", 0, 0), ("advance", 1.0, 0), ("send", 0, 0)], door="grpc")
def test_any_sequence_gets_byte_identical_answers_with_and_without_the_memos(
    steps: list[tuple[str, Any, int]], door: str, mint: Mint, fetcher: FakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(_differential(steps, door, mint, fetcher, monkeypatch))


async def _differential(
    steps: list[tuple[str, Any, int]], door: str, mint: Mint, fetcher: FakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, clock = await differential_app(fetcher, monkeypatch)
    try:
        check, plain, make = ask(app.grpc, door), reference(app, door), REQUEST[door]
        tokens = differential_tokens(mint)
        variants: list[Callable[[str], bytes]] = [
            lambda t: make(t),
            lambda t: make(t, "/recent/x"),
            lambda t: make(t, "/admin/x", "DELETE"),
            lambda t: make(t, "/nowhere"),
            lambda t: make(t, **{"x-authenticated-userid": "admin"}),
            lambda t: make(t, **{"x-forwarded-for": "203.0.113.9"}),
            lambda t: make(t, **{"dpop": "eyJ0eXAiOiJkcG9wK2p3dCJ9.e30.c2ln"}),
            lambda t: make(None),
        ]
        for kind, arg, token in steps:
            if kind == "send":
                for _ in range(2):  # the second time, a remembered answer may be given
                    data = variants[arg](tokens[token])
                    assert await check(data) == await plain(data), (kind, arg, clock.now() - NOW)
            else:
                await change_state(app, clock, kind, arg)
    finally:
        await app.stop(grace=0.1)
