"""The shared-state interface: replay detection and token buckets, in memory or in Redis.

Replicas of the verifier behind one gateway must agree on two things a single process cannot decide
alone: whether a one-time value (a DPoP `jti`, RFC 9449 section 11.1; a WebAuthn challenge) was
already used, and how much of a rate limit is left. Both live behind `SharedState`, so the memory
store (one replica, tests) and the Redis store (many replicas) are interchangeable.

Every implementation fails closed: when the state cannot be read they raise
`verifier.errors.StateUnavailable`, never answer "first use" or "allowed". The local stores (memory,
SQLite) are bounded per `Purpose` (DPoP proofs, WebAuthn challenges, revocation events); a purpose full
of live one-time values raises `ReplayStoreFull` (a `StateUnavailable` with its own code) for a new value
of that purpose rather than forget a live one, which would let it be replayed, and the other purposes
are not touched: a client's flood of DPoP proofs never refuses an SSF event or a logout token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from typing import Protocol

from verifier.clock import Clock
from verifier.config.state import Purpose as Purpose  # re-exported: every caller of first_use names one
from verifier.errors import ReplayStoreFull

REPLAY_DIGEST_BYTES = 16  # 128 bits: see `verifier.state.memory` for the collision odds
_sha256 = hashlib.sha256


def replay_digest(key: str) -> bytes:
    """The form every local store holds a one-time value in: the first 16 bytes of its SHA-256, whatever its
    length (a third of a DPoP key's text; the SQLite file's format, so both stores spell a value alike)."""
    return _sha256(key.encode("utf-8", "surrogatepass")).digest()[:REPLAY_DIGEST_BYTES]

log = logging.getLogger("verifier.state")

Limits = tuple[tuple[float, int], ...]  # token buckets' (rate per second, burst)
FULL_LOG_SECONDS = 10.0  # monotonic seconds between two "replay store full" log lines (with the count between)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TakeResult:
    """The outcome of taking one token from a bucket, with what a `RateLimit-*` answer needs."""

    allowed: bool
    remaining: int  # whole tokens left after this take
    retry_after_seconds: float  # 0 when allowed; else seconds until one token is back
    limit: int  # the bucket's size (burst)
    reset_seconds: float  # seconds until the bucket is full again


class SharedState(Protocol):
    """State shared by every replica; every method is atomic with respect to all replicas."""

    async def first_use(self, key: str, ttl_seconds: float, *, purpose: Purpose) -> bool:
        """True the first time `key` is seen within `ttl_seconds`, False on a replay.

        Raises `StateUnavailable` when the answer cannot be known (fail closed), and its `ReplayStoreFull`
        when a bounded store cannot remember one more value of `purpose` (then nothing is remembered). A key
        belongs to one purpose (callers prefix it with theirs).
        """
        ...

    async def seen(self, key: str, *, purpose: Purpose) -> bool:
        """True while `key` is marked by `first_use` (a read: it marks nothing).

        For a one-time value whose effect must be stored before it is marked (an SSF `jti`): check,
        store, then mark. Raises `StateUnavailable` when the answer cannot be known.
        """
        ...

    async def take(
        self, key: str, *, rate_per_second: float, burst: int, now: float, share: str = "", hold: Limits = ()
    ) -> TakeResult:
        """Takes one token from the bucket `key` (size `burst`, refilled at `rate_per_second`).

        `now` is wall-clock seconds, the local stores' time (Redis refills on its own clock, the same for every
        replica, and does not use it); `share` the `issuers[]` entry whose part of a bound of buckets a new bucket
        takes a place in (Redis's; the local stores hold no such bound); `hold` the other limits (rate, burst) the
        same bucket may be taken under with a larger burst (`verifier.policy.ratelimit`): it is kept until it would
        be full under each (`full_in`), not only under this take's, so a forgotten bucket is never fuller than the
        one it replaced. Raises `StateUnavailable` when
        the bucket cannot be read (fail closed: never an allow).
        """
        ...

    async def close(self) -> None:
        """Releases connections; the state must not be used afterwards."""
        ...


def check_bucket(rate_per_second: float, burst: int) -> None:
    """Refuses a bucket that could never refill or never allow (a caller's bug, not a verdict)."""
    if not (rate_per_second > 0 and math.isfinite(rate_per_second)):
        raise ValueError("rate_per_second must be a positive finite number")
    if burst < 1:
        raise ValueError("burst must be at least 1")


def refill(tokens: float, last: float, now: float, *, rate_per_second: float, burst: int) -> tuple[float, float]:
    """Tokens in a bucket at `now`, and the new timestamp; a clock going back adds nothing.

    The Redis Lua script in `verifier.state.redis` mirrors this arithmetic line for line.
    """
    elapsed = max(0.0, now - last)
    return min(float(burst), tokens + elapsed * rate_per_second), max(last, now)


# Tokens; float arithmetic may leave a bucket at 0.9999999999 when it should hold exactly one token.
EPSILON = 1e-9


def full_in(tokens: float, rate_per_second: float, burst: int, hold: Limits) -> float:
    """Seconds until a bucket holding `tokens` is full under its take's limit and under each of `hold`: until
    then it must be kept. A bucket is one identity's whatever the limit of the token presented (the roles it
    carries), and one forgotten starts full under the next take's limit: kept only until full under a quick
    limit (a bucket of 1 refilled in a quarter second), the next take under a slow one found a whole new burst,
    again and again."""
    seconds = (burst - tokens) / rate_per_second
    for rate, size in hold:
        seconds = max(seconds, (size - tokens) / rate)
    return seconds


def take_one(tokens: float) -> tuple[bool, float]:
    """Takes a token if there is one: (allowed, tokens left)."""
    if tokens >= 1.0 - EPSILON:
        return True, max(0.0, tokens - 1.0)
    return False, tokens


def take_result(allowed: bool, tokens: float, *, rate_per_second: float, burst: int) -> TakeResult:
    """The answer for a bucket holding `tokens` after the take."""
    retry_after = 0.0 if allowed else (1.0 - tokens) / rate_per_second
    return TakeResult(
        allowed=allowed,
        remaining=max(0, math.floor(tokens)),
        retry_after_seconds=max(0.0, retry_after),
        limit=burst,
        reset_seconds=max(0.0, (burst - tokens) / rate_per_second),
    )


def retry_after(oldest_end: float, now: float, ttl_seconds: float) -> int:
    """`Retry-After` for a full purpose: whole seconds until its oldest live values expire and make room
    (`oldest_end`, on the same clock as `now`), at least 1 and at most the refused value's TTL rounded up
    (the values live no longer than that; a clock stepped back must not say hours)."""
    return max(1, min(math.ceil(oldest_end - now), math.ceil(ttl_seconds)))


class FullLog:
    """Counts refusals of a full replay store per purpose and logs them at most once per `FULL_LOG_SECONDS`
    per purpose, with the count since the last line (no value, no token: only the numbers)."""

    def __init__(self, clock: Clock, store: str) -> None:
        self._clock = clock
        self._store = store
        # every refusal since start, per purpose (the `verifier_replay_store_full_total` counter)
        self.refused: dict[Purpose, int] = dict.fromkeys(Purpose, 0)
        self._logged: dict[Purpose, int] = dict.fromkeys(Purpose, 0)  # `refused` when the last line was written
        self._next: dict[Purpose, float] = dict.fromkeys(Purpose, -math.inf)  # monotonic: no line before this

    @property
    def total(self) -> int:
        """Refusals of every purpose."""
        return sum(self.refused.values())

    def refuse(self, purpose: Purpose, held: int, bound: int, retry_after: int) -> ReplayStoreFull:
        """Counts one refusal, logs when due, and returns the error the caller raises."""
        self.refused[purpose] += 1
        now = self._clock.monotonic()
        if now >= self._next[purpose]:
            self._next[purpose] = now + FULL_LOG_SECONDS
            log.error(
                "replay store full of live one-time values: refusing new ones (503) until they expire",
                extra={
                    "event": "replay_store_full",
                    "store": self._store,
                    "purpose": purpose.value,
                    "held": held,
                    "max_replay_entries": bound,
                    "retry_after": retry_after,
                    "refused": self.refused[purpose] - self._logged[purpose],
                },
            )
            self._logged[purpose] = self.refused[purpose]
        description = f"too many {purpose.value} one-time values in flight; try again"
        return ReplayStoreFull(description, purpose=purpose.value, retry_after=retry_after)
