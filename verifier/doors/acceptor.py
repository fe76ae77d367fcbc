"""Accepting connections at the forward-auth door: every one waiting, each time the loop polls.

uvloop's servers (libuv) accept ONE connection each time the loop polls a listening socket. Under a flood a
loop turn is long (it reads every ready connection, and a first-seen token costs a signature check), so a
burst of new connections waits in the kernel's accept queue one turn per connection: wrk's opening 1,000
connections against first-seen tokens left ~500 queued for over 5 s, draining one per turn (`ss -ltn`'s
Recv-Q), and their first answers came 4-5 s late although the door sheds past 0.25 s of loop time.

Here the door owns its listening sockets: each time one is readable, every connection waiting is accepted
(up to `MAX_PER_TURN`) and handed to the loop (`connect_accepted_socket`), so a new connection waits at most
about one loop turn like the requests already open. Out of file descriptors, accepting pauses for
`RETRY_SECONDS` (as asyncio's own servers do) instead of spinning on a socket that stays readable.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger("verifier.forward_auth")

BACKLOG = 2048  # the kernel's accept queue per listening socket (capped by net.core.somaxconn)
MAX_PER_TURN = BACKLOG  # connections accepted per readable event: the whole queue
RETRY_SECONDS = 1.0  # out of file descriptors: stop accepting this long
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def listening_sockets(host: str, port: int, *, reuse_port: bool) -> list[socket.socket]:
    """Non-blocking listening sockets for every address `host` names (as `loop.create_server` binds them)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """Accepts on `sockets` and opens each connection with `protocol` (TLS when given a context)."""

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol: Callable[[], asyncio.Protocol],
        *,
        tls: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
    ) -> None:
        self.sockets = sockets
        self._protocol = protocol
        self._tls = tls
        self._handshake_timeout = handshake_timeout if tls is not None else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: set[asyncio.Task[object]] = set()  # connections being opened (a TLS handshake)

    def start(self) -> None:
        """Starts accepting on the running loop."""
        self._loop = asyncio.get_running_loop()
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stops accepting and closes the listening sockets; connections being opened are dropped."""
        self._stop_accepting()
        for task in list(self._opening):
            task.cancel()

    async def drain(self, timeout: float) -> None:
        """Stops accepting and closes this process's listening sockets (a socket the supervisor bound stays
        open in it and in the worker's successor, which accepts what is still queued); the connections being
        opened get up to `timeout` seconds to open, the rest are dropped."""
        self._stop_accepting()
        if self._opening:
            await asyncio.wait(list(self._opening), timeout=timeout)
        for task in list(self._opening):
            task.cancel()

    def _stop_accepting(self) -> None:
        loop, self._loop = self._loop, None
        for sock in self.sockets:
            if loop is not None and sock.fileno() != -1:
                loop.remove_reader(sock.fileno())
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        loop = self._loop
        if loop is None:
            return
        for _ in range(MAX_PER_TURN):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except ConnectionAbortedError:
                continue  # reset before we got to it
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.warning("accept paused: %s", exc, extra={"event": "accept_paused"})
                    loop.remove_reader(listener.fileno())
                    loop.call_later(RETRY_SECONDS, self._resume, listener)
                else:
                    log.error("accept failed: %s", exc, extra={"event": "accept_failed"})
                return
            conn.setblocking(False)
            task: asyncio.Task[object] = loop.create_task(
                loop.connect_accepted_socket(
                    self._protocol, conn, ssl=self._tls, ssl_handshake_timeout=self._handshake_timeout
                )
            )
            self._opening.add(task)
            task.add_done_callback(self._opened)

    def _resume(self, listener: socket.socket) -> None:
        if self._loop is not None and listener.fileno() != -1:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def _opened(self, task: asyncio.Task[object]) -> None:
        """A connection is open (its protocol has it), or its TLS handshake failed: nothing more to do here."""
        self._opening.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("connection not opened: %s", task.exception(), extra={"event": "connection_not_opened"})
