"""The identity behind a verified credential: what policy and the upstream headers work from.

JWT claims and (later) introspection responses both become a `Principal`, so every policy works on
both kinds of token.

Users and clients are separate namespaces. `subject` is the token's `sub` and nothing else: a
client-credentials token (no `sub`) has the subject "" and is known by its `client_id`. So a client
registered as `alice` never matches what is keyed on the user `alice`: `subjects:` role rules,
revocation entries, WebAuthn credentials; and the rate limiter keys on `caller`, which keeps the two
apart.

Which client a token is for is read in one place, `clients_of`, and held with the principal: `client_id`
(RFC 9068 section 2.2, RFC 7662 section 2.2, RFC 8693 section 4.3) and `azp` (OIDC Core 2). Most providers set one
of them, or both to the same client; a token whose two differ (one client requesting a token in another's session,
as a Keycloak token exchange can) names two clients, `client_id` and `other_client`, and every reader takes both:
a route's `clients_any` must list each, a revocation naming either refuses it (README, "Which client a token
is for").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from verifier.errors import ClaimInvalid


class Principal(NamedTuple):
    """A verified caller.

    Immutable (`_replace` for a changed copy). A NamedTuple rather than a frozen dataclass, like
    `RequestAttributes`: one is built for every first-seen token, and a frozen dataclass's `__init__`
    (one `object.__setattr__` per field) costs ~4x a tuple's.
    """

    issuer: str
    subject: str  # `sub`; "" for a client-credentials token (no `sub`), which `client_id` names
    client_id: str | None  # the client it was issued to (`clients_of`): `client_id`, else `azp`
    scopes: tuple[str, ...]
    roles: frozenset[str]
    expires_at: float  # epoch seconds; nothing derived from this principal outlives it
    claims: Mapping[str, Any]
    kid: str | None = None
    alg: str = ""
    other_client: str | None = None  # a second client: `azp` when it names another than `client_id` (`clients_of`)

    @property
    def caller(self) -> str:
        """Who is calling, users and clients apart: `sub:<sub>`, or `client:<client_id>` without a `sub`."""
        return f"sub:{self.subject}" if self.subject else f"client:{self.client_id or ''}"

    @property
    def scope(self) -> str:
        """Space-separated scopes (RFC 8693 section 4.2 / RFC 9068 `scope`)."""
        return " ".join(self.scopes)


NO_ROLES: frozenset[str] = frozenset()  # every principal without roles holds this one (CPython builds a new empty one)
# A principal lives in the verified-token cache as long as its token (up to 100,000 of them per worker): the role
# sets and scope tuples that many tokens share are held once, not once per token (a frozenset is a GC-tracked
# object of 216 bytes and more). Bounded: past the bound, a new one is kept by its principal alone.
MAX_SHARED = 4096
_ROLE_SETS: dict[frozenset[str], frozenset[str]] = {}
_SCOPES: dict[str, tuple[str, ...]] = {}


def shared_roles(roles: frozenset[str]) -> frozenset[str]:
    """The one held copy of an equal role set (`NO_ROLES` when empty), else `roles` itself, kept from now on
    while the table has room."""
    if not roles:
        return NO_ROLES
    held = _ROLE_SETS.get(roles)
    if held is None:
        if len(_ROLE_SETS) >= MAX_SHARED:
            return roles
        held = _ROLE_SETS[roles] = roles
    return held


def clients_of(claims: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The clients a token (or an introspection answer) names: `client_id`, else `azp`, and, when both are there and
    differ, `azp` as the second: (None, None) for none. The one reading of both claims every check, revocation, the
    rate limiter, the audit line and the upstream take, from the principal that holds it.

    The same claim means the same party in both specs, the client that requested the token (RFC 9068 section 2.2,
    RFC 8693 section 4.3; OIDC Core 2's authorized party): two different values are two clients, and which of them
    is the one presenting it is the provider's to say, not ours, so the caller takes both. An empty string names
    no client (absent); any other value that is not a string refuses the token (`claim_invalid`): no revocation
    entry, allow-list or upstream header could name that client the same way."""
    client_id = claims.get("client_id")
    azp = claims.get("azp")
    # The common shapes first (one first-seen token each): one claim, or both naming the same client.
    if azp is None or azp == client_id:
        if client_id.__class__ is str and client_id:
            return client_id, None
        if client_id is None:
            return None, None
    elif client_id is None and azp.__class__ is str and azp:
        return azp, None
    client_id = _client_claim(client_id, "client_id")
    azp = _client_claim(azp, "azp")
    if client_id is None:
        return azp, None
    return client_id, azp if azp is not None and azp != client_id else None


def _client_claim(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ClaimInvalid(f"{name} is not a string", claim=name)
    return value


def scopes_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """Scopes from `scope` (space-separated string) or `scp` (list; Okta, Entra).

    Only scopes the upstream reads as they are judged: one with a control character (which the identity header
    loses: `ad<TAB>min` would be `admin` there) or other white space (NBSP: Python's `str.split` splits on it) is
    left out, as is a `scp` item with a space (one scope here, two in `X-Authenticated-Scope`)."""
    scope = claims.get("scope")
    if isinstance(scope, str):
        held = _SCOPES.get(scope)  # one tuple per distinct `scope` string (its strings with it), bounded
        if held is None:
            held = _split(scope)
            if len(_SCOPES) < MAX_SHARED:
                _SCOPES[scope] = held
        return held
    scp = claims.get("scp")
    if isinstance(scp, list):
        return tuple(s for s in scp if isinstance(s, str) and s and s.isprintable() and " " not in s)
    if isinstance(scp, str):
        return _split(scp)
    return ()


def _split(scope: str) -> tuple[str, ...]:
    """RFC 6749 section 3.3: scope-tokens separated by spaces (the empty strings between repeated spaces dropped)."""
    if scope.isprintable():  # the common case: no control character or other white space in any of them
        return tuple(filter(None, scope.split(" ")))
    return tuple(s for s in scope.split(" ") if s and s.isprintable())


def roles_of(claims: Mapping[str, Any]) -> frozenset[str]:
    """A `roles` claim that is a list of strings counts as roles as it stands: the roles the upstream reads as they
    are judged. `X-Authenticated-Roles` joins them with commas, so a role with a comma in it (`viewer,admin`: admin
    there), a control character the header loses (`ad<NUL>min`) or a space at either end an upstream trims is left
    out."""
    roles = claims.get("roles")
    if isinstance(roles, list):
        return shared_roles(frozenset(r for r in roles if isinstance(r, str) and r and _conveyed_role(r)))
    return NO_ROLES


def _conveyed_role(role: str) -> bool:
    return role.isprintable() and "," not in role and role[0] != " " and role[-1] != " "


def confirmation(principal: Principal) -> Mapping[str, Any]:
    """The token's `cnf` claim (RFC 7800): the key or certificate it is bound to; empty when unbound."""
    cnf = principal.claims.get("cnf")
    return cnf if isinstance(cnf, dict) else {}
