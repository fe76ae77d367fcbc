"""Small HTTP endpoints beside forward-auth (WebAuthn ceremonies, SSF push, the admin API).

These are not the hot path: the forward-auth door parses the request and hands it here whole.
Handlers are registered by the composition root; the door knows nothing of what they do.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from verifier import strict_json

_PHRASES = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclasses.dataclass(frozen=True, slots=True)
class HttpRequest:
    """A whole request to one of the small endpoints."""

    method: str
    path: str  # without the query
    query: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    peer: str = ""

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not, or is JSON read two ways (`verifier.strict_json`):
        not UTF-8, an object naming a member twice, NaN/Infinity, or a lone surrogate escaped in a string."""
        return strict_json.loads(self.body or b"null")


@dataclasses.dataclass(frozen=True, slots=True)
class HttpAnswer:
    """What a handler returns."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    @classmethod
    def json(cls, status: int, document: Any, headers: tuple[tuple[str, str], ...] = ()) -> HttpAnswer:
        """A JSON answer."""
        return cls(
            status,
            (("content-type", "application/json"), ("cache-control", "no-store"), *headers),
            json.dumps(document).encode(),
        )

    def serialize(self, keep_alive: bool, *, head: bool = False) -> bytes:
        """HTTP/1.1 bytes; `head`: the answer to a HEAD request, its content left out (RFC 9110 section 9.3.2)."""
        lines = [f"HTTP/1.1 {self.status} {_PHRASES.get(self.status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in self.headers]
        lines.append(f"content-length: {len(self.body)}")
        if not keep_alive:
            lines.append("connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else self.body)


Handler = Callable[[HttpRequest, Mapping[str, str]], Awaitable[HttpAnswer]]


class Router:
    """Exact paths and `{name}` segments, by method."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, tuple[str, ...], Handler]] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Registers `handler` for `method` on `pattern` (e.g. `/v1/webauthn/credentials/{id}`)."""
        self._routes.append((method.upper(), tuple(pattern.strip("/").split("/")), handler))

    def __bool__(self) -> bool:
        return bool(self._routes)

    async def dispatch(self, request: HttpRequest) -> HttpAnswer:
        """Runs the matching handler; 404/405 otherwise. Handlers' own errors are theirs to map."""
        parts = tuple(request.path.strip("/").split("/"))
        allowed = False
        for method, pattern, handler in self._routes:
            params = _match(pattern, parts)
            if params is None:
                continue
            if method != request.method:
                allowed = True
                continue
            return await handler(request, params)
        return HttpAnswer.json(405 if allowed else 404, {"error": "method_not_allowed" if allowed else "not_found"})


def _match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(parts):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, parts, strict=True):
        if want.startswith("{") and want.endswith("}"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params
