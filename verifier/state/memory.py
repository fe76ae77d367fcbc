"""In-process `SharedState` for a single replica and for tests: bounded, with an injected clock.

One-time values (DPoP proof `jti`s, RFC 9449 section 11.1; WebAuthn challenges; SET and logout-token
`jti`s) fail closed when their table is full. A live value is never forgotten to make room: forgetting
it would let that value be replayed until its window closes, a pass where the design says refuse,
and an authenticated client could force it by sending proofs of his own. So when every one of a
purpose's values is still live, `first_use` refuses a new one with `ReplayStoreFull` (503
`replay_store_full`; the client tries again with a fresh proof) and remembers nothing, counts it in
`refused_full` (`verifier_replay_store_full_total{purpose}`), and logs it at most once per
`verifier.state.base.FULL_LOG_SECONDS`. The trade: under a flood of one-time values a replica refuses
replay-checked requests of that purpose until values expire, instead of silently accepting replays;
bearer tokens without DPoP never reach these tables. The flood can only come from clients that pass
every other check first (a valid token, a signed proof: `first_use` runs last), and it shows in the
metric and the log. The default is sized so legitimate load does not come near it
(`verifier.config.state.DEFAULT_MAX_REPLAY_ENTRIES`); size it above requests per second x window.

Each `Purpose` has a table of its own with its own bound (`ReplayBounds`: DPoP proofs most of
`state.max_replay_entries`, a small part each for WebAuthn challenges and for revocation events, SET
and logout-token `jti`s). DPoP proof `jti`s are the one value any authenticated client can mint as fast
as he likes; in one shared table, a flood of them refused the SSF events and logout tokens that must
take effect within a second. Now filling the DPoP table refuses DPoP proofs only. The refusal's
`retry_after` is the truth for its purpose: the seconds until its oldest live slice expires and makes
room (at least 1, at most the value's TTL).

To make a large bound cheap, a value is held as the first 16 bytes of its SHA-256
(`verifier.state.base.replay_digest`, the SQLite file's form too), in one set per purpose, not as its
text with an expiry object and a heap entry (~245 bytes a value before, ~90-100 now, measured with
tracemalloc: docs/BENCHMARKS.md, "Replay keys in memory"). 128 bits make a collision between any two of
a million live values ~1.5e-27 likely (n^2 / 2^129), and a collision only refuses a proof (a false
"replayed"), never passes one; finding a second preimage of another client's value takes ~2^128 work.
Expiry is kept per one-second slice: a value's expiry is rounded up to the end of its slice, the set's
members are listed per slice, and slice ends sit in a heap (one entry per slice, not per value). A slice
whose end has passed is dropped whole (`set.difference_update`, in C), so purging costs O(1) amortised
per value, and every value in the set is live: a lookup is one set membership test. A value is
remembered for its TTL and up to a second more (never less).

Token buckets (rate limits) sit in an LRU order, bounded by `max_entries`; a bucket idle long enough to be full
again (under its take's limit and any of a larger burst: `verifier.state.base.full_in`) is worth nothing and goes
first, and under pressure the least recently used bucket is evicted (counted in `evictions`). That opens no
replay: a forgotten bucket starts full again, so its client gets at most one more burst, which is a rate limit's
tolerance, not a security boundary.

Use Redis for several replicas: this store is never shared between processes.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict

from verifier.clock import Clock
from verifier.config.state import DEFAULT_MAX_ENTRIES as MAX_ENTRIES
from verifier.config.state import DEFAULT_REPLAY_BOUNDS, ReplayBounds
from verifier.state.base import (
    FullLog,
    Limits,
    Purpose,
    TakeResult,
    check_bucket,
    full_in,
    refill,
    replay_digest,
    retry_after,
    take_one,
    take_result,
)

SLICE_SECONDS = 1  # expiries are rounded up to a whole slice: a value is kept up to this much longer

class _Table:
    """One purpose's live one-time values: digests in a set, listed per one-second expiry slice."""

    __slots__ = ("bound", "ends", "live", "slices")

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.live: set[bytes] = set()  # digests of the live one-time values (every one unexpired)
        self.slices: dict[int, list[bytes]] = {}  # slice end (monotonic seconds) -> digests expiring then
        self.ends: list[int] = []  # heap of the keys of `slices`

    def purge(self, now: float) -> None:
        # A slice is dropped once its end has passed, so every digest left in `live` is live. A digest
        # is in one slice only: it is added again only after its slice was dropped.
        ends, slices, live = self.ends, self.slices, self.live
        while ends and ends[0] <= now:
            live.difference_update(slices.pop(heapq.heappop(ends)))


class MemoryState:
    """A bounded, single-process `SharedState`."""

    def __init__(
        self, clock: Clock, *, max_entries: int = MAX_ENTRIES, replay: ReplayBounds = DEFAULT_REPLAY_BOUNDS
    ) -> None:
        """`replay`: live one-time values held per purpose (`StateConfig.replay_bounds`)."""
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._clock = clock
        self._max = max_entries
        self._tables = {purpose: _Table(replay.of(purpose)) for purpose in Purpose}
        # key -> (tokens, last wall time, wall time at which the bucket is full again)
        self._buckets: OrderedDict[str, tuple[float, float, float]] = OrderedDict()
        self.evictions = 0  # buckets dropped because their table was full (never a one-time value)
        self.full = FullLog(clock, "memory")

    @property
    def refused_full(self) -> int:
        """New one-time values refused because their purpose's table was full of live ones."""
        return self.full.total

    def held(self, purpose: Purpose) -> int:
        """Live one-time values of `purpose` (expired ones not yet purged included)."""
        return len(self._tables[purpose].live)

    def __len__(self) -> int:
        return sum(len(t.live) for t in self._tables.values()) + len(self._buckets)

    async def first_use(self, key: str, ttl_seconds: float, *, purpose: Purpose) -> bool:
        """True the first time `key` is seen within `ttl_seconds` (False on a replay); raises
        `ReplayStoreFull` when `purpose`'s table holds its bound of live values (nothing is remembered)."""
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        now = self._clock.monotonic()
        table = self._tables[purpose]
        ends = table.ends
        if ends and ends[0] <= now:
            table.purge(now)
        digest = replay_digest(key)
        live = table.live
        if digest in live:
            return False
        if len(live) >= table.bound:
            raise self.full.refuse(purpose, len(live), table.bound, retry_after(ends[0], now, ttl_seconds))
        end = math.ceil((now + ttl_seconds) / SLICE_SECONDS) * SLICE_SECONDS
        members = table.slices.get(end)
        if members is None:
            members = table.slices[end] = []
            heapq.heappush(ends, end)
        members.append(digest)
        live.add(digest)
        return True

    async def seen(self, key: str, *, purpose: Purpose) -> bool:
        """True while `key` is marked."""
        now = self._clock.monotonic()
        table = self._tables[purpose]
        if table.ends and table.ends[0] <= now:
            table.purge(now)
        return replay_digest(key) in table.live

    async def take(
        self, key: str, *, rate_per_second: float, burst: int, now: float, share: str = "", hold: Limits = ()
    ) -> TakeResult:
        """Token bucket; `now` is wall-clock seconds. `share` is not used: this store never refuses a bucket (under
        pressure it forgets the least recently used one, which starts full again)."""
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
        full_at = last + full_in(tokens, rate_per_second, burst, hold)
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
        for purpose in Purpose:
            self._tables[purpose] = _Table(self._tables[purpose].bound)
        self._buckets.clear()
