"""In-process verifier + development issuer on ephemeral loopback ports, for the door tests."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from support import free_port

from verifier.app import App
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.observe.tracing import Tracing
from verifier.settings import ForwardAuthSettings, IssuerSettings, Listen, Settings

# The forward-auth door sheds a first-seen token once its loop has waited this long (the product's default is
# 0.25 s): a loaded test machine that starves this process for a moment must not turn a lone request into a 503
# "overloaded" (as tests/integration/gateways.py does for the rigs). Shedding itself is proven at its own
# thresholds in tests/doors/test_forward_auth_shedding.py.
SHED_AFTER_S = 5.0


def door_settings(**options: Any) -> ForwardAuthSettings:
    """The forward-auth door's settings for a test: `options`, and shedding only past SHED_AFTER_S unless given."""
    return ForwardAuthSettings(**{"shed_after_seconds": SHED_AFTER_S, **options})


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
        "forward_auth": door_settings(),
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


async def held_open(port: int, sent: bytes = b"", *, tls: ssl.SSLContext | None = None, within: float) -> float | None:
    """Connects to `port` (with `tls`, its handshake first), writes `sent` and then nothing, and reads whatever the
    server sends until it closes the connection: the seconds from the connect to the close, or None if the server
    still held it `within` seconds after the connect."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None
    )
    try:
        writer.write(sent)
        while await asyncio.wait_for(reader.read(4096), max(0.0, started + within - loop.time())):
            pass
    except TimeoutError:
        return None
    except (ConnectionError, ssl.SSLError):
        pass  # closed with a reset, or mid-record
    finally:
        writer.close()
    return loop.time() - started


async def until_pending(app: App, checks: int) -> None:
    """Waits (up to 30 s: a loaded machine) until `checks` slow checks are in flight in the pipeline."""
    deadline = time.monotonic() + 30
    while app.pipeline._pending < checks:
        assert time.monotonic() < deadline, f"{app.pipeline._pending} checks in flight, not {checks}"
        await asyncio.sleep(0.01)


async def until_accepted(app: App, client_ports: Iterable[int]) -> None:
    """Waits (up to 30 s: a loaded machine) until the forward-auth door holds the connections opened from
    `client_ports` (accepted, their protocol made, reading): a condition, never a pause guessed long enough."""
    wanted = set(client_ports)
    deadline = time.monotonic() + 30
    while missing := wanted - {c._transport.get_extra_info("peername")[1] for c in app.forward_auth.connections}:
        assert time.monotonic() < deadline, f"{len(missing)} of {len(wanted)} connections not accepted"
        await asyncio.sleep(0.01)


class Wire:
    """The transport a connection writes to (no sockets: every answer is written synchronously here)."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def get_extra_info(self, name: str) -> Any:
        return (self.peer, 40000) if name == "peername" else None

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
