"""JWT access tokens: signature and claims (RFC 7519, RFC 9068 JWT access tokens, RFC 8725 BCP).

Checks, in order: size and syntax (jws.py), issuer (exact match, picks the allow-list and keys),
`alg` on the issuer's allow-list and fitting the key's type, signature, `typ`, then claims with
leeway. Audience is checked last so a well-formed token for another API gets a 403, not a 401.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from verifier.claimpath import find_claim
from verifier.clock import Clock
from verifier.errors import (
    AlgorithmRefused,
    AudienceMismatch,
    BadSignature,
    ClaimInvalid,
    MalformedToken,
    TokenExpired,
    TokenNotYetValid,
    UnknownIssuer,
    UnknownKey,
    WrongTokenType,
)
from verifier.numbers import MAX_JSON_NUMBER, json_number
from verifier.principal import Principal, clients_of, roles_of, scopes_of
from verifier.settings import IssuerSettings
from verifier.tokens import jws
from verifier.tokens.jwks import MAX_KIDLESS_KEYS, IssuerKeys, KeyStore, Tenants
from verifier.tokens.keys import VerificationKey

_Tenant = tuple[Tenants, str]  # an issuer template's keys and the tenant a token's `iss` names

# RFC 9068 section 2.1: `at+jwt` (the media type may carry its `application/` prefix, RFC 7515 4.1.9).
_ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
# Providers that predate RFC 9068 (Okta, Keycloak, Entra) send `JWT` or nothing.
_LEGACY_TYPES = frozenset({"jwt", "application/jwt"})
# Claims only another kind of JWT carries, so such a token is not an access token: an ID token's (OIDC Core 2
# and 3.1.3.6), and `events`, held by every SET (RFC 8417 section 2.2) and back-channel logout token (OIDC
# Back-Channel Logout 1.0 section 2.4) and by no access token; RFC 8417 section 4.3 has access-token validators
# look for it. `isdisjoint` walks the claims (one lookup each), so a larger set costs nothing more.
_OTHER_TOKEN_CLAIMS = frozenset({"nonce", "at_hash", "c_hash", "s_hash", "events"})


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if type(value) is int and -MAX_JSON_NUMBER <= value <= MAX_JSON_NUMBER:
        return value  # the usual form (whole seconds), as `json_number` would take it (an int compares as a float)
    number = json_number(value)
    if number is None:  # NaN compares false with everything; 10**400 overflows a float
        raise ClaimInvalid(f"{name} is not a number", claim=name)
    return number


def check_claims(claims: Mapping[str, Any], header: Mapping[str, Any], settings: IssuerSettings, now: float) -> None:
    """Validates typ, exp, nbf, iat and aud against one issuer's settings at time `now`."""
    typ = header.get("typ")
    lowered = typ.lower() if isinstance(typ, str) else None
    if lowered not in _ACCESS_TOKEN_TYPES and (
        settings.require_typ_at_jwt or (lowered is not None and lowered not in _LEGACY_TYPES)
    ):
        raise WrongTokenType("not an access token (typ)")
    if not _OTHER_TOKEN_CLAIMS.isdisjoint(claims):
        raise WrongTokenType("an ID token, SET or logout token is not an access token")
    leeway = settings.leeway_seconds
    exp = _number(claims, "exp")
    if exp is None:
        raise ClaimInvalid("exp is required", claim="exp")
    if now >= exp + leeway:
        raise TokenExpired("token expired")
    nbf = _number(claims, "nbf")
    if nbf is not None and now + leeway < nbf:
        raise TokenNotYetValid("token not yet valid", valid_from=nbf - leeway)
    iat = _number(claims, "iat")
    if iat is not None and now + leeway < iat:
        raise TokenNotYetValid("token issued in the future", valid_from=iat - leeway)
    # Read later by policies and revocation: a number or absent, and never ahead of our clock beyond the leeway (as
    # `iat`): a login in the future never aged out of a route's `max_auth_age_seconds` (nor a gateway's reuse of its
    # allow), and escaped every `authenticated_before` revocation, until that time.
    auth_time = _number(claims, "auth_time")
    if auth_time is not None and now + leeway < auth_time:
        raise TokenNotYetValid("authentication (auth_time) in the future", valid_from=auth_time - leeway)
    sub = claims.get("sub")
    if sub is not None and not isinstance(sub, str):
        raise ClaimInvalid("sub is not a string", claim="sub")
    # `sid` is a string (OIDC Front-/Back-Channel Logout, SSF's `opaque` session id): one of another type (`123`) was
    # never the session a revocation names ("123"), and a token naming it escaped every session revocation.
    sid = claims.get("sid")
    if sid is not None and not isinstance(sid, str):
        raise ClaimInvalid("sid is not a string", claim="sid")
    # An empty `sub` or client names nobody, as in an introspection answer: no caller for revocation entries,
    # rate-limit buckets or the upstream's user header to be keyed on. A client claim that is not a string refuses.
    client = clients_of(claims)[0]
    if not sub and client is None:
        raise ClaimInvalid("token names no subject", claim="sub")
    # An `aud` naming no audience (`""`, a list of no non-empty string) is malformed, like `[]`, not a mismatch: as
    # an introspection answer's (`verifier.tokens.introspection._audiences`). Looked at only once no audience matched.
    aud = claims.get("aud")
    if isinstance(aud, str):  # the common form: one audience, no list to walk
        if aud not in settings.audiences:
            if not aud:
                raise ClaimInvalid("aud names no audience", claim="aud")
            raise AudienceMismatch("token is not for this audience")
        return
    if not isinstance(aud, list) or not aud:
        raise ClaimInvalid("aud is required", claim="aud")
    if not any(isinstance(a, str) and a in settings.audiences for a in aud):
        if not any(isinstance(a, str) and a for a in aud):
            raise ClaimInvalid("aud names no audience", claim="aud")
        raise AudienceMismatch("token is not for this audience")


