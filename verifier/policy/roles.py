"""Maps identities to logical roles, per issuer, once per verified token (the result is cached with it)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from verifier.claimpath import claim_steps, find_claim
from verifier.principal import Principal, shared_roles
from verifier.settings import RoleRule

# Claims whose string form is a space-separated list (RFC 6749 section 3.3's `scope`; Entra's `scp`). Any other
# string claim is one value: split, a single-valued attribute a user may edit (`"Not platform-admins"`, a Keycloak
# user attribute, a profile field) would hold the word `platform-admins` and grant its role.
SPACE_SEPARATED_CLAIMS = frozenset({"scope", "scp"})
# Claims a user sets at the provider, which says whether it checked them (OIDC Core 5.1): a rule on one grants only
# when its `_verified` claim is `true`. An address a user typed in and never confirmed may be anyone's (the
# mapped `boss@corp.example`): good enough to refuse on (revocation), never to grant on. A path ending in one of them
# (`contact.email`) needs the `_verified` member beside it (`contact.email_verified`): the top-level flag vouches for
# the top-level claim only.
VERIFIED_BY = {"email": "email_verified", "phone_number": "phone_number_verified"}


def _verified_by(claim: str) -> str:
    """The claim that must be `true` for a rule on `claim` to grant ("": none)."""
    parent, dot, last = claim.rpartition(".")
    verified = VERIFIED_BY.get(last, "")
    return f"{parent}{dot}{verified}" if verified else ""


class RoleMapper:
    """Applies an issuer's role rules to a token's claims."""

    def __init__(self, rules: tuple[RoleRule, ...]) -> None:
        # A claim's path is split here, once (`verifier.claimpath`); a rule on a flat claim has no steps and costs
        # what it did before paths existed.
        compiled = []
        for r in rules:
            verified = _verified_by(r.claim)
            compiled.append(
                (
                    r.role,
                    r.claim,
                    claim_steps(r.claim),
                    frozenset(r.values),
                    r.scope,
                    frozenset(r.subjects),
                    verified,
                    claim_steps(verified),
                )
            )
        self._rules = tuple(compiled)

    def roles(
        self, claims: Mapping[str, Any], subject: str, scopes: tuple[str, ...], base: frozenset[str]
    ) -> frozenset[str]:
        """`base` (a `roles` claim) plus every role whose rule matches."""
        if not self._rules:
            return base
        granted = set(base)
        for role, claim, steps, values, scope, subjects, verified, verified_steps in self._rules:
            if claim and (
                not verified
                or (find_claim(claims, verified, verified_steps) if verified_steps else claims.get(verified)) is True
            ):
                value = find_claim(claims, claim, steps) if steps else claims.get(claim)
                if isinstance(value, str):
                    items: Any = value.split(" ") if claim in SPACE_SEPARATED_CLAIMS else (value,)
                else:
                    items = value if isinstance(value, list) else ()
                if any(isinstance(v, str) and v in values for v in items):
                    granted.add(role)
                    continue
            if scope and scope in scopes:
                granted.add(role)
                continue
            if subjects and subject and subject in subjects:  # "" is a client: never a listed user
                granted.add(role)
        return base if len(granted) == len(base) else shared_roles(frozenset(granted))  # one set per distinct set


class IssuerRoles:
    """Every issuer's role rules: the roles a principal gets at admission (and again after announced claims)."""

    def __init__(self, mappers: Mapping[str, RoleMapper], *, configured: Callable[[str], str] | None = None) -> None:
        """`configured` names the `issuers[]` entry of a token's issuer (a template's, for its tenants)."""
        self._mappers = dict(mappers)
        self._configured = configured

    def __call__(self, principal: Principal) -> Principal:
        """The principal with its issuer's roles added."""
        mapper = self._mappers.get(principal.issuer)
        if mapper is None and self._configured is not None and self._mappers:
            mapper = self._mappers.get(self._configured(principal.issuer))
        if mapper is None:
            return principal
        roles = mapper.roles(principal.claims, principal.subject, principal.scopes, principal.roles)
        return principal._replace(roles=roles)
