"""One check on a verified principal, and the route a request is checked against.

The pipeline runs an ordered list of checks (Envoy's filter chain, Oathkeeper's authorizers) on every
request, a cached token's included. Each check declares two things the pipeline derives everything
else from:

- `per_request`: its answer depends on the request itself (a proof, a certificate, a counter), not only
  on the token and the route, so a gateway may not reuse the answer (`Cache-Control: no-store`).
- `from_memory`: it is answered without I/O, so the synchronous fast path (`decide_cached`) may run it;
  a check that is not sends the request down the asynchronous path.

A new check is one subclass in one file, added to the list the composition root (`verifier.app`)
hands the pipeline; a cache hit cannot skip it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from verifier.credentials import Credential
from verifier.policy.rules import CompiledPolicy
from verifier.principal import Principal
from verifier.request import RequestAttributes
from verifier.upstream import Variant


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """What the request needs, worked out once before any token is looked at."""

    policy: CompiledPolicy | None
    dpop_route: bool  # the route's policy requires DPoP: challenges name DPoP
    step_up: bool = False  # the route requires a request-bound WebAuthn assertion
    endpoint: bool = False  # one of our own endpoints (WebAuthn registry), not a gateway's request
    challenge: tuple[tuple[str, str], ...] = ()  # RFC 9728 resource_metadata and scope for its challenges
    upstream: Variant | None = None  # the route's policy changes what the upstream receives (None: it does not)

    def trusts_issuer(self, issuer: str) -> bool:
        """Whether a token of `issuer` may be taken on this route (its policy's `issuers_any`, else any)."""
        return self.policy is None or not self.policy.issuers or issuer in self.policy.issuers


@dataclasses.dataclass(frozen=True, slots=True)
class Passed:
    """A pass that also tells the client something about this request: the `RateLimit-Policy` / `RateLimit`
    state (draft-ietf-httpapi-ratelimit-headers), the next `DPoP-Nonce` (RFC 9449 section 8.2). The headers go
    to the client with the allow answer."""

    principal: Principal
    client_headers: tuple[tuple[str, str], ...]


NO_POLICY = Route(None, False)
OWN_ENDPOINT = Route(None, False, endpoint=True)


class Check:
    """One check on a verified principal; raises a `VerifierError` to refuse.

    Returns the principal later checks (and the answer's headers) see: the same one, or one whose
    claims an announcement changed.
    """

    per_request: ClassVar[bool] = False
    from_memory: ClassVar[bool] = True

    def for_token(self, principal: Principal, credential: Credential) -> bool:
        """Whether this check has anything to do for this token: asked once, when the token is admitted."""
        return True

    def for_route(self, route: Route) -> bool:
        """Whether this check has anything to do on this route: asked on every request."""
        return True

    def reuse_left(self, principal: Principal, route: Route, now: float) -> float | None:
        """Seconds a gateway may reuse an allow this check passed, or None for no limit of its own."""
        return None

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        """The check without I/O (only called when `from_memory`). It reads the principal and the request, not the
        credential: a cached token's record keeps only its scheme, and a check that needs the token itself (a DPoP
        proof's `ath`, an introspection) does per-request work or I/O in `check`."""
        raise NotImplementedError(f"{type(self).__name__} is not answered from memory")

    async def check(
        self, principal: Principal, credential: Credential, attrs: RequestAttributes, route: Route
    ) -> Principal | Passed:
        """The check, with I/O if need be (a `Passed` adds headers for the client to the allow)."""
        return self.check_now(principal, attrs, route)
