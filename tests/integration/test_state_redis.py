"""verifier.state.redis against a real redis-server: two replicas share replay keys and buckets,
and a Redis that is down or hung makes every call fail closed (StateUnavailable), never allow."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis_harness import RedisServer, start_redis  # tests/integration is on sys.path
from support import FrozenClock, timed

from verifier.app import redis_client
from verifier.config.state import MAX_TIMEOUT_SECONDS
from verifier.errors import RateLimited, StateUnavailable
from verifier.policy.ratelimit import RateLimiter
from verifier.principal import Principal
from verifier.settings import RateLimit, RateLimitSettings
from verifier.state.base import Purpose
from verifier.state.memory import MemoryState
from verifier.state.redis import RedisState

pytestmark = pytest.mark.integration

NOW = 1_700_000_000.0
DPOP = Purpose.DPOP
# Seconds per socket operation: the product's `state.timeout_seconds` (the whole call gets 4x).
# The largest the product accepts where a test is about sharing keys and buckets, not deadlines: at
# load average 15 on 2 cores, 50 connections opened at once missed even a 2 s socket timeout
# (measured: 2 of 40 rounds). The deadline test uses DEADLINE_TIMEOUT.
TIMEOUT = MAX_TIMEOUT_SECONDS
DEADLINE_TIMEOUT = 0.2  # as a deployment would set it
WARM_ATTEMPTS = 5


def replica(url: str, *, key_prefix: str = "verifier:", timeout_seconds: float = TIMEOUT) -> RedisState:
    """One replica's store, on a client built as the composition root builds it."""
    client = redis_client(url, password=None, timeout_seconds=timeout_seconds)
    return RedisState(client, key_prefix=key_prefix, timeout_seconds=timeout_seconds)


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisState, RedisState]]:
    """Two independent stores, as two verifier replicas would build them."""
    a = replica(redis_server.url, key_prefix="t:")
    b = replica(redis_server.url, key_prefix="t:")
    yield a, b
    await a.close()
    await b.close()


# --- first_use ------------------------------------------------------------------------------------


async def test_a_key_used_on_one_replica_is_a_replay_on_the_other(replicas: tuple[RedisState, RedisState]) -> None:
    a, b = replicas
    assert await a.first_use("dpop:jti:1", 10, purpose=DPOP) is True
    assert await b.first_use("dpop:jti:1", 10, purpose=DPOP) is False
    assert await a.first_use("dpop:jti:1", 10, purpose=DPOP) is False
    assert await b.first_use("dpop:jti:2", 10, purpose=DPOP) is True


async def test_exactly_one_of_many_concurrent_uses_wins(redis_server: RedisServer) -> None:
    # 50 concurrent first uses open 50 fresh connections at once: the generous TIMEOUT, so only
    # atomicity is under test here (deadlines have a test of their own below).
    a = replica(redis_server.url, key_prefix="race:")
    b = replica(redis_server.url, key_prefix="race:")
    try:
        results = await asyncio.gather(*(s.first_use("race", 10, purpose=DPOP) for _ in range(25) for s in (a, b)))
        assert results.count(True) == 1
    finally:
        await a.close()
        await b.close()


async def test_a_key_expires_after_its_ttl(replicas: tuple[RedisState, RedisState], raw: Redis) -> None:
    a, b = replicas
    # 1 s, not 0.2 s: a loaded runner can stall 0.2 s between the SET and the PTTL (then -2, gone).
    assert await a.first_use("short", 1.0, purpose=DPOP)
    assert 0 < await raw.pttl("t:once:short") <= 1000  # -1 would be a key that never expires
    await asyncio.sleep(1.1)  # the TTL itself passing (Redis checks expiry on access), not a wait for a task
    assert await b.first_use("short", 1.0, purpose=DPOP) is True


async def test_prefixes_keep_deployments_apart(redis_server: RedisServer) -> None:
    one = replica(redis_server.url, key_prefix="one:")
    two = replica(redis_server.url, key_prefix="two:")
    try:
        assert await one.first_use("k", 10, purpose=DPOP) and await two.first_use("k", 10, purpose=DPOP)
    finally:
        await one.close()
        await two.close()


# --- take -----------------------------------------------------------------------------------------


