"""`SharedState` in Redis, for several replicas: one-time keys by `SET NX PX`, buckets by one Lua script.

Each operation is one round trip and atomic on the server, so two replicas racing on the same DPoP
`jti` or the same bucket cannot both win. Every Redis failure (refused connection, timeout, error
reply, unexpected answer) becomes `StateUnavailable`: the caller fails closed, never open.

This store holds no bound of its own: Redis's `maxmemory` is the only one, for every purpose and for the
revocation entries alike. Its `maxmemory-policy` decides what a full Redis does, and only `noeviction`
is safe: every replay key carries a TTL (`SET ... PX`), so the `volatile-*` policies evict them as
readily as the `allkeys-*` ones, and an evicted live key is a replay that passes (measured against
redis-server 7.0 at `maxmemory 3mb`, 100,000 live DPoP keys written: 85,813-87,412 evicted and 172-176 of
200 sampled replays accepted, under `volatile-lru`, `volatile-ttl` and `allkeys-lru` alike). Under `noeviction`
a full Redis refuses the write (`OOM command not allowed`), which is `StateUnavailable`: 503, fail
closed, no live key lost. `check_eviction_policy` reads the policy (`INFO memory`, which managed
services leave open where `CONFIG` is not) and warns at start-up when it evicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from verifier.config.state import DEFAULT_KEY_PREFIX, DEFAULT_TIMEOUT_SECONDS
from verifier.errors import StateUnavailable
from verifier.state.base import Purpose, TakeResult, check_bucket, take_result

# Mirrors verifier.state.base.refill / take_one / the bucket's expiry, atomically on the server.
# KEYS[1] bucket; ARGV rate_per_second, burst, now (wall seconds). Returns {allowed, tokens as text}:
# a Lua number returned to Redis would be truncated to an integer.
BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
local last = tonumber(state[2])
if tokens == nil or last == nil then
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
if full_ms < 1 then full_ms = 1 end
redis.call('HSET', KEYS[1], 't', string.format('%.17g', tokens), 'ts', string.format('%.17g', last))
redis.call('PEXPIRE', KEYS[1], full_ms)
return {allowed, string.format('%.17g', tokens)}
"""
BUCKET_SCRIPT_SHA = hashlib.sha1(BUCKET_SCRIPT.encode(), usedforsecurity=False).hexdigest()
SAFE_EVICTION_POLICY = "noeviction"  # the one `maxmemory-policy` that never drops a live replay key

log = logging.getLogger("verifier.state")


class RedisState:
    """A `SharedState` every replica pointing at the same Redis (and prefix) shares."""

    def __init__(
        self,
        redis: Redis,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        """`redis` is the root's client (`verifier.app.redis_client`), built with `timeout_seconds` per operation."""
        self._prefix = key_prefix
        self._redis = redis
        # The whole call, connect and retry included, stays within this deadline.
        self._deadline = timeout_seconds * 4

    async def first_use(self, key: str, ttl_seconds: float, *, purpose: Purpose) -> bool:
        """`SET key 1 NX PX ttl`: True when this call created the key. Redis holds no bound per `purpose` (its
        only bound is `maxmemory`; at it, with `noeviction`, the write is refused: `StateUnavailable`)."""
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        created = await self._call(self._redis.set(self._prefix + "once:" + key, b"1", nx=True, px=ttl_ms))
        return created is True

    async def seen(self, key: str, *, purpose: Purpose) -> bool:
        """`EXISTS key`."""
        return bool(await self._call(self._redis.exists(self._prefix + "once:" + key)))

    async def take(self, key: str, *, rate_per_second: float, burst: int, now: float) -> TakeResult:
        """Token bucket in one atomic script (EVALSHA, loading the script once if Redis lost it)."""
        check_bucket(rate_per_second, burst)
        bucket = self._prefix + "bucket:" + key
        args = (repr(float(rate_per_second)), str(burst), repr(float(now)))
        reply = await self._call(self._run_bucket(bucket, args))
        try:
            allowed_raw, tokens_raw = reply
            allowed = int(allowed_raw) == 1
            tokens = float(tokens_raw)
        except (TypeError, ValueError) as exc:
            raise StateUnavailable("unexpected answer from shared state") from exc
        return take_result(allowed, tokens, rate_per_second=rate_per_second, burst=burst)

    async def _run_bucket(self, bucket: str, args: tuple[str, str, str]) -> Any:
        try:
            return await self._redis.evalsha(BUCKET_SCRIPT_SHA, 1, bucket, *args)
        except NoScriptError:
            # EVAL runs the script and caches it under the same SHA for the next EVALSHA.
            return await self._redis.eval(BUCKET_SCRIPT, 1, bucket, *args)

    async def _call(self, operation: Any) -> Any:
        try:
            async with asyncio.timeout(self._deadline):
                return await operation
        except (RedisError, OSError, TimeoutError) as exc:
            raise StateUnavailable(f"shared state unavailable: {type(exc).__name__}") from exc

    async def check_eviction_policy(self) -> str | None:
        """Redis's `maxmemory-policy`, logged as a `config_warning` (`redis_evicts_replay_keys`) when it is not
        `noeviction`; None when it cannot be read now (the caller asks again later)."""
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
