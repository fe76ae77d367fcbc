"""The attributes every front door produces from the gateway's request: the pipeline's only input.

Every door normalizes the host the same way (`normalize_host`) so that `ADMIN.example.test.` and
`admin.example.test:443` meet the policy written for `admin.example.test` (RFC 9110 section 4.2.3:
the host is case-insensitive; RFC 1034 section 3.1: a trailing dot names the same absolute domain).
"""

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


def normalize_host(host: str) -> str:
    """`Host` as one spelling: lower-case, one trailing dot dropped (before the port); the port is kept.

    The port stays because DPoP's `htu` (RFC 9449) is compared with it; policies use `host_name`.
    """
    host = host.lower()
    if host.endswith("."):
        return host[:-1]
    colon = host.rfind(":")
    if colon > 0 and host[colon - 1] == "." and "]" not in host[colon:]:
        return host[: colon - 1] + host[colon:]
    return host


def host_name(host: str) -> str:
    """The host without its port (`[::1]:8443` -> `[::1]`, `api:443` -> `api`), for policy matching."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    return host.partition(":")[0]


def a_label(name: str) -> str:
    """A host name as clients send it: an internationalized name in its ASCII form (RFC 5890 A-labels,
    `bücher.example` -> `xn--bcher-kva.example`: browsers, curl and HTTP libraries convert it before it reaches
    `Host`); "" for a name without one. An ASCII name is returned as it is."""
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return ""
