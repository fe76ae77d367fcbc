"""`SharedState` in Redis, for several replicas: one-time keys and buckets, each by one Lua script, each bounded.

Each operation is one round trip and atomic on the server, so two replicas racing on the same DPoP
`jti` or the same bucket cannot both win. Every Redis failure (refused connection, timeout, error
reply, unexpected answer) becomes `StateUnavailable`: the caller fails closed, never open.

One-time keys are bounded per `Purpose` (`StateConfig.redis_replay_bounds`: `state.redis_max_replay_entries`
split by the shares the local stores use), one bound every replica shares. Before, `SET key 1 NX PX ttl` was
the whole of it and Redis's `maxmemory` the only bound: a client holding one DPoP-bound token could mint
proofs with fresh `jti`s until Redis refused every write, the revocation purpose's (SET and logout-token
`jti`s) with the rest, so a stolen token's holder could make its own revocation fail. Now `ONCE_SCRIPT` keeps,
per purpose, one hash of counters (`{prefix}count:{purpose}`): keys created, per one-second slice of their
expiry (a key expiring at t counts in the slice ending at or after t, so until up to a second after it is
gone), and their total over the slices not yet ended. Counts only ever over-count (a key deleted early, a
slice's keys past their own expiry): a purpose may refuse a little early, never admit past its bound. A
purpose at its bound refuses a new key with `ReplayStoreFull` (503 `replay_store_full`, `Retry-After` the
seconds until its oldest counted slice ends, counted in `verifier_replay_store_full_total{purpose}` by the
replica that refused) and writes nothing; a replay is still a replay (False), and the other purposes are not
touched: a DPoP flood stops at its part and the revocation purpose keeps its own. Time is Redis's (`TIME`),
the same for every replica. Ended slices are dropped as the next call finds them (each slice once: amortised
O(1)), and the hash expires with its last slice. Counters lost while keys live (a `FLUSHDB` of part of the
keyspace, an operator's `DEL`) under-count until those keys expire; a restart loses both alike.

Rate-limit buckets (one per identity: issuer and `sub`, or client id) are bounded the same way, by
`state.redis_max_buckets`, every replica's together. A bucket lives until it would be full again under its take's
limit and each configured one of a larger burst (`verifier.state.base.full_in`: up to burst / rate, e.g. 3,000 s):
bounded in time, not in number, so a caller who can mint identities (a multi-tenant issuer anyone can sign for,
many client credentials) could create a bucket per identity until Redis refused every write, replay keys and
revocation entries with the rest. `BUCKET_SCRIPT` now counts the buckets it creates in `{prefix}count:buckets`
(the same hash of expiry slices as a purpose's): a new bucket is counted in the slice of its longest lifetime (now
+ burst / rate). Every take moves a bucket's expiry (`PEXPIRE` until full), so a bucket taken from again and again
outlives that slice: when a take would set its expiry past the slice it is counted in (its field `c`), it is
counted again in a later one (never refused for the bound: it exists). A live bucket is therefore always counted
in a live slice, and counts only over-count (a bucket counted twice, one gone full early). At the bound a NEW
identity's first take is refused with `BucketStoreFull`: 503 `state_unavailable`, fail closed as for an
unreachable Redis, never a pass and never a 429 (the caller did nothing wrong), `Retry-After` the seconds until
the oldest counted slice ends; nothing is written, and it is counted in `verifier_rate_limit_store_full_total` by
the replica that refused. Identities whose bucket exists are served as their bucket says. Still one round trip per
take. A bucket stored before this (no `c`) is counted when next taken.

A bucket refills on Redis's clock (`TIME` in the script), as the counters do. Before, each replica passed its
own (`now`): with several replicas on one Redis, one whose clock ran ahead found that much refill in a bucket the
others had just drained (up to a burst more for its caller), and as the bucket kept the newest time it was given,
the replicas on time then found no time elapsed until their clocks caught up (the caller refused meanwhile, up to
the skew). The in-memory and SQLite stores (one process) keep the injected clock.

One bound for every issuer still let a caller who mints identities at one issuer (a `tenants: any` template, a
self-service registration provider) take every place, and then every new identity of every other issuer, the
operator's own included, got 503. So the bound is split per share, an `issuers[]` entry (a template's tenants
share their entry's), as the replay bound is per purpose (`Settings.redis_bucket_bounds`, by
`issuers[].max_buckets_share`): each share counts its buckets in its own hash (`{prefix}count:buckets:<16 hex
digits of the entry's SHA-256>`), `take` names the share, and a share at its bound refuses its own new
identities only (counted per share: `verifier_rate_limit_store_full_total{issuer}`). A bucket counted in
`count:buckets` before the split is counted in its share's hash when a take next moves its expiry past its
slice; until then its share under-counts it.

The bounds keep a flood below Redis's memory only when `maxmemory` holds both with room to spare (~165 bytes a
replay key, ~215 a bucket in Redis 7.0); `check_eviction_policy` warns at start-up when it does not. Redis's
`maxmemory-policy` decides what a full Redis does, and only `noeviction` is safe: every replay key carries a
TTL (`SET ... PX`), so the `volatile-*` policies evict them as readily as the `allkeys-*` ones, and an
evicted live key is a replay that passes (measured against redis-server 7.0 at `maxmemory 3mb`, 100,000 live
DPoP keys written: 85,813-87,412 evicted and 172-176 of 200 sampled replays accepted, under `volatile-lru`,
`volatile-ttl` and `allkeys-lru` alike). Under `noeviction` a full Redis refuses the write (`OOM command not
allowed`), which is `StateUnavailable`: 503, fail closed, no live key lost. `check_eviction_policy` reads the
policy (`INFO memory`, which managed services leave open where `CONFIG` is not) and warns at start-up when it
evicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from verifier.clock import Clock, SystemClock
from verifier.config.state import (
    DEFAULT_KEY_PREFIX,
    DEFAULT_REDIS_MAX_BUCKETS,
    DEFAULT_REDIS_MAX_REPLAY_ENTRIES,
    DEFAULT_TIMEOUT_SECONDS,
    REDIS_BYTES_PER_BUCKET_KEY,
    REDIS_BYTES_PER_REPLAY_KEY,
    ReplayBounds,
)
from verifier.errors import BucketStoreFull, StateUnavailable
from verifier.state.base import (
    FULL_LOG_SECONDS,
    FullLog,
    Limits,
    Purpose,
    TakeResult,
    check_bucket,
    full_in,
    retry_after,
    take_result,
)

# The counters both scripts below keep (see the module's docstring), as Lua functions each script starts with. A
# counters hash holds 'n' (keys counted in live slices), 'lo' and 'hi' (the oldest and newest slices counted) and one
# field per slice (its end in slices since the epoch -> keys counted); `clock` is Redis's (ms), `slice` in ms.
# `settled` drops the slices that have ended (each once) and returns n, lo, hi; `counted` counts one key until
# `ends` (ms) and returns its slice; `wait_ms` is how long until the oldest counted slice ends.
SLICE_COUNTERS = """
local function settled(counters, clock, slice)
  local state = redis.call('HMGET', counters, 'n', 'lo', 'hi')
  local n = tonumber(state[1]) or 0
  local lo = tonumber(state[2])
  local hi = tonumber(state[3])
  if lo == nil or hi == nil or hi * slice <= clock then
    if state[1] or state[2] or state[3] then redis.call('DEL', counters) end
    return 0, nil, nil
  end
  if lo * slice <= clock then
    while lo < hi do
      local field = string.format('%d', lo)
      local held = redis.call('HGET', counters, field)
      if held then
        if lo * slice > clock then break end
        n = n - tonumber(held)
        redis.call('HDEL', counters, field)
      end
      lo = lo + 1
    end
    redis.call('HSET', counters, 'n', string.format('%d', n), 'lo', string.format('%d', lo))
  end
  return n, lo, hi
