"""The event loop an object keeps between calls instead of asking for it each time (#24 goal 7)."""

from __future__ import annotations

import asyncio


def kept(loop: asyncio.AbstractEventLoop | None) -> asyncio.AbstractEventLoop:
    """`loop` while it runs; else (none kept yet, or a test's previous loop) the running loop, asked: on CPython
    3.11 `asyncio.get_running_loop()` is a getpid() system call, which the per-token paths pay once, not per call."""
    if loop is None or not loop.is_running():
        return asyncio.get_running_loop()
    return loop
