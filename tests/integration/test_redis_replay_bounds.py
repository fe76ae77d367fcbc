"""verifier.state.redis's bound per purpose against a real redis-server: a client's flood of DPoP proofs stops at
the DPoP part (`ReplayStoreFull`, 503 with Retry-After) and the revocation purpose's keys, and the revocation
entries themselves, are still written; every replica shares the one bound; replays are still replays; the
counters expire with their keys, so a full purpose has room again after its TTL.

Before, `first_use` was a bare `SET NX PX` and Redis's `maxmemory` the only bound: the flood went on until Redis
refused every write (OOM), the SSF and logout jtis and the kill switch's entries with the rest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis_harness import RedisServer  # tests/integration is on sys.path

from verifier.app import redis_client, revocation_store
from verifier.config.state import MAX_TIMEOUT_SECONDS, ReplayBounds, StateConfig
from verifier.errors import ReplayStoreFull, StateUnavailable
from verifier.revocation.entry import OPERATOR, Effect, Entry, KeyKind, Match, SubjectKey
from verifier.state.base import Purpose
from verifier.state.redis import RedisState

pytestmark = pytest.mark.integration

DPOP, WEBAUTHN, REVOCATION = Purpose.DPOP, Purpose.WEBAUTHN, Purpose.REVOCATION
BOUNDS = ReplayBounds(dpop=50, webauthn=5, revocation=5)
WINDOW = 66.0  # seconds: a DPoP jti's default TTL


def replica(url: str, bounds: ReplayBounds = BOUNDS, key_prefix: str = "t:") -> RedisState:
    """One replica's store, on a client built as the composition root builds it."""
    client = redis_client(url, password=None, timeout_seconds=MAX_TIMEOUT_SECONDS)
    return RedisState(client, key_prefix=key_prefix, timeout_seconds=MAX_TIMEOUT_SECONDS, replay=bounds, max_buckets=1)


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisState, RedisState]]:
    """Two replicas of one deployment: the same Redis, prefix and bounds."""
    a, b = replica(redis_server.url), replica(redis_server.url)
    yield a, b
    await a.close()
    await b.close()


async def flood(state: RedisState, limit: int, ttl: float = WINDOW, start: int = 0) -> tuple[int, ReplayStoreFull]:
    """New DPoP keys until one is refused: (keys accepted, the refusal)."""
    for i in range(start, start + limit):
        try:
            assert await state.first_use(f"dpop:jti:{i:040d}", ttl, purpose=DPOP) is True
        except ReplayStoreFull as refused:
            return i - start, refused
    pytest.fail(f"{limit} new DPoP keys, none refused")


def revoked(i: int) -> Entry:
    return Entry(id=f"op-{i}", key=SubjectKey(KeyKind.ISS_SUB, f"user-{i}", "https://idp.example.test"),
                 effect=Effect.TOKEN_REVOKED, match=Match.ALL, event_time=1.0, expires_at=None, source=OPERATOR,
                 event=OPERATOR)


