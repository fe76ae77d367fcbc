"""A claim named in the config: its exact name first, else a dotted path whose every step is a JSON object."""

from __future__ import annotations

from typing import Any

import pytest

from verifier.claimpath import MAX_SEGMENTS, claim_path_problem, claim_steps, find_claim

KEYCLOAK = {
    "realm_access": {"roles": ["admin", "offline_access"]},
    "resource_access": {"orders-api": {"roles": ["writer"]}, "account": {"roles": ["view-profile"]}},
    "https://example.com/roles": ["auth0-admin"],
}


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("realm_access.roles", ["admin", "offline_access"]),
        ("resource_access.orders-api.roles", ["writer"]),
        ("https://example.com/roles", ["auth0-admin"]),  # a name with dots of its own: read as it is
        ("realm_access", {"roles": ["admin", "offline_access"]}),
    ],
)
def test_a_claim_is_its_exact_name_else_its_dotted_path(name: str, found: Any) -> None:
    assert find_claim(KEYCLOAK, name, claim_steps(name)) == found
    assert find_claim(KEYCLOAK, name) == found  # split where it is read (upstream headers): the same value


@pytest.mark.parametrize(
    "claims",
    [
        {"realm_access": [{"roles": ["admin"]}]},  # a list where the path needs an object
        {"realm_access": '{"roles": ["admin"]}'},  # a string (JSON text) where the path needs an object
        {"realm_access": 7},
        {"realm_access": None},
        {"realm_access": {"groups": ["admin"]}},  # the role under a sibling key
        {"realm_accessx": {"roles": ["admin"]}},
        {},
    ],
    ids=["list", "string", "number", "null", "sibling", "other-name", "absent"],
)
def test_a_path_through_anything_but_an_object_is_no_value(claims: dict[str, Any]) -> None:
    assert find_claim(claims, "realm_access.roles", claim_steps("realm_access.roles")) is None


def test_the_exact_name_wins_over_the_path_and_a_flat_name_walks_nothing() -> None:
    claims = {"org.x": "flat", "org": {"x": "nested"}, "groups": ["g"]}
    assert find_claim(claims, "org.x", claim_steps("org.x")) == "flat"
    assert claim_steps("groups") == ()  # a flat claim: no steps, nothing split
    assert find_claim(claims, "groups", ()) == ["g"]
    assert find_claim(claims, "missing", ()) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("realm_access..roles", "a segment is empty"),
        (".roles", "a segment is empty"),
        ("realm_access.", "a segment is empty"),
        ("", "a segment is empty"),
        (".".join(["a"] * (MAX_SEGMENTS + 1)), f"at most {MAX_SEGMENTS}"),
    ],
)
def test_a_name_that_could_never_match_is_a_problem(name: str, problem: str) -> None:
    assert problem in claim_path_problem(name)


@pytest.mark.parametrize(
    "name",
    [
        "groups",
        "realm_access.roles",
        "resource_access.my-api.roles",
        "https://example.com/roles",
        ".".join(["a"] * MAX_SEGMENTS),
    ],
)
def test_names_and_paths_that_can_match_are_no_problem(name: str) -> None:
    assert claim_path_problem(name) == ""
