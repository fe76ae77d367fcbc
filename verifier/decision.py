"""The one thing every front door returns: allow (`allow()`) or a refusal.

Refusals are built by `verifier.doors.refusals.refuse`, the one place a `VerifierError` becomes an
answer (status, challenge, body).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

from verifier.principal import Principal
from verifier.reasons import ALLOW

Headers = tuple[tuple[str, str], ...]

REASON_HEADER = "x-verifier-reason"
IDENTITY_PREFIX = "x-authenticated-"  # reserved: only an allow answer of ours may set these upstream


_FIELDS = (
    "allowed",
    "status",
    "reason",
    "upstream_headers",
    "answer_headers",
    "response_headers",
    "client_headers",
    "body",
    "subject",
    "roles",
    "cache_max_age",
    "fresh_until",
    "renew_at",
    "memo",
)
_COMPARED = _FIELDS[:-1]  # equality, hashing and repr leave the memo out


class _Slots:
    """A decision's fields: slots (no `__dict__`), written once, by `_built`."""

    __slots__ = _FIELDS

    allowed: bool
    status: int
    reason: str  # stable code: "ok" or a catalogued refusal code (verifier.reasons)
    upstream_headers: Headers  # set on the upstream request when allowed
    # For the gateway itself on an allow (the Kong consumer to authenticate: X-Kong-Consumer-*), never set
    # on the upstream request: forward-auth answer headers, our gRPC `answer_headers`, not Envoy's.
    answer_headers: Headers
    response_headers: Headers  # returned to the client when refused
    # Returned to the client with an allow: what a per-request check tells it (the rate-limit state, the next
    # DPoP nonce: `verifier.checks.base.Passed`). Only on an answer built for one request (no-store).
    client_headers: Headers
    body: bytes
    subject: str
    roles: tuple[str, ...]
    cache_max_age: int  # seconds a gateway may reuse this decision; 0 = no-store
    # Epoch seconds: a stored allow is answered as it is, with its max-age, while at least that max-age
    # is left before this (its token's `exp`; with an identity assertion, its renewal plus the max-age).
    fresh_until: float
    renew_at: float  # its identity assertion is re-minted from here on (inf: it has none)
    # Serialized forms built once per decision by the doors (HTTP head, gRPC answers); a cached
    # decision is therefore answered without re-serializing anything. Its own: never shared with a copy.
    memo: dict[str, bytes]


def _built(
    cls: type[Decision],
    allowed: bool,
    status: int,
    reason: str,
    upstream_headers: Headers,
    answer_headers: Headers,
    response_headers: Headers,
    client_headers: Headers,
    body: bytes,
    subject: str,
    roles: tuple[str, ...],
    cache_max_age: int,
    fresh_until: float,
    renew_at: float,
    memo: dict[str, bytes],
) -> Decision:
    """A `cls` with these fields. Written as a `_Slots` (plain slot stores, which `Decision.__setattr__` would
    refuse), then made a `cls` (the same layout): ~0.3 us, where 14 `object.__setattr__` calls cost ~1.2."""
    made = object.__new__(_Slots)
    made.allowed = allowed
    made.status = status
    made.reason = reason
    made.upstream_headers = upstream_headers
    made.answer_headers = answer_headers
    made.response_headers = response_headers
    made.client_headers = client_headers
    made.body = body
    made.subject = subject
    made.roles = roles
    made.cache_max_age = cache_max_age
    made.fresh_until = fresh_until
    made.renew_at = renew_at
    made.memo = memo
    made.__class__ = cls
    return made  # type: ignore[return-value]  # a `cls` since the line above


