"""The clock, injected everywhere time matters, so tests can move it and nothing reads time on its own.

Tests use `FrozenClock` (tests/support.py), a clock that moves only when told to.
"""

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
