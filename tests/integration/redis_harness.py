"""A real Redis for integration tests: Debian's `redis-server` as a subprocess on a loopback port.

Nothing persists (`--save ''`, `--appendonly no`) and everything it writes stays in the test's temp
dir. `start_redis(tmp_path)` needs no pytest fixture; wrap it in one where a test wants::

    @pytest.fixture
    def redis_server(tmp_path):
        server = start_redis(tmp_path)
        yield server
        server.stop()

It skips the test (pytest.skip) when `redis-server` is not installed (`.ci/setup.d/25-redis.sh`
installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest
from support import free_port

SETUP_SCRIPT = ".ci/setup.d/25-redis.sh"
# Seconds; redis-server is ready in a few milliseconds, a loaded CI runner may need far more.
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0  # seconds for SIGTERM before SIGKILL
PORT_ATTEMPTS = 5  # a free port may be taken between choosing it and binding it


class RedisError(RuntimeError):
    """The harness could not start redis-server."""


def redis_binary() -> str | None:
    """The path of `redis-server` (`$REDIS_SERVER` wins), or None when it is not installed."""
    return os.environ.get("REDIS_SERVER") or shutil.which("redis-server")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `url` stays the same across `stop()`/`start()` (same port)."""

    def __init__(self, workdir: Path, binary: str, args: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.binary = binary
        self.args = args  # more redis-server options (e.g. `--replicaof 127.0.0.1 <port>`)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Starts redis-server (on the same port as before, if it ran before) and waits for PONG."""
        attempts = 1 if self.port else PORT_ATTEMPTS
        for _ in range(attempts):
            port = self.port or free_port()
            if self._spawn(port):
                self.port = port
                return
        raise RedisError(f"redis-server did not start; see {self.workdir / 'redis.log'}")

    def _spawn(self, port: int) -> bool:
        command = [
            self.binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.workdir / "redis.log"),
            *self.args,
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # port taken, or a bad option
                self.process = None
                return False
            if _ping(port):
                return True
            time.sleep(0.02)
        self.stop()
        return False

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL); safe to call twice."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if process.returncode is None:
            os.kill(process.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections but answers nothing (a hung Redis)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause()`."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_redis(tmp_path: Path, *args: str, name: str = "redis") -> RedisServer:
    """Starts a throwaway redis-server under `tmp_path / name` with the options `args`; the caller must `stop()` it.

    Skips the test when redis-server is not installed; raises `RedisError` when it will not start.
    """
    binary = redis_binary()
    if binary is None:
        pytest.skip(f"redis-server not installed (run {SETUP_SCRIPT})")
    workdir = tmp_path / name
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(workdir, binary, args)
    server.start()
    return server
