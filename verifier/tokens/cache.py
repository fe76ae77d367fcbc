"""Bounded caches keyed by a token's SHA-256, whose entries never outlive their own expiry.

A plain dict: a lookup is one dict probe and one comparison, which matters on the hot path. Beside it,
a heap of (expiry, order of storing, key) rows says which entry comes due first:

- each store drops expired entries, soonest-due first (at most `SWEEP_PER_PUT`): entries live as long as
  their own token (the verified-token cache holds tokens of every lifetime), so an expired one may sit
  behind live ones in the order they were stored;
- a store into a full cache pushes out the entry due soonest (the oldest among equals, so a flood of
  refused tokens, which share one lifetime, pushes out the oldest first). Memory never grows past the
  bound. (Pushing out the dict's first entry instead left a hole at its front that every later
  `next(iter(...))` walked past: ~100 us a store at 100,000 entries.)

Values and their expiries are kept in two dicts under the same keys, not as one (value, expiry) tuple per
entry: a tuple holding a GC-tracked value is itself tracked, and the cyclic garbage collector walks every
tracked object each time it collects the generation it has reached; a full collection walks the whole cache
(a worker pauses for it). Floats are never tracked. See `verifier.gc_policy`.

The heap also holds stale rows (keys since stored again, discarded or looked up expired), skipped when
they come up, and is rebuilt from the entries when it outgrows twice their number, so it stays bounded.

Removing, replacing or pushing out a live entry bumps the `Generation` handed in: answers remembered
from it are stale (`verifier.generation`). An expired entry's answers expired with it: no bump.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from verifier.clock import Clock
from verifier.generation import Generation

V = TypeVar("V")

SWEEP_PER_PUT = 2  # expired entries dropped per store: more than one, so a backlog drains
MIN_REBUILD = 1024  # the heap is rebuilt past 2 x max(entries, this) rows


class ExpiringCache(Generic[V]):
    """A bounded map from token hash to a value with its own expiry (epoch seconds)."""

    def __init__(self, max_entries: int, clock: Clock, generation: Generation | None = None) -> None:
        self._max = max_entries
        self._clock = clock
        self._generation = generation or Generation()  # bumped when a live entry is removed or replaced
        self._data: dict[bytes, V] = {}
        self._expiry: dict[bytes, float] = {}  # the same keys as `_data`: each value's expiry
        self._due: list[tuple[float, int, bytes]] = []  # a min-heap of (expiry, order, key)
        self._order = itertools.count()

    def get(self, key: bytes) -> V | None:
        """The value, if present and not yet expired."""
        value = self._data.get(key)
        if value is None:
            return None
        if self._clock.now() >= self._expiry[key]:
            del self._data[key], self._expiry[key]
            return None
        return value

    def entries(self) -> Iterator[tuple[bytes, V, float]]:
        """(key, value, expiry) of every entry held, expired or not (for tests and tools)."""
        expiry = self._expiry
        return ((key, value, expiry[key]) for key, value in self._data.items())

    def put(self, key: bytes, value: V, expires_at: float) -> None:
        """Stores a value until `expires_at`; when full, the entry due soonest makes room."""
        now = self._clock.now()
        if self._max <= 0 or expires_at <= now:
            return
        data, expiry, due = self._data, self._expiry, self._due
        for _ in range(SWEEP_PER_PUT):
            if not due or due[0][0] > now:
                break
            self._drop(heapq.heappop(due))  # expired: no bump
        before = expiry.get(key)
        if before is not None:
            self._generation.bump()  # replaced (a renewed identity assertion)
        else:
            while len(data) >= self._max and due:
                if self._drop(heapq.heappop(due)):  # pushed out before its expiry: judged afresh next time
                    self._generation.bump()
        data[key] = value
        expiry[key] = expires_at
        if before != expires_at:  # else its row stands for it still
            heapq.heappush(due, (expires_at, next(self._order), key))
        if len(due) > 2 * max(len(data), MIN_REBUILD):
            self._due = [(at, next(self._order), k) for k, at in expiry.items()]  # in the order stored
            heapq.heapify(self._due)

    def _drop(self, row: tuple[float, int, bytes]) -> bool:
        """Removes the entry a heap row stands for, unless the row is stale (the key gone, or stored again with
        another expiry); True when it removed one."""
        key = row[2]
        if self._expiry.get(key) != row[0]:
            return False
        del self._data[key], self._expiry[key]
        return True

    def discard(self, key: bytes) -> None:
        """Removes an entry."""
        if self._data.pop(key, None) is not None:
            del self._expiry[key]
            self._generation.bump()

    def discard_where(self, condition: Callable[[V], bool]) -> int:
        """Removes every entry whose value meets `condition`; how many."""
        gone = [key for key, value in self._data.items() if condition(value)]
        for key in gone:
            del self._data[key], self._expiry[key]
        if gone:
            self._generation.bump()
        return len(gone)

    def clear(self) -> None:
        """Removes everything."""
        self._data.clear()
        self._expiry.clear()
        self._due.clear()
        self._generation.bump()

    def __len__(self) -> int:
        return len(self._data)
