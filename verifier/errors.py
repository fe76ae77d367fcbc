"""One error tree for every refusal, each with a stable snake_case code from the catalogue.

Parsers and verifiers raise these; what a code means on the wire (outcome, RFC 6750 error, challenge
scheme, reuse) is declared once in `verifier.reasons`, and only `verifier.doors.refusals` turns an error
into an answer (HTTP status, `WWW-Authenticate` challenges per RFC 6750 / RFC 9449 / RFC 9470, gRPC
code), so every front door answers alike. Errors are immutable: a changed copy comes from `replace`.
"""

from __future__ import annotations

from typing import Any, Generic, Self, TypeVar

from verifier.reasons import CATALOGUE as _CATALOGUE
from verifier.reasons import Outcome as Outcome  # re-exported: the catalogue defines them
from verifier.reasons import Reason, reason
from verifier.reasons import Scheme as Scheme

T = TypeVar("T")
_DERIVED = frozenset({"code", "reason", "outcome", "oauth_error", "reusable"})  # follow the code


class _Frozen(type):
    """Freezes an error once its (most derived) constructor has run."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        error = super().__call__(*args, **kwargs)
        error.__dict__["_frozen"] = True
        return error


class _FromCatalogue(Generic[T]):
    """A read-only attribute an error takes from its code's catalogue entry (on the class too)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __get__(self, error: VerifierError | None, owner: type[VerifierError]) -> T:
        value: T = getattr(reason(owner.code if error is None else error.code), self._name)
        return value


class VerifierError(Exception, metaclass=_Frozen):
    """Base of every refusal. `code` is stable (metrics, audit, `X-Verifier-Reason`) and catalogued."""

    code: str = "invalid_token"

    reason: Reason
    description: str
    scheme: Scheme  # which scheme the 401 challenge names: the code's own, or the one this refusal is about

    def __init__(self, description: str = "", *, code: str | None = None, scheme: Scheme | None = None) -> None:
        code = code if code is not None else type(self).code
        entry = _CATALOGUE.get(code) or reason(code)  # a code outside the catalogue is a bug: refused here
        super().__init__(description or code)
        # One dict update (refusals are built on the hot path); the catalogue's values are copied so an
        # instance reads them as plain attributes (the descriptors below serve the class).
        self.__dict__.update(
            reason=entry,
            code=code,
            description=description or code.replace("_", " "),
            scheme=scheme if scheme is not None else entry.scheme,
            outcome=entry.outcome,
            oauth_error=entry.oauth_error,
            reusable=entry.reusable,
        )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        reason(cls.code)  # a class whose code is not catalogued fails at import

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen") and not name.startswith("__"):
            raise AttributeError(f"{type(self).__name__} is immutable; use replace()")
        super().__setattr__(name, value)

    # Read from the catalogue by code on the class; an instance holds its own copies (set in __init__).
    outcome: _FromCatalogue[Outcome] = _FromCatalogue("outcome")
    oauth_error: _FromCatalogue[str | None] = _FromCatalogue("oauth_error")
    reusable: _FromCatalogue[bool] = _FromCatalogue("reusable")

    def __copy__(self) -> Self:
        return self.replace()

    def __setstate__(self, state: dict[str, Any] | None) -> None:  # copy.deepcopy and pickle restore this way
        self.__dict__.update(state or {})

    def replace(self, **changes: Any) -> Self:
        """A copy with some attributes changed (errors are immutable, like `dataclasses.replace`)."""
        clone = type(self).__new__(type(self))
        Exception.__init__(clone, *self.args)
        clone.__dict__.update(self.__dict__)
        for name in changes:
            if name not in self.__dict__ or name in _DERIVED:
                raise AttributeError(f"{type(self).__name__}.{name} cannot be replaced (another code: a new error)")
        clone.__dict__.update(changes)
        return clone

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


class MalformedRequest(VerifierError):
    """The credential header itself cannot be read (two Authorization schemes, bad syntax)."""

    code = "invalid_request"


class InvalidToken(VerifierError):
    """The token is malformed, badly signed, expired, or otherwise not acceptable."""

    code = "invalid_token"


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


class TenantNotAllowed(InvalidToken):
    """`iss` fits an issuer template, but names a tenant outside its allow-list (refused before any fetch)."""

    code = "tenant_not_allowed"


class TokenExpired(InvalidToken):
    """`exp` is in the past (beyond leeway)."""

    code = "token_expired"


class TokenNotYetValid(InvalidToken):
    """`nbf`, `iat` or `auth_time` lies in the future (beyond leeway). `valid_from` (epoch seconds): when that claim
    stops refusing the token, so that a remembered refusal does not outlive it (0.0: not said, not remembered)."""

    code = "token_not_yet_valid"

    def __init__(self, description: str = "", *, valid_from: float = 0.0) -> None:
        super().__init__(description)
        self.valid_from = valid_from


