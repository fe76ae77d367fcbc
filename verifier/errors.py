"""One error tree for every refusal, each with a stable snake_case code and an outcome.

Parsers and verifiers raise these; only `verifier.decision` turns them into answers (HTTP status,
`WWW-Authenticate` challenges per RFC 6750 / RFC 9449 / RFC 9470), so every front door answers alike.
"""

from __future__ import annotations

import enum


class Outcome(enum.Enum):
    """How a refusal maps onto the protocol: the one axis the front doors care about."""

    UNAUTHENTICATED = "unauthenticated"  # 401, with a challenge
    FORBIDDEN = "forbidden"  # 403
    RATE_LIMITED = "rate_limited"  # 429
    UNAVAILABLE = "unavailable"  # 503: we could not decide; fail closed
    BAD_REQUEST = "bad_request"  # 400: the gateway sent something we cannot read


class Scheme(enum.Enum):
    """Which authentication scheme a 401 challenge names."""

    BEARER = "Bearer"
    DPOP = "DPoP"
    WEBAUTHN = "WebAuthn"


class VerifierError(Exception):
    """Base of every refusal. `code` is stable (metrics, audit, `X-Verifier-Reason`)."""

    code: str = "error"
    outcome: Outcome = Outcome.UNAUTHENTICATED
    # RFC 6750 section 3.1 error code for the challenge; None means a bare challenge (no token sent).
    oauth_error: str | None = "invalid_token"
    # Whether a gateway may briefly reuse this refusal for the same token (garbage floods).
    reusable: bool = False
    # Which scheme the 401 challenge names.
    scheme: Scheme = Scheme.BEARER

    def __init__(self, description: str = "", *, code: str | None = None) -> None:
        super().__init__(description or self.code)
        self.description = description or self.code.replace("_", " ")
        if code is not None:
            self.code = code

    def challenge_params(self) -> dict[str, str | int]:
        """Extra `WWW-Authenticate` parameters (ints are written unquoted)."""
        return {}

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        """Extra headers for the client (Retry-After, DPoP-Nonce, RateLimit, ...)."""
        return ()

    def extra_body(self) -> dict[str, object]:
        """Extra members of the JSON error body."""
        return {}


class MissingToken(VerifierError):
    """No credential at all: a bare challenge, never reused (RFC 6750 section 3.1)."""

    code = "token_missing"
    oauth_error = None


class MalformedRequest(VerifierError):
    """The credential header itself cannot be read (two Authorization schemes, bad syntax)."""

    code = "invalid_request"
    oauth_error = "invalid_request"
    outcome = Outcome.BAD_REQUEST


class InvalidToken(VerifierError):
    """The token is malformed, badly signed, expired, or otherwise not acceptable."""

    code = "invalid_token"
    reusable = True


class MalformedToken(InvalidToken):
    """Not a well-formed JWS compact serialization, or too large."""

    code = "token_malformed"


class BadSignature(InvalidToken):
    """The signature does not verify against the issuer's key."""

    code = "signature_invalid"


class AlgorithmRefused(InvalidToken):
    """`alg` is not on the issuer's allow-list, or does not fit the key's type."""

    code = "algorithm_refused"


class UnknownKey(InvalidToken):
    """No key with this `kid` after at most one refresh of the issuer's JWKS."""

    code = "key_unknown"


class UnknownIssuer(InvalidToken):
    """`iss` is not a configured issuer (exact match)."""

    code = "issuer_unknown"


class TokenExpired(InvalidToken):
    """`exp` is in the past (beyond leeway)."""

    code = "token_expired"
    reusable = False  # the answer is already final; nothing to gain, and time-dependent


class TokenNotYetValid(InvalidToken):
    """`nbf` or `iat` lies in the future (beyond leeway)."""

    code = "token_not_yet_valid"
    reusable = False


class ClaimInvalid(InvalidToken):
    """A required claim is missing or has the wrong type or value."""

    code = "claim_invalid"

    def __init__(self, description: str = "", *, claim: str = "", code: str | None = None) -> None:
        super().__init__(description, code=code)
        self.claim = claim


class WrongTokenType(InvalidToken):
    """`typ` says this is not an access token (e.g. an ID token presented as one)."""

    code = "token_type_invalid"


class AudienceMismatch(VerifierError):
    """Valid token, but not meant for this API (RFC 6750: insufficient_scope, 403)."""

    code = "audience_mismatch"
    outcome = Outcome.FORBIDDEN
    oauth_error = "insufficient_scope"


class Forbidden(VerifierError):
    """A policy refused an authenticated caller."""

    code = "forbidden"
    outcome = Outcome.FORBIDDEN
    oauth_error = "insufficient_scope"


class ProviderUnavailable(VerifierError):
    """We could not reach the provider (keys or introspection) and have nothing cached: fail closed."""

    code = "provider_unavailable"
    outcome = Outcome.UNAVAILABLE
    oauth_error = None


class Overloaded(VerifierError):
    """Load shedding: the verifier is at its concurrency bound (503 + Retry-After; gRPC RESOURCE_EXHAUSTED)."""

    code = "overloaded"
    outcome = Outcome.UNAVAILABLE
    oauth_error = None


class InternalError(VerifierError):
    """A bug, not a verdict: fail closed with 503 (the traceback is logged, never the token)."""

    code = "internal_error"
    outcome = Outcome.UNAVAILABLE
    oauth_error = None


class InvalidDpopProof(VerifierError):
    """RFC 9449 section 7.1: the DPoP proof is missing, malformed, replayed or does not fit."""

    code = "dpop_proof_invalid"
    oauth_error = "invalid_dpop_proof"
    scheme = Scheme.DPOP


class UseDpopNonce(VerifierError):
    """RFC 9449 section 9: the resource server requires a fresh server-provided nonce."""

    code = "dpop_nonce_required"
    oauth_error = "use_dpop_nonce"
    scheme = Scheme.DPOP

    def __init__(self, description: str = "", *, nonce: str = "") -> None:
        super().__init__(description or "a DPoP nonce is required")
        self.nonce = nonce

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        """RFC 9449 section 9: the fresh nonce travels in `DPoP-Nonce`."""
        return (("dpop-nonce", self.nonce),) if self.nonce else ()


class SenderConstraintFailed(InvalidToken):
    """RFC 8705 / RFC 9449: a bound token presented without, or with the wrong, proof of possession."""

    code = "sender_constraint_failed"
    reusable = False


class InsufficientUserAuthentication(VerifierError):
    """RFC 9470: authentication too weak or too old; the client must step up at the provider."""

    code = "insufficient_user_authentication"
    oauth_error = "insufficient_user_authentication"


class RateLimited(VerifierError):
    """Too many requests for this identity or role."""

    code = "rate_limited"
    outcome = Outcome.RATE_LIMITED
    oauth_error = None

    def __init__(self, description: str = "", *, retry_after: int = 1) -> None:
        super().__init__(description or "rate limit exceeded")
        self.retry_after = retry_after
        self.headers: tuple[tuple[str, str], ...] = ()

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        """Retry-After and the RateLimit headers."""
        return (("retry-after", str(self.retry_after)), *self.headers)


class StateUnavailable(VerifierError):
    """Shared state (Redis) is unreachable: replay-checked requests fail closed."""

    code = "state_unavailable"
    outcome = Outcome.UNAVAILABLE
    oauth_error = None
