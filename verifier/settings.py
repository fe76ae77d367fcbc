"""Typed settings, read from one YAML file and validated once at start-up.

Every error names the offending key (`issuers[0].algorithms[1]: ...`) so an operator can fix the file
without reading code. Secrets never live in the file: it names environment variables instead.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import ipaddress
import math
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from verifier.request import host_name, normalize_host

# Algorithms we can verify with asymmetric keys. HS* is deliberately absent: a verifier that holds
# only public keys must never accept a MAC, or a public key becomes a shared secret.
SUPPORTED_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)

DEFAULT_LEEWAY_SECONDS = 30  # seconds of clock skew tolerated on exp/nbf/iat
DEFAULT_MAX_TOKEN_BYTES = 8192  # bytes; larger tokens are refused before any parsing
DEFAULT_TOKEN_CACHE_ENTRIES = 100_000  # verified tokens kept (bounded memory, ~1 KiB each)
DEFAULT_NEGATIVE_CACHE_ENTRIES = 100_000  # refused tokens remembered so a replay costs one lookup
DEFAULT_NEGATIVE_TTL_SECONDS = 30.0  # seconds a refused token stays refused without re-checking
DEFAULT_JWKS_MIN_TTL_SECONDS = 60.0  # floor on a provider's Cache-Control max-age for the JWKS
DEFAULT_JWKS_MAX_TTL_SECONDS = 3600.0  # ceiling: refetch at least hourly even if told otherwise
DEFAULT_JWKS_COOLDOWN_SECONDS = 30.0  # at most one unknown-kid refresh per issuer per this many s
DEFAULT_FETCH_TIMEOUT_SECONDS = 5.0  # deadline on every discovery/JWKS call
DEFAULT_MAX_JWKS_BYTES = 1 << 20  # 1 MiB: a JWKS larger than this is malformed, not a key set
DEFAULT_MAX_JWKS_KEYS = 100  # keys kept per issuer; more is a misconfiguration or an attack
DEFAULT_REALM = "verifier"
# Seconds a door waits for a decision before answering 503 retry-later. Below the Kong plugins' 1 s
# default timeout (and any gateway deadline must stay above it): a gateway that gives up first would
# see an unreachable verifier, which `fail_open` turns into a pass (issue #26 G9).
DEFAULT_DEADLINE_SECONDS = 0.8
ADMIN_TOKEN_ENV = "VERIFIER_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not its value
MIN_ADMIN_TOKEN_CHARS = 32  # e.g. `openssl rand -hex 16`; the admin API revokes anyone's access
MAX_DEADLINE_SECONDS = 30.0  # seconds; no gateway waits longer for an authorization answer


class ConfigError(ValueError):
    """A settings file is invalid; the message names the key."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TlsSettings:
    """TLS for a listener; with `client_ca_file`, clients must present a certificate it signed (mTLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str = ""

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

    host: str
    port: int
    tls: TlsSettings | None = None

    @property
    def address(self) -> str:
        """`host:port`, bracketing IPv6 literals."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoleRule:
    """Grants `role` when a claim contains one of `values`, a scope is held, or the subject is listed."""

    role: str
    claim: str = ""  # e.g. "groups": a string or list-of-strings claim
    values: tuple[str, ...] = ()  # the claim must contain one of these
    scope: str = ""  # or: this scope is held
    subjects: tuple[str, ...] = ()  # or: the subject is one of these