class Decision(_Slots):
    """Allow or refuse, with everything a door needs to answer the gateway. Immutable (`_replace` for a changed
    copy, with a memo of its own).

    Slots, not a frozen dataclass: an allow is built for every first-seen token and lives in the verified-token
    cache as long as its token, and the cyclic garbage collector walks every tracked object the cache holds each
    time it collects their generation. With no `__dict__` a decision is one tracked object instead of two. Not a
    `NamedTuple` either (also one object, built as fast): the doors read a cached decision's fields on every
    request, and a slot read costs ~8 ns where a named tuple's field costs ~19 and a `__dict__` attribute ~9.
    """

    __slots__ = ()
    _fields = _FIELDS

    def __new__(
        cls,
        allowed: bool,
        status: int,
        reason: str,
        upstream_headers: Headers = (),
        answer_headers: Headers = (),
        response_headers: Headers = (),
        client_headers: Headers = (),
        body: bytes = b"",
        subject: str = "",
        roles: tuple[str, ...] = (),
        cache_max_age: int = 0,
        fresh_until: float = math.inf,
        renew_at: float = math.inf,
        memo: dict[str, bytes] | None = None,
    ) -> Decision:
        return _built(
            cls,
            allowed,
            status,
            reason,
            upstream_headers,
            answer_headers,
            response_headers,
            client_headers,
            body,
            subject,
            roles,
            cache_max_age,
            fresh_until,
            renew_at,
            {} if memo is None else memo,
        )

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Decision is immutable; use _replace() ({name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Decision is immutable ({name})")

    def _replace(self, **changes: Any) -> Decision:
        """A copy with `changes`, and a memo of its own unless one is given (a copy answers differently)."""
        values = {name: getattr(self, name) for name in _COMPARED}
        values["memo"] = {}
        unknown = changes.keys() - values.keys()
        if unknown:
            raise TypeError(f"Decision has no field {sorted(unknown)}")
        values.update(changes)
        return _built(type(self), **values)

    def _compared(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in _COMPARED)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Decision) and self._compared() == other._compared()

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self._compared())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value!r}" for name, value in zip(_COMPARED, self._compared(), strict=True))
        return f"Decision({fields})"

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

    def head_once(self) -> bytes:
        """`http_head`, built without storing it when not built yet: for a caller that memoizes the whole answer
        (the forward-auth door), so that a cached allow does not hold its head twice."""
        head = self.memo.get("http")
        return self._http_head() if head is None else head

    def _http_head(self) -> bytes:
        if self.allowed:
            headers = self.upstream_headers + self.answer_headers + self.client_headers
        else:
            headers = self.response_headers
        # Claims may hold any Unicode: UTF-8 keeps identities distinct (obs-text to HTTP parsers).
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("utf-8")
        return _status_line(self.status) + fields + _closing_lines(self.reason, self.cache_max_age, len(self.body))


_PHRASES = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    503: "Service Unavailable",
}
# The head's lines that many answers share (an allow's head is built for every first-seen token): the status
# line, and the reason, reuse and length lines, written once per status and per (reason, max-age, body length).
_STATUS_LINES: dict[int, bytes] = {}
_CLOSING_LINES: dict[tuple[str, int, int], bytes] = {}
MAX_CLOSING_LINES = 4096  # (reason, max-age, length) triples kept; past it, written anew each time


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {_PHRASES.get(status, 'Status')}\r\n".encode("ascii")
    return line


def _closing_lines(reason: str, age: int, length: int) -> bytes:
    key = (reason, age, length)
    lines = _CLOSING_LINES.get(key)
    if lines is None:
        # nginx's proxy_cache ignores a `private` answer: X-Accel-Expires (nginx reads it first and then
        # skips Cache-Control; it never passes it on) sets its auth cache's lifetime. nginx keeps an entry
        # through the whole second it expires in, so N-1 there is reuse for at most N seconds, never more.
        reuse = (
            f"x-accel-expires: {age - 1}\r\ncache-control: private, max-age={age}\r\n"
            if age > 0
            else "x-accel-expires: 0\r\ncache-control: no-store\r\n"
        )
        typed = "content-type: application/json\r\n" if length else ""
        lines = f"{REASON_HEADER}: {reason}\r\n{reuse}{typed}content-length: {length}\r\n".encode()
        if len(_CLOSING_LINES) < MAX_CLOSING_LINES:
            _CLOSING_LINES[key] = lines
    return lines


