"""Revocation entries and CAEP claim announcements, checked on every request from the in-memory index."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from verifier.checks.base import Check, Route
from verifier.errors import VerifierError
from verifier.principal import Principal, roles_of, scopes_of
from verifier.request import RequestAttributes


class RevocationIndex(Protocol):
    """Revocation entries, checked on every decision (verifier.revocation.Revocations)."""

    def check(self, principal: Principal, headers: Mapping[str, str]) -> VerifierError | None:
        """The refusal for a revoked token, or None (`headers`: the request's, for the audit line's trace);
        raises `StateUnavailable` while the entries are not known."""
        ...

    def overrides(self, principal: Principal) -> Mapping[str, Any] | None:
        """Claims announced since the token was issued (CAEP assurance/claims changes), or None."""
        ...


class Revocation(Check):
    """Refuses a revoked token; applies claims announced since it was issued (its scopes and roles follow)."""

    def __init__(
        self,
        index: RevocationIndex,
        *,
        with_roles: Callable[[Principal], Principal],
        on_revoked: Callable[[str], None] | None = None,
    ) -> None:
        self._index = index
        self._with_roles = with_roles  # the issuer's role rules, as at admission
        self._on_revoked = on_revoked or (lambda code: None)

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        """Raises the revocation's refusal, or returns the principal with announced claims."""
        revoked = self._index.check(principal, attrs.headers)
        if revoked is not None:
            self._on_revoked(revoked.code)
            raise revoked
        override = self._index.overrides(principal)
        return self._overridden(principal, override) if override else principal

    def _overridden(self, principal: Principal, override: Mapping[str, Any]) -> Principal:
        """The principal with announced claims, its scopes and roles derived again as at admission."""
        claims = {**principal.claims, **override}
        if "scope" in override or "scp" in override:
            # The announced scope replaces the token's, whichever of the two claims the token used.
            for name in ("scope", "scp"):
                if name not in override:
                    claims.pop(name, None)
        changed = principal._replace(claims=claims, scopes=scopes_of(claims), roles=roles_of(claims))
        return self._with_roles(changed)