def principal_from_claims(
    claims: Mapping[str, Any], issuer: str, *, kid: str | None = None, alg: str = ""
) -> Principal:
    """Builds the principal of a verified token."""
    client, other_client = clients_of(claims)  # strings or absent (check_claims refused any other)
    sub = claims.get("sub")
    subject = sub if isinstance(sub, str) else ""  # a client is not a user: see `Principal`
    # Positional, in the field order of `Principal` (issuer, subject, client_id, scopes, roles, expires_at,
    # claims, kid, alg, other_client): one is built for every first-seen token.
    return Principal(
        issuer,
        subject,
        client,
        scopes_of(claims),
        roles_of(claims),
        float(claims["exp"]),  # bounded by check_claims
        claims,
        kid,
        alg,
        other_client,
    )


class JwtVerifier:
    """Verifies JWT access tokens against the configured issuers' keys."""

    def __init__(
        self, issuers: Mapping[str, IssuerSettings], keys: KeyStore, clock: Clock, *, max_token_bytes: int
    ) -> None:
        self._issuers = dict(issuers)
        self._keys = keys
        self._clock = clock
        self._max_bytes = max_token_bytes

    def parse(self, token: str) -> jws.CompactJWS:
        """Parses without verifying (exposed so callers can audit kid/alg on failure)."""
        return jws.parse(token, max_bytes=self._max_bytes)

    def _issuer_of(self, parsed: jws.CompactJWS) -> tuple[str, IssuerSettings, IssuerKeys | None, _Tenant | None]:
        """The token's issuer settings and its keys if held; for a template's tenant also the tenant (no I/O)."""
        iss = parsed.payload.get("iss")
        if not isinstance(iss, str):
            raise MalformedToken("token has no iss")
        settings = self._issuers.get(iss)
        tenant: _Tenant | None = None
        if settings is not None:
            keys = self._keys.get(iss)
            if keys is None:
                raise UnknownIssuer("untrusted issuer")
        else:
            tenant = self._keys.template_of(iss)  # a tenant off the allow-list is refused here, before any fetch
            if tenant is None:
                raise UnknownIssuer("untrusted issuer")
            settings = tenant[0].settings
            keys = tenant[0].held(tenant[1])
        if parsed.alg not in settings.algorithms:
            raise AlgorithmRefused(f"alg {parsed.alg} is not allowed for this issuer")
        if tenant is not None and settings.tenant_claim:
            # A provider that signs every tenant's tokens with one key set (Entra) vouches for the
            # tenant only in this claim: it must name the tenant `iss` names.
            claim = settings.tenant_claim
            if find_claim(parsed.payload, claim) != tenant[1]:  # its exact name, else a dotted path
                raise ClaimInvalid(f"{claim} does not name the tenant of iss", claim=claim)
        return iss, settings, keys, tenant

    def _finish(
        self, parsed: jws.CompactJWS, iss: str, settings: IssuerSettings, keys: IssuerKeys, key: VerificationKey | None
    ) -> Principal:
        alg, kid = parsed.alg, parsed.kid
        if key is None:
            if kid is not None and keys.ambiguous_kid(kid):
                raise UnknownKey("the issuer publishes two keys of one type under this kid")
            if keys.has_kid(kid):
                raise AlgorithmRefused("alg does not fit the key")
            if kid is None and keys.ambiguous(alg):
                raise UnknownKey(f"token has no kid and the issuer publishes more than {MAX_KIDLESS_KEYS} {alg} keys")
            raise UnknownKey("no key for this token")
        if kid is None:  # each key that fits its alg, pinned as for a kid, at most MAX_KIDLESS_KEYS
            verified = keys.verify(alg, parsed.signing_input, parsed.signature)
            if verified is None:
                raise BadSignature("signature verification failed")
            # The kid of the key that verified it (if it has one): the token cache forgets the token when that key
            # is withdrawn, and the audit line names it.
            kid = verified.kid
        elif not key.verify(alg, parsed.signing_input, parsed.signature):  # its kid's key alone (no kid confusion)
            raise BadSignature("signature verification failed")
        jws.remember(parsed)  # signed by the issuer: its header segment is no sender's own (see jws._HEADERS)
        check_claims(parsed.payload, parsed.header, settings, self._clock.now())
        return principal_from_claims(parsed.payload, iss, kid=kid, alg=alg)

    def verify_now(self, parsed: jws.CompactJWS) -> Principal | None:
        """Verifies with the keys held, without waiting; None when only a key refresh could tell.

        The common case (a held key) never creates a task or awaits: the whole check runs inline.
        """
        iss, settings, keys, _ = self._issuer_of(parsed)
        if keys is None:
            return None  # a tenant not yet held: its keys must be fetched
        key = keys.find(parsed.kid, parsed.alg)
        if key is None and not keys.has_kid(parsed.kid):
            return None
        return self._finish(parsed, iss, settings, keys, key)

    async def verify(self, parsed: jws.CompactJWS) -> Principal:
        """Verifies a parsed token; raises an `InvalidToken` subclass or `AudienceMismatch`."""
        iss, settings, keys, tenant = self._issuer_of(parsed)
        if keys is None:
            assert tenant is not None
            keys = await tenant[0].keys_for(tenant[1])
        key = keys.find(parsed.kid, parsed.alg)  # held keys answer without an await; only a miss may refresh
        if key is None:
            key = await keys.key_for(parsed.kid, parsed.alg)
        return self._finish(parsed, iss, settings, keys, key)