def allow(
    principal: Principal,
    *,
    cache_max_age: int = 0,
    headers: Headers = (),
    answer_headers: Headers = (),
    renew_at: float = math.inf,
) -> Decision:
    """The allow answer: identity headers for the upstream, the token left untouched.

    `headers` (mapped claims, the identity assertion) and `answer_headers` come rendered and checked
    (`verifier.upstream`); the fixed four are built here. With an identity assertion, `renew_at` is when
    a fresh one is minted instead: the answer is handed out until then, and reused for its max-age at most.
    """
    roles = tuple(sorted(principal.roles)) if principal.roles else ()
    subject, scope, issuer = principal.subject, " ".join(principal.scopes), principal.issuer
    # Each one written by the same rule (`_identity_value`), the common case inline (one allow per first-seen
    # token): printable, no edge space, no leading quote. Scopes and the issuer too: `scopes_of` keeps only
    # printable scopes, but a scope `"admin"` (from a token's `scope`) read by an upstream that unquotes is `admin`.
    fixed: Headers = (
        (
            "x-authenticated-userid",
            subject
            if subject.isprintable() and subject[:1] not in (" ", '"') and subject[-1:] != " "
            else _identity_value(subject),
        ),
        (
            "x-authenticated-scope",
            scope
            if scope.isprintable() and scope[:1] not in (" ", '"') and scope[-1:] != " "
            else _identity_value(scope),
        ),
        (
            "x-authenticated-issuer",
            issuer
            if issuer.isprintable() and issuer[:1] not in (" ", '"') and issuer[-1:] != " "
            else _identity_value(issuer),
        ),
    )
    if roles:
        joined = ",".join(roles)
        # A role holding a comma, a quote, a backslash or a space: each one looked at (`list_element`).
        if '"' in joined or "\\" in joined or " " in joined or joined.count(",") >= len(roles):
            joined = ",".join([list_element(header_safe(role)) for role in roles])
        elif not joined.isprintable():
            joined = header_safe(joined)  # a control replaced makes no comma, quote or space
        fixed += (("x-authenticated-roles", joined),)
    # Positional (the field order of `Decision`): one allow is built for every first-seen token.
    return Decision(
        True,  # allowed
        200,  # status
        ALLOW,  # reason
        fixed + headers if headers else fixed,  # upstream_headers
        answer_headers,
        (),  # response_headers
        (),  # client_headers
        b"",  # body
        subject,
        roles,
        cache_max_age,
        min(principal.expires_at, renew_at + cache_max_age),  # fresh_until
        renew_at,
    )


def _identity_value(value: str) -> str:
    """A fixed identity header's value (`sub`, the scopes, the issuer): controls replaced, and as a quoted-string
    when white space at an edge would be trimmed by the gateway or the upstream (` alice` read as `alice`, another
    user), or it starts with a quote (`"admin"` is `admin` to a reader that unquotes)."""
    safe = header_safe(value)
    return quoted_string(safe) if safe[:1] == '"' or trimmed_edge(safe) else safe


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


REPLACEMENT = "\ufffd"  # what a control character in a claim becomes in a header (`header_safe`)

# An element that an RFC 9110 list reader (section 5.6.1) would not take as itself: holding the separator, a
# quote or a backslash, or starting or ending with white space (trimmed as OWS).
_NOT_BARE = re.compile(r'[,"\\]|^[ \t]|[ \t]$')


def list_element(value: str) -> str:
    """One element of a comma-separated header list (already `header_safe`): as it is when it reads as itself,
    else as an RFC 9110 quoted-string (section 5.6.4). `user,admin` sent bare is the two roles `user` and
    `admin` to the upstream, ` admin` and `admin<NBSP>` are `admin`, and `"admin"` is `admin` to a reader that
    unquotes."""
    if _NOT_BARE.search(value) is None and not trimmed_edge(value):
        return value
    return quoted_string(value)


def quoted_string(value: str) -> str:
    """`value` as an RFC 9110 quoted-string (section 5.6.4; an RFC 8941 sf-string when `value` is ASCII)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def trimmed_edge(value: str) -> bool:
    """Whether a reader may drop `value`'s first or last character as white space: a space (a gateway drops it as
    OWS), or any character `str.isprintable` refuses (`header_safe` left no control): NBSP, U+3000, U+2028, a BOM,
    which Python's `str.strip`, JavaScript's `trim` or Go's `strings.TrimSpace` take off."""
    if not value:
        return False
    first, last = value[0], value[-1]
    return first == " " or last == " " or not (first.isprintable() and last.isprintable())


def header_safe(value: str) -> str:
    """Claims go into headers: each control character (C0 with CR, LF, NUL and HTAB, DEL, and C1: NEL is a line
    break to some readers) is replaced by U+FFFD, so that no claim can start a header of its own, and none reads
    as another value once its controls are gone (`admins<NUL>` taken out would be the group `admins`)."""
    if value.isprintable():  # the common case: nothing to replace (controls are never printable)
        return value
    return "".join(REPLACEMENT if c < " " or "\x7f" <= c <= "\x9f" else c for c in value)
