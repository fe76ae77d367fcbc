"""`metrics.token_file` through `verifier serve`: read at start and again on SIGHUP (a rotated token takes over,
the old one is refused), a reload whose file is gone is refused and the running token stays, and neither token
reaches the log."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from doorkit import free_port, http_exchange

from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider

pytestmark = pytest.mark.integration


async def _status(port: int, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    raw = f"GET /metrics HTTP/1.1\r\nHost: m\r\n{auth}Connection: close\r\n\r\n".encode()
    try:
        return (await http_exchange(port, raw, read_until_close=True))[:12]
    except OSError:
        return b""


async def _until(port: int, token: str | None, status: bytes, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 45
    while (await _status(port, token)) != status:
        assert proc.poll() is None and time.monotonic() < deadline, f"never {status!r}: " + log.read_text()[-3000:]
        await asyncio.sleep(0.2)


async def test_sighup_rereads_the_token_file_and_a_reload_without_it_keeps_the_running_token(tmp_path: Path) -> None:
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    metrics = free_port()
    first, second = secrets.token_hex(24), secrets.token_hex(24)
    token_file = tmp_path / "token"
    token_file.write_text(first + "\n")
    config = tmp_path / "verifier.yaml"
    config.write_text(
        f"""
http: {{listen: "127.0.0.1:{free_port()}"}}
metrics: {{listen: "127.0.0.1:{metrics}", token_file: "{token_file}"}}
issuers: [{{issuer: "{idp.issuer}", audiences: ["{DEV_AUDIENCE}"], algorithms: [ES256], allow_insecure_http: true}}]
"""
    )
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifier", "serve", "--config", str(config)],
        env=dict(os.environ),
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        await _until(metrics, first, b"HTTP/1.1 200", proc, log)
        assert await _status(metrics, second) == b"HTTP/1.1 401"
        assert await _status(metrics, None) == b"HTTP/1.1 401"

        token_file.write_text(second + "\n")  # rotated: taken on SIGHUP
        proc.send_signal(signal.SIGHUP)
        await _until(metrics, second, b"HTTP/1.1 200", proc, log)
        await _until(metrics, first, b"HTTP/1.1 401", proc, log)  # the old worker drained: the old token is out

        token_file.unlink()  # a reload that cannot read the file is refused; the running token stays
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload_refused" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.2)
        assert "metrics.token_file: cannot read" in log.read_text()
        assert await _status(metrics, second) == b"HTTP/1.1 200"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        await idp.stop()
    text = log.read_text()
    assert first not in text and second not in text
