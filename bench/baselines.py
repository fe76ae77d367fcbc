"""Baseline servers on the verifier's own stack: they answer the same doors and decide little or nothing.

``python -m bench.baselines --http 127.0.0.1:Q [--grpc 127.0.0.1:P] --decide noop|naive|introspect``

* ``noop``: both gRPC Check services (``verifier.v1.Verifier`` and Envoy's ``Authorization``) on
  grpc.aio over uvloop with a pre-serialized allow, and HTTP/1.1 forward-auth on an asyncio
  ``Protocol`` + httptools answering ``200`` with keep-alive: the ceiling on the same front door.
  Several processes may share the ports (SO_REUSEPORT). ``--settings verifier``: with a serving worker's
  settings instead of CPython's and grpc's defaults: its collector (verifier/gc_policy.py) and its gRPC
  server options (verifier/doors/grpc.py: the 4-stream bound among them), so what the verifier's settings
  cost is seen apart from what its code costs. ``--pause-ms``/``--pause-every-ms`` freeze the event loop periodically
  (a stalling server: the open-loop generator must not hide the stall);
* ``naive``: a fresh ``PyJWKClient`` per request against ``--issuer``'s JWKS (what a user writes first):
  every check fetches the keys, blocking the loop, and verifies; nothing is cached;
* ``introspect``: forward-auth with one aiohttp POST to ``--issuer``/introspect per request (RFC 7662,
  client_secret_basic with ``BENCH_IDP_SECRET``), nothing cached, no batching.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import httptools

from bench import wire
from bench.wire import Door

HTTP_ALLOW = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Verifier-Reason: ok\r\n\r\n"
HTTP_DENY = (
    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nX-Verifier-Reason: invalid_token\r\n"
    b'WWW-Authenticate: Bearer realm="verifier", error="invalid_token"\r\n\r\n'
)
HTTP_UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
HTTP_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

Decide = Callable[[str], bool]  # Authorization header value -> allowed
AsyncDecide = Callable[[str], Awaitable[bool]]  # raises OSError/ValueError when the provider fails


class HttpForwardAuth(asyncio.Protocol):
    """A lean HTTP/1.1 forward-auth endpoint: parse with httptools, answer a canned response."""

    def __init__(self, decide: Decide | None, async_decide: AsyncDecide | None = None) -> None:
        self._decide, self._async_decide = decide, async_decide
        self._parser = httptools.HttpRequestParser(self)
        self._transport: Any = None  # uvloop's transport is not an asyncio.Transport subclass
        self._authorization = ""

    def connection_made(self, transport: Any) -> None:
        self._transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._transport.write(HTTP_BAD)
            self._transport.close()

    def on_message_begin(self) -> None:
        self._authorization = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 13 and name.lower() == b"authorization":
            self._authorization = value.decode("latin-1")

    def on_message_complete(self) -> None:
        keep_alive = self._parser.should_keep_alive()
        if self._decide is not None:
            self._answer(HTTP_ALLOW if self._decide(self._authorization) else HTTP_DENY, keep_alive)
        else:
            asyncio.get_running_loop().create_task(self._answer_later(self._authorization, keep_alive))

    async def _answer_later(self, authorization: str, keep_alive: bool) -> None:
        assert self._async_decide is not None
        try:
            answer = HTTP_ALLOW if await self._async_decide(authorization) else HTTP_DENY
        except (OSError, ValueError, TimeoutError):
            answer = HTTP_UNAVAILABLE
        if not self._transport.is_closing():
            self._answer(answer, keep_alive)

    def _answer(self, answer: bytes, keep_alive: bool) -> None:
        self._transport.write(answer)
        if not keep_alive:
            self._transport.close()


def allow_all(_authorization: str) -> bool:
    """The no-op decision."""
    return True


def naive_decider(issuer: str) -> Decide:
    """Verify the bearer token the naive way: a fresh PyJWKClient (a JWKS fetch) per request."""
    import jwt

    def decide(authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        try:
            client = jwt.PyJWKClient(f"{issuer}/jwks", cache_keys=False, cache_jwk_set=False)
            key = client.get_signing_key_from_jwt(token)
            jwt.decode(token, key.key, algorithms=["ES256", "RS256", "EdDSA"], audience=wire.AUDIENCE, issuer=issuer)
        except (jwt.PyJWTError, ValueError):
            return False
        return True

    return decide


def introspecting_decider(issuer: str) -> AsyncDecide:
    """One provider call per request, allowed when the answer says ``"active": true``."""
    import aiohttp

    from bench.idp import CLIENT_ID, SECRET_ENV

    session: list[aiohttp.ClientSession] = []
    auth = aiohttp.BasicAuth(CLIENT_ID, os.environ[SECRET_ENV])

    async def decide(authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        if not session:
            limit, timeout = aiohttp.TCPConnector(limit=256), aiohttp.ClientTimeout(total=5)
            session.append(aiohttp.ClientSession(connector=limit, timeout=timeout))
        try:
            async with session[0].post(f"{issuer}/introspect", data={"token": token}, auth=auth) as resp:
                if resp.status != 200:
                    raise ValueError(f"provider answered {resp.status}")
                return (await resp.json()).get("active") is True
        except aiohttp.ClientError as exc:
            raise OSError(str(exc)) from exc

    return decide


ANSWERED_SERVICE = "bench.Baseline"  # its `Answered` method: how many Check calls the handlers answered, as ASCII


def _grpc_handlers(decide: Decide) -> list[grpc.GenericRpcHandler]:
    """Generic handlers on raw bytes: no (de)serialization cost beyond what ``decide`` needs; and
    ``bench.Baseline/Answered``, the count of Check calls whose handler ran (the overload scenario's *served*, as the
    verifier's decision counter is its)."""
    answered = [0]

    def handler(door: Door) -> grpc.RpcMethodHandler:
        allow, deny = wire.ANSWERS[(door, True)], wire.ANSWERS[(door, False)]

        async def check(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            answered[0] += 1
            return allow if decide(wire.authorization(door, request)) else deny

        async def noop(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            answered[0] += 1
            return allow

        return grpc.unary_unary_rpc_method_handler(noop if decide is allow_all else check)

    async def count(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
        return str(answered[0]).encode()

    return [
        *(
            grpc.method_handlers_generic_handler(door.grpc_method.split("/")[1], {"Check": handler(door)})
            for door in (Door.GRPC, Door.EXT_AUTHZ)
        ),
        grpc.method_handlers_generic_handler(
            ANSWERED_SERVICE, {"Answered": grpc.unary_unary_rpc_method_handler(count)}
        ),
    ]


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGTERM."""
    decide: Decide | None = allow_all
    async_decide = None
    if args.decide == "naive":
        decide = naive_decider(args.issuer)
    elif args.decide == "introspect":
        decide, async_decide = None, introspecting_decider(args.issuer)
    loop = asyncio.get_running_loop()
    server = None
    if args.grpc and decide is not None:
        options = [("grpc.so_reuseport", 1)]
        if args.settings == "verifier":
            from verifier.doors.grpc import server_options
            from verifier.settings import DEFAULT_GRPC_MAX_CONCURRENT_STREAMS

            options = server_options(DEFAULT_GRPC_MAX_CONCURRENT_STREAMS, reuse_port=True)
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers(_grpc_handlers(decide))
        server.add_insecure_port(args.grpc)
        await server.start()
    host, _, port = args.http.rpartition(":")
    await loop.create_server(
        lambda: HttpForwardAuth(decide, async_decide), host, int(port), reuse_port=True, backlog=1024
    )
    if args.settings == "verifier":
        from verifier import gc_policy

        gc_policy.settle()

    async def pause_forever() -> None:
        while True:
            await asyncio.sleep(args.pause_every_ms / 1000)
            time.sleep(args.pause_ms / 1000)  # blocking on purpose: every connection stalls, as in a GC pause

    pauser = loop.create_task(pause_forever()) if args.pause_ms > 0 else None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if pauser is not None:
        pauser.cancel()
    if server is not None:
        await server.stop(0)


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("--http", required=True, help="host:port for HTTP/1.1 forward-auth")
    parser.add_argument("--grpc", help="host:port for both gRPC Check services (not with introspect)")
    parser.add_argument("--decide", choices=["noop", "naive", "introspect"], default="noop")
    parser.add_argument("--issuer", default="", help="the provider's URL (naive, introspect)")
    parser.add_argument("--settings", choices=["defaults", "verifier"], default="defaults", help="GC, gRPC options")
    parser.add_argument("--pause-ms", type=float, default=0.0, help="freeze the loop this long ...")
    parser.add_argument("--pause-every-ms", type=float, default=1000.0, help="... this often")
    args = parser.parse_args(argv)
    if args.settings == "verifier":
        from verifier import gc_policy

        gc_policy.tune()
    import uvloop

    uvloop.install()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
