"""W3C WebAuthn Level 3 step-up: a route that requires a request-bound assertion gets one on every request."""

from __future__ import annotations

from typing import Protocol

from verifier.checks.base import Check, Route
from verifier.credentials import Credential
from verifier.errors import InternalError
from verifier.principal import Principal
from verifier.request import RequestAttributes


class StepUp(Protocol):
    """Request-bound WebAuthn assertions (verifier.webauthn.WebAuthnService)."""

    async def check_step_up(self, principal: Principal, attrs: RequestAttributes) -> None:
        """Returns when the request carries a valid assertion; raises a WebAuthn challenge otherwise."""
        ...


class WebAuthnStepUp(Check):
    """The assertion a `step_up: webauthn` route requires."""

    per_request = True
    from_memory = False  # the challenge is consumed in the shared state

    def __init__(self, service: StepUp | None) -> None:
        self._service = service  # None: WebAuthn is not configured (a step-up route then fails closed)

    def for_route(self, route: Route) -> bool:
        """A route whose policy requires step-up."""
        return route.step_up

    async def check(
        self, principal: Principal, credential: Credential, attrs: RequestAttributes, route: Route
    ) -> Principal:
        """Raises a WebAuthn challenge unless the request carries a valid assertion."""
        if self._service is None:
            raise InternalError("step-up required but WebAuthn is not configured")
        await self._service.check_step_up(principal, attrs)
        return principal
