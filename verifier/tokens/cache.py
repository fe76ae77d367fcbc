"""Bounded caches keyed by a token's SHA-256, whose entries never outlive their own expiry.

An ordered map with first-in-first-out eviction: a lookup is one dict probe and one comparison, which
matters on the hot path, and a flood of distinct tokens can only push out the oldest entries, never
grow memory past the bound. (An `OrderedDict`, not a plain dict: dropping a plain dict's first entry
leaves a hole that every later `next(iter(...))` walks past, so evicting from a full 100,000-entry dict
cost ~150 us per store, and grew with the number of holes; `popitem(last=False)` is ~1 us.)

Each store also drops expired entries (at most `SWEEP_PER_PUT`), soonest-due first, from a heap of
expiry times: entries live as long as their own token (the verified-token cache holds tokens of every
lifetime), so an expired one may sit behind live ones in insertion order. The heap also holds stale
rows (keys since replaced, discarded or pushed out), dropped when they come due, and rebuilt from the
live entries when it outgrows twice their number, so it stays bounded with the cache.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Generic, TypeVar

from verifier.clock import Clock

V = TypeVar("V")

SWEEP_PER_PUT = 2  # expired entries dropped per store: more than one, so a backlog drains
MIN_REBUILD = 1024  # the expiry heap is rebuilt past 2 x max(entries, this)


class ExpiringCache(Generic[V]):
    """A bounded map from token hash to a value with its own expiry (epoch seconds)."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._max = max_entries
        self._clock = clock
        self._data: OrderedDict[bytes, tuple[V, float]] = OrderedDict()
        self._expiry: list[tuple[float, bytes]] = []  # a min-heap: when each stored key comes due

    def get(self, key: bytes) -> V | None:
        """The value, if present and not yet expired."""
        entry = self._data.get(key)
        if entry is None:
            return None
        if self._clock.now() >= entry[1]:
            self._data.pop(key, None)
            return None
        return entry[0]

    def put(self, key: bytes, value: V, expires_at: float) -> None:
        """Stores a value until `expires_at`, evicting the oldest entry when full."""
        now = self._clock.now()
        if self._max <= 0 or expires_at <= now:
            return
        data, due = self._data, self._expiry
        for _ in range(SWEEP_PER_PUT):
            if not due or due[0][0] > now:
                break
            old = heapq.heappop(due)[1]
            entry = data.get(old)
            if entry is not None and entry[1] <= now:  # not a stale row of a key stored again since
                del data[old]
        if key not in data and len(data) >= self._max:
            data.popitem(last=False)
        data[key] = (value, expires_at)
        heapq.heappush(due, (expires_at, key))
        if len(due) > 2 * max(len(data), MIN_REBUILD):
            self._expiry = [(entry[1], k) for k, entry in data.items()]
            heapq.heapify(self._expiry)

    def discard(self, key: bytes) -> None:
        """Removes an entry."""
        self._data.pop(key, None)

    def clear(self) -> None:
        """Removes everything."""
        self._data.clear()
        self._expiry.clear()

    def __len__(self) -> int:
        return len(self._data)
