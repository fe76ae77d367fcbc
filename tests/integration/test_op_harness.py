"""Tests of the OpenID Provider harness: a real node-oidc-provider issues what the verifier will check."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from op_harness import (  # tests/integration is on sys.path (pytest rootdir-relative import)
    ALGORITHMS,
    API_AUDIENCE,
    OPAQUE_RESOURCE,
    OTHER_AUDIENCE,
    OpenIDProvider,
    ProviderError,
    jwk_thumbprint,
)
from rigs import provider_fixture

pytestmark = pytest.mark.integration


op = provider_fixture("op", scope="module")


fresh_op = provider_fixture("fresh_op")  # a provider of its own, for tests that rotate keys or restart


def fetch_json(url: str) -> Any:
    """GET like a relying party would (no harness header, so the provider counts it)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def verify(op: OpenIDProvider, token: str, alg: str, audience: str = API_AUDIENCE) -> dict[str, Any]:
    """Verify ``token`` with pyjwt against the JWKS the provider serves now."""
    kid = jwt.get_unverified_header(token)["kid"]
    jwks = fetch_json(op.jwks_uri)
    [jwk] = [k for k in jwks["keys"] if k["kid"] == kid]
    key = jwt.PyJWK(jwk)
    return jwt.decode(token, key, algorithms=[alg], audience=audience, issuer=op.issuer)


def test_discovery_names_every_endpoint_on_loopback(op: OpenIDProvider) -> None:
    doc = fetch_json(op.discovery_url)
    assert doc["issuer"] == op.issuer
    assert op.issuer.startswith("http://127.0.0.1:")
    assert doc["jwks_uri"] == op.jwks_uri
    assert doc["token_endpoint"] == op.token_endpoint
    assert doc["introspection_endpoint"] == op.introspection_endpoint
    assert doc["revocation_endpoint"] == op.revocation_endpoint
    assert doc["authorization_endpoint"] == f"{op.issuer}/auth"
    assert "client_credentials" in doc["grant_types_supported"]
    assert "ES256" in doc["dpop_signing_alg_values_supported"]


def test_jwks_serves_one_public_key_per_algorithm(op: OpenIDProvider) -> None:
    keys = fetch_json(op.jwks_uri)["keys"]
    assert {k["alg"] for k in keys} == set(ALGORITHMS)
    assert {k["kid"] for k in keys} == set(op.signing_kids().values()) == set(op.kids())
    for key in keys:
        assert "d" not in key and "p" not in key, "a private member leaked into the public JWKS"


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_issues_rfc9068_jwt_signed_with_each_algorithm(op: OpenIDProvider, alg: str) -> None:
    token = op.client_credentials_token(alg=alg, scope="read write")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == alg
    assert header["typ"] == "at+jwt"
    assert header["kid"] == op.signing_kids()[alg]

    claims = verify(op, token, alg)
    assert claims["iss"] == op.issuer
    assert claims["aud"] == API_AUDIENCE
    assert claims["client_id"] == claims["sub"] == "app"
    assert claims["scope"] == "read write"
    assert {"exp", "iat", "jti"} <= claims.keys()


def test_narrows_scope_to_what_was_asked(op: OpenIDProvider) -> None:
    claims = jwt.decode(op.client_credentials_token(scope="read"), options={"verify_signature": False})
    assert claims["scope"] == "read"


def test_other_resource_gets_a_token_for_another_audience(op: OpenIDProvider) -> None:
    token = op.client_credentials_token(resource=OTHER_AUDIENCE)
    assert verify(op, token, "ES256", audience=OTHER_AUDIENCE)["aud"] == OTHER_AUDIENCE
    with pytest.raises(jwt.InvalidAudienceError):
        verify(op, token, "ES256", audience=API_AUDIENCE)


def test_refuses_a_wrong_client_secret(op: OpenIDProvider) -> None:
    with pytest.raises(ProviderError, match="401"):
        op.client_credentials_token(client_secret="wrong")


def test_opaque_token_introspects_active_then_inactive_after_revocation(op: OpenIDProvider) -> None:
    token = op.opaque_token(scope="read")
    assert token.count(".") == 0, "expected an opaque token, not a JWT"

    info = op.introspect(token)
    assert info["active"] is True
    assert info["aud"] == OPAQUE_RESOURCE
    assert info["client_id"] == "app"
    assert info["scope"] == "read"
    assert info["iss"] == op.issuer

    op.revoke(token)
    assert op.introspect(token) == {"active": False}


