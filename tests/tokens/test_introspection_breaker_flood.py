"""An unauthenticated junk flood never opens the introspection breaker (issue #26 G7).

The provider (a real loopback HTTP server) throttles or refuses junk tokens with 4xx; only provider
faults (5xx, timeouts, connection errors, malformed answers) may count against it. A token whose last
answer was inactive is never served from the stale cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import urllib.parse
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry
from rawprovider import RawProvider, Route, json_route
from support import FrozenClock
from tokenkit import AUDIENCE

from verifier.app import build_introspector
from verifier.errors import InvalidToken, ProviderUnavailable
from verifier.tokens.introspection import Introspector, parse_introspection_config
from verifier.tokens.introspection_breaker import BreakerState
from verifier.tokens.introspection_http import IntrospectionHttpClient

GOOD = "good-token"


def provider_answers(state: dict[str, object], junk_status: int) -> Callable[[bytes], Route]:
    """Active for GOOD (until state['revoked']), `junk_status` for anything else."""

    def answer(body: bytes) -> Route:
        token = urllib.parse.parse_qs(body.decode())["token"][0]
        if token != GOOD:
            return Route(json.dumps({"error": "slow_down"}).encode(), status=junk_status)
        if state.get("revoked"):
            return json_route({"active": False})
        return json_route({"active": True, "sub": "alice", "aud": AUDIENCE, "exp": FrozenClock().now() + 3600})

    return answer


def introspector(
    raw_provider: RawProvider, introspection_http: IntrospectionHttpClient, clock: FrozenClock, **extra: object
) -> Introspector:
    config = parse_introspection_config(
        {"client_id": "verifier", "client_secret_env": "VERIFIER_RAW_SECRET", "breaker_failures": 3,
         "batch_window_seconds": 0, **extra},
        "issuers[0].introspection",
    )
    return build_introspector(
        issuer=raw_provider.url, audiences=(AUDIENCE,), config=config, endpoint=raw_provider.url + "/introspect",
        http=introspection_http, clock=clock, registry=CollectorRegistry(),
    )


@pytest.mark.parametrize("junk_status", [400, 401, 429])
async def test_a_junk_flood_answered_4xx_never_opens_the_breaker(
    raw_provider: RawProvider,
    introspection_http: IntrospectionHttpClient,
    monkeypatch: pytest.MonkeyPatch,
    junk_status: int,
) -> None:
    monkeypatch.setenv("VERIFIER_RAW_SECRET", "s3cret")
    raw_provider.routes["/introspect"] = provider_answers({}, junk_status)
    intro = introspector(raw_provider, introspection_http, FrozenClock())
    try:
        for i in range(20):
            with pytest.raises(ProviderUnavailable, match=f"HTTP {junk_status}"):
                await intro.introspect(f"junk-{i}", b"j%031d" % i)
        assert intro.breaker.state is BreakerState.CLOSED
        principal = await intro.introspect(GOOD, b"g" * 32)  # a new, real token still gets through
        assert principal.subject == "alice"
    finally:
        await intro.close()


async def test_provider_faults_still_open_the_breaker(
    raw_provider: RawProvider, introspection_http: IntrospectionHttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VERIFIER_RAW_SECRET", "s3cret")
    raw_provider.routes["/introspect"] = provider_answers({}, 503)
    clock = FrozenClock()
    intro = introspector(raw_provider, introspection_http, clock)
    try:
        for i in range(3):
            with pytest.raises(ProviderUnavailable, match="HTTP 503"):
                await intro.introspect(f"junk-{i}", b"j%031d" % i)
            clock.advance(1)  # failing for the success window (2 s) without an answer: the count decides
        assert intro.breaker.state is BreakerState.OPEN
    finally:
        await intro.close()


@pytest.mark.parametrize("junk_status", [400, 429])
async def test_a_revoked_token_is_never_served_stale_after_a_junk_flood(
    raw_provider: RawProvider,
    introspection_http: IntrospectionHttpClient,
    monkeypatch: pytest.MonkeyPatch,
    junk_status: int,
) -> None:
    monkeypatch.setenv("VERIFIER_RAW_SECRET", "s3cret")
    state: dict[str, object] = {}
    raw_provider.routes["/introspect"] = provider_answers(state, junk_status)
    clock = FrozenClock()
    intro = introspector(raw_provider, introspection_http, clock, serve_stale_on_error=True, positive_ttl_seconds=5,
                         breaker_cooldown_seconds=60)
    try:
        assert (await intro.introspect(GOOD, b"g" * 32)).subject == "alice"
        state["revoked"] = True
        for i in range(20):
            with pytest.raises(ProviderUnavailable):
                await intro.introspect(f"junk-{i}", b"j%031d" % i)
        clock.advance(6)  # the active answer is no longer fresh; only a stale stand-in remains
        with pytest.raises(InvalidToken, match="not active"):
            await intro.introspect(GOOD, b"g" * 32)
        clock.advance(60)  # the negative answer expired too: still never the stale active one
        raw_provider.routes["/introspect"] = lambda body: Route(b"oops", status=503)
        with pytest.raises(ProviderUnavailable):
            await intro.introspect(GOOD, b"g" * 32)
    finally:
        await intro.close()


@pytest.mark.parametrize("framing", ["split", "chunked", "close"])
async def test_tokens_whose_answers_are_too_large_never_open_the_breaker(
    raw_provider: RawProvider,
    introspection_http: IntrospectionHttpClient,
    monkeypatch: pytest.MonkeyPatch,
    framing: str,
) -> None:
    """How large an answer is depends on the token (its claims: groups, a profile the user writes), not on the
    provider's health: a user whose tokens carry oversized answers must not open the breaker for everyone."""
    monkeypatch.setenv("VERIFIER_RAW_SECRET", "s3cret")
    good = provider_answers({}, 400)

    def answer(body: bytes) -> Route:
        token = urllib.parse.parse_qs(body.decode())["token"][0]
        if token.startswith("bloated"):
            claims = {"active": True, "sub": "mallory", "aud": AUDIENCE, "profile": "x" * (64 * 1024)}
            return json_route(claims, framing=framing, pause=0)
        return good(body)

    raw_provider.routes["/introspect"] = answer
    intro = introspector(raw_provider, introspection_http, FrozenClock())
    try:
        for i in range(10):
            with pytest.raises(ProviderUnavailable, match="too large"):
                await intro.introspect(f"bloated-{i}", b"b%031d" % i)
        assert intro.breaker.state is BreakerState.CLOSED
        assert (await intro.introspect(GOOD, b"g" * 32)).subject == "alice"
    finally:
        await intro.close()


