"""The `webauthn` settings: relying party, origins, attestation policy, secrets and storage.

```yaml
webauthn:
  rp_id: "localhost"                     # WebAuthn Level 3 section 5.1.2: the registrable domain
  rp_name: "Example API"
  origins: ["http://localhost:9555"]     # exact origins whose clientDataJSON we accept
  user_verification: required            # required | preferred | discouraged
  attestation: none                      # none | trusted_roots
  trusted_roots_pem: ["-----BEGIN CERTIFICATE-----..."]   # with trusted_roots: the accepted roots
  challenge_timeout_seconds: 120         # lifetime of a challenge (and of a registration state)
  secret_env: VERIFIER_WEBAUTHN_SECRET   # HMAC key for challenges and states
  storage: {sqlite_path: "/var/lib/verifier/webauthn.sqlite3"}
  demo: true                             # serve GET /v1/webauthn/demo (a same-origin test page)
```

The secret signs every challenge and registration state. When `secret_env` names an unset variable
(or is absent) a random key is drawn per process: fine for one replica, but behind a load balancer
every replica must share the same key (set the variable to at least 32 random bytes on all of them),
or a challenge issued by one replica is refused by the next.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from verifier.config.base import ConfigError

DEFAULT_RP_NAME = "edge-verifier"
# Seconds a challenge (step-up or registration) stays valid. WebAuthn Level 3 section 15.1 recommends
# 300 s for UV-required ceremonies at most; two minutes covers a PIN prompt and a slow tap.
DEFAULT_CHALLENGE_TIMEOUT_SECONDS = 120
MAX_CHALLENGE_TIMEOUT_SECONDS = 600  # seconds; a longer-lived challenge is a longer replay window
DEFAULT_SECRET_ENV = "VERIFIER_WEBAUTHN_SECRET"  # noqa: S105 - the variable's name, not a secret
MIN_SECRET_BYTES = 32  # an HMAC-SHA256 key shorter than its output is weaker than it looks
DEFAULT_SQLITE_PATH = "webauthn.sqlite3"
USER_VERIFICATION = ("required", "preferred", "discouraged")
ATTESTATION = ("none", "trusted_roots")
_KEYS = (
    "rp_id",
    "rp_name",
    "origins",
    "user_verification",
    "attestation",
    "trusted_roots_pem",
    "challenge_timeout_seconds",
    "secret_env",
    "storage",
    "demo",
)
_STORAGE_KEYS = ("sqlite_path",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebAuthnConfig:
    """The relying party as configured; built once at start-up (see the module docstring)."""

    rp_id: str
    rp_name: str = DEFAULT_RP_NAME
    origins: tuple[str, ...]
    user_verification: str = "required"
    attestation: str = "none"
    trusted_roots_pem: tuple[str, ...] = ()
    challenge_timeout_seconds: int = DEFAULT_CHALLENGE_TIMEOUT_SECONDS
    secret: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    secret_from_env: bool = False  # False: a per-process random key (single replica only)
    sqlite_path: str = DEFAULT_SQLITE_PATH
    demo: bool = True

    def __post_init__(self) -> None:
        if not self.rp_id:
            raise ValueError("rp_id must not be empty")
        if not self.origins:
            raise ValueError("at least one origin is required")
        if self.user_verification not in USER_VERIFICATION:
            raise ValueError(f"user_verification must be one of {', '.join(USER_VERIFICATION)}")
        if self.attestation not in ATTESTATION:
            raise ValueError(f"attestation must be one of {', '.join(ATTESTATION)}")
        if self.attestation == "trusted_roots" and not self.trusted_roots_pem:
            raise ValueError("attestation trusted_roots needs trusted_roots_pem")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the secret must hold at least {MIN_SECRET_BYTES} bytes")
        if not 1 <= self.challenge_timeout_seconds <= MAX_CHALLENGE_TIMEOUT_SECONDS:
            raise ValueError(f"challenge_timeout_seconds must lie in [1, {MAX_CHALLENGE_TIMEOUT_SECONDS}]")

    @property
    def user_verification_required(self) -> bool:
        """Whether the UV flag is required on registrations and assertions."""
        return self.user_verification == "required"

    @property
    def timeout_ms(self) -> int:
        """The ceremony timeout in milliseconds, the unit of WebAuthn's `timeout` member."""
        return self.challenge_timeout_seconds * 1000


def _origin_ok(origin: str) -> bool:
    parts = urlsplit(origin)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return False
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        return False
    # WebAuthn needs a secure context: http only for localhost (Level 3 section 13.4.9 / secure contexts).
    return (
        parts.scheme == "https"
        or parts.hostname in ("localhost", "127.0.0.1", "::1")
        or parts.hostname.endswith(".localhost")
    )


