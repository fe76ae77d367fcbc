"""CPython's cyclic garbage collector in a serving worker: how much young garbage a collection takes at a
time, and which objects no collection walks again.

* Young threshold 2,000 (CPython's default 700). At 700, every first-seen token's long-lived cache entries
  set off a collection every ~20 checks and the older generations, which walk the whole cache, ran often
  too (~60 us of CPU per first-seen ES256 check, docs/BENCHMARKS.md). 20,000 fixed that but made each young
  collection long: grpc.aio leaves 3 objects in a reference cycle per call (its `_find_method_handler`
  closure; the no-op on the same stack leaves the same), so a worker paused 3-6 ms of CPU every ~6,700
  gRPC calls, a tail the no-op at 700 (0.2 ms every ~230 calls) does not have. At 2,000: 0.4-0.6 ms every
  ~670 calls.
* Once serving, the start-up heap (modules, settings, keys: a full collection of it cost 40-60 ms of CPU)
  goes to the permanent generation (`gc.freeze`): the older generations walk only what came after.
* What came after is mostly the token caches (100,000 entries each by default), and a full collection walks
  every tracked object in them while the worker waits: the fewer per entry, the shorter that pause. So a
  verified token's record is three tracked objects (`Admitted`, its `Principal` and its `Decision`, slotted
  with no `__dict__`; no entry tuple in `ExpiringCache`, no `Credential` tuple), and a refused token's one
  (`Refused`: equal refusals are one shared error, `pipeline._held`). A full collection over 100,000 cached
  tokens took ~300 ms of CPU with six per token, ~115 ms with three (docs/BENCHMARKS.md, "Cache records
  the collector walks"). Freezing after each full collection would remove the pause, but cyclic garbage
  frozen with it (a closed connection's protocol and transport) would never be freed: not done.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 2_000


def tune() -> None:
    """Before start-up: the young threshold (the older generations' as CPython's)."""
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def settle() -> None:
    """Once serving: start-up's garbage collected, what survived moved out of every later collection's way."""
    gc.collect()
    gc.freeze()
