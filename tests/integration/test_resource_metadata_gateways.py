"""RFC 9728 discovery through the shipped gateways (#21 item 4): nginx, Envoy (HTTP ext_authz) and Envoy reuse (Lua).

An MCP client that gets a 401 reads `resource_metadata` from the challenge and fetches that URL
WITHOUT a token: the rendered deploy/ templates must pass `/.well-known/oauth-protected-resource*`
to the verifier unauthenticated (and never to the upstream), GET only, and relay the challenge.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterator

import gateways
import pytest
from gateways import (
    EchoUpstream,
    GatewayProcess,
    LocalIssuer,
    http_request,
    start_gateway_for,
    start_verifier,
)
from rfc9728kit import check_rfc9728_document, parse_challenge
from rigs import gateway_fixture

pytestmark = pytest.mark.integration

HOST = "api.example.test"
ORDERS = f"https://{HOST}/orders"
WELL_KNOWN = "/.well-known/oauth-protected-resource"


@pytest.fixture(scope="module")
def verifier(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    proc = start_verifier(
        tmp_path_factory.mktemp("rfc9728"),
        issuer=issuer.issuer,
        extra_config={
            "protected_resource": {"resource": f"https://{HOST}", "max_age_seconds": 300},
            "policies": [
                {
                    "name": "orders",
                    "match": {"path_prefix": "/orders"},
                    "resource": ORDERS,
                    "require": {"scopes_any": ["orders:read"]},
                },
                {"name": "rest", "match": {"path_prefix": "/"}},
            ],
        },
    )
    yield proc
    proc.stop()


gateway = gateway_fixture("gateway", ("nginx", "nginx-lua", "envoy-http", "envoy-reuse"))


def test_a_401_names_metadata_the_client_can_fetch_through_the_gateway_without_a_token(
    gateway: str, upstream: EchoUpstream, issuer: LocalIssuer
) -> None:
    upstream.clear()
    refused = http_request(f"{gateway}/orders/42", headers={"Host": HOST})
    assert refused.status == 401
    scheme, params = parse_challenge(refused.headers["www-authenticate"])
    assert scheme == "Bearer" and params["resource_metadata"] == f"https://{HOST}{WELL_KNOWN}/orders"
    assert params["scope"] == "orders:read"
    url = urllib.parse.urlsplit(params["resource_metadata"])
    fetched = http_request(f"{gateway}{url.path}", headers={"Host": url.netloc})  # no Authorization at all
    assert fetched.status == 200, fetched.body
    assert fetched.headers["cache-control"] == "public, max-age=300"
    document = json.loads(fetched.body)
    check_rfc9728_document(document, params["resource_metadata"])
    assert document["resource"] == ORDERS and document["authorization_servers"] == [issuer.issuer]
    assert document["scopes_supported"] == ["orders:read"] and document["bearer_methods_supported"] == ["header"]
    default = http_request(f"{gateway}{WELL_KNOWN}", headers={"Host": HOST})
    assert default.status == 200 and json.loads(default.body)["resource"] == f"https://{HOST}"
    assert not upstream.requests, "discovery reached the upstream"


def test_a_client_chosen_host_never_changes_where_the_challenge_points(gateway: str) -> None:
    for host in ("evil.example.test", "evil.example.test:8443"):
        # the client's words for the host, on a host the gateway serves: the challenge still points at ours
        refused = http_request(
            f"{gateway}/orders/42", headers={"Host": HOST, "X-Forwarded-Host": host, "Forwarded": f"host={host}"}
        )
        assert refused.status == 401
        resource_metadata = parse_challenge(refused.headers["www-authenticate"])[1]["resource_metadata"]
        assert resource_metadata == f"https://{HOST}{WELL_KNOWN}/orders"
        # a host the gateway does not serve: refused before any check (421), so no challenge points anywhere
        misdirected = http_request(
            f"{gateway}/orders/42", headers={"Host": host, "X-Forwarded-Host": host, "Forwarded": f"host={host}"}
        )
        assert misdirected.status == 421 and "www-authenticate" not in misdirected.headers


def test_a_403_carries_the_same_discovery_parameters(gateway: str, issuer: LocalIssuer) -> None:
    refused = http_request(
        f"{gateway}/orders/42",
        headers={"Host": HOST, "Authorization": f"Bearer {issuer.mint(aud=[issuer.audience, ORDERS], scope='read')}"},
    )
    _, params = parse_challenge(refused.headers["www-authenticate"])
    assert (refused.status, params["error"]) == (403, "insufficient_scope")
    assert params["resource_metadata"] == f"https://{HOST}{WELL_KNOWN}/orders" and params["scope"] == "orders:read"


def test_only_get_reaches_the_metadata(gateway: str, upstream: EchoUpstream) -> None:
    upstream.clear()
    answer = http_request(f"{gateway}{WELL_KNOWN}/orders", method="POST", headers={"Host": HOST}, body=b"{}")
    # nginx refuses other methods there (403); Envoy routes them like any request: ext_authz, a 401
    assert answer.status in (401, 403)
    assert not upstream.requests


def test_a_head_request_leaves_the_gateway_and_the_next_get_intact(gateway: str) -> None:
    for _ in range(3):  # nginx reuses its upstream connections: a body after a HEAD answer would desync them
        head = http_request(f"{gateway}{WELL_KNOWN}/orders", method="HEAD", headers={"Host": HOST})
        assert head.status in (200, 401) and head.body == b""
        fetched = http_request(f"{gateway}{WELL_KNOWN}/orders", headers={"Host": HOST})
        assert fetched.status == 200 and json.loads(fetched.body)["resource"] == ORDERS


@pytest.mark.parametrize(
    "target",
    [
        "/v1/forward-auth/../../.well-known/oauth-protected-resource",
        "/v1/forward-auth/%2e%2e/%2e%2e/.well-known/oauth-protected-resource",
        "/healthz/../.well-known/oauth-protected-resource",
    ],
)
def test_a_target_the_gateway_normalizes_into_the_metadata_never_reaches_another_verifier_endpoint(
    gateway: str, issuer: LocalIssuer, upstream: EchoUpstream, target: str
) -> None:
    """The attacker's view: the gateway matches the metadata location on the target it normalized, but may
    pass the raw one on; the verifier must not read that raw target as its forward-auth door (whose answer,
    identity headers and all, is the gateway's alone, asked with headers the gateway sets) or any other
    endpoint."""
    upstream.clear()
    token = issuer.mint(aud=[issuer.audience, ORDERS], scope="orders:read")
    answer = http_request(
        f"{gateway}{target}",
        headers={"Host": HOST, "Authorization": f"Bearer {token}", "X-Forwarded-Uri": "/orders/1"},
    )
    assert not any(name.startswith("x-authenticated-") for name in answer.headers), sorted(answer.headers.items())
    assert answer.status != 200 or json.loads(answer.body)["resource"] == f"https://{HOST}", answer
    assert b"SERVING" not in answer.body
    assert not upstream.requests


@pytest.fixture(scope="module")
def nginx_passing_the_raw_target(
    verifier: GatewayProcess, upstream: EchoUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """nginx as an operator's copy of the template from before a1f8e3b: its metadata locations `proxy_pass`
    without a URI, so nginx passes the client's raw target on and the door alone keeps it from being a check."""
    work = tmp_path_factory.mktemp("nginx-raw-target")
    shipped, with_uri = gateways.NGINX_TEMPLATE.read_text(), "proxy_pass http://verifier/.well-known/oauth-protected-resource;"
    assert with_uri in shipped
    copy = work / "nginx.conf.template"
    copy.write_text(shipped.replace(with_uri, "proxy_pass http://verifier;"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gateways, "NGINX_TEMPLATE", copy)
        gw = start_gateway_for("nginx", work, verifier, upstream.port)
    yield gw.url
    gw.stop()


@pytest.mark.parametrize(
    "target",
    [
        "/v1/forward-auth/../../.well-known/oauth-protected-resource",
        # nginx's path ends at `#`: its location matched on what comes before; past it, the door's path again
        "/v1/forward-auth/../../.well-known/oauth-protected-resource#/../../v1/forward-auth/x",
        "/v1/forward-auth/%2e%2e/%2e%2e/.well-known/oauth-protected-resource#/%2e%2e/%2e%2e/v1/forward-auth",
    ],
)
def test_a_raw_target_nginx_matched_into_the_metadata_is_never_a_check(
    nginx_passing_the_raw_target: str, issuer: LocalIssuer, upstream: EchoUpstream, target: str
) -> None:
    """The attacker's view, through a real nginx that passes the raw target: the verifier is the last line, and
    must not answer it as a check (identity headers to the client)."""
    upstream.clear()
    token = issuer.mint(aud=[issuer.audience, ORDERS], scope="orders:read")
    url = urllib.parse.urlsplit(nginx_passing_the_raw_target)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:  # the target as it is: http_request (urlsplit) would leave out what follows `#`
        conn.request("GET", target, headers={"Host": HOST, "Authorization": f"Bearer {token}"})
        answer = conn.getresponse()
        answer.read()
    finally:
        conn.close()
    assert not any(name.lower().startswith("x-authenticated-") for name in answer.headers), answer.getheaders()
    assert answer.status == 404, answer.getheaders()
    assert not upstream.requests
