"""Trusted token issuers: the `issuers[]` entries (also the key settings of an SSF transmitter)."""

from __future__ import annotations

import dataclasses

from verifier.config.introspection import IntrospectionConfig

# Algorithms we can verify with asymmetric keys. HS* is deliberately absent: a verifier that holds
# only public keys must never accept a MAC, or a public key becomes a shared secret.
SUPPORTED_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)

DEFAULT_LEEWAY_SECONDS = 30  # seconds of clock skew tolerated on exp/nbf/iat
DEFAULT_JWKS_MIN_TTL_SECONDS = 60.0  # floor on a provider's Cache-Control max-age for the JWKS
DEFAULT_JWKS_MAX_TTL_SECONDS = 3600.0  # ceiling: refetch at least hourly even if told otherwise
DEFAULT_JWKS_COOLDOWN_SECONDS = 30.0  # at most one unknown-kid refresh per issuer per this many s
DEFAULT_FETCH_TIMEOUT_SECONDS = 5.0  # deadline on every discovery/JWKS call
DEFAULT_MAX_JWKS_BYTES = 1 << 20  # 1 MiB: a JWKS larger than this is malformed, not a key set
DEFAULT_MAX_JWKS_KEYS = 100  # keys kept per issuer; more is a misconfiguration or an attack


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoleRule:
    """Grants `role` when a claim contains one of `values`, a scope is held, or the subject is listed."""

    role: str
    claim: str = ""  # e.g. "groups": a string or list-of-strings claim
    values: tuple[str, ...] = ()  # the claim must contain one of these
    scope: str = ""  # or: this scope is held
    subjects: tuple[str, ...] = ()  # or: the subject is one of these


@dataclasses.dataclass(frozen=True, kw_only=True)
class IssuerSettings:
    """One trusted token issuer."""

    issuer: str  # exact `iss` value; discovery lives under it
    audiences: tuple[str, ...]  # at least one must appear in `aud`
    algorithms: tuple[str, ...]  # allow-list; tokens with any other `alg` are refused
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS
    discovery_url: str = ""  # default: {issuer}/.well-known/openid-configuration
    jwks_uri: str = ""  # set to skip discovery
    require_typ_at_jwt: bool = False  # RFC 9068 strict mode: only `typ: at+jwt` is accepted
    jwks_min_ttl_seconds: float = DEFAULT_JWKS_MIN_TTL_SECONDS
    jwks_max_ttl_seconds: float = DEFAULT_JWKS_MAX_TTL_SECONDS
    jwks_cooldown_seconds: float = DEFAULT_JWKS_COOLDOWN_SECONDS
    fetch_timeout_seconds: float = DEFAULT_FETCH_TIMEOUT_SECONDS
    roles: tuple[RoleRule, ...] = ()  # claim -> role mapping rules
    introspection: IntrospectionConfig | None = None  # RFC 7662 introspection, when configured
    introspect_jwts: bool = False  # also introspect this issuer's JWTs (revocation check)

    @property
    def discovery(self) -> str:
        """The OIDC discovery document's URL."""
        return self.discovery_url or self.issuer.rstrip("/") + "/.well-known/openid-configuration"


