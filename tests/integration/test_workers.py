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
    proc = _serve_two_workers(
        tmp_path, idp, f'http: {{listen: "127.0.0.1:{http}"}}\ngrpc: {{listen: "127.0.0.1:{grpc}"}}', metrics
    )
    try:
        await _workers_up(proc, metrics, tmp_path)
        workers = _children(proc.pid)
        token = idp.mint()
        raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
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


def _serve_two_workers(
    tmp_path: Path, idp: DevIdentityProvider, listeners: str, metrics: int, environment: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`verifier serve` with `workers: 2`, `listeners` (YAML lines), metrics on `metrics` (+ 1), `idp`'s tokens."""
    config = tmp_path / "verifier.yaml"
    config.write_text(
        f"""
workers: 2
{listeners}
metrics: {{listen: "127.0.0.1:{metrics}"}}
issuers:
  - issuer: "{idp.issuer}"
    audiences: ["{DEV_AUDIENCE}"]
    algorithms: [ES256]
    allow_insecure_http: true
"""
    )
    return subprocess.Popen(
        [sys.executable, "-m", "verifier", "serve", "--config", str(config)],
        env={**os.environ, **(environment or {})},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "serve.log").open("wb"),
    )


async def _workers_up(proc: subprocess.Popen[bytes], metrics: int, tmp_path: Path) -> None:
    """Returns once both workers run and answer on their metrics ports."""
    deadline = time.monotonic() + 45
    while len(_children(proc.pid)) < 2 or not all(_metrics_up(metrics + i) for i in range(2)):
        assert time.monotonic() < deadline, "workers did not come up: " + _log_tail(tmp_path)
        await asyncio.sleep(0.2)


def _log_tail(tmp_path: Path) -> str:
    """The end of `_serve_two_workers`'s log."""
    return (tmp_path / "serve.log").read_text()[-3000:]


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
    raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()

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


async def test_every_worker_serves_the_admin_listener_and_its_kill_switch_reaches_them_all(tmp_path: Path) -> None:
    """`admin.listen` with `workers: 2`: each worker binds it (SO_REUSEPORT, as `http`), an entry made there is
    enforced by every worker's forward-auth door (Redis), and the forward-auth port answers the admin path 404."""
    import json

    from redis_harness import start_redis

    admin_token = "an-admin-secret-of-32-characters-0123"
    redis = start_redis(tmp_path)
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    http = free_port()
    metrics = _two_free_ports(http)
    admin = free_port()
    while admin in (http, metrics, metrics + 1):
        admin = free_port()
    listeners = (
        f'http: {{listen: "127.0.0.1:{http}"}}\nadmin: {{listen: "127.0.0.1:{admin}"}}\n'
        f'state: {{redis_url: "{redis.url}", key_prefix: "workers-admin:"}}\nrevocation: {{}}'
    )
    proc = _serve_two_workers(tmp_path, idp, listeners, metrics, {"VERIFIER_ADMIN_TOKEN": admin_token})
    try:
        await _workers_up(proc, metrics, tmp_path)
        listening = subprocess.run(
            ["ss", "-ltnpH", f"sport = :{admin}"], capture_output=True, text=True, check=False
        ).stdout
        assert all(f"pid={pid}," in listening for pid in _children(proc.pid)), listening
        token = idp.mint(sub="mallory")
        check = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        assert (await http_exchange(http, check)).startswith(b"HTTP/1.1 200")
        body = json.dumps({"subject": {"format": "iss_sub", "iss": idp.issuer, "sub": "mallory"}}).encode()
        post = (
            f"POST /v1/admin/revocations HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {admin_token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        assert (await http_exchange(http, post)).startswith(b"HTTP/1.1 404")
        assert (await http_exchange(admin, post)).startswith(b"HTTP/1.1 201")
        deadline = time.monotonic() + 10
        for _ in range(20):  # fresh connections: the kernel spreads them over both workers
            while not (await http_exchange(http, check)).startswith(b"HTTP/1.1 401"):
                assert time.monotonic() < deadline, "a worker never enforced the entry"
                await asyncio.sleep(0.05)
        served = [forward_auth_decisions_at(metrics + i) for i in range(2)]
        assert all(n > 0 for n in served), served
        # SIGHUP: each successor binds the admin port beside its predecessor (SO_REUSEPORT), then takes over.
        first = _children(proc.pid)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 45
        while not (len(_children(proc.pid)) == 2 and not set(_children(proc.pid)) & set(first)):
            assert time.monotonic() < deadline, "the reload did not replace the workers: " + _log_tail(tmp_path)
            await asyncio.sleep(0.1)
        listed = f"GET /v1/admin/revocations HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {admin_token}\r\n\r\n"
        for _ in range(10):  # whichever worker takes the connection
            answer = await http_exchange(admin, listed.encode())
            assert answer.startswith(b"HTTP/1.1 200") and b"mallory" in answer, answer
    finally:
        code = _terminate(proc)
        await idp.stop()
        redis.stop()
    assert code == 0  # drained and stopped on SIGTERM


def _terminate(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then its exit code within 15 s (killed past that: None)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