SENDER_CONSTRAINTS = ("dpop", "mtls", "any")
STEP_UP_METHODS = ("webauthn",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouteMatch:
    """Which requests a policy covers; empty fields match anything."""

    hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    path_prefix: str = ""
    path: str = ""  # exact path (no query)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Requirements:
    """What a matched route requires of the caller."""

    authenticated: bool = True
    roles_any: tuple[str, ...] = ()
    roles_all: tuple[str, ...] = ()
    scopes_all: tuple[str, ...] = ()
    scopes_any: tuple[str, ...] = ()
    amr_any: tuple[str, ...] = ()  # RFC 8176 values, e.g. hwk, pop
    acr_any: tuple[str, ...] = ()  # e.g. phr, phrh
    max_auth_age_seconds: int | None = None  # auth_time must be at most this old
    sender_constraint: str = ""  # dpop | mtls | any (either)
    step_up: str = ""  # webauthn: a request-bound WebAuthn assertion is required


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """One route policy: first match wins."""

    name: str
    match: RouteMatch
    require: Requirements


@dataclasses.dataclass(frozen=True, kw_only=True)
class RateLimit:
    """A token bucket: `per_second` sustained, `burst` at once."""

    per_second: float
    burst: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class RateLimitSettings:
    """Per-identity limits; a caller gets the most generous limit among its roles, else the default."""

    default: RateLimit | None = None
    roles: tuple[tuple[str, RateLimit], ...] = ()


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
    introspection: Any = None  # verifier.tokens.introspection.IntrospectionConfig when configured
    introspect_jwts: bool = False  # also introspect this issuer's JWTs (revocation check)

    @property
    def discovery(self) -> str:
        """The OIDC discovery document's URL."""
        return self.discovery_url or self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """Bounds on the verified-token and refused-token caches."""

    token_entries: int = DEFAULT_TOKEN_CACHE_ENTRIES
    negative_entries: int = DEFAULT_NEGATIVE_CACHE_ENTRIES
    negative_ttl_seconds: float = DEFAULT_NEGATIVE_TTL_SECONDS


DEFAULT_MAX_PENDING_CHECKS = 1024  # first-seen checks in flight per worker before shedding load (503)
DEFAULT_EDGE_MAX_AGE_SECONDS = 10  # seconds a gateway may reuse an allow; also bounds revocation reach
DEFAULT_REFUSAL_MAX_AGE_SECONDS = 5  # seconds a gateway may reuse a refusal of a malformed/forged token


@dataclasses.dataclass(frozen=True, kw_only=True)
class EdgeCacheSettings:
    """How long gateways may reuse decisions (forward-auth `Cache-Control`, gRPC `cache_max_age_seconds`)."""

    max_age_seconds: int = DEFAULT_EDGE_MAX_AGE_SECONDS  # 0 turns reuse off
    refusal_max_age_seconds: int = DEFAULT_REFUSAL_MAX_AGE_SECONDS


FORWARDED_HEADER_FAMILIES = ("x-forwarded", "x-original")  # which headers describe the original request
DEFAULT_FORWARDED_HEADERS = "x-forwarded"  # Traefik/Caddy/Kong style; nginx templates set the same names
DEFAULT_HEADER_TIMEOUT_SECONDS = 10.0  # seconds for a request (headers, small body) to arrive: slowloris bound
# Seconds an idle keep-alive connection stays open: longer than the gateways' own (nginx's upstream
# keepalive_timeout is 60 s) so the gateway closes first and never sends on a connection we are closing.
DEFAULT_IDLE_TIMEOUT_SECONDS = 75.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ForwardAuthSettings:
    """The forward-auth listener's trust and timeouts (keys of the `http` section)."""

    forwarded_headers: str = DEFAULT_FORWARDED_HEADERS  # one of FORWARDED_HEADER_FAMILIES; the other is ignored
    header_timeout_seconds: float = DEFAULT_HEADER_TIMEOUT_SECONDS
    idle_timeout_seconds: float = DEFAULT_IDLE_TIMEOUT_SECONDS


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the verifier needs, validated."""

    grpc: Listen | None
    http: Listen | None
    metrics: Listen | None
    issuers: tuple[IssuerSettings, ...]
    cache: CacheSettings = CacheSettings()
    max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES
    realm: str = DEFAULT_REALM
    audit: bool = True
    policies: tuple[PolicySettings, ...] | None = None  # None: any valid token is allowed
    rate_limits: RateLimitSettings | None = None
    dpop: Any = None  # verifier.binding.dpop.DpopConfig
    state: Any = None  # verifier.state.StateConfig (Redis); None: in-memory
    # The forward-auth request header a trusted gateway puts the client certificate's x5t#S256 in;
    # empty: none is read (a client could send it), so certificate-bound tokens need a gRPC door.
    mtls_thumbprint_header: str = ""
    forward_auth: ForwardAuthSettings = ForwardAuthSettings()
    edge_cache: EdgeCacheSettings = EdgeCacheSettings()
    max_pending_checks: int = DEFAULT_MAX_PENDING_CHECKS
    deadline_seconds: float = DEFAULT_DEADLINE_SECONDS  # a door answers 503 retry-later past this
    workers: int = 1  # processes sharing the listeners (SO_REUSEPORT); the metrics port is offset per worker
    revocation: Any = None  # verifier.revocation.RevocationConfig: Shared Signals receiver
    webauthn: Any = None  # verifier.webauthn config: credential registry and step-up

    @property
    def state_is_shared(self) -> bool:
        """Whether every worker sees the same replay caches, buckets and entries (one worker, or Redis)."""
        return self.workers == 1 or getattr(self.state, "redis_url", None) is not None


class _Reader:
    """Reads one mapping, remembering its path for error messages and refusing unknown keys.

    Inside `parse_settings` a problem is recorded and reading goes on with the key's default (or an
    empty value), so one run of `check-config` names every problem, not only the first; an unknown key
    is named with the nearest known one. Outside it, the first problem raises.
    """

    def __init__(self, data: Any, path: str) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
        self.data: Mapping[str, Any] = data
        self.path = path
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _problem(self, key: str, message: str) -> None:
        """Records (or, outside `parse_settings`, raises) a problem with `key`."""
        _record(f"{self._key(key)}: {message}")

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return key in self.data

    def text(self, key: str, default: str | None = None) -> str:
        value = self.raw(key)
        if value is None:
            if default is None:
                self._problem(key, "required")
                return ""
            return default
        if not isinstance(value, str) or not value:
            self._problem(key, "expected a non-empty string")
            return default or ""
        return value

    def number(self, key: str, default: float, *, minimum: float = 0, maximum: float | None = None) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            self._problem(key, "expected a finite number")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            self._problem(key, f"{value} is outside [{minimum}, {maximum}]")
            return default
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._problem(key, "expected an integer")
            return default
        if value < minimum or (maximum is not None and value > maximum):
            self._problem(key, f"{value} is outside [{minimum}, {maximum}]")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self._problem(key, "expected true or false")
            return default
        return value

    def strings(self, key: str, *, required: bool = True) -> tuple[str, ...]:
        value = self.raw(key)
        if value is None and not required:
            return ()
        if not isinstance(value, Sequence) or isinstance(value, str) or (required and not value):
            self._problem(key, "expected a non-empty list of strings")
            return ()
        bad = [i for i, item in enumerate(value) if not isinstance(item, str) or not item]
        for i in bad:
            self._problem(f"{key}[{i}]", "expected a non-empty string")
        return () if bad else tuple(value)

    def child(self, key: str) -> _Reader | None:
        value = self.raw(key)
        if value is None:
            return None
        try:
            return _Reader(value, self._key(key))
        except ConfigError as exc:
            _record(str(exc))
            return None

    def children(self, key: str) -> list[_Reader]:
        value = self.raw(key)
        if not isinstance(value, Sequence) or isinstance(value, str) or not value:
            self._problem(key, "expected a non-empty list")
            return []
        readers = []
        for i, item in enumerate(value):
            try:
                readers.append(_Reader(item, f"{self._key(key)}[{i}]"))
            except ConfigError as exc:
                _record(str(exc))
        return readers

    def done(self) -> None:
        for key in sorted((set(self.data) - self.seen), key=str):
            near = _nearest(str(key), self.seen)
            self._problem(str(key), f"unknown key (did you mean {near}?)" if near else "unknown key")


def _nearest(key: str, known: set[str]) -> str | None:
    """The known key `key` was most likely meant to be (a typo of it, or of its first word), or None."""
    best, score = None, 0.0
    for candidate in sorted(known):
        ratio = max(
            difflib.SequenceMatcher(None, key, candidate).ratio(),
            difflib.SequenceMatcher(None, key, candidate.split("_", 1)[0]).ratio() - 0.1,
        )
        if ratio > score:
            best, score = candidate, ratio
    return best if score >= 0.6 else None


# The problems found so far by the `parse_settings` call in progress (None: raise at the first one).
_problems: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("config_problems", default=None)


def _record(message: str) -> None:
    problems = _problems.get()
    if problems is None:
        raise ConfigError(message)
    key = message.split(":", 1)[0]
    if not any(p.split(":", 1)[0] == key for p in problems):  # the first problem with a key says enough
        problems.append(message)


def _collecting(parse: Callable[[Any], Settings], data: Any) -> Settings:
    """Runs `parse` recording every problem; raises one `ConfigError` listing them all, one a line."""
    problems: list[str] = []
    token = _problems.set(problems)
    try:
        settings = parse(data)
    except ConfigError as exc:  # a check that cannot go on: it ends the run, after what was recorded
        key = str(exc).split(":", 1)[0]
        if not any(p.split(":", 1)[0] == key for p in problems):
            problems.append(str(exc))
    except Exception:
        if not problems:
            raise
        # an earlier problem left a value the later code could not use: the problems already say why
    finally:
        _problems.reset(token)
    if problems:
        raise ConfigError("\n".join(problems))
    return settings


def _listen(reader: _Reader | None) -> Listen | None:
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
        tls = TlsSettings(
            cert_file=tls_reader.text("cert_file"),
            key_file=tls_reader.text("key_file"),
            client_ca_file=tls_reader.text("client_ca_file", ""),
        )
        tls_reader.done()
        try:
            tls.server_context()  # unreadable files or a key that does not fit fail here, by name
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{tls_reader.path}: cannot load the certificate, key or CA ({exc})") from exc
    return Listen(host=host, port=int(port_text), tls=tls)


def is_loopback_host(host: str) -> bool:
    """Whether `host` names this machine: the only place plain http is allowed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, key: str, what: str = "issuer", *, allow_insecure_http: bool = False) -> None:
    """An http(s) URL, https unless loopback and allowed; a `ConfigError` naming `key` (recorded in `parse_settings`).

    Keys, SETs and client secrets that travel over plain HTTP can be swapped or read by anyone on
    the path, so every outbound URL in the config goes through this one check. Plain http on loopback
    is trusted by address only when the config says so (`allow_insecure_http: true`, for tests and
    local labs; `verifier dev` builds its settings itself).
    """
    problem = url_problem(url, what)
    if problem:
        _record(f"{key}: {problem}")
    elif not allow_insecure_http and url.lower().startswith("http://"):
        _record(f"{key}: plain http needs allow_insecure_http: true (tests and local labs only; {url!r})")


