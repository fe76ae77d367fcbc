"""Real Envoy in both ext_authz modes (gRPC, HTTP) to the REAL verifier: the per-request proofs.

tests/integration/test_gateways.py already covers, for both modes and the real verifier, an allow with
the identity headers upstream and every refusal with its WWW-Authenticate reaching the client. What it
cannot show with plain bearer tokens is that the proof headers get through: in HTTP mode Envoy forwards
only Host, Method, Path, Content-Length and Authorization unless `allowed_headers` names more, so a
`DPoP` or `X-WebAuthn-Assertion` header left out of it silently never reaches the verifier. Here:

- a DPoP-bound token with a valid proof is allowed (the proof reached the verifier), its replay is
  refused with the DPoP challenge relayed to the client, and the same token as Bearer is refused;
- a WebAuthn step-up route answers 401 with a fresh challenge each time, and an assertion sent by the
  client is evaluated by the verifier (its reason is no longer "assertion required");
- a rate-limited refusal reaches the client with its Retry-After, and an unreadable Authorization
  header its 400 (in gRPC mode both carry the standard gRPC code of their status: RESOURCE_EXHAUSTED,
  INVALID_ARGUMENT; Envoy denies on any non-OK status and answers with `denied_response`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

if __package__:
    from .gateways import (
        EchoUpstream,
        GatewayProcess,
        LocalIssuer,
        http_request,
        start_envoy,
        start_gateway_for,
        start_verifier,
    )
else:  # tests/ is not a package: pytest put this directory on sys.path
    from gateways import (
        EchoUpstream,
        GatewayProcess,
        LocalIssuer,
        http_request,
        start_envoy,
        start_gateway_for,
        start_verifier,
    )

from rigs import fresh_upstream_log  # noqa: F401 - autouse: each test sees only its own requests
from support import b64url

from verifier.binding.dpop import thumbprint

pytestmark = pytest.mark.integration

MODES = ("grpc", "http")
#: The verifier's policies: a step-up route, a rate-limited route needs its own verifier (below).
POLICIES = [
    {"name": "pay", "match": {"path_prefix": "/pay"}, "require": {"step_up": "webauthn"}},
    {"name": "rest", "match": {"path_prefix": "/"}},
]
WEBAUTHN = {"rp_id": "localhost", "rp_name": "x", "origins": ["http://localhost:1"]}
#: A bucket of 2 that refills once in ~17 minutes: the third request in a test is refused.
RATE_LIMITS = {"default": {"per_second": 0.001, "burst": 2}}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("verifier")
    proc = start_verifier(
        tmp,
        issuer=issuer.issuer,
        extra_config={
            "policies": POLICIES,
            # the registry's default sqlite_path is relative: keep it out of the repository
            "webauthn": {**WEBAUTHN, "storage": {"sqlite_path": str(tmp / "webauthn.sqlite3")}},
        },
    )
    yield proc
    proc.stop()


def _envoy(
    mode: str, v: GatewayProcess, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> GatewayProcess:
    return start_gateway_for(f"envoy-{mode}", tmp_path_factory.mktemp(f"envoy-{mode}"), v, upstream.port)


@pytest.fixture(scope="module", params=MODES)
def envoy(
    request: pytest.FixtureRequest,
    verifier: GatewayProcess,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    gw = _envoy(request.param, verifier, upstream, tmp_path_factory)
    yield gw
    gw.stop()


# ------------------------------------------------------------------------------------------------ helpers


def dpop_key() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A client key and its RFC 7638 thumbprint (the token's cnf.jkt)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())))


def dpop_proof(key: ec.EllipticCurvePrivateKey, method: str, url: str, token: str) -> str:
    """An RFC 9449 proof for one request (fresh jti), bound to `token` by `ath`."""
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    claims = {
        "jti": uuid.uuid4().hex,
        "htm": method,
        "htu": url,
        "iat": int(time.time()),
        "ath": b64url(hashlib.sha256(token.encode()).digest()),
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public})


def webauthn_challenge(www_authenticate: str) -> str:
    """The challenge parameter of the `WebAuthn` scheme in a WWW-Authenticate value."""
    found = re.search(r'WebAuthn .*\bchallenge="([^"]+)"', www_authenticate)
    assert found, www_authenticate
    return found.group(1)


# ------------------------------------------------------------------------------------------------ DPoP


def test_a_dpop_bound_token_with_a_valid_proof_is_allowed_and_its_replay_refused(
    envoy: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    key, jkt = dpop_key()
    token = issuer.mint(sub="carol", cnf={"jkt": jkt})
    url = f"{envoy.url}/orders/9"  # Envoy passes the client's Host (with its port) on to the verifier
    proof = dpop_proof(key, "POST", url, token)
    headers = {"Authorization": f"DPoP {token}", "DPoP": proof}

    ok = http_request(f"{url}?x=1", method="POST", headers=headers, body=b"{}")
    replay = http_request(f"{url}?x=1", method="POST", headers=headers, body=b"{}")

    assert ok.status == 200, (ok.status, ok.headers, ok.body)
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "carol"
    assert seen.headers["authorization"] == f"DPoP {token}"
    assert seen.headers["dpop"] == proof  # the proof is the client's; the upstream may check it again
    assert replay.status == 401, (replay.status, replay.headers)
    assert replay.headers["www-authenticate"].startswith("DPoP ")
    assert 'error="invalid_dpop_proof"' in replay.headers["www-authenticate"]
    assert len(upstream.requests) == 1


def _h2c_status(url: str, headers: dict[str, str]) -> int:
    """The status of a GET over cleartext HTTP/2 (prior knowledge) with `headers`, pseudo-headers included."""
    args = ["nghttp", "-v", url]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=True).stdout
    found = re.search(r":status: (\d+)", out)
    assert found, out
    return int(found.group(1))


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="nghttp (nghttp2-client) is missing")
def test_a_dpop_proof_is_judged_for_the_scheme_of_the_connection_not_the_clients_scheme_pseudo_header(
    envoy: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    """Over cleartext HTTP/2 the client writes `:scheme` itself; Envoy passes it on as the gRPC CheckRequest's
    `http.scheme`, while its own X-Forwarded-Proto (use_remote_address), which HTTP mode sends, says http. A
    proof whose htu is the https URL must not pass for a plaintext request in either mode (RFC 9449 section 4.3)."""
    key, jkt = dpop_key()
    token = issuer.mint(sub="dora", cnf={"jkt": jkt})
    plain = f"{envoy.url}/orders/7"
    assert plain.startswith("http://")
    claimed = "https://" + plain.removeprefix("http://")

    def headers(url: str) -> dict[str, str]:
        return {"authorization": f"DPoP {token}", "dpop": dpop_proof(key, "GET", url, token)}

    assert _h2c_status(plain, {":scheme": "https", **headers(claimed)}) == 401
    assert upstream.requests == []
    assert _h2c_status(plain, headers(plain)) == 200  # the proof for the URL the client really used passes


def test_a_dpop_bound_token_presented_as_bearer_is_refused(
    envoy: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    _, jkt = dpop_key()
    r = http_request(f"{envoy.url}/orders", headers={"Authorization": f"Bearer {issuer.mint(cnf={'jkt': jkt})}"})

    assert r.status == 401, (r.status, r.headers)
    assert r.headers["www-authenticate"].startswith("DPoP ")
    assert upstream.requests == []


def test_an_unreadable_authorization_header_reaches_the_client_as_400_invalid_request(
    envoy: GatewayProcess, upstream: EchoUpstream
) -> None:
    """gRPC mode: the CheckResponse status is INVALID_ARGUMENT (was UNAVAILABLE); Envoy relays denied_response."""
    r = http_request(f"{envoy.url}/orders", headers={"Authorization": "Bearer a b"})

    assert r.status == 400, (r.status, r.headers)
    assert r.headers["x-verifier-reason"] == "invalid_request"
    assert 'error="invalid_request"' in r.headers["www-authenticate"]
    assert upstream.requests == []


def _raw_get(url: str, lines: list[tuple[str, str]]) -> tuple[int, bytes]:
    """One HTTP/1.1 GET /orders with `lines` as written (repeats kept: `http_request` takes a dict): its status and
    the whole answer."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        head = "".join(f"{n}: {v}\r\n" for n, v in lines)
        sock.sendall(f"GET /orders HTTP/1.1\r\nHost: api.example.test\r\n{head}Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


@pytest.mark.parametrize("raw_headers", [False, True])
def test_an_x_forwarded_proto_sent_twice_through_a_non_edge_envoy_is_refused(
    raw_headers: bool,
    verifier: GatewayProcess,
    upstream: EchoUpstream,
    issuer: LocalIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The gRPC template behind a proxy of its own (`use_remote_address: false`: the client's X-Forwarded-Proto
    passes), with and without `encode_raw_headers`. Envoy joins two X-Forwarded-Proto lines into one `https,http`
    in either form (an inline header of its own, even in `header_map`), which the door judged as one scheme and
    allowed; forward-auth refuses the family's header twice. Refused alike (400 `invalid_request`); one line passes.
    Envoy sends one form only: with `encode_raw_headers` `headers` stays empty."""

    def edit(rendered: str) -> str:
        rendered, edge = re.subn(r"(?m)^(\s+)use_remote_address: true$", r"\1use_remote_address: false", rendered)
        assert edge == 1
        if raw_headers:
            marker = "transport_api_version: V3\n"
            assert rendered.count(marker) == 1
            indent = rendered.split(marker)[0].rsplit("\n", 1)[1]
            rendered = rendered.replace(marker, f"{marker}{indent}encode_raw_headers: true\n")
        return rendered

    gw = start_envoy(
        tmp_path_factory.mktemp("envoy-non-edge"),
        "grpc",
        verifier.extra["grpc_port"],
        upstream_port=upstream.port,
        edit=edit,
    )
    try:
        bearer = ("Authorization", f"Bearer {issuer.mint()}")
        status, answer = _raw_get(gw.url, [bearer, ("X-Forwarded-Proto", "https"), ("X-Forwarded-Proto", "http")])
        assert status == 400, answer
        assert b"x-verifier-reason: invalid_request" in answer.lower(), answer
        assert upstream.requests == []
        status, answer = _raw_get(gw.url, [bearer, ("X-Forwarded-Proto", "https")])
        assert status == 200, answer
    finally:
        gw.stop()


# ------------------------------------------------------------------------------------------------ WebAuthn


def test_a_step_up_route_answers_a_fresh_challenge_each_time(
    envoy: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    bearer = {"Authorization": f"Bearer {issuer.mint()}"}

    answers = [http_request(f"{envoy.url}/pay/invoice", method="POST", headers=bearer) for _ in range(3)]

    assert [r.status for r in answers] == [401] * 3
    assert [r.headers["x-verifier-reason"] for r in answers] == ["webauthn_assertion_required"] * 3
    challenges = {webauthn_challenge(r.headers["www-authenticate"]) for r in answers}
    assert len(challenges) == 3
    assert upstream.requests == []


def test_the_webauthn_assertion_header_reaches_the_verifier(
    envoy: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    """An assertion the verifier saw is judged on its merits; one it never saw reads as "required"."""
    headers = {"Authorization": f"Bearer {issuer.mint()}", "X-WebAuthn-Assertion": "e30"}  # base64url "{}"

    r = http_request(f"{envoy.url}/pay/invoice", method="POST", headers=headers)

    assert r.status == 401, (r.status, r.headers)
    assert r.headers["x-verifier-reason"].startswith("webauthn_")
    assert r.headers["x-verifier-reason"] != "webauthn_assertion_required"
    assert upstream.requests == []


# ------------------------------------------------------------------------------------------------ rate limit


@pytest.mark.parametrize("mode", MODES)
def test_a_rate_limited_refusal_reaches_the_client_with_retry_after(
    mode: str,
    upstream: EchoUpstream,
    issuer: LocalIssuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    v = start_verifier(
        tmp_path_factory.mktemp("limited"), issuer=issuer.issuer, extra_config={"rate_limits": RATE_LIMITS}
    )
    gw = _envoy(mode, v, upstream, tmp_path_factory)
    try:
        bearer = {"Authorization": f"Bearer {issuer.mint(sub='dave')}"}
        answers = [http_request(f"{gw.url}/orders", headers=bearer) for _ in range(3)]
    finally:
        gw.stop()
        v.stop()

    assert [r.status for r in answers] == [200, 200, 429]
    assert int(answers[2].headers["retry-after"]) > 0
    assert len(upstream.requests) == 2
