"""The forward-auth door's answer memo (`verifier/doors/answer_memo.py`): a remembered answer is handed out
only while the door without the memo would give the same bytes (FrozenClock, the real composition root).

The differential tests feed the same byte sequences to two doors over ONE pipeline (its caches, revocation
index, clock): the composition root's door (with the memo) and a door without it; every answer must be
byte-identical, whatever happens between requests (revocations, the clock running to the token's end,
state changes, other peers, pipelining, split chunks, `Connection: close`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from doorkit import Wire
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ssf_transmitter import SESSION_REVOKED, SsfTransmitter
from support import FrozenClock
from tokenkit import AUDIENCE, ISSUER, NOW, FakeFetcher, Mint, claims, issuer_settings

from verifier.app import App
from verifier.config.logout import BackchannelLogoutConfig
from verifier.doors import answer_memo
from verifier.doors.forward_auth import ForwardAuthDoor, _Connection
from verifier.doors.logout_http import LOGOUT_PATH
from verifier.doors.routes import HttpRequest
from verifier.revocation import parse_revocation_config
from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey
from verifier.revocation.logout import BACKCHANNEL_LOGOUT_EVENT
from verifier.settings import ADMIN_TOKEN_ENV, PolicySettings, Requirements, RouteMatch, Settings, parse_settings

ADMIN = "admin-secret-0123456789-abcdefghijkl"
TX = "https://ssf.example.test"
RECEIVER = "https://verifier.example.test/ssf"
CLIENT = "gateway-client"
PEER = "10.0.0.7"
POLICIES = (
    PolicySettings(name="admin", match=RouteMatch(path_prefix="/admin"), require=Requirements(roles_any=("admin",))),
    PolicySettings(
        name="recent",
        match=RouteMatch(path_prefix="/recent"),
        require=Requirements(authenticated=True, max_auth_age_seconds=60),
    ),
    PolicySettings(name="api", match=RouteMatch(path_prefix="/api"), require=Requirements(authenticated=True)),
)


class Client:
    """One keep-alive connection to a door."""

    def __init__(self, door: ForwardAuthDoor, peer: str = PEER) -> None:
        self.wire = Wire(peer)
        self.connection = _Connection(door)
        self.connection.connection_made(self.wire)  # type: ignore[arg-type]

    def send(self, *chunks: bytes) -> bytes:
        """Every chunk as one `data_received`; what was written back."""
        self.wire.out.clear()
        for chunk in chunks:
            self.connection.data_received(chunk)
        return b"".join(self.wire.out)


def request(
    token: str | None,
    path: str = "/api/orders/42",
    *,
    method: str = "GET",
    extra: str = "",
    connection: str = "",
    verb: str = "GET",
) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    close = f"Connection: {connection}\r\n" if connection else ""
    return (
        f"{verb} /v1/forward-auth HTTP/1.1\r\nHost: verifier\r\nX-Forwarded-Method: {method}\r\n"
        f"X-Forwarded-Proto: https\r\nX-Forwarded-Host: api.example.test\r\nX-Forwarded-Uri: {path}\r\n"
        f"{auth}{extra}{close}\r\n"
    ).encode()


def header(answer: bytes, name: str) -> str | None:
    for line in answer.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.lower() == name:
            return value.strip()
    return None


def operator_entry(entry_id: str, sub: str, now: float, overrides: dict[str, Any] | None = None) -> Entry:
    """A kill-switch entry on a subject (a claims override with `overrides`), as the admin API makes."""
    return Entry(
        id=entry_id,
        key=SubjectKey(KeyKind.ISS_SUB, sub, ISSUER),
        effect=Effect.CLAIMS_OVERRIDE if overrides else Effect.TOKEN_REVOKED,
        match=Match.ISSUED_BEFORE,
        event_time=now,
        expires_at=now + 3600,
        source="operator",
        event="operator",
        overrides=overrides,
    )


def reason(answer: bytes) -> str | None:
    return header(answer, "x-verifier-reason")


@pytest.fixture
def transmitter(clock: FrozenClock) -> SsfTransmitter:
    return SsfTransmitter(audience=RECEIVER, issuer=TX, now=clock.now)


@pytest.fixture
async def app(
    clock: FrozenClock, fetcher: FakeFetcher, transmitter: SsfTransmitter, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[App]:
    """The composition root, no listeners: policies, the kill switch, an SSF transmitter, back-channel logout."""
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN)
    fetcher.serve(transmitter.configuration_url, transmitter.configuration())
    fetcher.serve(transmitter.jwks_url, transmitter.jwks())
    revocation = parse_revocation_config(
        {
            "transmitters": [
                {"issuer": TX, "audience": RECEIVER, "delivery": "push", "algorithms": ["ES256"],
                 "subjects_of": [ISSUER]}
            ],
        }
    )  # fmt: skip
    settings = Settings(
        grpc=None,
        http=None,
        metrics=None,
        issuers=(issuer_settings(backchannel_logout=BackchannelLogoutConfig(audiences=(CLIENT,))),),
        policies=POLICIES,
        revocation=revocation,
    )
    built = App(settings, clock=clock, fetcher=fetcher)
    await built.start()
    try:
        await asyncio.wait_for(built.keys.wait_ready(), 10)
        await asyncio.wait_for(built.wait_serving(), 10)
        yield built
    finally:
        await built.stop(grace=0.1)


def plain_door(app: App) -> ForwardAuthDoor:
    """A door over the same pipeline, without the memo: the reference every answer is compared with."""
    door = ForwardAuthDoor(app.pipeline, app.metrics, app.ready, app.router, settings=app.settings.forward_auth)
    assert door.memo is None and app.forward_auth.memo is not None
    return door


# -- state changes take effect on the very next identical request ----------------------------------------------


async def kill_switch(app: App, mint: Mint, transmitter: SsfTransmitter) -> None:
    document = {"subject": {"format": "iss_sub", "iss": ISSUER, "sub": "user-1"}, "reason": "laptop stolen"}
    answer = await app.router.dispatch(
        HttpRequest(
            "POST", "/v1/admin/revocations", "",
            {"content-type": "application/json", "authorization": f"Bearer {ADMIN}"}, json.dumps(document).encode(),
        )
    )  # fmt: skip
    assert answer.status == 201, answer


async def ssf_session_revoked(app: App, mint: Mint, transmitter: SsfTransmitter) -> None:
    event = transmitter.sign_set({SESSION_REVOKED: {"event_timestamp": int(NOW)}}, {"format": "opaque", "id": "s-1"})
    answer = await app.router.dispatch(
        HttpRequest("POST", "/v1/ssf/events", "", {"content-type": "application/secevent+jwt"}, event.encode())
    )
    assert answer.status == 202, answer


async def backchannel_logout(app: App, mint: Mint, transmitter: SsfTransmitter) -> None:
    logout = mint(
        {"iss": ISSUER, "aud": CLIENT, "iat": int(NOW), "exp": int(NOW) + 120, "jti": "logout-1", "sid": "s-1",
         "sub": "user-1", "events": {BACKCHANNEL_LOGOUT_EVENT: {}}},
        headers={"typ": "logout+jwt"},
    )  # fmt: skip
    answer = await app.router.dispatch(
        HttpRequest("POST", LOGOUT_PATH, "", {"content-type": "application/x-www-form-urlencoded"},
                    ("logout_token=" + logout).encode())
    )  # fmt: skip
    assert answer.status == 200, answer


async def replica_broadcast(app: App, mint: Mint, transmitter: SsfTransmitter) -> None:
    """Another replica's kill switch, heard over the store's channel (applied to the index, not stored here)."""
    assert app.revocation is not None
    app.revocation._on_change([operator_entry("from-replica-a", "user-1", NOW)], [])


@pytest.mark.parametrize(
    "change",
    [kill_switch, ssf_session_revoked, backchannel_logout, replica_broadcast],
    ids=["kill_switch", "ssf_session_revoked", "backchannel_logout", "replica_broadcast"],
)
async def test_a_revoked_token_is_refused_on_the_very_next_identical_request(
    app: App, mint: Mint, transmitter: SsfTransmitter, change: Callable[..., Any]
) -> None:
    token = mint(claims(sid="s-1"))
    client = Client(app.forward_auth)
    raw = request(token)
    first = client.send(raw)
    assert reason(first) == "ok"
    assert client.send(raw) == first and len(app.forward_auth.memo or ()) == 1  # remembered, and reused
    await change(app, mint, transmitter)
    answer = client.send(raw)
    assert answer.startswith(b"HTTP/1.1 401 ") and reason(answer) in {"token_revoked", "session_revoked"}
    assert Client(plain_door(app)).send(raw) == answer


async def test_a_revocation_through_the_real_listener_refuses_the_next_request_on_the_same_keep_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over real sockets: the kill switch posted to the same port, then the same bytes again."""
    from doorkit import running_verifier

    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN)
    async with running_verifier({"revocation": parse_revocation_config({})}) as (verifier, idp):
        token = idp.mint(sub="mallory")
        raw = request(token, "/")  # any path: no policies here
        reader, writer = await asyncio.open_connection("127.0.0.1", verifier.ports.http)

        async def exchange(data: bytes) -> bytes:
            writer.write(data)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(header(head, "content-length") or 0)
            return head + (await asyncio.wait_for(reader.readexactly(length), 5) if length else b"")

        try:
            first = await exchange(raw)
            assert reason(first) == "ok"
            assert await exchange(raw) == first
            assert len(verifier.forward_auth.memo or ()) == 1
            document = json.dumps({"subject": {"format": "iss_sub", "iss": idp.issuer, "sub": "mallory"}}).encode()
            revoke = (
                f"POST /v1/admin/revocations HTTP/1.1\r\nHost: verifier\r\nAuthorization: Bearer {ADMIN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(document)}\r\n\r\n"
            ).encode() + document
            assert (await exchange(revoke)).startswith(b"HTTP/1.1 201 ")
            answer = await exchange(raw)
            assert answer.startswith(b"HTTP/1.1 401 ") and reason(answer) == "token_revoked"
        finally:
            writer.close()


