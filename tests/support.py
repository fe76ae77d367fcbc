"""Small helpers every kind of test needs: a free loopback port, unpadded base64url, a throwaway certificate,
no HTTP session, a frozen clock.

One definition here instead of a copy per rig (issue #19). tests/ and tests/integration are both on pytest's
``pythonpath`` (pyproject.toml), so any test or harness imports it as ``from support import ...``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hmac
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_GIVEN_PORTS: set[int] = set()  # every port free_port handed out in this process


async def serve_on_loopback(app: web.Application) -> tuple[web.AppRunner, int]:
    """`app` served on 127.0.0.1 at a port the kernel picks: its runner (`cleanup()` stops it) and the port."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the usual bind-to-0 idiom), and never one this process
    was handed before: the kernel may give the same port to two binds in a row once the first is closed, and a rig
    that asks for two ports before anything binds them (nginx's listen and admin ports, a CI run: both 33789, so
    /status reached the auth server block and answered 401) would get one port twice."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port
    raise RuntimeError("no loopback port this process was not handed before")


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2), as JOSE and WebAuthn use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def no_http_session() -> aiohttp.ClientSession:
    """A session provider for a service that must make no outbound call in this test."""
    raise AssertionError("this test makes no outbound HTTP call")


class FrozenClock:
    """A `verifier.clock.Clock` that moves only when told to."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self._now = now
        self._mono = 1000.0

    def now(self) -> float:
        """The frozen wall time."""
        return self._now

    def monotonic(self) -> float:
        """The frozen monotonic time."""
        return self._mono

    def advance(self, seconds: float) -> None:
        """Moves both clocks forward."""
        self._now += seconds
        self._mono += seconds


def make_certificate(common_name: str) -> x509.Certificate:
    """A self-signed P-256 certificate for `common_name` (mTLS binding tests: only its DER thumbprint matters)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def spki_pin(key: ec.EllipticCurvePrivateKey) -> str:
    """A `jwks_pin_sha256` entry: what `openssl x509 -pubkey | openssl pkey -pubin -outform der | openssl dgst -sha256
    -binary | base64` prints for the key's certificate."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return base64.b64encode(digest.finalize()).decode()


T = TypeVar("T")


def run_queue_seconds(native_id: int | None = None) -> float:
    """Seconds a thread of this process (this one unless given) has spent runnable but not running (waiting for
    a CPU the machine's other load held), from Linux's /proc schedstat; 0.0 where the kernel does not tell."""
    try:
        with open(f"/proc/self/task/{native_id or threading.get_native_id()}/schedstat") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


STALL_TICK = 0.005  # seconds between the stall meter's wake-ups
# A wake-up later than this is a stall of the process and counts in full; an earlier one does not count at all: the
# interpreter hands the GIL to a waiting thread only every 5 ms (sys.getswitchinterval()), so the meter wakes up to
# that late while another thread of the process computes, and that is the code's own work.
STALL_AT_LEAST = 0.02


class StallMeter:
    """How long a loaded machine held this process still while the meter ran (`late`).

    A thread of its own sleeps `STALL_TICK` at a time and adds up each wake-up `STALL_AT_LEAST` or more late: the
    whole process stood still then (a CPU the runner gave to someone else, the VM paused, the GIL held by one C
    call). The work of one thread does not show (an event loop busy or blocked with the code under test leaves
    this thread running: the interpreter hands the GIL over every 5 ms and a blocking call releases it). The
    run-queue time of the thread that made the meter (`run_queue_seconds`) counts too: the runner can starve
    that thread alone while the meter's runs on the other CPU. Use as a context manager.
    """

    def __init__(self) -> None:
        self._watched = threading.get_native_id()
        self._stop = threading.Event()
        self._stood = 0.0
        self._origin = 0.0  # when the meter was entered: a stall while its thread starts counts too
        self._queued_before = 0.0
        self._queued: float | None = None  # the watched thread's run-queue seconds over the meter's span, once ended
        self._thread = threading.Thread(target=self._run, name="stall-meter", daemon=True)

    def _run(self) -> None:
        before = self._origin
        while not self._stop.wait(STALL_TICK):
            now = time.monotonic()
            if (late := now - before - STALL_TICK) >= STALL_AT_LEAST:
                self._stood += late
            before = now

    @property
    def late(self) -> float:
        """Seconds the process stood still, or the thread that made the meter waited for a CPU, whichever is
        more (they overlap: a runner that gives both CPUs away stalls both)."""
        queued = self._queued if self._queued is not None else self._queued_now()
        return max(self._stood, queued)

    def _queued_now(self) -> float:
        return run_queue_seconds(self._watched) - self._queued_before

    def __enter__(self) -> StallMeter:
        self._queued_before = run_queue_seconds(self._watched)
        self._origin = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._queued = self._queued_now()


async def timed(call: Awaitable[T]) -> tuple[T, float, float]:
    """`call`'s result, the seconds it took, and how late a loaded machine made it (`StallMeter.late`): how long
    it held this process still, or this thread waiting for a CPU, while `call` ran.

    For a deadline kept by code running in this process: a stall delays its timer (when it falls across the
    moment the timer is due or before the timer is started), the answer it sends and reading it, never by more
    than the stall, so `took - late` is at most what the time would have been on a quiet machine. A stall within
    the wait, that delayed nothing, is taken out too: a bound checked this way may let a wrong answer through on
    a stalled run, never on a quiet one. Neither excuses the code's own work nor its waiting on a socket: the
    event loop running or blocked with the code under test is not a stall of the process. Assert
    `took - late < deadline + a little`, not `took < deadline + a guess at the machine's load`.
    """
    with StallMeter() as meter:
        started = time.monotonic()
        result = await call
        took = time.monotonic() - started
    return result, took, meter.late


def count_loop_lookups(monkeypatch: Any) -> list[str]:
    """From now on (for the test), the names of the `verifier.` modules that call `asyncio.get_running_loop()`, one
    entry per call: each is a getpid() system call on CPython 3.11 (#24 goal 7)."""
    lookups: list[str] = []
    lookup = asyncio.get_running_loop

    def counted() -> asyncio.AbstractEventLoop:
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("verifier."):
            lookups.append(caller)
        return lookup()

    monkeypatch.setattr(asyncio, "get_running_loop", counted)
    return lookups


def compare_digest_calls(monkeypatch: Any) -> list[tuple[bytes, bytes]]:
    """From now on (for the test), the arguments of every `hmac.compare_digest` call, in order: which one a secret
    is compared as (CPython's loop runs over the second's length, whatever the first's)."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


async def trickled(port: int, raw: bytes, piece: int, pause: float, timeout: float = 5.0) -> bytes:
    """Sends `raw` to 127.0.0.1:`port` `piece` bytes at a time, `pause` seconds apart; the answer's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for at in range(0, len(raw), piece):
            writer.write(raw[at : at + piece])
            await writer.drain()
            await asyncio.sleep(pause)
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    finally:
        writer.close()


def made_under_umask_022(make: Callable[[], T]) -> T:
    """What `make` returns, run under the usual umask (022: files world-readable unless made private)."""
    import os

    previous = os.umask(0o022)
    try:
        return make()
    finally:
        os.umask(previous)


def file_modes(directory: Any) -> dict[str, int]:
    """Each file's permission bits in `directory` (a pathlib.Path), by name."""
    return {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}


def opened_together(path: Any, open_store: Callable[[], T], *, held_seconds: float = 0.5, openers: int = 3) -> list[T]:
    """`openers` stores opened at once by as many threads (the workers of `verifier serve --workers N` at start-up)
    while another worker, making the new SQLite file `path`, holds its write lock for `held_seconds`."""
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    holder = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # a new file (no journal mode yet): its maker's lock refuses a change of mode
    release = threading.Timer(held_seconds, holder.rollback)
    release.start()
    try:
        with ThreadPoolExecutor(openers) as pool:
            return [future.result() for future in [pool.submit(open_store) for _ in range(openers)]]
    finally:
        release.join()
        holder.close()


class SkewedClock:
    """One replica's clock, `offset` seconds off `true` (the shared store's clock, as Redis keeps its own) and moving
    with it: replicas whose clocks disagree, one shared replay store."""

    def __init__(self, true: FrozenClock, offset: float) -> None:
        self._true = true
        self._offset = offset

    def now(self) -> float:
        """The true wall time, off by `offset`."""
        return self._true.now() + self._offset

    def monotonic(self) -> float:
        """The true monotonic time."""
        return self._true.monotonic()