def url_problem(url: object, what: str = "issuer", *, allow_http: bool = True) -> str:
    """Why `url` must not be called (empty: it may): http(s), parseable, https unless loopback.

    `allow_http=False` refuses plain http even on loopback: a URL learned from an https issuer's
    metadata must not downgrade (see `verifier.tokens.fetch.check_learned_url`).
    """
    if not isinstance(url, str):
        return f"expected an http(s) URL, got {type(url).__name__}"
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not hostname:
        return f"expected an http(s) URL, got {url!r}"
    if parts.scheme == "http" and not (allow_http and is_loopback_host(hostname)):
        return f"https is required for a non-loopback {what} ({url!r})" if allow_http else f"plain http ({url!r})"
    return ""


def _introspection(reader: _Reader, allow_insecure_http: bool) -> Any:
    raw = reader.raw("introspection")
    if raw is None:
        return None
    import importlib

    module = importlib.import_module("verifier.tokens.introspection")
    return module.parse_introspection_config(
        raw, f"{reader.path}.introspection", allow_insecure_http=allow_insecure_http
    )


def _optional_section(root: _Reader, key: str, module: str, function: str) -> Any:
    raw = root.raw(key)
    if raw is None:
        return None
    import importlib

    parse = getattr(importlib.import_module(module), function)
    try:
        return parse(raw, key)
    except ConfigError as exc:  # recorded: the other sections are still read
        _record(str(exc))
        return None


