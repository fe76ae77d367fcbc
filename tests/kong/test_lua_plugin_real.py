"""The Kong Lua plugin in real nginx, asking the REAL verifier, whose issuer is a REAL OpenID Provider.

Chain under test: client -> nginx + kong/plugins/edge-verifier (unmodified, under the PDK shim of
tests/kong/conftest.py) -> `python -m verifier serve` (forward-auth door) -> keys from panva's
oidc-provider (tests/integration/op_harness.py) -> echo upstream. Nothing here is a stand-in: the
answers relayed to the client are the verifier's own, compared with what the verifier says when
asked directly.
"""

from __future__ import annotations

import http.client
import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from gateways import GatewayProcess, start_verifier
from op_harness import OTHER_AUDIENCE, OpenIDProvider
from rigs import provider_fixture

pytestmark = pytest.mark.integration

Headers = list[tuple[str, str]]

#: The path every test asks for through nginx (and asks the verifier about directly).
API_PATH = "/api/items?limit=5"
#: Requests sent with one token to see whether the plugin reused the verifier's answer.
REPEATS = 5
#: How far in the past an "expired" token's exp lies: well past the verifier's 30 s leeway (seconds).
EXPIRED_BY_S = 600
#: The plugin's reuse ceiling (decision_cache.lua MAX_TTL), seconds.
PLUGIN_MAX_TTL_S = 300
#: The verifier's default RFC 9728 resource.
RESOURCE = "https://api.example.test"
#: The forward-auth door's decision counter in the verifier's Prometheus text.
DECISIONS = re.compile(r"^verifier_decisions_total\{([^}]*)\}\s+([0-9.eE+-]+)$", re.MULTILINE)


# --------------------------------------------------------------------------- servers


provider = provider_fixture("provider", scope="module")


