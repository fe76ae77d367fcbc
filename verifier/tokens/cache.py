"""Bounded caches keyed by a token's SHA-256, whose entries never outlive their own expiry.

Plain dicts with first-in-first-out eviction: a lookup is one dict probe and one comparison, which
matters on the hot path, and a flood of distinct tokens can only push out the oldest entries, never
grow memory past the bound. Each store also drops expired entries from the old end (at most
`SWEEP_PER_PUT`), so a cache whose entries share one lifetime (the refused-token cache) holds only live
entries once the stores go on, instead of keeping the dead ones until they are pushed out or looked up.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from verifier.clock import Clock

V = TypeVar("V")

SWEEP_PER_PUT = 2  # expired oldest entries dropped per store: more than one, so a backlog drains


class ExpiringCache(Generic[V]):
    """A bounded map from token hash to a value with its own expiry (epoch seconds)."""

    def __init__(self, max_entries: int, clock: Clock) -> None:
        self._max = max_entries
        self._clock = clock
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
        if key not in data and len(data) >= self._max:
            del data[next(iter(data))]
        data[key] = (value, expires_at)

    def discard(self, key: bytes) -> None:
        """Removes an entry."""
        self._data.pop(key, None)

    def clear(self) -> None:
        """Removes everything."""
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
