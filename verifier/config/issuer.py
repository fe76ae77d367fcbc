"""Trusted token issuers: the `issuers[]` entries (also the key settings of an SSF transmitter)."""

from __future__ import annotations

import dataclasses
import re
from urllib.parse import urlsplit

from verifier.config.base import setting
from verifier.config.introspection import IntrospectionConfig
from verifier.config.logout import BackchannelLogoutConfig

# Algorithms we can verify with asymmetric keys. HS* is deliberately absent: a verifier that holds
# only public keys must never accept a MAC, or a public key becomes a shared secret.
SUPPORTED_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)

# `audiences: ["*"]` (or a policy's `audiences_any`): an operator's wildcard that is none. Audiences are compared
# exactly, so it would take only tokens whose `aud` is the string "*", which a provider letting clients name their
# audience (a token exchange, a dev IdP) issues to anyone who asks.
WILDCARD_AUDIENCE = (
    "'*' is no wildcard: audiences are compared exactly, so it takes only tokens whose aud is the string '*' (which "
    "a provider letting clients name their audience would issue); name this API's audience"
)
DEFAULT_LEEWAY_SECONDS = 30  # seconds of clock skew tolerated on exp/nbf/iat
# seconds: the most leeway an issuer may be given; revocation entries outlive their tokens' exp by this much
MAX_LEEWAY_SECONDS = 600
DEFAULT_JWKS_MIN_TTL_SECONDS = 60.0  # floor on a provider's Cache-Control max-age for the JWKS
DEFAULT_JWKS_MAX_TTL_SECONDS = 3600.0  # ceiling: refetch at least hourly even if told otherwise
# seconds: the longest a JWKS may be held unrefetched (either bound). A key the provider withdraws (leaked) stays
# trusted until the next fetch: a floor of a week let its holder mint accepted tokens for a week.
MAX_JWKS_TTL_SECONDS = 86_400
DEFAULT_JWKS_COOLDOWN_SECONDS = 30.0  # at most one unknown-kid refresh per issuer per this many s
# seconds: the longest cooldown. After any fetch a token signed with a key the provider has just added (a rotation)
# is refused (key_unknown) until the cooldown is over: an hour's cooldown refused a rotated key for an hour.
MAX_JWKS_COOLDOWN_SECONDS = 600
DEFAULT_FETCH_TIMEOUT_SECONDS = 5.0  # deadline on every discovery/JWKS call
DEFAULT_MAX_JWKS_BYTES = 1 << 20  # 1 MiB: a JWKS larger than this is malformed, not a key set
DEFAULT_MAX_JWKS_KEYS = 100  # keys kept per issuer; more is a misconfiguration or an attack
DEFAULT_MAX_TENANTS = 1000  # entries: tenants of one issuer template whose keys are held (LRU beyond)
# Discoveries of tenants not yet held and held tenants' JWKS refetches for unknown kids, per minute per
# template: a flood of made-up tenant names or kids costs the provider at most this many requests a minute,
# however many tokens arrive.
DEFAULT_NEW_TENANTS_PER_MINUTE = 60

TENANT_PLACEHOLDER = "{tenant}"
ANY_TENANT = "any"  # `tenants: any`
# One path segment: no `/`, no percent-encoding, not `.` or `..`; 64 characters at most.
TENANT_NAME = re.compile(r"(?!\.{1,2}\Z)(?!.*\.\.)[A-Za-z0-9._-]{1,64}\Z")


def template_problem(url: str) -> str:
    """Why `url` is not an issuer template (empty: it is one): one `{tenant}` placeholder, in the path.

    Scheme, host and port are pinned: the tenant only ever fills a path segment, so a token cannot
    choose the host its keys are fetched from.
    """
    if url.count(TENANT_PLACEHOLDER) != 1 or url.count("{") != 1 or url.count("}") != 1:
        return f"expected exactly one {TENANT_PLACEHOLDER} placeholder, got {url!r}"
    prefix, suffix = url.split(TENANT_PLACEHOLDER)
    parts = urlsplit(prefix)
    if not parts.netloc or not parts.path.startswith("/") or parts.query or parts.fragment:
        return f"{TENANT_PLACEHOLDER} must be in the path, after scheme://host[:port]/ ({url!r})"
    if not prefix.endswith("/") or (suffix and not suffix.startswith("/")) or any(c in suffix for c in "?#%"):
        return f"{TENANT_PLACEHOLDER} must be a whole path segment ({url!r})"
    return ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoleRule:
    """Grants `role` when a claim contains one of `values`, a scope is held, or the subject is listed."""

    role: str = setting(doc="the logical role granted")
    claim: str = setting(
        "",
        doc='a list-of-strings or string claim, e.g. "groups": its exact name, else a dotted path into nested '
        "objects (realm_access.roles); a string is one value (scope, scp: split); email, phone_number: only with "
        "its _verified claim true",
    )
    values: tuple[str, ...] = setting((), doc="the claim must contain one of these")
    scope: str = setting("", doc="or: this scope is held")
    subjects: tuple[str, ...] = setting((), doc="or: the subject is one of these")


