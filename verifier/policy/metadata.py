"""RFC 9728 OAuth 2.0 Protected Resource Metadata: the documents, where they live, what challenges say.

A route's `resource` (RFC 8707 resource indicator) gets a document at the well-known URL derived from
it (section 3.1: `/.well-known/oauth-protected-resource` inserted between the host and the path),
naming the issuers the route trusts as its `authorization_servers`. Every challenge on the route
carries `resource_metadata="<that URL>"` (section 5.1) and the route's `scope` (RFC 6750 section 3),
so an MCP client or an agent that got a 401 learns where to get a token and for what.

The URL is built from the configured resource identifier, never from the request's Host: a client
choosing the Host must not be able to point another client's discovery elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

from verifier.config.policy import PolicySettings
from verifier.config.resource import ProtectedResourceConfig

WELL_KNOWN = "/.well-known/oauth-protected-resource"
BEARER_METHODS = ("header",)  # RFC 6750 section 2.1 only: body and query tokens are never read


def metadata_url(resource: str) -> str:
    """RFC 9728 section 3.1: the metadata URL of a resource identifier (a terminating `/` is dropped)."""
    parts = urlsplit(resource)
    path = "" if parts.path == "/" else parts.path
    return urlunsplit((parts.scheme, parts.netloc, WELL_KNOWN + path, parts.query, ""))


def metadata_path(resource: str) -> str:
    """The path the metadata is served at, on the resource's own origin."""
    return urlsplit(metadata_url(resource)).path


def challenge_params(resource: str, scopes: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`resource_metadata` (RFC 9728 section 5.1) and `scope` (RFC 6750 section 3) of a route's challenges."""
    params: list[tuple[str, str]] = []
    if resource:
        params.append(("resource_metadata", metadata_url(resource)))
    if scopes:
        params.append(("scope", " ".join(scopes)))
    return tuple(params)


@dataclasses.dataclass(frozen=True, slots=True)
class ResourceMetadata:
    """One resource's metadata document, serialized once."""

    resource: str
    url: str  # where it is served: `metadata_url(resource)`
    document: dict[str, object]
    body: bytes


@dataclasses.dataclass(slots=True)
class _Draft:
    """What the routes naming one resource add up to (two policies may share a resource)."""

    servers: dict[str, None]
    scopes: dict[str, None]
    name: str = ""
    dpop: bool = False  # some route accepts DPoP-bound tokens
    dpop_required: bool = True  # every route requires them
    mtls_required: bool = True  # every route requires certificate-bound tokens

    def add(self, *, servers: Iterable[str], scopes: Iterable[str], name: str, constraint: str, dpop: bool) -> None:
        self.servers.update(dict.fromkeys(servers))
        self.scopes.update(dict.fromkeys(scopes))
        self.name = self.name or name
        self.dpop = self.dpop or dpop or constraint in ("dpop", "any")
        self.dpop_required = self.dpop_required and constraint == "dpop"
        self.mtls_required = self.mtls_required and constraint == "mtls"


def _document(resource: str, draft: _Draft, dpop_algs: Sequence[str]) -> ResourceMetadata:
    """RFC 9728 section 2: `resource` is required; the rest are the optional members we can vouch for."""
    document: dict[str, object] = {"resource": resource}
    if draft.servers:
        document["authorization_servers"] = list(draft.servers)
    if draft.scopes:
        document["scopes_supported"] = list(draft.scopes)
    document["bearer_methods_supported"] = list(BEARER_METHODS)
    if draft.name:
        document["resource_name"] = draft.name
    if draft.mtls_required:
        document["tls_client_certificate_bound_access_tokens"] = True
    if draft.dpop and dpop_algs:
        document["dpop_signing_alg_values_supported"] = list(dpop_algs)
        if draft.dpop_required:
            document["dpop_bound_access_tokens_required"] = True
    body = json.dumps(document, separators=(",", ":")).encode()
    return ResourceMetadata(resource, metadata_url(resource), document, body)


def resource_documents(
    policies: Sequence[PolicySettings],
    default: ProtectedResourceConfig | None,
    issuers: Sequence[str],
    dpop_algs: Sequence[str],
    *,
    dpop_configured: bool,
) -> tuple[ResourceMetadata, ...]:
    """The metadata of the default resource and of every policy's `resource`, one document per resource.

    `authorization_servers` are the issuers the routes trust (`issuers_any`, else every configured
    issuer); DPoP algorithms are advertised when a route requires or accepts DPoP (`dpop_configured`).
    """
    drafts: dict[str, _Draft] = {}
    if default is not None and default.resource:
        drafts[default.resource] = _Draft(dict.fromkeys(issuers), {})
        drafts[default.resource].add(
            servers=(), scopes=default.scopes_supported, name=default.resource_name, constraint="", dpop=dpop_configured
        )
    for policy in policies:
        if not policy.resource:
            continue
        draft = drafts.setdefault(policy.resource, _Draft({}, {}))
        draft.add(
            servers=policy.require.issuers_any or issuers,
            scopes=policy.scopes,
            name=policy.resource_name,
            constraint=policy.require.sender_constraint,
            dpop=dpop_configured,
        )
    return tuple(_document(resource, draft, dpop_algs) for resource, draft in drafts.items())
