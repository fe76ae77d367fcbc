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
  first_enrollment_max_auth_age_seconds: 300   # a user's first credential needs a login this recent (0: off)
  secret_env: VERIFIER_WEBAUTHN_SECRET   # HMAC key for challenges and states
  storage: {sqlite_path: "/var/lib/verifier/webauthn.sqlite3"}
  demo: false                            # true: serve GET /v1/webauthn/demo (a same-origin test page; development)
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
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from verifier.config.base import ConfigError, Reader, read_fields, setting
from verifier.private_files import sqlite_problem

DEFAULT_RP_NAME = "edge-verifier"
# Seconds a challenge (step-up or registration) stays valid. WebAuthn Level 3 section 15.1 recommends
# 300 s for UV-required ceremonies at most; two minutes covers a PIN prompt and a slow tap.
DEFAULT_CHALLENGE_TIMEOUT_SECONDS = 120
MAX_CHALLENGE_TIMEOUT_SECONDS = 600  # seconds; a longer-lived challenge is a longer replay window
# Seconds the replicas' clocks may disagree by (they must agree within it; the issuers' default leeway): a used
# challenge or registration state is remembered until its expiry, and this long past it, so a replica whose clock
# lags the one that took it, and still sees it unexpired, refuses its replay. No check of ours allows a leeway
# on a challenge's expiry: this is all the margin, and at WebAuthn's human pace it costs the store next to nothing.
CLOCK_SKEW_SECONDS = 30
# Seconds: a user's first credential needs a login at most this old (auth_time, else iat). No assertion can be asked
# of a user with no credential, so without it a stolen token alone enrolls the thief's key, which then passes every
# step-up. Five minutes covers a login followed by the enrollment it was made for.
DEFAULT_FIRST_ENROLLMENT_MAX_AUTH_AGE_SECONDS = 300
MAX_FIRST_ENROLLMENT_MAX_AUTH_AGE_SECONDS = 86400
DEFAULT_SECRET_ENV = "VERIFIER_WEBAUTHN_SECRET"  # noqa: S105 - the variable's name, not a secret
MIN_SECRET_BYTES = 32  # an HMAC-SHA256 key shorter than its output is weaker than it looks
DEFAULT_SQLITE_PATH = "webauthn.sqlite3"
USER_VERIFICATION = ("required", "preferred", "discouraged")
ATTESTATION = ("none", "trusted_roots")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WebAuthnConfig:
    """The relying party as configured; built once at start-up (see the module docstring)."""

    rp_id: str = setting(doc="the registrable domain (WebAuthn Level 3 section 5.1.2), no scheme or port")
    rp_name: str = setting(DEFAULT_RP_NAME, doc="shown by the authenticator")
    origins: tuple[str, ...] = setting(doc="exact origins on rp_id whose clientDataJSON we accept (http: localhost)")
    user_verification: str = setting("required", choices=USER_VERIFICATION, doc="the UV flag policy")
    attestation: str = setting("none", choices=ATTESTATION, doc="trusted_roots: only authenticators those roots sign")
    trusted_roots_pem: tuple[str, ...] = setting((), doc="PEM roots accepted with attestation: trusted_roots")
    challenge_timeout_seconds: int = setting(
        DEFAULT_CHALLENGE_TIMEOUT_SECONDS,
        minimum=1,
        maximum=MAX_CHALLENGE_TIMEOUT_SECONDS,
        unit="seconds",
        doc="lifetime of a challenge or registration state",
    )
    first_enrollment_max_auth_age_seconds: int = setting(
        DEFAULT_FIRST_ENROLLMENT_MAX_AUTH_AGE_SECONDS,
        minimum=0,
        maximum=MAX_FIRST_ENROLLMENT_MAX_AUTH_AGE_SECONDS,
        unit="seconds",
        doc="a user's first credential needs a login (auth_time, else iat) at most this old; 0: a token alone",
    )
    secret_env: str = setting(
        DEFAULT_SECRET_ENV,
        doc=f"environment variable with the HMAC key ({MIN_SECRET_BYTES}+ bytes, same on every replica)",
    )
    secret: bytes = dataclasses.field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    secret_from_env: bool = False  # False: a per-process random key (single replica only)
    sqlite_path: str = setting(
        DEFAULT_SQLITE_PATH, key="storage.sqlite_path", doc="the credential registry (or :memory:)"
    )
    # Off unless asked for: a production deployment must not serve a test page (and its step-up echo) it never chose.
    demo: bool = setting(
        False, doc="serve GET /v1/webauthn/demo and its step-up echo (a same-origin test page, for development)"
    )

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
        if not 0 <= self.first_enrollment_max_auth_age_seconds <= MAX_FIRST_ENROLLMENT_MAX_AUTH_AGE_SECONDS:
            raise ValueError(
                f"first_enrollment_max_auth_age_seconds must lie in [0, {MAX_FIRST_ENROLLMENT_MAX_AUTH_AGE_SECONDS}]"
            )

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


