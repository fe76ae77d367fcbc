"""Security Event Tokens (RFC 8417) from SSF 1.0 transmitters: verified, then turned into entries.

A SET is the transmitter's proof of itself (RFC 8935 section 2; a pushing transmitter's `Authorization`
is checked too, in constant time, when `push_authorization_env` names one), so it is checked like an access
token and more: compact JWS parsed strictly (`verifier.tokens.jws`), `typ`
`secevent+jwt` (RFC 8417 section 2.3), `iss` a configured transmitter, `alg` on that transmitter's
allow-list and pinned to its key type, signature against the transmitter's JWKS (found through
`/.well-known/ssf-configuration`, SSF 1.0 section 7.2), `aud` ours, `iat` fresh, `jti` never seen
before by any replica, and `events` an object of one to ten events, each payload an object (RFC 8417 section
2.2, whatever the event type). Refusals carry the RFC 8935 section 2.4 error codes.

The event types understood (CAEP 1.0 section 3, RISC 1.0 section 2):

| event | entry |
|---|---|
| caep session-revoked | session: all its tokens; subject: tokens issued at or before the event; the |
|   | user a `complex` subject names beside the session: that user's tokens without `sid` issued at or |
|   | before the event (they cannot be tied to the session; as a back-channel logout with `sid` and `sub`) |
| caep credential-change (revoke, delete) | tokens authenticated at or before the event; for a |
|   | `fido2-platform`/`fido2-roaming`/`fido-u2f` credential (or named `credential_ids`), the |
|   | user's WebAuthn credentials disabled: those ids, else those of `fido2_aaguid`, else all |
| caep assurance-level-change | `acr` := current_level for tokens issued at or before the event (*) |
| caep token-claims-change | `claims` override the token's for tokens issued at or before the event (*) |
| risc account-disabled, credential-compromise | every token of the subject, until account-enabled |
| risc account-purged | every token of the subject, until every token then alive has expired |
| risc sessions-revoked (deprecated for caep | the subject's tokens issued at or before the event (a session's or a |
|   session-revoked) | `jwt_id`'s: all), until every token then alive has expired |
| risc identifier-recycled | `account_disabled` for the tokens issued at or before the event (the former |
|   | owner's), until every token then alive has expired; the new owner's tokens pass |
| risc account-enabled | lifts the transmitter's account-disabled and credential-compromise entries on |
|   | the subject (never a purge's or a recycled identifier's) |

(*) As the transmitter's `claims_change` says, applied by `verifier.checks.revocation`: `restrict` (the
default) only takes away, a claim keeping what both the token and the announcement hold (the values of both
lists, of both `scope`s; a scalar such as `acr` only when unchanged, else none): a transmitter that is not the
tokens' provider (a risk engine, an MDM) cannot add a scope, a group or a role, nor raise `acr`. `replace`:
the announced claims replace the token's, raises included (the spec's semantics, for the provider itself).
The entries are stored as announced either way; the setting applies when they are, on every replica.

Other event types are acknowledged (RFC 8935: 202) and change nothing (a payload that is not an object refuses the
SET). SSF's stream events (verification, stream-updated) are handled by that; any other (RISC
account-credential-change-required, identifier-changed, recovery-*, opt-*, CAEP device-compliance-change, a
private type, ...) is `unhandled`: counted (`verifier_ssf_events_unhandled_total`, by its name when catalogued
below, else `other`) and named in the SET's log line.

A subject may also name one token (OpenID SSF 1.0 `jwt_id`: its `iss` and `jti`), refused by every event above
that refuses, whatever its `iat`/`auth_time`; or a client (a `complex` subject with an `application` member and
neither `user` nor `session`: the tokens whose `client_id` or `azp` it names), treated as a user's subject.

A transmitter speaks only for the subjects of the issuers it is scoped to (`subjects_of`): an
`iss_sub` or `jwt_id` subject (or an `application` given as `iss_sub`) of another issuer is acknowledged and
ignored (and counted); a subject format without an issuer (`email`, `opaque` session ids and client ids)
reaches the tokens of its scoped issuers only. An `iss` spelling a scoped issuer with a trailing slash or its
scheme and host in another case (RFC 3986 section 6.2.2.1) names that issuer, as its tokens spell it. A known
event whose subject gives no key at all (a format no token is matched by) refuses the SET (`invalid_request`):
acknowledged, it would change nothing while the transmitter took the account as handled.
WebAuthn credentials are owned by (issuer, `sub`), so only an `iss_sub` subject disables them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from verifier.clock import Clock
from verifier.config.revocation import TransmitterConfig
from verifier.errors import AlgorithmRefused, MalformedToken
from verifier.numbers import json_number
from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey, issuer_form
from verifier.revocation.signed import (
    Failed,
    MessageRefused,
    check_signature,
    check_times,
    jti_key,
    jti_of,
    jti_ttl,
)
from verifier.revocation.subjects import SubjectError, session_user_keys, subject_keys
from verifier.state.base import Purpose, SharedState
from verifier.tokens import jws
from verifier.tokens.jwks import IssuerKeys

CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
RISC = "https://schemas.openid.net/secevent/risc/event-type/"
SESSION_REVOKED = CAEP + "session-revoked"
CREDENTIAL_CHANGE = CAEP + "credential-change"
ASSURANCE_LEVEL_CHANGE = CAEP + "assurance-level-change"
TOKEN_CLAIMS_CHANGE = CAEP + "token-claims-change"
ACCOUNT_DISABLED = RISC + "account-disabled"
ACCOUNT_PURGED = RISC + "account-purged"
ACCOUNT_ENABLED = RISC + "account-enabled"
CREDENTIAL_COMPROMISE = RISC + "credential-compromise"
SESSIONS_REVOKED = RISC + "sessions-revoked"  # RISC 1.0 section 2.7, deprecated for CAEP session-revoked
IDENTIFIER_RECYCLED = RISC + "identifier-recycled"
KNOWN_EVENTS = (
    SESSION_REVOKED,
    CREDENTIAL_CHANGE,
    ASSURANCE_LEVEL_CHANGE,
    TOKEN_CLAIMS_CHANGE,
    ACCOUNT_DISABLED,
    ACCOUNT_PURGED,
    ACCOUNT_ENABLED,
    CREDENTIAL_COMPROMISE,
    SESSIONS_REVOKED,
    IDENTIFIER_RECYCLED,
)
# The entries account-enabled lifts: an account disabled, not one purged or an identifier given to someone else.
LIFTED_BY_ACCOUNT_ENABLED = frozenset({ACCOUNT_DISABLED, CREDENTIAL_COMPROMISE})
SSF = "https://schemas.openid.net/secevent/ssf/event-type/"
# SSF 1.0 section 8.1 stream events: acknowledging them is all a receiver does.
STREAM_EVENTS = frozenset({SSF + "verification", SSF + "stream-updated"})
# The other event types of RISC 1.0 and CAEP 1.0, named in metrics (a bounded set); anything else is `other`.
CATALOGUED_EVENTS = frozenset(
    {
        RISC + name
        for name in (
            "account-credential-change-required",
            "identifier-changed",
            "opt-in",
            "opt-out-initiated",
            "opt-out-cancelled",
            "opt-out-effective",
            "recovery-activated",
            "recovery-information-changed",
        )
    }
    | {CAEP + name for name in ("device-compliance-change", "session-established", "session-presented")}
    | {CAEP + "risk-level-change"}
    | STREAM_EVENTS
)

SET_TYP = "secevent+jwt"  # RFC 8417 section 2.3 (also accepted with the `application/` prefix)
MAX_SET_BYTES = 64 * 1024  # bytes; a SET carries a handful of events, never a document
MAX_EVENTS_PER_SET = 10  # members of `events`; RFC 8417 sets are usually one event
MAX_CREDENTIAL_IDS = 50  # credential ids named by one credential-change event
# CAEP 1.0 section 3.3 credential types that are WebAuthn credentials.
WEBAUTHN_CREDENTIAL_TYPES = frozenset({"fido2-platform", "fido2-roaming", "fido-u2f"})
# Claims a token-claims-change may not touch: they say who issued the token to whom and until when (both clients:
# `client_id` and `azp`, `verifier.principal.clients_of`).
PROTECTED_CLAIMS = frozenset(
    {"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "client_id", "azp", "cnf", "sid", "auth_time"}
)

# RFC 8935 section 2.4 error codes
INVALID_REQUEST = "invalid_request"
INVALID_KEY = "invalid_key"
INVALID_ISSUER = "invalid_issuer"
INVALID_AUDIENCE = "invalid_audience"
AUTHENTICATION_FAILED = "authentication_failed"


# RFC 8935 section 2.4: the err code of each shared check that can fail (the rest: invalid_request).
_SET_ERRORS = {Failed.ALGORITHM: INVALID_KEY, Failed.KEY: INVALID_KEY, Failed.SIGNATURE: AUTHENTICATION_FAILED}


class SetRefused(Exception):
    """A SET we will not act on, with its RFC 8935 error code; `replay` marks an already-seen jti."""

    def __init__(self, err: str, description: str, *, replay: bool = False) -> None:
        super().__init__(description)
        self.err = err
        self.description = description
        self.replay = replay


@dataclasses.dataclass(frozen=True, slots=True)
class VerifiedSet:
    """A SET whose signature and claims checked out (its jti not yet claimed)."""

    transmitter: TransmitterConfig
    jti: str
    iat: float
    payload: Mapping[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class CredentialRevocation:
    """WebAuthn credentials of one user (issuer, `sub`) that an event says are gone.

    The named `credential_ids` (base64url); without them, those whose authenticator model is
    `aaguid` (32 lower-case hex digits); without either, all of the user's credentials.
    """

    issuer: str
    subject: str
    credential_ids: tuple[str, ...] = ()
    aaguid: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Effects:
    """What a SET changes: entries to add, entries (by key) to lift, credentials to disable."""

    add: tuple[Entry, ...] = ()
    lift: tuple[tuple[SubjectKey, float], ...] = ()  # account-enabled: (key, event time)
    credentials: tuple[CredentialRevocation, ...] = ()
    events: tuple[str, ...] = ()  # the event type URIs, in order
    unhandled: tuple[str, ...] = ()  # those acknowledged and not acted on (neither known nor a stream event)
    ignored: int = 0  # subject identifiers outside the transmitter's `subjects_of`


def _typ_ok(typ: Any) -> bool:
    if not isinstance(typ, str):
        return False
    lowered = typ.lower()
    return lowered in (SET_TYP, "application/" + SET_TYP)


class SetVerifier:
    """Checks SETs from the configured transmitters."""

    def __init__(
        self,
        transmitters: Mapping[str, tuple[TransmitterConfig, IssuerKeys]],
        state: SharedState,
        clock: Clock,
    ) -> None:
        self._transmitters = dict(transmitters)
        self._state = state
        self._clock = clock

    async def verify(self, token: str, *, delivery: str | None = None, authorization: str | None = None) -> VerifiedSet:
        """Checks everything but replay; raises `SetRefused`.

        `delivery` (push or poll), when given, must be the transmitter's configured delivery. `authorization` is
        the push request's `Authorization` header (None: absent), checked when the transmitter has one configured.
        """
        try:
            parsed = jws.parse(token, max_bytes=MAX_SET_BYTES)
        except AlgorithmRefused as exc:
            raise SetRefused(INVALID_KEY, exc.description) from exc
        except MalformedToken as exc:
            raise SetRefused(INVALID_REQUEST, exc.description) from exc
        if not _typ_ok(parsed.header.get("typ")):
            raise SetRefused(INVALID_REQUEST, "typ is not secevent+jwt")
        payload = parsed.payload
        issuer = payload.get("iss")
        found = self._transmitters.get(issuer) if isinstance(issuer, str) else None
        if found is None or (delivery is not None and found[0].delivery != delivery):
            raise SetRefused(INVALID_ISSUER, "iss is not a configured transmitter")
        transmitter, keys = found
        if transmitter.push_authorization is not None and not _same(authorization, transmitter.push_authorization):
            raise SetRefused(AUTHENTICATION_FAILED, "the request's Authorization is not the transmitter's")
        now = self._clock.now()
        try:
            await check_signature(parsed, transmitter.algorithms, keys)
            aud = payload.get("aud")
            if transmitter.audience not in (aud if isinstance(aud, list) else [aud]):
                raise SetRefused(INVALID_AUDIENCE, "aud does not name this receiver")
            iat = check_times(
                payload, now=now, leeway=transmitter.leeway_seconds, max_age=transmitter.max_age_seconds
            )
            jti = jti_of(payload)
        except MessageRefused as exc:
            raise SetRefused(_SET_ERRORS.get(exc.failed, INVALID_REQUEST), exc.description) from exc
        events = payload.get("events")
        if not isinstance(events, dict) or not events or len(events) > MAX_EVENTS_PER_SET:
            raise SetRefused(INVALID_REQUEST, "events missing")
        # RFC 8417 section 2.2: each event's payload is a JSON object, an unknown event's too (one that is not
        # made the whole SET malformed, and its known events were applied and acknowledged all the same).
        if not all(isinstance(body, dict) for body in events.values()):
            raise SetRefused(INVALID_REQUEST, "event payload is not an object")
        return VerifiedSet(transmitter, jti, iat, payload)

    async def check_fresh(self, verified: VerifiedSet) -> None:
        """Raises `SetRefused(replay=True)` when the jti was already received (and its effects stored).

        Only a read: the jti is marked by `claim`, once its effects are stored. Marking first would let
        a stalled Redis run the mark late after a 503, and the transmitter's retry would be refused as
        a replay of an event that never took effect. Raises `StateUnavailable` (the transmitter retries).
        """
        if await self._state.seen(_jti_key(verified), purpose=Purpose.REVOCATION):
            raise SetRefused(INVALID_REQUEST, "jti already received", replay=True)

    async def claim(self, verified: VerifiedSet) -> None:
        """Marks the jti received (shared across replicas), after its effects are stored.

        Two deliveries racing past `check_fresh` both apply the same effects (entry ids are
        deterministic), so losing the race here changes nothing. Raises `StateUnavailable`.
        """
        transmitter = verified.transmitter
        ttl = jti_ttl(
            verified.iat, now=self._clock.now(), leeway=transmitter.leeway_seconds, max_age=transmitter.max_age_seconds
        )
        await self._state.first_use(_jti_key(verified), ttl, purpose=Purpose.REVOCATION)


def _same(presented: str | None, expected: str) -> bool:
    """Whether the push request's `Authorization` is the configured one, in constant time."""
    given = (presented or "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given, expected.encode("utf-8", "surrogateescape"))


def _jti_key(verified: VerifiedSet) -> str:
    return jti_key("ssf", verified.transmitter.issuer, verified.jti)


def effects_of(verified: VerifiedSet, *, now: float, entry_lifetime: float) -> Effects:
    """What the SET's events do; raises `SetRefused(invalid_request)` for a malformed known event.

    `entry_lifetime`: how long after its event an entry can still match a token (`RevocationService.entry_lifetime`).
    """
    payload = verified.payload
    source = verified.transmitter.issuer
    scope = verified.transmitter.scope
    ignored = 0
    add: list[Entry] = []
    lift: list[tuple[SubjectKey, float]] = []
    credentials: list[CredentialRevocation] = []
    events: dict[str, Any] = payload["events"]
    for event_type, body in events.items():
        if event_type not in KNOWN_EVENTS:
            continue
        if not isinstance(body, dict):
            raise SetRefused(INVALID_REQUEST, "event payload is not an object")
        identifier = payload.get("sub_id", body.get("subject"))
        if identifier is None:
            raise SetRefused(INVALID_REQUEST, "event names no subject (sub_id)")
        try:
            keys = subject_keys(identifier, session=event_type == SESSION_REVOKED)
        except SubjectError as exc:
            raise SetRefused(INVALID_REQUEST, str(exc)) from exc
        if not keys:
            # A format no token can be matched by (`phone_number`, `did`, a `complex` naming only a device, ...):
            # acknowledged, the transmitter would take the account as disabled while its tokens kept working.
            raise SetRefused(INVALID_REQUEST, f"subject format {_format_of(identifier)!r} is not supported")
        keys, outside = _scoped(keys, scope)
        ignored += outside
        stamp = json_number(body.get("event_timestamp"))  # unreadable: ignored, the SET's iat stands in
        # The event's time on the transmitter's clock, the tokens' `iat`/`auth_time` on the provider's: a clock running
        # ahead of ours stamps both ahead, so the event is taken as stamped, up to `leeway_seconds` ahead (as far as
        # the SET's `iat` may be). Cut at our `now`, the tokens issued in the seconds before it escaped the event.
        event_time = min(stamp if stamp is not None else verified.iat, now + verified.transmitter.leeway_seconds)
        until = event_time + entry_lifetime
        why = _reason_text(body.get("reason_admin") or body.get("reason_user") or body.get("reason") or "")

        def entry(
            key: SubjectKey,
            effect: Effect,
            match: Match,
            expires: float | None,
            *,
            overrides: Mapping[str, Any] | None = None,
            event_type: str = event_type,
            event_time: float = event_time,
            reason: str = why,
        ) -> Entry:
            digest = hashlib.sha256(
                "\x00".join((source, verified.jti, event_type, key.kind.value, key.iss, key.value)).encode()
            ).hexdigest()[:24]
            return Entry(
                id="ev-" + digest,
                key=key,
                effect=effect,
                match=match,
                event_time=event_time,
                expires_at=expires,
                source=source,
                event=event_type,
                jti=verified.jti,
                reason=reason,
                overrides=overrides,
            )

        if event_type in (SESSION_REVOKED, SESSIONS_REVOKED):
            for key in keys:
                match = Match.ALL if key.kind in _ONE_OF_ITS_OWN else Match.ISSUED_BEFORE
                add.append(entry(key, Effect.SESSION_REVOKED, match, until))
            if event_type == SESSION_REVOKED:  # RISC's names an account, never one of its sessions
                users, outside = _scoped(session_user_keys(identifier), scope)
                ignored += outside
                add.extend(entry(k, Effect.SESSION_REVOKED, Match.SESSIONLESS_ISSUED_BEFORE, until) for k in users)
        elif event_type == CREDENTIAL_CHANGE:
            change = body.get("change_type")
            if not isinstance(change, str):
                raise SetRefused(INVALID_REQUEST, "credential-change needs change_type")
            credential_type = body.get("credential_type", "")
            if not isinstance(credential_type, str):  # CAEP 1.0 section 3.3: a string (an unhashable one crashed)
                raise SetRefused(INVALID_REQUEST, "credential-change credential_type is not a string")
            if change not in ("revoke", "delete"):
                continue
            add.extend(
                entry(k, Effect.CREDENTIAL_REVOKED, Match.ALL if k.kind is KeyKind.JTI else Match.AUTHENTICATED_BEFORE,
                      until)
                for k in keys
            )
            ids = _credential_ids(body)
            if ids or credential_type in WEBAUTHN_CREDENTIAL_TYPES:
                aaguid = "" if ids else _aaguid(body.get("fido2_aaguid"))
                credentials.extend(
                    CredentialRevocation(k.iss, k.value, ids, aaguid) for k in keys if k.kind is KeyKind.ISS_SUB
                )
        elif event_type == ASSURANCE_LEVEL_CHANGE:
            level = body.get("current_level")
            if not isinstance(level, str) or not level:
                raise SetRefused(INVALID_REQUEST, "assurance-level-change needs current_level")
            add.extend(
                entry(k, Effect.CLAIMS_OVERRIDE, Match.ISSUED_BEFORE, until, overrides={"acr": level}) for k in keys
            )
        elif event_type == TOKEN_CLAIMS_CHANGE:
            new = body.get("claims")
            if not isinstance(new, dict) or not new:
                raise SetRefused(INVALID_REQUEST, "token-claims-change needs claims")
            allowed = {k: v for k, v in new.items() if isinstance(k, str) and k not in PROTECTED_CLAIMS}
            if allowed:
                add.extend(
                    entry(k, Effect.CLAIMS_OVERRIDE, Match.ISSUED_BEFORE, until, overrides=allowed) for k in keys
                )
        elif event_type in (ACCOUNT_DISABLED, CREDENTIAL_COMPROMISE):
            add.extend(entry(k, Effect.ACCOUNT_DISABLED, Match.ALL, None) for k in keys)
        elif event_type == ACCOUNT_PURGED:
            add.extend(entry(k, Effect.ACCOUNT_DISABLED, Match.ALL, until) for k in keys)
        elif event_type == IDENTIFIER_RECYCLED:
            add.extend(
                entry(k, Effect.ACCOUNT_DISABLED, Match.ALL if k.kind is KeyKind.JTI else Match.ISSUED_BEFORE, until)
                for k in keys
            )
        elif event_type == ACCOUNT_ENABLED:
            lift.extend((k, event_time) for k in keys)
    unhandled = tuple(e for e in events if e not in KNOWN_EVENTS and e not in STREAM_EVENTS)
    return Effects(tuple(add), tuple(lift), tuple(credentials), tuple(events), ignored=ignored, unhandled=unhandled)


# Key kinds that name tokens of their own, not a user's tokens up to a time: a session's, one token's.
_ONE_OF_ITS_OWN = frozenset({KeyKind.SID, KeyKind.JTI})


def _scoped(keys: tuple[SubjectKey, ...], scope: tuple[str, ...]) -> tuple[tuple[SubjectKey, ...], int]:
    """The keys a transmitter scoped to `scope` may act on, and how many it may not.

    A key naming its issuer (`iss_sub`, `jwt_id`, an `application` given as `iss_sub`) is kept when that issuer is
    in scope. A format without an issuer is narrowed to one key per scoped issuer, so it matches only those
    issuers' tokens.
    """
    kept: list[SubjectKey] = []
    outside = 0
    for key in keys:
        if key.iss:
            if key.iss in scope:
                kept.append(key)
                continue
            # The same issuer spelled with a trailing slash or its host in another case: the tokens' spelling.
            same = [issuer for issuer in scope if issuer_form(issuer) == issuer_form(key.iss)]
            if same:
                kept.extend(SubjectKey(key.kind, key.value, issuer) for issuer in same)
            else:
                outside += 1
        else:
            kept.extend(SubjectKey(key.kind, key.value, issuer) for issuer in scope)
    return tuple(kept), outside


def _format_of(identifier: Any) -> str:
    """The format a subject identifier names, for a refusal's description (bounded)."""
    fmt = identifier.get("format") if isinstance(identifier, Mapping) else None
    return fmt[:40] if isinstance(fmt, str) else ""


def _aaguid(value: Any) -> str:
    """A `fido2_aaguid` (a UUID, dashes optional) as 32 lower-case hex digits; "" when absent or unreadable.

    "" widens the revocation to every credential of the user: an unreadable model fails closed.
    """
    if not isinstance(value, str):
        return ""
    digits = value.replace("-", "").lower()
    return digits if len(digits) == 32 and all(c in "0123456789abcdef" for c in digits) else ""


def _credential_ids(body: Mapping[str, Any]) -> tuple[str, ...]:
    """Credential ids named by a credential-change event (`credential_id` or `credential_ids`)."""
    raw = body.get("credential_ids", body.get("credential_id"))
    values = raw if isinstance(raw, list) else [raw]
    ids = tuple(v for v in values if isinstance(v, str) and v and len(v) <= 1024)
    return ids[:MAX_CREDENTIAL_IDS]


def _reason_text(reason: Any) -> str:
    """CAEP reasons are strings or language-tagged maps (`{"en": "..."}`); keep a short string."""
    if isinstance(reason, dict):
        reason = reason.get("en") or next((v for v in reason.values() if isinstance(v, str)), "")
    return reason[:200] if isinstance(reason, str) else ""


def short_name(event_type: str) -> str:
    """A bounded metric label for an event type: its last path segment if known or catalogued, else `other`."""
    return event_type.rsplit("/", 1)[-1] if event_type in KNOWN_EVENTS or event_type in CATALOGUED_EVENTS else "other"
