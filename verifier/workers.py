"""Process model: a small supervisor and N workers sharing the listening ports (SO_REUSEPORT).

- `workers: N` forks N copies of the verifier; the kernel spreads connections across them. They
  share nothing but the optional Redis state (so features needing shared state refuse N > 1
  without it) and, without Redis, the revocation file in `state.path` or in the directory
  `verifier serve` keeps for the supervisor's lifetime (a reloaded or restarted worker reads it
  back). A worker's metrics listener takes the configured port plus its index (Prometheus scrapes
  each worker); every worker binds the admin listener (`admin.listen`) on the one port, SO_REUSEPORT.
- The supervisor forwards SIGTERM/SIGINT (each worker drains and stops) and restarts a worker that
  dies unexpectedly: RESTART_BACKOFF_SECONDS after its start at the soonest, and a worker whose start
  did not last STABLE_SECONDS waits twice as long as the time before, up to MAX_RESTART_BACKOFF_SECONDS
  (a worker that can never start is not forked, started and logged once a second forever). The wait
  holds nothing up: signals, reloads and the other workers are handled meanwhile, and a reload starts
  a waiting index's worker on the new configuration at once.
- SIGHUP reloads the configuration: the file is read and validated first; if it is invalid the
  error is logged and the running workers keep the old configuration. If it is valid, workers are
  replaced one at a time: the new one starts beside the old one on the same ports, accepts nothing
  on the forward-auth sockets before it reports SERVING (its keys and revocation entries are loaded),
  and only then is the old one told to drain and stop. A new worker that does not become ready in
  time is stopped and the old one kept, and the workers already replaced are put back on the old
  configuration the same way: every worker runs one configuration. A worker that dies during a reload
  comes back on the configuration its index is on (the new one once replaced; else the running one,
  and is then replaced in its turn). Listener addresses are shared,
  so a changed listen address takes effect only on a full restart.
- The forward-auth door's listening sockets are bound here, once, before any fork: one set per
  worker index (SO_REUSEPORT, so the kernel still spreads connections over the workers), kept
  open by the supervisor for its lifetime (as nginx's master keeps its `reuseport` sockets). A
  worker's successor on SIGHUP, and its replacement after a crash, accept on the same sockets, so
  the connections queued on them when the old worker stops are answered, not reset; while no
  worker runs for an index, its connections wait in the queue. (gRPC's server binds its own
  ports: a gRPC client reconnects.)
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from verifier.doors.acceptor import listening_sockets
from verifier.settings import ConfigError, Settings

log = logging.getLogger("verifier.workers")

RESTART_BACKOFF_SECONDS = 1.0  # seconds between a worker's start and its restart, at first
MAX_RESTART_BACKOFF_SECONDS = 30.0  # seconds: the longest wait of a worker that keeps crashing
STABLE_SECONDS = 30.0  # a worker that ran this long is restarted after RESTART_BACKOFF_SECONDS again
READY_TIMEOUT_SECONDS = 30.0  # a reloaded worker must report SERVING within this long
POLL_SECONDS = 0.1  # how often the supervisor looks at its children and signals

# (settings, index, ready_fd, http sockets, successor): a reload's successor accepts only once SERVING
RunWorker = Callable[[Settings, int, int, list[socket.socket], bool], None]
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def accept_stop_signals() -> None:
    """Delivers the stop signals a worker held while starting: call once its handlers are installed."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def bind_http(settings: Settings) -> list[list[socket.socket]]:
    """The forward-auth door's listening sockets, one set per worker index (none without `http`). Port 0
    binds the first set to a free port and the others to the same one: the workers share a port."""
    if settings.http is None:
        return [[] for _ in range(settings.workers)]
    host, port = settings.http.host, settings.http.port
    bound: list[list[socket.socket]] = []
    try:
        for _ in range(settings.workers):
            sockets = listening_sockets(host, port, reuse_port=True)
            bound.append(sockets)
            port = port or int(sockets[0].getsockname()[1])
    except OSError:
        for sockets in bound:
            for sock in sockets:
                sock.close()
        raise
    return bound


def settings_for_worker(settings: Settings, index: int) -> Settings:
    """The worker's own settings: its metrics port shifted by its index (port 0 stays 0), its TLS kept."""
    metrics = settings.metrics
    if metrics is not None and metrics.port != 0:
        metrics = dataclasses.replace(metrics, port=metrics.port + index)
    return dataclasses.replace(settings, metrics=metrics)