async def test_a_dpop_flood_stops_at_its_bound_in_a_tight_redis_and_revocations_still_land(
    redis_server: RedisServer, raw: Redis, replicas: tuple[RedisState, RedisState]
) -> None:
    """Redis at `maxmemory` with `noeviction`, sized (as the README says) above the bound's keys: the flood is
    refused by the bound (503 replay_store_full, Retry-After the oldest key's window), not by an OOM, so the SSF
    and logout jtis (`first_use`, revocation purpose) and the revocation entries (the kill switch's and SSF
    effects' `RedisStore.put`) are still written. Before, the flood filled Redis and both were refused (OOM)."""
    a, _ = replicas
    bounds = ReplayBounds(dpop=3_000, webauthn=5, revocation=5)
    state = replica(redis_server.url, bounds)
    store = revocation_store(StateConfig(redis_url=redis_server.url, key_prefix="t:"))
    try:
        used = int((await raw.info("memory"))["used_memory"])
        await raw.config_set("maxmemory", str(used + 1_000_000))  # ~6,000 keys: twice the DPoP bound
        await raw.config_set("maxmemory-policy", "noeviction")
        accepted, refused = await flood(state, 20_000)
        assert accepted == bounds.dpop
        assert (refused.code, refused.purpose) == ("replay_store_full", "dpop")
        assert WINDOW / 2 <= refused.retry_after <= WINDOW  # the oldest proof's window, less the flood's seconds
        assert state.full.refused[DPOP] == 1
        for i in range(bounds.revocation):  # SSF and logout-token jtis: the revocation purpose's own part
            assert await state.first_use(f"ssf:jti:{i}", 300, purpose=REVOCATION) is True
        await store.put([revoked(i) for i in range(20)])  # the kill switch's entries: Redis has room
        assert len(await store.sync([])) == 20
        with pytest.raises(ReplayStoreFull):  # and the flood is still refused
            await state.first_use("dpop:jti:more", WINDOW, purpose=DPOP)
        assert (await raw.info("stats"))["evicted_keys"] == 0
    finally:
        await state.close()
        await store.close()
        await a.close()


async def test_each_purpose_has_its_own_bound(replicas: tuple[RedisState, RedisState]) -> None:
    a, _ = replicas
    accepted, _ = await flood(a, 1_000)
    assert accepted == BOUNDS.dpop
    for purpose in (REVOCATION, WEBAUTHN):
        for i in range(BOUNDS.of(purpose)):
            assert await a.first_use(f"{purpose}:{i}", 300, purpose=purpose) is True
        with pytest.raises(ReplayStoreFull) as full:
            await a.first_use(f"{purpose}:one-more", 300, purpose=purpose)
        assert full.value.purpose == purpose.value
        assert 299 <= full.value.retry_after <= 300


async def test_two_replicas_share_one_bound(replicas: tuple[RedisState, RedisState]) -> None:
    a, b = replicas
    for i in range(BOUNDS.dpop):
        assert await (a if i % 2 else b).first_use(f"dpop:jti:{i}", WINDOW, purpose=DPOP) is True
    for state in (a, b):  # each replica sees the other's keys counted
        with pytest.raises(ReplayStoreFull):
            await state.first_use("dpop:jti:next", WINDOW, purpose=DPOP)
    assert (a.full.refused[DPOP], b.full.refused[DPOP]) == (1, 1)  # each replica counts its own refusals


async def test_concurrent_first_uses_on_two_replicas_never_pass_the_bound(
    replicas: tuple[RedisState, RedisState],
) -> None:
    a, b = replicas

    async def one(state: RedisState, i: int) -> str:
        try:
            return "new" if await state.first_use(f"dpop:jti:{i}", WINDOW, purpose=DPOP) else "replay"
        except ReplayStoreFull:
            return "full"

    results = await asyncio.gather(*(one(s, i) for i in range(60) for s in (a, b)))
    assert results.count("new") == BOUNDS.dpop
    assert results.count("full") == 2 * 60 - BOUNDS.dpop - results.count("replay")


