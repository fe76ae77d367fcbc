"""verifier.workers: a stop signal sent while a worker starts is held until the worker can drain.

A SIGTERM that reaches a freshly forked worker before its event loop's handlers exist used to kill it
mid-start-up (or run the supervisor's handler in the child): a stop during a restart or reload then
skipped the drain. The supervisor blocks the stop signals across the fork; the worker takes them once
it can handle them (`accept_stop_signals`).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

from verifier.settings import Settings
from verifier.workers import Supervisor, accept_stop_signals

SETTINGS = Settings(grpc=None, http=None, metrics=None, issuers=())


def test_a_stop_signal_sent_during_start_up_is_handled_once_the_worker_can_drain(tmp_path: Path) -> None:
    marker = tmp_path / "worker"

    def run_worker(settings: Settings, index: int, fd: int, sockets: list[socket.socket], successor: bool) -> None:
        time.sleep(0.5)  # start-up: no handler of the worker's own yet
        stops: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, _frame: stops.append(signum))
        accept_stop_signals()
        marker.write_text("drained" if stops == [signal.SIGTERM] else f"stops={stops}")

    supervisor = Supervisor(SETTINGS, lambda: SETTINGS, run_worker)
    pid, ready_fd = supervisor._spawn(SETTINGS, 0)
    os.close(ready_fd)
    os.kill(pid, signal.SIGTERM)  # at once: inside the worker's start-up
    _, status = os.waitpid(pid, 0)

    assert not os.WIFSIGNALED(status), f"the worker was killed by signal {os.WTERMSIG(status)} while starting"
    assert os.WEXITSTATUS(status) == 0
    assert marker.read_text() == "drained"


def test_the_supervisor_keeps_taking_signals_after_a_fork() -> None:
    supervisor = Supervisor(SETTINGS, lambda: SETTINGS, lambda settings, index, fd, sockets, successor: None)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    pid, ready_fd = supervisor._spawn(SETTINGS, 0)
    os.close(ready_fd)
    os.waitpid(pid, 0)
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
