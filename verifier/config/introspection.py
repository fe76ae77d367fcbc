"""Per-issuer settings for RFC 7662 token introspection, validated once at start-up.

Client authentication follows RFC 6749 section 2.3.1 (`client_secret_basic`, `client_secret_post`) and
RFC 7523 section 2.2 / OIDC Core section 9 (`private_key_jwt`). Secrets never live in the settings
file: it names an environment variable (or a PEM file) and the value is read here, at parse time, so
a missing secret stops start-up instead of the first request.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from verifier.config.base import ConfigError, check_url

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

DEFAULT_TIMEOUT_SECONDS = 2.0  # seconds per provider call, queueing included: a request waits at most this
DEFAULT_MAX_IN_FLIGHT = 32  # concurrent calls to one provider: enough for a burst, too few to flatten it
DEFAULT_BATCH_WINDOW_SECONDS = 0.001  # 1 ms: long enough to gather a burst, short next to a round trip
DEFAULT_MAX_BATCH_SIZE = 64  # tokens per dispatch; a full batch is sent at once without waiting the window
DEFAULT_POSITIVE_TTL_SECONDS = 60.0  # an active answer is reused this long at most (bounds revocation lag)
DEFAULT_NEGATIVE_TTL_SECONDS = 10.0  # an inactive answer is reused this long (garbage floods cost nothing)
DEFAULT_POSITIVE_ENTRIES = 100_000  # active answers kept per issuer (bounded memory)
DEFAULT_NEGATIVE_ENTRIES = 100_000  # inactive answers kept per issuer
DEFAULT_STALE_TTL_SECONDS = 300.0  # with serve_stale_on_error: how long past freshness an answer may serve
DEFAULT_BREAKER_FAILURES = 5  # consecutive failed calls that open the circuit
DEFAULT_BREAKER_COOLDOWN_SECONDS = 5.0  # seconds the circuit stays open before one probe is let through
DEFAULT_ASSERTION_TTL_SECONDS = 60  # seconds a private_key_jwt client assertion is valid (RFC 7523 3)
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024  # one introspection answer; larger is malformed, not an identity


class ClientAuth(enum.Enum):
    """How the verifier authenticates to the introspection endpoint."""

    # Method names, not secrets (hence the noqa).
    CLIENT_SECRET_BASIC = "client_secret_basic"  # noqa: S105  RFC 6749 2.3.1, HTTP Basic
    CLIENT_SECRET_POST = "client_secret_post"  # noqa: S105  RFC 6749 2.3.1, secret in the form body
    PRIVATE_KEY_JWT = "private_key_jwt"  # RFC 7523 2.2, a signed client assertion per call


@dataclasses.dataclass(frozen=True, kw_only=True)
class IntrospectionConfig:
    """Introspection for one issuer. Secrets are already resolved and kept out of `repr`."""

    client_id: str
    client_auth: ClientAuth = ClientAuth.CLIENT_SECRET_BASIC
    client_secret: str = dataclasses.field(default="", repr=False)  # read from client_secret_env
    client_secret_env: str = ""  # the environment variable that held it (for messages)
    private_key: SigningKey | None = dataclasses.field(default=None, repr=False, compare=False)
    assertion_alg: str = ""  # private_key_jwt: ES256, RS256 or EdDSA (derived from the key)
    assertion_ttl_seconds: int = DEFAULT_ASSERTION_TTL_SECONDS
    endpoint: str = ""  # empty: `introspection_endpoint` from discovery
    batch_endpoint: str = ""  # a multi-token endpoint (see introspection_client); empty: one POST per token
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    batch_window_seconds: float = DEFAULT_BATCH_WINDOW_SECONDS
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    positive_ttl_seconds: float = DEFAULT_POSITIVE_TTL_SECONDS
    negative_ttl_seconds: float = DEFAULT_NEGATIVE_TTL_SECONDS
    positive_entries: int = DEFAULT_POSITIVE_ENTRIES
    negative_entries: int = DEFAULT_NEGATIVE_ENTRIES
    serve_stale_on_error: bool = False  # provider down: answer from a still-valid cached active result
    stale_ttl_seconds: float = DEFAULT_STALE_TTL_SECONDS
    require_audience: bool = True  # an answer without `aud` is refused (RFC 7662 makes it optional)
    # Opaque tokens name no issuer: at most one issuer may take them (else one provider would see
    # another's bearer tokens). false: only this issuer's own JWTs are introspected (introspect_jwts).
    opaque_tokens: bool = True
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_cooldown_seconds: float = DEFAULT_BREAKER_COOLDOWN_SECONDS


_KEYS = frozenset(
    {
        "client_id",
        "client_auth",
        "client_secret_env",
        "private_key_file",
        "private_key_env",
        "endpoint",
        "batch_endpoint",
        "timeout_seconds",
        "max_in_flight",
        "batch_window_seconds",
        "max_batch_size",
        "positive_ttl_seconds",
        "negative_ttl_seconds",
        "positive_entries",
        "negative_entries",
        "serve_stale_on_error",
        "stale_ttl_seconds",
        "require_audience",
        "opaque_tokens",
        "breaker_failures",
        "breaker_cooldown_seconds",
        "assertion_ttl_seconds",
    }
)


class _Fields:
    """Typed reads from one mapping; every error names `path.key`."""

    def __init__(self, data: Mapping[str, Any], path: str, *, allow_insecure_http: bool = False) -> None:
        self.data = data
        self.path = path
        self.allow_insecure_http = allow_insecure_http  # the issuer's permission for loopback http

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def text(self, name: str, default: str | None = None) -> str:
        value = self.data.get(name)
        if value is None:
            if default is None:
                raise ConfigError(f"{self.key(name)}: required")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.key(name)}: expected a non-empty string")
        return value

    def number(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.key(name)}: expected a number")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self.key(name)}: {value} is outside [{minimum}, {maximum}]")
        return float(value)

    def integer(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.key(name)}: expected an integer")
        if not minimum <= value <= maximum:
            raise ConfigError(f"{self.key(name)}: {value} is outside [{minimum}, {maximum}]")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false")
        return value

    def env(self, name: str) -> str:
        """The value of the environment variable named by key `name` (read now, at parse time)."""
        variable = self.text(name)
        value = os.environ.get(variable)
        if not value:
            raise ConfigError(f"{self.key(name)}: environment variable {variable} is not set")
        return value

    def url(self, name: str) -> str:
        url = self.text(name, "")
        if url:
            check_url(url, self.key(name), "endpoint", allow_insecure_http=self.allow_insecure_http)
        return url


def _load_key(pem: bytes, key: str) -> tuple[SigningKey, str]:
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{key}: not an unencrypted PEM private key") from exc
    if isinstance(private, ec.EllipticCurvePrivateKey):
        algs = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        alg = algs.get(private.curve.name)
        if alg is None:
            raise ConfigError(f"{key}: unsupported EC curve {private.curve.name}")
        return private, alg
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < 2048:
            raise ConfigError(f"{key}: RSA keys must have at least 2048 bits")
        return private, "RS256"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private, "EdDSA"
    raise ConfigError(f"{key}: unsupported key type {type(private).__name__}")


def parse_introspection_config(
    data: Mapping[str, Any], path: str, *, allow_insecure_http: bool = False
) -> IntrospectionConfig:
    """Validates one issuer's `introspection:` mapping, reading the secrets it names from the environment.

    Raises `ConfigError` naming the key (`issuers[0].introspection.client_auth: ...`).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}: unknown key")
    f = _Fields(data, path, allow_insecure_http=allow_insecure_http)
    client_id = f.text("client_id")
    auth_text = f.text("client_auth", ClientAuth.CLIENT_SECRET_BASIC.value)
    try:
        client_auth = ClientAuth(auth_text)
    except ValueError:
        choices = ", ".join(a.value for a in ClientAuth)
        raise ConfigError(f"{f.key('client_auth')}: {auth_text!r} is not one of {choices}") from None

    secret = ""
    private_key: SigningKey | None = None
    alg = ""
    if client_auth is ClientAuth.PRIVATE_KEY_JWT:
        if "client_secret_env" in data:
            raise ConfigError(f"{f.key('client_secret_env')}: not used with private_key_jwt")
        sources = [name for name in ("private_key_file", "private_key_env") if name in data]
        if len(sources) != 1:
            raise ConfigError(
                f"{f.key('private_key_file')}: private_key_jwt needs one of private_key_file, private_key_env"
            )
        if sources[0] == "private_key_file":
            file = f.text("private_key_file")
            try:
                pem = Path(file).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{f.key('private_key_file')}: cannot read {file} ({exc.strerror})") from exc
        else:
            pem = f.env("private_key_env").encode()
        private_key, alg = _load_key(pem, f.key(sources[0]))
    else:
        for name in ("private_key_file", "private_key_env"):
            if name in data:
                raise ConfigError(f"{f.key(name)}: only used with private_key_jwt")
        secret = f.env("client_secret_env")

    config = IntrospectionConfig(
        client_id=client_id,
        client_auth=client_auth,
        client_secret=secret,
        client_secret_env=f.text("client_secret_env", ""),
        private_key=private_key,
        assertion_alg=alg,
        assertion_ttl_seconds=f.integer("assertion_ttl_seconds", DEFAULT_ASSERTION_TTL_SECONDS, minimum=5, maximum=600),
        endpoint=f.url("endpoint"),
        batch_endpoint=f.url("batch_endpoint"),
        timeout_seconds=f.number("timeout_seconds", DEFAULT_TIMEOUT_SECONDS, minimum=0.01, maximum=60),
        max_in_flight=f.integer("max_in_flight", DEFAULT_MAX_IN_FLIGHT, minimum=1, maximum=10_000),
        batch_window_seconds=f.number("batch_window_seconds", DEFAULT_BATCH_WINDOW_SECONDS, minimum=0, maximum=0.1),
        max_batch_size=f.integer("max_batch_size", DEFAULT_MAX_BATCH_SIZE, minimum=1, maximum=1000),
        positive_ttl_seconds=f.number("positive_ttl_seconds", DEFAULT_POSITIVE_TTL_SECONDS, minimum=0, maximum=86_400),
        negative_ttl_seconds=f.number("negative_ttl_seconds", DEFAULT_NEGATIVE_TTL_SECONDS, minimum=0, maximum=3600),
        positive_entries=f.integer("positive_entries", DEFAULT_POSITIVE_ENTRIES, minimum=0, maximum=10_000_000),
        negative_entries=f.integer("negative_entries", DEFAULT_NEGATIVE_ENTRIES, minimum=0, maximum=10_000_000),
        serve_stale_on_error=f.boolean("serve_stale_on_error", False),
        stale_ttl_seconds=f.number("stale_ttl_seconds", DEFAULT_STALE_TTL_SECONDS, minimum=0, maximum=86_400),
        require_audience=f.boolean("require_audience", True),
        opaque_tokens=f.boolean("opaque_tokens", True),
        breaker_failures=f.integer("breaker_failures", DEFAULT_BREAKER_FAILURES, minimum=1, maximum=1000),
        breaker_cooldown_seconds=f.number(
            "breaker_cooldown_seconds", DEFAULT_BREAKER_COOLDOWN_SECONDS, minimum=0.1, maximum=600
        ),
    )
    return config
