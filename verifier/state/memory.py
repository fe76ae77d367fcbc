"""In-process `SharedState` for a single replica and for tests: bounded, with an injected clock.

One-time values (DPoP proof `jti`s, RFC 9449 section 11.1; WebAuthn challenges; SET and logout-token
`jti`s) fail closed when the table is full. A live value is never forgotten to make room: forgetting
it would let that value be replayed until its window closes, a pass where the design says refuse,
and an authenticated client could force it by sending proofs of his own. So when every one of
`max_replay_entries` values is still live, `first_use` refuses the new one with `ReplayStoreFull`
(503 `replay_store_full`, Retry-After; the client tries again with a fresh proof) and remembers nothing,
counts it in `refused_full` (`verifier_replay_store_full_total`), and logs it at most once per
`verifier.state.base.FULL_LOG_SECONDS`. The trade: under a flood of one-time values a replica refuses
replay-checked requests (DPoP, WebAuthn, SSF deliveries, which their senders retry) until values
expire, instead of silently accepting replays; bearer tokens without DPoP never reach this table. The
flood can only come from clients that pass every other check first (a valid token, a signed proof:
`first_use` runs last), and it shows in the metric and the log. The default is sized so legitimate
load does not come near it (`verifier.config.state.DEFAULT_MAX_REPLAY_ENTRIES`); size it above
requests per second x window.

To make a large bound cheap, a value is held as the first 16 bytes of its SHA-256
(`verifier.state.base.replay_digest`, the SQLite file's form too), in one set, not as its
text with an expiry object and a heap entry (~245 bytes a value before, ~90-100 now, measured with
tracemalloc: docs/BENCHMARKS.md, "Replay keys in memory"). 128 bits make a collision between any two of
a million live values ~1.5e-27 likely (n^2 / 2^129), and a collision only refuses a proof (a false
"replayed"), never passes one; finding a second preimage of another client's value takes ~2^128 work.
Expiry is kept per one-second slice: a value's expiry is rounded up to the end of its slice, the set's
members are listed per slice, and slice ends sit in a heap (one entry per slice, not per value). A slice
whose end has passed is dropped whole (`set.difference_update`, in C), so purging costs O(1) amortised
per value, and every value in the set is live: a lookup is one set membership test. A value is
remembered for its TTL and up to a second more (never less).

Token buckets (rate limits) sit in an LRU order, bounded by `max_entries`; a bucket idle long enough to
be full again is worth nothing and goes first, and under pressure the least recently used bucket is
evicted (counted in `evictions`). That opens no replay: a forgotten bucket starts full again, so its
client gets at most one more burst, which is a rate limit's tolerance, not a security boundary.

Use Redis for several replicas: this store is never shared between processes.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict

from verifier.clock import Clock
from verifier.config.state import DEFAULT_MAX_ENTRIES as MAX_ENTRIES
from verifier.config.state import DEFAULT_MAX_REPLAY_ENTRIES as MAX_REPLAY_ENTRIES
from verifier.state.base import FullLog, TakeResult, check_bucket, refill, replay_digest, take_one, take_result

SLICE_SECONDS = 1  # expiries are rounded up to a whole slice: a value is kept up to this much longer

class MemoryState:
    """A bounded, single-process `SharedState`."""

    def __init__(
        self, clock: Clock, *, max_entries: int = MAX_ENTRIES, max_replay_entries: int = MAX_REPLAY_ENTRIES
    ) -> None:
        if max_entries < 1 or max_replay_entries < 1:
            raise ValueError("max_entries and max_replay_entries must be at least 1")
        self._clock = clock
        self._max = max_entries
        self._max_replay = max_replay_entries
        self._live: set[bytes] = set()  # digests of the live one-time values (every one unexpired)
        self._slices: dict[int, list[bytes]] = {}  # slice end (monotonic seconds) -> digests expiring then
        self._ends: list[int] = []  # heap of the keys of `_slices`
        # key -> (tokens, last wall time, wall time at which the bucket is full again)
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self.evictions = 0  # buckets dropped because their table was full (never a one-time value)
        self.full = FullLog(clock, "memory")

    @property
    def refused_full(self) -> int:
        """New one-time values refused because the table was full of live ones."""
        return self.full.refused

    def __len__(self) -> int:
        return len(self._live) + len(self._buckets)

    async def first_use(self, key: str, ttl_seconds: float) -> bool:
        """True the first time `key` is seen within `ttl_seconds` (False on a replay); raises
        `ReplayStoreFull` when the table holds `max_replay_entries` live values (nothing is remembered)."""
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        now = self._clock.monotonic()
        ends = self._ends
        if ends and ends[0] <= now:
            self._purge(now)
        digest = replay_digest(key)
        live = self._live
        if digest in live:
            return False
        if len(live) >= self._max_replay:
            raise self.full.refuse(len(live), self._max_replay)
        end = math.ceil((now + ttl_seconds) / SLICE_SECONDS) * SLICE_SECONDS
        members = self._slices.get(end)
        if members is None:
            members = self._slices[end] = []
            heapq.heappush(ends, end)
        members.append(digest)
        live.add(digest)
        return True

    async def seen(self, key: str) -> bool:
        """True while `key` is marked."""
        now = self._clock.monotonic()
        if self._ends and self._ends[0] <= now:
            self._purge(now)
        return replay_digest(key) in self._live

    def _purge(self, now: float) -> None:
        # A slice is dropped once its end has passed, so every digest left in `_live` is live. A digest
        # is in one slice only: it is added again only after its slice was dropped.
        ends, slices, live = self._ends, self._slices, self._live
        while ends and ends[0] <= now:
            live.difference_update(slices.pop(heapq.heappop(ends)))

    async def take(self, key: str, *, rate_per_second: float, burst: int, now: float) -> TakeResult:
        """Token bucket; `now` is wall-clock seconds."""
        check_bucket(rate_per_second, burst)
        entry = self._buckets.pop(key, None)
        if entry is None or entry[2] <= now:
            tokens, last = float(burst), now
        else:
            tokens, last = refill(entry[0], entry[1], now, rate_per_second=rate_per_second, burst=burst)
        allowed, tokens = take_one(tokens)
        self._purge_buckets(now)
        while len(self._buckets) >= self._max:
            self._buckets.popitem(last=False)
            self.evictions += 1
        full_at = last + (burst - tokens) / rate_per_second
        self._buckets[key] = (tokens, last, full_at)  # most recently used last
        return take_result(allowed, tokens, rate_per_second=rate_per_second, burst=burst)

    def _purge_buckets(self, now: float, limit: int = 8) -> None:
        # A few per call keeps each take O(1) while idle buckets still drain away.
        for _ in range(limit):
            if not self._buckets:
                return
            key, entry = next(iter(self._buckets.items()))
            if entry[2] > now:
                return
            del self._buckets[key]

    async def close(self) -> None:
        """Forgets everything."""
        self._live.clear()
        self._slices.clear()
        self._ends.clear()
        self._buckets.clear()