@pytest.fixture
def raw_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VERIFIER_RAW_SECRET", "s3cret")


def provider_failing_for(bad_prefix: str, fault: Callable[[], Route]) -> Callable[[bytes], Route]:
    """Active for every token but those starting with `bad_prefix`, which get `fault()` (a WAF or provider bug
    that fails for certain token shapes)."""

    def answer(body: bytes) -> Route:
        token = urllib.parse.parse_qs(body.decode())["token"][0]
        if token.startswith(bad_prefix):
            return fault()
        claims = {"active": True, "sub": "alice", "aud": AUDIENCE, "exp": FrozenClock().now() + 3600}
        return json_route(claims, pause=0)

    return answer


@pytest.mark.parametrize("fault", ["http_5xx", "malformed"])
@pytest.mark.usefixtures("raw_secret")
async def test_a_stream_of_tokens_the_provider_fails_for_never_opens_the_breaker_while_others_are_answered(
    raw_provider: RawProvider, introspection_http: IntrospectionHttpClient, fault: str
) -> None:
    """The breaker judges the provider, not a token: an attacker whose distinct tokens make the provider fail
    (faster than legitimate traffic comes) must not open it for every user's first-seen opaque token."""
    failing = {
        "http_5xx": lambda: Route(b'{"error": "server_error"}', status=502, pause=0),
        "malformed": lambda: Route(b"<html>blocked</html>", status=200, pause=0),
    }[fault]
    raw_provider.routes["/introspect"] = provider_failing_for("evil", failing)
    clock = FrozenClock()
    intro = introspector(raw_provider, introspection_http, clock)  # breaker_failures: 3
    try:
        assert (await intro.introspect("user-first", b"f" * 32)).subject == "alice"  # a running service
        for round_ in range(10):
            for i in range(5):  # more than the threshold in a row
                with pytest.raises(ProviderUnavailable):
                    await intro.introspect(f"evil-{round_}-{i}", b"e%015d%016d" % (round_, i))
            principal = await intro.introspect(f"user-{round_}", b"u%031d" % round_)  # a first-seen, real token
            assert principal.subject == "alice"
            assert intro.breaker.state is BreakerState.CLOSED
            clock.advance(1)  # legitimate answers come more often than the window (2 s by default)
    finally:
        await intro.close()


