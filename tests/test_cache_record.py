"""What a verified token's cache record holds once per token and what it shares (#24 goal 2, a lighter record):
the role sets and scope tuples many tokens share are one object each; the forward-auth answer is held once."""

from __future__ import annotations

import pytest

from verifier import principal as principal_module
from verifier.decision import allow
from verifier.doors.forward_auth import _answer
from verifier.policy.roles import RoleMapper
from verifier.principal import NO_ROLES, Principal, roles_of, scopes_of, shared_roles
from verifier.settings import RoleRule
from verifier.tokens.jwt import principal_from_claims

CLAIMS = {"iss": "https://issuer.test", "sub": "alice", "aud": "api", "exp": 2e9, "scope": "read  write"}


def _fresh(text: str) -> str:
    """An equal string that is not the same object (as each decoded token's claims are)."""
    return "".join(list(text))


def test_a_principal_without_roles_holds_the_shared_empty_set() -> None:
    """Fails if `roles_of` returns `frozenset()` again: CPython 3.11 builds a new empty set each time."""
    assert principal_from_claims(dict(CLAIMS), "https://issuer.test").roles is NO_ROLES
    assert roles_of({"roles": ["", 7]}) is NO_ROLES  # nothing that counts as a role
    assert roles_of({"roles": "admin"}) is NO_ROLES  # not a list: no roles, as before


def test_equal_role_sets_of_two_tokens_are_one_object() -> None:
    """Fails without `shared_roles` in `roles_of`: each token's claims make their own set."""
    first = roles_of({"roles": [_fresh("admin"), _fresh("ops")]})
    second = roles_of({"roles": [_fresh("ops"), _fresh("admin"), _fresh("ops")]})
    assert first == frozenset({"admin", "ops"}) and first is second


def test_mapped_roles_are_shared_and_unchanged_sets_stay_as_they_are() -> None:
    """Fails without `shared_roles` in `RoleMapper.roles` (a new set per principal)."""
    mapper = RoleMapper((RoleRule(role="reader", scope="read"),))
    first = mapper.roles({}, "alice", ("read",), NO_ROLES)
    second = mapper.roles({}, "bob", ("read", "write"), NO_ROLES)
    assert first == frozenset({"reader"}) and first is second
    base = roles_of({"roles": ["reader"]})
    assert mapper.roles({}, "alice", ("read",), base) is base  # nothing added: the principal's own set
    assert mapper.roles({}, "alice", ("write",), NO_ROLES) is NO_ROLES


def test_the_shared_tables_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails if the tables grow past `MAX_SHARED` (claims come from every issuer's tokens)."""
    monkeypatch.setattr(principal_module, "_ROLE_SETS", {})
    monkeypatch.setattr(principal_module, "_SCOPES", {})
    monkeypatch.setattr(principal_module, "MAX_SHARED", 3)
    sets = [shared_roles(frozenset({f"role-{i}"})) for i in range(10)]
    scopes = [scopes_of({"scope": f"s{i} t"}) for i in range(10)]
    assert len(principal_module._ROLE_SETS) == 3 and len(principal_module._SCOPES) == 3
    assert [sorted(s) for s in sets] == [[f"role-{i}"] for i in range(10)]  # past the bound: as they came
    assert scopes == [(f"s{i}", "t") for i in range(10)]
    assert shared_roles(frozenset({_fresh("role-9")})) is not sets[9]  # not kept
    assert shared_roles(frozenset({_fresh("role-1")})) is sets[1]  # kept


def test_equal_scope_strings_give_one_tuple_with_the_same_scopes() -> None:
    """Fails without the `_SCOPES` table in `scopes_of` (a new tuple and strings per token)."""
    first = scopes_of({"scope": _fresh(" read  write ")})
    assert first == ("read", "write") and scopes_of({"scope": _fresh(" read  write ")}) is first
    assert scopes_of({"scp": ["a", "", 3]}) == ("a",) and scopes_of({"scp": "a  b"}) == ("a", "b")


@pytest.mark.parametrize("keep_alive", [True, False])
def test_the_forward_auth_answer_is_memoized_without_a_second_copy_of_its_head(keep_alive: bool) -> None:
    """Fails if the door memoizes the head besides the whole answer (`decision.http_head` there again)."""
    principal = Principal("https://issuer.test", "alice", "app", ("read",), NO_ROLES, 2e9, {})
    decision = allow(principal, cache_max_age=5)
    data = _answer(decision, keep_alive, {})
    assert "http" not in decision.memo and _answer(decision, keep_alive, {}) is data
    end = b"\r\n" if keep_alive else b"connection: close\r\n\r\n"
    assert data == decision.http_head + end  # the same bytes as the head built and memoized on its own
    assert decision.head_once() is decision.memo["http"]  # built once it is: read from the memo