end
local function counted(counters, clock, slice, ends, lo, hi)
  local mine = math.ceil(ends / slice)
  redis.call('HINCRBY', counters, string.format('%d', mine), 1)
  redis.call('HINCRBY', counters, 'n', 1)
  if lo == nil or mine < lo then redis.call('HSET', counters, 'lo', string.format('%d', mine)) end
  if hi == nil or mine > hi then
    redis.call('HSET', counters, 'hi', string.format('%d', mine))
    redis.call('PEXPIRE', counters, mine * slice - clock)
  end
  return mine
end
local function wait_ms(lo, clock, slice)
  if lo == nil then return slice end
  return lo * slice - clock
end
local time = redis.call('TIME')
local clock = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""

# Mirrors verifier.state.base.refill / take_one / the bucket's expiry, atomically on the server, within the bound
# of buckets (see the module's docstring), on Redis's clock: `now` is TIME in seconds (to the microsecond), never a
# replica's. KEYS[1] the bucket, KEYS[2] the buckets' counters (SLICE_COUNTERS). ARGV rate_per_second, burst, bound,
# slice (ms), life (ms: the longest a take sets the expiry to, burst / rate), then the other limits' rate and burst
# pairs the bucket is kept full under (`verifier.state.base.full_in`). The bucket's field 'c' is the slice it
# is counted in. Returns {status, tokens as text (a Lua number returned to Redis would be truncated to an integer),
# ms until the oldest counted slice ends (when refused)}: status 1 allowed, 0 denied, 2 refused (a new bucket with
# the bound reached; nothing written but the dropping of ended slices).
BUCKET_SCRIPT = SLICE_COUNTERS + """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local bound = tonumber(ARGV[3])
local slice = tonumber(ARGV[4])
local life = tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 't', 'ts', 'c')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
local mine = tonumber(state[3])
local fresh = tokens == nil or last == nil
if fresh then
  tokens = burst
  last = now
end
local elapsed = now - last
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate)
if now > last then last = now end
local allowed = 0
if tokens >= 1 - 1e-9 then
  allowed = 1
  tokens = math.max(0, tokens - 1)
end
local full_ms = math.ceil((burst - tokens) / rate * 1000)
for i = 6, #ARGV - 1, 2 do
  local held = math.ceil((tonumber(ARGV[i + 1]) - tokens) / tonumber(ARGV[i]) * 1000)
  if held > full_ms then full_ms = held end
end
if full_ms < 1 then full_ms = 1 end
if fresh or mine == nil or mine * slice < clock + full_ms then
  local n, lo, hi = settled(KEYS[2], clock, slice)
  if fresh and n >= bound then return {2, '0', wait_ms(lo, clock, slice)} end
  if life < full_ms then life = full_ms end
  mine = counted(KEYS[2], clock, slice, clock + life, lo, hi)
end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'ts', string.format('%.17g', last),
  'c', string.format('%d', mine))
redis.call('PEXPIRE', KEYS[1], full_ms)
return {allowed, string.format('%.17g', tokens), 0}
"""
BUCKET_SCRIPT_SHA = hashlib.sha1(BUCKET_SCRIPT.encode(), usedforsecurity=False).hexdigest()