def server_error() -> Route:
    return Route(b"oops", status=503, pause=0)


def down(body: bytes) -> Route:
    """A provider that fails every call."""
    return server_error()


@pytest.mark.usefixtures("raw_secret")
async def test_a_provider_that_stops_answering_opens_the_breaker_once_the_window_passes_and_the_probe_closes_it(
    raw_provider: RawProvider, introspection_http: IntrospectionHttpClient
) -> None:
    raw_provider.routes["/introspect"] = provider_failing_for("evil", server_error)
    clock = FrozenClock()
    intro = introspector(raw_provider, introspection_http, clock, breaker_success_window_seconds=2,
                         breaker_cooldown_seconds=5)
    try:
        assert (await intro.introspect("user-0", b"u" * 32)).subject == "alice"
        raw_provider.routes["/introspect"] = down  # every call fails
        for i in range(3):
            with pytest.raises(ProviderUnavailable, match="HTTP 503"):
                await intro.introspect(f"user-{i + 1}", b"v%031d" % i)
        assert intro.breaker.state is BreakerState.CLOSED  # it answered 0 s ago
        clock.advance(2)
        with pytest.raises(ProviderUnavailable, match="HTTP 503"):
            await intro.introspect("user-9", b"w" * 32)
        assert intro.breaker.state is BreakerState.OPEN  # no answer for the window, and failures past the count
        with pytest.raises(ProviderUnavailable, match="circuit open"):
            await intro.introspect("user-10", b"x" * 32)

        clock.advance(5)
        raw_provider.routes["/introspect"] = provider_failing_for("evil", server_error)
        assert (await intro.introspect("user-11", b"y" * 32)).subject == "alice"  # the half-open probe
        assert intro.breaker.state is BreakerState.CLOSED
    finally:
        await intro.close()


@pytest.mark.usefixtures("raw_secret")
async def test_the_half_open_probe_asks_about_a_token_answered_before_not_the_attackers(
    raw_provider: RawProvider, introspection_http: IntrospectionHttpClient
) -> None:
    """After a real outage, the first token past the cool-down may be one the provider fails for: it must not
    be the probe that decides (else an attacker arriving first after every cool-down keeps the circuit open)."""
    answers = provider_failing_for("evil", server_error)
    asked: list[str] = []

    def recording(body: bytes) -> Route:
        asked.append(urllib.parse.parse_qs(body.decode())["token"][0])
        return answers(body)

    raw_provider.routes["/introspect"] = recording
    clock = FrozenClock()
    intro = introspector(raw_provider, introspection_http, clock, breaker_cooldown_seconds=5)
    try:
        assert (await intro.introspect("user-0", b"u" * 32)).subject == "alice"
        answers = down  # every call fails
        clock.advance(2)
        for i in range(3):
            with pytest.raises(ProviderUnavailable, match="HTTP 503"):
                await intro.introspect(f"user-{i + 1}", b"v%031d" % i)
        assert intro.breaker.state is BreakerState.OPEN

        clock.advance(5)
        answers = provider_failing_for("evil", server_error)  # back, but not for evil
        asked.clear()
        with pytest.raises(ProviderUnavailable, match="HTTP 503"):  # the attacker's token comes first: still fails
            await intro.introspect("evil-1", b"e" * 32)
        assert asked == ["user-0", "evil-1"]  # the probe was the token answered before
        assert intro.breaker.state is BreakerState.CLOSED
        assert (await intro.introspect("user-9", b"w" * 32)).subject == "alice"
    finally:
        await intro.close()



# -- a fresh breaker: right after a start, a restart, a reload or a replaced worker --------------------------


def recording(asked: list[str], answers: Callable[[bytes], Route]) -> Callable[[bytes], Route]:
    """`answers`, noting each token asked for in `asked`."""

    def answer(body: bytes) -> Route:
        asked.append(urllib.parse.parse_qs(body.decode())["token"][0])
        return answers(body)

    return answer


