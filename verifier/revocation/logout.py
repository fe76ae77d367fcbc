"""OpenID Connect Back-Channel Logout 1.0: a provider's logout token, validated, becomes revocation entries.

The provider POSTs a logout token (section 2.5) when a user's session ends there. It is checked as
section 2.6 says, with this verifier's own strictness: compact JWS parsed strictly
(`verifier.tokens.jws`), `typ` `logout+jwt` or absent (section 2.4; the generic `JWT` too, never
another explicit type such as `at+jwt` or `secevent+jwt`), `iss` an issuer configured with
`backchannel_logout`, `alg` on that issuer's allow-list and pinned to its key type, signature against
the issuer's JWKS (the access-token keys: same cache, same refresh), `aud` one of the configured client
ids, `iat` neither in the future nor older than `max_age_seconds`, `exp` (when present) not passed,
and present when the issuer's `backchannel_logout.require_exp` is true (errata set 1, December 2023, makes
`exp` REQUIRED; the first edition did not, so a token without it is accepted by default, bounded by
`max_age_seconds` and its `jti`: node-oidc-provider sends `exp` 120 s out, Keycloak since keycloak#25753, older
Keycloak and Ory Hydra 2.2 none),
`jti` present and never seen by any replica, `events` holding the back-channel-logout member (an
object), no `nonce` (so an ID token can never pass for one), and `sid` and/or `sub` (section 2.4).

What a valid one becomes (section 2.7), as entries in the same index, store and Redis channel as SSF:

| logout token | entries (effect `session_revoked`) |
|---|---|
| `sid` | every token whose `sid` claim is that session |
| `sid` and `sub` | the same, and the user's tokens without a `sid` claim issued at or before the logout |
| `sub` only | every token of the user issued at or before the logout (all their sessions) |

Access tokens do not always carry `sid` (oidc-provider leaves it out of JWT access tokens, Keycloak
puts it in). A token without one cannot be tied to a session, so a session's logout reaches it through
its user when the logout token names the user; one naming only `sid` cannot reach it at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from verifier.clock import Clock
from verifier.config.issuer import IssuerSettings
from verifier.errors import AlgorithmRefused, MalformedToken
from verifier.observe.metrics import RevocationMetrics
from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey
from verifier.revocation.signed import (
    Failed,
    MessageRefused,
    check_signature,
    check_times,
    jti_key,
    jti_of,
    jti_ttl,
)
from verifier.revocation.subjects import MAX_IDENTIFIER_CHARS
from verifier.state.base import Purpose, SharedState
from verifier.tokens import jws
from verifier.tokens.jwks import IssuerKeys

log = logging.getLogger("verifier.revocation")
audit_log = logging.getLogger("verifier.audit")

BACKCHANNEL_LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"  # section 2.4
LOGOUT_TYP = "logout+jwt"  # section 2.4 explicit typing (also accepted with the `application/` prefix)
GENERIC_TYP = "jwt"  # RFC 7519 section 5.1: says nothing about the kind; the claims decide
MAX_LOGOUT_TOKEN_BYTES = 16 * 1024  # bytes; a logout token is a handful of short claims

# Stable codes of a refused logout token: the metric's `result` label and the log's `code`. The answer
# itself carries OAuth's `invalid_request` (section 2.8), whatever the code.
MALFORMED = "malformed"
WRONG_TYP = "typ"
UNKNOWN_ISSUER = "issuer"
ALGORITHM = Failed.ALGORITHM.value
NO_KEY = Failed.KEY.value
SIGNATURE = Failed.SIGNATURE.value
AUDIENCE = "audience"
IAT = Failed.IAT.value
EXPIRED = Failed.EXP.value
JTI = Failed.JTI.value
EVENTS = "events"
NONCE = "nonce"
SUBJECT = "subject"
REPLAY = "replay"
REFUSAL_CODES = (
    MALFORMED, WRONG_TYP, UNKNOWN_ISSUER, ALGORITHM, NO_KEY, SIGNATURE, AUDIENCE, IAT, EXPIRED, JTI, EVENTS,
    NONCE, SUBJECT, REPLAY,
)
UNKNOWN = "unknown"  # the metric's issuer label for a token that names no configured issuer


class LogoutRefused(Exception):
    """A logout token we will not act on: `code` (one of `REFUSAL_CODES`) and a description."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


