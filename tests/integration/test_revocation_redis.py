"""Several replicas sharing a real redis-server: an event received by one is refused on all within 1 s."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis_harness import RedisServer
from ssf_transmitter import ACCOUNT_DISABLED, SESSION_REVOKED, TOKEN_CLAIMS_CHANGE, SsfTransmitter

from verifier.app import HttpSessions, revocation_store, shared_state
from verifier.checks.base import NO_POLICY
from verifier.checks.revocation import Revocation
from verifier.clock import Clock, SystemClock
from verifier.doors.admin_http import add_admin_routes
from verifier.doors.routes import HttpAnswer, HttpRequest, Router
from verifier.doors.ssf_http import add_ssf_routes
from verifier.errors import StateUnavailable
from verifier.observe.metrics import RevocationMetrics
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.revocation import RevocationService, parse_revocation_config
from verifier.state import SharedState, StateConfig
from verifier.state.base import Purpose
from verifier.tokens.fetch import HttpFetcher

pytestmark = pytest.mark.integration

AUD = "https://verifier.example.test/ssf"
IDP = "https://idp.example.test"
ADMIN = "integration-admin-secret-0123456789ab"
PROPAGATION_S = 1.0  # the promise: an event received by one replica takes effect on all within ~1 s
POLL_S = 0.01
RECONNECT_S = 30.0  # generous: a replica reconnects and reloads after a Redis restart (backoff, a loaded machine)


def principal(sub: str = "user-1", **claims: Any) -> Principal:
    now = time.time()
    values = {"iss": IDP, "sub": sub, "iat": now - 10, "exp": now + 300, **claims}
    return Principal(
        issuer=IDP, subject=sub, client_id=None, scopes=(), roles=frozenset(), expires_at=values["exp"], claims=values
    )


@pytest.fixture
def transmitter() -> Iterator[SsfTransmitter]:
    with SsfTransmitter(audience=AUD) as tx:
        yield tx


class Replicas:
    """Builds replicas that share one Redis; stops them all at the end."""

    def __init__(self, redis_url: str, transmitter: SsfTransmitter) -> None:
        self.redis_url = redis_url
        self.config = parse_revocation_config(
            {
                "transmitters": [
                    {
                        "issuer": transmitter.issuer,
                        "audience": AUD,
                        "delivery": "push",
                        "algorithms": ["ES256"],
                        "subjects_of": [IDP],
                        "allow_insecure_http": True,
                    }
                ],
                "resync_interval_seconds": 30,
            }
        )
        self.started: list[tuple[RevocationService, SharedState, HttpSessions]] = []
        self.state_timeout = 1.0  # seconds per operation on the replay cache
        self.key_prefix = "verifier:"  # the deployment's namespace in Redis
        self.revocation_replicas = 0  # state.redis_revocation_replicas

    async def start(
        self, redis_url: str | None = None, password: str | None = None, clock: Clock | None = None
    ) -> RevocationService:
        clock = clock or SystemClock()
        config = StateConfig(
            redis_url=redis_url or self.redis_url,
            password=password,
            key_prefix=self.key_prefix,
            timeout_seconds=self.state_timeout,
            redis_revocation_replicas=self.revocation_replicas,
        )
        state = shared_state(config, clock)
        sessions = HttpSessions()
        fetcher = HttpFetcher(sessions.providers)
        service = RevocationService(
            self.config,
            store=revocation_store(config),
            state=state,
            fetcher=fetcher,
            clock=clock,
            metrics=RevocationMetrics(CollectorRegistry()),
            session=sessions.ssf,
            admin_token=ADMIN,
        )
        await service.start()
        self.started.append((service, state, sessions))
        return service

    async def stop(self) -> None:
        for service, state, sessions in self.started:
            await service.stop()
            await state.close()
            await sessions.close()


@pytest.fixture
async def replicas(redis_server: RedisServer, transmitter: SsfTransmitter) -> AsyncIterator[Replicas]:
    group = Replicas(redis_server.url, transmitter)
    yield group
    await group.stop()


async def within(seconds: float, condition: Callable[[], bool]) -> float:
    """Seconds until `condition()`; fails once `seconds` have passed. The replicas run in this event loop: the
    time it woke later than asked (a starved process on a loaded machine) is not counted against them."""
    start = time.monotonic()
    starved = 0.0
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed - starved < seconds, f"not within {seconds} s ({elapsed:.2f} s, {starved:.2f} s starved)"
        asked = time.monotonic()
        await asyncio.sleep(POLL_S)
        starved += max(0.0, time.monotonic() - asked - POLL_S)
    return time.monotonic() - start


async def round_trip(server: RedisServer) -> None:
    """One command on a new connection. Redis writes its replies after running every command it read in
    the same turn of its loop, and a stalled client's commands were readable before this one was sent: once
    this reply is here, they have run."""
    from redis.asyncio import Redis

    client = Redis.from_url(server.url, socket_timeout=30)
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def retried_while_503(router: Router, request: HttpRequest, within_s: float = RECONNECT_S) -> HttpAnswer:
    """The first answer that is not 503, as a transmitter retrying would get it (a loaded machine may make a
    state operation miss its timeout: that is a 503 too, retried)."""
    deadline = time.monotonic() + within_s
    while (answer := await router.dispatch(request)).status == 503:
        assert time.monotonic() < deadline, f"still 503 after {within_s} s: {answer.body!r}"
        await asyncio.sleep(0.1)
    return answer


def push_request(token: str) -> HttpRequest:
    return HttpRequest("POST", "/v1/ssf/events", "", {"content-type": "application/secevent+jwt"}, token.encode())


def admin_request(method: str, path: str = "/v1/admin/revocations", document: Any = None) -> HttpRequest:
    raw = json.dumps(document).encode() if document is not None else b""
    return HttpRequest(method, path, "", {"authorization": f"Bearer {ADMIN}", "content-type": "application/json"}, raw)


def router_of(service: RevocationService) -> Router:
    router = Router()
    add_ssf_routes(router, service)
    add_admin_routes(router, service.admin)
    return router


async def test_an_event_pushed_to_one_replica_is_refused_on_the_other_within_a_second(
    replicas: Replicas, transmitter: SsfTransmitter
) -> None:
    a, b = await replicas.start(), await replicas.start()
    token = transmitter.sign_set({SESSION_REVOKED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-1"})
    answer = await router_of(a).dispatch(push_request(token))
    assert answer.status == 202, answer.body
    assert a.revocations.check(principal()) is not None
    await within(PROPAGATION_S, lambda: b.revocations.check(principal()) is not None)
    refused = b.revocations.check(principal())
    assert refused is not None and refused.code == "session_revoked"


async def test_a_claims_change_pushed_to_one_replica_takes_away_on_the_other_and_grants_nowhere(
    replicas: Replicas, transmitter: SsfTransmitter
) -> None:
    """The entry is shared as announced; the transmitter's `claims_change` (restrict) applies on every replica."""
    a, b = await replicas.start(), await replicas.start()
    event = {"claims": {"scope": "read admin", "groups": ["eng", "admins"]}, "event_timestamp": int(time.time())}
    token = transmitter.sign_set({TOKEN_CLAIMS_CHANGE: event}, {"format": "iss_sub", "iss": IDP, "sub": "user-1"})
    assert (await router_of(a).dispatch(push_request(token))).status == 202
    await within(PROPAGATION_S, lambda: b.revocations.overrides(principal()) is not None)
    request = RequestAttributes(method="GET", scheme="https", host="api", path="/", headers={})
    for service in (a, b):
        check = Revocation(service.revocations, with_roles=lambda p: p)
        judged = check.check_now(principal(scope="read write", groups=["eng"]), request, NO_POLICY)
        assert judged.scopes == ("read",) and judged.claims["groups"] == ["eng"]  # `write` gone, `admin` not given


