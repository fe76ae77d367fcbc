"""A raw asyncio HTTP/1.1 provider on loopback that sends each answer in pieces.

Not a mock: a real socket, a real HTTP exchange, written byte by byte the way a slow or busy provider
(or a TCP segment boundary) delivers it. Each route answers with a status, a JSON body and a framing:

- `split`: the head in one write, then the body (framed by Content-Length) in several writes with pauses;
- `chunked`: the head, then the body as Transfer-Encoding: chunked, one chunk per write with pauses;
- `close`: the head without Content-Length, the body in several writes, then the connection closes.

Every request seen is recorded as (method, path, headers, body). The `raw_provider`, `http_fetcher`
(the production `HttpFetcher`) and `introspection_http` (the production introspection client) fixtures
are registered in conftest.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from verifier.app import HttpSessions
from verifier.tokens.fetch import HttpFetcher
from verifier.tokens.introspection_http import IntrospectionHttpClient

PIECES = 4  # writes per body
PAUSE = 0.02  # seconds between writes: long enough for the client to read what arrived so far


@dataclasses.dataclass
class Route:
    """One answer: status, body and how it is framed on the wire."""

    body: bytes
    status: int = 200
    framing: str = "split"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds before the head is written
    pause: float = PAUSE  # seconds between the writes of the body


def json_route(document: Any, **kwargs: Any) -> Route:
    """A route answering `document` as JSON."""
    return Route(json.dumps(document).encode(), **kwargs)


class RawProvider:
    """Serves `routes` (path -> Route, or a callable taking the request body) on an ephemeral loopback port."""

    def __init__(self) -> None:
        self.routes: dict[str, Any] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The base URL (plain http on loopback)."""
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawProvider:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((method, path, headers, body))
                route = self.routes.get(path.split("?", 1)[0])
                if callable(route):
                    route = route(body)
                if route is None:
                    route = Route(b'{"error":"not found"}', status=404)
                keep = await self._answer(writer, route)
                if not keep:
                    return
        finally:
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, route: Route) -> bool:
        if route.delay:
            await asyncio.sleep(route.delay)
        body = route.body
        head = [f"HTTP/1.1 {route.status} X", "Content-Type: application/json"]
        head += [f"{k}: {v}" for k, v in route.headers]
        if route.framing == "split":
            head.append(f"Content-Length: {len(body)}")
        elif route.framing == "chunked":
            head.append("Transfer-Encoding: chunked")
        else:
            head.append("Connection: close")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        step = max(1, -(-len(body) // PIECES))
        for start in range(0, len(body), step):
            await asyncio.sleep(route.pause)
            piece = body[start : start + step]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if route.framing == "chunked" else piece)
            await writer.drain()
        if route.framing == "chunked":
            await asyncio.sleep(route.pause)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        return route.framing != "close"


@pytest.fixture
async def raw_provider() -> AsyncIterator[RawProvider]:
    """A running RawProvider with no routes yet."""
    async with RawProvider() as raw:
        yield raw


@pytest.fixture
async def http_fetcher() -> AsyncIterator[HttpFetcher]:
    """The production fetcher on the root's pooled session, closed afterwards."""
    sessions = HttpSessions()
    yield HttpFetcher(sessions.providers)
    await sessions.close()


@pytest.fixture
async def introspection_http() -> AsyncIterator[IntrospectionHttpClient]:
    """The root's introspection client (`HttpSessions.introspection`), its connections closed afterwards."""
    sessions = HttpSessions()
    yield sessions.introspection
    await sessions.close()
