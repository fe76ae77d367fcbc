"""CPU time of a server process tree from /proc (proc(5): utime and stime, fields 14 and 15)."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out.extend(_descendants(int(child)))
    return out


def cpu_seconds(pids: tuple[int, ...] | list[int]) -> float:
    """User + system CPU seconds of ``pids`` and all their descendants (all threads included)."""
    total = 0
    for root in pids:
        for pid in _descendants(root):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 counting from 1)
    return total / _TICKS
