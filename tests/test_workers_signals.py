"""verifier.workers: a stop signal sent while a worker starts is held until the worker can drain.

A SIGTERM that reaches a freshly forked worker before its event loop's handlers exist used to kill it
mid-start-up (or run the supervisor's handler in the child): a stop during a restart or reload then
skipped the drain. The supervisor blocks the stop signals across the fork; the worker takes them once
it can handle them (`accept_stop_signals`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from verifier import workers
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


def _started(supervisor: Supervisor, count: int) -> Supervisor:
    """`supervisor` with workers 0 .. count-1 forked on its running configuration, each SERVING (no `run` loop)."""
    supervisor._retired = []
    for index in range(count):
        pid, fd = supervisor._spawn(supervisor.settings, index)
        assert supervisor._await_ready(pid, fd, 5.0)
    return supervisor


def test_a_reload_that_fails_on_a_later_worker_leaves_every_worker_on_one_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 0's successor comes up on the new configuration, worker 1's never does: the reload fails
    ("keeping the old configuration"), so worker 0 must not stay on the new one beside worker 1 on the
    old (and go back to the old one unannounced at its next restart). A reload that removes an issuer or
    narrows a policy applies to every worker or to none."""
    monkeypatch.setattr(workers, "READY_TIMEOUT_SECONDS", 1.0)
    old = dataclasses.replace(SETTINGS, workers=2, realm="old")
    new = dataclasses.replace(SETTINGS, workers=2, realm="new")

    def run_worker(settings: Settings, index: int, fd: int, sockets: list[socket.socket], successor: bool) -> None:
        (tmp_path / str(os.getpid())).write_text(settings.realm)
        accept_stop_signals()
        if not (settings.realm == "new" and index == 1):  # worker 1 never gets ready on the new config
            os.write(fd, b"1")
        while True:
            time.sleep(1)  # serving until SIGTERM/SIGKILL

    supervisor = _started(Supervisor(old, lambda: new, run_worker), 2)
    try:
        supervisor._do_reload()
        deadline = time.monotonic() + 5
        while not all((tmp_path / str(pid)).exists() for pid in supervisor.children):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        running = {index: (tmp_path / str(pid)).read_text() for pid, index in supervisor.children.items()}
        assert sorted(running) == [0, 1]
        assert set(running.values()) == {supervisor.settings.realm}, running
    finally:
        for pid in [*supervisor.children, *supervisor._retired]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _kill_all(supervisor: Supervisor) -> None:
    for pid in [*supervisor.children, *supervisor._retired]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def _running(tmp_path: Path, supervisor: Supervisor) -> list[tuple[int, str]]:
    """(index, configuration) of every worker the supervisor runs, once each has said which it runs."""
    deadline = time.monotonic() + 5
    while not all((tmp_path / str(pid)).exists() for pid in supervisor.children):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return sorted((index, (tmp_path / str(pid)).read_text()) for pid, index in supervisor.children.items())