@pytest.fixture(scope="module")
def verifier(provider: OpenIDProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    v = start_verifier(  # a default resource: every challenge names its RFC 9728 metadata
        tmp_path_factory.mktemp("verifier"),
        issuer=provider.issuer,
        extra_config={"protected_resource": {"resource": RESOURCE}},
    )
    yield v
    v.stop()


@pytest.fixture(scope="module")
def token(provider: OpenIDProvider) -> str:
    return provider.client_credentials_token()


def forward_auth_url(v: GatewayProcess) -> str:
    return f"{v.url}/v1/forward-auth"


# --------------------------------------------------------------------------- helpers


def call(base: str, path: str = API_PATH, headers: dict[str, str] | None = None) -> tuple[int, Headers, bytes]:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        conn.close()


def ask_verifier(v: GatewayProcess, headers: dict[str, str], path: str = API_PATH) -> tuple[int, Headers, bytes]:
    """The verifier's answer to the question the plugin asks, asked directly (Traefik-style headers)."""
    return call(
        v.url,
        "/v1/forward-auth",
        {
            **headers,
            "X-Forwarded-Method": "GET",
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": "127.0.0.1",
            "X-Forwarded-Uri": path,
        },
    )


def header(headers: Headers, name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


def upstream_saw(body: bytes) -> dict[str, list[str]]:
    """Headers the echo upstream received, by lower-case name."""
    seen: dict[str, list[str]] = {}
    for k, v in json.loads(body)["headers"]:
        seen.setdefault(k.lower(), []).append(v)
    return seen


def forward_auth_decisions(v: GatewayProcess) -> float:
    """verifier_decisions_total{door="forward_auth"} summed over outcome and reason."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{v.extra['metrics_port']}/metrics", timeout=5).read().decode()
    return sum(float(value) for labels, value in DECISIONS.findall(text) if 'door="forward_auth"' in labels)


def reuse_seconds(cache_control: list[str]) -> int:
    """How long the plugin may reuse an answer with this Cache-Control (RFC 9111), as decision_cache.lua reads it."""
    max_age = 0
    for directive in ",".join(cache_control).lower().split(","):
        directive = directive.strip()
        if directive in ("no-store", "no-cache"):
            return 0
        if directive.startswith("max-age="):
            max_age = int(directive.split("=", 1)[1].strip('"'))
    return min(max_age, PLUGIN_MAX_TTL_S)


def expired_token(provider: OpenIDProvider, fresh: str) -> str:
    """A token exactly like `fresh` but expired, signed with the provider's own ES256 key."""
    header_ = jwt.get_unverified_header(fresh)
    claims = jwt.decode(fresh, options={"verify_signature": False})
    now = int(time.time())
    claims.update(iat=now - 2 * EXPIRED_BY_S, nbf=now - 2 * EXPIRED_BY_S, exp=now - EXPIRED_BY_S)
    (jwk,) = [k for k in provider.private_jwks()["keys"] if k["kid"] == header_["kid"]]
    key = jwt.PyJWK(jwk).key
    return jwt.encode(claims, key, algorithm=header_["alg"], headers={"typ": header_.get("typ", "at+jwt")})


# --------------------------------------------------------------------------- allow


def test_allow_sends_the_verified_identity_upstream_and_leaves_authorization_untouched(
    start_nginx, echo_upstream, verifier, provider, token
):
    base = start_nginx({"url": forward_auth_url(verifier), "cache_entries": 0}, echo_upstream)

    status, _, body = call(base, headers={"Authorization": f"Bearer {token}", "X-Authenticated-Userid": "admin"})

    assert status == 200
    seen = upstream_saw(body)
    assert seen["authorization"] == [f"Bearer {token}"]
    # the client-credentials token of the harness's client "app": the verifier names the client
    assert seen["x-authenticated-userid"] == ["app"]
    assert seen["x-authenticated-scope"] == ["read write"]
    assert seen["x-authenticated-issuer"] == [provider.issuer]
    assert "x-verifier-reason" not in seen


# --------------------------------------------------------------------------- deny


def test_no_token_is_refused_with_the_verifiers_challenge_relayed_exactly(start_nginx, echo_upstream, verifier):
    base = start_nginx({"url": forward_auth_url(verifier)}, echo_upstream)
    direct_status, direct_headers, direct_body = ask_verifier(verifier, {})

    status, headers, body = call(base)

    assert status == direct_status == 401
    assert header(headers, "WWW-Authenticate") == header(direct_headers, "WWW-Authenticate")
    metadata = f"{RESOURCE}/.well-known/oauth-protected-resource"
    assert header(headers, "WWW-Authenticate") == [f'Bearer realm="verifier", resource_metadata="{metadata}"']
    assert header(headers, "X-Verifier-Reason") == header(direct_headers, "X-Verifier-Reason")
    assert body == direct_body  # and not the echo upstream's JSON: the request never got there


@pytest.mark.parametrize("kind", ["expired", "garbage"])
def test_expired_or_garbage_token_is_refused_401_invalid_token(
    start_nginx, echo_upstream, verifier, provider, token, kind
):
    base = start_nginx({"url": forward_auth_url(verifier)}, echo_upstream)
    bad = expired_token(provider, token) if kind == "expired" else "not-a-jwt.at.all"
    _, direct_headers, direct_body = ask_verifier(verifier, {"Authorization": f"Bearer {bad}"})

    status, headers, body = call(base, headers={"Authorization": f"Bearer {bad}"})

    assert status == 401
    (challenge,) = header(headers, "WWW-Authenticate")
    assert challenge.startswith('Bearer realm="verifier"')
    assert 'error="invalid_token"' in challenge
    assert header(headers, "WWW-Authenticate") == header(direct_headers, "WWW-Authenticate")
    assert json.loads(body)["error"] == "invalid_token"
    assert body == direct_body


def test_token_for_another_audience_is_forbidden_403(start_nginx, echo_upstream, verifier, provider):
    base = start_nginx({"url": forward_auth_url(verifier)}, echo_upstream)
    other = provider.client_credentials_token(resource=OTHER_AUDIENCE)

    status, headers, body = call(base, headers={"Authorization": f"Bearer {other}"})

    assert status == 403
    (challenge,) = header(headers, "WWW-Authenticate")
    assert 'error="insufficient_scope"' in challenge
    assert json.loads(body)["error"] == "insufficient_scope"


# --------------------------------------------------------------------------- verifier down


def test_killed_verifier_fails_closed_with_503(start_nginx, echo_upstream, provider, token, tmp_path: Path):
    own = start_verifier(tmp_path, issuer=provider.issuer)
    try:
        base = start_nginx({"url": forward_auth_url(own), "cache_entries": 0}, echo_upstream)
        auth = {"Authorization": f"Bearer {token}"}
        assert call(base, headers=auth)[0] == 200  # a pooled keep-alive connection now exists

        own.proc.kill()
        own.proc.wait(timeout=10)

        for _ in range(2):  # the dead pooled connection, then a refused connect
            status, _, body = call(base, headers=auth)
            assert status == 503
            assert json.loads(body) == {"message": "Authorization service unavailable"}
    finally:
        own.stop()


# --------------------------------------------------------------------------- decision reuse


@pytest.mark.parametrize("kind", ["allow", "deny"])
def test_decision_cache_honours_the_verifiers_cache_control(start_nginx, echo_upstream, verifier, token, kind):
    """Whatever Cache-Control the verifier sends (no-store today, `private, max-age=N` for reusable
    decisions later), the plugin asks the verifier exactly as often as that allows."""
    base = start_nginx({"url": forward_auth_url(verifier)}, echo_upstream, with_sha256=True)
    auth = {"Authorization": f"Bearer {token}" if kind == "allow" else "Bearer garbage.garbage.garbage"}
    path = f"/api/reuse-{kind}?n=1"  # a URI no other test asks about
    direct_status, direct_headers, _ = ask_verifier(verifier, auth, path)
    reusable = reuse_seconds(header(direct_headers, "Cache-Control")) > 0

    before = forward_auth_decisions(verifier)
    statuses = [call(base, path, auth)[0] for _ in range(REPEATS)]
    asked = forward_auth_decisions(verifier) - before

    assert statuses == [direct_status] * REPEATS
    assert asked == (1 if reusable else REPEATS), header(direct_headers, "Cache-Control")


# --------------------------------------------------------------------------- Kong consumers (issue #20)

#: The harness's client-credentials tokens: `sub` is the client, "app".
APP = {"id": "a0a0a0a0-0000-4000-8000-00000000a001", "username": "app", "custom_id": "app", "groups": ["readers"]}


def naming_verifier(tmp_path: Path, provider: OpenIDProvider, by: str) -> GatewayProcess:
    """A verifier of its own that names the Kong consumer by `sub`, as username or custom_id."""
    upstream = {"consumer": {"claim": "sub", "by": by}}
    return start_verifier(tmp_path, issuer=provider.issuer, extra_config={"upstream": upstream})


@pytest.mark.parametrize("by", ["username", "custom_id"])
def test_the_consumer_the_verifier_names_is_what_acl_and_the_upstream_see(
    start_nginx, echo_upstream, provider, token, tmp_path: Path, by: str
):
    own = naming_verifier(tmp_path, provider, by)
    try:
        consumer = {**APP, "username": "app-user"} if by == "custom_id" else APP
        base = start_nginx(
            {"url": forward_auth_url(own), "cache_entries": 0},
            echo_upstream,
            consumers=[consumer],
            later={"acl": {"allow": ["readers"]}},
        )

        status, _, body = call(base, headers={"Authorization": f"Bearer {token}", "X-Consumer-Username": "root"})

        assert status == 200
        seen = upstream_saw(body)
        assert seen["x-consumer-id"] == [APP["id"]]
        assert seen["x-consumer-username"] == [consumer["username"]]
        assert seen["x-consumer-groups"] == ["readers"]
        assert not [k for k in seen if k.startswith("x-kong-")]
    finally:
        own.stop()


def test_a_verified_identity_kong_has_no_consumer_for_is_refused(start_nginx, echo_upstream, provider, token, tmp_path):
    own = naming_verifier(tmp_path, provider, "username")
    try:
        base = start_nginx({"url": forward_auth_url(own), "cache_entries": 0}, echo_upstream, consumers=[])

        status, _, body = call(base, headers={"Authorization": f"Bearer {token}"})

        assert status == 403
        assert json.loads(body) == {"message": "The verified identity is not a known consumer"}
    finally:
        own.stop()
