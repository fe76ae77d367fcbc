"""The forward-auth door accepts every connection waiting, each loop turn, on uvloop (what `verifier serve` runs):
uvloop's own servers take one per turn, so under a flood (long turns) a burst of new connections waited in the
kernel's accept queue for seconds. Counted in loop turns, never timed."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import uvloop
from doorkit import running_verifier

from verifier.doors import acceptor

WAITING = 200  # connections opened while the loop does not run: all in the kernel's accept queue
TURNS = 8  # loop turns in which every one of them must be accepted (uvloop alone: one per turn)
REQUEST = b"GET /livez HTTP/1.1\r\nHost: v\r\n\r\n"


async def _turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)  # one loop turn each: uvloop polls every turn


def _accept_queue(port: int) -> int:
    """Connections the kernel holds for the listening socket on `port` (Linux: a LISTEN row's rx_queue)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
            return int(fields[4].split(":")[1], 16)
    return 0


def _until_queued(port: int, count: int) -> None:
    """Blocks (the loop does not run) until the kernel has queued `count` connections; waits on the kernel's state."""
    deadline = time.monotonic() + 30
    while _accept_queue(port) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _accept_queue(port) == count


def _answered(sock: socket.socket) -> bool:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
    return data.startswith(b"HTTP/1.1 200")


async def _waiting_connections_accepted_within_turns() -> tuple[int, int]:
    async with running_verifier() as (app, _):
        door = app.forward_auth
        already = len(door.connections)
        # Blocking connects while the loop does not run: the kernel completes each handshake and queues it.
        socks = [socket.create_connection(("127.0.0.1", app.ports.http), 10) for _ in range(WAITING)]
        try:
            for sock in socks:
                sock.sendall(REQUEST)
            _until_queued(app.ports.http, WAITING)  # the loop still does not run
            await _turns(TURNS)
            accepted = len(door.connections) - already
            answered = sum(await asyncio.to_thread(lambda: [_answered(s) for s in socks]))
        finally:
            for sock in socks:
                sock.close()
    return accepted, answered


def test_connections_waiting_to_be_accepted_are_all_accepted_within_a_few_loop_turns_on_uvloop() -> None:
    accepted, answered = uvloop.run(_waiting_connections_accepted_within_turns())
    assert accepted == WAITING, f"{accepted} of {WAITING} accepted in {TURNS} loop turns"
    assert answered == WAITING  # and every one of them served


async def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning() -> None:
    # accept() failing with EMFILE leaves the socket readable: without the pause the loop would spin on it.
    listener = acceptor.listening_sockets("127.0.0.1", 0, reuse_port=False)[0]

    class Exhausted(socket.socket):
        def accept(self) -> tuple[socket.socket, object]:
            raise OSError(24, "Too many open files")

    exhausted = Exhausted(fileno=listener.detach())
    acc = acceptor.Acceptor([exhausted], asyncio.Protocol)
    acc.start()
    try:
        client = socket.create_connection(exhausted.getsockname(), 5)
        await _turns(TURNS)
        assert asyncio.get_running_loop().remove_reader(exhausted.fileno()) is False  # paused, not watched
        client.close()
    finally:
        acc.close()