@dataclasses.dataclass(frozen=True, kw_only=True)
class IssuerSettings:
    """One trusted token issuer."""

    issuer: str = setting(doc="exact `iss` value; discovery lives under it; https required")
    audiences: tuple[str, ...] = setting(doc="at least one must appear in `aud` (compared exactly: \"*\" is refused)")
    algorithms: tuple[str, ...] = setting(doc="allow-list; tokens with any other `alg` are refused")
    allow_insecure_http: bool = setting(False, doc="plain http on loopback (tests and local labs only)")
    leeway_seconds: int = setting(
        DEFAULT_LEEWAY_SECONDS, maximum=MAX_LEEWAY_SECONDS, unit="seconds", doc="clock skew tolerated on exp/nbf/iat"
    )
    discovery_url: str = setting("", doc="default: {issuer}/.well-known/openid-configuration")
    jwks_uri: str = setting("", doc="set to skip discovery")
    require_typ_at_jwt: bool = setting(False, doc="RFC 9068 strict mode: only `typ: at+jwt` is accepted")
    jwks_min_ttl_seconds: float = setting(
        DEFAULT_JWKS_MIN_TTL_SECONDS,
        minimum=1,
        maximum=MAX_JWKS_TTL_SECONDS,
        unit="seconds",
        doc="floor on the JWKS Cache-Control max-age",
    )
    jwks_max_ttl_seconds: float = setting(
        DEFAULT_JWKS_MAX_TTL_SECONDS,
        minimum=1,
        maximum=MAX_JWKS_TTL_SECONDS,
        unit="seconds",
        doc="ceiling: refetch at least this often (a withdrawn key is trusted until then)",
    )
    jwks_cooldown_seconds: float = setting(
        DEFAULT_JWKS_COOLDOWN_SECONDS,
        maximum=MAX_JWKS_COOLDOWN_SECONDS,
        unit="seconds",
        doc="at most one unknown-kid refresh per this many; at most jwks_max_ttl_seconds",
    )
    fetch_timeout_seconds: float = setting(
        DEFAULT_FETCH_TIMEOUT_SECONDS, minimum=0.05, maximum=60, unit="seconds", doc="deadline on discovery/JWKS calls"
    )
    roles: tuple[RoleRule, ...] = ()  # `roles[]`: claim -> role mapping rules
    introspection: IntrospectionConfig | None = None  # `introspection`: RFC 7662, when configured
    introspect_jwts: bool = setting(False, doc="also introspect this issuer's JWTs (revocation check)")
    # `backchannel_logout`: OpenID Connect Back-Channel Logout 1.0, when configured
    backchannel_logout: BackchannelLogoutConfig | None = None
    # Issuer templates (`issuer: https://idp.example/{tenant}/v2.0`) and keys that need no discovery.
    tenants: tuple[str, ...] = setting((), doc='with a {tenant} issuer template: the tenants allowed, or "any"')
    any_tenant: bool = False  # `tenants: any` (read with `tenants`)
    max_tenants: int = setting(
        DEFAULT_MAX_TENANTS, minimum=1, maximum=100_000, unit="entries", doc="tenants whose keys are kept (LRU)"
    )
    new_tenants_per_minute: int = setting(
        DEFAULT_NEW_TENANTS_PER_MINUTE,
        minimum=1,
        maximum=100_000,
        unit="per minute",
        doc="discoveries of tenants not yet held, and held tenants' refetches for unknown kids; past it 503",
    )
    tenant_claim: str = setting(
        "", doc='this claim (its exact name, else a dotted path) must equal the tenant in `iss` (Entra: "tid")'
    )
    jwks_file: str = setting("", doc="a JWKS on disk instead of discovery; re-read on SIGHUP")
    jwks_inline: str = setting("", doc="a JWKS object written in the YAML instead of discovery")
    static_jwks: str = ""  # the JSON of jwks_file or jwks_inline, read once at load (a reload re-reads it)
    jwks_pin_sha256: tuple[str, ...] = setting(
        (), doc="base64 SHA-256 of the provider's public key (SPKI): discovery, JWKS, introspection; one must match"
    )
    tls_ca_file: str = setting(
        "", doc="PEM CA bundle for discovery, JWKS and introspection TLS (default: the system's)"
    )
    max_buckets_share: float = setting(
        0.0,
        maximum=1,
        unit="fraction",
        doc="with state.redis_url: this entry's part of redis_max_buckets (a template's tenants share it); "
        "0: an equal part of what the entries' shares leave",
    )

    @property
    def is_template(self) -> bool:
        """Whether `issuer` is a template with a `{tenant}` path segment."""
        return TENANT_PLACEHOLDER in self.issuer

    def for_tenant(self, tenant: str) -> IssuerSettings:
        """The settings of one concrete tenant of a template (the tenant already checked by `TENANT_NAME`)."""
        return dataclasses.replace(
            self,
            issuer=self.issuer.replace(TENANT_PLACEHOLDER, tenant),
            discovery_url=self.discovery_url.replace(TENANT_PLACEHOLDER, tenant),
            jwks_uri=self.jwks_uri.replace(TENANT_PLACEHOLDER, tenant),
        )

    @property
    def discovery(self) -> str:
        """The OIDC discovery document's URL."""
        return self.discovery_url or self.issuer.rstrip("/") + "/.well-known/openid-configuration"
