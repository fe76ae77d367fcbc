"""``--memdebug``: what grows inside the verifier's serving worker during a soak (a diagnosis aid).

The soak puts this folder first on the verifier's PYTHONPATH and sets ``BENCH_MEMDEBUG=<file>``; Python
imports ``sitecustomize`` at start-up, and this one registers a fork hook: in each forked worker it
starts tracemalloc and a daemon thread that every ``BENCH_MEMDEBUG_INTERVAL`` seconds (default 60)
appends one JSON line to the file: the worker's VmRSS, tracemalloc's traced total, the biggest
allocation-site growths since the previous and since the first report, the object counts by type that
grew (``gc.get_objects``), and the size of every dict/set/deque/list the collector tracks that holds
more than 1,000 items, named by the attribute that refers to it.

tracemalloc slows the worker (every allocation is recorded) and adds its own memory: read the
traced totals and the growths, not the worker's RSS, in a ``--memdebug`` run.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import threading
import time
import tracemalloc
from typing import Any

FRAMES = 8
TOP = 15


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _owner_names(obj: Any) -> list[str]:
    """``Type.attr`` for the objects whose ``__dict__`` refers to ``obj`` (at most three)."""
    names = []
    for ref in gc.get_referrers(obj):
        if isinstance(ref, dict):
            for holder in gc.get_referrers(ref):
                if getattr(holder, "__dict__", None) is ref:
                    attrs = [k for k, v in ref.items() if v is obj]
                    names += [f"{type(holder).__qualname__}.{a}" for a in attrs]
        elif hasattr(type(ref), "__slots__"):
            names += [f"{type(ref).__qualname__}.{s}" for s in type(ref).__slots__ if getattr(ref, s, None) is obj]
        if len(names) >= 3:
            break
    return names[:3] or ["?"]


def _report(out: str, first: tracemalloc.Snapshot, prev: tracemalloc.Snapshot, counts0: Any) -> Any:
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    objs = gc.get_objects()
    counts = collections.Counter(type(o).__qualname__ for o in objs)
    big = [
        {"type": type(o).__name__, "len": len(o), "owner": _owner_names(o)}
        for o in objs
        if isinstance(o, dict | set | list | collections.deque | collections.OrderedDict) and len(o) > 1000
    ]
    del objs

    def top(base: tracemalloc.Snapshot) -> list[dict[str, Any]]:
        return [
            {"kib": round(s.size_diff / 1024, 1), "count": s.count_diff, "where": s.traceback.format()[-2 * FRAMES :]}
            for s in snap.compare_to(base, "traceback")[:TOP]
        ]

    grown = {k: (v, v - counts0.get(k, 0)) for k, v in counts.items() if v - counts0.get(k, 0) > 100}
    line = {
        "t": time.time(),
        "rss_kib": _rss_kib(),
        "traced_kib": tracemalloc.get_traced_memory()[0] // 1024,
        "top_since_previous": top(prev),
        "top_since_first": top(first),
        "types_grown_since_first": dict(sorted(grown.items(), key=lambda kv: -kv[1][1])[:TOP]),
        "big_containers": sorted(big, key=lambda b: -int(b["len"]))[:TOP],
    }
    with open(out, "a") as fh:
        fh.write(json.dumps(line) + "\n")
    return snap, counts


def _watch(out: str, interval: float) -> None:
    tracemalloc.start(FRAMES)
    first = prev = tracemalloc.take_snapshot()
    counts0: Any = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    while True:
        time.sleep(interval)
        try:
            prev, _ = _report(out, first, prev, counts0)
        except Exception as exc:  # a diagnosis aid must not take the worker down
            with open(out, "a") as fh:
                fh.write(json.dumps({"error": repr(exc)}) + "\n")


def _in_child() -> None:
    out = os.environ["BENCH_MEMDEBUG"]
    interval = float(os.environ.get("BENCH_MEMDEBUG_INTERVAL", "60"))
    threading.Thread(target=_watch, args=(out, interval), name="bench-memdebug", daemon=True).start()


if os.environ.get("BENCH_MEMDEBUG"):
    os.register_at_fork(after_in_child=_in_child)