def _issuer(reader: _Reader) -> IssuerSettings:
    issuer = reader.text("issuer")
    insecure = reader.boolean("allow_insecure_http", False)
    check_url(issuer, f"{reader.path}.issuer", allow_insecure_http=insecure)
    algorithms = reader.strings("algorithms")
    for i, alg in enumerate(algorithms):
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(
                f"{reader.path}.algorithms[{i}]: {alg!r} is not allowed "
                f"(supported: {', '.join(sorted(SUPPORTED_ALGORITHMS))})"
            )
    settings = IssuerSettings(
        issuer=issuer,
        audiences=reader.strings("audiences"),
        algorithms=algorithms,
        leeway_seconds=reader.integer("leeway_seconds", DEFAULT_LEEWAY_SECONDS, maximum=600),
        discovery_url=reader.text("discovery_url", ""),
        jwks_uri=reader.text("jwks_uri", ""),
        require_typ_at_jwt=reader.boolean("require_typ_at_jwt", False),
        jwks_min_ttl_seconds=reader.number("jwks_min_ttl_seconds", DEFAULT_JWKS_MIN_TTL_SECONDS, minimum=1),
        jwks_max_ttl_seconds=reader.number("jwks_max_ttl_seconds", DEFAULT_JWKS_MAX_TTL_SECONDS, minimum=1),
        jwks_cooldown_seconds=reader.number("jwks_cooldown_seconds", DEFAULT_JWKS_COOLDOWN_SECONDS),
        fetch_timeout_seconds=reader.number(
            "fetch_timeout_seconds", DEFAULT_FETCH_TIMEOUT_SECONDS, minimum=0.05, maximum=60
        ),
        roles=tuple(_role_rule(r) for r in reader.children("roles")) if reader.raw("roles") is not None else (),
        introspection=_introspection(reader, insecure),
        introspect_jwts=reader.boolean("introspect_jwts", False),
    )
    for key in ("discovery_url", "jwks_uri"):
        if getattr(settings, key):
            check_url(getattr(settings, key), f"{reader.path}.{key}", allow_insecure_http=insecure)
    if settings.jwks_min_ttl_seconds > settings.jwks_max_ttl_seconds:
        raise ConfigError(f"{reader.path}.jwks_min_ttl_seconds: larger than jwks_max_ttl_seconds")
    reader.done()
    return settings


