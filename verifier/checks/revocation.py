"""Revocation entries and CAEP claim announcements, checked on every request from the in-memory index.

A claims announcement (CAEP `token-claims-change`, `assurance-level-change`) comes from a transmitter, and a
transmitter is not always the identity provider: by default (`claims_change: restrict`) it may only take away.
The rule, for a token some announcement reaches:

- announcements from `replace` transmitters (the provider itself) replace the claims they name, newest last;
- then every claim whose newest announcement came from a `restrict` transmitter keeps only what that
  announcement and the token's claims so far both hold: a list (and the space-separated `scope`) the values in
  both, in the announcement's order; any other value only when equal, else the claim is left out (an `acr` moved
  either way reads as none: a route that requires one challenges for step-up). `scope` and `scp` are one claim:
  an announcement naming either replaces the token's whichever of the two it used.

So without a `replace` transmitter every claim the token is judged on, and presented upstream with (headers,
identity assertion), is one the token itself holds: scopes and roles derived from them are subsets of the
token's own, and the route policy's requirements (roles, scopes, acr, amr; `auth_time` is never announced) can
only be met less. A token no announcement reaches is not touched: the index answers None from one dict test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from verifier.checks.base import Check, Route
from verifier.clock import Clock
from verifier.credentials import Credential
from verifier.errors import ClaimInvalid, VerifierError
from verifier.numbers import json_number
from verifier.principal import Principal, roles_of, scopes_of
from verifier.request import RequestAttributes


class Announcement(Protocol):
    """A CLAIMS_OVERRIDE entry (verifier.revocation.entry.Entry): who said it, and the claims it announces."""

    @property
    def source(self) -> str:
        """The transmitter's issuer (or `operator`)."""
        ...

    @property
    def overrides(self) -> Mapping[str, Any] | None:
        """Claim -> announced value."""
        ...


class RevocationIndex(Protocol):
    """Revocation entries, checked on every decision (verifier.revocation.Revocations)."""

    def check(self, principal: Principal, headers: Mapping[str, str]) -> VerifierError | None:
        """The refusal for a revoked token, or None (`headers`: the request's, for the audit line's trace);
        raises `StateUnavailable` while the entries are not known."""
        ...

    def overrides(self, principal: Principal) -> Sequence[Announcement] | None:
        """Claims announced since the token was issued (CAEP assurance/claims changes), oldest first, or None."""
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
        may_raise: frozenset[str] = frozenset(),
    ) -> None:
        self._index = index
        self._may_raise = may_raise  # transmitters with `claims_change: replace`; every other source restricts
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
        announced = self._index.overrides(principal)
        return self._overridden(principal, announced) if announced else principal

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

    def _overridden(self, principal: Principal, announced: Sequence[Announcement]) -> Principal:
        """The principal with announced claims (module docstring), its scopes and roles derived again as at
        admission."""
        claims = announced_claims(principal.claims, announced, self._may_raise)
        changed = principal._replace(claims=claims, scopes=scopes_of(claims), roles=roles_of(claims))
        return self._with_roles(changed)


class TokenAgeBound(Check):
    """How long an allow for a token without `exp` may be reused: until `Revocation` refuses it for its age.

    `Revocation` refuses such a token (an introspection answer: RFC 7662 makes `exp` optional) once `now - iat` passes
    `max_lifetime`, a moment its answer's freshness (the positive TTL) may outlast: the gateway (`max-age`) and the
    doors' answer memos (`Pipeline.decide_cached_stable`) reused the allow past it. A check of its own, not
    `Revocation.reuse_left`: only such tokens have it in their plan (`for_token`, asked once at admission), so a
    cached JWT's answer costs nothing more. It refuses nothing itself."""

    def __init__(self, max_lifetime: float) -> None:
        self._max_lifetime = max_lifetime

    def for_token(self, principal: Principal, credential: Credential) -> bool:
        """A token without `exp` but with `iat`: the one whose refusal comes with its age."""
        claims = principal.claims
        return json_number(claims.get("exp")) is None and json_number(claims.get("iat")) is not None

    def reuse_left(self, principal: Principal, route: Route, now: float) -> float | None:
        """Seconds until the token is older than `max_lifetime`."""
        iat = json_number(principal.claims.get("iat"))
        return None if iat is None else iat + self._max_lifetime - now

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        """Passes: `Revocation` refuses."""
        return principal


_ABSENT: Any = object()  # an announcement naming `scope` leaves out the token's `scp`, and the other way round
_SCOPE_CLAIMS = ("scope", "scp")


def _named(override: Mapping[str, Any]) -> Mapping[str, Any]:
    """The claims an announcement names: `scope` and `scp` together (the one it does not use, as absent)."""
    if "scope" in override or "scp" in override:
        return {**override, **{name: override.get(name, _ABSENT) for name in _SCOPE_CLAIMS}}
    return override


def announced_claims(
    own: Mapping[str, Any], announced: Sequence[Announcement], may_raise: frozenset[str]
) -> dict[str, Any]:
    """The token's claims `own` after the announcements (oldest first), as the module docstring says."""
    claims = dict(own)
    newest: dict[str, Any] = {}  # claim -> what the newest `restrict` announcement naming it says
    for entry in announced:
        named = _named(entry.overrides or {})
        if entry.source in may_raise:
            for name, value in named.items():
                newest.pop(name, None)  # a later word of the provider stands as it is
                if value is _ABSENT:
                    claims.pop(name, None)
                else:
                    claims[name] = value
        else:
            newest.update(named)
    if not newest:
        return claims
    held_scopes = frozenset(scopes_of(claims))  # before any restriction: the scopes the token (so far) holds
    for name, value in newest.items():
        mine = claims.get(name, _ABSENT)
        kept = _scopes_held(value, held_scopes) if name in _SCOPE_CLAIMS else _held(mine, value)
        if kept is _ABSENT:
            claims.pop(name, None)
        else:
            claims[name] = kept
    return claims


def _scopes_held(value: Any, held: frozenset[str]) -> Any:
    """An announced `scope` (space-separated) or `scp` (list or string), keeping only scopes the token holds."""
    if value is _ABSENT or not isinstance(value, str | list):
        return _ABSENT
    kept = [s for s in scopes_of({"scp": value}) if s in held]
    return kept if isinstance(value, list) else " ".join(kept)


def _key(value: Any) -> tuple[type, Any] | None:
    """A list element compared by type and value (`True` is not `1`); None for one that is not a JSON scalar."""
    return (type(value), value) if value is None or isinstance(value, str | int | float | bool) else None


def _held(mine: Any, announced: Any) -> Any:
    """What both the token's value and the announced one hold: for two lists, the announced elements the token's
    list has too; else the value when the two are equal; else absent."""
    if mine is _ABSENT:
        return _ABSENT
    if isinstance(mine, list) and isinstance(announced, list):
        have = {k for k in map(_key, mine) if k is not None}
        return [v for v in announced if (k := _key(v)) is not None and k in have]
    if type(mine) is type(announced) and mine == announced:
        return mine
    return _ABSENT
