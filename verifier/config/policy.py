"""The `policies` section: route policies, first match wins (matched and enforced by `verifier.policy.rules`).

```yaml
policies:
  - name: orders                          # default: policy-<index>
    match: {hosts: [api.example.test], methods: [GET, POST], path_prefix: /orders}   # or path: exact
    require: {scopes_any: [orders:read], issuers_any: ["https://idp.example.test"],
              audiences_any: ["https://api.example.test"], clients_any: [mcp-client]}
    resource: "https://api.example.test/orders"   # RFC 9728 metadata; also a required audience (RFC 8707)
```
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from verifier.config.base import ConfigError, Reader, read_fields, setting, url_problem
from verifier.config.issuer import WILDCARD_AUDIENCE
from verifier.config.upstream import RouteUpstream, parse_route_upstream
from verifier.request import a_label, host_name, normalize_host

SENDER_CONSTRAINTS = ("dpop", "mtls", "any")
STEP_UP_METHODS = ("webauthn",)
MAX_AUTH_AGE_SECONDS = 86_400 * 365  # a year: anything longer is no bound at all
# What a request without a token never meets: `authenticated: false` lets it through before any of them is looked at.
# (Per-route trust is left out: narrowing whose optional tokens are taken is a policy of its own.)
NEEDS_A_TOKEN = (
    "roles_any", "roles_all", "scopes_all", "scopes_any", "amr_any", "acr_any", "max_auth_age_seconds",
    "sender_constraint", "step_up",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouteMatch:
    """Which requests a policy covers; empty fields match anything."""

    hosts: tuple[str, ...] = setting(
        (), doc="host names without a port (lower-cased, no trailing dot; an IDN also as its xn-- form)"
    )
    methods: tuple[str, ...] = setting(
        (), doc="HTTP methods (upper-cased); GET also covers HEAD; an unregistered one (a typo?) is warned about"
    )
    path_prefix: str = setting(
        "",
        doc="the normalized path starts with this (starts with /); one ending in / makes the path without that slash"
        " (and with a format suffix: /ops.json) ambiguous (400) when another policy has it",
    )
    path: str = setting("", doc="the normalized path is exactly this, give or take a trailing slash (no query)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Requirements:
    """What a matched route requires of the caller."""

    authenticated: bool = setting(
        True, doc="false: no token needed (a token sent is still checked); no roles, scopes or assurance then"
    )
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
    issuers_any: tuple[str, ...] = setting(
        (), doc="only these issuers' tokens (configured, or concrete ones of a template; 401 issuer_not_trusted)"
    )
    audiences_any: tuple[str, ...] = setting((), doc="`aud` names one of these (401 audience_not_trusted)")
    clients_any: tuple[str, ...] = setting(
        (), doc="`client_id`, else `azp`, is one of these, and a different `azp` too (403 client_not_allowed)"
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """One route policy: first match wins."""

    name: str = setting("", doc="names the policy in logs and `verifier explain` (default: policy-<index>)")
    match: RouteMatch
    require: Requirements = Requirements()
    resource: str = setting(
        "", doc="RFC 9728 resource identifier (https URL): metadata served, and a required audience (RFC 8707)"
    )
    resource_name: str = setting("", doc="RFC 9728 resource_name: a human-readable name for the metadata")
    scopes_supported: tuple[str, ...] = setting(
        (), doc="RFC 9728 scopes_supported (default: scopes_all + scopes_any); also the challenges' scope"
    )
    upstream: RouteUpstream | None = None  # what this route's upstream receives, beyond `upstream` (its own reader)

    @property
    def scopes(self) -> tuple[str, ...]:
        """The scopes this route advertises: `scopes_supported`, else the ones it requires."""
        if self.scopes_supported:
            return self.scopes_supported
        return tuple(dict.fromkeys(self.require.scopes_all + self.require.scopes_any))


def resource_problem(resource: str) -> str:
    """Why `resource` is not an RFC 9728 section 1.2 / RFC 8707 resource identifier (empty: it is)."""
    problem = url_problem(resource, "resource")
    if problem:
        return problem
    if any(not 0x21 <= ord(c) <= 0x7E or c in '"\\' for c in resource):
        return "a resource identifier is printable ASCII without quotes or backslashes (RFC 3986)"
    parts = urlsplit(resource)
    if parts.fragment or "#" in resource:
        return "a resource identifier has no fragment (RFC 9728 section 1.2)"
    if parts.query:
        return "a resource identifier has no query here (RFC 9728 section 1.2 discourages it)"
    return ""


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
        label = a_label(host)
        if not label:
            raise ConfigError(f"{reader.path}.hosts[{i}]: {host!r} has no ASCII (IDNA A-label) form clients could send")
        if not _HOST.fullmatch(label):
            raise ConfigError(f"{reader.path}.hosts[{i}]: {host!r} is not a host name (letters, digits, -, ., _)")
    for i, method in enumerate(match.methods):
        if not _METHOD.fullmatch(method):
            raise ConfigError(f"{reader.path}.methods[{i}]: {method!r} is not an HTTP method (RFC 9110 token)")
    reader.done()
    return dataclasses.replace(match, hosts=hosts, methods=tuple(m.upper() for m in match.methods))


# What a request can carry: a policy naming anything else covers no request, and its requests fall to the next policy.
_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 section 5.6.2 token
_HOST = re.compile(r"[a-z0-9._-]+|\[[0-9a-f:.]+\]")  # a DNS name (its A-label) or an IP literal, lower-cased


def parse_policy(reader: Reader, index: int) -> PolicySettings:
    """One `policies[]` entry; problems are named by key (`policies[0].match.path: must start with /`)."""
    match_reader = reader.child("match")
    if match_reader is None:
        raise ConfigError(f"{reader.path}.match: required")
    match = _match(match_reader)
    require_reader = reader.child("require") or Reader({}, f"{reader.path}.require")
    require = Requirements(**read_fields(require_reader, Requirements))
    if not require.authenticated:
        for key in NEEDS_A_TOKEN:
            if getattr(require, key) not in ((), "", None):
                raise ConfigError(
                    f"{require_reader.path}.{key}: never met with authenticated: false (a request without a token "
                    "passes before it is looked at): drop one of the two"
                )
    for i, audience in enumerate(require.audiences_any):
        if audience == "*":
            require_reader.problem(f"audiences_any[{i}]", WILDCARD_AUDIENCE)
    require_reader.done()
    raw_upstream = reader.raw("upstream")
    upstream = None if raw_upstream is None else parse_route_upstream(raw_upstream, f"{reader.path}.upstream")
    policy = PolicySettings(**read_fields(reader, PolicySettings, match=match, require=require, upstream=upstream))
    if policy.resource:
        problem = resource_problem(policy.resource)
        if problem:
            reader.problem("resource", problem)
    reader.done()
    return policy if policy.name else dataclasses.replace(policy, name=f"policy-{index}")


def _names(issuer: str, configured: str) -> bool:
    """Whether `issuer` is the configured issuer string, or a concrete issuer of it when it is a template
    (`{...}` placeholders, each standing for one non-empty segment without `/`)."""
    if issuer == configured:
        return True
    if "{" not in configured:
        return False
    pattern = "".join(
        "[^/]+" if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]*\})", configured)
    )
    return re.fullmatch(pattern, issuer) is not None


def check_trusted_issuers(policies: tuple[PolicySettings, ...], issuers: tuple[str, ...]) -> None:
    """Every `issuers_any` entry names a configured issuer (an `issuers[].issuer` string, or a concrete
    issuer of a template one): a typo would otherwise refuse every token on the route, silently."""
    for i, policy in enumerate(policies):
        for j, issuer in enumerate(policy.require.issuers_any):
            if not any(_names(issuer, configured) for configured in issuers):
                raise ConfigError(f"policies[{i}].require.issuers_any[{j}]: {issuer!r} is not a configured issuer")


def trusted_among(policy: PolicySettings, issuers: Sequence[str]) -> list[str]:
    """The `issuers` a policy trusts: all of them without `issuers_any`, else those it names."""
    listed = policy.require.issuers_any
    return [i for i in issuers if not listed or any(_names(name, i) for name in listed)]
