"""The verifier's headers for the CLIENT get to the client through every shipped gateway configuration.

`DPoP-Nonce` (RFC 9449 section 9: with a `use_dpop_nonce` challenge when `dpop.require_nonce` is on, and
on an allow that rotates the nonce) and the rate-limit headers `RateLimit-Policy` / `RateLimit` (on an
allow, and with the verifier's `Retry-After` on a 429). Through real Envoy (ext_authz gRPC and HTTP) and
real nginx (auth_request and the Lua variant), rendered from deploy/; the Kong plugins' rigs are in
tests/kong/test_lua_plugin.py and tests/kong/test_python_plugin.py.

The REAL verifier (`python -m verifier serve`, nonces required, a rate limit) answers the nonce flow, the
allows under a rate limit and the 429; the stand-in verifier (`_standin.py`) answers allows with a rotated
nonce (which the verifier does not send today) and answers that say they may be reused.
A client's own copies of these headers are never what the client gets back.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from _standin import Standin, StandinPolicy
from cryptography.hazmat.primitives.asymmetric import ec
from gateways import (
    CLIENT_COPIES,
    DEFAULT_AUDIENCE,
    EchoUpstream,
    GatewayProcess,
    HttpResult,
    LocalIssuer,
    _QuietHandler,
    _ServerThread,
    http_request,
    start_gateway,
    start_gateway_for,
    start_nginx,
    start_strict_verifier,
    unique_token,
    with_a_half_aged_nonce,
)
from replicas import dpop_proof, public_jwk

from verifier.binding.dpop import thumbprint

pytestmark = pytest.mark.integration

# test_gateways.py's four, and Envoy's reusing Lua filter (deploy/envoy/envoy-reuse.yaml.template)
GATEWAYS = ("envoy-grpc", "envoy-http", "envoy-reuse", "nginx", "nginx-lua")
REUSING = ("envoy-reuse", "nginx", "nginx-lua")  # the ones that keep the verifier's answers
RATE_BURST = 3
WINDOW = 3000  # RateLimit-Policy's w: seconds to refill the burst (RATE_BURST / STRICT_RATE_PER_SECOND)
# What the stand-in sends the client with every allow (a rotated nonce, the rate-limit state).
ALLOW_CLIENT_HEADERS = {
    "DPoP-Nonce": "rotated-nonce-from-the-verifier",
    "RateLimit-Policy": '"default";q=100;w=60',
    "RateLimit": '"default";r=99;t=60',
}


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The real verifier: every DPoP proof needs a nonce of ours, every identity has a small budget."""
    proc = start_strict_verifier(tmp_path_factory.mktemp("verifier"), issuer=issuer.issuer, rate_burst=RATE_BURST)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def standin(issuer: LocalIssuer) -> Iterator[Standin]:
    server = Standin(
        StandinPolicy(
            issuer=issuer.issuer,
            audience=DEFAULT_AUDIENCE,
            public_key=issuer.key.public_key(),
            allow_client_headers=lambda: ALLOW_CLIENT_HEADERS,
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def caching_standin(issuer: LocalIssuer) -> Iterator[Standin]:
    """A verifier whose allows carry a new nonce each time and say they may be reused for a minute."""
    numbers = itertools.count()
    server = Standin(
        StandinPolicy(
            issuer=issuer.issuer,
            audience=DEFAULT_AUDIENCE,
            public_key=issuer.key.public_key(),
            allow_client_headers=lambda: {
                "DPoP-Nonce": f"nonce-{next(numbers)}",
                "RateLimit": '"default";r=99;t=60',
                # in the verifier's order: nginx 1.22 reads a `private` before X-Accel-Expires as "never keep"
                "X-Accel-Expires": "59",
                "Cache-Control": "private, max-age=60",
            },
        )
    )
    yield server
    server.stop()


@pytest.fixture(scope="module", params=GATEWAYS)
def gateway(
    request: pytest.FixtureRequest,
    verifier: GatewayProcess,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    """A shipped configuration in front of the real verifier."""
    work = tmp_path_factory.mktemp(request.param)
    gw = start_gateway_for(request.param, work, verifier, upstream.port)
    gw.extra["name"] = request.param
    yield gw
    gw.stop()


@pytest.fixture(scope="module", params=GATEWAYS)
def standin_gateway(
    request: pytest.FixtureRequest, standin: Standin, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """A shipped configuration in front of a verifier that sends the client headers with an allow."""
    work = tmp_path_factory.mktemp(f"{request.param}-standin")
    gw = start_gateway(
        request.param, work, grpc_port=standin.grpc_port, http_port=standin.http_port, upstream_port=upstream.port
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module", params=REUSING)
def caching_gateway(
    request: pytest.FixtureRequest,
    caching_standin: Standin,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    """A shipped configuration that reuses answers, in front of `caching_standin`."""
    work = tmp_path_factory.mktemp(f"{request.param}-caching")
    gw = start_gateway(
        request.param,
        work,
        grpc_port=caching_standin.grpc_port,
        http_port=caching_standin.http_port,
        upstream_port=upstream.port,
    )
    yield gw
    gw.stop()


def dpop_get(gateway: GatewayProcess, key: ec.EllipticCurvePrivateKey, tok: str, *, nonce: str = "") -> HttpResult:
    url = f"{gateway.url}/orders"
    return http_request(
        url, headers={"Authorization": f"DPoP {tok}", "DPoP": dpop_proof(key, "GET", url, tok, nonce=nonce)}
    )


# ------------------------------------------------------------------------------------------------ DPoP nonce


def test_a_use_dpop_nonce_challenge_carries_the_nonce_and_a_proof_with_it_is_allowed(
    gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    """RFC 9449 section 9: the client learns the nonce from the 401, signs it into its next proof, passes."""
    key = ec.generate_private_key(ec.SECP256R1())
    tok = unique_token(issuer, cnf={"jkt": thumbprint(public_jwk(key))})
    upstream.clear()

    challenged = dpop_get(gateway, key, tok)

    assert challenged.status == 401, (challenged.status, challenged.headers, challenged.body)
    assert 'error="use_dpop_nonce"' in challenged.headers.get("www-authenticate", ""), challenged.headers
    nonce = challenged.headers.get("dpop-nonce", "")
    assert nonce, f"no DPoP-Nonce with the use_dpop_nonce challenge: {challenged.headers}"
    assert challenged.headers.get("cache-control") == "no-store", challenged.headers
    assert upstream.requests == []

    allowed = dpop_get(gateway, key, tok, nonce=nonce)

    assert allowed.status == 200, (allowed.status, allowed.headers, allowed.body)
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"].startswith("user-")
    assert "dpop-nonce" not in seen.headers, "the verifier's nonce is for the client, not the upstream"


def test_an_allow_renews_an_old_nonce_and_the_client_goes_on_with_the_new_one(
    gateway: GatewayProcess, issuer: LocalIssuer
) -> None:
    """RFC 9449 section 8.2: a 200 may carry the next nonce; a client using it never meets the 401 again."""

    def first() -> tuple[tuple[ec.EllipticCurvePrivateKey, str, str], str]:
        key = ec.generate_private_key(ec.SECP256R1())
        tok = unique_token(issuer, cnf={"jkt": thumbprint(public_jwk(key))})
        nonce = dpop_get(gateway, key, tok).headers.get("dpop-nonce", "")
        assert nonce
        return (key, tok, nonce), nonce

    (key, tok, nonce), renewing = with_a_half_aged_nonce(  # past half its lifetime, still good
        first, lambda sent, nonce: dpop_get(gateway, sent[0], sent[1], nonce=nonce)
    )
    renewed = renewing.headers.get("dpop-nonce", "")
    young = dpop_get(gateway, key, tok, nonce=renewed)

    assert renewing.status == 200, (renewing.status, renewing.headers, renewing.body)
    assert renewed and renewed != nonce, renewing.headers
    assert young.status == 200, (young.status, young.headers, young.body)
    assert "dpop-nonce" not in young.headers, "a young nonce is kept: no new one on every answer"


def test_a_client_cannot_make_up_the_nonce_it_is_challenged_with(gateway: GatewayProcess, issuer: LocalIssuer) -> None:
    """A client's own DPoP-Nonce header never comes back as the server's nonce, nor passes as one."""
    key = ec.generate_private_key(ec.SECP256R1())
    tok = unique_token(issuer, cnf={"jkt": thumbprint(public_jwk(key))})
    url = f"{gateway.url}/orders"
    headers = {"Authorization": f"DPoP {tok}", "DPoP": dpop_proof(key, "GET", url, tok), **CLIENT_COPIES}

    challenged = http_request(url, headers=headers)
    made_up = dpop_get(gateway, key, tok, nonce=CLIENT_COPIES["dpop-nonce"])

    assert challenged.status == 401, (challenged.status, challenged.headers)
    assert challenged.headers.get("dpop-nonce") not in (None, "", CLIENT_COPIES["dpop-nonce"]), challenged.headers
    assert CLIENT_COPIES["dpop-nonce"] not in challenged.headers.get("dpop-nonce", "")
    assert made_up.status == 401 and 'error="use_dpop_nonce"' in made_up.headers.get("www-authenticate", "")


# ------------------------------------------------------------------------------------------------ rate limits


def test_an_identity_under_a_rate_limit_sees_its_budget_on_allows_and_the_verifiers_429(
    gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    tok = unique_token(issuer)
    headers = {"Authorization": f"Bearer {tok}"}
    allowed = [http_request(f"{gateway.url}/orders", headers=headers) for _ in range(RATE_BURST)]
    upstream.clear()

    refused = http_request(f"{gateway.url}/orders", headers=headers)

    assert [a.status for a in allowed] == [200] * RATE_BURST, [(a.status, a.body) for a in allowed]
    for left, answer in zip(range(RATE_BURST - 1, -1, -1), allowed, strict=True):  # each allow's budget
        assert answer.headers.get("ratelimit-policy") == f'"default";q={RATE_BURST};w={WINDOW}', answer.headers
        assert answer.headers.get("ratelimit", "").startswith(f'"default";r={left};'), answer.headers
        assert "retry-after" not in answer.headers, answer.headers
    assert refused.status == 429, (refused.status, refused.headers, refused.body)
    # the verifier's own Retry-After (about 1/STRICT_RATE_PER_SECOND seconds), never a gateway's fixed one
    assert int(refused.headers.get("retry-after", "0")) > 100, refused.headers
    assert refused.headers.get("ratelimit-policy", "").startswith(f'"default";q={RATE_BURST}'), refused.headers
    assert refused.headers.get("ratelimit", "").startswith('"default";r=0'), refused.headers
    assert refused.headers.get("x-verifier-reason") == "rate_limited", refused.headers
    assert refused.headers.get("cache-control") == "no-store", refused.headers
    assert upstream.requests == []


def test_a_refusal_never_reflects_the_clients_own_copies_of_the_client_headers(
    gateway: GatewayProcess, issuer: LocalIssuer
) -> None:
    """A garbage token's 401 and a 429 carry only what the verifier sent under these names."""
    tok = unique_token(issuer)
    for _ in range(RATE_BURST):
        http_request(f"{gateway.url}/orders", headers={"Authorization": f"Bearer {tok}"})
    answers = {
        "401": http_request(f"{gateway.url}/orders", headers={"Authorization": "Bearer garbage", **CLIENT_COPIES}),
        "429": http_request(f"{gateway.url}/orders", headers={"Authorization": f"Bearer {tok}", **CLIENT_COPIES}),
    }

    assert {k: a.status for k, a in answers.items()} == {"401": 401, "429": 429}, answers
    for answer in answers.values():
        for name, value in CLIENT_COPIES.items():
            assert value not in answer.headers.get(name, ""), (name, answer.headers)
    assert "dpop-nonce" not in answers["401"].headers and "ratelimit" not in answers["401"].headers


# ------------------------------------------------------------------------------------------------ a malformed request


def test_a_malformed_authorization_header_gets_the_verifiers_400_and_its_challenge(
    gateway: GatewayProcess, upstream: EchoUpstream
) -> None:
    """RFC 6750 section 3.1: a request the verifier cannot read is a 400 with error="invalid_request", through
    every gateway (nginx's auth_request makes it a 500 unless the template maps it back), never a 503."""
    upstream.clear()
    # a space inside the token: not an RFC 6750 b64token; the client's own copies of the answer headers too
    r = http_request(
        f"{gateway.url}/orders",
        headers={"Authorization": "Bearer not one token", "X-Verifier-Reason": "ok", "WWW-Authenticate": "Basic"},
    )

    assert r.status == 400, (gateway.extra["name"], r.status, r.headers, r.body)
    assert r.headers.get("www-authenticate", "").startswith("Bearer "), r.headers
    assert 'error="invalid_request"' in r.headers["www-authenticate"], r.headers
    assert "Basic" not in r.headers["www-authenticate"], r.headers
    assert r.headers.get("x-verifier-reason") == "invalid_request", r.headers
    assert r.headers.get("cache-control") == "no-store", r.headers
    assert "retry-after" not in r.headers, r.headers
    assert upstream.requests == []


# ------------------------------------------------------------------------------------------------ on an allow


def test_an_allow_gives_the_client_the_verifiers_nonce_and_ratelimit_headers_not_the_upstream(
    standin_gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    upstream.clear()

    allowed = http_request(
        f"{standin_gateway.url}/orders", headers={"Authorization": f"Bearer {issuer.mint()}", **CLIENT_COPIES}
    )

    assert allowed.status == 200, (allowed.status, allowed.headers, allowed.body)
    for name, value in ALLOW_CLIENT_HEADERS.items():
        assert allowed.headers.get(name.lower()) == value, (name, allowed.headers)
    assert "retry-after" not in allowed.headers, allowed.headers
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"
    for name, value in ALLOW_CLIENT_HEADERS.items():
        assert seen.headers.get(name.lower()) != value, f"the verifier's {name} went upstream"


def test_an_answer_carrying_a_nonce_is_never_reused_for_another_request(
    caching_gateway: GatewayProcess, caching_standin: Standin, issuer: LocalIssuer
) -> None:
    """A nonce or a rate-limit state is about one request: even an answer that says max-age=60 is asked again,
    and each request gets the nonce of its own answer."""
    headers = {"Authorization": f"Bearer {unique_token(issuer)}"}
    before = len(caching_standin.http_calls)

    answers = [http_request(f"{caching_gateway.url}/orders", headers=headers) for _ in range(2)]

    assert [a.status for a in answers] == [200, 200], [(a.status, a.body) for a in answers]
    assert len(caching_standin.http_calls) - before == 2, "an answer carrying a nonce was reused"
    nonces = [a.headers.get("dpop-nonce") for a in answers]
    assert None not in nonces and nonces[0] != nonces[1], nonces


# ------------------------------------------------------------------------------------------------ nginx's 429


INVALID_REQUEST = 'Bearer error="invalid_request", error_description="malformed Authorization header"'
# What the answering stand-in says for each `Authorization: Bearer <name>`: status and headers.
ANSWERS = {
    "rate-limited": (429, {"X-Verifier-Reason": "rate_limited", "Retry-After": "77", "RateLimit": '"d";r=0;t=77'}),
    "unavailable": (503, {"X-Verifier-Reason": "provider_unavailable", "Retry-After": "1"}),
    "429-other-reason": (429, {"X-Verifier-Reason": "invalid_token", "Retry-After": "77"}),
    "429-no-reason": (429, {"Retry-After": "77"}),  # not the verifier's answer
    "bad-request": (400, {"X-Verifier-Reason": "invalid_request", "WWW-Authenticate": INVALID_REQUEST}),
    "400-no-reason": (400, {"WWW-Authenticate": INVALID_REQUEST}),  # not the verifier's answer
}
#: What a client sends hoping to turn a fail-closed 503 into its choice of refusal (its own reason, challenge).
CLIENT_REASONS = {"X-Verifier-Reason": "invalid_request", "WWW-Authenticate": 'Bearer error="client_made_up"'}


class _AnsweringHandler(_QuietHandler):
    def do_GET(self) -> None:
        status, headers = ANSWERS[self.headers.get("Authorization", "").removeprefix("Bearer ")]
        self._send(status, b"{}", {**headers, "Cache-Control": "no-store", "X-Accel-Expires": "0"})


@pytest.mark.parametrize(
    ("answer", "status"),
    [
        ("rate-limited", 429),
        ("unavailable", 503),
        ("429-other-reason", 503),
        ("429-no-reason", 503),
        ("bad-request", 400),
        ("400-no-reason", 503),
    ],
)
def test_nginx_auth_request_answers_429_and_400_only_for_the_verifiers_own_refusals(
    answer: str, status: int, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """auth_request makes every status but 2xx/401/403 a 500; the template turns the verifier's 429 into a 429
    (told by `X-Verifier-Reason: rate_limited`, which the verifier answers with 429 and nothing else), its 400
    into a 400 with its challenge (`X-Verifier-Reason: invalid_request`, only ever with 400) and anything else
    into the fail-closed 503, whatever Retry-After it came with. The client's own X-Verifier-Reason and
    WWW-Authenticate (sent with every request here) change nothing: only the verifier's answer is read."""
    server = _ServerThread(_AnsweringHandler)
    gw = start_nginx(tmp_path_factory.mktemp("nginx-answers"), server.port, upstream.port)
    try:
        r = http_request(
            f"{gw.url}/orders", headers={"Authorization": f"Bearer {answer}", **CLIENT_COPIES, **CLIENT_REASONS}
        )
    finally:
        gw.stop()
        server.stop()

    assert r.status == status, (r.status, r.headers, r.body)
    assert r.headers.get("retry-after") == {429: "77", 503: "1"}.get(status), r.headers
    assert r.headers.get("ratelimit") == ('"d";r=0;t=77' if status == 429 else None), r.headers
    assert r.headers.get("www-authenticate") == (INVALID_REQUEST if status == 400 else None), r.headers
    assert r.headers.get("x-verifier-reason") != CLIENT_REASONS["X-Verifier-Reason"] or status == 400, r.headers
    assert r.headers.get("cache-control") == "no-store"
