"""Small helpers every kind of test needs: a free loopback port, unpadded base64url, a throwaway certificate,
no HTTP session, a frozen clock.

One definition here instead of a copy per rig (issue #19). tests/ and tests/integration are both on pytest's
``pythonpath`` (pyproject.toml), so any test or harness imports it as ``from support import ...``.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import socket
import threading
import time
from collections.abc import Awaitable
from typing import TypeVar

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the usual bind-to-0 idiom)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def run_queue_seconds() -> float:
    """Seconds this thread has spent runnable but not running (waiting for a CPU the machine's other load held),
    from Linux's /proc schedstat; 0.0 where the kernel does not tell."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


async def timed(call: Awaitable[T], deadline: float) -> tuple[T, float, float]:
    """`call`'s result, the seconds it took, and how late a loaded machine made it: how late this event loop
    ran a timer of `deadline` seconds started alongside it, or how long this thread waited for a CPU while
    `call` ran (the kernel's run-queue time), whichever is more.

    For a deadline kept by code running in this same loop: a loaded machine delays that deadline's timer by
    about as much as the one here, and a stall after it (the answer written, read) is run-queue time, so
    `took - late` is what the time would have been on a quiet machine. Neither excuses the code's own work or
    its waiting on a socket. Assert `took - late < deadline + a little`, not `took < deadline + a guess at the
    machine's load`.
    """
    queued = run_queue_seconds()
    started = time.monotonic()

    async def deadline_timer() -> float:
        await asyncio.sleep(deadline)
        return time.monotonic() - started - deadline

    timer = asyncio.ensure_future(deadline_timer())
    try:
        result = await call
    except BaseException:
        timer.cancel()
        raise
    took = time.monotonic() - started
    starved = run_queue_seconds() - queued
    if took < deadline:
        timer.cancel()
        return result, took, starved
    return result, took, max(await timer, starved)