# A one-time key within its purpose's bound (see the module's docstring). KEYS[1] the key, KEYS[2] its purpose's
# counters (SLICE_COUNTERS). ARGV ttl (ms), bound, slice (ms). Returns {status, ms until the oldest counted slice
# ends (when full), keys counted}: status 1 created, 0 a replay, 2 refused (the purpose at its bound; nothing written
# but the dropping of ended slices).
ONCE_SCRIPT = SLICE_COUNTERS + """
local ttl = tonumber(ARGV[1])
local bound = tonumber(ARGV[2])
local slice = tonumber(ARGV[3])
local n, lo, hi = settled(KEYS[2], clock, slice)
if n >= bound then
  if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0, n} end
  return {2, wait_ms(lo, clock, slice), n}
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ttl) then return {0, 0, n} end
counted(KEYS[2], clock, slice, clock + ttl, lo, hi)
return {1, 0, n + 1}
"""
ONCE_SCRIPT_SHA = hashlib.sha1(ONCE_SCRIPT.encode(), usedforsecurity=False).hexdigest()
SLICE_MS = 1000  # a counted key is counted until the end of its expiry's slice: up to this much longer
CREATED, REPLAYED, FULL = 1, 0, 2  # ONCE_SCRIPT's statuses (FULL is BUCKET_SCRIPT's refusal too)
BUCKET_COUNTERS = "count:buckets"  # after the prefix: the buckets' counters (a purpose's are count:{purpose})
DEFAULT_REDIS_REPLAY_BOUNDS = ReplayBounds.split(DEFAULT_REDIS_MAX_REPLAY_ENTRIES)
SAFE_EVICTION_POLICY = "noeviction"  # the one `maxmemory-policy` that never drops a live replay key

log = logging.getLogger("verifier.state")


def bucket_counters(share: str) -> str:
    """The key (after the prefix) of one share's bucket counters: `count:buckets` for the one share "", else
    `count:buckets:` and 16 hex digits of the entry's SHA-256 (the same on every replica, whatever the order of
    `issuers[]`)."""
    if not share:
        return BUCKET_COUNTERS
    return BUCKET_COUNTERS + ":" + hashlib.sha256(share.encode()).hexdigest()[:16]


