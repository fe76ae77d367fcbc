"""Baseline for opaque tokens: forward-auth that introspects every request (RFC 7662), no cache, no batching.

``python -m bench.naive_introspect --http 127.0.0.1:Q --endpoint http://127.0.0.1:P/introspect``

The same stack as bench/noop.py (asyncio ``Protocol`` + httptools on uvloop) with one aiohttp POST to
the provider per request (client_secret_basic, a keep-alive connection pool, the secret from
``BENCH_IDP_SECRET``): what a user writes first. Allowed when the answer says ``"active": true``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import aiohttp
import httptools

from bench.idp_helper import CLIENT_ID, SECRET_ENV
from bench.noop import HTTP_ALLOW, HTTP_DENY, HttpForwardAuth

HTTP_UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


class NaiveIntrospectingForwardAuth(HttpForwardAuth):
    """Forward-auth whose every request waits for one introspection call."""

    session: aiohttp.ClientSession
    endpoint: str
    auth: aiohttp.BasicAuth

    def __init__(self) -> None:
        super().__init__(lambda _a: True)
        self._parser = httptools.HttpRequestParser(self)

    def on_message_complete(self) -> None:
        asyncio.get_running_loop().create_task(self._answer(self._authorization, self._parser.should_keep_alive()))

    async def _answer(self, authorization: str, keep_alive: bool) -> None:
        scheme, _, token = authorization.partition(" ")
        answer = HTTP_DENY
        if scheme.lower() == "bearer" and token:
            try:
                async with self.session.post(self.endpoint, data={"token": token}, auth=self.auth) as resp:
                    body = await resp.json() if resp.status == 200 else None
                answer = HTTP_ALLOW if body and body.get("active") is True else HTTP_DENY
                if body is None:
                    answer = HTTP_UNAVAILABLE
            except (aiohttp.ClientError, TimeoutError, ValueError):
                answer = HTTP_UNAVAILABLE
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(answer)
            if not keep_alive:
                self._transport.close()


async def _serve(addr: str, endpoint: str) -> None:
    loop = asyncio.get_running_loop()
    NaiveIntrospectingForwardAuth.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=5)
    )
    NaiveIntrospectingForwardAuth.endpoint = endpoint
    NaiveIntrospectingForwardAuth.auth = aiohttp.BasicAuth(CLIENT_ID, os.environ[SECRET_ENV])
    host, _, port = addr.rpartition(":")
    server = await loop.create_server(NaiveIntrospectingForwardAuth, host, int(port), backlog=1024)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()
    await NaiveIntrospectingForwardAuth.session.close()


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.naive_introspect")
    parser.add_argument("--http", required=True)
    parser.add_argument("--endpoint", required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(_serve(args.http, args.endpoint))


if __name__ == "__main__":
    main()
