"""The identity the verifier emits has a total bound (`upstream.max_total_bytes`), through every shipped gateway.

Each mapped value is bounded by `upstream.max_value_bytes`, but a user with many groups (an enterprise
provider's "groups overage"), a claim mapped under several headers and copied into the identity assertion, made
an answer head past what the shipped gateways read: nginx's auth subrequest holds 16 KiB (`proxy_buffer_size`),
and past it nginx answered a valid token with its own 503 ("upstream sent too big header"), never our decision;
Envoy passed the whole identity on to an upstream whose own header limits (8 KiB a line, 16-32 KiB in all) it
may exceed. The verifier now refuses such an identity itself: 403 `upstream_identity_too_large`, the upstream
never asked, while a normal identity still passes.

Gateways: the rendered nginx templates (auth_request and Lua), Envoy's three templates (real nginx, real Envoy);
tests/kong/test_identity_size_lua.py and test_identity_size_python.py run these same tests through the Kong Lua and
Python plugins (each its own `edge`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from verifier.binding.dpop import thumbprint

if __package__:
    from .gateways import EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_verifier
    from .replicas import public_jwk
    from .rigs import fresh_upstream_log
    from .test_credential_size import PROOF_BOUND, TOKEN_BOUND, of_length, proof_of
    from .test_trust_boundary import API_HOST, Edge, edge
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import EchoUpstream, GatewayProcess, LocalIssuer, http_request, start_verifier
    from replicas import public_jwk
    from rigs import fresh_upstream_log
    from test_credential_size import PROOF_BOUND, TOKEN_BOUND, of_length, proof_of
    from test_trust_boundary import API_HOST, Edge, edge

__all__ = ["edge", "fresh_upstream_log"]  # the trust-boundary rigs, against this verifier and upstream

pytestmark = pytest.mark.integration

# A token of about the verifier's max_token_bytes (8 KiB), its claims ~6 KiB of JSON; the templates read client
# lines of up to 16 KiB (large_client_header_buffers; test_credential_size.py).
CLIENT_LINE_BYTES = 8192
NGINX_AUTH_BUFFER = 16 * 1024  # the templates' proxy_buffer_size for the auth subrequest's answer head, before 32k


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """An enterprise mapping: the groups under the header apps read and under a legacy app's name, and in the
    assertion; per value up to 8 KiB (a groups-overage user's list fits), the total left at its default."""
    tmp = tmp_path_factory.mktemp("identity-size")
    key = tmp / "identity.pem"
    key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    upstream_config = {
        "headers": [
            {"header": "X-Authenticated-Groups", "claim": "groups"},
            {"header": "X-Authenticated-Memberof", "claim": "groups"},
        ],
        "identity_token": {
            "issuer": "https://verifier.internal",
            "private_key_file": str(key),
            "audience": "https://orders.internal",
            "claims": ["sub", "scope", "roles", "groups"],
        },
        "max_value_bytes": 8192,
    }
    proc = start_verifier(tmp, issuer=issuer.issuer, extra_config={"upstream": upstream_config})
    yield proc
    proc.stop()


def _groups_overage(issuer: LocalIssuer) -> str:
    """A token as large as a client can send through nginx, nearly all of it groups."""
    groups: list[str] = []
    token = issuer.mint(groups=groups)
    while len(f"Authorization: Bearer {token}") < CLIENT_LINE_BYTES - 200:
        groups.extend(f"grp-{len(groups):04d}-engineering-eu" for _ in range(10))
        token = issuer.mint(groups=groups)
    return token


def _refusals_counted(verifier: GatewayProcess) -> float:
    metrics = http_request(f"http://127.0.0.1:{verifier.extra['metrics_port']}/metrics").body.decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("verifier_decisions_total{") and 'reason="upstream_identity_too_large"' in line
    )


def _answer_head_bytes(verifier: GatewayProcess, token: str) -> tuple[int, str]:
    r = http_request(
        f"{verifier.url}/v1/forward-auth",
        headers={"Authorization": f"Bearer {token}", "X-Forwarded-Uri": "/orders/1", "X-Forwarded-Host": "api"},
    )
    return sum(len(k) + len(v) + 4 for k, v in r.headers.items()), r.headers.get("x-verifier-reason", "")