@dataclasses.dataclass(frozen=True, slots=True)
class VerifiedLogout:
    """A logout token whose signature and claims checked out (its jti not yet claimed)."""

    issuer: str
    jti: str
    iat: float
    sid: str  # "" when absent
    sub: str  # "" when absent
    max_age: float  # the issuer's `backchannel_logout.max_age_seconds`: the token is accepted until iat + max_age
    leeway: float  # the issuer's `leeway_seconds`: the clock skew tolerated (replicas' clocks agree within it)


LogoutIssuers = Mapping[str, tuple[IssuerSettings, IssuerKeys]]


def _typ_ok(typ: Any) -> bool:
    if typ is None:
        return True
    if not isinstance(typ, str):
        return False
    lowered = typ.lower()
    return lowered in (LOGOUT_TYP, "application/" + LOGOUT_TYP, GENERIC_TYP)


def _identifier(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or not value or len(value) > MAX_IDENTIFIER_CHARS:
        raise LogoutRefused(SUBJECT, f"{name} is not a short string")
    return value


class LogoutTokenVerifier:
    """Checks logout tokens (section 2.6) from the issuers configured with `backchannel_logout`."""

    def __init__(self, issuers: LogoutIssuers, clock: Clock) -> None:
        self._issuers = dict(issuers)
        self._clock = clock

    def issuer_label(self, token: str) -> str:
        """The configured issuer a token names (for the metric), else `unknown`; never raises."""
        try:
            issuer = jws.parse(token, max_bytes=MAX_LOGOUT_TOKEN_BYTES).payload.get("iss")
        except (MalformedToken, AlgorithmRefused):
            return UNKNOWN
        return issuer if isinstance(issuer, str) and issuer in self._issuers else UNKNOWN

    async def verify(self, token: str) -> VerifiedLogout:
        """Checks everything but replay; raises `LogoutRefused`."""
        try:
            parsed = jws.parse(token, max_bytes=MAX_LOGOUT_TOKEN_BYTES)
        except AlgorithmRefused as exc:
            raise LogoutRefused(ALGORITHM, exc.description) from exc
        except MalformedToken as exc:
            raise LogoutRefused(MALFORMED, exc.description) from exc
        if not _typ_ok(parsed.header.get("typ")):
            raise LogoutRefused(WRONG_TYP, "typ is not logout+jwt")
        payload = parsed.payload
        issuer = payload.get("iss")
        found = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if found is None:
            raise LogoutRefused(UNKNOWN_ISSUER, "iss is not an issuer configured for back-channel logout")
        settings, keys = found
        config = settings.backchannel_logout
        assert config is not None  # only such issuers are handed in
        try:
            await check_signature(parsed, settings.algorithms, keys)
            aud = payload.get("aud")
            if not any(isinstance(a, str) and a in config.audiences for a in (aud if isinstance(aud, list) else [aud])):
                raise LogoutRefused(AUDIENCE, "aud names none of the configured client ids")
            leeway = settings.leeway_seconds
            iat = check_times(payload, now=self._clock.now(), leeway=leeway, max_age=config.max_age_seconds)
            if config.require_exp and payload.get("exp") is None:  # `null` is no exp either (`check_times`)
                raise LogoutRefused(EXPIRED, "exp missing (backchannel_logout.require_exp)")
            jti = jti_of(payload)
        except MessageRefused as exc:
            raise LogoutRefused(exc.failed.value, exc.description) from exc
        events = payload.get("events")
        if not isinstance(events, dict) or not isinstance(events.get(BACKCHANNEL_LOGOUT_EVENT), dict):
            raise LogoutRefused(EVENTS, "events lacks the back-channel logout member")
        if "nonce" in payload:
            raise LogoutRefused(NONCE, "a logout token must not carry nonce")
        sid = _identifier(payload, "sid")
        sub = _identifier(payload, "sub")
        if not sid and not sub:
            raise LogoutRefused(SUBJECT, "neither sid nor sub")
        return VerifiedLogout(settings.issuer, jti, iat, sid, sub, float(config.max_age_seconds), float(leeway))


def entries_of(verified: VerifiedLogout, *, now: float, entry_lifetime: float) -> tuple[Entry, ...]:
    """The entries a logout makes (see the module's table); their ids are the same on every delivery."""
    # The provider's clock stamps the logout and its tokens alike: a logout stamped ahead of our clock (at most the
    # issuer's leeway: `check_times`) reaches the tokens the provider issued before it. Cut at our `now`, those issued
    # in the seconds before the logout escaped it.
    event_time = min(verified.iat, now + verified.leeway)
    keys: list[tuple[SubjectKey, Match]] = []
    if verified.sid:
        keys.append((SubjectKey(KeyKind.SID, verified.sid, verified.issuer), Match.ALL))
    if verified.sub:
        match = Match.SESSIONLESS_ISSUED_BEFORE if verified.sid else Match.ISSUED_BEFORE
        keys.append((SubjectKey(KeyKind.ISS_SUB, verified.sub, verified.issuer), match))
    entries = []
    for key, match in keys:
        digest = hashlib.sha256(
            "\x00".join((verified.issuer, verified.jti, key.kind.value, key.value)).encode()
        ).hexdigest()[:24]
        entries.append(
            Entry(
                id="bcl-" + digest,
                key=key,
                effect=Effect.SESSION_REVOKED,
                match=match,
                event_time=event_time,
                expires_at=event_time + entry_lifetime,
                source=verified.issuer,
                event=BACKCHANNEL_LOGOUT_EVENT,
                jti=verified.jti,
                reason="back-channel logout",
            )
        )
    return tuple(entries)


class BackchannelLogout:
    """Receives logout tokens: verify, refuse a replay, store the entries, then remember the jti.

    The jti is marked only once the entries are stored (as for SSF SETs): a provider retrying after a
    503 is not refused as a replay of a logout that never took effect. Two deliveries racing past the
    check both store the same entries (deterministic ids), so the effect is the same.
    """

    def __init__(
        self,
        verifier: LogoutTokenVerifier,
        *,
        state: SharedState,
        add: Callable[[list[Entry]], Awaitable[None]],
        metrics: RevocationMetrics,
        clock: Clock,
        entry_lifetime: float,
    ) -> None:
        self._verifier = verifier
        self._state = state
        self._add = add
        self._metrics = metrics
        self._clock = clock
        self._entry_lifetime = entry_lifetime  # `RevocationService.entry_lifetime`

    async def receive(self, token: str) -> tuple[Entry, ...]:
        """Applies one logout token; raises `LogoutRefused` or `StateUnavailable` (the provider may retry)."""
        try:
            verified = await self._verifier.verify(token)
            key = _jti_key(verified)
            if await self._state.seen(key, purpose=Purpose.REVOCATION):
                raise LogoutRefused(REPLAY, "jti already received")
        except LogoutRefused as exc:
            self.refused(exc, self._verifier.issuer_label(token))
            raise
        entries = entries_of(verified, now=self._clock.now(), entry_lifetime=self._entry_lifetime)
        await self._add(list(entries))
        # only now: a retry after a failure applies again
        ttl = jti_ttl(verified.iat, now=self._clock.now(), leeway=verified.leeway, max_age=verified.max_age)
        await self._state.first_use(key, ttl, purpose=Purpose.REVOCATION)
        self._metrics.logouts.labels(verified.issuer, "accepted").inc()
        audit_log.info(
            "backchannel_logout",
            extra={
                "event": "backchannel_logout",
                "issuer": verified.issuer,
                "subject": verified.sub,
                "sid": verified.sid,
                "jti": verified.jti,
                "entries": [e.id for e in entries],
            },
        )
        return entries

    def refused(self, exc: LogoutRefused, issuer: str = UNKNOWN) -> None:
        """Counts and logs one refused logout request (the door calls it for a malformed request too)."""
        self._metrics.logouts.labels(issuer, exc.code).inc()
        log.warning(
            "backchannel logout refused",
            extra={"event": "backchannel_logout", "issuer": issuer, "code": exc.code, "description": exc.description},
        )


def _jti_key(verified: VerifiedLogout) -> str:
    return jti_key("bcl", verified.issuer, verified.jti)
