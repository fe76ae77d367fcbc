"""The `upstream` section: what an allowed request carries to the upstream, beyond the fixed identity headers.

```yaml
upstream:
  headers:                                  # on every allow; names under the reserved X-Authenticated- prefix
    - {header: X-Authenticated-Email, claim: email}
    - {header: X-Authenticated-Tenant, claim: org.tenant_id}   # a dotted path into nested objects
  consumer: {claim: sub, by: username}      # the Kong consumer the plugin authenticates (username | custom_id)
  identity_token:                           # a short-lived assertion signed by the verifier
    issuer: https://verifier.internal
    algorithm: ES256                        # or EdDSA
    private_key_file: /etc/verifier/identity.pem   # or private_key_env
    previous_public_key_files: [/etc/verifier/identity-old.pub.pem]   # still published during a rotation
    audience: https://orders.internal
    lifetime_seconds: 60
    claims: [sub, scope, roles, email, acr, amr, realm_access.roles]   # a dotted path: copied at its path
  max_value_bytes: 4096                     # a longer header value refuses the request (upstream_claim_too_large)
  max_total_bytes: 8192                     # all the identity headers together (upstream_identity_too_large);
                                            # unset, at least max_value_bytes
```

A route policy may add or override headers and the assertion's audience (`policies[].upstream`). Keys are
read and checked once, here, at start-up: the algorithm must fit the key's type.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from verifier.claimpath import claim_path_problem
from verifier.config.base import ConfigError, Reader, check_url, read_fields, record, setting

RESERVED_PREFIX = "x-authenticated-"  # only the verifier's allow answer sets these on the upstream request
# Ours already: a mapping may not take these names over.
OWN_HEADERS = frozenset(
    {"x-authenticated-userid", "x-authenticated-scope", "x-authenticated-issuer", "x-authenticated-roles"}
)
DEFAULT_IDENTITY_HEADER = "X-Authenticated-Identity"
IDENTITY_ALGORITHMS = ("ES256", "EdDSA")  # short signatures, fast to verify; no RSA (size), no MAC (shared secret)
CONSUMER_BY = ("username", "custom_id")
# Seconds an assertion is valid: short, because it is a bearer credential inside the network; long enough
# for one request's hops. It is re-minted at half its life, so a gateway never reuses an expiring one.
DEFAULT_LIFETIME_SECONDS = 60
MIN_LIFETIME_SECONDS = 10
MAX_LIFETIME_SECONDS = 3600
DEFAULT_IDENTITY_CLAIMS: tuple[str, ...] = ("sub", "scope", "roles")
# Registered claims the verifier sets itself (RFC 7519 section 4.1), and `idp`: a listed claim may not replace them.
RESERVED_CLAIMS = frozenset({"iss", "aud", "iat", "exp", "nbf", "jti", "idp"})
# Bytes of one header value (UTF-8). Upstream servers refuse request header lines past 8 KiB (nginx's
# large_client_header_buffers, Node's 16 KiB for all headers), so 4 KiB leaves room for the rest.
DEFAULT_MAX_VALUE_BYTES = 4096
# Bytes of the whole identity the verifier emits, counted as sent ("name: value\r\n", UTF-8): the fixed four,
# the mapped claims, the assertion and the Kong consumer. The shipped nginx templates read the verifier's answer
# head into 16 KiB (proxy_buffer_size) and fail a longer one themselves, a 503; 8 KiB leaves the other half
# for the rest of the answer. Upstreams take 8 KiB a line and 16-32 KiB in all (Node 16 KiB), which the
# client's own headers share. Envoy (60 KiB) and the Kong plugin (its own reader) hold more.
DEFAULT_MAX_TOTAL_BYTES = 8192
MIN_MAX_TOTAL_BYTES = 1024  # the fixed four of a plain token, with room
MAX_MAX_TOTAL_BYTES = 262144  # past what any gateway takes by default
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeaderMapping:
    """One claim sent to the upstream under one header."""

    header: str = setting(doc="the header's name; must start with X-Authenticated- (lower-cased when read)")
    claim: str = setting(doc="the claim: its exact name, else a dotted path into nested objects (org.tenant_id)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConsumerMapping:
    """Which Kong consumer the plugin authenticates: answered as X-Kong-Consumer-Username or -Custom-Id."""

    claim: str = setting("sub", doc="the claim naming the consumer (a dotted path works too)")
    by: str = setting("username", choices=CONSUMER_BY, doc="which consumer field the claim's value is")

    @property
    def answer_header(self) -> str:
        """The answer header the Kong plugin reads (never set on the upstream request)."""
        return "x-kong-consumer-username" if self.by == "username" else "x-kong-consumer-custom-id"


@dataclasses.dataclass(frozen=True, kw_only=True)
class IdentityTokenConfig:
    """A short-lived JWT the verifier signs for the upstream; its keys at `GET /.well-known/jwks.json`."""

    header: str = setting(DEFAULT_IDENTITY_HEADER, doc="the header carrying the assertion (X-Authenticated-*)")
    issuer: str = setting(doc="the assertion's `iss`")
    algorithm: str = setting("ES256", choices=IDENTITY_ALGORITHMS, doc="ES256 needs a P-256 key, EdDSA an Ed25519 key")
    private_key_file: str = setting("", doc="PEM private key (or private_key_env: a variable holding the PEM)")
    private_key_env: str = setting("", doc="environment variable holding the PEM private key")
    previous_public_key_files: tuple[str, ...] = setting(
        (), doc="PEM public keys still published during a rotation (assertions they signed stay verifiable)"
    )
    audience: str = setting(doc="the assertion's `aud` (a route policy may name its own)")
    lifetime_seconds: int = setting(
        DEFAULT_LIFETIME_SECONDS,
        minimum=MIN_LIFETIME_SECONDS,
        maximum=MAX_LIFETIME_SECONDS,
        unit="seconds",
        doc="`exp` - `iat`; re-minted at half-life, reuse never outlives it",
    )
    claims: tuple[str, ...] = setting(
        DEFAULT_IDENTITY_CLAIMS,
        doc="copied from the token (scope, roles as judged); a dotted path is copied at its path",
    )
    private_key: SigningKey | None = dataclasses.field(default=None, repr=False, compare=False)
    previous_keys: tuple[PublicKey, ...] = dataclasses.field(default=(), repr=False, compare=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpstreamConfig:
    """What an allowed request carries to the upstream (the fixed X-Authenticated-* four, plus these)."""

    headers: tuple[HeaderMapping, ...] = ()  # `headers[]`
    consumer: ConsumerMapping | None = None  # `consumer`
    identity_token: IdentityTokenConfig | None = None  # `identity_token`
    max_value_bytes: int = setting(
        DEFAULT_MAX_VALUE_BYTES,
        minimum=256,
        maximum=65536,
        unit="bytes",
        doc="a longer header value refuses the request (403 upstream_claim_too_large), never cut",
    )
    max_total_bytes: int = setting(
        DEFAULT_MAX_TOTAL_BYTES,
        minimum=MIN_MAX_TOTAL_BYTES,
        maximum=MAX_MAX_TOTAL_BYTES,
        unit="bytes",
        doc="all identity headers together, as sent (at least max_value_bytes); more refuses the request"
        " (403 upstream_identity_too_large), never cut",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouteUpstream:
    """A route's changes to what the upstream receives (`policies[].upstream`)."""

    headers: tuple[HeaderMapping, ...] = ()  # added; a name already mapped is overridden
    audience: str = ""  # `identity_token.audience`: this route's assertion audience