def _stopped_cleanly(pid: int, within: float) -> None:
    """SIGTERM to the supervisor process `pid`: it exits 0 within `within` seconds."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + within
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        assert time.monotonic() < deadline, "the supervisor did not stop in time"
        time.sleep(0.05)
    assert os.WIFEXITED(done[1]) and os.WEXITSTATUS(done[1]) == 0


def _reaped(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@pytest.mark.parametrize("crashing", ["old", "new"])
def test_a_worker_that_crashes_during_a_reload_comes_back_on_the_configuration_its_index_ends_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crashing: str
) -> None:
    """While worker 1's successor starts, a worker crashes: worker 0 already on the new configuration
    ("new"), or worker 2 not yet replaced ("old"). The supervisor restarted it on the old configuration
    and the reload went on from the pids it listed first: the restarted worker was never replaced, so it
    served the old configuration (a removed issuer, a narrowed policy) beside the new ones until it next
    died, one index with two workers. After the reload, every index has one worker, on the new one."""
    monkeypatch.setattr(workers, "RESTART_BACKOFF_SECONDS", 0.0)
    old = dataclasses.replace(SETTINGS, workers=3, realm="old")
    new = dataclasses.replace(SETTINGS, workers=3, realm="new")
    victim = 0 if crashing == "new" else 2
    crash = tmp_path / "crash"

    def run_worker(settings: Settings, index: int, fd: int, sockets: list[socket.socket], successor: bool) -> None:
        (tmp_path / str(os.getpid())).write_text(settings.realm)
        accept_stop_signals()
        if settings.realm == "new" and index == 1:  # slow to start: the crash comes meanwhile
            crash.write_text("")
            time.sleep(0.8)
        os.write(fd, b"1")
        while True:
            time.sleep(0.02)
            if index == victim and settings.realm == crashing:
                with contextlib.suppress(FileNotFoundError):
                    crash.unlink()
                    os._exit(1)  # once

    supervisor = _started(Supervisor(old, lambda: new, run_worker), 3)
    try:
        supervisor._do_reload()
        assert not crash.exists(), "the worker did not crash during the reload"
        assert supervisor.settings.realm == "new"
        assert _running(tmp_path, supervisor) == [(0, "new"), (1, "new"), (2, "new")]
    finally:
        _kill_all(supervisor)


def test_a_worker_that_crashes_at_every_start_is_restarted_ever_more_slowly_and_stop_is_not_held_up(
    tmp_path: Path,
) -> None:
    """A worker that can never start (its state file unreadable, a port taken after the check) was restarted
    once a second, forever: a fork, a start-up and a traceback every second per worker. The delay now doubles
    after each start that did not last (1, 2, 4 s ... up to MAX_RESTART_BACKOFF_SECONDS), and a SIGTERM
    while a restart is pending stops the supervisor at once."""
    starts = tmp_path / "starts"

    def run_worker(settings: Settings, index: int, fd: int, sockets: list[socket.socket], successor: bool) -> None:
        with starts.open("a") as out:
            out.write(f"{time.monotonic()}\n")
        raise RuntimeError("cannot start")

    pid = os.fork()
    if pid == 0:  # the supervisor, in a process of its own (signal handlers need a main thread)
        code = 1
        try:
            code = Supervisor(SETTINGS, lambda: SETTINGS, run_worker).run()
        finally:
            os._exit(code)
    try:
        time.sleep(5.5)
        assert len(starts.read_text().splitlines()) <= 4, starts.read_text()  # 0, 1, 3 (and 7) s; not 6
        _stopped_cleanly(pid, within=1.5)  # SIGTERM does not wait for the pending restart
    finally:
        _reaped(pid)


def test_a_stop_during_a_reload_lets_the_new_worker_drain_as_the_others_do(tmp_path: Path) -> None:
    """SIGTERM while a reload's new worker starts: the supervisor forwards it to every worker, the new one
    included, and then SIGKILLed the new one (not ready, so "failed") in the middle of its drain: the
    connections it had accepted were reset. It is now left to drain and waited for like the others."""
    old = dataclasses.replace(SETTINGS, realm="old")
    new = dataclasses.replace(SETTINGS, realm="new")

    def run_worker(settings: Settings, index: int, fd: int, sockets: list[socket.socket], successor: bool) -> None:
        stops: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, _frame: stops.append(signum))
        accept_stop_signals()
        if settings.realm == "old":
            os.write(fd, b"1")
        while not stops:
            time.sleep(0.02)
        time.sleep(0.5)  # the drain
        (tmp_path / settings.realm).write_text("drained")

    supervisor = _started(Supervisor(old, lambda: new, run_worker), 1)
    try:
        stopper = threading.Timer(0.3, supervisor._signal, (signal.SIGTERM, None))  # as the handler would
        stopper.start()
        supervisor._do_reload()
        stopper.join()
        deadline = time.monotonic() + 5
        while supervisor.children:
            supervisor._reap()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert (tmp_path / "old").exists() and (tmp_path / "new").read_text() == "drained"
    finally:
        _kill_all(supervisor)


def test_a_stop_sent_while_a_worker_is_forked_reaches_that_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor took its signals again right after the fork, before it had noted the new worker: a
    SIGTERM arriving then was forwarded to every worker but that one, which kept serving while the supervisor
    waited for it (a stop during a restart or a reload's start never finished)."""
    supervisor = Supervisor(SETTINGS, lambda: SETTINGS, lambda *_: None)
    real_fork = os.fork

    def fork_then_stop() -> int:
        pid = real_fork()
        if pid != 0:
            # To this thread, which blocks the stop signals across the fork: held until the supervisor takes them
            # again. (`os.kill` on the process could be taken by another thread of the test process, which does
            # not block them, and handled before the supervisor notes the worker: a flaky failure. The serving
            # supervisor runs one thread.)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        return pid

    def run_worker(settings: Settings, index: int, fd: int, sockets: list[socket.socket], successor: bool) -> None:
        stops: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, _frame: stops.append(signum))
        accept_stop_signals()
        deadline = time.monotonic() + 3
        while not stops and time.monotonic() < deadline:
            time.sleep(0.02)
        (tmp_path / "worker").write_text("stopped" if stops else "never told")

    supervisor._run_worker = run_worker
    monkeypatch.setattr(workers.os, "fork", fork_then_stop)
    previous = signal.signal(signal.SIGTERM, supervisor._signal)
    try:
        pid, fd = supervisor._spawn(SETTINGS, 0)
        os.close(fd)
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.setattr(workers.os, "fork", real_fork)
    os.waitpid(pid, 0)
    assert supervisor._stopping
    assert (tmp_path / "worker").read_text() == "stopped"


