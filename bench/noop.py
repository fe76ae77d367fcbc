"""Baseline servers on the verifier's own stack: they answer every door and decide nothing.

``python -m bench.noop --grpc 127.0.0.1:P --http 127.0.0.1:Q`` serves

* both gRPC Check services (``verifier.v1.Verifier`` and Envoy's ``Authorization``) on grpc.aio over
  uvloop, answering a pre-serialized allow, and
* HTTP/1.1 forward-auth on an asyncio ``Protocol`` + httptools, answering ``200`` with keep-alive.

It is the ceiling for the verifier on the same front door. ``--pause-ms``/``--pause-every-ms`` freeze
the whole event loop periodically: a server that stalls, for checking that the open-loop generator
does not hide the stall (coordinated omission). ``--decide naive`` swaps the allow for the naive
design a user would write (see bench/naive.py) on the same stack, so only the design differs.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

import grpc
import httptools

from bench import wire

Decide = Callable[[str], bool]  # Authorization header value -> allowed

HTTP_ALLOW = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Verifier-Reason: ok\r\n\r\n"
HTTP_DENY = (
    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nX-Verifier-Reason: invalid_token\r\n"
    b'WWW-Authenticate: Bearer realm="verifier", error="invalid_token"\r\n\r\n'
)


def allow_all(_authorization: str) -> bool:
    """The no-op decision."""
    return True


class HttpForwardAuth(asyncio.Protocol):
    """A lean HTTP/1.1 forward-auth endpoint: parse with httptools, answer a canned response."""

    def __init__(self, decide: Decide) -> None:
        self._decide = decide
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._authorization = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            assert self._transport is not None
            self._transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self._transport.close()

    def on_message_begin(self) -> None:
        self._authorization = ""

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 13 and name.lower() == b"authorization":
            self._authorization = value.decode("latin-1")

    def on_message_complete(self) -> None:
        assert self._transport is not None
        allowed = self._decide(self._authorization)
        self._transport.write(HTTP_ALLOW if allowed else HTTP_DENY)
        if not self._parser.should_keep_alive():
            self._transport.close()


def _grpc_handlers(decide: Decide) -> list[grpc.GenericRpcHandler]:
    """Generic handlers on raw bytes: no (de)serialization cost beyond what ``decide`` needs."""
    if decide is allow_all:

        async def verifier_check(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            return wire.VERIFIER_ALLOW

        async def envoy_check(_request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            return wire.ENVOY_ALLOW

    else:

        async def verifier_check(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            authz = wire.verifier_authorization(request)
            return wire.VERIFIER_ALLOW if decide(authz) else wire.VERIFIER_DENY

        async def envoy_check(request: bytes, _context: grpc.aio.ServicerContext) -> bytes:
            return wire.ENVOY_ALLOW if decide(wire.envoy_authorization(request)) else wire.ENVOY_DENY

    return [
        grpc.method_handlers_generic_handler(
            "verifier.v1.Verifier", {"Check": grpc.unary_unary_rpc_method_handler(verifier_check)}
        ),
        grpc.method_handlers_generic_handler(
            "envoy.service.auth.v3.Authorization", {"Check": grpc.unary_unary_rpc_method_handler(envoy_check)}
        ),
    ]


async def _pause_forever(pause_s: float, every_s: float) -> None:
    """Freeze the event loop for ``pause_s`` every ``every_s``: a deliberately stalling server."""
    while True:
        await asyncio.sleep(every_s)
        time.sleep(pause_s)  # blocking on purpose: every connection stalls, as in a GC pause


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


async def serve(
    *, grpc_addr: str | None, http_addr: str | None, decide: Decide, pause_ms: float, pause_every_ms: float
) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    server = None
    if grpc_addr:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        server.add_generic_rpc_handlers(_grpc_handlers(decide))
        server.add_insecure_port(grpc_addr)
        await server.start()
    if http_addr:
        host, port = _split(http_addr)
        await loop.create_server(lambda: HttpForwardAuth(decide), host, port, reuse_port=True, backlog=1024)
    pauser = loop.create_task(_pause_forever(pause_ms / 1000, pause_every_ms / 1000)) if pause_ms > 0 else None
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    if pauser is not None:
        pauser.cancel()
    if server is not None:
        await server.stop(0)


def _run_worker(args: argparse.Namespace) -> None:
    decide: Decide = allow_all
    if args.decide == "naive":
        from bench.naive import naive_decider

        decide = naive_decider(args.issuer)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a bench dependency
        pass
    asyncio.run(
        serve(
            grpc_addr=args.grpc,
            http_addr=args.http,
            decide=decide,
            pause_ms=args.pause_ms,
            pause_every_ms=args.pause_every_ms,
        )
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench.noop", description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", help="host:port for both gRPC Check services")
    parser.add_argument("--http", help="host:port for HTTP/1.1 forward-auth")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the ports (SO_REUSEPORT)")
    parser.add_argument("--pause-ms", type=float, default=0.0, help="freeze the loop this long ...")
    parser.add_argument("--pause-every-ms", type=float, default=1000.0, help="... this often")
    parser.add_argument("--decide", choices=["noop", "naive"], default="noop")
    parser.add_argument("--issuer", help="issuer URL (naive mode fetches its JWKS per request)")
    args = parser.parse_args(argv)
    if args.workers <= 1:
        _run_worker(args)
        return
    # Fork before any gRPC object exists: gRPC core does not survive a fork.
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_run_worker, args=(args,), daemon=True) for _ in range(args.workers)]
    for w in workers:
        w.start()

    def _stop(_sig: int, _frame: object) -> None:
        for w in workers:
            if w.pid:
                os.kill(w.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    for w in workers:
        w.join()
    sys.exit(0)


if __name__ == "__main__":
    main()