async def test_two_replicas_share_one_bucket(replicas: tuple[RedisState, RedisState]) -> None:
    a, b = replicas
    results = [await (a if i % 2 else b).take("user-1", rate_per_second=0.001, burst=5, now=NOW) for i in range(8)]
    assert [r.allowed for r in results] == [True] * 5 + [False] * 3
    assert [r.remaining for r in results[:5]] == [4, 3, 2, 1, 0]


async def test_concurrent_takes_never_exceed_the_burst(replicas: tuple[RedisState, RedisState]) -> None:
    a, b = replicas
    results = await asyncio.gather(
        *(s.take("hot", rate_per_second=0.001, burst=7, now=NOW) for _ in range(20) for s in (a, b))
    )
    assert sum(r.allowed for r in results) == 7


async def test_the_script_mirrors_the_memory_bucket_exactly(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    """Real waits drive the refills (the script reads Redis's clock); each take is replayed on a memory store at the
    time the script used (the bucket's `ts`), so both must answer alike, to the microsecond."""
    a, b = replicas
    memory = MemoryState(FrozenClock(NOW))
    rate, burst = 5.0, 3  # a token back every 200 ms
    waits = [0, 0, 0, 0.05, 0.05, 0, 0.15, 0.05, 0, 0.7, 0, 0, 0, 0.1, 0.25]  # seconds before each take
    outcomes = []
    for i, wait in enumerate(waits):
        await asyncio.sleep(wait)
        got = await (a if i % 2 else b).take("m", rate_per_second=rate, burst=burst, now=NOW)
        at = float(await raw.hget("t:bucket:m", "ts"))  # Redis's time at this take (the key lives >= 200 ms)
        expected = await memory.take("m", rate_per_second=rate, burst=burst, now=at)
        assert got.allowed == expected.allowed and got.remaining == expected.remaining, i
        assert got.retry_after_seconds == pytest.approx(expected.retry_after_seconds, abs=1e-6)
        assert got.reset_seconds == pytest.approx(expected.reset_seconds, abs=1e-6)
        assert got.limit == burst
        outcomes.append(got.allowed)
    assert outcomes[:3] == [True] * 3 and True in outcomes[outcomes.index(False) :]  # the burst, a refusal, a refill


async def test_a_bucket_key_expires_when_the_bucket_would_be_full(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    a, _ = replicas
    await a.take("ttl", rate_per_second=2, burst=4, now=NOW)
    await a.take("ttl", rate_per_second=2, burst=4, now=NOW)  # 2 tokens short: full again in 1 s
    assert 900 < await raw.pttl("t:bucket:ttl") <= 1000


async def test_takes_survive_redis_losing_the_script(replicas: tuple[RedisState, RedisState], raw: Redis) -> None:
    a, b = replicas
    # a token per 1,000 s: none comes back between the takes (the script reads Redis's clock, not `now`)
    assert (await a.take("s", rate_per_second=0.001, burst=2, now=NOW)).allowed
    await raw.script_flush()
    assert (await b.take("s", rate_per_second=0.001, burst=2, now=NOW)).allowed  # EVALSHA misses, EVAL runs
    assert not (await a.take("s", rate_per_second=0.001, burst=2, now=NOW)).allowed


# --- Redis's clock, not the replicas' ----------------------------------------------------------------

SKEW = 3600.0  # seconds a replica's clock runs ahead
CALLER = Principal(issuer="https://idp.example.test", subject="alice", client_id=None, scopes=(), roles=frozenset(),
                   expires_at=2e9, claims={})  # fmt: skip


def limiter(state: RedisState, limit: RateLimit, clock: FrozenClock) -> RateLimiter:
    """A replica's rate limiter on `state`, its wall clock `clock`."""
    return RateLimiter(RateLimitSettings(default=limit), state, clock, configured=lambda issuer: "")  # the one share


async def drain(rl: RateLimiter, most: int) -> None:
    """Takes until refused, at most `most` takes."""
    for _ in range(most):
        try:
            await rl.check(CALLER)
        except RateLimited:
            return
    pytest.fail(f"{most} takes, none refused")


async def test_a_replica_whose_clock_runs_ahead_gets_no_extra_tokens(
    replicas: tuple[RedisState, RedisState],
) -> None:
    """The bucket refills on Redis's clock (TIME in the script). Before, each replica passed its own clock: one an
    hour ahead found an hour's refill in a bucket the others had just drained, a full burst more for that caller."""
    a, b = replicas
    limit = RateLimit(per_second=0.5, burst=3)  # a token per 2 s: none comes back while the test runs
    on_time = limiter(a, limit, FrozenClock(time.time()))
    ahead = limiter(b, limit, FrozenClock(time.time() + SKEW))
    await drain(on_time, limit.burst + 1)
    with pytest.raises(RateLimited) as refused:  # before: allowed, with r=2 (the bucket full again, less this one)
        await ahead.check(CALLER)
    assert refused.value.retry_after == 2
    assert dict(refused.value.headers) == {"ratelimit-policy": '"default";q=3;w=6', "ratelimit": '"default";r=0;t=6'}


async def test_a_replica_whose_clock_runs_ahead_does_not_stall_the_refill_on_the_others(
    replicas: tuple[RedisState, RedisState],
) -> None:
    """Before, the bucket kept the newest time a replica passed: after one take on a replica an hour ahead, the
    replicas on time found no time elapsed for an hour, the caller refused until its tokens expired."""
    a, b = replicas
    limit = RateLimit(per_second=10, burst=10)  # a token back every 100 ms; the key lives until full (1 s)
    on_time = limiter(a, limit, FrozenClock(time.time()))
    await limiter(b, limit, FrozenClock(time.time() + SKEW)).check(CALLER)
    await drain(on_time, 50)
    await asyncio.sleep(0.2)  # two tokens' worth on Redis's clock (the key still there); on the replica's, none
    headers = dict(await on_time.check(CALLER))  # before: refused (no time elapsed until the hour had passed)
    assert headers["ratelimit-policy"] == '"default";q=10;w=1' and headers["ratelimit"].startswith('"default";r=')


# --- failing closed -------------------------------------------------------------------------------


async def test_redis_down_fails_closed_and_recovers(
    redis_server: RedisServer, replicas: tuple[RedisState, RedisState]
) -> None:
    a, b = replicas
    assert await a.first_use("before", 10, purpose=DPOP)
    redis_server.stop()

    async def refused() -> None:
        with pytest.raises(StateUnavailable):
            await a.first_use("jti-while-down", 10, purpose=DPOP)
        with pytest.raises(StateUnavailable):
            await b.first_use("jti-while-down", 10, purpose=DPOP)
        with pytest.raises(StateUnavailable):
            await a.take("user", rate_per_second=1, burst=10, now=NOW)

    _, took, late = await timed(refused())
    assert took - late < 3, (took, late)  # refused promptly, not after a long hang (less a loaded machine's stalls)

    redis_server.start()  # same port, empty (nothing persisted)
    assert await a.first_use("after", 10, purpose=DPOP) is True  # stale pooled connections are replaced
    assert await b.first_use("after", 10, purpose=DPOP) is False


async def test_a_fresh_replica_with_redis_unreachable_fails_closed(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    url = server.url
    server.stop()
    state = replica(url)
    try:
        with pytest.raises(StateUnavailable):
            await state.first_use("k", 10, purpose=DPOP)
        with pytest.raises(StateUnavailable):
            await state.take("k", rate_per_second=1, burst=1, now=NOW)
    finally:
        await state.close()


async def test_a_hung_redis_fails_closed_within_the_deadline(redis_server: RedisServer) -> None:
    a = replica(redis_server.url, timeout_seconds=DEADLINE_TIMEOUT)
    # A pooled connection exists. Under load one ping may miss the short deadline: that is not
    # what is under test, so a few are allowed (ping() is False on StateUnavailable).
    for _ in range(WARM_ATTEMPTS):
        if await a.ping():
            break
    else:
        pytest.fail(f"redis did not answer a ping within {DEADLINE_TIMEOUT} s in {WARM_ATTEMPTS} attempts")
    redis_server.pause()

    async def refused() -> None:
        with pytest.raises(StateUnavailable):
            await a.first_use("hung", 10, purpose=DPOP)
        with pytest.raises(StateUnavailable):
            await a.take("hung", rate_per_second=1, burst=1, now=NOW)

    try:
        _, took, late = await timed(refused())
        # Two calls, each within its 4x deadline, plus slack for scheduling at load average 15 on 2 cores, less
        # what a loaded machine held this process; a call that waited for the paused server would take until
        # resume (never).
        assert took - late < 2 * 4 * DEADLINE_TIMEOUT + 2.5, (took, late)
    finally:
        redis_server.resume()
        await a.close()


# --- a full Redis (maxmemory) ------------------------------------------------------------------------


async def _fill(state: RedisState, prefix: str, limit: int = 200_000) -> tuple[int, StateUnavailable | None]:
    """Writes new DPoP keys until Redis refuses one: (keys written, the refusal or None)."""
    for i in range(limit):
        try:
            assert await state.first_use(f"{prefix}{i:040d}", 300, purpose=DPOP) is True
        except StateUnavailable as refused:
            return i, refused
    return limit, None


async def test_a_full_redis_under_noeviction_fails_closed_and_keeps_every_live_replay_key(
    replicas: tuple[RedisState, RedisState], raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis has no bound of ours, only `maxmemory`. With the documented `noeviction` (Redis's default), a full
    Redis refuses the write (OOM): a new value is 503 (StateUnavailable, fail closed), never a pass, and no live
    key is dropped, so every replay is still refused; reads (an SSF jti check) still answer. The start-up check
    finds nothing to say."""
    a, b = replicas
    await raw.config_set("maxmemory", "2mb")
    await raw.config_set("maxmemory-policy", "noeviction")
    written, refused = await _fill(a, "dpop:jti:")
    assert refused is not None and "OutOfMemoryError" in str(refused) and written > 1_000
    with pytest.raises(StateUnavailable):
        await b.first_use("dpop:jti:another-replica", 300, purpose=DPOP)
    for i in range(0, written, written // 50):  # every live key is still there: its replay is never a pass
        assert await b.seen(f"dpop:jti:{i:040d}", purpose=DPOP) is True
        with pytest.raises(StateUnavailable):  # SET is refused whole under OOM, a replay too: 503, not 200
            await b.first_use(f"dpop:jti:{i:040d}", 300, purpose=DPOP)
    assert (await raw.info("stats"))["evicted_keys"] == 0
    with caplog.at_level("WARNING", logger="verifier.state"):
        assert await a.check_eviction_policy() == "noeviction"
    assert not [r for r in caplog.records if getattr(r, "code", "") == "redis_evicts_replay_keys"]


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru"])
async def test_an_evicting_redis_drops_live_replay_keys_and_the_verifier_warns(
    replicas: tuple[RedisState, RedisState], raw: Redis, caplog: pytest.LogCaptureFixture, policy: str
) -> None:
    """Why the README says `noeviction`: replay keys carry a TTL, so a `volatile-*` policy evicts them as an
    `allkeys-*` one does, and an evicted live DPoP jti passes again within its window. The verifier cannot
    prevent that from its side; it says so at start-up (`config_warning`, `redis_evicts_replay_keys`)."""
    a, b = replicas
    await raw.config_set("maxmemory", "2mb")
    await raw.config_set("maxmemory-policy", policy)
    written, refused = await _fill(a, "dpop:jti:", limit=30_000)
    assert written == 30_000
    assert refused is None  # never full: it makes room by evicting
    assert (await raw.info("stats"))["evicted_keys"] > 0
    assert await b.first_use(f"dpop:jti:{0:040d}", 300, purpose=DPOP) is True  # a live jti, replayed: it passes
    with caplog.at_level("WARNING", logger="verifier.state"):
        assert await a.check_eviction_policy() == policy
    warned = [r for r in caplog.records if getattr(r, "code", "") == "redis_evicts_replay_keys"]
    assert [getattr(r, "maxmemory_policy", None) for r in warned] == [policy]


async def test_the_running_verifier_warns_at_start_up_when_its_redis_evicts(
    redis_server: RedisServer, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Wired where it runs: the composition root asks once Redis answers, and says it once."""
    from tokenkit import FakeFetcher, issuer_settings

    from verifier.app import App
    from verifier.settings import Settings
    from verifier.state import StateConfig

    await raw.config_set("maxmemory-policy", "volatile-ttl")
    state = StateConfig(redis_url=redis_server.url, key_prefix="t:")
    app = App(Settings(grpc=None, http=None, metrics=None, issuers=(issuer_settings(),), state=state),
              fetcher=FakeFetcher())
    with caplog.at_level("WARNING", logger="verifier.state"):
        await app.start()
        try:
            for _ in range(100):
                if any(getattr(r, "code", "") == "redis_evicts_replay_keys" for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
        finally:
            await app.stop(grace=0.1)
    warned = [r for r in caplog.records if getattr(r, "code", "") == "redis_evicts_replay_keys"]
    assert [getattr(r, "maxmemory_policy", None) for r in warned] == ["volatile-ttl"]


async def test_a_take_under_another_limit_keeps_the_bucket_until_full_under_each(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    """An identity's tokens may carry roles of different limits, all taking from its one bucket. Before, the key's
    expiry was set by the limit of the take that set it: a take under a quick limit (a bucket of 1, a token back
    every 0.25 s) expired the bucket in a quarter second, and the next take under the default found a whole new
    burst. Now the key lives until the bucket would be full under every configured limit."""
    a, _ = replicas
    settings = RateLimitSettings(
        default=RateLimit(per_second=0.001, burst=5), roles=(("partner", RateLimit(per_second=4, burst=1)),)
    )
    rl = RateLimiter(settings, a, FrozenClock(time.time()), configured=lambda issuer: "")
    await drain(rl, 6)
    with contextlib.suppress(RateLimited):
        await rl.check(CALLER._replace(roles=frozenset({"partner"})))
    key = "t:bucket:rl:" + hashlib.sha256(b"https://idp.example.test\x00sub:alice").hexdigest()[:32]
    assert await raw.pttl(key) > 4_000_000  # (5 - <0.01 tokens) / 0.001 per second: before, at most 250 ms
    await asyncio.sleep(0.4)
    with pytest.raises(RateLimited):  # before: allowed, a new bucket of 5
        await rl.check(CALLER)


async def test_a_take_under_the_largest_burst_holds_the_bucket_for_no_slower_limit(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    """Only a limit of a larger burst can hand out more than the take's own when the bucket is gone: a take under
    the largest keeps (and counts, against `redis_max_buckets`) its bucket for its own time to full, however slow a
    smaller limit is. Before, every bucket was counted for the slowest limit's burst / rate (3,000 s here, not 2)."""
    a, _ = replicas
    settings = RateLimitSettings(
        default=RateLimit(per_second=10, burst=20), roles=(("batch", RateLimit(per_second=0.001, burst=3)),)
    )
    rl = RateLimiter(settings, a, FrozenClock(time.time()), configured=lambda issuer: "")
    for _ in range(19):  # 1 token left: below the batch limit's burst
        await rl.check(CALLER)
    key = "t:bucket:rl:" + hashlib.sha256(b"https://idp.example.test\x00sub:alice").hexdigest()[:32]
    assert await raw.pttl(key) <= 2_000  # (20 - 1) / 10 per second
    counted_until_ms = int(await raw.hget(key, "c")) * 1000  # the end of the slice the bucket is counted in
    assert counted_until_ms - time.time() * 1000 <= 4_000  # its life (2 s) and a slice, not the batch limit's 3,000 s


# Holds Redis (single-threaded) busy for ARGV[1] ms on Redis's own clock, as a slow command or a fork would.
BUSY_SCRIPT = """
local t = redis.call('TIME')
local start = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
repeat
  t = redis.call('TIME')
until tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000 - start >= tonumber(ARGV[1])
return 1
"""


async def test_a_command_that_timed_out_is_not_sent_again(redis_server: RedisServer, raw: Redis) -> None:
    """A Redis slower than `timeout_seconds` (busy, not down): the command was queued and runs once Redis gets to it.
    Sent again on a new connection, it ran twice: a fresh DPoP proof was answered "replayed" (the first run had
    marked its jti) and a bucket lost two tokens for one request. Only a broken connection is retried; a timeout is
    `StateUnavailable` (503)."""
    timeout = 0.5
    state = replica(redis_server.url, key_prefix="slow:", timeout_seconds=timeout)
    try:
        assert await state.first_use("warm", 10, purpose=DPOP)  # a pooled connection, the script loaded
        for attempt in range(3):  # a loaded machine may start the command late; each round uses a fresh key
            busy = asyncio.create_task(raw.eval(BUSY_SCRIPT, 0, str(int(timeout * 1000 * 1.6))))
            await asyncio.sleep(0.1)  # the busy script runs: what is sent now waits behind it
            key = f"fresh-{attempt}"
            try:
                first = await state.first_use(key, 10, purpose=DPOP)
            except StateUnavailable:
                first = None
            await busy
            assert first is not False, "a fresh key answered as a replay: the timed-out command was sent again"
    finally:
        await state.close()
