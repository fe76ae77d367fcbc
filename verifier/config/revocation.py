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
      max_age_seconds: 86400             # a SET whose `iat` is older is refused (and its jti forgotten): an
                                         # outage longer than this loses the events signed before it
      subjects_of: ["https://idp.example.test"]   # configured issuers whose users its events may touch
                                         # (default: its own `issuer`, when the provider transmits itself)
      claims_change: restrict            # restrict: its claim/assurance changes only take away (default);
                                         # replace: they replace the token's claims, raises included
      # poll only: poll_interval_seconds (10), poll_endpoint_url (else the metadata's poll delivery),
      #            poll_authorization_env (env var holding a bearer token for the poll endpoint),
      #            max_events (100)
      # push only: push_authorization_env (env var holding the exact Authorization header value the transmitter
      #            sends, compared in constant time; unset: the SET's signature is its only authentication)
      # optional: discovery_url, jwks_uri, fetch_timeout_seconds (5), leeway_seconds (30)
```
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from verifier.config.base import ConfigError, Reader, check_url, header_secret_problem, read_fields, setting
from verifier.config.issuer import (
    DEFAULT_FETCH_TIMEOUT_SECONDS,
    DEFAULT_LEEWAY_SECONDS,
    SUPPORTED_ALGORITHMS,
    TENANT_PLACEHOLDER,
    IssuerSettings,
)

PUSH = "push"
POLL = "poll"
DELIVERY_POLL_URN = "urn:ietf:rfc:8936"  # SSF 1.0 section 6.1.2
DEFAULT_MAX_TOKEN_LIFETIME_SECONDS = 86_400  # seconds; a day covers access and most refresh-bound tokens
MAX_MAX_TOKEN_LIFETIME_SECONDS = 90 * 86_400  # seconds; beyond this entries would pile up for months
# Seconds a SET may take from signing to us, retries and a poll queue included: a receiver outage longer than this
# loses events (a too-old SET is refused, and the transmitter takes that as final), so a day, not minutes. Replays
# within it are refused by `jti`, kept as long.
DEFAULT_MAX_AGE_SECONDS = 86_400
DEFAULT_POLL_INTERVAL_SECONDS = 10.0  # seconds between polls when the transmitter had nothing more
DEFAULT_MAX_EVENTS = 100  # SETs asked for per poll (RFC 8936 section 2.4 maxEvents)
DEFAULT_RESYNC_INTERVAL_SECONDS = 30.0  # seconds between full reloads; pub/sub carries changes in between
# `claims_change`: what a transmitter's CAEP token-claims-change / assurance-level-change may do to a token's claims.
RESTRICT = "restrict"  # only take away: a claim keeps what both the token and the announcement hold
REPLACE = "replace"  # the spec's semantics: the announced claims replace the token's (a raise too)
@dataclasses.dataclass(frozen=True, kw_only=True)
class TransmitterConfig:
    """One trusted SSF transmitter."""

    issuer: str = setting(doc="exact `iss` of its SETs; metadata under /.well-known/ssf-configuration")
    audience: str = setting(doc="the `aud` its SETs must carry")
    delivery: str = setting(PUSH, choices=(PUSH, POLL), doc="push (RFC 8935, POST /v1/ssf/events) or poll (RFC 8936)")
    algorithms: tuple[str, ...] = setting(("ES256", "RS256", "EdDSA"), doc="allow-list, pinned to the key type")
    allow_insecure_http: bool = setting(False, doc="plain http on loopback (tests and local labs only)")
    max_age_seconds: int = setting(
        DEFAULT_MAX_AGE_SECONDS,
        minimum=1,
        maximum=86_400,
        unit="seconds",
        doc="a SET whose `iat` is older is refused: a longer receiver outage loses events",
    )
    leeway_seconds: int = setting(
        DEFAULT_LEEWAY_SECONDS, maximum=300, unit="seconds", doc="clock skew tolerated on a SET's `iat`"
    )
    poll_interval_seconds: float = setting(
        DEFAULT_POLL_INTERVAL_SECONDS, minimum=0.1, maximum=3600, unit="seconds", doc="poll: pause when nothing more"
    )
    poll_endpoint_url: str = setting("", doc="poll: the endpoint (default: from the transmitter's metadata)")
    poll_authorization_env: str | None = setting(None, doc="poll: environment variable with a bearer token")
    poll_token: str | None = dataclasses.field(default=None, repr=False)  # read from poll_authorization_env
    # RFC 8935 section 4.1: the transmitter may authenticate its push requests; SSF 1.0 has the receiver choose the
    # `Authorization` header value the transmitter sends (the stream's `delivery.authorization_header`). Unset: the
    # SET's signature is its only authentication.
    push_authorization_env: str | None = setting(
        None,
        doc="push: environment variable with the exact Authorization header the transmitter sends (printable ASCII)",
    )
    push_authorization: str | None = dataclasses.field(default=None, repr=False)  # read from push_authorization_env
    max_events: int = setting(DEFAULT_MAX_EVENTS, minimum=1, maximum=10_000, doc="poll: SETs asked for per poll")
    discovery_url: str = setting("", doc="default: SSF 1.0 section 7.2.1 well-known location under `issuer`")
    jwks_uri: str = setting("", doc="set to skip discovery (then poll needs poll_endpoint_url)")
    fetch_timeout_seconds: float = setting(
        DEFAULT_FETCH_TIMEOUT_SECONDS, minimum=0.1, maximum=60, unit="seconds", doc="deadline on metadata/JWKS calls"
    )
    # The configured issuers whose subjects its events may touch (empty: its own `issuer`). An event
    # about anyone else is acknowledged and ignored: one provider's transmitter cannot sign out (or
    # change the claims of) another provider's users.
    subjects_of: tuple[str, ...] = setting((), doc="configured issuers whose users its events may touch (default: own)")
    # A transmitter is not always the identity provider (a risk engine, an MDM, a second IdP): by default its claim
    # announcements may only take access away (`verifier.checks.revocation`). `replace` is for a transmitter that
    # IS the provider of the tokens it speaks for, whose word on a claim may raise it.
    claims_change: str = setting(
        RESTRICT,
        choices=(RESTRICT, REPLACE),
        doc="restrict: its CAEP claim/assurance changes only take away; replace: they may also raise (the IdP itself)",
    )

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

    transmitters: tuple[TransmitterConfig, ...] = ()  # `transmitters[]`
    max_token_lifetime_seconds: int = setting(
        DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
        minimum=60,
        maximum=MAX_MAX_TOKEN_LIFETIME_SECONDS,
        unit="seconds",
        doc="the longest any accepted token lives; bounds every entry",
    )
    resync_interval_seconds: float = setting(
        DEFAULT_RESYNC_INTERVAL_SECONDS, minimum=1, maximum=3600, unit="seconds", doc="full reload from the store"
    )


def _transmitter(reader: Reader) -> TransmitterConfig:
    path = reader.path
    issuer = reader.text("issuer")
    insecure = reader.boolean("allow_insecure_http", False)
    check_url(issuer, f"{path}.issuer", "transmitter", allow_insecure_http=insecure)
    subjects_of = reader.strings("subjects_of") if reader.raw("subjects_of") is not None else (issuer,)
    values = read_fields(
        reader, TransmitterConfig, issuer=issuer, allow_insecure_http=insecure, subjects_of=subjects_of
    )
    for i, alg in enumerate(values["algorithms"]):
        if alg not in SUPPORTED_ALGORITHMS:
            reader.problem(f"algorithms[{i}]", f"unsupported algorithm {alg!r}")
    for key in ("discovery_url", "jwks_uri", "poll_endpoint_url"):
        if values[key]:
            check_url(values[key], f"{path}.{key}", "transmitter", allow_insecure_http=insecure)
    env = values["poll_authorization_env"]
    if env is not None:
        values["poll_token"] = os.environ.get(env)
        if not values["poll_token"]:
            reader.problem("poll_authorization_env", f"environment variable {env} is not set")
    push_env = values["push_authorization_env"]
    if push_env is not None:
        values["push_authorization"] = os.environ.get(push_env)
        if not values["push_authorization"]:
            reader.problem("push_authorization_env", f"environment variable {push_env} is not set")
        elif problem := header_secret_problem(values["push_authorization"]):
            reader.problem("push_authorization_env", f"{push_env}: {problem}")
    if values["delivery"] == PUSH:
        for key in ("poll_interval_seconds", "poll_endpoint_url", "poll_authorization_env", "max_events"):
            if reader.has(key):
                reader.problem(key, "only meaningful with delivery: poll")
    elif reader.has("push_authorization_env"):
        reader.problem("push_authorization_env", "only meaningful with delivery: push")
    elif values["jwks_uri"] and not values["poll_endpoint_url"]:
        reader.problem("poll_endpoint_url", "required when jwks_uri skips discovery")
    values["subjects_of"] = tuple(dict.fromkeys(subjects_of))
    reader.done()
    return TransmitterConfig(**values)


def parse_revocation_config(data: Any, path: str = "revocation") -> RevocationConfig:
    """Validates the `revocation` mapping (None means defaults); problems are named by key (`verifier.config.base`)."""
    if data is None:
        return RevocationConfig()
    reader = Reader(data, path)
    raw = reader.raw("transmitters")
    if raw is not None and not isinstance(raw, list):
        reader.problem("transmitters", "expected a list")
    transmitters = tuple(_transmitter(t) for t in reader.children("transmitters")) if raw else ()
    seen: set[str] = set()
    for i, transmitter in enumerate(transmitters):
        if transmitter.issuer in seen:
            reader.problem(f"transmitters[{i}].issuer", f"{transmitter.issuer!r} configured twice")
        seen.add(transmitter.issuer)
    config = RevocationConfig(**read_fields(reader, RevocationConfig, transmitters=transmitters))
    reader.done()
    return config


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
            if TENANT_PLACEHOLDER in name:
                # A token names its tenant's issuer, never the template: the events would be acknowledged and
                # reach no token (a revocation silently lost).
                raise ConfigError(
                    f"{here}[{j}]: {name!r} is an issuer template; configure each tenant whose subjects this "
                    "transmitter speaks for as an issuer of its own"
                )