def test_a_reload_whose_loading_fails_unexpectedly_keeps_the_running_configuration(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a ConfigError was caught: any other exception from loading the file left the supervisor's loop,
    and the supervisor (and with it every worker) died on a SIGHUP."""

    def load() -> Settings:
        raise RuntimeError("something no one expected")

    supervisor = Supervisor(SETTINGS, load, lambda *_: None)
    supervisor._do_reload()
    assert supervisor.settings is SETTINGS
    (record,) = [r for r in caplog.records if getattr(r, "event", "") == "reload_refused"]
    assert "RuntimeError" in record.__dict__["error"]


def test_a_fork_that_fails_while_restarting_a_worker_is_tried_again_and_the_service_stays_up(tmp_path: Path) -> None:
    """A fork refused (EAGAIN under a pids limit) while a crashed worker was restarted left the supervisor's loop:
    the supervisor exited and every worker with it. The fork is now tried again on the back-off."""
    starts = tmp_path / "starts"

    def run_worker(settings: Settings, index: int, fd: int, sockets: list[socket.socket], successor: bool) -> None:
        with starts.open("a") as out:
            out.write(f"{time.monotonic()}\n")
        accept_stop_signals()
        os.write(fd, b"1")
        if len(starts.read_text().splitlines()) == 1:
            time.sleep(0.2)
            os._exit(1)  # the first worker crashes
        while True:
            time.sleep(0.05)

    pid = os.fork()
    if pid == 0:  # the supervisor, in a process of its own (signal handlers need a main thread)
        code = 1
        try:
            real_fork, forks = os.fork, [0]

            def fork_refused_once() -> int:
                forks[0] += 1
                if forks[0] == 2:  # the restart of the crashed worker
                    raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
                return real_fork()

            workers.os.fork = fork_refused_once  # type: ignore[assignment]  # this process only
            code = Supervisor(SETTINGS, lambda: SETTINGS, run_worker).run()
        finally:
            os._exit(code)
    try:
        deadline = time.monotonic() + 6
        while len(starts.read_text().splitlines() if starts.exists() else []) < 2:
            assert os.waitpid(pid, os.WNOHANG)[0] == 0, "the supervisor exited"
            assert time.monotonic() < deadline, "the crashed worker was not started again"
            time.sleep(0.05)
        _stopped_cleanly(pid, within=5.0)
    finally:
        _reaped(pid)


def test_a_fork_that_fails_during_a_reload_fails_the_reload_and_the_running_workers_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload whose successor cannot be forked is a failed reload: the old worker goes on serving on the running
    configuration (before, the OSError left the supervisor's loop and took the service down)."""
    old = dataclasses.replace(SETTINGS, workers=1, realm="old")
    new = dataclasses.replace(SETTINGS, workers=1, realm="new")

    def run_worker(settings: Settings, index: int, fd: int, sockets: list[socket.socket], successor: bool) -> None:
        (tmp_path / str(os.getpid())).write_text(settings.realm)
        accept_stop_signals()
        os.write(fd, b"1")
        while True:
            time.sleep(1)

    supervisor = _started(Supervisor(old, lambda: new, run_worker), 1)
    try:

        def refused() -> int:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

        monkeypatch.setattr(workers.os, "fork", refused)
        supervisor._do_reload()
        monkeypatch.undo()
        assert supervisor.settings.realm == "old"
        assert _running(tmp_path, supervisor) == [(0, "old")]
        assert supervisor._due == {}  # its worker runs: nothing to start
    finally:
        _kill_all(supervisor)
