"""support.StallMeter: a process held still counts, from the moment the meter is entered.

Only lower bounds: a runner's own stalls only add to what the meter counts, so these cannot fail on a loaded
machine. That the code's own work does not count (a thread computing or blocked) was checked by hand: a 1 s busy
loop and a 1 s blocking sleep counted 0.0 s; a test of it would fail whenever the runner stalls.
"""

from __future__ import annotations

import ctypes
import time

from support import StallMeter

# ctypes.PyDLL keeps the GIL across the call: usleep through it stops every Python thread, as a stalled runner does.
_HOLD_GIL = ctypes.PyDLL(None).usleep


def test_a_process_held_still_counts() -> None:
    with StallMeter() as machine:
        time.sleep(0.05)
        _HOLD_GIL(300_000)
        time.sleep(0.05)
    assert machine.late >= 0.25, machine.late


def test_a_stall_while_the_meter_starts_counts() -> None:
    meter = StallMeter()
    with meter:
        _HOLD_GIL(300_000)  # the meter's thread may not have run yet
    assert meter.late >= 0.25, meter.late