# -- the end of a token's life: the same max-age, shrink and refusal as without the memo -----------------------


async def test_a_token_at_the_end_of_its_life_gets_the_shrunk_max_age_and_then_the_refusal(
    app: App, mint: Mint, clock: FrozenClock
) -> None:
    token = mint(claims(exp=int(NOW) + 30))
    memo, plain = Client(app.forward_auth), Client(plain_door(app))
    raw = request(token)
    seen: list[str | None] = []
    for _ in range(160):  # half-second steps through the last reuse window and past `exp` (+ leeway)
        answer = memo.send(raw)
        assert answer == plain.send(raw), clock.now() - NOW
        seen.append(header(answer, "cache-control") if answer.startswith(b"HTTP/1.1 200") else reason(answer))
        clock.advance(0.5)
    assert seen[0] == "private, max-age=10"
    assert "private, max-age=5" in seen and "no-store" in seen
    assert seen[-1] == "token_expired"


async def test_an_authentication_age_bound_shrinks_and_refuses_as_without_the_memo(
    app: App, mint: Mint, clock: FrozenClock
) -> None:
    token = mint(claims(auth_time=int(NOW) - 40))  # `recent` refuses 60 s after auth_time
    memo, plain = Client(app.forward_auth), Client(plain_door(app))
    raw = request(token, "/recent/x")
    seen = []
    for _ in range(30):
        answer = memo.send(raw)
        assert answer == plain.send(raw), clock.now() - NOW
        seen.append(header(answer, "cache-control") if answer.startswith(b"HTTP/1.1 200") else reason(answer))
        clock.advance(1)
    assert seen[0] == "private, max-age=10" and "private, max-age=3" in seen
    assert seen[-1] == "insufficient_user_authentication"