async def test_a_replay_is_still_a_replay_below_and_at_the_bound(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    """At the bound a replayed proof is refused as replayed (401), not as a full store (503), and `seen` answers."""
    a, b = replicas
    assert await a.first_use("dpop:jti:0", WINDOW, purpose=DPOP) is True
    assert await b.first_use("dpop:jti:0", WINDOW, purpose=DPOP) is False  # below the bound
    await flood(a, 1_000, start=1)
    assert await b.first_use("dpop:jti:0", WINDOW, purpose=DPOP) is False  # at it
    assert await b.first_use(f"dpop:jti:{BOUNDS.dpop - 1:040d}", WINDOW, purpose=DPOP) is False
    assert await b.seen("dpop:jti:0", purpose=DPOP) is True
    assert await b.seen("dpop:jti:never", purpose=DPOP) is False
    assert int(await raw.hget("t:count:dpop", "n")) == BOUNDS.dpop  # a replay or a refusal counts nothing


async def test_counters_expire_with_their_keys_and_the_purpose_has_room_again(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    a, b = replicas
    ttl = 1.0
    accepted, refused = await flood(a, 1_000, ttl=ttl)
    assert accepted == BOUNDS.dpop and refused.retry_after == 1  # at most the refused value's TTL
    assert 0 < await raw.pttl("t:count:dpop") <= 2_000  # the counters go with their last slice
    await asyncio.sleep(2.1)  # a key expires at its TTL, its count at the end of that second at the latest
    accepted, _ = await flood(b, 1_000, ttl=ttl, start=10_000)
    assert accepted == BOUNDS.dpop  # the whole part again, not one place more
    await asyncio.sleep(2.1)
    assert await raw.exists("t:count:dpop") == 0  # nothing left behind once every key is gone
    assert await a.first_use("dpop:jti:after", ttl, purpose=DPOP) is True


async def test_ended_slices_are_dropped_and_only_they(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    """Keys of two TTLs in one purpose: the short ones' slices go when they end, the long ones' stay counted."""
    a, _ = replicas
    for i in range(10):
        assert await a.first_use(f"dpop:long:{i}", 30, purpose=DPOP)
        assert await a.first_use(f"dpop:short:{i}", 1, purpose=DPOP)
    assert int(await raw.hget("t:count:dpop", "n")) == 20
    await asyncio.sleep(2.1)
    assert await a.first_use("dpop:jti:new", 30, purpose=DPOP)
    counts = {k.decode(): int(v) for k, v in (await raw.hgetall("t:count:dpop")).items()}
    assert counts["n"] == 11
    assert sum(v for k, v in counts.items() if k.isdigit()) == 11  # the total is the live slices' sum


async def test_first_use_survives_redis_losing_the_script(replicas: tuple[RedisState, RedisState], raw: Redis) -> None:
    a, b = replicas
    assert await a.first_use("dpop:jti:s", WINDOW, purpose=DPOP) is True
    await raw.script_flush()
    assert await b.first_use("dpop:jti:s", WINDOW, purpose=DPOP) is False  # EVALSHA misses, EVAL runs
    assert await b.first_use("dpop:jti:t", WINDOW, purpose=DPOP) is True


async def test_a_full_redis_is_still_state_unavailable(replicas: tuple[RedisState, RedisState], raw: Redis) -> None:
    """A `maxmemory` below the bound's keys: Redis is full first, and that stays a 503 (fail closed), never a pass."""
    a, _ = replicas
    await raw.set("t:once:dpop:jti:kept", b"1", px=300_000)
    await raw.config_set("maxmemory", "1")  # below what Redis already uses: every write refused
    with pytest.raises(StateUnavailable) as refused:
        await a.first_use("dpop:jti:new", WINDOW, purpose=DPOP)
    assert not isinstance(refused.value, ReplayStoreFull) and "OutOfMemoryError" in str(refused.value)
    with pytest.raises(StateUnavailable):
        await a.first_use("dpop:jti:kept", WINDOW, purpose=DPOP)  # as before: the script is refused whole
    await raw.config_set("maxmemory", "0")


async def test_the_verifier_warns_when_maxmemory_cannot_hold_the_bound(
    replicas: tuple[RedisState, RedisState], raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = replicas
    await raw.config_set("maxmemory-policy", "noeviction")
    with caplog.at_level("WARNING", logger="verifier.state"):
        await raw.config_set("maxmemory", "0")  # no limit of Redis's own: nothing to say
        assert await a.check_eviction_policy() == "noeviction"
        await raw.config_set("maxmemory", str(60 * 200 + 250 - 1))  # below the bound's 60 keys at 200, 1 bucket
        assert await a.check_eviction_policy() == "noeviction"
        await raw.config_set("maxmemory", "0")
    warned = [vars(r) for r in caplog.records if getattr(r, "code", "") == "redis_maxmemory_below_replay_bound"]
    assert [(w["maxmemory"], w["redis_max_replay_entries"], w["needed"]) for w in warned] == [(12_249, 60, 12_250)]
