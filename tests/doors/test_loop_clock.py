"""The forward-auth door's loop clock (`verifier.doors.admission.LoopClock`): it measures how long the loop has
been busy while requests come, and stops waking an idle loop (#24 goal 7: an idle verifier burnt ~1% of a core
on the 10 ms timer). Real event loop; the waits are on the loop's own clock, generous for a loaded machine."""

from __future__ import annotations

import asyncio
import time

from support import StallMeter

from verifier.doors import admission
from verifier.doors.admission import LoopClock


async def _quiet(clock: LoopClock, seconds: float) -> None:
    """Lets the loop idle (no `busy()` call) for `seconds`, then until the clock has stopped (30 s at most)."""
    await asyncio.sleep(seconds)
    deadline = time.monotonic() + 30
    while clock.ticking and time.monotonic() < deadline:
        await asyncio.sleep(admission.EVERY)


async def test_an_idle_door_stops_waking_its_loop_and_the_next_request_restarts_the_clock(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(admission, "QUIET", 0.2)
    clock = LoopClock()
    clock.start()
    try:
        assert clock.ticking
        await _quiet(clock, 0.2)
        assert not clock.ticking  # no timer armed: the loop sleeps until the next event
        assert clock.busy() < admission.EVERY  # a request after a quiet spell: the loop just came round
        assert clock.ticking
        time.sleep(0.1)  # the loop held busy: the request read now waited that long
        assert clock.busy() >= 0.1
    finally:
        clock.stop()


async def test_while_requests_come_the_clock_keeps_measuring_the_busy_loop(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(admission, "QUIET", 0.2)
    clock = LoopClock()
    clock.start()
    try:
        for _ in range(5):  # a request every 0.1 s: never quiet for QUIET
            with StallMeter() as machine:
                await asyncio.sleep(0.1)
                busy = clock.busy()
            # the loop idled: busy() is since its last timer (EVERY), not since the last request (0.1 s), unless a
            # loaded machine held the process between that timer and this call: less what it held
            assert busy - machine.late < 0.1, (busy, machine.late)
            assert clock.ticking
        time.sleep(0.15)
        assert clock.busy() >= 0.15
    finally:
        clock.stop()
    assert not clock.ticking and clock.busy() == 0.0
