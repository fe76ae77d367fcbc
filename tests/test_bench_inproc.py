"""bench.inproc's collector clock: the GC CPU it reports is the timed rounds' only."""

from __future__ import annotations

import gc

from bench.inproc import _GcClock


def test_the_gc_clock_counts_the_collections_made_while_it_is_on_only() -> None:
    """Fails if the callback times collections while `on` is False (the raw loop's, start-up's)."""
    clock = _GcClock()
    try:
        gc.collect(0)
        assert clock.count == [0, 0, 0] and clock.spent == [0.0, 0.0, 0.0]
        clock.on = True
        gc.collect(1)
        clock.on = False
        gc.collect(1)
        assert clock.count == [0, 1, 0] and clock.spent[1] >= 0.0
        assert clock.report(1).startswith("GC ") and "gen1: 1 collections" in clock.report(1)
        assert "gen0" not in clock.report(1)
    finally:
        gc.callbacks.remove(clock._callback)
