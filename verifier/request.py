"""The attributes every front door produces from the gateway's request: the pipeline's only input.

Every door normalizes the host the same way (`normalize_authority`) so that `ADMIN.example.test.` and
`admin.example.test:443` meet the policy written for `admin.example.test` (RFC 9110 section 4.2.3:
the host is case-insensitive; RFC 1034 section 3.1: a trailing dot names the same absolute domain;
RFC 3986 section 6.2.3: the scheme's default port is the same as none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple


class Undescribed(Exception):
    """A check whose original path nothing tells: forward-auth asked with neither the declared family's path header
    nor a path after `/v1/forward-auth`, a gRPC Check whose path is empty. Judged as `/` it was `GET /` for every
    request (a public `/` then passed them all), so every door refuses it, 400 `invalid_request`, never a check
    (`Pipeline.undescribed`). Also, when policies name hosts, a check that tells no host: forward-auth without the
    family's host header (judged on its `Host`, behind nginx the verifier's own upstream name), a gRPC Check with an
    empty host; it met none of its host's policies and fell to a laxer one.
    `missing` names what the gateway did not send, as the refusal's description says it."""

    def __init__(self, missing: str) -> None:
        super().__init__(missing)
        self.missing = missing


class DescribedTwice(Exception):
    """An Envoy check in which `x-forwarded-proto`, the one header that door reads the request's description from,
    came more than once: a comma in its value (Envoy joins a repeat so, in either header form; two `header_map` lines
    or two spellings of the name, joined by the door). Which one describes the request is unknown: refused, 400
    `invalid_request`, never a check (`Pipeline.described_twice`), as forward-auth refuses a header of its declared
    family sent twice (which it tells from its lines, without this exception). `name` is the header."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


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


# The schemes a request or an origin is judged under, and the port each is on when none is written (RFC 3986
# section 6.2.3): the one table, read by every module that leaves a default port out.
DEFAULT_PORTS = {"http": 80, "https": 443}
_DEFAULT_PORT_SUFFIXES = {scheme: f":{port}" for scheme, port in DEFAULT_PORTS.items()}


def normalize_authority(host: str, scheme: str) -> str:
    """`normalize_host`, and the scheme's default port left out (RFC 3986 section 6.2.3: `https://api:443/` is
    `https://api/`): one spelling whichever door the request came through, whether its gateway sends the port
    apart (Kong), within the host (nginx's X-Original-Host, Envoy's :authority) or not at all. What reads the
    host with its port (a WebAuthn challenge's request binding) then binds one request to one host."""
    host = normalize_host(host)
    default = _DEFAULT_PORT_SUFFIXES.get(scheme)
    return host[: -len(default)] if default is not None and host.endswith(default) else host


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
