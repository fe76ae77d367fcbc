"""The clock, injected everywhere time matters, so tests can move it and nothing reads time on its own."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock seconds (for token claims) and monotonic seconds (for deadlines and TTLs)."""

    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    """The real clock."""

    now = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)


class FrozenClock:
    """A clock that moves only when told to (tests)."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self._now = now
        self._mono = 1000.0

    def now(self) -> float:
        """The frozen wall time."""
        return self._now

    def monotonic(self) -> float:
        """The frozen monotonic time."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Moves both clocks forward."""
        self._now += seconds
        self._mono += seconds
