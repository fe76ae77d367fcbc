"""`workers: N`: N processes share the listeners (SO_REUSEPORT), each answers, SIGTERM stops them all."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from doorkit import free_port, http_exchange
from replicas import forward_auth_decisions_at

from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _two_free_ports(*avoid: int) -> int:
    """A port p such that p and p + 1 are both free now (and neither is one of `avoid`)."""
    import socket

    for _ in range(50):
        port = free_port()
        if port in avoid or port + 1 in avoid:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise AssertionError("no two adjacent free ports")


async def test_two_workers_share_the_ports_and_stop_together(tmp_path: Path) -> None:
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    http, grpc = free_port(), free_port()
    metrics = _two_free_ports(http, grpc)  # worker i serves metrics on metrics + i
    config = tmp_path / "verifier.yaml"
    config.write_text(
        f"""
workers: 2
http: {{listen: "127.0.0.1:{http}"}}
grpc: {{listen: "127.0.0.1:{grpc}"}}
metrics: {{listen: "127.0.0.1:{metrics}"}}
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
    try:
        deadline = time.monotonic() + 45
        while len(_children(proc.pid)) < 2 or not all(_metrics_up(metrics + i) for i in range(2)):
            assert time.monotonic() < deadline, "workers did not come up: " + log.read_text()[-3000:]
            await asyncio.sleep(0.2)
        workers = _children(proc.pid)
        token = idp.mint()
        raw = f"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        for _ in range(40):  # fresh connections: the kernel spreads them over both workers
            assert (await http_exchange(http, raw)).startswith(b"HTTP/1.1 200")
        served = [forward_auth_decisions_at(metrics + i) for i in range(2)]
        assert sum(served) == 40 and all(n > 0 for n in served), served
        # A worker that dies is replaced.
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not (len(_children(proc.pid)) == 2 and workers[0] not in _children(proc.pid)):
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not _children(proc.pid)
    finally:
        if proc.poll() is None:
            proc.kill()
        await idp.stop()


def _metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


async def test_sighup_keeps_the_old_config_when_the_new_one_is_invalid_and_swaps_when_valid(tmp_path: Path) -> None:
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    http = free_port()
    config = tmp_path / "verifier.yaml"

    def write(audience: str, extra: str = "") -> None:
        config.write_text(
            f"""
http: {{listen: "127.0.0.1:{http}"}}
issuers:
  - issuer: "{idp.issuer}"
    audiences: ["{audience}"]
    algorithms: [ES256]
    allow_insecure_http: true
{extra}"""
        )

    write(DEV_AUDIENCE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "verifier", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    token = idp.mint()
    raw = f"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()

    async def status() -> int:
        return int((await http_exchange(http, raw)).split(b" ", 2)[1])

    try:
        deadline = time.monotonic() + 45
        while True:
            try:
                if await status() == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "verifier did not come up"
            await asyncio.sleep(0.2)
        first = _children(proc.pid)
        write(DEV_AUDIENCE, "bogus_key: 1\n")  # invalid: refused, the old config stays
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert _children(proc.pid) == first and await status() == 200
        write("https://other.example.test")  # valid: the token's audience is no longer accepted
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 45
        failures = 0
        while True:
            try:
                code = await status()
            except OSError:
                failures += 1
                code = 0
            if code == 403:
                break
            assert code in (200, 0), code
            assert time.monotonic() < deadline, "reload did not take effect"
            await asyncio.sleep(0.05)
        assert failures == 0, "requests failed during the reload"
        assert _children(proc.pid) != first
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await idp.stop()


def test_serve_refuses_several_workers_that_would_each_have_their_own_kill_switch(tmp_path: Path) -> None:
    """#18 F8: with `workers: 2` and no Redis, a revocation reached one worker in two."""
    config = tmp_path / "verifier.yaml"
    config.write_text(
        f"""
workers: 2
http: {{listen: "127.0.0.1:{free_port()}"}}
issuers:
  - issuer: "http://127.0.0.1:{free_port()}"
    audiences: ["{DEV_AUDIENCE}"]
    algorithms: [ES256]
    allow_insecure_http: true
revocation: {{}}
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "verifier", "serve", "--config", str(config)],
        env={**os.environ, "VERIFIER_ADMIN_TOKEN": "an-admin-secret-of-32-characters"},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "state.redis_url" in result.stderr and "revocation" in result.stderr
