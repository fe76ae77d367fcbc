"""Readers for RFC 9728 answers, shared by the unit and the gateway tests: a challenge parsed as RFC 9110
auth-params, and a metadata document checked against RFC 9728 sections 2 and 3.3."""

from __future__ import annotations

import re
from typing import Any

from verifier.policy.metadata import WELL_KNOWN, metadata_url

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:({_TOKEN})|"((?:[^"\\]|\\.)*)")\s*(?:,|$)')


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """One challenge (RFC 9110 section 11.6.1): the scheme and its auth-params; fails on anything else."""
    scheme, _, rest = value.partition(" ")
    assert re.fullmatch(_TOKEN, scheme), value
    params: dict[str, str] = {}
    position = 0
    while position < len(rest):
        found = _PARAM.match(rest, position)
        assert found is not None, f"not an auth-param list at {rest[position:]!r}"
        name = found.group(1).lower()
        assert name not in params, f"{name} given twice"
        params[name] = found.group(2) if found.group(2) is not None else re.sub(r"\\(.)", r"\1", found.group(3))
        position = found.end()
    return scheme, params


def check_rfc9728_document(document: dict[str, Any], fetched_from: str) -> None:
    """RFC 9728 section 2 member types, and section 3.3: `resource` is the identifier behind `fetched_from`."""
    assert isinstance(document.get("resource"), str), "resource is REQUIRED"
    origin, _, path = fetched_from.partition(WELL_KNOWN)
    expected = origin + path if path else origin
    assert document["resource"] in (expected, expected + "/"), (document["resource"], fetched_from)
    assert metadata_url(document["resource"]) == fetched_from
    assert "#" not in document["resource"]
    for member in ("authorization_servers", "scopes_supported", "bearer_methods_supported",
                   "dpop_signing_alg_values_supported"):  # fmt: skip
        if member in document:
            assert isinstance(document[member], list) and document[member], member
            assert all(isinstance(item, str) and item for item in document[member]), member
    assert set(document.get("bearer_methods_supported", [])) <= {"header", "body", "query"}
    assert "none" not in document.get("dpop_signing_alg_values_supported", [])
    for member in ("dpop_bound_access_tokens_required", "tls_client_certificate_bound_access_tokens"):
        assert isinstance(document.get(member, False), bool), member
    assert isinstance(document.get("resource_name", ""), str)
