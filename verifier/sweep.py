"""Deadlines timed by one event-loop timer for many (#24 goal 7).

A timer handle per deadline (`loop.call_at`, then `cancel()`) costs ~2.5 us on uvloop (the handle and its libuv
timer made, started, stopped and freed); deadlines that are nearly always cancelled, armed in the order they fall
due (one length for all: a pipeline's decision deadline, a client's exchange deadline), can share one timer,
armed for the oldest still pending. A `Sweep` queues them in that order; a finished one stays queued until it
reaches the front (dropped there when the next is armed, or when the timer fires); the timer, when it fires,
expires those due and re-arms for the next pending one. So each falls due within `GRAIN` of its time, as with a
timer of its own, and under a steady flow of deadlines of `s` seconds the timer fires about once per `s`.
"""

from __future__ import annotations

import asyncio
import collections

# A swept deadline falls due when the sweep runs within this of its time: the loop's timers have 1 ms grain, and
# the sweep re-arms for the next one rather than spin on a timer that came a fraction of a millisecond early.
GRAIN = 0.001


class Timed:
    """One deadline: `expire` is called once at `due` (the loop's clock), unless it is no longer `armed()`.
    Timed by its `Sweep`, or by a timer of its own (`handle`) when it cannot be (`Sweep.arm`); `disarm()` stops
    the latter."""

    __slots__ = ("due", "handle")

    def __init__(self, due: float) -> None:
        self.due = due
        self.handle: asyncio.TimerHandle | None = None

    def armed(self) -> bool:
        raise NotImplementedError

    def expire(self) -> None:
        raise NotImplementedError

    def disarm(self) -> None:
        handle = self.handle
        if handle is not None:
            self.handle = None
            handle.cancel()


class Sweep:
    """One loop's deadlines, timed by one timer (see the module docstring)."""

    __slots__ = ("_handle", "_loop", "_queue")

    def __init__(self) -> None:
        self._queue: collections.deque[Timed] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, loop: asyncio.AbstractEventLoop, timed: Timed) -> None:
        """Times ``timed`` on ``loop`` (the running loop). One due before the last queued, or armed while another
        loop that still runs has deadlines pending here, gets a timer of its own."""
        queue = self._queue
        while queue and not queue[0].armed():  # the finished ones at the front
            queue.popleft()
        if loop is not self._loop:
            held = self._loop
            if queue and held is not None and held.is_running():
                timed.handle = loop.call_at(timed.due, timed.expire)
                return
            queue.clear()  # a stopped loop's (a test's previous loop): nothing will run them
            self._loop, self._handle = loop, None
        if queue and timed.due < queue[-1].due:  # out of order (another length): its own timer
            timed.handle = loop.call_at(timed.due, timed.expire)
            return
        queue.append(timed)
        if self._handle is None:
            self._handle = loop.call_at(timed.due, self._sweep)

    def _sweep(self) -> None:
        self._handle = None
        loop = self._loop
        assert loop is not None
        now = loop.time() + GRAIN
        queue = self._queue
        while queue:
            head = queue[0]
            if head.armed():
                if head.due > now:
                    self._handle = loop.call_at(head.due, self._sweep)
                    return
                head.expire()
            queue.popleft()