class Supervisor:
    """Starts, watches, reloads and stops the workers."""

    def __init__(self, settings: Settings, load: Callable[[], Settings], run_worker: RunWorker) -> None:
        self.settings = settings
        self._load = load
        self._run_worker = run_worker
        self.children: dict[int, int] = {}  # pid -> index
        self._last_start: dict[int, float] = {}
        self._backoff: dict[int, float] = {}  # index -> its current restart delay (doubles in a crash loop)
        self._due: dict[int, float] = {}  # index -> when its restart is due (monotonic): no worker runs for it
        self._stopping = False
        self._reload = False
        self._http_sockets: list[list[socket.socket]] = []  # per worker index, bound in `run`
        # During a reload: the configuration being rolled out and the indexes already on it (a worker of one
        # of them that dies meanwhile comes back on it; any other on the running configuration, replaced later).
        self._moving: tuple[Settings, set[int]] | None = None

    def _spawn(self, settings: Settings, index: int, *, successor: bool = False) -> tuple[int, int]:
        """Forks a worker; returns its pid and the read end of its readiness pipe. A `successor` (a reload's
        new worker, beside the old one that still answers) accepts no connection before it is SERVING; a first
        worker or a crashed one's replacement accepts at once (nobody else would answer; until SERVING, 503).

        The stop signals are blocked across the fork: a SIGTERM sent while the worker starts (a stop
        during a restart or reload) stays pending until the worker can drain (`accept_stop_signals`),
        instead of running the supervisor's handler in the child or killing it mid-start-up.
        """
        read_fd, write_fd = os.pipe()
        supervisor = os.getpid()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            os.close(read_fd)
            os.close(write_fd)
            raise
        if pid == 0:  # the worker
            os.close(read_fd)
            _die_with_parent(supervisor)
            for other, sockets in enumerate(self._http_sockets):
                if other != index:  # this process's copies only: the supervisor keeps them open
                    for sock in sockets:
                        sock.close()
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            code = 0
            try:
                sockets = self._http_sockets[index] if index < len(self._http_sockets) else []
                self._run_worker(settings_for_worker(settings, index), index, write_fd, sockets, successor)
            except BaseException:  # a worker must never return into the supervisor's loop
                log.exception("worker crashed", extra={"event": "worker_crashed", "worker": index})
                code = 1
            os._exit(code)
        os.close(write_fd)
        self.children[pid] = index  # before the signals are taken again: a stop sent meanwhile reaches it too
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self._last_start[index] = time.monotonic()
        log.info("worker started", extra={"event": "worker_started", "worker": index, "pid": pid})
        return pid, read_fd

    def _signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
            return
        self._stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _reap(self) -> list[tuple[int, int]]:
        """Collects exited children: (pid, index) of each."""
        gone = []
        while self.children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in self.children:
                gone.append((pid, self.children.pop(pid)))
        return gone

    def _await_ready(self, pid: int, read_fd: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([read_fd], [], [], POLL_SECONDS)
                if ready:
                    return os.read(read_fd, 1) == b"1"
                if pid not in self.children or self._stopping:
                    return False
                self._restart_dead(self._reap())
            return False
        finally:
            os.close(read_fd)

    def _settings_for(self, index: int) -> Settings:
        """The configuration worker `index` runs: the reload's for an index already moved, else the running one."""
        if self._moving is not None and index in self._moving[1]:
            return self._moving[0]
        return self.settings

    def _pid_of(self, index: int) -> int | None:
        return next((pid for pid, at in self.children.items() if at == index), None)

    def _restart_dead(self, gone: list[tuple[int, int]]) -> None:
        """Schedules the restart of each worker gone (none while stopping), then starts those due."""
        now = time.monotonic()
        for pid, index in gone:
            if self._stopping:
                continue
            started = self._last_start.get(index, 0.0)
            if now - started >= STABLE_SECONDS:
                delay = RESTART_BACKOFF_SECONDS
            else:
                delay = min(2 * self._backoff.get(index, RESTART_BACKOFF_SECONDS / 2), MAX_RESTART_BACKOFF_SECONDS)
            self._backoff[index] = delay
            due = started + delay
            restart_in = round(max(due - now, 0.0), 3)
            log.warning(
                "worker exited",
                extra={"event": "worker_exited", "worker": index, "pid": pid, "restart_in": restart_in},
            )
            if self._pid_of(index) is None:  # else a reload's successor for this index runs: it takes over
                self._due[index] = due
        self._start_due()

    def _start_due(self) -> None:
        now = time.monotonic()
        for index, due in sorted(self._due.items()):
            if self._stopping:
                return
            if due <= now:
                del self._due[index]
                self._start(self._settings_for(index), index)

    def _start(self, settings: Settings, index: int) -> None:
        """Forks worker `index`; a fork that fails (EAGAIN under a pids limit, ENOMEM) is tried again later, on the
        crash loop's back-off, instead of leaving the supervisor's loop: that stopped the supervisor and so every
        worker, the service down for want of one more process."""
        try:
            _, fd = self._spawn(settings, index)
        except OSError as exc:
            self._fork_failed(index, exc)
            return
        os.close(fd)

    def _fork_failed(self, index: int, exc: OSError) -> None:
        """Schedules another start of worker `index` after a failed fork, each wait twice the last (to the max)."""
        delay = min(2 * self._backoff.get(index, RESTART_BACKOFF_SECONDS / 2), MAX_RESTART_BACKOFF_SECONDS)
        self._backoff[index] = delay
        log.error(
            "worker could not be started: fork failed",
            extra={"event": "worker_fork_failed", "worker": index, "error": str(exc), "restart_in": delay},
        )
        if not self._stopping and self._pid_of(index) is None:
            self._due[index] = time.monotonic() + delay

    def _do_reload(self) -> None:
        self._reload = False
        try:
            new = self._load()
        except Exception as exc:  # whatever is wrong with the file, the running workers stay
            # (anything but a ConfigError left the supervisor's loop: the supervisor and its workers died)
            error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__} while loading: {exc}"
            log.error(
                "reload refused: the new configuration is invalid; keeping the old one",
                extra={"event": "reload_refused", "error": error},
            )
            return
        if (new.grpc, new.http, new.workers) != (self.settings.grpc, self.settings.http, self.settings.workers):
            log.warning(
                "listen addresses or worker count changed: they take effect on restart",
                extra={"event": "reload_partial"},
            )
            new = dataclasses.replace(
                new, grpc=self.settings.grpc, http=self.settings.http, workers=self.settings.workers
            )
        moved: set[int] = set()  # the indexes already on the new configuration
        self._moving = (new, moved)
        try:
            for index in range(self.settings.workers):
                # the worker running now: one that died since the reload began was restarted (on the running
                # configuration, as this index is not moved yet) and is the one to replace
                self._restart_dead(self._reap())
                if self._stopping:
                    return
                self._due.pop(index, None)  # a worker waiting to restart starts now, on the new configuration
                if self._replace(self._pid_of(index), index, new) is None:
                    if self._stopping:
                        return
                    log.error(
                        "reloaded worker did not become ready; keeping the old configuration",
                        extra={"event": "reload_failed", "worker": index},
                    )
                    self._roll_back(moved)
                    return
                moved.add(index)
            self.settings = new
        finally:
            self._moving = None
        log.info("configuration reloaded", extra={"event": "reloaded"})

    def _replace(self, old_pid: int | None, index: int, settings: Settings) -> int | None:
        """Starts a successor of `old_pid` (None: no worker runs for `index`) on `settings` and retires the old
        one once it is SERVING; the successor's pid, or None (the successor stopped, the old one kept) when it
        does not become ready."""
        try:
            pid, fd = self._spawn(settings, index, successor=old_pid is not None)
        except OSError as exc:  # no successor: the reload fails (the old worker, if any, goes on serving)
            self._fork_failed(index, exc)
            return None
        if not self._await_ready(pid, fd, READY_TIMEOUT_SECONDS):
            if self._stopping:  # told to stop with the others (again here, harmless): it drains and is waited for
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                return None
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.children.pop(pid, None)
            if self._pid_of(index) is None and not self._stopping:  # no old one (or it died meanwhile): restart
                self._due.setdefault(index, time.monotonic())
                self._start_due()
            return None
        # retired: its exit is expected (signalled only if not reaped yet: its pid is still its own)
        if old_pid is not None and self.children.pop(old_pid, None) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(old_pid, signal.SIGTERM)
            self._retired.append(old_pid)
        return pid

    def _roll_back(self, moved: set[int]) -> None:
        """Puts the workers a failed reload already moved back on the running configuration: every worker
        runs one configuration, the one a restart uses (a removed issuer or narrowed policy half applied
        would otherwise stand on some workers until they next restart)."""
        for index in sorted(moved):
            self._restart_dead(self._reap())
            if self._stopping:
                return
            self._due.pop(index, None)
            if self._replace(self._pid_of(index), index, self.settings) is not None:
                moved.discard(index)
            elif not self._stopping:
                log.error(
                    "worker still on the refused configuration: its old-configuration successor did not become "
                    "ready; send SIGHUP again",
                    extra={"event": "reload_rollback_failed", "worker": index},
                )

    def run(self) -> int:
        """Runs until every worker has stopped after SIGTERM/SIGINT."""
        self._retired: list[int] = []
        self._http_sockets = bind_http(self.settings)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._signal)
        for index in range(self.settings.workers):
            self._start(self.settings, index)
        while self.children or self._retired or (self._due and not self._stopping):
            if self._reload and not self._stopping:
                self._do_reload()
            self._restart_dead(self._reap())
            self._retired = [pid for pid in self._retired if _still_running(pid)]
            time.sleep(POLL_SECONDS)
        for sockets in self._http_sockets:
            for sock in sockets:
                sock.close()
        return 0


def _still_running(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == 0


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive its supervisor (an orphan would keep serving an old config)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM is all we have
        return
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)
