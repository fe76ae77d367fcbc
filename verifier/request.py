"""The attributes every front door produces from the gateway's request: the pipeline's only input."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class RequestAttributes(NamedTuple):
    """The original request as the gateway saw it. Header names are lower-case.

    A NamedTuple rather than a frozen dataclass: it is built once per request on the hot path,
    and a tuple is immutable and several times cheaper to construct.
    """

    method: str
    scheme: str
    host: str
    path: str  # path and query as received
    headers: Mapping[str, str]
    client_address: str = ""
    client_cert_thumbprint: str = ""  # base64url SHA-256 of the DER certificate (RFC 8705 x5t#S256)

    @property
    def route(self) -> str:
        """`METHOD /path` without the query: safe for audit lines (queries can carry secrets)."""
        return f"{self.method} {self.path.split('?', 1)[0]}"
