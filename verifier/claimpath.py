"""A claim the config names: its exact name, else a dotted path into nested JSON objects.

One reading for every claim an operator names (role rules, upstream headers, the Kong consumer, `tenant_claim`):
- the exact top-level name comes first: a namespaced claim whose name holds dots of its own
  (`https://example.com/roles`, Auth0's custom claims) is read as it is whenever the token has it, as before
  paths existed;
- else a name with dots is a path: `realm_access.roles` is Keycloak's realm roles
  (`{"realm_access": {"roles": [...]}}`), `resource_access.my-api.roles` a client's roles. Every step but the
  last must be a JSON object: a list, a string, a number or a missing member on the way is no value, so a rule
  on it matches nothing (fail closed);
- a path is checked and split once, at start-up (`claim_path_problem`, `claim_steps`): no empty segment
  (`a..b`, a leading or trailing dot: a typo that would never match) and at most MAX_SEGMENTS of them.
A member whose own name holds a dot (a Keycloak client id `api.example.com`) cannot be a step: map that
client's roles to a flat claim at the provider (a client-role mapper's "Token Claim Name").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# segments: the deepest path walked. Providers nest roles two or three deep (Keycloak's
# resource_access.<client>.roles); a longer name is a mistake, not a claim.
MAX_SEGMENTS = 8

_ABSENT = object()


def claim_path_problem(name: str) -> str:
    """Why `name` cannot name a claim (empty: it can), for a config error naming its key."""
    steps = name.split(".")
    if not all(steps):
        return (
            f"{name!r} is not a claim name or dotted path: a segment is empty (two dots in a row, or a leading or "
            "trailing dot)"
        )
    if len(steps) > MAX_SEGMENTS:
        return f"{name!r} is a dotted path of {len(steps)} segments; at most {MAX_SEGMENTS} are walked"
    return ""


def claim_steps(name: str) -> tuple[str, ...]:
    """The members `name` walks when the token has no claim of that exact name; () for a name without a dot."""
    return tuple(name.split(".")) if "." in name else ()


def find_claim(claims: Mapping[str, Any], name: str, steps: Sequence[str] | None = None) -> Any:
    """The claim called `name`, else the value at its dotted path; None when absent or a step is not an object.

    `steps` is `claim_steps(name)`, split at start-up; without it the name is split here.
    """
    value = claims.get(name, _ABSENT)
    if value is not _ABSENT:
        return value
    walk = name.split(".") if steps is None else steps
    if not walk:
        return None
    value = claims.get(walk[0])
    for step in walk[1:]:
        if not isinstance(value, dict):  # a JSON object; a list, a string, a number: no member to take
            return None
        value = value.get(step)
    return value
