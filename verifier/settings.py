"""Typed settings, read from one YAML file and validated once at start-up.

Every error names the offending key (`issuers[0].algorithms[1]: ...`) so an operator can fix the file
without reading code. Secrets never live in the file: it names environment variables instead.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from verifier.claimpath import claim_path_problem
from verifier.config.base import (
    ConfigError,
    Reader,
    check_url,
    collecting,
    header_secret_problem,
    is_loopback_host,
    read_fields,
    record,
    setting,
    url_problem,
)
from verifier.config.dpop import DpopConfig, parse_dpop_config, resource_origin
from verifier.config.introspection import IntrospectionConfig, parse_introspection_config
from verifier.config.issuer import (
    DEFAULT_FETCH_TIMEOUT_SECONDS,
    DEFAULT_JWKS_COOLDOWN_SECONDS,
    DEFAULT_JWKS_MAX_TTL_SECONDS,
    DEFAULT_JWKS_MIN_TTL_SECONDS,
    DEFAULT_LEEWAY_SECONDS,
    DEFAULT_MAX_JWKS_BYTES,
    DEFAULT_MAX_JWKS_KEYS,
    SUPPORTED_ALGORITHMS,
    WILDCARD_AUDIENCE,
    IssuerSettings,
    RoleRule,
)
from verifier.config.keysource import check_issuer_url, check_key_source, read_static_jwks, read_tenants
from verifier.config.logout import parse_backchannel_logout
from verifier.config.metrics import MetricsAuthSettings, parse_metrics_auth
from verifier.config.policy import (
    SENDER_CONSTRAINTS,
    STEP_UP_METHODS,
    PolicySettings,
    Requirements,
    RouteMatch,
    check_trusted_issuers,
    parse_policy,
    trusted_among,
)
from verifier.config.resource import ProtectedResourceConfig, parse_protected_resource_config
from verifier.config.revocation import PUSH, RevocationConfig, check_transmitter_scopes, parse_revocation_config
from verifier.config.state import (
    DEFAULT_REDIS_MAX_BUCKETS,
    StateConfig,
    parse_state_config,
    split_bound,
    split_problem,
)
from verifier.config.tracing import TracingConfig, parse_tracing_config
from verifier.config.upstream import UpstreamConfig, parse_upstream_config
from verifier.config.webauthn import WebAuthnConfig, parse_webauthn_config
from verifier.policy.rules import check_reached
from verifier.private_files import exposed_mode

T = TypeVar("T")

__all__ = [  # the sections live in verifier.config; these names stay importable from here
    "DEFAULT_FETCH_TIMEOUT_SECONDS",
    "DEFAULT_JWKS_COOLDOWN_SECONDS",
    "DEFAULT_JWKS_MAX_TTL_SECONDS",
    "DEFAULT_JWKS_MIN_TTL_SECONDS",
    "DEFAULT_LEEWAY_SECONDS",
    "DEFAULT_MAX_JWKS_BYTES",
    "DEFAULT_MAX_JWKS_KEYS",
    "SENDER_CONSTRAINTS",
    "STEP_UP_METHODS",
    "SUPPORTED_ALGORITHMS",
    "ConfigError",
    "ConfigWarning",
    "IssuerSettings",
    "PolicySettings",
    "Requirements",
    "RoleRule",
    "RouteMatch",
    "Settings",
    "check_admin_token",
    "check_url",
    "is_loopback_host",
    "load_settings",
    "parse_settings",
    "url_problem",
]

DEFAULT_MAX_TOKEN_BYTES = 8192  # bytes; larger tokens are refused before any parsing
DEFAULT_TOKEN_CACHE_ENTRIES = 100_000  # verified tokens kept (bounded memory, ~4 KiB each: bench.cache_bench)
DEFAULT_NEGATIVE_CACHE_ENTRIES = 100_000  # refused tokens remembered so a replay costs one lookup
DEFAULT_NEGATIVE_TTL_SECONDS = 30.0  # seconds a refused token stays refused without re-checking
DEFAULT_REALM = "verifier"
# Seconds a door waits for a decision before answering 503 retry-later. Below the Kong plugins' 1 s
# default timeout (and any gateway deadline must stay above it): a gateway that gives up first would
# see an unreachable verifier, which `fail_open` turns into a pass (issue #26 G9).
DEFAULT_DEADLINE_SECONDS = 0.8
ADMIN_TOKEN_ENV = "VERIFIER_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not its value
MIN_ADMIN_TOKEN_CHARS = 32  # e.g. `openssl rand -hex 16`; the admin API revokes anyone's access
MAX_DEADLINE_SECONDS = 30.0  # seconds; no gateway waits longer for an authorization answer
# What a private key file others can read gets: a warning (a Kubernetes Secret volume is 0644 by default, and
# nginx takes such keys too) or a refusal, as OpenSSH refuses one (`readable_key_files`).
READABLE_KEY_FILES = ("warn", "refuse")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TlsSettings:
    """TLS for a listener; with `client_ca_file`, clients must present a certificate it signed (mTLS)."""

    cert_file: str = setting(doc="PEM certificate chain")
    key_file: str = setting(doc="PEM private key")
    client_ca_file: str = setting("", doc="PEM CA bundle: clients must present a certificate it signed (mTLS)")

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """Certificate chain, private key and client CA bundle (PEM), read at start-up."""
        ca = Path(self.client_ca_file).read_bytes() if self.client_ca_file else None
        return Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes(), ca

    def server_context(self) -> ssl.SSLContext:
        """An SSLContext for asyncio listeners (TLS 1.2+, client certificates required with a CA)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file:
            context.load_verify_locations(self.client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclasses.dataclass(frozen=True, kw_only=True)
class Listen:
    """A loopback-by-default TCP listen address, optionally with TLS."""

    # Both from the one `listen` key (host:port), which the section reads itself.
    host: str = setting(
        doc="a listener's address; grpc or http is required, admin and metrics optional", unit="host:port", key="listen"
    )
    port: int
    tls: TlsSettings | None = None

    @property
    def address(self) -> str:
        """`host:port`, bracketing IPv6 literals."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RateLimit:
    """A token bucket: `per_second` sustained, `burst` at once."""

    per_second: float = setting(doc="tokens added back per second", minimum=0.001, maximum=1_000_000, unit="per second")
    burst: int = setting(doc="the bucket's size: requests allowed at once", minimum=1, maximum=10_000_000)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    """Per-identity limits; a caller gets the most generous limit among its roles, else the default."""

    default: RateLimit | None = None
    roles: tuple[tuple[str, RateLimit], ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """Bounds on the verified-token and refused-token caches."""

    token_entries: int = setting(
        DEFAULT_TOKEN_CACHE_ENTRIES, maximum=10_000_000, unit="entries", doc="verified tokens kept (~4 KiB each)"
    )
    negative_entries: int = setting(
        DEFAULT_NEGATIVE_CACHE_ENTRIES, maximum=10_000_000, unit="entries", doc="refused tokens remembered"
    )
    negative_ttl_seconds: float = setting(
        DEFAULT_NEGATIVE_TTL_SECONDS, maximum=3600, unit="seconds", doc="a refused token stays refused this long"
    )


DEFAULT_MAX_PENDING_CHECKS = 1024  # first-seen checks in flight per worker before shedding load (503)
# HTTP/2 streams per gRPC connection. Measured (docs/BENCHMARKS.md, overload): past this a client waits on its
# own side. At 1000, 32 connections x 100 streams queued ~1 s inside grpc.aio and 98% of 100 ms calls expired;
# at 16 (512 in flight) they still expired; at 4 the doors served ~100% of capacity. gRPC clients read the
# SETTINGS before their first call, so a burst waits at the client instead of being refused (the transport
# counts open streams, not Python's calls: see GrpcDoors.start); Envoy's gRPC template opens at most 4.
DEFAULT_GRPC_MAX_CONCURRENT_STREAMS = 4
# gRPC calls the transport holds for the door (received, not yet taken by Python), all connections together: past
# it a new call is refused by gRPC's C core before any Python work (the caller sees CANCELLED). The per-connection
# bound does not bound them: a call whose deadline passes while it waits frees its stream, not its place, so 128
# connections x 4 streams at 100 ms refilled the queue faster than the door took calls and every call it took had
# (nearly) run out of time: 7% of capacity answered in time. At 128 (= 32 connections x 4: the flood is never
# refused) 77-88%; at 64, 81-83% but a 32-connection flood is refused too (docs/BENCHMARKS.md).
DEFAULT_GRPC_MAX_QUEUED_CALLS = 128
# Seconds a gRPC connection lives before the server sends GOAWAY (gRPC adds up to 10% of jitter), then seconds its
# calls in flight have to finish before it is closed whatever it holds. grpc.aio never answers a call whose message
# never arrives whole (a stream half-closed with none, HEADERS alone): the door's deadline cannot reach it, so only
# the connection's end bounds it, and a caller holding only such calls held a descriptor and its memory for ever.
# Gateways reconnect on GOAWAY without failing a call (Envoy's pool, grpcio's channels); a call takes at most
# `deadline_seconds` (0.8 s) past the gateway's own timeout (Envoy's template: 2 s), well inside the grace.
DEFAULT_GRPC_MAX_CONNECTION_AGE_SECONDS = 300.0
DEFAULT_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS = 10.0
# Seconds a new gRPC connection has, from its accept, to finish its TLS handshake (mTLS included) and send the HTTP/2
# preface and its SETTINGS (gRPC core's GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS); then it is closed. gRPC's default was
# 120 s: a caller opening connections and never sending a ClientHello (or stalling mid-handshake) held a place of
# `grpc_max_connections` each for two minutes. Gateways send all of it in one round trip or two.
DEFAULT_GRPC_HANDSHAKE_TIMEOUT_SECONDS = 10.0
# gRPC connections a worker accepts at once; past it a new one is closed as it is accepted. Each held a descriptor and
# its memory without bound: a caller opening connections without end took the descriptors the other doors, the
# issuers' fetches and Redis need. Envoy opens one connection per worker thread at least, more under load (4 streams
# each): 4,096 is a large fleet's. Never above half the process's open-file limit (`verifier.doors.grpc`).
DEFAULT_GRPC_MAX_CONNECTIONS = 4096
DEFAULT_EDGE_MAX_AGE_SECONDS = 10  # seconds a gateway may reuse an allow; also bounds revocation reach
DEFAULT_REFUSAL_MAX_AGE_SECONDS = 5  # seconds a gateway may reuse a refusal of a malformed/forged token


@dataclasses.dataclass(frozen=True, kw_only=True)
class EdgeCacheSettings:
    """How long gateways may reuse decisions (forward-auth `Cache-Control`, gRPC `cache_max_age_seconds`)."""

    max_age_seconds: int = setting(
        DEFAULT_EDGE_MAX_AGE_SECONDS, maximum=3600, unit="seconds", doc="a gateway may reuse an allow (0: never)"
    )
    refusal_max_age_seconds: int = setting(
        DEFAULT_REFUSAL_MAX_AGE_SECONDS, maximum=300, unit="seconds", doc="reuse of a malformed/forged-token refusal"
    )


FORWARDED_HEADER_FAMILIES = ("x-forwarded", "x-original")  # which headers describe the original request
DEFAULT_FORWARDED_HEADERS = "x-forwarded"  # Traefik/Caddy/Kong style; nginx templates set the same names
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0  # seconds for a request (headers, small body) to arrive: slowloris bound
# Seconds an idle keep-alive connection stays open: longer than the gateways' own (nginx's upstream
# keepalive_timeout is 60 s) so the gateway closes first and never sends on a connection we are closing.
DEFAULT_IDLE_TIMEOUT_SECONDS = 75.0
# Seconds the event loop may stay busy (requests waiting in their sockets) before the forward-auth door answers
# tokens no cache knows with 503 + Retry-After instead of checking them: answers stay within ~2x this under a
# flood (docs/BENCHMARKS.md, "Overload at the three doors"); below deadline_seconds.
DEFAULT_SHED_AFTER_SECONDS = 0.25


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardAuthSettings:
    """The forward-auth listener's trust and timeouts (keys of the `http` section)."""

    forwarded_headers: str = setting(
        DEFAULT_FORWARDED_HEADERS,
        choices=FORWARDED_HEADER_FAMILIES,
        doc="the ONE header family describing the original request; the other is ignored; a check without its path "
        "header (nor a path after `/v1/forward-auth`), or without its host header when a policy names hosts, is "
        "refused 400 `invalid_request`",
    )
    header_timeout_seconds: float = setting(
        DEFAULT_HEADER_TIMEOUT_SECONDS, minimum=0.01, maximum=3600, unit="seconds", doc="a request must arrive within"
    )
    idle_timeout_seconds: float = setting(
        DEFAULT_IDLE_TIMEOUT_SECONDS, minimum=0.01, maximum=86_400, unit="seconds", doc="idle keep-alives closed after"
    )
    shed_after_seconds: float = setting(
        DEFAULT_SHED_AFTER_SECONDS,
        minimum=0.01,
        maximum=MAX_DEADLINE_SECONDS,
        unit="seconds",
        doc="overload: past this much queueing, unknown tokens get 503 + Retry-After unchecked",
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the verifier needs, validated."""

    grpc: Listen | None
    http: Listen | None
    metrics: Listen | None
    # The `metrics` section's bearer token for /metrics (optional: token_env or token_file).
    metrics_auth: MetricsAuthSettings = dataclasses.field(default_factory=MetricsAuthSettings)
    # The admin API's own listener (loopback, like Kong's and Envoy's admin); None: it shares `http.listen`.
    admin: Listen | None = None
    issuers: tuple[IssuerSettings, ...]
    cache: CacheSettings = CacheSettings()
    max_token_bytes: int = setting(
        DEFAULT_MAX_TOKEN_BYTES, minimum=256, maximum=1 << 20, unit="bytes", doc="larger tokens are refused unparsed"
    )
    realm: str = setting(DEFAULT_REALM, doc="the realm of WWW-Authenticate challenges")
    audit: bool = setting(True, doc="one JSON audit line per decision")
    readable_key_files: str = setting(
        "warn",
        choices=READABLE_KEY_FILES,
        doc="a private key file others can read (e.g. 0644): a start-up warning, or refused (as OpenSSH does)",
    )
    policies: tuple[PolicySettings, ...] | None = None  # None: any valid token is allowed
    rate_limits: RateLimitSettings | None = None
    dpop: DpopConfig | None = None
    state: StateConfig | None = None  # Redis, or a local store's path; None: in-memory
    # The forward-auth request header a trusted gateway puts the client certificate's x5t#S256 in;
    # empty: none is read (a client could send it), so certificate-bound tokens need a gRPC door.
    mtls_thumbprint_header: str = setting(
        "", doc="forward-auth: the header a trusted gateway overwrites with the client cert's x5t#S256"
    )
    forward_auth: ForwardAuthSettings = ForwardAuthSettings()
    edge_cache: EdgeCacheSettings = EdgeCacheSettings()
    max_pending_checks: int = setting(
        DEFAULT_MAX_PENDING_CHECKS, minimum=1, maximum=1_000_000, doc="first-seen checks in flight per worker (503)"
    )
    grpc_max_concurrent_streams: int = setting(
        DEFAULT_GRPC_MAX_CONCURRENT_STREAMS,
        minimum=1,
        maximum=10_000,
        doc="HTTP/2 streams per gRPC connection; more wait at the client (overload: early refusal)",
    )
    grpc_max_queued_calls: int = setting(
        DEFAULT_GRPC_MAX_QUEUED_CALLS,
        minimum=2,
        maximum=1_000_000,
        doc="gRPC calls waiting for the door, all connections; past it new ones are refused (CANCELLED)",
    )
    grpc_max_connections: int = setting(
        DEFAULT_GRPC_MAX_CONNECTIONS, minimum=1, maximum=1_000_000,
        doc="gRPC connections open at once per worker (at most half its open-file limit); more are closed at once",
    )  # fmt: skip
    grpc_max_connection_age_seconds: float = setting(
        DEFAULT_GRPC_MAX_CONNECTION_AGE_SECONDS, minimum=1, maximum=86_400, unit="seconds",
        doc="a gRPC connection's life (+10% jitter): then GOAWAY, and the client reconnects",
    )  # fmt: skip
    grpc_max_connection_age_grace_seconds: float = setting(
        DEFAULT_GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS, minimum=1, maximum=3600, unit="seconds",
        doc="after GOAWAY, calls in flight finish within this; then the connection is closed, whatever it holds",
    )  # fmt: skip
    grpc_handshake_timeout_seconds: float = setting(
        DEFAULT_GRPC_HANDSHAKE_TIMEOUT_SECONDS, minimum=0.1, maximum=600, unit="seconds",
        doc="a new gRPC connection's TLS handshake, HTTP/2 preface and SETTINGS must arrive within this; else closed",
    )  # fmt: skip
    deadline_seconds: float = setting(
        DEFAULT_DEADLINE_SECONDS,
        minimum=0.001,
        maximum=MAX_DEADLINE_SECONDS,
        unit="seconds",
        doc="a door answers 503 retry-later past this; keep gateway timeouts above",
    )
    workers: int = setting(
        1, minimum=1, maximum=64, doc="processes sharing the listeners (SO_REUSEPORT); metrics port + i per worker"
    )
    revocation: RevocationConfig | None = None  # Shared Signals receiver
    webauthn: WebAuthnConfig | None = None  # credential registry and step-up
    protected_resource: ProtectedResourceConfig | None = None  # RFC 9728: the default resource's metadata
    upstream: UpstreamConfig | None = None  # mapped claims, the Kong consumer, the identity assertion
    tracing: TracingConfig | None = None  # OpenTelemetry export (the file or OTEL_* variables); None: off

    @property
    def redis_bucket_bounds(self) -> dict[str, int]:
        """`state.redis_max_buckets` split per `issuers[]` entry by `max_buckets_share` (entries without one: equal
        parts of the rest); a template's tenants share their entry's part."""
        total = self.state.redis_max_buckets if self.state is not None else DEFAULT_REDIS_MAX_BUCKETS
        return split_bound(total, {i.issuer: i.max_buckets_share for i in self.issuers})

    @property
    def state_is_shared(self) -> bool:
        """Whether every worker sees the same replay caches, buckets and entries (one worker, or Redis)."""
        return self.workers == 1 or (self.state is not None and self.state.redis_url is not None)


def _listen(reader: Reader | None) -> Listen | None:
    if reader is None:
        return None
    text = reader.text("listen")
    tls_reader = reader.child("tls")
    reader.done()
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{reader.path}.listen: expected host:port, got {text!r}")
    tls = None
    if tls_reader is not None:
        tls = TlsSettings(**read_fields(tls_reader, TlsSettings))
        tls_reader.done()
        try:
            tls.server_context()  # unreadable files or a key that does not fit fail here, by name
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{tls_reader.path}: cannot load the certificate, key or CA ({exc})") from exc
    return Listen(host=host, port=int(port_text), tls=tls)


def _introspection(reader: Reader, allow_insecure_http: bool) -> IntrospectionConfig | None:
    raw = reader.raw("introspection")
    if raw is None:
        return None
    return parse_introspection_config(raw, f"{reader.path}.introspection", allow_insecure_http=allow_insecure_http)


def _optional_section(root: Reader, key: str, parse: Callable[[Any, str], T]) -> T | None:
    """The section at `key` read by its own parser, or None when absent; a problem is recorded."""
    raw = root.raw(key)
    if raw is None:
        return None
    try:
        return parse(raw, f"{root.path}.{key}" if root.path else key)
    except ConfigError as exc:  # recorded: the other sections are still read
        record(str(exc))
        return None


def _issuer(reader: Reader) -> IssuerSettings:
    issuer = reader.text("issuer")
    insecure = reader.boolean("allow_insecure_http", False)
    check_issuer_url(issuer, f"{reader.path}.issuer", allow_insecure_http=insecure)
    algorithms = reader.strings("algorithms")
    for i, alg in enumerate(algorithms):
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(
                f"{reader.path}.algorithms[{i}]: {alg!r} is not allowed "
                f"(supported: {', '.join(sorted(SUPPORTED_ALGORITHMS))})"
            )
    roles = tuple(_role_rule(r) for r in reader.children("roles")) if reader.raw("roles") is not None else ()
    settings = IssuerSettings(
        **read_fields(
            reader,
            IssuerSettings,
            issuer=issuer,
            allow_insecure_http=insecure,
            algorithms=algorithms,
            roles=roles,
            introspection=_introspection(reader, insecure),
            backchannel_logout=_optional_section(reader, "backchannel_logout", parse_backchannel_logout),
            **read_tenants(reader),
            **read_static_jwks(reader),
        )
    )
    for key in ("discovery_url", "jwks_uri"):
        if getattr(settings, key):
            check_issuer_url(getattr(settings, key), f"{reader.path}.{key}", allow_insecure_http=insecure)
    check_key_source(settings, reader.path)
    for i, audience in enumerate(settings.audiences):
        if audience == "*":  # compared exactly: only a token whose `aud` is the string "*" would meet it
            reader.problem(f"audiences[{i}]", WILDCARD_AUDIENCE)
    if settings.introspect_jwts and settings.introspection is None:
        # Else every JWT of this issuer met no introspector and was refused with a 500, from the first request on.
        reader.problem("introspect_jwts", "needs an introspection section (its client and endpoint) on this issuer")
    if settings.jwks_min_ttl_seconds > settings.jwks_max_ttl_seconds:
        raise ConfigError(f"{reader.path}.jwks_min_ttl_seconds: larger than jwks_max_ttl_seconds")
    if settings.jwks_cooldown_seconds > settings.jwks_max_ttl_seconds:
        # A template's tenant refreshes its keys when they go stale only once the cooldown is over: a longer cooldown
        # kept a withdrawn key trusted past jwks_max_ttl_seconds.
        reader.problem("jwks_cooldown_seconds", "larger than jwks_max_ttl_seconds (keys are refetched no sooner)")
    reader.done()
    return settings


def _role_rule(reader: Reader) -> RoleRule:
    rule = RoleRule(**read_fields(reader, RoleRule))
    reader.done()
    if bool(rule.claim) != bool(rule.values):
        raise ConfigError(f"{reader.path}: claim and values go together")
    if not (rule.claim or rule.scope or rule.subjects):
        raise ConfigError(f"{reader.path}: needs claim+values, scope or subjects")
    problem = claim_path_problem(rule.claim) if rule.claim else ""
    if problem:  # `realm_access..roles` would never match: every request refused its role, and nothing said why
        reader.problem("claim", problem)
    return rule


def _rate_limit(reader: Reader) -> RateLimit:
    values = read_fields(reader, RateLimit)
    if not reader.has("per_second") or not reader.has("burst"):
        raise ConfigError(f"{reader.path}: per_second and burst are required")
    reader.done()
    return RateLimit(**values)


def _rate_limits(reader: Reader | None) -> RateLimitSettings | None:
    if reader is None:
        return None
    default = reader.child("default")
    roles_reader = reader.child("roles")
    roles: list[tuple[str, RateLimit]] = []
    if roles_reader is not None:
        for role, value in roles_reader.data.items():
            if not isinstance(role, str) or not role:
                raise ConfigError(f"{roles_reader.path}: role names must be strings, got {role!r}")
            roles.append((role, _rate_limit(Reader(value, f"{roles_reader.path}.{role}"))))
    settings = RateLimitSettings(default=_rate_limit(default) if default else None, roles=tuple(roles))
    reader.done()
    return settings


def _edge_cache(reader: Reader | None) -> EdgeCacheSettings:
    if reader is None:
        return EdgeCacheSettings()
    settings = EdgeCacheSettings(**read_fields(reader, EdgeCacheSettings))
    reader.done()
    return settings


def _forward_auth(reader: Reader | None) -> ForwardAuthSettings:
    """The forward-auth keys of the `http` section (read before `_listen`, which refuses the rest)."""
    if reader is None:
        return ForwardAuthSettings()
    return ForwardAuthSettings(**read_fields(reader, ForwardAuthSettings))


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _header_name(root: Reader, key: str) -> str:
    """An optional request header name (RFC 9110 token), lower-cased; empty when absent."""
    value = root.raw(key)
    if value is None or value == "":
        return ""
    name = root.text(key).lower()
    if not set(name) <= _TCHAR:
        raise ConfigError(f"{key}: {name!r} is not a header name")
    return name


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConfigWarning:
    """One thing start-up logs (and `check-config` prints) about a configuration it accepts."""

    # Stable, snake_case: the log line's `code`, for alerts and searches. Not a refusal's code (`verifier.reasons`):
    # nothing is refused, so it is named apart.
    kind: str
    message: str  # for a person: the key, what is wrong, the fix
    fields: tuple[tuple[str, str], ...] = ()  # more of the log line's fields (never a secret)

    def __str__(self) -> str:
        return self.message


def config_warnings(settings: Settings) -> list[ConfigWarning]:
    """What start-up (and `verifier check-config`) warns about: configurations that work but let one identity
    stand for another, let the caller name the URL a proof is judged on, or a private key others can read. Not
    refused: each has a legitimate use; each warning names the fix."""
    return [
        *(ConfigWarning(kind="tenant_granted_roles", message=m) for m in _tenant_granted_roles(settings)),
        *_consumer_collisions(settings),
        *_editable_role_claims(settings),
        *_registry_origin(settings),
        *([] if settings.readable_key_files == "refuse" else _readable_key_files(settings)),
        *_admin_on_shared_listener(settings, os.environ.get(ADMIN_TOKEN_ENV)),
        *_metrics_unauthenticated(settings),
        *_push_unauthenticated(settings),
        *_thumbprint_header_unguarded(settings),
        *_unregistered_methods(settings),
        *_public_catch_all(settings),
        *_rate_limit_without_default(settings),
    ]


def _rate_limit_without_default(settings: Settings) -> list[ConfigWarning]:
    """Rate limits by role without a default: an identity whose token holds none of the roles is not limited at all,
    so the limit binds only while a caller presents a token with its role, and one of another client (Keycloak's
    client roles) or with fewer scopes (roles that follow scopes) escapes it. Not refused: limiting a few roles (the
    rest upstream) is a choice; the warning names it."""
    limits = settings.rate_limits
    if limits is None or limits.default is not None or not limits.roles:
        return []
    names = ", ".join(role for role, _ in limits.roles)
    return [
        ConfigWarning(
            kind="rate_limit_without_default",
            message=(
                f"rate_limits.default is not set: an identity holding none of the roles ({names}) is not rate "
                "limited at all, so a caller escapes a role's limit with a token that lacks the role (another "
                "client's, fewer scopes); set rate_limits.default to the limit of an identity without those roles"
            ),
            fields=(("key", "rate_limits.default"),),
        )
    ]


def _public_catch_all(settings: Settings) -> list[ConfigWarning]:
    """A policy with `authenticated: false` on every path (no `path`, `path_prefix` empty or `/`): every request the
    policies above it miss passes without a token, so a typo in one of their matches (a path, a host, a method) leaves
    that route public where it would otherwise be refused (an unmatched route is 403). Not refused: a public site with
    a few protected routes is a choice; a CORS preflight policy (methods OPTIONS alone) is not warned about."""
    return [
        ConfigWarning(
            kind="public_catch_all",
            message=(
                f"policies[{i}] ({policy.name}): authenticated: false on every path: a request no policy above it "
                "matches passes without a token, so a typo in a protected policy's match (path, host, method) leaves "
                "that route public; list the public paths one by one and end with a policy that requires a token "
                "(path_prefix: /), or none (an unmatched route is refused)"
            ),
            fields=(("key", f"policies[{i}].require.authenticated"),),
        )
        for i, policy in enumerate(settings.policies or ())
        if not policy.require.authenticated
        and not policy.match.path
        and policy.match.path_prefix.rstrip("/") == ""
        and not (policy.match.methods and set(policy.match.methods) <= {"OPTIONS"})
    ]


# The IANA HTTP Method Registry (RFC 9110 section 16.1), as of 2024: what clients send. Another token is legal (an
# extension method), but more often a typo.
REGISTERED_METHODS = frozenset({
    "ACL", "BASELINE-CONTROL", "BIND", "CHECKIN", "CHECKOUT", "CONNECT", "COPY", "DELETE", "GET", "HEAD", "LABEL",
    "LINK", "LOCK", "MERGE", "MKACTIVITY", "MKCALENDAR", "MKCOL", "MKREDIRECTREF", "MKWORKSPACE", "MOVE", "OPTIONS",
    "ORDERPATCH", "PATCH", "POST", "PRI", "PROPFIND", "PROPPATCH", "PUT", "QUERY", "REBIND", "REPORT", "SEARCH",
    "TRACE", "UNBIND", "UNCHECKOUT", "UNLINK", "UNLOCK", "UPDATE", "UPDATEREDIRECTREF", "VERSION-CONTROL",
})  # fmt: skip


def _unregistered_methods(settings: Settings) -> list[ConfigWarning]:
    """A policy's `match.methods` entry no registered method spells (`DELET`): the policy never covers the requests
    it was written for, which fall to the next policy that does (a laxer catch-all), or are refused. Not refused: an
    extension method is a legal token."""
    return [
        ConfigWarning(
            kind="method_unregistered",
            message=(
                f"policies[{i}].match.methods[{j}]: {method!r} is no registered HTTP method (a typo?): the policy "
                f"({policy.name}) covers no request that uses another, and those fall to the next policy that covers "
                "them; spell the method as clients send it (GET, POST, PUT, PATCH, DELETE, ...)"
            ),
            fields=(("key", f"policies[{i}].match.methods[{j}]"),),
        )
        for i, policy in enumerate(settings.policies or ())
        for j, method in enumerate(policy.match.methods)
        if method not in REGISTERED_METHODS
    ]


# The one certificate thumbprint header the shipped gateways guard: the nginx templates clear it, Envoy's HTTP template
# removes it (and forwards no other client header), the Kong plugin sets it only from a certificate it verified.
GUARDED_THUMBPRINT_HEADER = "x-client-cert-thumbprint"


def _thumbprint_header_unguarded(settings: Settings) -> list[ConfigWarning]:
    """`mtls_thumbprint_header` naming a header the shipped gateways do not clear: behind the nginx templates (which
    pass the client's headers to the auth request) a client that sends it names the certificate it holds, so a stolen
    certificate-bound token is taken without the certificate's key. Not refused: a gateway of the operator's own may
    overwrite that name on every request."""
    name = settings.mtls_thumbprint_header
    if not name or name == GUARDED_THUMBPRINT_HEADER:
        return []
    return [
        ConfigWarning(
            kind="thumbprint_header_unguarded",
            message=(
                f"mtls_thumbprint_header: {name!r} is not cleared by the shipped gateways (they guard only "
                f"{GUARDED_THUMBPRINT_HEADER}): a client that sends it names the certificate a bound token is checked "
                "against, unless the gateway in front overwrites it on every request; use "
                f"{GUARDED_THUMBPRINT_HEADER}, or make sure your gateway sets (or removes) {name!r} itself"
            ),
            fields=(("key", "mtls_thumbprint_header"), ("header", name)),
        )
    ]


def _metrics_unauthenticated(settings: Settings) -> list[ConfigWarning]:
    """`/metrics` bound beyond loopback with neither a bearer token nor client certificates: whoever reaches the
    port reads the issuers, key ages and refusal counts by reason, and each scrape costs a worker's event loop."""
    metrics = settings.metrics
    if metrics is None or is_loopback_host(metrics.host) or settings.metrics_auth.token is not None:
        return []
    if metrics.tls is not None and metrics.tls.client_ca_file:  # mTLS: only holders of a certificate get through
        return []
    return [
        ConfigWarning(
            kind="metrics_unauthenticated",
            message=(
                f"metrics.listen ({metrics.address}) is not loopback and /metrics needs no credentials: whoever "
                "reaches the port reads the issuers, key ages and refusal counts, and each scrape costs a worker CPU; "
                "set metrics.token_file (or metrics.token_env) and scrape with Prometheus' authorization "
                "credentials_file, or metrics.tls.client_ca_file, or listen on 127.0.0.1"
            ),
            fields=(("listen", metrics.address),),
        )
    ]


def _push_unauthenticated(settings: Settings) -> list[ConfigWarning]:
    """A push transmitter without `push_authorization_env`: `POST /v1/ssf/events` takes any well-signed SET from
    whoever reaches it, so one captured on its way (a proxy's log, a transmitter's retry queue) can be delivered
    again by anyone (within `max_age_seconds`, and once per `jti`)."""
    revocation = settings.revocation
    if revocation is None:
        return []
    return [
        ConfigWarning(
            kind="push_unauthenticated",
            message=(
                f"revocation.transmitters[{i}] ({transmitter.issuer}): delivery push with no push_authorization_env: "
                "POST /v1/ssf/events takes its SETs from whoever reaches it, the signature their only check, so a "
                "captured SET can be delivered again by anyone; set push_authorization_env to an environment "
                "variable holding the Authorization header value the stream's delivery.authorization_header names"
            ),
            fields=(("key", f"revocation.transmitters[{i}].push_authorization_env"),),
        )
        for i, transmitter in enumerate(revocation.transmitters)
        if transmitter.delivery == PUSH and transmitter.push_authorization_env is None
    ]


def _admin_on_shared_listener(settings: Settings, token: str | None) -> list[ConfigWarning]:
    """The kill switch served on a forward-auth listener bound beyond loopback: every gateway, and whatever else
    reaches that address, can try the admin token, with no rate limit (each try one `admin_refused` line)."""
    http = settings.http
    if not token or settings.admin is not None or http is None or not has_kill_switch(settings):
        return []
    if is_loopback_host(http.host):
        return []
    return [
        ConfigWarning(
            kind="admin_on_shared_listener",
            message=(
                f"{ADMIN_TOKEN_ENV} is set and the admin API shares http.listen ({http.address}), which is not "
                "loopback: whatever reaches the forward-auth listener can try the admin token; set admin.listen "
                "(e.g. 127.0.0.1:9002) to serve the admin API on its own loopback listener"
            ),
            fields=(("listen", http.address),),
        )
    ]


def private_key_files(settings: Settings) -> list[tuple[str, str]]:
    """Every private key file the settings name, as (key, path): the listeners' TLS keys, the introspection
    clients' private_key_jwt keys and the identity assertion's signing key; and the metrics token file."""
    found = [
        (f"{name}.tls.key_file", listen.tls.key_file)
        for name, listen in (
            ("grpc", settings.grpc),
            ("http", settings.http),
            ("metrics", settings.metrics),
            ("admin", settings.admin),
        )
        if listen is not None and listen.tls is not None
    ]
    found += [
        (f"issuers[{i}].introspection.private_key_file", issuer.introspection.private_key_file)
        for i, issuer in enumerate(settings.issuers)
        if issuer.introspection is not None and issuer.introspection.private_key_file
    ]
    identity = settings.upstream.identity_token if settings.upstream is not None else None
    if identity is not None and identity.private_key_file:
        found.append(("upstream.identity_token.private_key_file", identity.private_key_file))
    if settings.metrics_auth.token_file:  # a secret as a key is: whoever reads it scrapes /metrics
        found.append(("metrics.token_file", settings.metrics_auth.token_file))
    return found


def _readable_key_files(settings: Settings) -> list[ConfigWarning]:
    """A private key file users other than its owner can read (or change): anyone on the machine, or sharing
    the volume, who reads it can sign identity assertions, impersonate the TLS listener or the introspection
    client. Group read is fine when root owns the file (see `verifier.private_files.EXPOSING_BITS`)."""
    warnings = []
    for key, path in private_key_files(settings):
        mode = exposed_mode(path)
        if mode is None:
            continue
        warnings.append(
            ConfigWarning(
                kind="private_key_readable",
                message=(
                    f"{key}: {path} is mode {mode:04o}: users other than its owner can read this secret; "
                    "chmod 0600 (0640 when root owns it and the group is the verifier's), or in Kubernetes set "
                    "the Secret volume's defaultMode: 0440 with the pod's securityContext.fsGroup"
                ),
                fields=(("key", key), ("path", path), ("mode", f"{mode:04o}")),
            )
        )
    return warnings


def _registry_origin(settings: Settings) -> list[ConfigWarning]:
    """The WebAuthn registry with DPoP and no `dpop.origins`: its endpoints judge a proof's htu on the scheme and
    host the caller names (`verifier.doors.public_origin`). Behind a TLS-terminating gateway a proof for
    https://<public host>/v1/webauthn/... then never matches (unless the gateway sets X-Forwarded-Proto), and
    wherever it does match, the host is the caller's choice. Not refused: a registry reached straight (a
    loopback test, `verifier dev`) has no public origin to declare."""
    if settings.webauthn is None or settings.dpop is None or settings.dpop.origins:
        return []
    return [
        ConfigWarning(
            kind="registry_origin_undeclared",
            message="webauthn with dpop: the registry endpoints (/v1/webauthn/...) judge a DPoP proof on the scheme "
            "and host the caller sends (X-Forwarded-Proto/-Host, else http and Host): behind a TLS-terminating gateway "
            "a proof for https://<public host>/v1/webauthn/... does not match, and the host is the caller's choice; "
            "list the public origins in dpop.origins (https://<public host>)",
        )
    ]


def _tenant_granted_roles(settings: Settings) -> list[str]:
    """Route policies that require roles any tenant of a `tenants: any` issuer template can grant.

    A tenant's token carries the roles its own administrators assign (Entra app roles, a tenant's groups): with
    `tenants: any`, anyone who makes a tenant of that provider can hand themselves any role name. A policy that
    requires roles and trusts such a template (no `issuers_any`, or the template string itself) is met by them
    (a multi-tenant SaaS may want per-tenant roles and scope its data by tenant upstream)."""
    open_templates = [i.issuer for i in settings.issuers if i.any_tenant]
    warnings: list[str] = []
    for n, policy in enumerate(settings.policies or ()):
        require = policy.require
        if not (require.roles_any or require.roles_all):
            continue
        for template in open_templates:
            if not require.issuers_any or template in require.issuers_any:
                warnings.append(
                    f"policies[{n}] ({policy.name or f'policy-{n}'}): requires roles, and any tenant of {template} "
                    "(tenants: any) can grant its own users any role; name the tenants it trusts in "
                    "require.issuers_any (their concrete issuers), or list issuers[].tenants"
                )
    return warnings


# Claims a provider assigns and users cannot change (OIDC Core 5.7: `sub` is the stable identifier; Entra `oid`).
_STABLE_CONSUMER_CLAIMS = ("sub", "client_id", "azp", "oid")


def _consumer_collisions(settings: Settings) -> list[ConfigWarning]:
    """The Kong consumer named by a claim's value alone: equal values of two issuers (or tenants) are one consumer,
    and a claim users may edit (`preferred_username`, `email`) lets a user name another's consumer."""
    consumer = settings.upstream.consumer if settings.upstream is not None else None
    if consumer is None:
        return []
    warnings: list[ConfigWarning] = []
    shared = [i.issuer for i in settings.issuers if "{" in i.issuer]
    if len(settings.issuers) > 1 or shared:
        warnings.append(ConfigWarning(kind="consumer_namespace_shared", message=(
            f"upstream.consumer: Kong consumers are named by the claim {consumer.claim!r} alone, and "
            f"{'the template ' + shared[0] if shared else 'several issuers'} can issue equal values for different "
            "users; keep one issuer (or tenant) per Kong consumer namespace, or map a claim unique across them"
        )))
    if consumer.claim not in _STABLE_CONSUMER_CLAIMS:
        warnings.append(ConfigWarning(kind="consumer_claim_editable", message=(
            f"upstream.consumer.claim: {consumer.claim!r} may be a claim users can change at the provider (a username, "
            "an email): a user who takes another's value becomes that Kong consumer; prefer sub"
        )))
    return warnings


# OIDC Core 5.1's profile claims: the user's own to set at most providers (Keycloak's account console, a
# self-service profile), the provider vouching for none of them. `email` and `phone_number` grant a role only
# with their `_verified` claim true (`verifier.policy.roles.VERIFIED_BY`).
_USER_EDITABLE_CLAIMS = frozenset({
    "name", "given_name", "family_name", "middle_name", "nickname", "preferred_username", "profile", "picture",
    "website", "gender", "birthdate", "zoneinfo", "locale", "address",
})


def _editable_role_claims(settings: Settings) -> list[ConfigWarning]:
    """A role rule on a claim users may set themselves, or on a member of one (`address.country`, `address.email`:
    OIDC Core 5.1.1's address is the user's to type, and nothing vouches for a member of it): a user who takes the
    mapped value (another's username, the display name `Platform Admins`) takes the role."""
    return [
        ConfigWarning(kind="role_claim_editable", message=(
            f"issuers[{i}].roles[{j}]: grants {rule.role!r} on the claim {rule.claim!r}, which users may be able to "
            "set at the provider: one who takes a mapped value takes the role; map a claim the provider assigns "
            "(groups, roles, sub)"
        ))
        for i, issuer in enumerate(settings.issuers)
        for j, rule in enumerate(issuer.roles)
        if rule.claim.partition(".")[0] in _USER_EDITABLE_CLAIMS  # a path into one too: `address.country`
    ]


def _check_opaque_introspection(
    issuers: Sequence[IssuerSettings], policies: Sequence[PolicySettings] | None
) -> None:
    """An opaque token never reaches a provider that did not issue it (that provider would see, and could
    replay, another's tokens): one issuer takes opaque tokens, or several when every route trusts at most
    one of them (`require.issuers_any`), which is then the only one its opaque tokens are sent to."""
    opaque = [i for i, iss in enumerate(issuers) if iss.introspection is not None and iss.introspection.opaque_tokens]
    if len(opaque) < 2:
        return
    names = [issuers[i].issuer for i in opaque]
    shared = [i for i, policy in enumerate(policies or ()) if len(trusted_among(policy, names)) > 1]
    if policies is None or shared:
        where = f"policies[{shared[0]}].require.issuers_any: trusts both, and" if shared else "and without policies"
        raise ConfigError(
            f"issuers[{opaque[1]}].introspection.opaque_tokens: issuers[{opaque[0]}] introspects opaque tokens "
            f"already, {where} an opaque token does not say which issuer it came from; set opaque_tokens: "
            "false on all but one issuer (it can still introspect its own JWTs with introspect_jwts: true), "
            "or let each policy trust at most one of them (policies[].require.issuers_any)"
        )


def parse_settings(data: Any) -> Settings:
    """Validates a decoded YAML document into `Settings`; the error names every bad key, one a line."""
    return collecting(_parse_settings, data)


def _parse_settings(data: Any) -> Settings:
    root = Reader(data, "")
    issuers = tuple(_issuer(r) for r in root.children("issuers"))
    seen: set[str] = set()
    for i, iss in enumerate(issuers):
        if iss.issuer in seen:
            raise ConfigError(f"issuers[{i}].issuer: {iss.issuer!r} configured twice")
        seen.add(iss.issuer)
    cache_reader = root.child("cache")
    cache = CacheSettings()
    if cache_reader is not None:
        cache = CacheSettings(**read_fields(cache_reader, CacheSettings))
        cache_reader.done()
    http = root.child("http")
    forward_auth = _forward_auth(http)
    metrics = root.child("metrics")
    metrics_auth = parse_metrics_auth(metrics, os.environ)  # before `_listen`, which refuses the section's other keys
    settings = Settings(
        **read_fields(
            root,
            Settings,
            grpc=_listen(root.child("grpc")),
            http=_listen(http),
            forward_auth=forward_auth,
            metrics=_listen(metrics),
            metrics_auth=metrics_auth,
            admin=_listen(root.child("admin")),
            issuers=issuers,
            cache=cache,
            policies=tuple(parse_policy(r, i) for i, r in enumerate(root.children("policies")))
            if root.raw("policies") is not None
            else None,
            rate_limits=_rate_limits(root.child("rate_limits")),
            dpop=_optional_section(root, "dpop", parse_dpop_config),
            state=_optional_section(root, "state", parse_state_config),
            mtls_thumbprint_header=_header_name(root, "mtls_thumbprint_header"),
            edge_cache=_edge_cache(root.child("edge_cache")),
            revocation=_optional_section(root, "revocation", parse_revocation_config),
            webauthn=_optional_section(root, "webauthn", parse_webauthn_config),
            protected_resource=_optional_section(root, "protected_resource", parse_protected_resource_config),
            upstream=_optional_section(root, "upstream", parse_upstream_config),
            tracing=parse_tracing_config(root.raw("tracing"), os.environ),
        )
    )
    root.done()
    settings = _with_resource_origins(settings)
    _check_route_upstreams(settings)
    if settings.revocation is not None:  # transmitters speak for configured issuers only
        check_transmitter_scopes(settings.revocation, (i.issuer for i in issuers))
    check_trusted_issuers(settings.policies or (), tuple(i.issuer for i in issuers))
    check_reached(settings.policies or ())
    _check_opaque_introspection(issuers, settings.policies)
    if settings.grpc is None and settings.http is None:
        raise ConfigError("grpc: at least one of grpc or http must be configured")
    _check_distinct_ports(settings)
    _check_admin_listener(settings)
    if settings.readable_key_files == "refuse":  # else a warning (`config_warnings`)
        for warning in _readable_key_files(settings):
            record(warning.message)
    check_admin_token(os.environ.get(ADMIN_TOKEN_ENV))
    _check_shared_state(settings)
    _check_bucket_shares(settings)
    return settings


def _with_resource_origins(settings: Settings) -> Settings:
    """`dpop.origins_from_resources`: `dpop.origins` from the RFC 9728 resource identifiers the config names (the
    default resource, then each policy's), in that order, each once; a problem when it names none."""
    dpop = settings.dpop
    if dpop is None or not dpop.origins_from_resources:
        return settings
    named = [("protected_resource.resource", settings.protected_resource.resource if settings.protected_resource
              else "")]
    named += [(f"policies[{i}].resource", p.resource) for i, p in enumerate(settings.policies or ())]
    origins: list[str] = []
    for key, resource in named:
        if not resource:
            continue
        try:
            origins.append(resource_origin(resource, allow_http=dpop.allow_http_origins))
        except ValueError as exc:
            record(f"{key}: as a dpop origin (dpop.origins_from_resources): {exc}")
    if not origins:
        record("dpop.origins_from_resources: no protected_resource.resource or policies[].resource to take them from")
        return settings
    return dataclasses.replace(settings, dpop=dataclasses.replace(dpop, origins=tuple(dict.fromkeys(origins))))


def _check_route_upstreams(settings: Settings) -> None:
    """A route's audience needs an assertion to carry it; a route's header may not take the assertion's name."""
    identity = settings.upstream.identity_token if settings.upstream is not None else None
    for i, policy in enumerate(settings.policies or ()):
        if policy.upstream is None:
            continue
        if policy.upstream.audience and identity is None:
            record(f"policies[{i}].upstream.identity_token: needs upstream.identity_token to be configured")
        for j, mapping in enumerate(policy.upstream.headers):
            if identity is not None and mapping.header == identity.header:
                record(f"policies[{i}].upstream.headers[{j}].header: {mapping.header!r} carries the assertion")


def _check_distinct_ports(settings: Settings) -> None:
    """Each listener its own port: with SO_REUSEPORT two of them on one port would share its connections
    (metrics answering on the auth port, or the reverse). Worker i serves metrics on the port + i."""
    taken: dict[int, str] = {}
    for name in ("grpc", "http", "metrics", "admin"):
        listen: Listen | None = getattr(settings, name)
        if listen is None or listen.port == 0:
            continue
        span = settings.workers if name == "metrics" else 1
        for port in range(listen.port, listen.port + span):
            if port in taken:
                raise ConfigError(f"{name}.listen: port {port} is also the {taken[port]} listener's")
            taken[port] = name


def has_kill_switch(settings: Settings) -> bool:
    """Whether the admin API's routes can exist: a revocation service runs (a `revocation` section, or an issuer's
    back-channel logout, whose entries it keeps). Served only with `VERIFIER_ADMIN_TOKEN` set besides."""
    return settings.revocation is not None or any(i.backchannel_logout for i in settings.issuers)


def _check_admin_listener(settings: Settings) -> None:
    """`admin.listen` with no revocation service would be a listener that answers 404 to everything."""
    if settings.admin is not None and not has_kill_switch(settings):
        raise ConfigError(
            "admin.listen: the admin API (the kill switch) needs a revocation section (or an issuer's "
            "backchannel_logout); add `revocation: {}` or remove admin"
        )


def check_admin_token(token: str | None) -> None:
    """The admin API's bearer secret, when set, must be hard to guess and presentable; raises `ConfigError` otherwise.

    A presented token is read without its surrounding white space (RFC 9110 section 5.5), so one configured with some
    (a Secret's file ending in a newline) would match no request, and one of white space alone would open to nobody:
    a kill switch that is there until the incident it is for. So would one holding a non-ASCII or control character
    (`header_secret_problem`). The value is never quoted."""
    if token and token != token.strip():
        raise ConfigError(
            f"{ADMIN_TOKEN_ENV}: surrounding white space (a trailing newline?) is not part of a presented token;"
            " remove it"
        )
    if token and (problem := header_secret_problem(token)):
        raise ConfigError(f"{ADMIN_TOKEN_ENV}: {problem}")
    if token and len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError(
            f"{ADMIN_TOKEN_ENV}: at least {MIN_ADMIN_TOKEN_CHARS} characters are required (got {len(token)})"
        )


def _check_bucket_shares(settings: Settings) -> None:
    """`issuers[].max_buckets_share` split Redis's bound of rate-limit buckets: only with `state.redis_url`, and
    only when every entry's part comes to one bucket at least."""
    shared = [n for n, i in enumerate(settings.issuers) if i.max_buckets_share > 0]
    if settings.state is None or settings.state.redis_url is None:
        for n in shared:
            record(f"issuers[{n}].max_buckets_share: only meaningful with state.redis_url (Redis's bound)")
        return
    total = settings.state.redis_max_buckets
    problem = split_problem(total, {i.issuer: i.max_buckets_share for i in settings.issuers})
    if problem:
        key = f"issuers[{shared[0]}].max_buckets_share" if shared else "state.redis_max_buckets"
        record(f"{key}: state.redis_max_buckets split by issuer entry: {problem}; raise it or change the shares")


def _check_shared_state(settings: Settings) -> None:
    """Refuses `workers: N > 1` without Redis when a feature needs every worker to see the same state.

    Workers share nothing else: a kill switch would reach one worker in N, a DPoP proof or an SSF
    `jti` would be accepted once per worker, a rate limit would allow N times its burst.
    """
    if settings.state_is_shared:
        return
    needs = [
        key
        for key, used in (
            ("revocation", settings.revocation is not None),
            ("dpop", settings.dpop is not None),
            ("webauthn", settings.webauthn is not None),
            ("rate_limits", settings.rate_limits is not None),
            ("issuers[].backchannel_logout", any(i.backchannel_logout for i in settings.issuers)),
        )
        if used
    ]
    needs += [
        f"policies[{i}].require.{key}"
        for i, policy in enumerate(settings.policies or ())
        for key in ("sender_constraint", "step_up")
        if getattr(policy.require, key)
    ]
    if needs:
        raise ConfigError(
            f"workers: {settings.workers} processes share nothing without state.redis_url, and "
            f"{', '.join(needs)} need(s) one shared state (kill switch, replay caches, buckets); "
            "set state.redis_url (and state.key_prefix) or use workers: 1"
        )


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Reads and validates a YAML settings file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded)") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return parse_settings(data)
