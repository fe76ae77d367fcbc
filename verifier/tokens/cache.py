"""Bounded caches keyed by a token's SHA-256, whose entries never outlive their own expiry.

Plain dicts with first-in-first-out eviction: a lookup is one dict probe and one comparison, which
matters on the hot path, and a flood of distinct tokens can only push out the oldest entries, never
grow memory past the bound. Each store also drops expired entries from the old end (at most
`SWEEP_PER_PUT`), so a cache whose entries share one lifetime (the refused-token cache) holds only live
entries once the stores go on, instead of keeping the dead ones until they are pushed out or looked up.

Removing, replacing or pushing out a live entry bumps the `Generation` handed in: answers remembered
from it are stale (`verifier.generation`). An expired entry's answers expired with it: no bump.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from verifier.clock import Clock
from verifier.generation import Generation

V = TypeVar("V")

SWEEP_PER_PUT = 2  # expired oldest entries dropped per store: more than one, so a backlog drains


class ExpiringCache(Generic[V]):
    """A bounded map from token hash to a value with its own expiry (epoch seconds)."""

    def __init__(self, max_entries: int, clock: Clock, generation: Generation | None = None) -> None:
        self._max = max_entries
        self._clock = clock
        self._generation = generation or Generation()  # bumped when a live entry is removed or replaced
        self._data: dict[bytes, tuple[V, float]] = {}

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
        if self._max <= 0 or expires_at <= self._clock.now():
            return
        data = self._data
        now = self._clock.now()
        for _ in range(SWEEP_PER_PUT):
            oldest = next(iter(data), None)
            if oldest is None or data[oldest][1] > now:
                break
            del data[oldest]
        if key in data:
            self._generation.bump()  # replaced (a renewed identity assertion)
        elif len(data) >= self._max:
            del data[next(iter(data))]  # pushed out before its expiry: its token is judged afresh next time
            self._generation.bump()
        data[key] = (value, expires_at)

    def discard(self, key: bytes) -> None:
        """Removes an entry."""
        if self._data.pop(key, None) is not None:
            self._generation.bump()

    def clear(self) -> None:
        """Removes everything."""
        self._data.clear()
        self._generation.bump()

    def __len__(self) -> int:
        return len(self._data)
