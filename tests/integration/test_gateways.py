"""Real HTTP requests through real gateways (Envoy ext_authz gRPC / HTTP, nginx auth_request) to a verifier.

Each case runs against two backends:
- ``standin``: the test double in ``_standin.py``; proves the rig (gateway config) itself is right.
- ``verifier``: the real ``python -m verifier serve`` process; skipped, with the reason, until it runs.
Envoy's own jwt_authn and no-auth modes (the benchmark baselines) are checked on their own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

if __package__:
    from ._standin import Standin, StandinPolicy
    from .gateways import (
        DEFAULT_AUDIENCE,
        EchoUpstream,
        GatewayProcess,
        HttpResult,
        LocalIssuer,
        free_port,
        http_request,
        start_envoy,
        start_gateway,
        start_nginx,
        start_verifier,
        verifier_unusable_reason,
    )
else:  # tests/ is not a package: pytest put this directory on sys.path
    from _standin import Standin, StandinPolicy
    from gateways import (
        DEFAULT_AUDIENCE,
        EchoUpstream,
        GatewayProcess,
        HttpResult,
        LocalIssuer,
        free_port,
        http_request,
        start_envoy,
        start_gateway,
        start_nginx,
        start_verifier,
        verifier_unusable_reason,
    )

from rigs import fresh_upstream_log  # noqa: F401 - autouse: each test sees only its own requests

pytestmark = pytest.mark.integration

GATEWAYS = ("envoy-grpc", "envoy-http", "nginx", "nginx-lua")
BACKENDS = ("standin", "verifier")


@dataclass(frozen=True, kw_only=True)
class Backend:
    """Where a gateway finds the verifier's two doors."""

    name: str
    grpc_port: int
    http_port: int


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def standin(issuer: LocalIssuer) -> Iterator[Standin]:
    server = Standin(
        StandinPolicy(issuer=issuer.issuer, audience=DEFAULT_AUDIENCE, public_key=issuer.key.public_key())
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def real_verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    reason = verifier_unusable_reason()
    if reason:
        pytest.skip(f"real verifier not usable yet: {reason}")
    proc = start_verifier(tmp_path_factory.mktemp("verifier"), issuer=issuer.issuer)
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "standin":
        s: Standin = request.getfixturevalue("standin")
        return Backend(name="standin", grpc_port=s.grpc_port, http_port=s.http_port)
    v: GatewayProcess = request.getfixturevalue("real_verifier")
    return Backend(name="verifier", grpc_port=v.extra["grpc_port"], http_port=v.extra["http_port"])


@pytest.fixture(scope="module", params=GATEWAYS)
def gateway(
    request: pytest.FixtureRequest,
    backend: Backend,
    upstream: EchoUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    gw = start_gateway(
        request.param,
        tmp_path_factory.mktemp(request.param),
        grpc_port=backend.grpc_port,
        http_port=backend.http_port,
        upstream_port=upstream.port,
    )
    yield gw
    gw.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_denied(r: HttpResult, upstream: EchoUpstream, status: int, error: str | None) -> None:
    """A deny: the status, a Bearer challenge (with ``error`` when given), a reason, and no upstream call."""
    assert r.status == status, (r.status, r.headers, r.body)
    challenge = r.headers.get("www-authenticate", "")
    assert challenge.startswith("Bearer"), r.headers
    if error:
        assert f'error="{error}"' in challenge, challenge
    assert r.headers.get("x-verifier-reason"), r.headers
    assert upstream.requests == []


# ------------------------------------------------------------------------------------------------ verdicts


def test_valid_token_reaches_upstream_with_identity_and_untouched_authorization(
    gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    token = issuer.mint(sub="alice")
    r = http_request(f"{gateway.url}/orders/42?expand=1", headers=bearer(token))
    assert r.status == 200, (r.status, r.headers, r.body)
    (seen,) = upstream.requests
    assert seen.path == "/orders/42?expand=1"
    assert seen.headers["x-authenticated-userid"] == "alice"
    assert seen.headers["x-authenticated-issuer"] == issuer.issuer
    assert seen.headers["authorization"] == f"Bearer {token}"


def test_method_body_and_query_pass_through_on_allow(
    gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    r = http_request(
        f"{gateway.url}/orders?dry_run=true",
        method="POST",
        headers={**bearer(issuer.mint()), "Content-Type": "application/octet-stream"},
        body=b"x" * 300_000,  # large enough for nginx to spool it to a temp file
    )
    assert r.status == 200, (r.status, r.body)
    echo = r.json()
    assert (echo["method"], echo["path"], echo["body_length"]) == ("POST", "/orders?dry_run=true", 300_000)


def test_missing_token_is_challenged_and_never_reaches_upstream(
    gateway: GatewayProcess, upstream: EchoUpstream
) -> None:
    r = http_request(f"{gateway.url}/orders")
    assert_denied(r, upstream, 401, None)
    assert 'realm="verifier"' in r.headers["www-authenticate"]


def test_expired_token_is_invalid_token(
    gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    now = int(time.time())
    token = issuer.mint(iat=now - 3600, nbf=now - 3600, exp=now - 600)  # well past the 30 s leeway
    assert_denied(
        http_request(f"{gateway.url}/orders", headers=bearer(token)), upstream, 401, "invalid_token"
    )


def test_bad_signature_is_invalid_token(
    gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    forged = issuer.mint(signing_key=ec.generate_private_key(ec.SECP256R1()))  # same kid, other key
    assert_denied(
        http_request(f"{gateway.url}/orders", headers=bearer(forged)), upstream, 401, "invalid_token"
    )


def test_wrong_audience_is_forbidden(
    gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    token = issuer.mint(aud="https://other.example.test")
    assert_denied(
        http_request(f"{gateway.url}/orders", headers=bearer(token)), upstream, 403, "insufficient_scope"
    )



def test_a_head_request_is_judged_and_leaves_the_connection_to_the_verifier_clean(
    gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    """Envoy's HTTP ext_authz asks the verifier with the client's own method: a client's HEAD is a HEAD check,
    whose answer the gateway reads without content. A refusal that carried its JSON body all the same left it on
    the gateway's pooled connection, where it was read as the start of the next answer (the next caller's check)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    forged = issuer.mint(signing_key=ec.generate_private_key(ec.SECP256R1()))  # refused with a JSON body
    good = issuer.mint(sub="after-head")
    for _ in range(3):
        refused = http_request(f"{gateway.url}/orders", method="HEAD", headers=bearer(forged))
        assert refused.status == 401, (refused.status, refused.headers)
        allowed = http_request(f"{gateway.url}/orders", headers=bearer(good))
        assert allowed.status == 200, (allowed.status, allowed.headers, allowed.body)
    assert [seen.headers["x-authenticated-userid"] for seen in upstream.requests] == ["after-head"] * 3


def test_client_supplied_identity_headers_never_reach_upstream(
    gateway: GatewayProcess, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    spoof = {"X-Authenticated-Userid": "mallory", "X-Authenticated-Scope": "admin"}
    denied = http_request(f"{gateway.url}/orders", headers=spoof)
    assert_denied(denied, upstream, 401, None)

    r = http_request(
        f"{gateway.url}/orders", headers={**spoof, **bearer(issuer.mint(sub="alice", scope="read"))}
    )
    assert r.status == 200
    (seen,) = upstream.requests
    assert seen.headers["x-authenticated-userid"] == "alice"
    assert "admin" not in seen.headers.get("x-authenticated-scope", "")


# ------------------------------------------------------------------------------------------------ fail closed


@pytest.mark.parametrize(
    ("gateway_name", "status"), [("envoy-grpc", 503), ("envoy-http", 503), ("nginx", 503), ("nginx-lua", 503)]
)
def test_unreachable_verifier_fails_closed(
    gateway_name: str, status: int, upstream: EchoUpstream, issuer: LocalIssuer, tmp_path: Path
) -> None:
    dead = free_port()  # nothing listens here
    if gateway_name == "envoy-grpc":
        gw = start_envoy(tmp_path, "grpc", verifier_grpc_port=dead, upstream_port=upstream.port)
    elif gateway_name == "envoy-http":
        gw = start_envoy(tmp_path, "http", verifier_http_port=dead, upstream_port=upstream.port)
    else:
        gw = start_nginx(tmp_path, dead, upstream.port, lua=gateway_name == "nginx-lua")
    try:
        r = http_request(f"{gw.url}/orders", headers=bearer(issuer.mint()))
        assert r.status == status, (r.status, r.body)
        assert upstream.requests == []
    finally:
        gw.stop()


# ------------------------------------------------------------------------------------------------ baselines


@pytest.mark.parametrize("jwks_source", ["local", "remote"])
def test_envoy_jwt_authn_baseline(
    jwks_source: str, upstream: EchoUpstream, issuer: LocalIssuer, tmp_path: Path
) -> None:
    source = {"jwks": issuer.jwks()} if jwks_source == "local" else {"jwks_uri": issuer.jwks_uri}
    gw = start_envoy(tmp_path, "jwt_authn", upstream_port=upstream.port, jwt_issuer=issuer.issuer, **source)
    try:
        token = issuer.mint(sub="bob")
        ok = http_request(f"{gw.url}/orders", headers=bearer(token))
        assert ok.status == 200, (ok.status, ok.body)
        (seen,) = upstream.requests
        assert seen.headers["x-authenticated-userid"] == "bob"
        assert seen.headers["authorization"] == f"Bearer {token}"

        missing = http_request(f"{gw.url}/orders")
        assert missing.status == 401
        assert missing.headers["www-authenticate"].startswith("Bearer")
        wrong_aud = http_request(
            f"{gw.url}/orders", headers=bearer(issuer.mint(aud="https://other.example.test"))
        )
        assert wrong_aud.status == 403
        assert len(upstream.requests) == 1
    finally:
        gw.stop()


def test_envoy_without_auth_passes_everything(upstream: EchoUpstream, tmp_path: Path) -> None:
    gw = start_envoy(tmp_path, "none", upstream_port=upstream.port)
    try:
        r = http_request(f"{gw.url}/anything", method="DELETE")
        assert r.status == 200
        assert (r.json()["method"], r.json()["path"]) == ("DELETE", "/anything")
        assert len(upstream.requests) == 1
    finally:
        gw.stop()


# ------------------------------------------------------------------------------------------------ wire shape


@pytest.mark.parametrize("gateway_name", ["envoy-http", "nginx", "nginx-lua"])
def test_forward_auth_call_carries_the_original_request(
    gateway_name: str, standin: Standin, upstream: EchoUpstream, issuer: LocalIssuer, tmp_path: Path
) -> None:
    """What the verifier's HTTP door receives from each gateway (seen by the stand-in)."""
    if gateway_name == "envoy-http":
        gw = start_envoy(tmp_path, "http", verifier_http_port=standin.http_port, upstream_port=upstream.port)
    else:
        gw = start_nginx(tmp_path, standin.http_port, upstream.port, lua=gateway_name == "nginx-lua")
    standin.http_calls.clear()
    token = issuer.mint()
    headers = {**bearer(token), "DPoP": "proof", "X-Unrelated": "secret-cookie-ish"}
    try:
        r = http_request(f"{gw.url}/orders/7?x=1", method="POST", headers=headers, body=b"payload")
        assert r.status == 200
    finally:
        gw.stop()
    (call,) = standin.http_calls
    seen = call["headers"]
    assert isinstance(seen, dict)
    assert seen["authorization"] == f"Bearer {token}"
    assert seen["dpop"] == "proof"
    assert seen.get("content-length", "0") == "0"  # the body never goes to the verifier
    if gateway_name == "envoy-http":
        # Envoy keeps the method and appends the original path (and query) to path_prefix.
        assert (call["method"], call["path"]) == ("POST", "/v1/forward-auth/orders/7?x=1")
        assert "x-unrelated" not in seen  # only allowed_headers are forwarded
    else:
        # nginx's subrequest is a GET to the fixed URI; the original request travels in headers.
        assert (call["method"], call["path"]) == ("GET", "/v1/forward-auth")
        assert seen["x-forwarded-uri"] == "/orders/7?x=1"
        assert seen["x-forwarded-method"] == "POST"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "127.0.0.1"  # $host: no port, lower-case, no trailing dot
        assert seen["x-forwarded-port"] == gw.url.rsplit(":", 1)[1]
        assert "x-original-uri" not in seen and "x-original-method" not in seen


def test_a_verifier_declaring_another_family_than_nginx_sends_refuses_instead_of_judging_the_root(
    upstream: EchoUpstream, issuer: LocalIssuer, tmp_path: Path
) -> None:
    """The shipped nginx sends X-Forwarded-* (and clears X-Original-URI); a verifier told `x-original` got every check
    with no path header and the bare target, judged it `GET /`, and the public landing page's policy let a protected
    route through with no token. Now each check is refused, 400 `invalid_request`, and nothing reaches upstream."""
    reason = verifier_unusable_reason()
    if reason:
        pytest.skip(f"real verifier not usable yet: {reason}")
    policies = [
        {"name": "admin", "match": {"path_prefix": "/admin"}, "require": {"roles_any": ["admin"]}},
        {"name": "landing", "match": {"path_prefix": "/"}, "require": {"authenticated": False}},
    ]
    verifier = start_verifier(
        tmp_path,
        issuer=issuer.issuer,
        extra_config={"policies": policies},
        http_settings={"forwarded_headers": "x-original"},
    )
    try:
        gw = start_nginx(tmp_path, verifier.extra["http_port"], upstream.port)
        try:
            for path in ("/admin/users/7", "/"):
                r = http_request(f"{gw.url}{path}")
                assert (r.status, r.headers.get("x-verifier-reason")) == (400, "invalid_request"), (path, r.headers)
                assert 'error="invalid_request"' in r.headers.get("www-authenticate", ""), r.headers
            assert upstream.requests == []
        finally:
            gw.stop()
    finally:
        verifier.stop()
