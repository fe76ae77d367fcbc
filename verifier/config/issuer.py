"""Trusted token issuers: the `issuers[]` entries (also the key settings of an SSF transmitter)."""

from __future__ import annotations

import dataclasses

from verifier.config.base import setting
from verifier.config.introspection import IntrospectionConfig
from verifier.config.logout import BackchannelLogoutConfig

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

    role: str = setting(doc="the logical role granted")
    claim: str = setting("", doc='a string or list-of-strings claim, e.g. "groups" (with values)')
    values: tuple[str, ...] = setting((), doc="the claim must contain one of these")
    scope: str = setting("", doc="or: this scope is held")
    subjects: tuple[str, ...] = setting((), doc="or: the subject is one of these")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IssuerSettings:
    """One trusted token issuer."""

    issuer: str = setting(doc="exact `iss` value; discovery lives under it; https required")
    audiences: tuple[str, ...] = setting(doc="at least one must appear in `aud`")
    algorithms: tuple[str, ...] = setting(doc="allow-list; tokens with any other `alg` are refused")
    allow_insecure_http: bool = setting(False, doc="plain http on loopback (tests and local labs only)")
    leeway_seconds: int = setting(
        DEFAULT_LEEWAY_SECONDS, maximum=600, unit="seconds", doc="clock skew tolerated on exp/nbf/iat"
    )
    discovery_url: str = setting("", doc="default: {issuer}/.well-known/openid-configuration")
    jwks_uri: str = setting("", doc="set to skip discovery")
    require_typ_at_jwt: bool = setting(False, doc="RFC 9068 strict mode: only `typ: at+jwt` is accepted")
    jwks_min_ttl_seconds: float = setting(
        DEFAULT_JWKS_MIN_TTL_SECONDS, minimum=1, unit="seconds", doc="floor on the JWKS Cache-Control max-age"
    )
    jwks_max_ttl_seconds: float = setting(
        DEFAULT_JWKS_MAX_TTL_SECONDS, minimum=1, unit="seconds", doc="ceiling: refetch at least this often"
    )
    jwks_cooldown_seconds: float = setting(
        DEFAULT_JWKS_COOLDOWN_SECONDS, unit="seconds", doc="at most one unknown-kid refresh per this many"
    )
    fetch_timeout_seconds: float = setting(
        DEFAULT_FETCH_TIMEOUT_SECONDS, minimum=0.05, maximum=60, unit="seconds", doc="deadline on discovery/JWKS calls"
    )
    roles: tuple[RoleRule, ...] = ()  # `roles[]`: claim -> role mapping rules
    introspection: IntrospectionConfig | None = None  # `introspection`: RFC 7662, when configured
    introspect_jwts: bool = setting(False, doc="also introspect this issuer's JWTs (revocation check)")
    # `backchannel_logout`: OpenID Connect Back-Channel Logout 1.0, when configured
    backchannel_logout: BackchannelLogoutConfig | None = None

    @property
    def discovery(self) -> str:
        """The OIDC discovery document's URL."""
        return self.discovery_url or self.issuer.rstrip("/") + "/.well-known/openid-configuration"


