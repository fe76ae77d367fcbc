"""`introspect_jwts`: the issuer's word (RFC 7662) on a JWT, asked on every request (cached by the introspector)."""

from __future__ import annotations

from collections.abc import Mapping

from verifier.authenticators import Introspector
from verifier.checks.base import Check, Route
from verifier.credentials import Credential
from verifier.observe import audit
from verifier.principal import Principal
from verifier.request import RequestAttributes


class IntrospectJwts(Check):
    """A JWT of an issuer configured with `introspect_jwts` is still active at its issuer."""

    per_request = True  # the provider's word, not the token's, decides each time
    from_memory = False

    def __init__(self, issuers: frozenset[str], introspectors: Mapping[str, Introspector]) -> None:
        self._issuers = issuers  # the issuers with introspect_jwts
        # An issuer without introspection settings has no introspector: its tokens fail closed (500).
        self._introspectors = introspectors

    def for_token(self, principal: Principal, credential: Credential) -> bool:
        """The token's issuer asks for it."""
        return principal.issuer in self._issuers

    async def check(
        self, principal: Principal, credential: Credential, attrs: RequestAttributes, route: Route
    ) -> Principal:
        """Raises when the issuer says the token is no longer active."""
        await self._introspectors[principal.issuer].introspect(credential.token, audit.token_hash(credential.token))
        return principal