# -- requests that are not the same request ----------------------------------------------------------------------


async def test_another_peer_gets_its_own_answer(app: App, mint: Mint) -> None:
    token = mint()
    raw = request(token)
    first = Client(app.forward_auth, peer="10.0.0.1")
    first.send(raw)
    first.send(raw)  # a first-seen token's answer is not remembered: its next one is
    before = len(app.forward_auth.memo or ())
    other = Client(app.forward_auth, peer="10.0.0.2")
    assert other.send(raw) == Client(plain_door(app), peer="10.0.0.2").send(raw)
    entry = (app.forward_auth.memo or answer_memo.AnswerMemo(app.clock, app.generation)).get(raw, "10.0.0.2")
    assert before == 1 and entry is not None and entry.peer == "10.0.0.2"
    assert (app.forward_auth.memo or answer_memo.AnswerMemo(app.clock, app.generation)).get(raw, "10.0.0.1") is None


async def test_smuggled_identity_headers_are_named_for_removal_every_time(app: App, mint: Mint) -> None:
    token = mint()
    raw = request(token, extra="X-Authenticated-Userid: admin\r\nX-Authenticated-Groups: root\r\n")
    client = Client(app.forward_auth)
    first = client.send(raw)
    assert header(first, "x-envoy-auth-headers-to-remove") == "x-authenticated-groups"
    assert client.send(raw) == first == Client(plain_door(app)).send(raw)
    clean = client.send(request(token))
    assert header(clean, "x-envoy-auth-headers-to-remove") is None


