"""Before listening: is each configured address free? One plain line naming the key to change, not a traceback.

The check binds each address the way the doors will (SO_REUSEADDR, and SO_REUSEPORT when workers share
the ports, when the caller asks) and lets go at once. `verifier serve` asks without SO_REUSEPORT, so any
holder makes the bind fail with EADDRINUSE, another verifier sharing the port included: two processes on one
port would split its connections between two configurations. Its own workers share the ports (and a SIGHUP
successor starts beside its predecessor) without passing through this check.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable


def bind_error(host: str, port: int, *, reuse_port: bool = False) -> OSError | None:
    """Why `host:port` cannot be listened on now (None: it can)."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host!r} ({exc.strerror})")
    family, kind, proto, _, address = infos[0]
    with contextlib.closing(socket.socket(family, kind, proto)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return exc
    return None


def first_problem(listeners: Iterable[tuple[str, str, int]], *, reuse_port: bool = False) -> str | None:
    """One line for the first (what-to-change, host, port) that cannot be listened on, or None."""
    for change, host, port in listeners:
        exc = bind_error(host, port, reuse_port=reuse_port)
        if exc is None:
            continue
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            return f"{where} is already in use by another program; stop it or change {change}"
        if exc.errno == errno.EACCES:
            return f"{where}: permission denied (ports below 1024 need privileges); change {change}"
        return f"{where}: cannot listen ({exc.strerror or exc}); change {change}"
    return None