def test_a_groups_overage_identity_is_refused_by_the_verifier_not_by_the_gateway(
    edge: Edge, verifier: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    token = _groups_overage(issuer)
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    rendered, in_assertion = ", ".join(claims["groups"]), len(json.dumps(claims["groups"])) * 4 // 3  # base64url
    # every value is under its own bound; together (twice, and in the assertion) past nginx's auth buffer
    assert len(rendered) < 8192 and in_assertion < 8192 and 2 * len(rendered) + in_assertion > NGINX_AUTH_BUFFER

    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}"})

    assert r.status == 403, (edge.name, r.status, r.headers, r.body[:300])
    assert r.headers.get("x-verifier-reason") == "upstream_identity_too_large", (edge.name, r.headers)
    assert upstream.requests == [], (edge.name, [len(str(seen.headers)) for seen in upstream.requests])
    # what an operator's alert sees: the decision counted under its reason, and the audit line naming it
    assert _refusals_counted(verifier) > 0
    deadline = time.monotonic() + 10  # audit lines are written in batches
    while '"upstream_identity_too_large"' not in verifier.log():
        assert time.monotonic() < deadline, verifier.log()[-2000:]
        time.sleep(0.1)


def test_a_normal_identity_still_passes(edge: Edge, upstream: EchoUpstream, issuer: LocalIssuer) -> None:
    token = issuer.mint(groups=["ops", "billing"])

    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}"})

    assert r.status == 200, (edge.name, r.status, r.body[:300])
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-groups"] == "ops, billing"
    assert seen.headers["x-authenticated-identity"].count(".") == 2


def test_a_large_identity_under_the_total_passes_whole(
    edge: Edge, verifier: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    """Groups that fill most of the total, not all of it: sent whole, not cut."""
    groups = [f"grp-{i:04d}" for i in range(150)]  # ~1.3 KiB a header, twice, and in the assertion
    token = issuer.mint(groups=groups)
    size, reason = _answer_head_bytes(verifier, token)
    assert reason == "ok" and size > 4096, (size, reason)

    r = http_request(f"{edge.url}/orders/1", headers={"Authorization": f"Bearer {token}"})

    assert r.status == 200, (edge.name, r.status, r.body[:300])
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-groups"] == ", ".join(groups)


@pytest.mark.parametrize("dpop", [False, True], ids=["bearer", "dpop"])
def test_an_identity_near_the_total_from_a_token_at_its_bound_passes_whole(
    edge: Edge, verifier: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer, dpop: bool
) -> None:
    """The largest of each at once: a token of the verifier's max_token_bytes (8 KiB) whose groups make an identity
    near max_total_bytes (8 KiB), and with `dpop` a proof of dpop.max_proof_bytes (8 KiB) beside it. nginx keeps each
    answer in its cache file behind the key, the credentials included, all in the answer buffer: with 16 KiB the
    bearer token and its identity did not fit ("upstream sent too big header", a 503 to a valid token)."""
    groups: list[str] = []
    for count in range(130, 200):  # the most groups whose identity is still allowed: ~2 KiB a header, twice, and
        more = [f"grp-{i:04d}-eng" for i in range(count)]  # in the assertion
        candidate = of_length(lambda n, more=more: issuer.mint(groups=more, pad="p" * n), TOKEN_BOUND)
        if _answer_head_bytes(verifier, candidate)[1] != "ok":
            break
        groups, token = more, candidate
    size, reason = _answer_head_bytes(verifier, token)
    assert len(token) == TOKEN_BOUND and reason == "ok" and size > 7 * 1024, (len(token), size, reason)
    headers = {"Authorization": f"Bearer {token}"}
    if dpop:  # the same identity (the assertion carries no cnf), bound to a key, with a proof of its bound
        key = ec.generate_private_key(ec.SECP256R1())
        bound = {"groups": groups, "cnf": {"jkt": thumbprint(public_jwk(key))}}
        token = of_length(lambda n: issuer.mint(**bound, pad="p" * n), TOKEN_BOUND)
        scheme = edge.url.split("://", 1)[0]
        proof = proof_of(key, PROOF_BOUND, "GET", f"{scheme}://{API_HOST}:{edge.port}/orders/1", token)
        headers = {"Host": f"{API_HOST}:{edge.port}", "Authorization": f"DPoP {token}", "DPoP": proof}

    r = http_request(f"{edge.url}/orders/1", headers=headers)

    assert r.status == 200, (edge.name, r.status, r.body[:300])
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-groups"] == ", ".join(groups)
    assert seen.headers["x-authenticated-identity"].count(".") == 2