async def test_pipelined_split_and_closing_requests_are_never_remembered(app: App, mint: Mint) -> None:
    token = mint()
    raw = request(token)
    memo = app.forward_auth.memo
    assert memo is not None
    Client(app.forward_auth).send(raw + raw)  # two in one chunk
    Client(app.forward_auth).send(raw[:40], raw[40:])  # one in two chunks
    Client(app.forward_auth).send(request(token, connection="close"))
    Client(app.forward_auth).send(raw[:-2])  # incomplete
    Client(app.forward_auth).send(raw + raw[:20])  # one whole, the next begun
    assert len(memo) == 0
    # At a message boundary only: a chunk completing a request begun earlier is not looked up.
    client = Client(app.forward_auth)
    client.send(raw)
    assert len(memo) == 1
    tail = raw[-20:]
    assert client.send(raw[:-20]) == b""
    assert client.send(tail) == Client(plain_door(app)).send(raw)


async def test_a_flood_of_distinct_requests_keeps_the_memo_bounded(app: App, mint: Mint) -> None:
    token = mint()
    client = Client(app.forward_auth)
    for i in range(answer_memo.MAX_ENTRIES * 3):
        assert client.send(request(token, extra=f"X-Request-Id: {i}\r\n")).startswith(b"HTTP/1.1 200 ")
    assert 0 < len(app.forward_auth.memo or ()) <= answer_memo.MAX_ENTRIES
    big = request(token, extra="Cookie: " + "c" * answer_memo.MAX_KEY_BYTES + "\r\n")
    assert client.send(big).startswith(b"HTTP/1.1 200 ")
    assert (app.forward_auth.memo or answer_memo.AnswerMemo(app.clock, app.generation)).get(big, PEER) is None


async def test_hits_are_counted_as_decisions_and_cache_hits(app: App, mint: Mint) -> None:
    token = mint()
    client = Client(app.forward_auth)
    raw = request(token)
    client.send(raw)
    hot = app.metrics._hot
    decisions, cached = hot.decisions[("forward_auth", "allow", "ok")], hot.cache[("positive", "hit")]
    for _ in range(5):
        client.send(raw)
    assert hot.decisions[("forward_auth", "allow", "ok")] == decisions + 5
    assert hot.cache[("positive", "hit")] == cached + 5
    assert sum(hot.buckets["forward_auth"]) == hot.decisions[("forward_auth", "allow", "ok")]


