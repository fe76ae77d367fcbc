"""The `policies` section: route policies, first match wins (matched and enforced by `verifier.policy.rules`).

```yaml
policies:
  - name: orders                          # default: policy-<index>
    match: {hosts: [api.example.test], methods: [GET, POST], path_prefix: /orders}   # or path: exact
    require: {scopes_any: [orders:read]}
```
"""

from __future__ import annotations

import dataclasses

from verifier.config.base import ConfigError, Reader, read_fields, setting
from verifier.request import host_name, normalize_host

SENDER_CONSTRAINTS = ("dpop", "mtls", "any")
STEP_UP_METHODS = ("webauthn",)
MAX_AUTH_AGE_SECONDS = 86_400 * 365  # a year: anything longer is no bound at all


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouteMatch:
    """Which requests a policy covers; empty fields match anything."""

    hosts: tuple[str, ...] = setting((), doc="host names without a port (lower-cased, no trailing dot)")
    methods: tuple[str, ...] = setting((), doc="HTTP methods (upper-cased)")
    path_prefix: str = setting("", doc="the normalized path starts with this (starts with /)")
    path: str = setting("", doc="the normalized path is exactly this (no query)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Requirements:
    """What a matched route requires of the caller."""

    authenticated: bool = setting(True, doc="false: no token needed (a token sent is still checked)")
    roles_any: tuple[str, ...] = setting((), doc="one of these roles (403 role_missing)")
    roles_all: tuple[str, ...] = setting((), doc="all of these roles")
    scopes_all: tuple[str, ...] = setting((), doc="all of these scopes (403 scope_missing)")
    scopes_any: tuple[str, ...] = setting((), doc="one of these scopes")
    amr_any: tuple[str, ...] = setting((), doc="RFC 8176 methods, e.g. hwk, pop (401 step-up, RFC 9470)")
    acr_any: tuple[str, ...] = setting((), doc="e.g. phr, phrh (401 step-up, RFC 9470)")
    max_auth_age_seconds: int | None = setting(
        None, minimum=1, maximum=MAX_AUTH_AGE_SECONDS, unit="seconds", doc="auth_time at most this old (step-up)"
    )
    sender_constraint: str = setting("", choices=SENDER_CONSTRAINTS, doc="a DPoP- or mTLS-bound token (any: either)")
    step_up: str = setting("", choices=STEP_UP_METHODS, doc="a WebAuthn assertion bound to this request")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """One route policy: first match wins."""

    name: str = setting("", doc="names the policy in logs and `verifier explain` (default: policy-<index>)")
    match: RouteMatch
    require: Requirements = Requirements()


def _match(reader: Reader) -> RouteMatch:
    match = RouteMatch(**read_fields(reader, RouteMatch))
    for key in ("path_prefix", "path"):
        value = getattr(match, key)
        if value and not value.startswith("/"):
            raise ConfigError(f"{reader.path}.{key}: must start with /")
    hosts = tuple(normalize_host(h) for h in match.hosts)
    for i, host in enumerate(hosts):
        if host_name(host) != host or not host:
            raise ConfigError(f"{reader.path}.hosts[{i}]: expected a host name without a port, got {host!r}")
    reader.done()
    return dataclasses.replace(match, hosts=hosts, methods=tuple(m.upper() for m in match.methods))


def parse_policy(reader: Reader, index: int) -> PolicySettings:
    """One `policies[]` entry; problems are named by key (`policies[0].match.path: must start with /`)."""
    match_reader = reader.child("match")
    if match_reader is None:
        raise ConfigError(f"{reader.path}.match: required")
    match = _match(match_reader)
    require_reader = reader.child("require") or Reader({}, f"{reader.path}.require")
    require = Requirements(**read_fields(require_reader, Requirements))
    require_reader.done()
    policy = PolicySettings(**read_fields(reader, PolicySettings, match=match, require=require))
    reader.done()
    return policy if policy.name else dataclasses.replace(policy, name=f"policy-{index}")