async def test_the_same_set_pushed_to_another_replica_is_a_replay(
    replicas: Replicas, transmitter: SsfTransmitter
) -> None:
    a, b = await replicas.start(), await replicas.start()
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-2"})
    assert (await router_of(a).dispatch(push_request(token))).status == 202
    replay = await router_of(b).dispatch(push_request(token))
    assert replay.status == 400 and json.loads(replay.body)["err"] == "invalid_request"


async def test_a_late_replica_loads_existing_entries_before_start_returns(
    replicas: Replicas, transmitter: SsfTransmitter
) -> None:
    a = await replicas.start()
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-3"})
    assert (await router_of(a).dispatch(push_request(token))).status == 202
    created = await router_of(a).dispatch(
        admin_request("POST", document={"subject": {"format": "opaque", "id": "sess-1"}})
    )
    assert created.status == 201
    late = await replicas.start()
    assert late.revocations.check(principal("user-3")) is not None  # no waiting: loaded by start()
    assert late.revocations.check(principal("user-9", sid="sess-1")) is not None
    assert len(late.revocations) == 2


async def test_lifting_an_entry_on_one_replica_lifts_it_on_the_other(
    replicas: Replicas, transmitter: SsfTransmitter
) -> None:
    a, b = await replicas.start(), await replicas.start()
    created = await router_of(a).dispatch(
        admin_request(
            "POST", document={"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-4"}, "effect": "disable"}
        )
    )
    entry_id = json.loads(created.body)["id"]
    await within(PROPAGATION_S, lambda: b.revocations.check(principal("user-4")) is not None)
    assert (await router_of(b).dispatch(admin_request("DELETE", f"/v1/admin/revocations/{entry_id}"))).status == 204
    await within(PROPAGATION_S, lambda: a.revocations.check(principal("user-4")) is None)


