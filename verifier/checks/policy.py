"""The route's policy (roles, scopes, claims, sender constraint, authentication age) on the principal."""

from __future__ import annotations

from collections.abc import Callable

from verifier.checks.base import Check, Route
from verifier.clock import Clock
from verifier.policy.rules import auth_time_left, evaluate
from verifier.principal import Principal
from verifier.request import RequestAttributes


class RoutePolicy(Check):
    """The requirements of the policy the request's route matched."""

    def __init__(self, clock: Clock, authorization_endpoint: Callable[[str], str] | None = None) -> None:
        self._clock = clock
        # RFC 9470 challenges name where to authenticate again (discovered after start-up: late-bound).
        self._authorization_endpoint = authorization_endpoint or (lambda issuer: "")

    def for_route(self, route: Route) -> bool:
        """A route with a policy."""
        return route.policy is not None

    def reuse_left(self, principal: Principal, route: Route, now: float) -> float | None:
        """Until `max_auth_age_seconds` would refuse the principal."""
        assert route.policy is not None  # for_route
        return auth_time_left(principal, route.policy.require, now)

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        """Raises the refusal for the first unmet requirement."""
        assert route.policy is not None  # for_route
        require = route.policy.require
        # Only the RFC 9470 step-up challenges name it: not looked up on every request.
        challenges = bool(require.acr_any or require.amr_any or require.max_auth_age_seconds is not None)
        evaluate(
            require,
            principal,
            self._clock.now(),
            authorization_endpoint=self._authorization_endpoint(principal.issuer) if challenges else "",
        )
        return principal