class ClaimInvalid(InvalidToken):
    """A required claim is missing or has the wrong type or value."""

    code = "claim_invalid"

    def __init__(self, description: str = "", *, claim: str = "", code: str | None = None) -> None:
        super().__init__(description, code=code)
        self.claim = claim


class NotFound(VerifierError):
    """One of our own endpoints' resources (a revocation entry, a WebAuthn credential) does not exist."""

    code = "not_found"


class WrongTokenType(InvalidToken):
    """`typ` says this is not an access token (e.g. an ID token presented as one); for an introspection answer,
    `token_type`, `typ` or `token_use` (a refresh token's answer, e.g.)."""

    code = "token_type_invalid"


class AudienceMismatch(VerifierError):
    """Valid token, but not meant for this API (RFC 6750: insufficient_scope, 403)."""

    code = "audience_mismatch"


class Forbidden(VerifierError):
    """A policy refused an authenticated caller."""

    code = "forbidden"


class ProviderUnavailable(VerifierError):
    """We could not reach the provider (keys or introspection) and have nothing cached: fail closed."""

    code = "provider_unavailable"


class Overloaded(VerifierError):
    """Load shedding: the verifier is at its concurrency bound (503 + Retry-After; gRPC RESOURCE_EXHAUSTED)."""

    code = "overloaded"


class InternalError(VerifierError):
    """A bug, not a verdict: fail closed with 503 (the traceback is logged, never the token)."""

    code = "internal_error"


class InvalidDpopProof(VerifierError):
    """RFC 9449 section 7.1: the DPoP proof is missing, malformed, replayed or does not fit."""

    code = "dpop_proof_invalid"


class UseDpopNonce(VerifierError):
    """RFC 9449 section 9: the resource server requires a fresh server-provided nonce."""

    code = "dpop_nonce_required"

    def __init__(self, description: str = "", *, nonce: str = "") -> None:
        super().__init__(description or "a DPoP nonce is required")
        self.nonce = nonce

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        """RFC 9449 section 9: the fresh nonce travels in `DPoP-Nonce`."""
        return (("dpop-nonce", self.nonce),) if self.nonce else ()


class SenderConstraintFailed(InvalidToken):
    """RFC 8705 / RFC 9449: a bound token presented without, or with the wrong, proof of possession."""

    code = "sender_constraint_failed"


class InsufficientUserAuthentication(VerifierError):
    """RFC 9470: authentication too weak or too old; the client must step up at the provider."""

    code = "insufficient_user_authentication"


class RateLimited(VerifierError):
    """Too many requests for this identity or role."""

    code = "rate_limited"

    def __init__(
        self, description: str = "", *, retry_after: int = 1, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(description or "rate limit exceeded")
        self.retry_after = retry_after
        self.headers = headers  # the RateLimit-Policy / RateLimit headers

    def extra_headers(self) -> tuple[tuple[str, str], ...]:
        """Retry-After and the RateLimit headers."""
        return (("retry-after", str(self.retry_after)), *self.headers)


class StateUnavailable(VerifierError):
    """Shared state (Redis) is unreachable: replay-checked requests fail closed."""

    code = "state_unavailable"


class BucketStoreFull(StateUnavailable):
    """Redis holds as many rate-limit buckets as its `issuers[]` entry's share of `state.redis_max_buckets` allows
    (every replica's together): a new identity of that entry's first request is refused, fail closed, with the
    answer of unavailable state (503 `state_unavailable`, the code it keeps), its Retry-After `retry_after`: the
    seconds until the entry's oldest counted buckets expire. Identities whose bucket exists are served as before,
    and other entries' new identities have their own share. Not a 429: the caller did nothing wrong."""

    def __init__(self, description: str = "", *, retry_after: int) -> None:
        super().__init__(description)
        self.retry_after = retry_after


class RevocationNotReplicated(StateUnavailable):
    """A revocation entry reached the Redis primary (and this replica's index) but fewer than
    `state.redis_revocation_replicas` replicas confirmed it within the wait: a failover now could lose it, so its
    sender is not acknowledged (503 `state_unavailable`, the code it keeps; an SSF transmitter or logout sender
    retries, a polled SET is delivered again). `confirmed` of `replicas` replicas had it."""

    def __init__(self, description: str = "", *, replicas: int, confirmed: int) -> None:
        super().__init__(description)
        self.replicas = replicas
        self.confirmed = confirmed


class ReplayStoreFull(StateUnavailable):
    """The replay store (local, or Redis) holds as many live one-time values of this purpose as it may: this one
    is refused, not remembered, and no live one is forgotten to make room (that would let it be replayed). A
    503 whose Retry-After is `retry_after`: the seconds until the purpose's oldest live values expire and
    make room (the client tries again then, with a fresh proof). `purpose` is a `Purpose` value."""

    code = "replay_store_full"

    def __init__(self, description: str = "", *, purpose: str, retry_after: int) -> None:
        super().__init__(description)
        self.purpose = purpose
        self.retry_after = retry_after