async def test_tracing_turns_the_memo_off(app: App) -> None:
    from verifier.observe.tracing import NO_TRACING, Tracing

    tracing: Tracing = NO_TRACING  # any Tracing: the door holds one only when tracing is on
    door = ForwardAuthDoor(app.pipeline, app.metrics, app.ready, memo=app.forward_auth.memo, tracing=tracing)
    assert door.memo is None


# -- the differential property: any sequence, byte-identical answers ---------------------------------------------

# (what, variant or seconds, token, peer); few variants and tokens, so the same bytes come back often.
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 11), st.integers(0, 2), st.sampled_from(["10.0.0.1", "10.0.0.2"])),
        st.tuples(st.just("advance"), st.sampled_from([0.2, 1.0, 3.0, 9.5, 40.0, 200.0]), st.just(0), st.just("")),
        st.tuples(st.sampled_from(["revoke", "lift", "claims", "forget"]), st.just(0), st.just(0), st.just("")),
    ),
    min_size=1,
    max_size=30,
)


P = "10.0.0.1"


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=STEPS)
# The attacks known to matter, always run: a revocation, the clock through the last reuse window, two
# requests in one chunk, a claims change and its lifting, a forgotten token, another peer.
@example(steps=[("send", 0, 0, P), ("revoke", 0, 0, ""), ("send", 0, 0, P)])
@example(
    steps=[("send", 0, 0, P), ("advance", 9.5, 0, ""), ("send", 0, 0, P), ("advance", 9.5, 0, ""), ("send", 0, 0, P)]
)
@example(
    steps=[("send", 1, 1, P), ("advance", 9.5, 0, ""), ("send", 1, 1, P), ("advance", 9.5, 0, ""), ("send", 1, 1, P)]
)
@example(steps=[("send", 8, 1, P)])
@example(steps=[("send", 0, 2, P), ("claims", 0, 0, ""), ("send", 0, 2, P), ("lift", 0, 0, ""), ("send", 0, 2, P)])
@example(steps=[("send", 0, 0, P), ("forget", 0, 0, ""), ("advance", 1.0, 0, ""), ("send", 0, 0, P)])
@example(steps=[("send", 6, 1, P), ("send", 6, 1, "10.0.0.2"), ("send", 5, 1, P), ("send", 4, 1, P)])
def test_any_sequence_gets_byte_identical_answers_with_and_without_the_memo(
    steps: list[tuple[str, Any, int, str]], mint: Mint, fetcher: FakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(_differential(steps, mint, fetcher, monkeypatch))


async def _differential(
    steps: list[tuple[str, Any, int, str]], mint: Mint, fetcher: FakeFetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, clock = await differential_app(fetcher, monkeypatch)
    try:
        plain = plain_door(app)
        tokens = differential_tokens(mint)
        variants: list[Callable[[str], list[bytes]]] = [
            lambda t: [request(t)],
            lambda t: [request(t, "/recent/x")],
            lambda t: [request(t, "/admin/x", method="DELETE")],
            lambda t: [request(t, "/nowhere")],
            lambda t: [request(t, verb="HEAD")],
            lambda t: [request(t, extra="X-Authenticated-Userid: admin\r\n")],
            lambda t: [request(t, extra="X-Forwarded-For: 203.0.113.9\r\n")],
            lambda t: [request(t, connection="close")],
            lambda t: [request(t) + request(t, extra="X-Request-Id: 2\r\n")],
            lambda t: [request(t)[:33], request(t)[33:]],
            lambda t: [request(t).replace(b"Bearer", b"bearer")],
            lambda t: [request(None)],
        ]
        pairs: dict[str, tuple[Client, Client]] = {}
        for kind, arg, token, peer in steps:
            if kind == "send":
                if peer not in pairs or pairs[peer][0].wire.closed:
                    pairs[peer] = (Client(app.forward_auth, peer), Client(plain, peer))
                memo_client, plain_client = pairs[peer]
                chunks = variants[arg](tokens[token])
                for _ in range(2):  # the second time, a remembered answer may be given
                    assert memo_client.send(*chunks) == plain_client.send(*chunks), (kind, arg, clock.now() - NOW)
                    assert memo_client.wire.closed == plain_client.wire.closed
                    if memo_client.wire.closed:
                        break
            else:
                await change_state(app, clock, kind, arg)
    finally:
        await app.stop(grace=0.1)


async def differential_app(fetcher: FakeFetcher, monkeypatch: pytest.MonkeyPatch) -> tuple[App, FrozenClock]:
    """The composition root of the differential tests (policies, revocation), started, and its clock."""
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN)
    clock = FrozenClock(NOW)
    settings_ = Settings(
        grpc=None, http=None, metrics=None, issuers=(issuer_settings(),), policies=POLICIES,
        revocation=parse_revocation_config({}),
    )  # fmt: skip
    app = App(settings_, clock=clock, fetcher=fetcher)
    await app.start()
    await asyncio.wait_for(app.wait_serving(), 10)
    assert app.revocation is not None
    return app, clock


def differential_tokens(mint: Mint) -> list[str]:
    """Near its end; with an authentication age and a role; long-lived with a claim a change overrides."""
    return [
        mint(claims(exp=int(NOW) + 25)),
        mint(claims(sub="user-2", auth_time=int(NOW) - 30, roles=["admin"])),
        mint(claims(sub="user-3", exp=int(NOW) + 3600, email="u3@example.test")),
    ]


async def change_state(app: App, clock: FrozenClock, kind: str, seconds: float) -> None:
    """One step between requests: the clock advances, an entry is added or lifted, the token cache forgotten."""
    assert app.revocation is not None
    if kind == "advance":
        clock.advance(seconds)
    elif kind == "revoke":
        await app.revocation.add([operator_entry("e-1", "user-1", clock.now())])
    elif kind == "lift":
        await app.revocation.remove(["e-1", "c-1"])
    elif kind == "claims":
        await app.revocation.add([operator_entry("c-1", "user-3", clock.now(), {"scope": "read"})])
    else:
        app.positive.clear()


# -- identity assertions: renewed at half-life, minted per request under a claims change ---------------------------


async def assertion_app(tmp_path: Path, fetcher: FakeFetcher) -> App:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "id.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    document = {
        "http": {"listen": "127.0.0.1:0"},
        "issuers": [{"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": ["ES256"]}],
        "edge_cache": {"max_age_seconds": 60},
        "revocation": {},
        "upstream": {
            "identity_token": {
                "issuer": "https://verifier.internal",
                "algorithm": "ES256",
                "private_key_file": str(pem),
                "audience": "https://orders.internal",
                "lifetime_seconds": 12,
                "claims": ["sub", "scope"],
            }
        },
    }
    app = App(parse_settings(document), clock=FrozenClock(NOW), fetcher=fetcher)
    await app.start()
    await asyncio.wait_for(app.wait_serving(), 10)
    return app