def _role_rule(reader: _Reader) -> RoleRule:
    rule = RoleRule(
        role=reader.text("role"),
        claim=reader.text("claim", ""),
        values=reader.strings("values", required=False),
        scope=reader.text("scope", ""),
        subjects=reader.strings("subjects", required=False),
    )
    reader.done()
    if bool(rule.claim) != bool(rule.values):
        raise ConfigError(f"{reader.path}: claim and values go together")
    if not (rule.claim or rule.scope or rule.subjects):
        raise ConfigError(f"{reader.path}: needs claim+values, scope or subjects")
    return rule


def _policy(reader: _Reader, index: int) -> PolicySettings:
    match_reader = reader.child("match")
    if match_reader is None:
        raise ConfigError(f"{reader.path}.match: required")
    methods = tuple(m.upper() for m in match_reader.strings("methods", required=False))
    prefix = match_reader.text("path_prefix", "")
    exact = match_reader.text("path", "")
    for key, value in (("path_prefix", prefix), ("path", exact)):
        if value and not value.startswith("/"):
            raise ConfigError(f"{match_reader.path}.{key}: must start with /")
    hosts = tuple(normalize_host(h) for h in match_reader.strings("hosts", required=False))
    for i, host in enumerate(hosts):
        if host_name(host) != host or not host:
            raise ConfigError(f"{match_reader.path}.hosts[{i}]: expected a host name without a port, got {host!r}")
    match = RouteMatch(
        hosts=hosts,
        methods=methods,
        path_prefix=prefix,
        path=exact,
    )
    match_reader.done()
    req_reader = reader.child("require") or _Reader({}, f"{reader.path}.require")
    max_age = req_reader.raw("max_auth_age_seconds")
    require = Requirements(
        authenticated=req_reader.boolean("authenticated", True),
        roles_any=req_reader.strings("roles_any", required=False),
        roles_all=req_reader.strings("roles_all", required=False),
        scopes_all=req_reader.strings("scopes_all", required=False),
        scopes_any=req_reader.strings("scopes_any", required=False),
        amr_any=req_reader.strings("amr_any", required=False),
        acr_any=req_reader.strings("acr_any", required=False),
        max_auth_age_seconds=None
        if max_age is None
        else req_reader.integer("max_auth_age_seconds", 0, minimum=1, maximum=86_400 * 365),
        sender_constraint=req_reader.text("sender_constraint", ""),
        step_up=req_reader.text("step_up", ""),
    )
    if require.sender_constraint and require.sender_constraint not in SENDER_CONSTRAINTS:
        raise ConfigError(f"{req_reader.path}.sender_constraint: expected one of {', '.join(SENDER_CONSTRAINTS)}")
    if require.step_up and require.step_up not in STEP_UP_METHODS:
        raise ConfigError(f"{req_reader.path}.step_up: expected one of {', '.join(STEP_UP_METHODS)}")
    req_reader.done()
    name = reader.text("name", f"policy-{index}")
    reader.done()
    return PolicySettings(name=name, match=match, require=require)


