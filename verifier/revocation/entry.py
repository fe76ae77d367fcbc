"""A revocation entry: who it matches (an RFC 9493 subject reduced to one lookup key), what it does, until when.

Entries are what events (SSF/CAEP/RISC) and the operator's kill switch both become, and what the
store shares between replicas; they serialize to JSON and back without loss.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import unicodedata
from collections.abc import Mapping
from typing import Any


class KeyKind(enum.Enum):
    """How a token is matched: by (iss, sub), by its `email` claim, by its session (`sid`), by the token itself
    (iss, `jti`), or by the client it was issued to (`client_id` or `azp`: `verifier.principal.clients_of`)."""

    ISS_SUB = "iss_sub"
    EMAIL = "email"
    SID = "sid"
    JTI = "jti"  # OpenID SSF 1.0 `jwt_id`: one token, by its issuer and `jti` (RFC 9068 section 2.2)
    CLIENT = "client_id"  # SSF 1.0 `complex` subject's `application` member: a client's tokens


def email_key(email: str) -> str:
    """An email address as entries are keyed and tokens looked up: lower-cased, its accents composed (Unicode NFC).

    One address may come precomposed from one system and decomposed from another (`é` as U+00E9, or `e` and a
    combining U+0301: canonically equivalent, the same text): compared as sent, an event in one form never
    reached the tokens carrying the other, and the account stayed open. Only canonically equivalent spellings
    meet: compatibility forms (full-width letters, ligatures) stay apart, as different addresses may use them.

    An internationalized domain is one domain in two spellings: its Unicode labels (`bücher.example`) and their
    ASCII A-labels (`xn--bcher-kva.example`, RFC 5890 / RFC 3492), which a directory or a transmitter may keep
    instead. Keys carry the A-labels: each non-ASCII label of the domain, lower-cased and NFC, Punycode-encoded as
    it is (no IDNA 2003 mapping, which would make `straße` `strasse`: another domain). The local part is no domain
    and keeps its Unicode.
    """
    if email.isascii():  # the common case: nothing to compose, and a domain already in A-labels
        return email.lower()
    composed = unicodedata.normalize("NFC", unicodedata.normalize("NFC", email).lower())
    local, at, domain = composed.rpartition("@")
    if not at or domain.isascii():
        return composed
    return f"{local}@{'.'.join(_a_label(label) for label in domain.split('.'))}"


def _a_label(label: str) -> str:
    """One domain label in its ASCII form: itself when ASCII, else `xn--` and its Punycode (RFC 3492)."""
    return label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")


def issuer_form(issuer: str) -> str:
    """An issuer URL compared case-insensitively in its scheme and host, without trailing slashes (RFC 3986
    section 6.2.2.1): how an event's or the operator's spelling is matched to a configured issuer's. Its path and
    query stay as they are (a tenant's issuer differs from another's by them)."""
    scheme, sep, rest = issuer.partition("://")
    if not sep:
        return issuer.rstrip("/")
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}".rstrip("/")


class Effect(enum.Enum):
    """What an entry does to a matching token; the refusals' values are their stable codes."""

    TOKEN_REVOKED = "token_revoked"  # noqa: S105 - a code, not a secret; the operator's kill switch
    SESSION_REVOKED = "session_revoked"  # CAEP session-revoked
    CREDENTIAL_REVOKED = "credential_revoked"  # CAEP credential-change (revoke/delete)
    ACCOUNT_DISABLED = "account_disabled"  # RISC account-disabled/-purged, credential-compromise
    CLAIMS_OVERRIDE = "claims_override"  # CAEP assurance-level-change, token-claims-change


# The codes a request refused for a revocation carries (a claims override changes claims, refuses nothing).
REFUSAL_CODES = tuple(e.value for e in Effect if e is not Effect.CLAIMS_OVERRIDE)


class Match(enum.Enum):
    """Which of the key's tokens an entry reaches."""

    ALL = "all"  # every token (a revoked session, a disabled account)
    ISSUED_BEFORE = "issued_before"  # `iat` at or before the event; no `iat` counts as before
    AUTHENTICATED_BEFORE = "authenticated_before"  # `auth_time` (else `iat`) at or before the event
    # `iat` at or before the event, for a token without `sid`: a back-channel logout of one session of
    # a user reaches the user's tokens that do not say which session they belong to (fail closed).
    SESSIONLESS_ISSUED_BEFORE = "sessionless_issued_before"