def _rp_id_fits(rp_id: str, origin: str) -> bool:
    host = (urlsplit(origin).hostname or "").lower()
    return host == rp_id or host.endswith("." + rp_id)


def parse_webauthn_config(data: Any, path: str = "webauthn") -> WebAuthnConfig:
    """Validates the `webauthn` mapping; raises `ConfigError` naming the key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in _KEYS:
            raise ConfigError(f"{path}.{key}: unknown key")

    def text(key: str, default: str | None = None) -> str:
        value = data.get(key, default)
        if value is None:
            raise ConfigError(f"{path}.{key}: required")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}.{key}: expected a non-empty string")
        return value

    def choice(key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = text(key, default)
        if value not in allowed:
            raise ConfigError(f"{path}.{key}: expected one of {', '.join(allowed)}")
        return value

    rp_id = text("rp_id").lower()
    if "/" in rp_id or ":" in rp_id:
        raise ConfigError(f"{path}.rp_id: expected a domain name (no scheme, port or path)")
    raw_origins = data.get("origins")
    if not isinstance(raw_origins, list) or not raw_origins:
        raise ConfigError(f"{path}.origins: expected a non-empty list of origins")
    origins: list[str] = []
    for i, origin in enumerate(raw_origins):
        if not isinstance(origin, str) or not _origin_ok(origin):
            raise ConfigError(
                f"{path}.origins[{i}]: expected an origin such as https://app.example.com (http only for localhost)"
            )
        if not _rp_id_fits(rp_id, origin):
            raise ConfigError(f"{path}.origins[{i}]: {origin!r} is not on rp_id {rp_id!r} or a subdomain of it")
        origins.append(origin.rstrip("/"))
    attestation = choice("attestation", "none", ATTESTATION)
    roots: list[str] = []
    raw_roots = data.get("trusted_roots_pem")
    if raw_roots is not None:
        if not isinstance(raw_roots, list):
            raise ConfigError(f"{path}.trusted_roots_pem: expected a list of PEM certificates")
        for i, pem in enumerate(raw_roots):
            if not isinstance(pem, str):
                raise ConfigError(f"{path}.trusted_roots_pem[{i}]: expected a PEM certificate")
            try:
                x509.load_pem_x509_certificate(pem.encode())
            except ValueError as exc:
                raise ConfigError(f"{path}.trusted_roots_pem[{i}]: not a PEM certificate") from exc
            roots.append(pem)
    if attestation == "trusted_roots" and not roots:
        raise ConfigError(f"{path}.trusted_roots_pem: required (non-empty) when attestation is trusted_roots")
    timeout = data.get("challenge_timeout_seconds", DEFAULT_CHALLENGE_TIMEOUT_SECONDS)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= MAX_CHALLENGE_TIMEOUT_SECONDS:
        raise ConfigError(
            f"{path}.challenge_timeout_seconds: expected an integer in [1, {MAX_CHALLENGE_TIMEOUT_SECONDS}]"
        )
    secret_env = text("secret_env", DEFAULT_SECRET_ENV)
    env_value = os.environ.get(secret_env, "")
    if env_value and len(env_value.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"{path}.secret_env: environment variable {secret_env} must hold at least {MIN_SECRET_BYTES} bytes"
        )
    secret = env_value.encode() if env_value else secrets.token_bytes(32)
    storage = data.get("storage", {})
    if not isinstance(storage, Mapping):
        raise ConfigError(f"{path}.storage: expected a mapping")
    for key in storage:
        if key not in _STORAGE_KEYS:
            raise ConfigError(f"{path}.storage.{key}: unknown key")
    sqlite_path = storage.get("sqlite_path", DEFAULT_SQLITE_PATH)
    if not isinstance(sqlite_path, str) or not sqlite_path:
        raise ConfigError(f"{path}.storage.sqlite_path: expected a file path (or :memory:)")
    demo = data.get("demo", True)
    if not isinstance(demo, bool):
        raise ConfigError(f"{path}.demo: expected true or false")
    return WebAuthnConfig(
        rp_id=rp_id,
        rp_name=text("rp_name", DEFAULT_RP_NAME),
        origins=tuple(origins),
        user_verification=choice("user_verification", "required", USER_VERIFICATION),
        attestation=attestation,
        trusted_roots_pem=tuple(roots),
        challenge_timeout_seconds=timeout,
        secret=secret,
        secret_from_env=bool(env_value),
        sqlite_path=sqlite_path,
        demo=demo,
    )
