"""One `verifier serve` process for integration tests: restartable, with helpers to ask it about tokens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from doorkit import free_port, http_exchange

from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider

ADMIN = "durable-admin-secret-0123456789abcd"
START_S = 45.0  # seconds for a (re)started verifier to serve; a loaded CI runner is slow


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


class Served:
    """One `verifier serve` process (restartable) with helpers to ask it about tokens."""

    def __init__(self, config: Path, http: int) -> None:
        self.config = config
        self.http = http
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "VERIFIER_ADMIN_TOKEN": ADMIN}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "verifier", "serve", "--config", str(self.config)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(timeout=15) == 0
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()

    @property
    def workers(self) -> list[int]:
        assert self.proc is not None
        return children(self.proc.pid)

    async def reload(self) -> None:
        """SIGHUP, then waits until every worker is a new one (the old ones drained and gone)."""
        first = self.workers
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + START_S
        while not (self.workers and not set(self.workers) & set(first)):
            assert time.monotonic() < deadline, "the reload did not replace the worker"
            await asyncio.sleep(0.1)

    async def kill_a_worker(self) -> None:
        """SIGKILL to one worker, then waits until the supervisor has started its replacement."""
        worker = self.workers[0]
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + START_S
        while not (self.workers and worker not in self.workers):
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            await asyncio.sleep(0.1)

    async def through_restarts(self, check: Callable[[str], Awaitable[None]], *, full: bool) -> None:
        """`check(when)` after SIGHUP, after a worker is killed and replaced, and with `full` after a full restart."""
        await self.reload()
        await check("SIGHUP")
        await self.kill_a_worker()
        await check("a worker restart")
        if full:
            self.stop()
            self.start()
            await check("a full restart")

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        answer = await http_exchange(self.http, raw)
        return int(answer.split(b" ", 2)[1]), answer.split(b"\r\n\r\n", 1)[1]

    async def answer(self, token: str) -> tuple[int, bytes]:
        raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        return await self.request(raw)

    async def status(self, token: str) -> int:
        return (await self.answer(token))[0]

    async def serving(self, token: str) -> None:
        deadline = time.monotonic() + START_S
        while True:
            try:
                if await self.status(token) == 200:
                    return
            except (OSError, asyncio.IncompleteReadError, IndexError):
                pass
            assert time.monotonic() < deadline, "verifier did not come up"
            await asyncio.sleep(0.2)

    async def disable(self, iss: str, sub: str) -> None:
        body = json.dumps({"subject": {"format": "iss_sub", "iss": iss, "sub": sub}, "effect": "disable"}).encode()
        raw = (
            f"POST /v1/admin/revocations HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        status, answer = await self.request(raw)
        assert status == 201, answer


def write_config(path: Path, http: int, idp: DevIdentityProvider, rest: str) -> None:
    """A `verifier serve` config: forward-auth on `http`, the dev provider's tokens, then `rest`."""
    path.write_text(
        f"""
http: {{listen: "127.0.0.1:{http}"}}
issuers:
  - issuer: "{idp.issuer}"
    audiences: ["{DEV_AUDIENCE}"]
    algorithms: [ES256]
    allow_insecure_http: true
{rest}"""
    )


def state_section(tmp_path: Path, durable: bool) -> str:
    """With `durable`, a `state.path` (made) under `tmp_path`; else nothing (the supervisor's directory)."""
    if not durable:
        return ""
    (tmp_path / "state").mkdir()
    return f'state: {{path: "{tmp_path / "state"}"}}\n'


@contextlib.asynccontextmanager
async def served_verifier(
    tmp_path: Path, rest: Callable[[DevIdentityProvider], str]
) -> AsyncIterator[tuple[DevIdentityProvider, Served]]:
    """The dev provider and a `verifier serve` for it (`write_config` with `rest(idp)` in `tmp_path`), started;
    both stopped at the end."""
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    try:
        config = tmp_path / "verifier.yaml"
        served = Served(config, free_port())
        write_config(config, served.http, idp, rest(idp))
        served.start()
        try:
            yield idp, served
        finally:
            served.stop()
    finally:
        await idp.stop()