def provider_knowing(known: str, evil: Callable[[], Route], unknown: Callable[[], Route]) -> Callable[[bytes], Route]:
    """Active for tokens starting with `known`, `evil()` for those starting with "evil", `unknown()` for the rest."""
    answers = provider_failing_for("evil", evil)

    def answer(body: bytes) -> Route:
        token = urllib.parse.parse_qs(body.decode())["token"][0]
        return answers(body) if token.startswith((known, "evil")) else unknown()

    return answer


async def fails(intro: Introspector, token: str, match: str = "HTTP 503") -> None:
    with pytest.raises(ProviderUnavailable, match=match):
        await intro.introspect(token, hashlib.sha256(token.encode()).digest())


async def answered(intro: Introspector, token: str) -> str:
    return (await intro.introspect(token, hashlib.sha256(token.encode()).digest())).subject


async def opened_by_the_attacker(intro: Introspector, clock: FrozenClock, tag: str = "") -> None:
    """A quiet worker: the attacker's failures, for the success window (2 s) with no answer, open the circuit."""
    await fails(intro, f"evil-{tag}0")
    clock.advance(2)
    for i in range(1, 3):
        await fails(intro, f"evil-{tag}{i}")
    assert intro.breaker.state is BreakerState.OPEN


class Worker:
    """A fresh worker's introspector (cool-down 5 s, window 2 s, threshold 3) on the raw provider, with its clock
    and every token the provider was asked about (`asked`); closed at the end of the test."""

    def __init__(self, raw_provider: RawProvider, http: IntrospectionHttpClient) -> None:
        self.raw_provider = raw_provider
        self.asked: list[str] = []
        self.clock = FrozenClock()
        self.intro = introspector(raw_provider, http, self.clock, breaker_cooldown_seconds=5)

    def answers(self, answers: Callable[[bytes], Route]) -> None:
        self.raw_provider.routes["/introspect"] = recording(self.asked, answers)


@pytest.fixture
async def worker(
    raw_provider: RawProvider, introspection_http: IntrospectionHttpClient, raw_secret: None
) -> AsyncIterator[Worker]:
    started = Worker(raw_provider, introspection_http)
    yield started
    await started.intro.close()


async def test_right_after_a_start_a_stream_of_tokens_the_provider_fails_for_does_not_open_the_breaker(
    worker: Worker,
) -> None:
    """A worker that has not yet been answered is not judged on the count alone: the window starts with its first
    call, however long it took to start or stood idle before it."""
    worker.answers(provider_failing_for("evil", server_error))
    intro, clock = worker.intro, worker.clock
    clock.advance(60)  # a slow start-up (key fetches), or a quiet spell, longer than the window
    for i in range(10):  # the attacker is first, well past the threshold
        await fails(intro, f"evil-{i}")
    assert intro.breaker.state is BreakerState.CLOSED
    clock.advance(1.5)
    assert await answered(intro, "user-first") == "alice"  # the first real user
    assert intro.breaker.state is BreakerState.CLOSED


async def test_before_any_token_was_answered_active_the_half_open_probe_is_a_token_of_our_own(worker: Worker) -> None:
    """A quiet start: nobody answered for the window, so the attacker's failures open the circuit. After the
    cool-down his token comes first again; the probe must not be it (nor any token he chooses): it is a random
    token of our own, which the provider answers inactive (RFC 7662 section 2.2), and that closes the circuit."""
    worker.answers(provider_failing_for("evil", server_error))
    intro, clock, asked = worker.intro, worker.clock, worker.asked
    await opened_by_the_attacker(intro, clock)
    for cycle in range(3):  # the attacker is first after every cool-down
        clock.advance(5)
        asked.clear()
        await fails(intro, f"evil-again-{cycle}")
        probe, theirs = asked
        assert theirs == f"evil-again-{cycle}" and not probe.startswith("evil")
        assert intro.breaker.state is BreakerState.CLOSED  # one failure, within the window of the probe's answer
        assert await answered(intro, f"user-{cycle}") == "alice"
        await opened_by_the_attacker(intro, clock, tag=f"{cycle}-")  # quiet again; the user's token is the probe now