async def test_a_replica_catches_up_after_redis_restarts(
    replicas: Replicas, transmitter: SsfTransmitter, redis_server: RedisServer
) -> None:
    a, b = await replicas.start(), await replicas.start()
    redis_server.stop()
    redis_server.start()  # same port, empty (nothing persists): the subscription must come back
    token = transmitter.sign_set({SESSION_REVOKED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-5"})
    answer = await retried_while_503(router_of(a), push_request(token))  # a's connection comes back
    assert answer.status == 202
    await within(RECONNECT_S, lambda: _refused(b, principal("user-5")))


async def test_a_dropped_subscription_is_followed_by_a_full_reload(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    from redis.asyncio import Redis

    from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey

    b = await replicas.start()
    entry = Entry(
        id="written-behind-its-back",
        key=SubjectKey(KeyKind.ISS_SUB, "user-6", IDP),
        effect=Effect.ACCOUNT_DISABLED,
        match=Match.ALL,
        event_time=time.time(),
        expires_at=None,
        source="operator",
        event="operator",
    )
    client = Redis.from_url(redis_server.url)
    try:
        await client.hset("verifier:revocations", entry.id, entry.to_json())  # no publish: b cannot know
        await asyncio.sleep(0.2)
        assert b.revocations.check(principal("user-6")) is None
        await client.client_kill_filter(_type="pubsub")
        await within(RECONNECT_S, lambda: _refused(b, principal("user-6")))
    finally:
        await client.aclose()


async def test_a_replica_cut_off_from_redis_stops_answering_from_entries_it_cannot_keep_current(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    """A partition: replica a loses Redis, b does not, and an operator's kill switch reaches b alone. a cannot
    hear of it (no pub/sub, no reload), so "no entry" from a's index is no longer known: as soon as its
    subscription breaks, not one resync interval (30 s) later, a answers 503 (StateUnavailable), never a pass;
    once Redis is back it reloads and refuses."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_server.url)
    try:
        await client.execute_command("ACL", "SETUSER", "replica-a", "on", ">pw-a", "~*", "&*", "+@all")
        b = await replicas.start()
        a = await replicas.start(f"redis://replica-a@127.0.0.1:{redis_server.port}/0", "pw-a")
        assert a.revocations.check(principal("user-9")) is None
        await client.execute_command("ACL", "SETUSER", "replica-a", "off")  # a can no longer reach Redis
        await client.execute_command("CLIENT", "KILL", "USER", "replica-a")
        created = await router_of(b).dispatch(
            admin_request(
                "POST", document={"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-9"}, "effect": "disable"}
            )
        )
        assert created.status == 201, created.body
        assert b.revocations.check(principal("user-9")) is not None

        await within(3.0, lambda: _does_not_pass(a, principal("user-9")))  # the subscription's poll (1 s) + room
        assert _exported(a.metrics.in_sync) == 0
        await client.execute_command("ACL", "SETUSER", "replica-a", "on")
        await within(RECONNECT_S, lambda: _refused(a, principal("user-9")))
        assert _exported(a.metrics.in_sync) == 1
    finally:
        await client.aclose()


async def test_a_replica_whose_redis_falls_silent_refuses_to_decide_until_it_hears_again(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    """A partition that drops packets without a reset raises nothing: the subscription just hears nothing. The
    heartbeat PING's missing PONG tells it: within `SUBSCRIPTION_SILENCE_SECONDS` (3 s) + one poll the replica
    answers 503, and once Redis answers again it reloads and decides. Redis's CLIENT PAUSE is the silence: it
    keeps every connection open and answers none of them (this test's own too, so the pause runs out by itself)."""
    from redis.asyncio import Redis

    from verifier.revocation.store import SUBSCRIPTION_SILENCE_SECONDS

    a = await replicas.start()
    assert a.revocations.check(principal("user-10")) is None
    await asyncio.sleep(1.5)  # a few heartbeats answered: silence is not mistaken while Redis answers
    assert a.revocations.check(principal("user-10")) is None
    client = Redis.from_url(redis_server.url)
    try:
        await client.execute_command("CLIENT", "PAUSE", int((SUBSCRIPTION_SILENCE_SECONDS + 4) * 1000), "ALL")
        await within(SUBSCRIPTION_SILENCE_SECONDS + 2.5, lambda: _does_not_pass(a, principal("user-10")))
        assert not _decides(a, principal("user-10"))  # 503, not a refusal it could not know of
        await within(RECONNECT_S, lambda: _decides(a, principal("user-10")))
    finally:
        await client.aclose()


def _exported(gauge: Any) -> float:
    """The value a scrape reads."""
    return float(gauge.collect()[0].samples[0].value)


def _does_not_pass(service: RevocationService, who: Principal) -> bool:
    try:
        return service.revocations.check(who) is not None
    except StateUnavailable:
        return True


def _decides(service: RevocationService, who: Principal) -> bool:
    try:
        return service.revocations.check(who) is None
    except StateUnavailable:
        return False


def _refused(service: RevocationService, who: Principal) -> bool:
    try:
        return service.revocations.check(who) is not None
    except StateUnavailable:
        return False


async def test_redis_restarted_empty_gets_the_entries_back_and_nobody_forgets(
    replicas: Replicas, transmitter: SsfTransmitter, redis_server: RedisServer
) -> None:
    """#26 G3: a Redis that comes back empty is refilled by the replicas, never adopted as "no entries"."""
    from redis.asyncio import Redis

    a, b = await replicas.start(), await replicas.start()
    created = await router_of(a).dispatch(
        admin_request(
            "POST", document={"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-7"}, "effect": "disable"}
        )
    )
    assert created.status == 201
    entry_id = json.loads(created.body)["id"]
    token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-8"})
    assert (await router_of(a).dispatch(push_request(token))).status == 202
    await within(PROPAGATION_S, lambda: b.revocations.check(principal("user-8")) is not None)
    redis_server.stop()
    redis_server.start()  # same port, nothing persisted: an empty Redis
    client = Redis.from_url(redis_server.url)
    try:

        async def stored() -> dict[bytes, bytes]:
            return await client.hgetall("verifier:revocations")

        async def both_back() -> bool:
            keys = await stored()
            return entry_id.encode() in keys and len([k for k in keys if not k.startswith(b"~")]) == 2

        deadline = time.monotonic() + 30
        watched_until = None  # once both are back, keep watching 1.5 s more: every replica resyncs meanwhile
        while watched_until is None or time.monotonic() < watched_until:
            for replica in (a, b):
                for sub in ("user-7", "user-8"):
                    # 503 while its subscription is down is not forgetting; a pass would be
                    assert _does_not_pass(replica, principal(sub)), "a replica forgot an entry"
            if watched_until is None and await both_back():
                watched_until = time.monotonic() + 1.5
            assert watched_until or time.monotonic() < deadline, "the entries never came back into Redis"
            await asyncio.sleep(0.05)
        assert len([k for k in await stored() if not k.startswith(b"~")]) == 2
    finally:
        await client.aclose()


async def test_a_set_answered_503_during_a_redis_stall_takes_effect_when_retried(
    redis_server: RedisServer, transmitter: SsfTransmitter
) -> None:
    """#26 G2: a stall must not let Redis mark the jti late while the entries were never stored."""
    group = Replicas(redis_server.url, transmitter)
    try:
        a = await group.start()
        token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-10"})
        router = router_of(a)
        # the connection is open, as in production
        await group.started[0][1].first_use("warm-up", 1.0, purpose=Purpose.DPOP)
        redis_server.pause()  # a hung Redis: the commands queue up and run when it resumes
        try:
            stalled = await router.dispatch(push_request(token))
        finally:
            redis_server.resume()
        assert stalled.status == 503
        await round_trip(redis_server)  # Redis has run whatever was queued
        retried = await retried_while_503(router, push_request(token))
        assert retried.status == 202, retried.body
        assert a.revocations.check(principal("user-10")) is not None
        late = await group.start()
        assert late.revocations.check(principal("user-10")) is not None  # stored in Redis, not only here
        replay = await retried_while_503(router, push_request(token))
        assert replay.status == 400 and json.loads(replay.body)["err"] == "invalid_request"
    finally:
        await group.stop()


async def test_two_deployments_with_their_own_prefixes_on_one_redis_see_nothing_of_each_other(
    redis_server: RedisServer, transmitter: SsfTransmitter
) -> None:
    """#26 G6: one operator must not see, or lift, another deployment's entries; SSF jtis stay apart too."""
    blue, green = Replicas(redis_server.url, transmitter), Replicas(redis_server.url, transmitter)
    blue.key_prefix, green.key_prefix = "blue:", "green:"
    try:
        a, b = await blue.start(), await green.start()
        created = await router_of(a).dispatch(
            admin_request(
                "POST", document={"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-11"}, "effect": "disable"}
            )
        )
        entry_id = json.loads(created.body)["id"]
        token = transmitter.sign_set({ACCOUNT_DISABLED: {}}, {"format": "iss_sub", "iss": IDP, "sub": "user-12"})
        assert (await router_of(a).dispatch(push_request(token))).status == 202
        # the same SET reaches the other deployment as its own first delivery
        assert (await router_of(b).dispatch(push_request(token))).status == 202
        await asyncio.sleep(0.3)
        assert b.revocations.check(principal("user-11")) is None
        listed = await router_of(b).dispatch(admin_request("GET"))
        assert entry_id not in listed.body.decode()
        lifted = await router_of(b).dispatch(admin_request("DELETE", f"/v1/admin/revocations/{entry_id}"))
        assert lifted.status == 404
        assert a.revocations.check(principal("user-11")) is not None
        late_green = await green.start()
        assert late_green.revocations.check(principal("user-11")) is None
        assert late_green.revocations.check(principal("user-12")) is not None
    finally:
        await blue.stop()
        await green.stop()


def refuses(service: RevocationService, caller: Principal) -> Callable[[], bool]:
    return lambda: service.revocations.check(caller) is not None


async def test_a_jwt_id_and_a_client_revoked_on_one_replica_are_refused_on_the_other_within_a_second(
    replicas: Replicas,
) -> None:
    """The kill switch's one-token (`jwt_id`) and client (`complex` `application`) entries travel as the others do:
    published, applied by the other replica within a second, read back by a replica started later."""
    a, b = await replicas.start(), await replicas.start()
    leaked = principal("user-7", jti="leaked-jti")
    client = principal("", client_id="svc-a", jti="c-1")._replace(client_id="svc-a")
    other_client = client._replace(client_id="svc-b")
    for subject in (
        {"format": "jwt_id", "iss": IDP, "jti": "leaked-jti"},
        {"format": "complex", "application": {"format": "iss_sub", "iss": IDP, "sub": "svc-a"}},
    ):
        created = await router_of(a).dispatch(admin_request("POST", document={"subject": subject}))
        assert created.status == 201, created.body
    for service in (a, b):
        await within(PROPAGATION_S, refuses(service, leaked))
        await within(PROPAGATION_S, refuses(service, client))
        assert service.revocations.check(principal("user-7", jti="other-jti")) is None
        assert service.revocations.check(other_client) is None
    late = await replicas.start()
    assert late.revocations.check(leaked) is not None and late.revocations.check(client) is not None
    assert late.revocations.check(other_client) is None


class AheadClock(SystemClock):
    """A replica's wall clock `offset` seconds ahead of the others' (and Redis's)."""

    def __init__(self, offset: float) -> None:
        self._offset = offset

    def now(self) -> float:  # type: ignore[override]
        return time.time() + self._offset


async def test_a_replica_whose_clock_runs_ahead_does_not_expire_entries_for_the_others(
    replicas: Replicas, transmitter: SsfTransmitter, redis_server: RedisServer
) -> None:
    """Expired entries are dropped from Redis by whichever replica's maintenance finds them expired: on its own clock,
    a replica two days ahead deleted every live entry for every replica (and told them so), and the revoked tokens
    passed on the replicas whose clocks are right. Redis's clock decides what is deleted."""
    a = await replicas.start()
    created = await router_of(a).dispatch(
        admin_request("POST", document={"subject": {"format": "iss_sub", "iss": IDP, "sub": "user-9"}})
    )
    assert created.status == 201, created.body
    assert a.revocations.check(principal("user-9")) is not None
    replicas.config = dataclasses.replace(replicas.config, resync_interval_seconds=1)
    ahead = await replicas.start(clock=AheadClock(2 * 86400.0))  # past every entry's expiry on its clock
    resyncs = ahead.metrics.syncs.labels("ok")
    before = resyncs._value.get()
    await within(RECONNECT_S, lambda: resyncs._value.get() >= before + 2)  # its maintenance ran at least once
    await asyncio.sleep(0.2)  # any removal it published has reached `a`
    assert a.revocations.check(principal("user-9")) is not None
    late = await replicas.start()  # a replica loading now still finds it in Redis
    assert late.revocations.check(principal("user-9")) is not None


async def test_entries_expired_on_redis_clock_are_removed_and_the_removal_reaches_every_replica(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    """The other side: an entry past its expiry (and the grace) on Redis's clock is deleted and its removal
    published; one not yet expired there, or without an expiry, is kept whatever the caller's clock says."""
    from redis.asyncio import Redis

    from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey
    from verifier.revocation.store import EXPIRY_GRACE_SECONDS, RedisStore

    a = await replicas.start()
    url = redis_server.url
    store = RedisStore(Redis.from_url(url), Redis.from_url(url), key_prefix=replicas.key_prefix)
    now = time.time()

    def entry(name: str, expires_at: float | None) -> Entry:
        key = SubjectKey(KeyKind.ISS_SUB, name, IDP)
        return Entry(
            id="op-" + name, key=key, effect=Effect.TOKEN_REVOKED, match=Match.ALL, event_time=now - 10,
            expires_at=expires_at, source="operator", event="operator",
        )

    gone, live, forever = entry("gone", now - EXPIRY_GRACE_SECONDS - 5), entry("live", now + 100), entry("ever", None)
    try:
        await store.put([gone, live, forever])
        await within(PROPAGATION_S, lambda: a.revocations.get(gone.id) is not None)
        removed = await store.expire([gone.id, live.id, forever.id, "op-unknown"])
        assert removed == [gone.id]
        await within(PROPAGATION_S, lambda: a.revocations.get(gone.id) is None)
        assert a.revocations.get(live.id) is not None and a.revocations.get(forever.id) is not None
        assert {e.id for e in await store.sync([])} == {live.id, forever.id}
    finally:
        await store.close()


async def _revoke_seen(a: RevocationService, b: RevocationService, sub: str) -> str:
    """The kill switch's `disable` of `sub`, taken at replica `a` and waited for at `b`: the entry's id."""
    document = {"subject": {"format": "iss_sub", "iss": IDP, "sub": sub}, "effect": "disable"}
    created = await router_of(a).dispatch(admin_request("POST", document=document))
    assert created.status == 201, created.body
    await within(PROPAGATION_S, lambda: b.revocations.check(principal(sub)) is not None)
    return str(json.loads(created.body)["id"])


async def test_redis_restarted_from_an_older_snapshot_gets_the_later_entries_back(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    """Redis's default persistence is a periodic RDB snapshot: restarted after a crash, it loads the last one, epoch
    and all, without the revocations taken since. The epoch matched, so every replica adopted the older hash and the
    later entries passed everywhere. The replicas that saw the hash further along see it went back and restore."""
    from redis.asyncio import Redis

    a, b = await replicas.start(), await replicas.start()
    client = Redis.from_url(redis_server.url)
    try:
        await _revoke_seen(a, b, "user-s1")
        assert await client.save()  # the snapshot a restart loads
        later = await _revoke_seen(a, b, "user-s2")  # taken after it
        redis_server.stop()  # without saving (no save points): the snapshot is what comes back
        redis_server.start()
        await client.aclose()
        client = Redis.from_url(redis_server.url)
        assert await client.hexists("verifier:revocations", "~epoch")  # not empty: the epoch came back too

        deadline = time.monotonic() + RECONNECT_S
        watched_until = None  # once it is back, keep watching 1.5 s more: every replica resyncs meanwhile
        while watched_until is None or time.monotonic() < watched_until:
            for replica in (a, b):
                for sub in ("user-s1", "user-s2"):
                    assert _does_not_pass(replica, principal(sub)), f"a replica forgot {sub}'s entry"
            if watched_until is None and await client.hexists("verifier:revocations", later):
                watched_until = time.monotonic() + 1.5
            assert watched_until or time.monotonic() < deadline, "the later entry never came back into Redis"
            await asyncio.sleep(0.05)
        late = await replicas.start()
        assert late.revocations.check(principal("user-s2")) is not None
    finally:
        await client.aclose()


async def test_an_entry_lifted_after_the_snapshot_does_not_come_back_with_it(
    replicas: Replicas, redis_server: RedisServer
) -> None:
    """The older snapshot still holds an entry lifted on purpose since: the replicas restoring the later entries
    delete it again (they saw it deleted after the version Redis went back to), so the lift holds everywhere."""
    from redis.asyncio import Redis

    a, b = await replicas.start(), await replicas.start()
    client = Redis.from_url(redis_server.url)
    try:
        lifted = await _revoke_seen(a, b, "user-l1")
        await _revoke_seen(a, b, "user-l2")
        assert await client.save()  # the snapshot holds user-l1's entry
        answer = await router_of(b).dispatch(admin_request("DELETE", f"/v1/admin/revocations/{lifted}"))
        assert answer.status == 204  # lifted on purpose after the snapshot
        await within(PROPAGATION_S, lambda: a.revocations.check(principal("user-l1")) is None)
        later = await _revoke_seen(a, b, "user-l3")
        redis_server.stop()
        redis_server.start()
        await client.aclose()
        client = Redis.from_url(redis_server.url)
        assert await client.hexists("verifier:revocations", lifted)  # back with the snapshot

        deadline = time.monotonic() + RECONNECT_S
        while await client.hexists("verifier:revocations", lifted) or not await client.hexists(
            "verifier:revocations", later
        ):
            assert time.monotonic() < deadline, "the lift or the later entry was not restored into Redis"
            await asyncio.sleep(0.05)
        for replica in (a, b):
            await within(RECONNECT_S, lambda r=replica: _decides(r, principal("user-l1")))  # type: ignore[misc]
        await asyncio.sleep(1.5)  # every replica reloads meanwhile: the lift stays
        late = await replicas.start()
        for replica in (a, b, late):
            assert replica.revocations.check(principal("user-l1")) is None, "the lifted entry came back"
            assert replica.revocations.check(principal("user-l2")) is not None
            assert replica.revocations.check(principal("user-l3")) is not None
        assert not await client.hexists("verifier:revocations", lifted)
    finally:
        await client.aclose()


async def test_after_a_rollback_a_write_is_refused_and_two_stores_restoring_at_once_converge(
    redis_server: RedisServer,
) -> None:
    """A store that saw the hash further along refuses to write into the older one (its write would take a version
    the replicas already saw and hide the rollback from them); two stores restoring at once both get their entries
    back, past every version either saw, and write on."""
    from redis.asyncio import Redis

    from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey
    from verifier.revocation.store import VERSION_FIELD, RedisStore

    url = redis_server.url
    now = time.time()

    def entry(name: str) -> Entry:
        key = SubjectKey(KeyKind.ISS_SUB, name, IDP)
        return Entry(
            id="op-" + name,
            key=key,
            effect=Effect.TOKEN_REVOKED,
            match=Match.ALL,
            event_time=now - 10,
            expires_at=now + 300,
            source="operator",
            event="operator",
        )

    a, b = (RedisStore(Redis.from_url(url), Redis.from_url(url), key_prefix="roll:") for _ in range(2))
    client = Redis.from_url(url)
    try:
        await a.sync([])
        await a.put([entry("old")])
        await b.sync([])  # both saw the hash with op-old
        await b.put([entry("b-only")])
        await a.put([entry("a-only")])
        await b.sync([])  # b saw a-only's version too
        held_a, held_b = await a.sync([]), await b.sync([])
        await client.hset("roll:revocations", mapping={VERSION_FIELD: b"1"})  # went back: only op-old left
        await client.hdel("roll:revocations", "op-a-only", "op-b-only")
        with pytest.raises(StateUnavailable):
            await b.put([entry("new")])
        assert not await client.hexists("roll:revocations", "op-new")
        synced = await asyncio.gather(a.sync(held_a), b.sync(held_b))
        expected = {"op-old", "op-a-only", "op-b-only"}
        assert {e.id for e in synced[0]} >= expected and {e.id for e in synced[1]} >= expected
        assert int(await client.hget("roll:revocations", VERSION_FIELD)) > 4
        await b.put([entry("new")])  # writes on
        assert {e.id for e in await a.sync([])} == expected | {"op-new"}
    finally:
        await client.aclose()
        await a.close()
        await b.close()
