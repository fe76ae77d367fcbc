"""The `revocation` settings section: SSF transmitters to trust, and how long an entry can matter.

```yaml
revocation:
  max_token_lifetime_seconds: 86400      # the longest any accepted token lives; bounds every entry
  resync_interval_seconds: 30            # full reload from the store (Redis) on top of pub/sub
  transmitters:
    - issuer: "https://idp.example.test"          # the SETs' `iss`; metadata under /.well-known/ssf-configuration
      audience: "https://verifier.example.test"   # the `aud` the transmitter puts in SETs for us
      delivery: push                     # push (RFC 8935, POST /v1/ssf/events) or poll (RFC 8936)
      algorithms: [ES256, RS256, EdDSA]  # allow-list, pinned to the key type as for access tokens
      max_age_seconds: 300               # a SET whose `iat` is older is refused (and its jti forgotten)
      subjects_of: ["https://idp.example.test"]   # configured issuers whose users its events may touch
                                         # (default: its own `issuer`, when the provider transmits itself)
      # poll only: poll_interval_seconds (10), poll_endpoint_url (else the metadata's poll delivery),
      #            poll_authorization_env (env var holding a bearer token for the poll endpoint),
      #            max_events (100)
      # optional: discovery_url, jwks_uri, fetch_timeout_seconds (5), leeway_seconds (30)
```
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from verifier.settings import (
    DEFAULT_FETCH_TIMEOUT_SECONDS,
    DEFAULT_LEEWAY_SECONDS,
    SUPPORTED_ALGORITHMS,
    ConfigError,
    IssuerSettings,
    check_url,
)

PUSH = "push"
POLL = "poll"
DELIVERY_POLL_URN = "urn:ietf:rfc:8936"  # SSF 1.0 section 6.1.2
DEFAULT_MAX_TOKEN_LIFETIME_SECONDS = 86_400  # seconds; a day covers access and most refresh-bound tokens
MAX_MAX_TOKEN_LIFETIME_SECONDS = 90 * 86_400  # seconds; beyond this entries would pile up for months
DEFAULT_MAX_AGE_SECONDS = 300  # seconds a SET may take from signing to us (retries included)
DEFAULT_POLL_INTERVAL_SECONDS = 10.0  # seconds between polls when the transmitter had nothing more
DEFAULT_MAX_EVENTS = 100  # SETs asked for per poll (RFC 8936 section 2.4 maxEvents)
DEFAULT_RESYNC_INTERVAL_SECONDS = 30.0  # seconds between full reloads; pub/sub carries changes in between
_TRANSMITTER_KEYS = (
    "issuer",
    "audience",
    "delivery",
    "algorithms",
    "max_age_seconds",
    "poll_interval_seconds",
    "poll_endpoint_url",
    "poll_authorization_env",
    "max_events",
    "discovery_url",
    "jwks_uri",
    "fetch_timeout_seconds",
    "leeway_seconds",
    "subjects_of",
    "allow_insecure_http",
)
_KEYS = ("transmitters", "max_token_lifetime_seconds", "resync_interval_seconds")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TransmitterConfig:
    """One trusted SSF transmitter."""

    issuer: str  # exact `iss` of its SETs
    audience: str  # the `aud` its SETs must carry
    delivery: str  # PUSH or POLL
    algorithms: tuple[str, ...]
    max_age_seconds: int = DEFAULT_MAX_AGE_SECONDS
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS  # clock skew tolerated on a SET's `iat`
    poll_interval_seconds: float = DEFAULT_POLL_INTERVAL_SECONDS
    poll_endpoint_url: str = ""  # empty: read from the transmitter's metadata
    poll_token: str | None = dataclasses.field(default=None, repr=False)  # read from poll_authorization_env
    max_events: int = DEFAULT_MAX_EVENTS
    discovery_url: str = ""  # default: SSF 1.0 section 7.2.1 well-known location under `issuer`
    jwks_uri: str = ""  # set to skip discovery (then poll needs poll_endpoint_url)
    fetch_timeout_seconds: float = DEFAULT_FETCH_TIMEOUT_SECONDS
    # The configured issuers whose subjects its events may touch (empty: its own `issuer`). An event
    # about anyone else is acknowledged and ignored: one provider's transmitter cannot sign out (or
    # change the claims of) another provider's users.
    subjects_of: tuple[str, ...] = ()

    @property
    def scope(self) -> tuple[str, ...]:
        """The issuers whose subjects this transmitter speaks for."""
        return self.subjects_of or (self.issuer,)

    @property
    def discovery(self) -> str:
        """SSF 1.0 section 7.2.1: `/.well-known/ssf-configuration` goes between host and path."""
        if self.discovery_url:
            return self.discovery_url
        parts = urlsplit(self.issuer)
        path = parts.path.rstrip("/")
        return f"{parts.scheme}://{parts.netloc}/.well-known/ssf-configuration{path}"

    def key_settings(self) -> IssuerSettings:
        """Settings under which `IssuerKeys` finds and refreshes this transmitter's keys."""
        return IssuerSettings(
            issuer=self.issuer,
            audiences=(self.audience,),
            algorithms=self.algorithms,
            discovery_url=self.discovery,
            jwks_uri=self.jwks_uri,
            fetch_timeout_seconds=self.fetch_timeout_seconds,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RevocationConfig:
    """The revocation section: transmitters and the lifetime bound on every entry."""

    transmitters: tuple[TransmitterConfig, ...] = ()
    max_token_lifetime_seconds: int = DEFAULT_MAX_TOKEN_LIFETIME_SECONDS
    resync_interval_seconds: float = DEFAULT_RESYNC_INTERVAL_SECONDS


def _mapping(data: Any, path: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}: unknown key")
    return data


def _text(data: Mapping[str, Any], key: str, path: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if value is None:
        raise ConfigError(f"{path}.{key}: required")
    if not isinstance(value, str) or (not value and default is None):
        raise ConfigError(f"{path}.{key}: expected a non-empty string")
    return value


def _number(data: Mapping[str, Any], key: str, path: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{path}.{key}: expected a number")
    if not low <= value <= high:
        raise ConfigError(f"{path}.{key}: {value} is outside [{low}, {high}]")
    return float(value)


def _integer(data: Mapping[str, Any], key: str, path: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}.{key}: expected an integer")
    if not low <= value <= high:
        raise ConfigError(f"{path}.{key}: {value} is outside [{low}, {high}]")
    return value


def _transmitter(data: Any, path: str) -> TransmitterConfig:
    raw = _mapping(data, path, _TRANSMITTER_KEYS)
    issuer = _text(raw, "issuer", path)
    insecure = raw.get("allow_insecure_http", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"{path}.allow_insecure_http: expected true or false")
    check_url(issuer, f"{path}.issuer", "transmitter", allow_insecure_http=insecure)
    audience = _text(raw, "audience", path)
    delivery = _text(raw, "delivery", path, PUSH)
    if delivery not in (PUSH, POLL):
        raise ConfigError(f"{path}.delivery: expected push or poll")
    algorithms = raw.get("algorithms", ["ES256", "RS256", "EdDSA"])
    if not isinstance(algorithms, list) or not algorithms:
        raise ConfigError(f"{path}.algorithms: expected a non-empty list of strings")
    for i, alg in enumerate(algorithms):
        if alg not in SUPPORTED_ALGORITHMS:
            raise ConfigError(f"{path}.algorithms[{i}]: unsupported algorithm {alg!r}")
    for key in ("discovery_url", "jwks_uri", "poll_endpoint_url"):
        if raw.get(key) is not None:
            check_url(_text(raw, key, path), f"{path}.{key}", "transmitter", allow_insecure_http=insecure)
    poll_token: str | None = None
    env = raw.get("poll_authorization_env")
    if env is not None:
        env = _text(raw, "poll_authorization_env", path)
        poll_token = os.environ.get(env)
        if not poll_token:
            raise ConfigError(f"{path}.poll_authorization_env: environment variable {env} is not set")
    if delivery == PUSH:
        for key in ("poll_interval_seconds", "poll_endpoint_url", "poll_authorization_env", "max_events"):
            if key in raw:
                raise ConfigError(f"{path}.{key}: only meaningful with delivery: poll")
    elif raw.get("jwks_uri") and not raw.get("poll_endpoint_url"):
        raise ConfigError(f"{path}.poll_endpoint_url: required when jwks_uri skips discovery")
    subjects_of = raw.get("subjects_of", [issuer])
    if not isinstance(subjects_of, list) or not subjects_of:
        raise ConfigError(f"{path}.subjects_of: expected a non-empty list of issuer URLs")
    for i, name in enumerate(subjects_of):
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}.subjects_of[{i}]: expected an issuer URL")
    return TransmitterConfig(
        issuer=issuer,
        subjects_of=tuple(dict.fromkeys(subjects_of)),
        audience=audience,
        delivery=delivery,
        algorithms=tuple(algorithms),
        max_age_seconds=_integer(raw, "max_age_seconds", path, DEFAULT_MAX_AGE_SECONDS, 1, 86_400),
        leeway_seconds=_integer(raw, "leeway_seconds", path, DEFAULT_LEEWAY_SECONDS, 0, 300),
        poll_interval_seconds=_number(raw, "poll_interval_seconds", path, DEFAULT_POLL_INTERVAL_SECONDS, 0.1, 3600),
        poll_endpoint_url=str(raw.get("poll_endpoint_url") or ""),
        poll_token=poll_token,
        max_events=_integer(raw, "max_events", path, DEFAULT_MAX_EVENTS, 1, 10_000),
        discovery_url=str(raw.get("discovery_url") or ""),
        jwks_uri=str(raw.get("jwks_uri") or ""),
        fetch_timeout_seconds=_number(raw, "fetch_timeout_seconds", path, DEFAULT_FETCH_TIMEOUT_SECONDS, 0.1, 60),
    )


def parse_revocation_config(data: Any, path: str = "revocation") -> RevocationConfig:
    """Validates the `revocation` mapping (None means defaults); raises `ConfigError` naming the key."""
    if data is None:
        return RevocationConfig()
    raw = _mapping(data, path, _KEYS)
    transmitters_raw = raw.get("transmitters", [])
    if not isinstance(transmitters_raw, list):
        raise ConfigError(f"{path}.transmitters: expected a list")
    transmitters = tuple(_transmitter(t, f"{path}.transmitters[{i}]") for i, t in enumerate(transmitters_raw))
    seen: set[str] = set()
    for i, transmitter in enumerate(transmitters):
        if transmitter.issuer in seen:
            raise ConfigError(f"{path}.transmitters[{i}].issuer: {transmitter.issuer!r} configured twice")
        seen.add(transmitter.issuer)
    return RevocationConfig(
        transmitters=transmitters,
        max_token_lifetime_seconds=_integer(
            raw,
            "max_token_lifetime_seconds",
            path,
            DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
            60,
            MAX_MAX_TOKEN_LIFETIME_SECONDS,
        ),
        resync_interval_seconds=_number(raw, "resync_interval_seconds", path, DEFAULT_RESYNC_INTERVAL_SECONDS, 1, 3600),
    )


def check_transmitter_scopes(config: RevocationConfig, issuers: Iterable[str], path: str = "revocation") -> None:
    """Every issuer a transmitter speaks for must be a configured token issuer; raises `ConfigError`."""
    known = frozenset(issuers)
    for i, transmitter in enumerate(config.transmitters):
        here = f"{path}.transmitters[{i}].subjects_of"
        scope = transmitter.scope
        if scope == (transmitter.issuer,) and transmitter.issuer not in known:
            raise ConfigError(
                f"{here}: defaults to the transmitter's issuer {transmitter.issuer!r}, which is not a configured "
                "issuer; list the issuers whose subjects this transmitter speaks for"
            )
        for j, name in enumerate(scope):
            if name not in known:
                raise ConfigError(f"{here}[{j}]: {name!r} is not a configured issuer")