def _rate_limit(reader: _Reader) -> RateLimit:
    limit = RateLimit(
        per_second=reader.number("per_second", 0.0, minimum=0.001, maximum=1_000_000),
        burst=reader.integer("burst", 0, minimum=1, maximum=10_000_000),
    )
    if not reader.has("per_second") or not reader.has("burst"):
        raise ConfigError(f"{reader.path}: per_second and burst are required")
    reader.done()
    return limit


def _rate_limits(reader: _Reader | None) -> RateLimitSettings | None:
    if reader is None:
        return None
    default = reader.child("default")
    roles_reader = reader.child("roles")
    roles: list[tuple[str, RateLimit]] = []
    if roles_reader is not None:
        for role, value in roles_reader.data.items():
            if not isinstance(role, str) or not role:
                raise ConfigError(f"{roles_reader.path}: role names must be strings, got {role!r}")
            roles.append((role, _rate_limit(_Reader(value, f"{roles_reader.path}.{role}"))))
    settings = RateLimitSettings(default=_rate_limit(default) if default else None, roles=tuple(roles))
    reader.done()
    return settings


def _edge_cache(reader: _Reader | None) -> EdgeCacheSettings:
    if reader is None:
        return EdgeCacheSettings()
    settings = EdgeCacheSettings(
        max_age_seconds=reader.integer("max_age_seconds", DEFAULT_EDGE_MAX_AGE_SECONDS, maximum=3600),
        refusal_max_age_seconds=reader.integer("refusal_max_age_seconds", DEFAULT_REFUSAL_MAX_AGE_SECONDS, maximum=300),
    )
    reader.done()
    return settings


def _forward_auth(reader: _Reader | None) -> ForwardAuthSettings:
    """The forward-auth keys of the `http` section (read before `_listen`, which refuses the rest)."""
    if reader is None:
        return ForwardAuthSettings()
    family = reader.text("forwarded_headers", DEFAULT_FORWARDED_HEADERS)
    if family not in FORWARDED_HEADER_FAMILIES:
        raise ConfigError(
            f"{reader.path}.forwarded_headers: expected one of {', '.join(FORWARDED_HEADER_FAMILIES)}, got {family!r}"
        )
    return ForwardAuthSettings(
        forwarded_headers=family,
        header_timeout_seconds=reader.number(
            "header_timeout_seconds", DEFAULT_HEADER_TIMEOUT_SECONDS, minimum=0.01, maximum=3600
        ),
        idle_timeout_seconds=reader.number(
            "idle_timeout_seconds", DEFAULT_IDLE_TIMEOUT_SECONDS, minimum=0.01, maximum=86_400
        ),
    )


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")


def _header_name(root: _Reader, key: str) -> str:
    """An optional request header name (RFC 9110 token), lower-cased; empty when absent."""
    value = root.raw(key)
    if value is None or value == "":
        return ""
    name = root.text(key).lower()
    if not set(name) <= _TCHAR:
        raise ConfigError(f"{key}: {name!r} is not a header name")
    return name


def _check_opaque_introspection(issuers: Sequence[IssuerSettings]) -> None:
    """At most one issuer introspects opaque tokens: a token that names no issuer must never reach
    a provider that did not issue it (that provider would see, and could replay, another's tokens)."""
    opaque = [i for i, iss in enumerate(issuers) if iss.introspection is not None and iss.introspection.opaque_tokens]
    if len(opaque) > 1:
        raise ConfigError(
            f"issuers[{opaque[1]}].introspection.opaque_tokens: issuers[{opaque[0]}] introspects opaque tokens "
            "already, and an opaque token does not say which issuer it came from; set opaque_tokens: false "
            "on all but one issuer (it can still introspect its own JWTs with introspect_jwts: true)"
        )


def parse_settings(data: Any) -> Settings:
    """Validates a decoded YAML document into `Settings`; the error names every bad key, one a line."""
    return _collecting(_parse_settings, data)


