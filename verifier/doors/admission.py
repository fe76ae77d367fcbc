"""Early refusal at the forward-auth door: how long the event loop has been busy without a break.

Under a flood of connections a request waits in its socket until the loop gets to it, behind every other
ready connection; nothing tells its age (the kernel keeps none we can read), but the loop's own clock gives
a lower bound. libuv runs the due timers, then polls once and calls every ready connection's callback: a
timer re-armed every `EVERY` seconds marks when the loop last came round, and a request read later in the
same run of callbacks was already waiting when that run began. `LoopClock.busy()` is that wait. The timer
runs while requests come (it stops after `QUIET` seconds without one; the next request restarts it).

The forward-auth door turns away, past `http.shed_after_seconds` of it, the work that costs (a token no
cache knows needs a signature check): 503 with Retry-After, at about the cost of reading the request, so
the loop comes round again soon and what it serves is still answered in time. Cached answers cost what a
refusal costs, so they are still served. Never an allow: a shed request is refused.
"""

from __future__ import annotations

import asyncio

EVERY = 0.01  # seconds between the timer's marks: `busy()` overstates by at most this much
# Seconds without a request read after which the timer stops: an idle verifier does not wake its loop 100 times
# a second for nothing (~1% of a core). The next request starts it again and counts as the loop coming round,
# so only the requests read in that first run of callbacks after a quiet spell are not judged by their wait.
QUIET = 2.0


class LoopClock:
    """Seconds since the running loop last ran its timers (0.0 until started)."""

    __slots__ = ("_asked", "_handle", "_loop", "_mark")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._mark = 0.0
        self._asked = 0.0  # when `busy()` was last called (a request read)

    def start(self) -> None:
        """Starts marking on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._asked = self._loop.time()
        self._tick()

    def stop(self) -> None:
        """Stops the timer (the door is closing)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._loop = None

    @property
    def ticking(self) -> bool:
        """Whether the timer is armed (it stops after `QUIET` seconds without a request)."""
        return self._handle is not None

    def _tick(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._mark = now = loop.time()
        self._handle = loop.call_at(now + EVERY, self._tick) if now - self._asked < QUIET else None

    def busy(self) -> float:
        """How long the loop has been in its current run of callbacks (at least; up to `EVERY` more)."""
        loop = self._loop
        if loop is None:
            return 0.0
        self._asked = now = loop.time()
        if self._handle is None:  # stopped after a quiet spell: the loop comes round from it now
            self._tick()
        return now - self._mark
