"""Per-route trust: whose tokens a route takes (`issuers_any`, `audiences_any` + `resource`, `clients_any`).

A route without them keeps the global rule (any configured issuer, one of its audiences, any client).
Answered from memory and from the token alone, so a cached token meets it on every route, and a
gateway may reuse the answer. An issuer or audience the route does not trust is a 401 `invalid_token`
(RFC 6750 section 3.1: the token is not valid for this resource; the challenge's `resource_metadata`
tells the client which authorization servers and resource to ask for a new one, RFC 9728 and RFC 8707);
a client the route does not admit is a 403 `insufficient_scope`: a new token for the same client
would not help. A token naming two clients (`client_id` and a different `azp`, `verifier.principal.clients_of`)
is admitted only when the route lists both: either may be the one presenting it, and the other is the one
revocation, the rate limiter, the audit line and the upstream may know it by.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from verifier.checks.base import Check, Route
from verifier.errors import VerifierError
from verifier.principal import Principal
from verifier.request import RequestAttributes


def _strings(value: object) -> Iterable[str]:
    """A claim's string values (a string, or the strings of a list): hostile shapes match nothing."""
    if isinstance(value, str):
        return (value,)
    return (v for v in value if isinstance(v, str)) if isinstance(value, list) else ()


class RouteTrust(Check):
    """The route's policy narrows the issuers, audiences or clients it takes."""

    def __init__(self, configured: Callable[[str], str] | None = None) -> None:
        """`configured` names the `issuers[]` entry of a verified issuer (its template, for a tenant's)."""
        self._configured = configured

    def for_route(self, route: Route) -> bool:
        """A route whose policy names issuers, audiences (or a resource) or clients."""
        return route.policy is not None and route.policy.trusts

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        """Raises `issuer_not_trusted`, `audience_not_trusted` or `client_not_allowed`."""
        policy = route.policy
        assert policy is not None  # for_route
        # The issuer entry the token was verified under, or the token's own `iss` (the same string,
        # unless the entry is a template standing for many issuers): either may be listed.
        iss = principal.claims.get("iss")
        if policy.issuers and not (
            principal.issuer in policy.issuers
            or (isinstance(iss, str) and iss in policy.issuers)
            or (self._configured is not None and self._configured(principal.issuer) in policy.issuers)
        ):
            raise VerifierError("the token's issuer is not trusted on this route", code="issuer_not_trusted")
        if policy.audiences and not any(a in policy.audiences for a in _strings(principal.claims.get("aud"))):
            raise VerifierError("the token is not for this route's resource", code="audience_not_trusted")
        clients = policy.clients
        if clients and (
            principal.client_id not in clients
            or (principal.other_client is not None and principal.other_client not in clients)
        ):
            raise VerifierError("the token's client may not use this route", code="client_not_allowed")
        return principal
