"""verifier.state.redis's bound on rate-limit buckets against a real redis-server: a caller minting identities (many
client credentials, a multi-tenant issuer anyone can sign for) stops at `state.redis_max_buckets`, each new
identity's first request refused fail closed (`BucketStoreFull`: 503 `state_unavailable` with Retry-After, never a
pass, never a 429), while the identities whose bucket exists are served and the replay keys and revocation entries
are still written; every replica shares the one bound; the counters expire with the buckets; a bucket kept in use
past its first counted lifetime stays counted, so live buckets never exceed the bound.

Before, a bucket was a bare `HSET` + `PEXPIRE`, bounded in time and not in number: the flood went on until Redis
(`noeviction`, as the replay keys require) refused every write, DPoP replay keys and the kill switch's included.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from doorkit import http_exchange, running_verifier
from redis.asyncio import Redis
from redis_harness import RedisServer  # tests/integration is on sys.path

from verifier.app import App, redis_client, revocation_store
from verifier.config.state import MAX_TIMEOUT_SECONDS, ReplayBounds, StateConfig
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.errors import BucketStoreFull, StateUnavailable
from verifier.revocation.entry import OPERATOR, Effect, Entry, KeyKind, Match, SubjectKey
from verifier.settings import RateLimit, RateLimitSettings, load_settings
from verifier.state.base import Purpose
from verifier.state.redis import RedisState

pytestmark = pytest.mark.integration

BUCKETS = 50
RATE, BURST = 0.001, 3  # a bucket full again (and its key gone) ~3,000 s after its last take
NOW = 1_700_000_000.0


def replica(url: str, max_buckets: int | dict[str, int] = BUCKETS, bounds: ReplayBounds | None = None) -> RedisState:
    """One replica's store, on a client built as the composition root builds it."""
    client = redis_client(url, password=None, timeout_seconds=MAX_TIMEOUT_SECONDS)
    extra = {} if bounds is None else {"replay": bounds}
    return RedisState(client, key_prefix="t:", timeout_seconds=MAX_TIMEOUT_SECONDS, max_buckets=max_buckets, **extra)


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisState, RedisState]]:
    """Two replicas of one deployment: the same Redis, prefix and bound."""
    a, b = replica(redis_server.url), replica(redis_server.url)
    yield a, b
    await a.close()
    await b.close()


async def flood(
    state: RedisState, limit: int, *, start: int = 0, rate: float = RATE, burst: int = BURST, now: float = NOW
) -> tuple[int, StateUnavailable]:
    """A new identity per take until one is refused: (identities served, the refusal)."""
    for i in range(start, start + limit):
        try:
            assert (await state.take(f"rl:tenant-{i:032d}", rate_per_second=rate, burst=burst, now=now)).allowed
        except StateUnavailable as refused:
            return i - start, refused
    pytest.fail(f"{limit} new identities, none refused")


def revoked(i: int) -> Entry:
    return Entry(id=f"op-{i}", key=SubjectKey(KeyKind.ISS_SUB, f"user-{i}", "https://idp.example.test"),
                 effect=Effect.TOKEN_REVOKED, match=Match.ALL, event_time=1.0, expires_at=None, source=OPERATOR,
                 event=OPERATOR)  # fmt: skip


async def test_a_flood_of_identities_stops_at_the_bound_in_a_tight_redis_and_everything_else_is_served(
    redis_server: RedisServer, raw: Redis
) -> None:
    """Redis at `maxmemory` with `noeviction`, sized above the bound's buckets: the flood is refused by the bound
    (503, Retry-After up to a bucket's lifetime), not by an OOM, so the identities whose bucket exists are served
    (their limits kept: a drained bucket still says no), and DPoP and SSF replay keys and the kill switch's
    entries are still written. Before, the flood filled Redis and every write was refused (OOM)."""
    state = replica(redis_server.url, max_buckets=2_000, bounds=ReplayBounds(dpop=50, webauthn=5, revocation=5))
    store = revocation_store(StateConfig(redis_url=redis_server.url, key_prefix="t:"))
    try:
        for _ in range(BURST):  # the victim drains its own bucket; the bystander uses one of three tokens
            assert (await state.take("rl:victim", rate_per_second=RATE, burst=BURST, now=NOW)).allowed
        assert (await state.take("rl:bystander", rate_per_second=RATE, burst=BURST, now=NOW)).allowed
        used = int((await raw.info("memory"))["used_memory"])
        await raw.config_set("maxmemory", str(used + 1_000_000))  # ~4,500 buckets: twice the bound and more
        await raw.config_set("maxmemory-policy", "noeviction")
        served, refused = await flood(state, 20_000)
        assert isinstance(refused, BucketStoreFull), refused  # before: OutOfMemoryError, a plain StateUnavailable
        assert served == 2_000 - 2
        assert refused.code == "state_unavailable" and refused.outcome.value == "unavailable"
        assert 1 <= refused.retry_after <= BURST / RATE
        assert state.bucket_refusals == {"": 1}  # one share: every take's
        # The identities whose bucket exists: served as their bucket says, never refused for the bound.
        assert (await state.take("rl:bystander", rate_per_second=RATE, burst=BURST, now=NOW + 1)).allowed
        assert not (await state.take("rl:victim", rate_per_second=RATE, burst=BURST, now=NOW + 1)).allowed
        assert (await state.take("rl:tenant-" + "0" * 32, rate_per_second=RATE, burst=BURST, now=NOW + 1)).allowed
        # Replay keys and revocation entries: Redis has room.
        for i in range(5):
            assert await state.first_use(f"dpop:jti:{i}", 66, purpose=Purpose.DPOP) is True
            assert await state.first_use(f"ssf:jti:{i}", 300, purpose=Purpose.REVOCATION) is True
        await store.put([revoked(i) for i in range(20)])
        assert len(await store.sync([])) == 20
        with pytest.raises(BucketStoreFull):  # and the flood is still refused
            await state.take("rl:one-more", rate_per_second=RATE, burst=BURST, now=NOW + 2)
        assert (await raw.info("stats"))["evicted_keys"] == 0
    finally:
        await raw.config_set("maxmemory", "0")
        await state.close()
        await store.close()