def _parse_settings(data: Any) -> Settings:
    root = _Reader(data, "")
    issuers = tuple(_issuer(r) for r in root.children("issuers"))
    seen: set[str] = set()
    for i, iss in enumerate(issuers):
        if iss.issuer in seen:
            raise ConfigError(f"issuers[{i}].issuer: {iss.issuer!r} configured twice")
        seen.add(iss.issuer)
    _check_opaque_introspection(issuers)
    cache_reader = root.child("cache")
    cache = CacheSettings()
    if cache_reader is not None:
        cache = CacheSettings(
            token_entries=cache_reader.integer("token_entries", DEFAULT_TOKEN_CACHE_ENTRIES, maximum=10_000_000),
            negative_entries=cache_reader.integer(
                "negative_entries", DEFAULT_NEGATIVE_CACHE_ENTRIES, maximum=10_000_000
            ),
            negative_ttl_seconds=cache_reader.number(
                "negative_ttl_seconds", DEFAULT_NEGATIVE_TTL_SECONDS, maximum=3600
            ),
        )
        cache_reader.done()
    http = root.child("http")
    forward_auth = _forward_auth(http)
    settings = Settings(
        grpc=_listen(root.child("grpc")),
        http=_listen(http),
        forward_auth=forward_auth,
        metrics=_listen(root.child("metrics")),
        issuers=issuers,
        cache=cache,
        max_token_bytes=root.integer("max_token_bytes", DEFAULT_MAX_TOKEN_BYTES, minimum=256, maximum=1 << 20),
        realm=root.text("realm", DEFAULT_REALM),
        audit=root.boolean("audit", True),
        policies=tuple(_policy(r, i) for i, r in enumerate(root.children("policies")))
        if root.raw("policies") is not None
        else None,
        rate_limits=_rate_limits(root.child("rate_limits")),
        dpop=_optional_section(root, "dpop", "verifier.binding.dpop", "parse_dpop_config"),
        state=_optional_section(root, "state", "verifier.state", "parse_state_config"),
        mtls_thumbprint_header=_header_name(root, "mtls_thumbprint_header"),
        edge_cache=_edge_cache(root.child("edge_cache")),
        workers=root.integer("workers", 1, minimum=1, maximum=64),
        max_pending_checks=root.integer("max_pending_checks", DEFAULT_MAX_PENDING_CHECKS, minimum=1, maximum=1_000_000),
        deadline_seconds=root.number(
            "deadline_seconds", DEFAULT_DEADLINE_SECONDS, minimum=0.001, maximum=MAX_DEADLINE_SECONDS
        ),
        revocation=_optional_section(root, "revocation", "verifier.revocation", "parse_revocation_config"),
        webauthn=_optional_section(root, "webauthn", "verifier.webauthn", "parse_webauthn_config"),
    )
    root.done()
    if settings.revocation is not None:  # transmitters speak for configured issuers only
        import importlib

        scopes = importlib.import_module("verifier.revocation.config").check_transmitter_scopes
        scopes(settings.revocation, (i.issuer for i in issuers))
    if settings.grpc is None and settings.http is None:
        raise ConfigError("grpc: at least one of grpc or http must be configured")
    _check_distinct_ports(settings)
    check_admin_token(os.environ.get(ADMIN_TOKEN_ENV))
    _check_shared_state(settings)
    return settings


def _check_distinct_ports(settings: Settings) -> None:
    """Each listener its own port: with SO_REUSEPORT two of them on one port would share its connections
    (metrics answering on the auth port, or the reverse). Worker i serves metrics on the port + i."""
    taken: dict[int, str] = {}
    for name in ("grpc", "http", "metrics"):
        listen: Listen | None = getattr(settings, name)
        if listen is None or listen.port == 0:
            continue
        span = settings.workers if name == "metrics" else 1
        for port in range(listen.port, listen.port + span):
            if port in taken:
                raise ConfigError(f"{name}.listen: port {port} is also the {taken[port]} listener's")
            taken[port] = name


def check_admin_token(token: str | None) -> None:
    """The admin API's bearer secret, when set, must be hard to guess; raises `ConfigError` otherwise."""
    if token and len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError(
            f"{ADMIN_TOKEN_ENV}: at least {MIN_ADMIN_TOKEN_CHARS} characters are required (got {len(token)})"
        )


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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    return parse_settings(data)
