"""The one thing every front door returns, and the one place refusals become protocol answers.

`refuse()` maps a `VerifierError` to status, challenge and body: RFC 6750 section 3 for Bearer,
RFC 9449 section 7.1 for DPoP, RFC 9470 for step-up. No front door builds a challenge of its own.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection

from verifier.errors import Outcome, Scheme, VerifierError
from verifier.principal import Principal

Headers = tuple[tuple[str, str], ...]

STATUS_BY_OUTCOME = {
    Outcome.UNAUTHENTICATED: 401,
    Outcome.FORBIDDEN: 403,
    Outcome.RATE_LIMITED: 429,
    Outcome.UNAVAILABLE: 503,
    Outcome.BAD_REQUEST: 400,
}
REASON_HEADER = "x-verifier-reason"
IDENTITY_PREFIX = "x-authenticated-"  # reserved: only an allow answer of ours may set these upstream
RETRY_AFTER_UNAVAILABLE = "1"  # seconds; providers usually come back quickly or not at all


@dataclasses.dataclass(frozen=True)
class Decision:
    """Allow or refuse, with everything a door needs to answer the gateway."""

    allowed: bool
    status: int
    reason: str  # stable code: "ok" or a VerifierError code
    upstream_headers: Headers = ()  # set on the upstream request when allowed
    response_headers: Headers = ()  # returned to the client when refused
    body: bytes = b""
    subject: str = ""
    roles: tuple[str, ...] = ()
    cache_max_age: int = 0  # seconds a gateway may reuse this decision; 0 = no-store
    # Serialized forms built once per decision by the doors (HTTP head, gRPC answers); a cached
    # decision is therefore answered without re-serializing anything.
    memo: dict[str, bytes] = dataclasses.field(default_factory=dict, compare=False, repr=False, hash=False)

    @property
    def outcome(self) -> str:
        """The metric label: allow, deny or error."""
        if self.allowed:
            return "allow"
        return "error" if self.status >= 500 else "deny"

    @property
    def http_head(self) -> bytes:
        """The serialized HTTP/1.1 status line and headers of the forward-auth answer (built once)."""
        head = self.memo.get("http")
        if head is None:
            head = self.memo["http"] = self._http_head()
        return head

    def _http_head(self) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_PHRASES.get(self.status, 'Status')}"]
        headers = self.upstream_headers if self.allowed else self.response_headers
        lines.extend(f"{name}: {value}" for name, value in headers)
        lines.append(f"{REASON_HEADER}: {self.reason}")
        lines.append(
            f"cache-control: private, max-age={self.cache_max_age}"
            if self.cache_max_age > 0
            else "cache-control: no-store"
        )
        if self.body:
            lines.append("content-type: application/json")
        lines.append(f"content-length: {len(self.body)}")
        # Claims may hold any Unicode: UTF-8 keeps identities distinct (obs-text to HTTP parsers).
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")


_PHRASES = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


def _quoted(text: str) -> str:
    """Keeps only the characters RFC 6750 section 3 allows inside error_description."""
    return "".join(c for c in text if c in _SAFE)[:200]


_SAFE = frozenset(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\')


def challenge(scheme: Scheme, realm: str, params: dict[str, str | int]) -> str:
    """A `WWW-Authenticate` value: `Scheme realm="...", key="value", n=5`."""
    parts = [f'realm="{_quoted(realm)}"']
    parts += [f"{k}={v}" if isinstance(v, int) else f'{k}="{_quoted(v)}"' for k, v in params.items()]
    return f"{scheme.value} " + ", ".join(parts)


def refuse(
    error: VerifierError,
    *,
    realm: str,
    scheme: Scheme | None = None,
    dpop_algs: str = "",
    reusable_for: int = 0,
) -> Decision:
    """Maps a refusal to its answer: the only place that does.

    `scheme` overrides the error's own (a request that came with DPoP is answered with a DPoP
    challenge, RFC 9449 section 7.1); `dpop_algs` lists the proof algorithms we accept.
    """
    status = STATUS_BY_OUTCOME[error.outcome]
    headers: list[tuple[str, str]] = []
    body: dict[str, object] = {}
    if error.outcome is Outcome.UNAVAILABLE:
        headers.append(("retry-after", RETRY_AFTER_UNAVAILABLE))
        body = {"error": "temporarily_unavailable", "error_description": _quoted(error.description)}
    elif error.outcome is Outcome.RATE_LIMITED:
        body = {"error": "rate_limited", "error_description": _quoted(error.description)}
    else:
        used = error.scheme if error.scheme is not Scheme.BEARER else (scheme or Scheme.BEARER)
        params: dict[str, str | int] = {}
        if error.oauth_error is not None:
            params = {"error": error.oauth_error, "error_description": error.description}
            body = {"error": error.oauth_error, "error_description": _quoted(error.description)}
        params.update(error.challenge_params())
        if used is Scheme.DPOP and dpop_algs:
            params["algs"] = dpop_algs
        headers.append(("www-authenticate", challenge(used, realm, params)))
    headers.extend(error.extra_headers())
    body.update(error.extra_body())
    return Decision(
        allowed=False,
        status=status,
        reason=error.code,
        response_headers=tuple(headers),
        body=json.dumps(body).encode() if body else b"",
        cache_max_age=reusable_for if error.reusable else 0,
    )


def allow(principal: Principal, *, cache_max_age: int = 0) -> Decision:
    """The allow answer: identity headers for the upstream, the token left untouched."""
    headers: list[tuple[str, str]] = [
        ("x-authenticated-userid", principal.subject),
        ("x-authenticated-scope", principal.scope),
        ("x-authenticated-issuer", principal.issuer),
    ]
    if principal.roles:
        headers.append(("x-authenticated-roles", ",".join(sorted(principal.roles))))
    return Decision(
        allowed=True,
        status=200,
        reason="ok",
        upstream_headers=tuple((k, _header_safe(v)) for k, v in headers),
        subject=principal.subject,
        roles=tuple(sorted(principal.roles)),
        cache_max_age=cache_max_age,
    )


def smuggled_identity(decision: Decision, request_headers: Collection[str]) -> list[str]:
    """The request's `X-Authenticated-*` names (lower-case) that this allow answer does not overwrite.

    A client sending one is trying to pass as someone: the door tells the gateway to remove it.
    Empty in the common case, found by one scan of the joined names.
    """
    if IDENTITY_PREFIX not in "\n".join(request_headers):  # one C-level scan: the common case
        return []
    names = [name for name in request_headers if name.startswith(IDENTITY_PREFIX)]
    ours = {name for name, _ in decision.upstream_headers}
    return sorted({name for name in names if name not in ours})


def _header_safe(value: str) -> str:
    """Claims go into headers: strip CR/LF and other controls so no claim can inject a header."""
    if value.isprintable():  # the common case: nothing to strip (controls are never printable)
        return value
    return "".join(c for c in value if c >= " " and c != "\x7f")
