"""Per-identity rate limits (token buckets in the shared state), counted on every gateway request."""

from __future__ import annotations

from verifier.checks.base import Check, Passed, Route
from verifier.credentials import Credential
from verifier.policy.ratelimit import RateLimiter
from verifier.principal import Principal
from verifier.request import RequestAttributes


class RateLimit(Check):
    """Takes one token from the identity's bucket; refuses with 429 when it is empty."""

    per_request = True
    from_memory = False  # the buckets are in the shared state

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    def for_route(self, route: Route) -> bool:
        """Every gateway request; our own endpoints are not behind the gateway's budget."""
        return not route.endpoint

    async def check(
        self, principal: Principal, credential: Credential, attrs: RequestAttributes, route: Route
    ) -> Principal | Passed:
        """Raises RateLimited when the identity's bucket is empty; else tells the client what is left."""
        headers = await self._limiter.check(principal)
        return Passed(principal, headers) if headers else principal