def header_name(reader: Reader, key: str, value: str) -> str:
    """A header name under the reserved prefix, lower-cased; a problem is recorded by key."""
    name = value.lower()
    if not name or not set(name) <= _TCHAR:
        reader.problem(key, f"{value!r} is not a header name")
    elif not name.startswith(RESERVED_PREFIX) or name == RESERVED_PREFIX:
        reader.problem(key, f"{value!r} must start with X-Authenticated- (the prefix every shipped gateway guards)")
    elif name in OWN_HEADERS:
        reader.problem(key, f"{value!r} is one of the verifier's own identity headers")
    return name


def _mappings(reader: Reader, taken: set[str]) -> tuple[HeaderMapping, ...]:
    if reader.raw("headers") is None:
        return ()
    found = []
    for item in reader.children("headers"):
        mapping = HeaderMapping(**read_fields(item, HeaderMapping))
        item.done()
        name = header_name(item, "header", mapping.header)
        if name in taken:
            item.problem("header", f"{mapping.header!r} is mapped twice")
        taken.add(name)
        problem = claim_path_problem(mapping.claim)
        if problem:
            item.problem("claim", problem)
        found.append(dataclasses.replace(mapping, header=name))
    return tuple(found)


def _pem(reader: Reader) -> bytes:
    sources = [name for name in ("private_key_file", "private_key_env") if reader.has(name)]
    if len(sources) != 1:
        raise ConfigError(f"{reader._key('private_key_file')}: exactly one of private_key_file, private_key_env")
    if sources[0] == "private_key_file":
        file = reader.text("private_key_file")
        try:
            return Path(file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{reader._key('private_key_file')}: cannot read {file} ({exc.strerror})") from exc
    variable = reader.text("private_key_env")
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"{reader._key('private_key_env')}: environment variable {variable} is not set")
    return value.encode()


