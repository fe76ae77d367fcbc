"""The catalogue of refusal codes: every `X-Verifier-Reason` declared once, with how it is answered.

A code names one refusal and carries its outcome (which decides the HTTP status and the gRPC code,
see `verifier.doors.refusals`), its RFC 6750 section 3.1 `error` (RFC 9449 section 7.1 for DPoP,
RFC 9470 for step-up), the scheme its 401 challenge names, and whether a gateway may briefly reuse
the refusal for the same token. `verifier.errors.VerifierError` reads all of it from here by code,
and refuses a code that is not here; the README's answer table is generated from it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping


class Outcome(enum.Enum):
    """How a refusal maps onto the protocols: the one axis the front doors care about."""

    UNAUTHENTICATED = "unauthenticated"  # 401, with a challenge
    FORBIDDEN = "forbidden"  # 403
    RATE_LIMITED = "rate_limited"  # 429
    UNAVAILABLE = "unavailable"  # 503: we could not decide; fail closed
    OVERLOADED = "overloaded"  # 503 on HTTP; the gRPC call itself is refused (RESOURCE_EXHAUSTED)
    BAD_REQUEST = "bad_request"  # 400: the request (a header, a body) cannot be read or is refused
    NOT_FOUND = "not_found"  # 404: our own endpoints' resources
    CONFLICT = "conflict"  # 409: our own endpoints' resources


class Scheme(enum.Enum):
    """Which authentication scheme a 401 challenge names."""

    BEARER = "Bearer"
    DPOP = "DPoP"
    WEBAUTHN = "WebAuthn"


@dataclasses.dataclass(frozen=True, slots=True)
class Reason:
    """One catalogued refusal code."""

    code: str
    outcome: Outcome
    summary: str  # one line for the README
    # RFC 6750 section 3.1 error for the challenge; None: a bare challenge (no token) or none at all.
    oauth_error: str | None = None
    scheme: Scheme = Scheme.BEARER  # the scheme a 401 challenge names (an error may name DPoP instead)
    reusable: bool = False  # a gateway may briefly reuse this refusal for the same token (garbage floods)


ALLOW = "ok"  # the reason of every allow answer
_U, _F, _B = Outcome.UNAUTHENTICATED, Outcome.FORBIDDEN, Outcome.BAD_REQUEST
_INVALID, _SCOPE, _STEP_UP = "invalid_token", "insufficient_scope", "insufficient_user_authentication"
_REQUEST, _WA, _DPOP = "invalid_request", Scheme.WEBAUTHN, Scheme.DPOP


def _token(code: str, summary: str, *, reusable: bool = True, scheme: Scheme = Scheme.BEARER) -> Reason:
    return Reason(code, _U, summary, _INVALID, scheme, reusable)


def _assertion(code: str, summary: str) -> Reason:
    return Reason(code, _U, summary, _STEP_UP, _WA)


def _registration(code: str, summary: str) -> Reason:
    return Reason(code, _B, summary)  # about the body, not the credential: no challenge


_REASONS = (
    # no credential, or one we cannot read
    Reason("token_missing", _U, "no credential at all: a bare challenge, never reused"),
    Reason("invalid_request", _B, "the request cannot be read (two Authorization schemes, a bad body)", _REQUEST),
    # the token itself
    _token("invalid_token", "the token is not acceptable"),
    _token("token_malformed", "not a well-formed JWS compact serialization, or too large"),
    _token("signature_invalid", "the signature does not verify against the issuer's key"),
    _token("algorithm_refused", "`alg` is not on the issuer's allow-list, or does not fit the key"),
    _token("key_unknown", "no key with this `kid`, after at most one refresh of the issuer's JWKS"),
    _token("issuer_unknown", "`iss` is not a configured issuer"),
    _token("tenant_not_allowed", "`iss` fits an issuer template, but its tenant is not on the allow-list"),
    _token("issuer_mismatch", "the introspection answer names another issuer"),
    _token("token_expired", "`exp` is in the past", reusable=False),
    _token("token_not_yet_valid", "`nbf`, `iat` or `auth_time` lies in the future", reusable=False),
    _token("claim_invalid", "a required claim is missing or has the wrong type or value"),
    _token(
        "token_type_invalid",
        "`typ` (an introspection answer's `token_type`, `typ` or `token_use`) says this is not an access token",
    ),
    _token("token_inactive", "introspection says the token is not active"),
    # revocation (SSF events, the kill switch): final, never reused
    _token("token_revoked", "the token was revoked", reusable=False),
    _token("session_revoked", "the token's session was revoked", reusable=False),
    _token("credential_revoked", "the credential behind the token was revoked", reusable=False),
    _token("account_disabled", "the account is disabled", reusable=False),
    _token(
        "token_outlives_revocation",
        "the token lives longer than `revocation.max_token_lifetime_seconds`, how long revocations are kept",
    ),
    # sender constraints (RFC 8705, RFC 9449)
    _token("sender_constraint_failed", "a bound token without, or with the wrong, proof of possession", reusable=False),
    _token("token_not_dpop_bound", "the DPoP scheme with a token that is not DPoP-bound", scheme=_DPOP),
    Reason(
        "dpop_proof_invalid",
        _U,
        "the DPoP proof is missing, malformed, replayed or not this request's",
        "invalid_dpop_proof",
        _DPOP,
    ),
    Reason("dpop_nonce_required", _U, "a fresh server nonce is required (`DPoP-Nonce`)", "use_dpop_nonce", _DPOP),
    # per-route trust (policies[].require.issuers_any, audiences_any, clients_any; resource): never the
    # token's fault alone, so never remembered for the token, and a 401 sends the client for another token
    _token("issuer_not_trusted", "the token's issuer is not trusted on this route (`issuers_any`)", reusable=False),
    _token("audience_not_trusted", "`aud` names none of this route's audiences or its `resource`", reusable=False),
    # authorization
    Reason(
        "client_not_allowed",
        _F,
        "the token's client (`client_id`, else `azp`; each when they differ) may not use this route",
        _SCOPE,
    ),
    Reason("audience_mismatch", _F, "a valid token, not meant for this API", _SCOPE),
    Reason("forbidden", _F, "a policy refused the caller", _SCOPE),
    Reason("route_not_allowed", _F, "no policy covers this route", _SCOPE),
    Reason("role_missing", _F, "a required role is missing", _SCOPE),
    Reason("scope_missing", _F, "a required scope is missing", _SCOPE),
    Reason("webauthn_user_required", _F, "WebAuthn needs a user; this token names a client", _SCOPE),
    # what the upstream receives: a claim that cannot be sent whole is refused, never cut (no challenge:
    # no other token or scope would help; the operator's mapping or the provider's claim must change)
    Reason("upstream_claim_too_large", _F, "a claim mapped to an upstream header is over `upstream.max_value_bytes`"),
    Reason(
        "upstream_identity_too_large",
        _F,
        "the identity headers together (claims, assertion, fixed four) are over `upstream.max_total_bytes`",
    ),
    Reason(
        "upstream_consumer_unnamable",
        _F,
        "the `upstream.consumer` claim cannot be sent as it is (control characters, white space at an end)",
    ),
    # assurance (RFC 9470) and WebAuthn step-up (a fresh challenge in every refusal)
    Reason("insufficient_user_authentication", _U, "authentication too weak or too old: step up", _STEP_UP),
    _assertion("webauthn_assertion_required", "the route needs a WebAuthn assertion bound to this request"),
    _assertion("webauthn_assertion_malformed", "the assertion header cannot be read"),
    _assertion("webauthn_client_data_invalid", "clientDataJSON is not a webauthn.get"),
    _assertion("webauthn_origin_mismatch", "the assertion was made for another origin"),
    _assertion("webauthn_rp_id_mismatch", "the assertion was made for another relying party"),
    _assertion("webauthn_credential_unknown", "the credential is not registered to this user"),
    _assertion("webauthn_credential_disabled", "the credential was disabled (a revocation event)"),
    _assertion("webauthn_user_presence_missing", "the user was not present"),
    _assertion("webauthn_user_verification_missing", "the user was not verified"),
    _assertion("webauthn_signature_invalid", "the assertion signature does not verify"),
    _assertion("webauthn_challenge_invalid", "the challenge was not issued by this verifier"),
    _assertion("webauthn_challenge_expired", "the challenge has expired"),
    _assertion("webauthn_challenge_mismatch", "the challenge was issued for another user or request"),
    _assertion("webauthn_challenge_replayed", "the challenge was already used"),
    _assertion("webauthn_counter_regression", "the signature counter went back (a cloned authenticator)"),
    # WebAuthn registration (the registry's own endpoints)
    _registration("webauthn_registration_invalid", "the registration ceremony does not verify"),
    _registration("webauthn_state_invalid", "the registration state is malformed, altered or not this user's"),
    _registration("webauthn_state_expired", "the registration state has expired"),
    _registration("webauthn_state_replayed", "the registration state was already used"),
    _registration("webauthn_algorithm_refused", "the credential's algorithm is not accepted"),
    _registration("webauthn_credential_limit", "the user has as many credentials as one may (50): delete one first"),
    Reason("webauthn_credential_exists", Outcome.CONFLICT, "this credential is already registered"),
    Reason(
        "webauthn_revoked_credential_kept",
        Outcome.CONFLICT,
        "the user's last credential disabled by a revocation is kept: register a new one first",
    ),
    Reason("not_found", Outcome.NOT_FOUND, "no such entry or credential (the admin and WebAuthn endpoints)"),
    # load and dependencies: fail closed
    Reason("rate_limited", Outcome.RATE_LIMITED, "too many requests for this identity or role"),
    Reason("provider_unavailable", Outcome.UNAVAILABLE, "the provider is unreachable and nothing is cached"),
    Reason(
        "state_unavailable",
        Outcome.UNAVAILABLE,
        "shared state (Redis) unreachable, or revocation entries not yet loaded",
    ),
    Reason(
        "replay_store_full",
        Outcome.UNAVAILABLE,
        "the replay store's part for this purpose is full of live one-time values: try again (Retry-After)",
    ),
    Reason("internal_error", Outcome.UNAVAILABLE, "a bug, not a verdict (the traceback is logged)"),
    Reason("overloaded", Outcome.OVERLOADED, "the verifier is at its concurrency bound"),
)

CATALOGUE: Mapping[str, Reason] = {r.code: r for r in _REASONS}
if len(CATALOGUE) != len(_REASONS):
    raise RuntimeError("a refusal code is declared twice in verifier/reasons.py")


def reason(code: str) -> Reason:
    """The catalogue entry for `code`; raises ValueError for a code that is not catalogued."""
    found = CATALOGUE.get(code)
    if found is None:
        raise ValueError(f"refusal code {code!r} is not in the catalogue (verifier/reasons.py)")
    return found
