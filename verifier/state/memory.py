"""In-process `SharedState` for a single replica and for tests: bounded, with an injected clock.

Replay entries sit in a heap ordered by expiry, so purging expired ones costs O(log n) each and the
entry evicted under pressure is the one closest to expiry anyway. Buckets sit in an LRU order; a bucket
idle long enough to be full again is worth nothing and goes first.

Eviction under pressure is a deliberate trade: evicting a live replay entry could let that one value
be replayed until its proof's `iat` window closes, so size `max_entries` above the peak of one-time
values per window (requests per second x window seconds); `evictions` counts it happening. Use Redis
for several replicas: this store is never shared between processes.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from verifier.clock import Clock
from verifier.config.state import DEFAULT_MAX_ENTRIES
from verifier.state.base import TakeResult, check_bucket, refill, take_one, take_result


class MemoryState:
    """A bounded, single-process `SharedState`."""

    def __init__(self, clock: Clock, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max = max_entries
        self._seen: dict[str, float] = {}  # key -> monotonic expiry
        self._expiries: list[tuple[float, str]] = []  # heap of (expiry, key), one per live key
        # key -> (tokens, last wall time, wall time at which the bucket is full again)
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self.evictions = 0  # live entries dropped because a table was full

    def __len__(self) -> int:
        return len(self._seen) + len(self._buckets)

    async def first_use(self, key: str, ttl_seconds: float) -> bool:
        """True the first time `key` is seen within `ttl_seconds`."""
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        now = self._clock.monotonic()
        self._purge_seen(now)
        expiry = self._seen.get(key)
        if expiry is not None and expiry > now:
            return False
        while len(self._seen) >= self._max:
            _, oldest = heapq.heappop(self._expiries)
            del self._seen[oldest]
            self.evictions += 1
        self._seen[key] = now + ttl_seconds
        heapq.heappush(self._expiries, (now + ttl_seconds, key))
        return True

    async def seen(self, key: str) -> bool:
        """True while `key` is marked."""
        expiry = self._seen.get(key)
        return expiry is not None and expiry > self._clock.monotonic()

    def _purge_seen(self, now: float) -> None:
        # Every expired key is popped before a key is set again, so the heap never holds a stale
        # duplicate and stays exactly as large as `_seen`.
        while self._expiries and self._expiries[0][0] <= now:
            _, key = heapq.heappop(self._expiries)
            del self._seen[key]

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
        self._seen.clear()
        self._expiries.clear()
        self._buckets.clear()
