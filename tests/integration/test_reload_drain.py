"""A reload or a worker's restart loses no forward-auth request.

The supervisor binds each worker's listening sockets once, before any fork, and keeps them; a worker (its
successor on SIGHUP, its replacement after a crash) accepts on the same sockets. Before, each worker bound
its own SO_REUSEPORT socket and closed it when it drained: the connections the kernel had already queued on
it were reset (a CI run lost a request that way), and a crashed worker's port refused connections until
the replacement bound a new one.

A draining worker answers what it has been sent (a fresh connection's first request too) with
`Connection: close`, and closes idle keep-alives; a client that reuses a keep-alive connection retries
once on a new one when the server closed it first, as RFC 9112 section 9.3.1 lets it for an idempotent
request and as nginx does for its cached upstream connections.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from doorkit import free_port

from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider

pytestmark = pytest.mark.integration

RELOADS = 3


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return {int(p) for p in out.stdout.split()}


class _Load:
    """Client threads sending forward-auth checks until stopped: fresh connections (one request each) and
    keep-alive connections; every failure a retrying HTTP/1.1 client would see is recorded."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "X-Forwarded-Uri": "/a"}
        self.stop = threading.Event()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.closes = 0  # answers that said `Connection: close` (a draining worker's)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._fresh) for _ in range(3)]
        self._threads += [threading.Thread(target=self._keep_alive) for _ in range(2)]

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _record(self, response: http.client.HTTPResponse) -> None:
        response.read()
        with self._lock:
            self.statuses[response.status] += 1
            self.closes += response.getheader("connection", "").lower() == "close"

    def _fail(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self.failures.append(f"{what}: {exc!r}")

    def _fresh(self) -> None:
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/v1/forward-auth/", headers=self.headers)
                self._record(conn.getresponse())
            except (OSError, http.client.HTTPException) as exc:
                self._fail("fresh connection", exc)
            finally:
                conn.close()

    def _keep_alive(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        reused = False
        while not self.stop.is_set():
            try:
                conn.request("GET", "/v1/forward-auth/", headers=self.headers)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                if not reused:  # a new connection failed: no retry covers that
                    self._fail("new keep-alive connection", exc)
                reused = False
                continue
            self._record(response)
            reused = not response.will_close
            if response.will_close:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            time.sleep(0.001)
        conn.close()


async def _start(tmp_path: Path, idp: DevIdentityProvider, workers: int) -> tuple[subprocess.Popen[bytes], int, Path]:
    http_port = free_port()
    config = tmp_path / "verifier.yaml"
    config.write_text(
        f"""
workers: {workers}
http: {{listen: "127.0.0.1:{http_port}", shed_after_seconds: 5}}
issuers:
  - issuer: "{idp.issuer}"
    audiences: ["{DEV_AUDIENCE}"]
    algorithms: [ES256]
    allow_insecure_http: true
"""
    )
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifier", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    deadline = time.monotonic() + 45
    while not await asyncio.to_thread(_serving, http_port):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.2)
    while len(_children(proc.pid)) < workers:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.2)
    return proc, http_port, log


def _check(port: int, token: str, timeout: float) -> int:
    """One forward-auth check on a new connection: the answer's status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/v1/forward-auth/", headers={"Authorization": f"Bearer {token}"})
        return conn.getresponse().status
    finally:
        conn.close()


def _serving(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


async def _replaced(proc: subprocess.Popen[bytes], old: set[int], count: int, log: Path) -> set[int]:
    """Waits until `count` workers run and none of `old` is among them (nor still exiting)."""
    deadline = time.monotonic() + 60
    while True:
        now = _children(proc.pid)
        if len(now) == count and not now & old:
            return now
        assert time.monotonic() < deadline, f"workers not replaced: {old} -> {now}\n" + log.read_text()[-3000:]
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("workers", "keys_delay"), [(1, 0.0), (2, 0.0), (1, 1.0)], ids=["1-worker", "2-workers", "slow-provider"]
)
async def test_reloads_under_load_lose_no_request(tmp_path: Path, workers: int, keys_delay: float) -> None:
    """With `keys_delay`, each successor's key fetch takes that long: it must take no connection meanwhile (it
    would answer 503 provider_unavailable), the old worker answering on the shared socket until it is SERVING."""
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    proc, port, log = await _start(tmp_path, idp, workers)
    idp.jwks_delay_seconds = keys_delay
    try:
        with _Load(port, idp.mint(aud=DEV_AUDIENCE)) as load:
            await asyncio.sleep(0.5)
            for _ in range(RELOADS):
                before = _children(proc.pid)
                proc.send_signal(signal.SIGHUP)
                await _replaced(proc, before, workers, log)
                await asyncio.sleep(0.3)
        assert load.failures == [], (load.failures[:10], len(load.failures))
        assert set(load.statuses) == {200}, load.statuses
        assert sum(load.statuses.values()) > 100, load.statuses
        assert load.closes > 0, "no answer came from a draining worker: the reloads were not under load"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await idp.stop()


async def test_connections_queued_on_a_frozen_worker_are_answered_by_its_successor(tmp_path: Path) -> None:
    """The successor accepts on the very sockets the old worker had: requests the kernel queued for a worker
    that does not accept (frozen with SIGSTOP here) are answered once the successor is up, before the old
    worker runs again. With a socket of its own per process they waited for the old worker, whose drain
    then closed its socket on whatever was still queued."""
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    proc, port, log = await _start(tmp_path, idp, 1)
    (worker,) = _children(proc.pid)
    token = idp.mint(aud=DEV_AUDIENCE)

    os.kill(worker, signal.SIGSTOP)
    try:
        waiting = [asyncio.ensure_future(asyncio.to_thread(_check, port, token, 60)) for _ in range(4)]
        await asyncio.sleep(0.5)
        assert not any(task.done() for task in waiting), "a frozen worker answered"
        proc.send_signal(signal.SIGHUP)
        statuses = await asyncio.wait_for(asyncio.gather(*waiting), 50)
        assert statuses == [200] * 4, statuses
        with open(f"/proc/{worker}/stat") as stat:
            assert stat.read().split(") ", 1)[1][0] == "T", "the old worker ran again before the answers"
    finally:
        os.kill(worker, signal.SIGCONT)
    try:
        await _replaced(proc, {worker}, 1, log)  # the old one drains once it runs again
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await idp.stop()


async def test_a_connection_made_while_the_only_worker_is_down_is_answered_by_its_replacement(
    tmp_path: Path,
) -> None:
    """The supervisor holds the listening socket: a connection while no worker runs waits in its queue (it is
    neither refused nor reset) and the replacement answers it."""
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    proc, port, log = await _start(tmp_path, idp, 1)
    try:
        (worker,) = _children(proc.pid)
        os.kill(worker, signal.SIGKILL)
        while worker in _children(proc.pid) and _alive(worker):
            await asyncio.sleep(0.01)
        token = idp.mint(aud=DEV_AUDIENCE)

        assert await asyncio.to_thread(_check, port, token, 30) == 200, log.read_text()[-3000:]
        assert worker not in _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await idp.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