@dataclasses.dataclass(frozen=True, slots=True)
class SubjectKey:
    """One lookup key. Emails are compared lower-cased and NFC-normalized (`email_key`).

    `iss` is the issuer an ISS_SUB or JTI names; for EMAIL and SID it is the issuer the key is narrowed to
    (a transmitter's `subjects_of`), or "" for the operator's keys, which reach every issuer; a CLIENT names
    its issuer when its subject does (`iss_sub` inside `application`), else "" (narrowed as EMAIL and SID).
    """

    kind: KeyKind
    value: str
    iss: str = ""

    def to_json(self) -> dict[str, str]:
        """The JSON form."""
        return {"kind": self.kind.value, "value": self.value, "iss": self.iss}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SubjectKey:
        """Parses the JSON form; raises ValueError/KeyError/TypeError when malformed."""
        return cls(KeyKind(data["kind"]), str(data["value"]), str(data.get("iss", "")))

    def describe(self) -> dict[str, Any]:
        """The RFC 9493 subject identifier this key stands for (for the admin listing)."""
        if self.kind is KeyKind.ISS_SUB:
            return {"format": "iss_sub", "iss": self.iss, "sub": self.value}
        if self.kind is KeyKind.EMAIL:
            return {"format": "email", "email": self.value}
        if self.kind is KeyKind.JTI:
            return {"format": "jwt_id", "iss": self.iss, "jti": self.value}
        if self.kind is KeyKind.CLIENT:
            client = (
                {"format": "iss_sub", "iss": self.iss, "sub": self.value}
                if self.iss
                else {"format": "opaque", "id": self.value}
            )
            return {"format": "complex", "application": client}
        return {"format": "opaque", "id": self.value}


OPERATOR = "operator"  # the `source` of kill-switch entries


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    """One revocation or override."""

    id: str
    key: SubjectKey
    effect: Effect
    match: Match
    event_time: float  # epoch seconds: the event's time, compared with a token's iat/auth_time
    expires_at: float | None  # epoch seconds after which no matching token can still be alive; None: until lifted
    source: str  # the transmitter's issuer, or OPERATOR
    event: str  # the event type URI, or OPERATOR
    jti: str = ""  # the SET's jti (audit)
    reason: str = ""
    overrides: Mapping[str, Any] | None = None  # CLAIMS_OVERRIDE only: claim -> new value

    def live(self, now: float) -> bool:
        """Whether the entry can still match a live token."""
        return self.expires_at is None or self.expires_at > now

    def to_json(self) -> str:
        """The JSON text stored in the shared store."""
        return json.dumps(
            {
                "id": self.id,
                "key": self.key.to_json(),
                "effect": self.effect.value,
                "match": self.match.value,
                "event_time": self.event_time,
                "expires_at": self.expires_at,
                "source": self.source,
                "event": self.event,
                "jti": self.jti,
                "reason": self.reason,
                "overrides": dict(self.overrides) if self.overrides is not None else None,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Entry:
        """Parses the stored form; raises ValueError when it is not an entry."""
        try:
            data = json.loads(text)
            overrides = data.get("overrides")
            expires_at = data.get("expires_at")
            return cls(
                id=str(data["id"]),
                key=SubjectKey.from_json(data["key"]),
                effect=Effect(data["effect"]),
                match=Match(data["match"]),
                event_time=float(data["event_time"]),
                expires_at=None if expires_at is None else float(expires_at),
                source=str(data["source"]),
                event=str(data["event"]),
                jti=str(data.get("jti", "")),
                reason=str(data.get("reason", "")),
                overrides=dict(overrides) if isinstance(overrides, dict) else None,
            )
        except (KeyError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
            raise ValueError(f"not a revocation entry: {type(exc).__name__}") from exc

    def public(self) -> dict[str, Any]:
        """The admin API's view of the entry."""
        return {
            "id": self.id,
            "subject": self.key.describe(),
            "effect": self.effect.value,
            "event_time": self.event_time,
            "expires_at": self.expires_at,
            "source": self.source,
            "event": self.event,
            "jti": self.jti,
            "reason": self.reason,
            **({"overrides": dict(self.overrides)} if self.overrides is not None else {}),
        }