async def test_a_provider_down_from_the_start_opens_the_breaker_once_the_window_has_passed(worker: Worker) -> None:
    """Fail closed: a provider that never answers still opens the circuit within the window, and our probe
    keeps it open while it stays down; the first probe after it is back closes it."""
    worker.answers(down)
    intro, clock, asked = worker.intro, worker.clock, worker.asked
    for i in range(3):
        await fails(intro, f"user-{i}")
    assert intro.breaker.state is BreakerState.CLOSED  # within the window of the start
    clock.advance(2)
    await fails(intro, "user-3")
    assert intro.breaker.state is BreakerState.OPEN
    await fails(intro, "user-4", match="circuit open")  # fast, no call

    clock.advance(5)
    asked.clear()
    await fails(intro, "user-5")  # our probe fails: still down
    assert len(asked) == 1 and asked[0] != "user-5"
    assert intro.breaker.state is BreakerState.OPEN

    clock.advance(5)
    worker.answers(provider_failing_for("evil", server_error))
    assert await answered(intro, "user-6") == "alice"
    assert intro.breaker.state is BreakerState.CLOSED


async def test_our_probe_refused_with_a_4xx_still_closes_the_circuit(worker: Worker) -> None:
    """A provider that refuses tokens it does not know (400, against RFC 7662's `active: false`) has answered:
    it is up. Left half-open, every caller would wait on our refused probe for good."""
    refused = lambda: Route(b'{"error": "invalid_token"}', status=400, pause=0)  # noqa: E731
    worker.answers(provider_knowing("user", server_error, refused))
    intro, clock, asked = worker.intro, worker.clock, worker.asked
    await opened_by_the_attacker(intro, clock)
    clock.advance(5)
    asked.clear()
    await fails(intro, "evil-again")  # the attacker's own token, asked after our probe
    assert len(asked) == 2 and asked[1] == "evil-again"
    assert intro.breaker.state is BreakerState.CLOSED
    assert await answered(intro, "user-1") == "alice"


async def test_a_provider_that_fails_for_our_probe_is_probed_with_the_callers_token_every_other_time(
    worker: Worker,
) -> None:
    """A provider that answers real tokens but fails for ours (a 5xx for any token it does not know) must not be
    held open for good: after our probe fails, the next probe is the caller's token, and a real one closes it."""
    worker.answers(provider_knowing("user", server_error, server_error))
    intro, clock, asked = worker.intro, worker.clock, worker.asked
    await opened_by_the_attacker(intro, clock)
    # our probe fails; the caller's turn, the attacker first; ours again; the caller's turn, a user
    for token, ours, failed_probes in [("user-1", True, 1), ("evil-again", False, 2), ("evil-more", True, 3)]:
        clock.advance(5)
        asked.clear()
        await fails(intro, token)
        assert len(asked) == 1 and (asked[0] != token) is ours
        assert intro.breaker.state is BreakerState.OPEN and intro.breaker.failed_probes == failed_probes
    clock.advance(5)
    asked.clear()
    assert await answered(intro, "user-2") == "alice"
    assert asked == ["user-2"]
    assert intro.breaker.state is BreakerState.CLOSED and intro.breaker.failed_probes == 0


# -- with a batch endpoint: every call is a batch, and the half-open probe must still be ours --------------------


def batch_provider(asked: list[list[str]]) -> Callable[[bytes], Route]:
    """A batch endpoint that fails the whole batch (502) when any token in it starts with "evil" (a WAF, or a
    provider bug, that one token trips), else answers each: active for "user" tokens, inactive for the rest. Each
    batch asked is noted in `asked`."""

    def answer(body: bytes) -> Route:
        tokens = json.loads(body)["tokens"]
        asked.append(tokens)
        if any(t.startswith("evil") for t in tokens):
            return server_error()
        claims = {"active": True, "sub": "alice", "aud": AUDIENCE, "exp": FrozenClock().now() + 3600}
        return json_route({"results": [claims if t.startswith("user") else {"active": False} for t in tokens]})

    return answer