def test_dpop_proof_binds_the_token_to_the_key(op: OpenIDProvider) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    response = op.token_response(alg="ES256", dpop_key=key)
    assert response["token_type"] == "DPoP"
    claims = verify(op, response["access_token"], "ES256")
    public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    assert claims["cnf"] == {"jkt": jwk_thumbprint(public_jwk)}


def test_dpop_bound_opaque_token_introspects_with_cnf(op: OpenIDProvider) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    token = op.opaque_token(dpop_key=key)
    info = op.introspect(token)
    assert info["active"] is True
    assert info["token_type"] == "DPoP"
    public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    assert info["cnf"] == {"jkt": jwk_thumbprint(public_jwk)}


def test_stats_count_jwks_and_introspection_calls_at_the_provider(op: OpenIDProvider) -> None:
    op.reset_stats()
    token = op.opaque_token()
    fetch_json(op.jwks_uri)
    jwt.PyJWKClient(op.jwks_uri, cache_keys=False).get_jwk_set()
    op.introspect(token, counted=True)
    op.introspect(token, counted=True)
    op.introspect(token)  # harness bookkeeping: not counted
    op.kids()  # likewise

    stats = op.stats()
    assert stats["jwks"] == 2
    assert stats["introspection"] == 2
    assert stats["token"] == 1
    assert stats["discovery"] == 0
    assert stats["total"] == 5


def test_rotation_serves_new_kids_and_signs_with_them(fresh_op: OpenIDProvider) -> None:
    op = fresh_op
    old_kids = op.signing_kids()
    old_tokens = {alg: op.client_credentials_token(alg=alg) for alg in ALGORITHMS}
    opaque = op.opaque_token()

    new_kids = op.rotate_keys()

    assert new_kids.keys() == set(ALGORITHMS)
    assert set(new_kids.values()).isdisjoint(old_kids.values())
    assert set(op.kids()) == set(new_kids.values()), "old keys must leave the JWKS"
    assert {k["kid"] for k in fetch_json(op.jwks_uri)["keys"]} == set(new_kids.values())
    assert op.stats()["reloads"] == 1
    for alg in ALGORITHMS:
        token = op.client_credentials_token(alg=alg)
        assert jwt.get_unverified_header(token)["kid"] == new_kids[alg]
        assert verify(op, token, alg)["iss"] == op.issuer
        with pytest.raises(ValueError):  # its kid is gone from the JWKS
            verify(op, old_tokens[alg], alg)
    assert op.introspect(opaque)["active"] is True, "a reload keeps issued opaque tokens"


def test_rotation_can_keep_previous_keys_published(fresh_op: OpenIDProvider) -> None:
    op = fresh_op
    old_kids = op.signing_kids()
    old_token = op.client_credentials_token(alg="RS256")

    new_kids = op.rotate_keys(retain_previous=True)

    assert set(op.kids()) == set(old_kids.values()) | set(new_kids.values())
    assert verify(op, old_token, "RS256")["aud"] == API_AUDIENCE
    new_token = op.client_credentials_token(alg="RS256")
    assert jwt.get_unverified_header(new_token)["kid"] == new_kids["RS256"]


def test_rotation_by_restart_keeps_the_issuer(fresh_op: OpenIDProvider) -> None:
    op = fresh_op
    issuer, old_kids = op.issuer, set(op.kids())

    new_kids = op.rotate_keys(restart=True)

    assert op.issuer == issuer
    assert fetch_json(op.discovery_url)["issuer"] == issuer
    assert set(op.kids()) == set(new_kids.values())
    assert old_kids.isdisjoint(op.kids())
    token = op.client_credentials_token(alg="EdDSA")
    assert verify(op, token, "EdDSA")["iss"] == issuer


def test_fault_injection_fails_the_jwks_endpoint_until_cleared(op: OpenIDProvider) -> None:
    op.set_fault("jwks", status=503)
    try:
        with pytest.raises(urllib.error.HTTPError) as caught:
            fetch_json(op.jwks_uri)
        assert caught.value.code == 503
    finally:
        op.clear_faults()
    assert fetch_json(op.jwks_uri)["keys"]


def test_stop_frees_the_port_and_start_reuses_it(fresh_op: OpenIDProvider) -> None:
    op = fresh_op
    port = op.port
    op.stop()
    assert not op.running
    with pytest.raises(urllib.error.URLError):
        fetch_json(op.discovery_url)
    op.start()
    assert op.port == port
    assert fetch_json(op.discovery_url)["issuer"] == op.issuer