def key_fits(algorithm: str, key: object) -> bool:
    """Whether `key` (private or public) is the type `algorithm` signs with: P-256 for ES256, Ed25519 for EdDSA."""
    if algorithm == "ES256":
        return isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    return isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey)


def _identity_token(reader: Reader, taken: set[str]) -> IdentityTokenConfig:
    config = IdentityTokenConfig(**read_fields(reader, IdentityTokenConfig))
    name = header_name(reader, "header", config.header)
    if name in taken:
        reader.problem("header", f"{config.header!r} is also a mapped header")
    taken.add(name)
    check_url(config.issuer, reader._key("issuer"), "assertion issuer", allow_insecure_http=True)
    for i, claim in enumerate(config.claims):
        # a dotted path is copied at its path: one under a claim the verifier sets would be overwritten, unseen
        if claim in RESERVED_CLAIMS or claim.split(".", 1)[0] in RESERVED_CLAIMS:
            reader.problem(f"claims[{i}]", f"{claim!r} is set by the verifier itself")
        else:
            problem = claim_path_problem(claim)
            if problem:
                reader.problem(f"claims[{i}]", problem)
    reader.done()
    key_name = reader._key("private_key_file" if reader.has("private_key_file") else "private_key_env")
    pem = _pem(reader)
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key_name}: not an unencrypted PEM private key") from exc
    if not key_fits(config.algorithm, private):
        raise ConfigError(f"{key_name}: the key does not fit {config.algorithm} (ES256: EC P-256, EdDSA: Ed25519)")
    previous = []
    for i, file in enumerate(config.previous_public_key_files):
        key = reader._key(f"previous_public_key_files[{i}]")
        try:
            pem = Path(file).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {file} ({exc.strerror})") from exc
        try:
            public = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{key}: not a PEM public key") from exc
        if not isinstance(public, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) or not (
            key_fits("ES256", public) or key_fits("EdDSA", public)
        ):
            raise ConfigError(f"{key}: an ES256 (P-256) or EdDSA (Ed25519) public key is required")
        previous.append(public)
    assert isinstance(private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey)  # key_fits said so
    return dataclasses.replace(config, header=name, private_key=private, previous_keys=tuple(previous))


def parse_upstream_config(data: Any, path: str = "upstream") -> UpstreamConfig:
    """Validates the `upstream` mapping; problems are named by key (`verifier.config.base`)."""
    reader = Reader(data, path)
    taken: set[str] = set()
    headers = _mappings(reader, taken)
    consumer = None
    consumer_reader = reader.child("consumer")
    if consumer_reader is not None:
        consumer = ConsumerMapping(**read_fields(consumer_reader, ConsumerMapping))
        consumer_reader.done()
        problem = claim_path_problem(consumer.claim)
        if problem:
            consumer_reader.problem("claim", problem)
    identity = None
    identity_reader = reader.child("identity_token")
    if identity_reader is not None:
        try:
            identity = _identity_token(identity_reader, taken)
        except ConfigError as exc:
            record(str(exc))
    config = UpstreamConfig(
        **read_fields(reader, UpstreamConfig, headers=headers, consumer=consumer, identity_token=identity)
    )
    if config.max_value_bytes > config.max_total_bytes and not reader.has("max_total_bytes"):
        # A config written before the total's bound raised only the value's (with its gateway's buffers): the
        # total's default follows it, so that config starts as before, now bounded at one value's size.
        config = dataclasses.replace(config, max_total_bytes=config.max_value_bytes)
    if config.max_value_bytes > config.max_total_bytes:  # one value at its bound would always be refused
        reader.problem(
            "max_total_bytes",
            f"{config.max_total_bytes} is less than max_value_bytes ({config.max_value_bytes}): raise it too",
        )
    reader.done()
    return config


def parse_route_upstream(data: Any, path: str) -> RouteUpstream:
    """Validates a policy's `upstream` mapping: extra headers and the assertion's audience."""
    reader = Reader(data, path)
    headers = _mappings(reader, set())
    audience = ""
    identity = reader.child("identity_token")
    if identity is not None:
        audience = identity.text("audience")
        identity.done()
    reader.done()
    return RouteUpstream(headers=headers, audience=audience)
