"""The gRPC doors' overload bound: HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection (issue #24 goal 4).

grpc.aio queues every accepted call without limit and serves them in order; under a flood each call expired
in the queue. The bound is announced in the server's first SETTINGS frame, read here off the wire.
"""

from __future__ import annotations

import asyncio
import struct

from support import FrozenClock
from tokenkit import DISCOVERY_URL, JWKS_URL, NOW, FakeFetcher, discovery_document, issuer_settings

from verifier.app import App
from verifier.settings import DEFAULT_GRPC_MAX_CONCURRENT_STREAMS, Listen, Settings

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, MAX_CONCURRENT_STREAMS = 0x4, 0x3


async def _announced_streams(port: int) -> int | None:
    """The server's SETTINGS_MAX_CONCURRENT_STREAMS (None: not announced, i.e. unlimited)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(PREFACE + struct.pack(">I", 0)[1:] + bytes([SETTINGS, 0]) + struct.pack(">I", 0))
        await writer.drain()
        while True:
            head = await asyncio.wait_for(reader.readexactly(9), 10)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            payload = await reader.readexactly(length)
            if kind == SETTINGS and not flags & 0x1:  # the server's own settings, not an ACK of ours
                for i in range(0, length, 6):
                    ident, value = struct.unpack(">HI", payload[i : i + 6])
                    if ident == MAX_CONCURRENT_STREAMS:
                        return int(value)
                return None
    finally:
        writer.close()


async def _announced_by_app(jwks_document: dict[str, object], **options: object) -> int | None:
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, jwks_document)
    settings = Settings(
        grpc=Listen(host="127.0.0.1", port=0),
        http=None,
        metrics=None,
        issuers=(issuer_settings(),),
        **options,  # type: ignore[arg-type]
    )
    app = App(settings, clock=FrozenClock(NOW), fetcher=fetcher)
    await app.start()
    try:
        assert app.ports.grpc is not None
        return await _announced_streams(app.ports.grpc)
    finally:
        await app.stop(grace=0.1)


async def test_the_default_bound_is_announced_to_every_client(jwks_document) -> None:  # type: ignore[no-untyped-def]
    assert await _announced_by_app(jwks_document) == DEFAULT_GRPC_MAX_CONCURRENT_STREAMS


async def test_the_bound_is_a_setting(jwks_document) -> None:  # type: ignore[no-untyped-def]
    # 4 is the bound measured to keep goodput under a 10x flood (docs/BENCHMARKS.md); any value is announced
    assert await _announced_by_app(jwks_document, grpc_max_concurrent_streams=4) == 4
    assert await _announced_by_app(jwks_document, grpc_max_concurrent_streams=3) == 3
