"""Per-route trust (#21 item 3) with the real oidc-provider as tenant A and a second issuer as tenant B.

The verifier runs as `python -m verifier serve` and is asked through its forward-auth door. Tokens of
tenant A (the provider's JWTs and opaque tokens) are refused on tenant B's routes and the reverse; an
opaque token on a route that does not trust A never reaches A's introspection endpoint (counted by
the provider itself); a wrong `aud` or client (`azp`/`client_id`) is refused on the route that names
the right one and allowed elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from gateways import GatewayProcess, HttpResult, LocalIssuer, http_request, start_verifier
from op_harness import (
    API_AUDIENCE,
    OPAQUE_RESOURCE,
    OTHER_AUDIENCE,
    VERIFIER_CLIENT_ID,
    VERIFIER_CLIENT_SECRET,
    OpenIDProvider,
)
from rigs import provider_fixture

pytestmark = pytest.mark.integration


op = provider_fixture("op", scope="module")


@pytest.fixture(scope="module")
def tenant_b() -> Iterator[LocalIssuer]:
    server = LocalIssuer(audience=API_AUDIENCE)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def verifier(
    op: OpenIDProvider, tenant_b: LocalIssuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    issuers: list[dict[str, Any]] = [
        {
            "issuer": op.issuer,
            "audiences": [API_AUDIENCE, OTHER_AUDIENCE, OPAQUE_RESOURCE],
            "algorithms": ["ES256", "RS256", "EdDSA"],
            "allow_insecure_http": True,
            "introspection": {"client_id": VERIFIER_CLIENT_ID, "client_secret_env": "ROUTE_TRUST_OP_SECRET"},
        },
        {"issuer": tenant_b.issuer, "audiences": [API_AUDIENCE], "algorithms": ["ES256"], "allow_insecure_http": True},
    ]
    policies = [
        {"name": "tenant-a", "match": {"path_prefix": "/tenant-a/"}, "require": {"issuers_any": [op.issuer]}},
        {"name": "tenant-b", "match": {"path_prefix": "/tenant-b/"}, "require": {"issuers_any": [tenant_b.issuer]}},
        {"name": "other", "match": {"path_prefix": "/other/"}, "require": {"audiences_any": [OTHER_AUDIENCE]}},
        {"name": "app-only", "match": {"path_prefix": "/app-only/"}, "require": {"clients_any": ["app"]}},
        {"name": "rest", "match": {"path_prefix": "/"}},
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTE_TRUST_OP_SECRET", VERIFIER_CLIENT_SECRET)
        proc = start_verifier(
            tmp_path_factory.mktemp("route-trust"),
            issuer=op.issuer,
            extra_config={"issuers": issuers, "policies": policies},
        )
    yield proc
    proc.stop()


def _ask(v: GatewayProcess, path: str, token: str) -> HttpResult:
    headers = {"X-Forwarded-Method": "GET", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.test",
               "X-Forwarded-Uri": path, "Authorization": f"Bearer {token}"}  # fmt: skip
    return http_request(f"{v.url}/v1/forward-auth", headers=headers)


def _verdict(answer: HttpResult) -> tuple[int, str]:
    return answer.status, answer.headers.get("x-verifier-reason", "")


def test_each_tenants_tokens_pass_only_their_own_routes(
    verifier: GatewayProcess, op: OpenIDProvider, tenant_b: LocalIssuer
) -> None:
    a_token, b_token = op.client_credentials_token(), tenant_b.mint()
    assert _verdict(_ask(verifier, "/tenant-a/x", a_token)) == (200, "ok")
    assert _verdict(_ask(verifier, "/tenant-b/x", a_token)) == (401, "issuer_not_trusted")
    assert _verdict(_ask(verifier, "/tenant-b/x", b_token)) == (200, "ok")
    refused = _ask(verifier, "/tenant-a/x", b_token)
    assert _verdict(refused) == (401, "issuer_not_trusted")
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert _verdict(_ask(verifier, "/anything", a_token)) == (200, "ok")  # no issuers_any: the global rule
    assert _verdict(_ask(verifier, "/anything", b_token)) == (200, "ok")


def test_an_opaque_token_goes_only_to_an_introspection_endpoint_the_route_trusts(
    verifier: GatewayProcess, op: OpenIDProvider
) -> None:
    opaque = op.opaque_token()
    before = op.stats()["introspection"]
    assert _verdict(_ask(verifier, "/tenant-b/x", opaque)) == (401, "issuer_not_trusted")
    assert op.stats()["introspection"] == before, "the opaque token was sent to an issuer the route does not trust"
    assert _verdict(_ask(verifier, "/tenant-a/x", opaque)) == (200, "ok")
    assert op.stats()["introspection"] == before + 1
    assert _verdict(_ask(verifier, "/tenant-b/x", opaque)) == (401, "issuer_not_trusted")  # cached principal
    assert op.stats()["introspection"] == before + 1


def test_a_wrong_audience_or_client_is_refused_on_the_route_that_names_the_right_one(
    verifier: GatewayProcess, op: OpenIDProvider
) -> None:
    api, other = op.client_credentials_token(), op.client_credentials_token(resource=OTHER_AUDIENCE)
    assert _verdict(_ask(verifier, "/other/x", other)) == (200, "ok")
    assert _verdict(_ask(verifier, "/other/x", api)) == (401, "audience_not_trusted")
    assert _verdict(_ask(verifier, "/anything", api)) == (200, "ok")
    foreign = op.client_credentials_token(client_id=VERIFIER_CLIENT_ID, client_secret=VERIFIER_CLIENT_SECRET)
    assert _verdict(_ask(verifier, "/app-only/x", api)) == (200, "ok")  # client app
    refused = _ask(verifier, "/app-only/x", foreign)
    assert _verdict(refused) == (403, "client_not_allowed")
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]
    assert _verdict(_ask(verifier, "/anything", foreign)) == (200, "ok")
