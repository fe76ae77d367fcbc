"""A token naming two clients, through every shipped gateway configuration, to the REAL verifier.

The attacker holds a token that names one client in `client_id` (RFC 9068 section 2.2) and another in `azp` (OIDC
Core 2): a token one client requested in another's name (a Keycloak token exchange of a service account's token
can carry both). A route takes only `svc-b`'s tokens, and the upstream is told the token's `client_id` in the
identity assertion (`X-Authenticated-Identity`, which every shipped gateway carries). Before one reading of the
client was shared, the route read `azp` first and revocation `client_id` first: the token
`{client_id: svc-a, azp: svc-b}` passed the route for svc-b, its upstream told svc-a, and the kill switch's
revocation of svc-b never reached it. Now a route takes a token only when it lists every client the token names,
and a revocation of either client refuses it (README, "Which client a token is for"). Each gateway judges every
request here (`edge_cache.max_age_seconds: 0`): reuse is test_gateway_reuse.py's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import EchoUpstream, GatewayProcess, HttpResult, LocalIssuer, http_request, kill_switch, start_verifier
from rigs import fresh_upstream_log, gateway_fixture  # noqa: F401 - autouse: each test sees only its own requests

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "the-admin-token-of-the-gateway-client-tests-0123"
ROUTE_CLIENT = "svc-b"
POLICIES = [
    {"name": "svc-b", "match": {"path_prefix": "/svc-b/"}, "require": {"clients_any": [ROUTE_CLIENT]}},
    {"name": "rest", "match": {"path_prefix": "/"}},
]


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("verifier")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp / "identity.pem").write_bytes(pem)
    assertion = {"issuer": "https://verifier.internal", "private_key_file": str(tmp / "identity.pem"),
                 "audience": "https://orders.internal", "claims": ["sub", "client_id"]}  # fmt: skip
    proc = start_verifier(
        tmp,
        issuer=issuer.issuer,
        extra_config={
            "policies": POLICIES,
            "upstream": {"identity_token": assertion},
            "edge_cache": {"max_age_seconds": 0},
            "revocation": {"transmitters": []},  # the kill switch alone
        },
        environment={"VERIFIER_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    yield proc
    proc.stop()


edge = gateway_fixture("edge")  # each shipped gateway in front of `verifier`


def _get(edge: str, path: str, token: str) -> HttpResult:
    return http_request(f"{edge}{path}", headers={"Authorization": f"Bearer {token}"})


def _told(upstream: EchoUpstream) -> list[object]:
    """The `client_id` each request that reached the upstream was told (its identity assertion's)."""
    return [
        jwt.decode(r.headers["x-authenticated-identity"], options={"verify_signature": False}).get("client_id")
        for r in upstream.requests
    ]


def _kill_client(verifier: GatewayProcess, client: str) -> None:
    """The operator revokes a client's tokens (the kill switch, asked directly)."""
    kill_switch(verifier.url, ADMIN_TOKEN, {"format": "complex", "application": {"format": "opaque", "id": client}})


def test_a_route_for_one_client_refuses_a_token_naming_another_client_beside_it(
    edge: str, issuer: LocalIssuer, upstream: EchoUpstream
) -> None:
    attacker = f"svc-a-{uuid.uuid4().hex[:8]}"
    for claims in ({"client_id": attacker, "azp": ROUTE_CLIENT}, {"client_id": ROUTE_CLIENT, "azp": attacker}):
        refused = _get(edge, "/svc-b/orders", issuer.mint(**claims))
        assert (refused.status, refused.headers.get("x-verifier-reason")) == (403, "client_not_allowed"), claims
    assert upstream.requests == [], "the upstream was reached, told another client than the route admitted"
    # The route's own client passes, and the upstream is told that client; the token passes where no client is named.
    assert _get(edge, "/svc-b/orders", issuer.mint(client_id=ROUTE_CLIENT, azp=ROUTE_CLIENT)).status == 200
    assert _get(edge, "/orders", issuer.mint(client_id=attacker, azp=ROUTE_CLIENT)).status == 200
    assert _told(upstream) == [ROUTE_CLIENT, attacker]


def test_a_client_revoked_by_the_kill_switch_refuses_a_token_naming_it_in_either_claim(
    edge: str, verifier: GatewayProcess, issuer: LocalIssuer, upstream: EchoUpstream
) -> None:
    revoked = f"svc-{uuid.uuid4().hex[:8]}"
    by_azp = issuer.mint(sub=None, client_id=f"{revoked}-helper", azp=revoked)
    by_client_id = issuer.mint(sub=None, client_id=revoked, azp=f"{revoked}-helper")
    bystander = issuer.mint(sub=None, client_id=f"{revoked}-helper")
    assert [_get(edge, "/orders", t).status for t in (by_azp, by_client_id, bystander)] == [200, 200, 200]
    _kill_client(verifier, revoked)
    upstream.clear()
    for token in (by_azp, by_client_id):
        refused = _get(edge, "/orders", token)
        assert (refused.status, refused.headers.get("x-verifier-reason")) == (401, "token_revoked")
    assert upstream.requests == [], "a revoked client's token reached the upstream"
    assert _get(edge, "/orders", bystander).status == 200  # the other client's own token passes
