"""An opt-in pytest plugin that stalls the test process the way a loaded CI runner does, to find timing bounds
that only hold on a quiet machine.

    PYTHONPATH=tests python -m pytest -p stalls --stalls=0.3 tests/doors/test_deadline.py

A daemon thread holds the GIL for up to `--stalls` seconds (uniformly drawn) at random moments (every 0 to
`--stalls-every` seconds): every Python thread of the process, the event loop included, stops for that long, as
when the runner's scheduler gives the CPU to someone else. The C parts that run without the GIL (gRPC's core,
the kernel's sockets, the servers the rigs start in other processes) go on, which is the hard case for a test
that times one side with a clock the other side does not share. Off unless `--stalls` is given.
"""

from __future__ import annotations

import ctypes
import random
import threading

import pytest

# ctypes.PyDLL keeps the GIL across the foreign call (ctypes.CDLL releases it): usleep through it holds every
# Python thread of the process still for exactly that long.
_LIBC = ctypes.PyDLL(None)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stalls", "stall injection (a loaded runner)")
    group.addoption("--stalls", type=float, default=0.0, help="hold the GIL up to this many seconds at random")
    group.addoption("--stalls-every", type=float, default=1.0, help="at most this many seconds between stalls")
    group.addoption("--stalls-seed", type=int, default=None, help="seed of the stalls' random draws")


def _stall_forever(most: float, every: float, draws: random.Random, stop: threading.Event) -> None:
    while not stop.wait(draws.uniform(0.0, every)):
        _LIBC.usleep(int(draws.uniform(0.0, most) * 1e6))


def pytest_configure(config: pytest.Config) -> None:
    most = config.getoption("--stalls")
    if most <= 0:
        return
    stop = threading.Event()
    draws = random.Random(config.getoption("--stalls-seed"))
    worker = threading.Thread(
        target=_stall_forever,
        args=(most, config.getoption("--stalls-every"), draws, stop),
        daemon=True,
        name="stalls",
    )
    worker.start()
    config.add_cleanup(stop.set)
