"""The Kong Lua plugin hands the client the verifier's DPoP-Nonce, RateLimit-* and 429 (and nothing of the client's).

Real nginx running kong/plugins/edge-verifier under the PDK shim (tests/kong/conftest.py), asking the REAL
verifier (`dpop.require_nonce`, a rate limit) or, for what the verifier sends on an allow, the stand-in.
The same cases through Envoy and nginx: tests/integration/test_gateway_client_headers.py.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import GatewayProcess, LocalIssuer, start_verifier
from replicas import dpop_proof, public_jwk
from test_lua_plugin import call, header, upstream_saw

from verifier.binding.dpop import thumbprint

pytestmark = pytest.mark.integration

NONCE_SECRET_ENV = "GWHEADERS_KONG_TEST_DPOP_NONCE_SECRET"
RATE_BURST = 2
RATE_PER_SECOND = 0.001  # one token back every 1000 s: the Retry-After is the verifier's, not a fixed 1
PATH = "/api/items?limit=5"
NONCE_LIFETIME = 4  # seconds; past half of it, an allow hands out the next nonce
CLIENT_COPIES = {
    "dpop-nonce": "client-chosen-nonce",
    "ratelimit-policy": '"client";q=1;w=1',
    "ratelimit": '"client";r=1;t=1',
    "retry-after": "4242",
}


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    server = LocalIssuer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(NONCE_SECRET_ENV, "a-nonce-secret-for-the-kong-header-tests-0123456789")
        proc = start_verifier(
            tmp_path_factory.mktemp("verifier"),
            issuer=issuer.issuer,
            extra_config={
                "dpop": {
                    "require_nonce": True,
                    "nonce_secret_env": NONCE_SECRET_ENV,
                    "nonce_lifetime_seconds": NONCE_LIFETIME,
                },
                "rate_limits": {"default": {"per_second": RATE_PER_SECOND, "burst": RATE_BURST}},
            },
        )
    yield proc
    proc.stop()


def fresh_token(issuer: LocalIssuer, **claims: object) -> str:
    return issuer.mint(sub=f"user-{uuid.uuid4().hex[:8]}", jti=uuid.uuid4().hex, **claims)


def one(headers: list[tuple[str, str]], name: str) -> str:
    values = header(headers, name)
    assert len(values) <= 1, (name, values)
    return values[0] if values else ""


def test_the_use_dpop_nonce_challenge_carries_the_nonce_and_a_proof_with_it_passes(
    start_nginx, echo_upstream, verifier, issuer
):
    base = start_nginx({"url": f"{verifier.url}/v1/forward-auth"}, echo_upstream)
    key = ec.generate_private_key(ec.SECP256R1())
    tok = fresh_token(issuer, cnf={"jkt": thumbprint(public_jwk(key))})
    url = f"{base}/api/items"

    status, headers, _ = call(base, PATH, {"Authorization": f"DPoP {tok}", "DPoP": dpop_proof(key, "GET", url, tok)})

    assert status == 401, headers
    assert 'error="use_dpop_nonce"' in one(headers, "WWW-Authenticate"), headers
    nonce = one(headers, "DPoP-Nonce")
    assert nonce, headers

    proof = dpop_proof(key, "GET", url, tok, nonce=nonce)
    status, headers, body = call(base, PATH, {"Authorization": f"DPoP {tok}", "DPoP": proof})

    assert status == 200, (headers, body)
    assert upstream_saw(body)["h"]["x-authenticated-userid"][0].startswith("user-")


def test_an_allow_renews_an_old_nonce_for_the_client(start_nginx, echo_upstream, verifier, issuer):
    base = start_nginx({"url": f"{verifier.url}/v1/forward-auth"}, echo_upstream)
    key = ec.generate_private_key(ec.SECP256R1())
    tok = fresh_token(issuer, cnf={"jkt": thumbprint(public_jwk(key))})
    url = f"{base}/api/items"
    _, headers, _ = call(base, PATH, {"Authorization": f"DPoP {tok}", "DPoP": dpop_proof(key, "GET", url, tok)})
    nonce = one(headers, "DPoP-Nonce")
    time.sleep(NONCE_LIFETIME / 2 + 0.3)

    proof = dpop_proof(key, "GET", url, tok, nonce=nonce)
    status, headers, body = call(base, PATH, {"Authorization": f"DPoP {tok}", "DPoP": proof})

    assert status == 200, (headers, body)
    assert one(headers, "DPoP-Nonce") not in ("", nonce), headers
    assert "dpop-nonce" not in upstream_saw(body)["h"]


def test_an_identity_under_a_rate_limit_sees_its_budget_on_allows_and_the_verifiers_429(
    start_nginx, echo_upstream, verifier, issuer
):
    base = start_nginx({"url": f"{verifier.url}/v1/forward-auth"}, echo_upstream)
    tok = fresh_token(issuer)
    allowed = [call(base, PATH, {"Authorization": f"Bearer {tok}"}) for _ in range(RATE_BURST)]

    status, headers, _ = call(base, PATH, {"Authorization": f"Bearer {tok}", **CLIENT_COPIES})

    assert [a[0] for a in allowed] == [200] * RATE_BURST
    for left, (_, allow_headers, _) in zip(range(RATE_BURST - 1, -1, -1), allowed, strict=True):
        assert one(allow_headers, "RateLimit-Policy") == f'"default";q={RATE_BURST};w=2000', allow_headers
        assert one(allow_headers, "RateLimit").startswith(f'"default";r={left};'), allow_headers
    assert status == 429, headers
    assert int(one(headers, "Retry-After")) > 100, headers
    assert one(headers, "RateLimit-Policy").startswith(f'"default";q={RATE_BURST}'), headers
    assert one(headers, "RateLimit").startswith('"default";r=0'), headers
    assert one(headers, "X-Verifier-Reason") == "rate_limited"


def test_a_refusal_never_reflects_the_clients_copies(start_nginx, echo_upstream, verifier):
    base = start_nginx({"url": f"{verifier.url}/v1/forward-auth"}, echo_upstream)

    status, headers, _ = call(base, PATH, {"Authorization": "Bearer garbage", **CLIENT_COPIES})

    assert status == 401
    for name in CLIENT_COPIES:
        assert header(headers, name) == [], (name, headers)


def test_an_allow_gives_the_client_the_verifiers_nonce_not_the_clients(start_nginx, echo_upstream, standin_verifier):
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)

    status, headers, body = call(base, PATH, {"Authorization": "Bearer nonce", **CLIENT_COPIES})

    assert status == 200
    assert header(headers, "DPoP-Nonce") == ["n-123"]
    for name in ("ratelimit-policy", "ratelimit", "retry-after"):
        assert header(headers, name) == [], (name, headers)
    assert upstream_saw(body)["h"]["dpop-nonce"] == [CLIENT_COPIES["dpop-nonce"]]  # the client's, for the upstream


def test_an_answer_carrying_a_nonce_is_never_reused(start_nginx, echo_upstream, standin_verifier):
    """A nonce is about one request: even an answer that says max-age=30 is asked again each time."""
    base = start_nginx({"url": standin_verifier.url}, echo_upstream)
    before = len(standin_verifier.requests)

    answers = [call(base, PATH, {"Authorization": "Bearer nonce-cached"}) for _ in range(2)]

    assert [a[0] for a in answers] == [200, 200]
    assert len(standin_verifier.requests) - before == 2, "an answer carrying a nonce was reused"
    assert header(answers[0][1], "DPoP-Nonce") != header(answers[1][1], "DPoP-Nonce")
