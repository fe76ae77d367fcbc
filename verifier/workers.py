"""Multi-process serving: `workers: N` forks N copies of the verifier sharing its listening ports.

Each worker binds the same gRPC and HTTP addresses with SO_REUSEPORT, so the kernel spreads
connections across them; they share nothing but the optional Redis state. A worker's metrics
listener takes the configured port plus its index (Prometheus scrapes each worker). The parent
only supervises: it forwards SIGTERM/SIGINT, and restarts a worker that dies unexpectedly
(at most once per RESTART_BACKOFF_SECONDS per worker, so a crash loop does not spin).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

from verifier.settings import Listen, Settings

log = logging.getLogger("verifier.workers")

RESTART_BACKOFF_SECONDS = 1.0  # seconds between restarts of one worker


def settings_for_worker(settings: Settings, index: int) -> Settings:
    """The worker's own settings: its metrics port shifted by its index (port 0 stays 0)."""
    metrics = settings.metrics
    if metrics is not None and metrics.port != 0:
        metrics = Listen(host=metrics.host, port=metrics.port + index)
    return dataclasses.replace(settings, metrics=metrics)


def supervise(settings: Settings, count: int, run_worker: Callable[[Settings, int], None]) -> int:
    """Forks `count` workers running `run_worker(settings, index)` and supervises them until told to stop."""
    children: dict[int, int] = {}  # pid -> index
    last_start: dict[int, float] = {}
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 0
            try:
                run_worker(settings_for_worker(settings, index), index)
            except BaseException:
                log.exception("worker crashed", extra={"event": "worker_crashed", "worker": index})
                code = 1
            os._exit(code)
        children[pid] = index
        last_start[index] = time.monotonic()
        log.info("worker started", extra={"event": "worker_started", "worker": index, "pid": pid})

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(count):
        spawn(index)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        index = children.pop(pid)
        if stopping:
            continue
        log.warning("worker exited", extra={"event": "worker_exited", "worker": index, "status": status})
        wait = RESTART_BACKOFF_SECONDS - (time.monotonic() - last_start.get(index, 0.0))
        if wait > 0:
            time.sleep(wait)
        if not stopping:
            spawn(index)
    return 0