def _registry_problem(sqlite_path: str) -> str:
    """Why the worker could not open the credential registry at `sqlite_path` (SQLite makes the file and its
    -wal/-shm beside it), or "": checked at load, so check-config, serve and SIGHUP refuse it by name instead
    of a worker crashing on it at every start."""
    if sqlite_path == ":memory:" or sqlite_path.startswith("file:"):
        return ""
    directory = os.path.dirname(os.path.abspath(sqlite_path))
    problem = sqlite_problem(sqlite_path)
    if problem:
        return problem
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory!r} (where {sqlite_path!r} lives) is not a writable directory"
    return ""


def parse_webauthn_config(data: Any, path: str = "webauthn") -> WebAuthnConfig:
    """Validates the `webauthn` mapping; problems are named by key (`verifier.config.base`)."""
    reader = Reader(data, path)
    rp_id = reader.text("rp_id").lower()
    if "/" in rp_id or ":" in rp_id:
        reader.problem("rp_id", "expected a domain name (no scheme, port or path)")
    origins: list[str] = []
    for i, origin in enumerate(reader.strings("origins")):
        if not _origin_ok(origin):
            reader.problem(
                f"origins[{i}]", "expected an origin such as https://app.example.com (http only for localhost)"
            )
        elif not _rp_id_fits(rp_id, origin):
            reader.problem(f"origins[{i}]", f"{origin!r} is not on rp_id {rp_id!r} or a subdomain of it")
        else:
            origins.append(origin.rstrip("/"))
    roots: list[str] = []
    for i, pem in enumerate(reader.strings("trusted_roots_pem", required=False)):
        try:
            x509.load_pem_x509_certificate(pem.encode())
            roots.append(pem)
        except ValueError:
            reader.problem(f"trusted_roots_pem[{i}]", "not a PEM certificate")
    secret_env = reader.text("secret_env", DEFAULT_SECRET_ENV)
    env_value = os.environ.get(secret_env, "")
    if env_value and len(env_value.encode()) < MIN_SECRET_BYTES:
        reader.problem("secret_env", f"environment variable {secret_env} must hold at least {MIN_SECRET_BYTES} bytes")
        env_value = ""
    storage = reader.child("storage") or Reader({}, f"{path}.storage")
    sqlite_path = storage.text("sqlite_path", DEFAULT_SQLITE_PATH)
    problem = _registry_problem(sqlite_path)
    if problem:
        storage.problem("sqlite_path", problem)
    storage.done()
    values = read_fields(
        reader,
        WebAuthnConfig,
        rp_id=rp_id,
        origins=tuple(origins),
        trusted_roots_pem=tuple(roots),
        secret_env=secret_env,
        sqlite_path=sqlite_path,
    )
    if values["attestation"] == "trusted_roots" and not roots:
        reader.problem("trusted_roots_pem", "required (non-empty) when attestation is trusted_roots")
    reader.done()
    secret = env_value.encode() if env_value else secrets.token_bytes(32)
    try:
        return WebAuthnConfig(**values, secret=secret, secret_from_env=bool(env_value))
    except ValueError as exc:  # only after a problem was recorded above (check-config goes on reading)
        raise ConfigError(f"{path}: {exc}") from exc