async def test_an_identity_assertion_is_handed_out_until_its_renewal_exactly_as_without_the_memo(
    tmp_path: Path, fetcher: FakeFetcher, mint: Mint
) -> None:
    app = await assertion_app(tmp_path, fetcher)
    try:
        clock: FrozenClock = app.clock  # type: ignore[assignment]
        memo, plain = Client(app.forward_auth), Client(plain_door(app))
        raw = request(mint(claims(exp=int(NOW) + 3600)))
        assertions = set()
        for _ in range(60):
            answer = memo.send(raw)
            assert answer == plain.send(raw), clock.now() - NOW
            assertions.add(header(answer, "x-authenticated-identity"))
            clock.advance(0.5)
        assert len(assertions) >= 4  # renewed every ~6 s, and the memo followed each renewal
    finally:
        await app.stop(grace=0.1)


async def test_an_answer_built_for_announced_claims_is_never_remembered(
    tmp_path: Path, fetcher: FakeFetcher, mint: Mint
) -> None:
    app = await assertion_app(tmp_path, fetcher)
    try:
        assert app.revocation is not None and app.forward_auth.memo is not None
        await app.revocation.add([operator_entry("c-1", "user-1", NOW, {"scope": "read"})])
        raw = request(mint(claims()))
        client = Client(app.forward_auth)
        first = client.send(raw)
        assert first.startswith(b"HTTP/1.1 200 ") and header(first, "x-authenticated-scope") == "read"
        assert app.forward_auth.memo.get(raw, PEER) is None  # its assertion is minted for each request
    finally:
        await app.stop(grace=0.1)


