"""In-process verifier + development issuer on ephemeral loopback ports, for the door tests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from support import free_port

from verifier.app import App
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.observe.tracing import Tracing
from verifier.settings import IssuerSettings, Listen, Settings


@contextlib.asynccontextmanager
async def running_verifier(
    settings_options: dict[str, object] | None = None, *, tracing: Tracing | None = None, **issuer_options: object
) -> AsyncIterator[tuple[App, DevIdentityProvider]]:
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    options: dict[str, object] = {
        "grpc": Listen(host="127.0.0.1", port=0),
        "http": Listen(host="127.0.0.1", port=0),
        "metrics": Listen(host="127.0.0.1", port=0),
        **(settings_options or {}),
    }
    settings = Settings(
        **options,  # type: ignore[arg-type]
        issuers=(
            IssuerSettings(
                issuer=idp.issuer,
                audiences=(DEV_AUDIENCE,),
                algorithms=("ES256", "RS256", "EdDSA"),
                **issuer_options,  # type: ignore[arg-type]
            ),
        ),
    )
    app = App(settings, tracing=tracing)
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 10)
        yield app, idp
    finally:
        await app.stop(grace=0.5)
        await idp.stop()


async def http_exchange(port: int, raw: bytes, *, read_until_close: bool = False) -> bytes:
    """Sends raw bytes, returns what came back (one answer, or all until the peer closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        if read_until_close:
            return await asyncio.wait_for(reader.read(), 5)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
        return head + body
    finally:
        writer.close()


async def until_pending(app: App, checks: int) -> None:
    """Waits (up to 30 s: a loaded machine) until `checks` slow checks are in flight in the pipeline."""
    deadline = time.monotonic() + 30
    while app.pipeline._pending < checks:
        assert time.monotonic() < deadline, f"{app.pipeline._pending} checks in flight, not {checks}"
        await asyncio.sleep(0.01)
