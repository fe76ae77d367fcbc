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

from verifier.config.base import ConfigError, Reader, check_url, read_fields, setting

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

DEFAULT_TIMEOUT_SECONDS = 2.0  # seconds per provider call, queueing included: a request waits at most this
DEFAULT_MAX_IN_FLIGHT = 32  # concurrent calls to one provider: enough for a burst, too few to flatten it
DEFAULT_BATCH_WINDOW_SECONDS = 0.001  # batch endpoint: 1 ms gathers a burst, short next to a round trip
DEFAULT_MAX_BATCH_SIZE = 64  # tokens per batch call; a full batch is sent at once without waiting the window
# Batch calls under way at once before new tokens gather for the next (group commit): below it a token goes after the
# window, at it the tokens gather for a quarter of a call's recent duration (at most 25 ms) and go together. So
# batching adds at most a quarter of the provider's own latency, and nothing at a low rate. #24 goal 7, measured
# against a 20 ms provider at 1,000 tokens/s: 4 gives ~5.4 tokens a call and 0.65-0.81x the CPU per token of one POST
# per token, p99 +5-6 ms; 8 gives ~2.8 tokens a call, 0.85-0.94x, p99 +2-3 ms (docs/BENCHMARKS.md).
DEFAULT_MAX_BATCHES_IN_FLIGHT = 4
DEFAULT_POSITIVE_TTL_SECONDS = 60.0  # an active answer is reused this long at most (bounds revocation lag)
DEFAULT_NEGATIVE_TTL_SECONDS = 10.0  # an inactive or refused answer is reused this long (garbage floods cost nothing)
DEFAULT_POSITIVE_ENTRIES = 100_000  # active answers kept per issuer (bounded memory)
DEFAULT_NEGATIVE_ENTRIES = 100_000  # inactive or refused answers kept per issuer
DEFAULT_STALE_TTL_SECONDS = 300.0  # with serve_stale_on_error: how long past freshness an answer may serve
DEFAULT_BREAKER_FAILURES = 5  # consecutive failed calls that open the circuit
DEFAULT_BREAKER_COOLDOWN_SECONDS = 5.0  # seconds the circuit stays open before one probe is let through
# Failures open the circuit only when no call has succeeded for this long (a fresh worker: since its first call): a
# provider answering other tokens is up, whatever some tokens make it do (an attacker's stream of failing tokens
# cannot open it for everyone, on a fresh worker either).
DEFAULT_BREAKER_SUCCESS_WINDOW_SECONDS = DEFAULT_TIMEOUT_SECONDS
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

    client_id: str = setting(doc="the verifier's client id at the introspection endpoint")
    client_auth: ClientAuth = ClientAuth.CLIENT_SECRET_BASIC  # read by the section (an enum with its own message)
    client_secret: str = dataclasses.field(default="", repr=False)  # read from client_secret_env
    client_secret_env: str = ""  # the environment variable that held it (for messages)
    private_key: SigningKey | None = dataclasses.field(default=None, repr=False, compare=False)
    private_key_file: str = ""  # the file `private_key` was read from, if any (its mode: verifier.private_files)
    assertion_alg: str = ""  # private_key_jwt: ES256, RS256 or EdDSA (derived from the key)
    assertion_ttl_seconds: int = setting(
        DEFAULT_ASSERTION_TTL_SECONDS,
        doc="private_key_jwt: lifetime of a client assertion",
        minimum=5,
        maximum=600,
        unit="seconds",
    )
    endpoint: str = setting("", doc="empty: `introspection_endpoint` from discovery")
    batch_endpoint: str = setting(
        "", doc="a multi-token endpoint; empty: the provider's `introspection_batch_endpoint`, else one POST per token"
    )
    batch: bool = setting(True, doc="false: one POST per token even where discovery names a batch endpoint")
    timeout_seconds: float = setting(
        DEFAULT_TIMEOUT_SECONDS, doc="per provider call, queueing included", minimum=0.01, maximum=60, unit="seconds"
    )
    max_in_flight: int = setting(
        DEFAULT_MAX_IN_FLIGHT, doc="concurrent calls to the provider", minimum=1, maximum=10_000
    )
    batch_window_seconds: float = setting(
        DEFAULT_BATCH_WINDOW_SECONDS,
        doc="with batch_endpoint: how long a burst is gathered into one call",
        minimum=0,
        maximum=0.1,
        unit="seconds",
    )
    max_batch_size: int = setting(
        DEFAULT_MAX_BATCH_SIZE, doc="with batch_endpoint: tokens per call", minimum=1, maximum=1000
    )
    max_batches_in_flight: int = setting(
        DEFAULT_MAX_BATCHES_IN_FLIGHT,
        doc="with batch_endpoint: batch calls under way before tokens gather for the next (a full batch goes at once)",
        minimum=1,
        maximum=10_000,
    )
    positive_ttl_seconds: float = setting(
        DEFAULT_POSITIVE_TTL_SECONDS,
        doc="an active answer is reused this long at most",
        minimum=0,
        maximum=86_400,
        unit="seconds",
    )
    negative_ttl_seconds: float = setting(
        DEFAULT_NEGATIVE_TTL_SECONDS,
        doc="an inactive or refused answer (another kind of token, malformed) is reused this long",
        minimum=0,
        maximum=3600,
        unit="seconds",
    )
    positive_entries: int = setting(
        DEFAULT_POSITIVE_ENTRIES, doc="active answers kept", minimum=0, maximum=10_000_000, unit="entries"
    )
    negative_entries: int = setting(
        DEFAULT_NEGATIVE_ENTRIES, doc="inactive or refused answers kept", minimum=0, maximum=10_000_000, unit="entries"
    )
    serve_stale_on_error: bool = setting(False, doc="provider down: answer from a still-valid cached active result")
    stale_ttl_seconds: float = setting(
        DEFAULT_STALE_TTL_SECONDS,
        doc="with serve_stale_on_error: how long past freshness an answer may serve",
        minimum=0,
        maximum=86_400,
        unit="seconds",
    )
    require_audience: bool = setting(
        True,
        doc="an answer without `aud` is refused (RFC 7662 makes it optional); false: it must name an access token "
        "`token_type` (a malformed `aud` is refused either way)",
    )
    # Opaque tokens name no issuer: one issuer may take them, or several when every route trusts one
    # (else one provider would see another's bearer tokens). false: only this issuer's own JWTs are
    # introspected (introspect_jwts).
    opaque_tokens: bool = setting(
        True, doc="this issuer takes opaque tokens (one issuer, or one per route: policies' issuers_any)"
    )
    breaker_failures: int = setting(
        DEFAULT_BREAKER_FAILURES, doc="consecutive failed calls that open the circuit", minimum=1, maximum=1000
    )
    breaker_cooldown_seconds: float = setting(
        DEFAULT_BREAKER_COOLDOWN_SECONDS,
        doc="the circuit stays open this long before one probe",
        minimum=0.1,
        maximum=600,
        unit="seconds",
    )
    breaker_success_window_seconds: float = setting(
        DEFAULT_BREAKER_SUCCESS_WINDOW_SECONDS,
        doc="failures open the circuit only when no call succeeded for this long (before any did: since the first "
        "call; 0: the count alone)",
        minimum=0,
        maximum=600,
        unit="seconds",
    )