async def test_two_replicas_share_one_bound(replicas: tuple[RedisState, RedisState]) -> None:
    a, b = replicas
    for i in range(BUCKETS):
        assert (await (a if i % 2 else b).take(f"rl:{i}", rate_per_second=RATE, burst=BURST, now=NOW)).allowed
    for state in (a, b):  # each replica sees the other's buckets counted
        with pytest.raises(BucketStoreFull):
            await state.take("rl:next", rate_per_second=RATE, burst=BURST, now=NOW)
        assert (await state.take("rl:0", rate_per_second=RATE, burst=BURST, now=NOW)).allowed  # an existing one
    assert a.bucket_refusals == b.bucket_refusals == {"": 1}  # each replica counts its own refusals


async def test_concurrent_new_identities_on_two_replicas_never_pass_the_bound(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    a, b = replicas

    async def one(state: RedisState, i: int) -> str:
        try:
            await state.take(f"rl:{i}", rate_per_second=RATE, burst=BURST, now=NOW)
        except BucketStoreFull:
            return "full"
        return "served"

    results = await asyncio.gather(*(one(s, i) for i in range(60) for s in (a, b)))
    assert len(await raw.keys("t:bucket:*")) == BUCKETS
    assert results.count("full") == 2 * 60 - results.count("served")
    assert results.count("full") >= 60 - BUCKETS


async def test_counters_expire_with_their_buckets_and_new_identities_have_room_again(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    """Buckets full again within a second (rate 2, burst 2): their counts go with them, the whole bound again."""
    a, b = replicas
    served, refused = await flood(a, 1_000, rate=2, burst=2)
    assert served == BUCKETS and isinstance(refused, BucketStoreFull)
    assert refused.retry_after == 1  # at most a bucket's lifetime
    assert 0 < await raw.pttl("t:count:buckets") <= 2_000
    await asyncio.sleep(2.1)  # a bucket expires when full, its count at the end of that second at the latest
    served, _ = await flood(b, 1_000, start=10_000, rate=2, burst=2)
    assert served == BUCKETS  # the whole bound again, not one place more
    await asyncio.sleep(2.1)
    assert await raw.exists("t:count:buckets") == 0  # nothing left behind once every bucket is gone
    assert (await a.take("rl:after", rate_per_second=2, burst=2, now=NOW)).allowed


async def test_a_bucket_kept_in_use_stays_counted_so_live_buckets_never_pass_the_bound(
    redis_server: RedisServer, raw: Redis
) -> None:
    """Every take moves a bucket's expiry (PEXPIRE until full): a bucket taken from again and again outlives the
    lifetime it was first counted for. It is counted again then, so its place is not given to a new identity while
    it lives. Counted once only, the bound of 1 let a second identity in beside it after ~2 s."""
    state = replica(redis_server.url, max_buckets=1)
    try:
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:  # 1 token/s, burst 2: full again within 2 s of each take
            await state.take("rl:busy", rate_per_second=1, burst=2, now=time.time())
            assert await raw.exists("t:bucket:rl:busy") == 1
            with pytest.raises(BucketStoreFull):
                await state.take("rl:newcomer", rate_per_second=1, burst=2, now=time.time())
            await asyncio.sleep(0.25)
        assert len(await raw.keys("t:bucket:*")) == 1
    finally:
        await state.close()


async def test_a_bucket_stored_before_the_bound_is_counted_when_next_taken(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    """A bucket written by the script before the bound (no count field) is served, and counted from then on."""
    a, _ = replicas
    seconds, microseconds = await raw.time()  # the script refills on Redis's clock
    await raw.hset("t:bucket:old", mapping={"t": "2", "ts": repr(seconds + microseconds / 1e6)})
    await raw.pexpire("t:bucket:old", 100_000)
    assert (await a.take("rl:x", rate_per_second=RATE, burst=BURST, now=NOW)).allowed
    assert int(await raw.hget("t:count:buckets", "n")) == 1
    result = await a.take("old", rate_per_second=RATE, burst=BURST, now=NOW)
    assert result.allowed and result.remaining == 1  # its own tokens, not a fresh bucket's
    assert int(await raw.hget("t:count:buckets", "n")) == 2


async def test_the_bucket_script_survives_redis_losing_it_at_the_bound(
    replicas: tuple[RedisState, RedisState], raw: Redis
) -> None:
    a, b = replicas
    await flood(a, 1_000)
    await raw.script_flush()
    with pytest.raises(BucketStoreFull):  # EVALSHA misses, EVAL runs: still bounded
        await b.take("rl:late", rate_per_second=RATE, burst=BURST, now=NOW)


async def test_the_warning_counts_the_buckets_in_maxmemory(
    redis_server: RedisServer, raw: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    state = replica(redis_server.url, max_buckets=40, bounds=ReplayBounds(dpop=50, webauthn=5, revocation=5))
    try:
        await raw.config_set("maxmemory-policy", "noeviction")
        with caplog.at_level("WARNING", logger="verifier.state"):
            await raw.config_set("maxmemory", str(60 * 200 + 40 * 250))  # both bounds' keys fit: nothing to say
            assert await state.check_eviction_policy() == "noeviction"
            await raw.config_set("maxmemory", str(60 * 200 + 40 * 250 - 1))
            assert await state.check_eviction_policy() == "noeviction"
    finally:
        await raw.config_set("maxmemory", "0")
        await state.close()
    warned = [vars(r) for r in caplog.records if getattr(r, "code", "") == "redis_maxmemory_below_replay_bound"]
    assert [(w["maxmemory"], w["redis_max_buckets"], w["needed"]) for w in warned] == [(21_999, 40, 22_000)]


LIMITS = RateLimitSettings(default=RateLimit(per_second=0.001, burst=3))


def _request(token: str) -> bytes:
    return (
        "GET /v1/forward-auth HTTP/1.1\r\nHost: verifier\r\nX-Forwarded-Method: GET\r\nX-Forwarded-Proto: https\r\n"
        f"X-Forwarded-Host: api.example.test\r\nX-Forwarded-Uri: /x\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()


def _parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def test_through_the_forward_auth_door_a_new_identity_past_the_bound_gets_503_and_the_others_are_served(
    redis_server: RedisServer,
) -> None:
    """The composition root on Redis with `redis_max_buckets: 3`: three users are served; a fourth identity's
    request is a 503 `state_unavailable` with Retry-After (not a 429 blaming it, not a pass), counted in
    `verifier_rate_limit_store_full_total`; the three keep their own budgets."""
    state = StateConfig(redis_url=redis_server.url, key_prefix="door:", redis_max_buckets=3)
    async with running_verifier({"rate_limits": LIMITS, "state": state}) as (app, idp):
        port = app.ports.http
        for sub in ("alice", "bob", "carol"):
            status, headers, _ = _parse(await http_exchange(port, _request(idp.mint(sub=sub))))
            assert (status, headers["ratelimit"].split(";")[1]) == (200, "r=2")
        status, headers, body = _parse(await http_exchange(port, _request(idp.mint(sub="tenant-4"))))
        assert (status, headers.get("x-verifier-reason")) == (503, "state_unavailable")
        assert 1 <= int(headers["retry-after"]) <= 3_000
        assert json.loads(body)["error"] == "temporarily_unavailable"
        assert "ratelimit" not in headers
        status, headers, _ = _parse(await http_exchange(port, _request(idp.mint(sub="alice"))))
        assert (status, headers["ratelimit"].split(";")[1]) == (200, "r=1")
        assert f'verifier_rate_limit_store_full_total{{issuer="{idp.issuer}"}} 1.0'.encode() in app.metrics.render()


async def test_an_issuer_entry_at_its_share_refuses_its_own_new_identities_only(
    redis_server: RedisServer, raw: Redis
) -> None:
    """Two shares of the bound (`issuers[]` entries: 3 and 2 buckets). The entry whose caller mints identities
    stops at its own 3, each further new identity refused (`BucketStoreFull`, Retry-After) and counted under its
    entry; the other entry's new identities still get their buckets, up to its own 2, and the flooding entry's
    existing identities are still served. Before, one bound for all: the flood took every place, the other
    entry's first identity was refused."""
    bounds = {"https://tenants.example.test/{tenant}": 3, "https://idp.example.test": 2}
    open_entry, own = bounds
    state = replica(redis_server.url, max_buckets=bounds)
    try:
        for i in range(20):  # the attacker: a new identity per take, at the open entry, until refused
            try:
                await state.take(f"rl:minted-{i}", rate_per_second=RATE, burst=BURST, now=NOW, share=open_entry)
            except BucketStoreFull as refused:
                served, full = i, refused
                break
        else:
            pytest.fail("20 new identities at one entry, none refused")
        for user in ("alice", "bob"):  # the operator's own issuer: its new users are served
            assert (await state.take(f"rl:{user}", rate_per_second=RATE, burst=BURST, now=NOW, share=own)).allowed
        assert served == 3 and 1 <= full.retry_after <= BURST / RATE
        with pytest.raises(BucketStoreFull):  # its own share has its own end
            await state.take("rl:carol", rate_per_second=RATE, burst=BURST, now=NOW, share=own)
        with pytest.raises(BucketStoreFull):  # and the flood is still refused
            await state.take("rl:minted-99", rate_per_second=RATE, burst=BURST, now=NOW + 1, share=open_entry)
        existing = await state.take("rl:minted-0", rate_per_second=RATE, burst=BURST, now=NOW + 1, share=open_entry)
        assert existing.allowed
        assert state.bucket_refusals == {open_entry: 2, own: 1}
        assert len(await raw.keys("t:bucket:*")) == 5 and len(await raw.keys("t:count:buckets:*")) == 2
        with pytest.raises(ValueError):  # a share nobody configured is a caller's bug, never a bound of its own
            await state.take("rl:x", rate_per_second=RATE, burst=BURST, now=NOW, share="https://other.example.test")
    finally:
        await state.close()


async def test_through_the_forward_auth_door_a_flood_at_an_open_template_leaves_the_own_issuer_s_new_users_served(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The cross-tenant denial of service, through the forward-auth door on Redis: `redis_max_buckets: 6`, two
    `issuers[]` entries (the operator's own issuer and a `tenants: any` template anyone can make a tenant of, so
    mint users at will): 3 buckets each. The attacker's new identities, spread over two tenants, get 200 until
    their entry's 3 are taken, then 503 `state_unavailable` with Retry-After; a new user of the operator's own
    issuer still gets 200 and its budget (before: 503, the flood had taken every place); both entries are
    counted apart in `verifier_rate_limit_store_full_total{issuer}`, never a tenant or a sub."""
    idp = DevIdentityProvider(port=0, tenants=("contoso", "fabrikam"))
    await idp.start()
    entry = {"audiences": [DEV_AUDIENCE], "algorithms": ["ES256"], "allow_insecure_http": True}
    config = {
        "http": {"listen": "127.0.0.1:0"},
        "issuers": [{"issuer": idp.issuer, **entry}, {"issuer": idp.issuer + "/{tenant}", "tenants": "any", **entry}],
        "rate_limits": {"default": {"per_second": RATE, "burst": BURST}},
        "state": {"redis_url": redis_server.url, "key_prefix": "tenants:", "redis_max_buckets": 6},
    }
    (tmp_path / "verifier.yaml").write_text(yaml.safe_dump(config))
    app = App(load_settings(tmp_path / "verifier.yaml"))
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 10)
        port = app.ports.http or 0
        answers = []
        for i in range(8):  # the attacker: a fresh sub per request, at tenants of the open template
            token = idp.mint(tenant=("contoso", "fabrikam")[i % 2], sub=f"minted-{i}")
            answers.append(_parse(await http_exchange(port, _request(token))))
        status, headers, _ = _parse(await http_exchange(port, _request(idp.mint(sub="alice"))))
        assert (status, headers.get("x-verifier-reason")) == (200, "ok")
        assert headers["ratelimit"] == '"default";r=2;t=1000'
        assert [answer[0] for answer in answers] == [200, 200, 200, 503, 503, 503, 503, 503]
        status, headers, _ = answers[3]
        assert headers["x-verifier-reason"] == "state_unavailable" and 1 <= int(headers["retry-after"]) <= 3_000
        assert _parse(await http_exchange(port, _request(idp.mint(tenant="contoso", sub="minted-0"))))[0] == 200
        metrics = app.metrics.render().decode()
        assert f'verifier_rate_limit_store_full_total{{issuer="{idp.issuer}/{{tenant}}"}} 5.0' in metrics
        assert f'verifier_rate_limit_store_full_total{{issuer="{idp.issuer}"}} 0.0' in metrics
        assert "contoso" not in metrics and "minted" not in metrics
    finally:
        await app.stop(grace=0)
        await idp.stop()