def test_without_a_token_cache_there_is_no_memo(clock: FrozenClock, fetcher: FakeFetcher) -> None:
    """Remembered answers stand for cached tokens; with none, each request is judged afresh (keys may change)."""
    from verifier.settings import CacheSettings

    def built(entries: int) -> App:
        settings_ = Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(),))
        return App(
            dataclasses.replace(settings_, cache=CacheSettings(token_entries=entries)), clock=clock, fetcher=fetcher
        )

    assert built(0).forward_auth.memo is None
    assert built(10).forward_auth.memo is not None
    assert built(0).grpc._own_answers is None and built(0).grpc._envoy_answers is None  # the gRPC doors' too
    assert built(10).grpc._own_answers is not None and built(10).grpc._envoy_answers is not None


async def test_a_first_seen_answer_is_not_remembered_and_the_next_one_is(app: App, mint: Mint) -> None:
    raw = request(mint())
    client = Client(app.forward_auth)
    first = client.send(raw)
    memo = app.forward_auth.memo
    assert memo is not None and first.startswith(b"HTTP/1.1 200 ") and memo.get(raw, PEER) is None
    assert client.send(raw) == first and memo.get(raw, PEER) is not None  # from the token cache, then remembered
    assert client.send(raw) == first == Client(plain_door(app)).send(raw)


async def test_a_flood_of_first_seen_tokens_does_not_clear_a_repeating_tokens_answer(app: App, mint: Mint) -> None:
    # Fresh tokens are not offered to the memo, so a flood of them (more than it holds) cannot evict the
    # answers of the tokens that do repeat.
    raw = request(mint())
    client = Client(app.forward_auth)
    answer = client.send(raw)
    assert client.send(raw) == answer
    for i in range(answer_memo.MAX_ENTRIES + 8):
        assert client.send(request(mint(claims(jti=f"fresh-{i}")))).startswith(b"HTTP/1.1 200 ")
    remembered = (app.forward_auth.memo or answer_memo.AnswerMemo(app.clock, app.generation)).get(raw, PEER)
    assert remembered is not None and remembered.answer == answer


async def test_a_flood_of_distinct_junk_tokens_does_not_empty_the_memo(
    clock: FrozenClock, fetcher: FakeFetcher, mint: Mint
) -> None:
    """Refused tokens pushed out of a full refused-token cache cannot make a remembered allow stale (allows come
    from the verified-token cache, looked up first): the memo keeps answering the valid token during the flood.
    Before, each push-out bumped the shared generation, so a junk flood turned every cached check into a miss."""
    from verifier.settings import CacheSettings

    settings = Settings(
        grpc=None, http=None, metrics=None, issuers=(issuer_settings(),), cache=CacheSettings(negative_entries=8)
    )
    built = App(settings, clock=clock, fetcher=fetcher)
    await built.start()
    try:
        await asyncio.wait_for(built.keys.wait_ready(), 10)
        client = Client(built.forward_auth)
        raw = request(mint())
        first = client.send(raw)
        assert reason(first) == "ok"
        assert client.send(raw) == first
        memo = built.forward_auth.memo
        assert memo is not None and memo.get(raw, PEER) is not None
        generation = built.generation.value
        for i in range(32):  # four times the refused-token cache's bound, each remembered as refused
            assert reason(client.send(request(f"junk{i}.junk.junk"))) == "token_malformed"
        assert len(built.negative) == 8
        assert built.generation.value == generation
        assert memo.get(raw, PEER) is not None
        assert client.send(raw) == first
    finally:
        await built.stop(grace=0.1)