def _env(reader: Reader, name: str) -> str:
    """The value of the environment variable named by key `name` (read now, at parse time)."""
    variable = reader.text(name)
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"{reader._key(name)}: environment variable {variable} is not set")
    return value


def _url(reader: Reader, name: str, value: str, allow_insecure_http: bool) -> str:
    if value:
        check_url(value, reader._key(name), "endpoint", allow_insecure_http=allow_insecure_http)
    return value


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
    f = Reader(data, path)  # refuses a non-mapping, naming `path`
    client_id = f.text("client_id")
    auth_text = f.text("client_auth", ClientAuth.CLIENT_SECRET_BASIC.value)
    try:
        client_auth = ClientAuth(auth_text)
    except ValueError:
        choices = ", ".join(a.value for a in ClientAuth)
        raise ConfigError(f"{f._key('client_auth')}: {auth_text!r} is not one of {choices}") from None

    secret = ""
    private_key: SigningKey | None = None
    key_file = ""
    alg = ""
    if client_auth is ClientAuth.PRIVATE_KEY_JWT:
        if f.has("client_secret_env"):
            raise ConfigError(f"{f._key('client_secret_env')}: not used with private_key_jwt")
        sources = [name for name in ("private_key_file", "private_key_env") if f.has(name)]
        if len(sources) != 1:
            raise ConfigError(
                f"{f._key('private_key_file')}: private_key_jwt needs one of private_key_file, private_key_env"
            )
        if sources[0] == "private_key_file":
            file = key_file = f.text("private_key_file")
            try:
                pem = Path(file).read_bytes()
            except OSError as exc:
                raise ConfigError(f"{f._key('private_key_file')}: cannot read {file} ({exc.strerror})") from exc
        else:
            pem = _env(f, "private_key_env").encode()
        private_key, alg = _load_key(pem, f._key(sources[0]))
    else:
        for name in ("private_key_file", "private_key_env"):
            if f.has(name):
                raise ConfigError(f"{f._key(name)}: only used with private_key_jwt")
        secret = _env(f, "client_secret_env")

    client_secret_env = f.text("client_secret_env", "")
    fields = read_fields(f, IntrospectionConfig, client_id=client_id)
    fields["endpoint"] = _url(f, "endpoint", fields["endpoint"], allow_insecure_http)
    fields["batch_endpoint"] = _url(f, "batch_endpoint", fields["batch_endpoint"], allow_insecure_http)
    if fields["batch_endpoint"] and not fields["batch"]:
        raise ConfigError(f"{f._key('batch')}: false, with a batch_endpoint set: drop one of them")
    f.done()
    return IntrospectionConfig(
        **fields,
        client_auth=client_auth,
        client_secret=secret,
        client_secret_env=client_secret_env,
        private_key=private_key,
        private_key_file=key_file,
        assertion_alg=alg,
    )
