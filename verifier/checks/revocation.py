"""Revocation entries and CAEP claim announcements, checked on every request from the in-memory index."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from verifier.checks.base import Check, Route
from verifier.clock import Clock
from verifier.errors import ClaimInvalid, VerifierError
from verifier.numbers import json_number
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
    """Refuses a revoked token; applies claims announced since it was issued (its scopes and roles follow).

    An entry is kept for `max_lifetime` (`revocation.max_token_lifetime_seconds`) after its event, and the longest
    leeway a token's `exp` is given, so a token that lives longer than `max_lifetime` would be taken again once the
    entry that refused it is gone: such a token is refused (`token_outlives_revocation`), by its `exp - iat`, or by
    `exp - now` when it has no `iat`; without `exp` (an introspected token) once its age `now - iat` passes the
    bound."""

    def __init__(
        self,
        index: RevocationIndex,
        *,
        with_roles: Callable[[Principal], Principal],
        on_revoked: Callable[[str], None] | None = None,
        max_lifetime: float = math.inf,
        clock: Clock | None = None,
    ) -> None:
        self._index = index
        self._with_roles = with_roles  # the issuer's role rules, as at admission
        self._on_revoked = on_revoked or (lambda code: None)
        self._max_lifetime = max_lifetime
        self._clock = clock

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        """Raises the revocation's refusal, or returns the principal with announced claims."""
        if self._max_lifetime != math.inf:
            self._bounded(principal.claims)
        revoked = self._index.check(principal, attrs.headers)
        if revoked is not None:
            self._on_revoked(revoked.code)
            raise revoked
        override = self._index.overrides(principal)
        return self._overridden(principal, override) if override else principal

    def _bounded(self, claims: Mapping[str, Any]) -> None:
        """Refuses a token that may outlive the entries that would refuse it."""
        exp = json_number(claims.get("exp"))
        iat = json_number(claims.get("iat"))
        if exp is None:
            # An introspected token may have none (RFC 7662: optional), and live as long as its provider says
            # active. An entry reaching it (its event at or after `iat`) lives `max_lifetime` past its event, so once
            # the token is older than that such an entry may be gone: refused. With no `iat` either, every entry
            # reaches it while the entry lives (`index._reaches`); nothing more can be bounded.
            if iat is None or self._clock is None or self._clock.now() - iat <= self._max_lifetime:
                return
            raise ClaimInvalid(
                "the token is older than revocation.max_token_lifetime_seconds", claim="iat",
                code="token_outlives_revocation",
            )
        if iat is None:  # no issue time: its remaining life is the most that can be bounded
            iat = self._clock.now() if self._clock is not None else -math.inf
        if exp - iat > self._max_lifetime:
            raise ClaimInvalid(
                "the token lives longer than revocation.max_token_lifetime_seconds", claim="exp",
                code="token_outlives_revocation",
            )

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