@pytest.mark.usefixtures("raw_secret")
async def test_with_a_batch_endpoint_the_half_open_probe_is_a_batch_of_our_own_not_the_attackers(
    raw_provider: RawProvider, introspection_http: IntrospectionHttpClient
) -> None:
    """With `batch_endpoint`, the first batch after the cool-down holds whatever tokens came first: the attacker's,
    in a flood. It must not be the probe that decides (his token fails it, and the circuit stays open for every
    user, after every cool-down): our own token goes first, alone in its batch, as without a batch endpoint."""
    asked: list[list[str]] = []
    raw_provider.routes["/batch"] = batch_provider(asked)
    clock = FrozenClock()
    config = parse_introspection_config(
        {"client_id": "verifier", "client_secret_env": "VERIFIER_RAW_SECRET", "breaker_failures": 3,
         "breaker_cooldown_seconds": 5, "batch_endpoint": raw_provider.url + "/batch", "batch_window_seconds": 0.001},
        "issuers[0].introspection",
        allow_insecure_http=True,
    )
    intro = build_introspector(
        issuer=raw_provider.url, audiences=(AUDIENCE,), config=config, endpoint=raw_provider.url + "/introspect",
        http=introspection_http, clock=clock, registry=CollectorRegistry(),
    )
    try:
        await opened_by_the_attacker(intro, clock)  # a quiet worker: the attacker's failures open it
        for cycle in range(3):  # the attacker is first after every cool-down
            clock.advance(5)
            asked.clear()
            await fails(intro, f"evil-again-{cycle}")
            (probe,), theirs = asked
            assert theirs == [f"evil-again-{cycle}"] and not probe.startswith("evil")
            assert intro.breaker.state is BreakerState.CLOSED  # one failure, within the window of the probe's answer
            assert await answered(intro, f"user-{cycle}") == "alice"
            await opened_by_the_attacker(intro, clock, tag=f"{cycle}-")
    finally:
        await intro.close()


def crashing_batch_provider(asked: list[list[str]]) -> Callable[[bytes], Route]:
    """`batch_provider`, but a batch holding an "evil" token crashes it (500: its bug, one token's doing)."""
    answers = batch_provider(asked)

    def answer(body: bytes) -> Route:
        if any(t.startswith("evil") for t in json.loads(body)["tokens"]):
            asked.append(json.loads(body)["tokens"])
            return Route(b'{"error": "server_error"}', status=500, pause=0)
        return answers(body)

    return answer


@pytest.mark.usefixtures("raw_secret")
async def test_with_a_batch_endpoint_a_trickle_of_poison_tokens_fails_neither_users_nor_the_breaker(
    raw_provider: RawProvider, introspection_http: IntrospectionHttpClient
) -> None:
    """Over the production HTTP client: an attacker's token in every batch window made the provider fail every
    batch (500), every user's first-seen token with it, and, with no call answered for the success window, opened the
    breaker. Each failed batch is now split: only the attacker's tokens fail, and the breaker stays closed."""
    asked: list[list[str]] = []
    raw_provider.routes["/batch"] = crashing_batch_provider(asked)
    clock = FrozenClock()
    config = parse_introspection_config(
        {"client_id": "verifier", "client_secret_env": "VERIFIER_RAW_SECRET", "breaker_failures": 3,
         "breaker_cooldown_seconds": 5, "batch_endpoint": raw_provider.url + "/batch", "batch_window_seconds": 0.01},
        "issuers[0].introspection",
        allow_insecure_http=True,
    )
    intro = build_introspector(
        issuer=raw_provider.url, audiences=(AUDIENCE,), config=config, endpoint=raw_provider.url + "/introspect",
        http=introspection_http, clock=clock, registry=CollectorRegistry(),
    )
    try:
        for round_ in range(5):
            users = [f"user-{round_}-{i}" for i in range(5)]
            batch = [*users[:2], f"evil-{round_}", *users[2:]]
            asked.clear()
            results = await asyncio.gather(
                *(intro.introspect(t, hashlib.sha256(t.encode()).digest()) for t in batch), return_exceptions=True
            )
            assert asked[0] == batch  # one batch, split once the provider answered our own token
            assert [r.subject for r in results if not isinstance(r, BaseException)] == ["alice"] * 5
            assert isinstance(results[2], ProviderUnavailable)
            assert len(asked) <= 2 + 2 * len(batch) - 2
            assert intro.breaker.state is BreakerState.CLOSED
            clock.advance(1)
    finally:
        await intro.close()