class RedisState:
    """A `SharedState` every replica pointing at the same Redis (and prefix) shares."""

    def __init__(
        self,
        redis: Redis,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        replay: ReplayBounds = DEFAULT_REDIS_REPLAY_BOUNDS,
        max_buckets: int | Mapping[str, int] = DEFAULT_REDIS_MAX_BUCKETS,
        clock: Clock | None = None,
    ) -> None:
        """`redis` is the root's client (`verifier.app.redis_client`), built with `timeout_seconds` per operation;
        `replay` the live one-time keys per purpose, every replica's together (`StateConfig.redis_replay_bounds`;
        every replica must be given the same); `max_buckets` the rate-limit buckets, every replica's together, per
        share (`Settings.redis_bucket_bounds`: `issuers[]` entry -> its part of `state.redis_max_buckets`, the same
        for every replica), or one number every take shares (the share ""); `clock` paces the "full" log lines
        only (Redis keeps the time)."""
        bounds = {"": max_buckets} if isinstance(max_buckets, int) else dict(max_buckets)
        if not bounds or min(bounds.values()) < 1:
            raise ValueError("max_buckets must be at least 1 for every share")
        self._prefix = key_prefix
        self._redis = redis
        self._bounds = replay
        self._bucket_bounds = bounds
        self._bucket_counters = {share: key_prefix + bucket_counters(share) for share in bounds}
        self._clock = clock or SystemClock()
        self.full = FullLog(self._clock, "redis")  # this replica's refusals
        # new buckets this replica refused at their share's bound (`verifier_rate_limit_store_full_total{issuer}`)
        self.bucket_refusals = dict.fromkeys(bounds, 0)
        self._bucket_logged = dict.fromkeys(bounds, 0)  # `bucket_refusals` when the share's last line was written
        self._bucket_log_next = dict.fromkeys(bounds, -math.inf)  # monotonic: no "full" line before this
        # The whole call, connect and retry included, stays within this deadline.
        self._deadline = timeout_seconds * 4

    @property
    def refused_full(self) -> int:
        """New one-time keys this replica refused because their purpose was at its bound."""
        return self.full.total

    async def first_use(self, key: str, ttl_seconds: float, *, purpose: Purpose) -> bool:
        """`SET key 1 NX PX ttl` within `purpose`'s bound, in one script: True when this call created the key,
        False on a replay; `ReplayStoreFull` when `purpose` holds its bound of counted keys (nothing written)."""
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        bound = self._bounds.of(purpose)
        keys = (self._prefix + "once:" + key, self._prefix + "count:" + purpose.value)
        args = (str(ttl_ms), str(bound), str(SLICE_MS))
        reply = await self._call(self._run(ONCE_SCRIPT, ONCE_SCRIPT_SHA, keys, args))
        try:
            status, wait_ms, held = (int(value) for value in reply)
        except (TypeError, ValueError) as exc:
            raise StateUnavailable("unexpected answer from shared state") from exc
        if status == CREATED:
            return True
        if status == REPLAYED:
            return False
        if status != FULL:
            raise StateUnavailable("unexpected answer from shared state")
        raise self.full.refuse(purpose, held, bound, retry_after(wait_ms / 1000, 0.0, ttl_seconds))

    async def seen(self, key: str, *, purpose: Purpose) -> bool:
        """`EXISTS key`."""
        return bool(await self._call(self._redis.exists(self._prefix + "once:" + key)))

    async def take(
        self, key: str, *, rate_per_second: float, burst: int, now: float, share: str = "", hold: Limits = ()
    ) -> TakeResult:
        """Token bucket in one atomic script (EVALSHA, loading the script once if Redis lost it), refilled on
        Redis's clock (`now`, this replica's, is not used: see the module's docstring), within its share's bound of
        buckets: `BucketStoreFull` for a new bucket when every replica's buckets of `share` (an `issuers[]` entry)
        together are at it (nothing written); a bucket that exists is served whatever the count. Another share's
        buckets never take this one's places."""
        check_bucket(rate_per_second, burst)
        bound = self._bucket_bounds.get(share)
        if bound is None:
            raise ValueError(f"no bucket share {share!r}")  # a caller's bug: shares are the configured entries
        keys = (self._prefix + "bucket:" + key, self._bucket_counters[share])
        life_ms = max(1, math.ceil(full_in(0.0, rate_per_second, burst, hold) * 1000))
        args: tuple[str, ...] = (repr(float(rate_per_second)), str(burst), str(bound), str(SLICE_MS), str(life_ms))
        for rate, size in hold:
            args += (repr(float(rate)), str(size))
        reply = await self._call(self._run(BUCKET_SCRIPT, BUCKET_SCRIPT_SHA, keys, args))
        try:
            status_raw, tokens_raw, wait_raw = reply
            status = int(status_raw)
            tokens = float(tokens_raw)
            wait_ms = int(wait_raw)
        except (TypeError, ValueError) as exc:
            raise StateUnavailable("unexpected answer from shared state") from exc
        if status == FULL:
            raise self._refuse_bucket(share, retry_after(wait_ms / 1000, 0.0, life_ms / 1000))
        if status not in (0, 1):
            raise StateUnavailable("unexpected answer from shared state")
        return take_result(status == 1, tokens, rate_per_second=rate_per_second, burst=burst)

    def _refuse_bucket(self, share: str, wait: int) -> BucketStoreFull:
        """Counts a new bucket refused at its share's bound and logs it at most once per `FULL_LOG_SECONDS` per
        share (the entry, never a tenant or an identity)."""
        self.bucket_refusals[share] += 1
        now = self._clock.monotonic()
        if now >= self._bucket_log_next[share]:
            self._bucket_log_next[share] = now + FULL_LOG_SECONDS
            log.error(
                "rate-limit buckets in Redis at their issuer entry's bound: refusing its new identities (503) "
                "until its buckets expire",
                extra={
                    "event": "rate_limit_store_full",
                    "store": "redis",
                    "issuer": share,
                    "redis_max_buckets": self._bucket_bounds[share],
                    "retry_after": wait,
                    "refused": self.bucket_refusals[share] - self._bucket_logged[share],
                },
            )
            self._bucket_logged[share] = self.bucket_refusals[share]
        return BucketStoreFull("too many rate-limit buckets in flight; try again", retry_after=wait)

    async def _run(self, script: str, sha: str, keys: tuple[str, ...], args: tuple[str, ...]) -> Any:
        try:
            return await self._redis.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            # EVAL runs the script and caches it under the same SHA for the next EVALSHA.
            return await self._redis.eval(script, len(keys), *keys, *args)

    async def _call(self, operation: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline):
                return await operation
        except (RedisError, OSError, TimeoutError) as exc:
            raise StateUnavailable(f"shared state unavailable: {type(exc).__name__}") from exc

    async def check_eviction_policy(self) -> str | None:
        """Redis's `maxmemory-policy`, logged as a `config_warning` (`redis_evicts_replay_keys`) when it is not
        `noeviction`; None when it cannot be read now (the caller asks again later). Also warns
        (`redis_maxmemory_below_replay_bound`) when a `maxmemory` is set below what the replay bound's keys
        (`REDIS_BYTES_PER_REPLAY_KEY` each) and the buckets' bound (`REDIS_BYTES_PER_BUCKET_KEY` each) take
        together: Redis would then be full before a flood reaches its bound."""
        try:
            info = await self._call(self._redis.info("memory"))
            policy = info["maxmemory_policy"]
        except (StateUnavailable, KeyError, TypeError):
            return None
        policy = policy.decode() if isinstance(policy, bytes) else str(policy)
        if policy != SAFE_EVICTION_POLICY:
            log.warning(
                "Redis evicts keys when full: live replay keys (DPoP proofs, SET and logout jtis, WebAuthn challenges) "
                "can be dropped and replayed; set maxmemory-policy noeviction",
                extra={"event": "config_warning", "code": "redis_evicts_replay_keys", "maxmemory_policy": policy},
            )
        try:
            maxmemory = int(info.get("maxmemory", 0))
        except (TypeError, ValueError):
            maxmemory = 0
        bound = sum(self._bounds.of(purpose) for purpose in Purpose)
        max_buckets = sum(self._bucket_bounds.values())
        needed = bound * REDIS_BYTES_PER_REPLAY_KEY + max_buckets * REDIS_BYTES_PER_BUCKET_KEY
        if 0 < maxmemory < needed:  # 0: no limit of Redis's own
            log.warning(
                "Redis's maxmemory is below what the replay bound's keys and the buckets' bound take: a flood of DPoP "
                "proofs or of new identities can fill Redis (every write refused, revocations' too) before its "
                "bound; raise maxmemory or lower state.redis_max_replay_entries or state.redis_max_buckets",
                extra={
                    "event": "config_warning",
                    "code": "redis_maxmemory_below_replay_bound",
                    "maxmemory": maxmemory,
                    "redis_max_replay_entries": bound,
                    "redis_max_buckets": max_buckets,
                    "needed": needed,
                },
            )
        return policy

    async def ping(self) -> bool:
        """Whether Redis answers now, within the configured deadline (the `verifier_state_up` gauge)."""
        try:
            await self._call(self._redis.ping())
        except StateUnavailable:
            return False
        return True

    async def close(self) -> None:
        """Closes the connection pool."""
        with contextlib.suppress(RedisError, OSError):  # a pool whose server is gone closes anyway
            await self._redis.aclose()
