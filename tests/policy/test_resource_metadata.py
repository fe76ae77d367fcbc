"""RFC 9728 protected resource metadata (#21 item 4): the documents, and `resource_metadata` in challenges.

The metadata documents are checked against RFC 9728 section 2 (member types) and section 3.3 (the
`resource` is exactly the identifier the well-known URL was derived from); every Bearer, DPoP and
step-up challenge is parsed as RFC 9110 section 11 auth-params and must name the route's metadata URL,
built from the configuration, never from the request's Host.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from doorkit import http_exchange
from rfc9728kit import check_rfc9728_document, parse_challenge
from support import free_port

from verifier.app import App
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.policy.metadata import WELL_KNOWN, metadata_url
from verifier.settings import ConfigError, parse_settings

API = "https://api.example.test"
ORDERS = f"{API}/orders"
PAY = "https://pay.example.test/"  # a second resource whose metadata path is the default's: Host tells


def _config(idp: DevIdentityProvider) -> dict[str, Any]:
    return {
        "http": {"listen": "127.0.0.1:0"},
        "issuers": [
            {"issuer": idp.issuer, "audiences": [DEV_AUDIENCE], "algorithms": ["ES256"], "allow_insecure_http": True}
        ],
        "dpop": {"algorithms": ["ES256", "EdDSA"]},
        "protected_resource": {"resource": API, "resource_name": "Example API", "scopes_supported": ["read"],
                               "max_age_seconds": 600},
        "policies": [
            {"name": "orders", "match": {"path_prefix": "/orders"}, "resource": ORDERS, "resource_name": "Orders",
             "require": {"scopes_any": ["orders:read"], "issuers_any": [idp.issuer]}},
            {"name": "pay", "match": {"path_prefix": "/pay"}, "resource": PAY,
             "require": {"sender_constraint": "dpop"}},
            {"name": "fresh", "match": {"path_prefix": "/fresh"}, "require": {"acr_any": ["phr"]}},
            {"name": "rest", "match": {"path_prefix": "/"}},
        ],
    }  # fmt: skip


@pytest.fixture
async def service() -> AsyncIterator[tuple[App, DevIdentityProvider]]:
    idp = DevIdentityProvider(port=free_port())
    await idp.start()
    app = App(parse_settings(_config(idp)))
    await app.start()
    try:
        await asyncio.wait_for(app.wait_serving(), 10)
        yield app, idp
    finally:
        await app.stop(grace=0.2)
        await idp.stop()


async def _get(app: App, target: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    raw = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    assert app.ports.http is not None
    head, _, body = (await http_exchange(app.ports.http, raw.encode())).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split(" ")[1]), fields, body


async def _ask(app: App, path: str, token: str | None = None, **extra: str) -> tuple[int, dict[str, str]]:
    headers = {"Host": "verifier.internal", "X-Forwarded-Uri": path, **extra}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    status, fields, _ = await _get(app, "/v1/forward-auth", headers)
    return status, fields


@pytest.mark.parametrize(
    ("resource", "url"),
    [  # RFC 9728 section 3.1 and its example
        ("https://resource.example.com/resource1", "https://resource.example.com/.well-known/oauth-protected-resource/resource1"),
        ("https://resource.example.com", "https://resource.example.com/.well-known/oauth-protected-resource"),
        ("https://resource.example.com/", "https://resource.example.com/.well-known/oauth-protected-resource"),
        ("https://r.example:8443/a/b", "https://r.example:8443/.well-known/oauth-protected-resource/a/b"),
    ],
)  # fmt: skip
def test_the_metadata_url_is_derived_as_section_3_1_says(resource: str, url: str) -> None:
    assert metadata_url(resource) == url


async def test_each_resource_is_served_at_its_well_known_url_without_a_token(
    service: tuple[App, DevIdentityProvider],
) -> None:
    app, idp = service
    status, headers, body = await _get(app, f"{WELL_KNOWN}/orders", {"Host": "api.example.test"})
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["cache-control"] == "public, max-age=600"
    orders = json.loads(body)
    check_rfc9728_document(orders, f"{API}{WELL_KNOWN}/orders")
    assert orders == {
        "resource": ORDERS,
        "authorization_servers": [idp.issuer],
        "scopes_supported": ["orders:read"],
        "bearer_methods_supported": ["header"],
        "resource_name": "Orders",
        "dpop_signing_alg_values_supported": ["ES256", "EdDSA"],
    }
    status, _, body = await _get(app, WELL_KNOWN, {"Host": "api.example.test"})
    default = json.loads(body)
    check_rfc9728_document(default, f"{API}{WELL_KNOWN}")
    assert status == 200 and default["resource"] == API and default["scopes_supported"] == ["read"]
    # Two resources share the path: the request's host picks, and an unknown host gets neither.
    status, _, body = await _get(app, WELL_KNOWN, {"Host": "PAY.example.test:443"})
    pay = json.loads(body)
    check_rfc9728_document(pay, f"https://pay.example.test{WELL_KNOWN}")
    assert status == 200 and pay["resource"] == PAY and pay["dpop_bound_access_tokens_required"] is True
    assert (await _get(app, WELL_KNOWN, {"Host": "evil.example.test"}))[0] == 404
    assert (await _get(app, f"{WELL_KNOWN}/nothing-here", {"Host": "api.example.test"}))[0] == 404


async def test_every_challenge_names_the_routes_metadata_never_the_requests_host(
    service: tuple[App, DevIdentityProvider],
) -> None:
    app, idp = service
    spoof = {"Host": "evil.example.test", "X-Forwarded-Host": "evil.example.test", "X-Forwarded-Proto": "http"}
    orders_metadata = f"{API}{WELL_KNOWN}/orders"
    status, headers = await _ask(app, "/orders/1", **spoof)  # no token: the bare challenge an MCP client reads
    assert status == 401
    assert parse_challenge(headers["www-authenticate"]) == (
        "Bearer",
        {"realm": "verifier", "resource_metadata": orders_metadata, "scope": "orders:read"},
    )
    garbage = "not-a-token"
    status, headers = await _ask(app, "/elsewhere", garbage)
    _, params = parse_challenge(headers["www-authenticate"])
    assert (status, params["error"], params["resource_metadata"]) == (401, "invalid_token", f"{API}{WELL_KNOWN}")
    # The same refused token on another route (now from the negative cache) names that route's metadata.
    status, headers = await _ask(app, "/orders/1", garbage)
    assert headers["x-verifier-reason"] == "token_malformed"
    assert parse_challenge(headers["www-authenticate"])[1]["resource_metadata"] == orders_metadata
    # 403: insufficient_scope with the scope to ask for.
    status, headers = await _ask(app, "/orders/1", idp.mint(claims={"aud": [DEV_AUDIENCE, ORDERS]}, scope="read"))
    _, params = parse_challenge(headers["www-authenticate"])
    assert (status, params["error"], params["scope"]) == (403, "insufficient_scope", "orders:read")
    assert params["resource_metadata"] == orders_metadata
    # DPoP (RFC 9449 section 7.1) and step-up (RFC 9470) challenges carry it too.
    status, headers = await _ask(app, "/pay", idp.mint())
    scheme, params = parse_challenge(headers["www-authenticate"])
    assert (status, scheme) == (401, "DPoP") and params["resource_metadata"] == f"https://pay.example.test{WELL_KNOWN}"
    assert params["algs"] == "ES256 EdDSA"
    status, headers = await _ask(app, "/fresh", idp.mint())
    _, params = parse_challenge(headers["www-authenticate"])
    assert (status, params["error"]) == (401, "insufficient_user_authentication")
    assert params["resource_metadata"] == f"{API}{WELL_KNOWN}" and params["acr_values"] == "phr"


async def test_a_routes_resource_is_an_audience_it_requires(service: tuple[App, DevIdentityProvider]) -> None:
    app, idp = service
    status, headers = await _ask(app, "/orders/1", idp.mint(scope="orders:read"))  # aud: the global one only
    assert (status, headers["x-verifier-reason"]) == (401, "audience_not_trusted")
    assert parse_challenge(headers["www-authenticate"])[1]["error"] == "invalid_token"
    token = idp.mint(scope="orders:read", claims={"aud": [DEV_AUDIENCE, ORDERS]})
    assert (await _ask(app, "/orders/1", token))[0] == 200


@pytest.mark.parametrize(
    ("resource", "problem"),
    [
        ("https://api.example.test/orders#x", "no fragment"),
        ("https://api.example.test/orders?x=1", "no query"),
        ("http://api.example.test/orders", "https is required"),
        ("api.example.test/orders", "expected an http(s) URL"),
        ('https://api.example.test/"x"', "printable ASCII"),
    ],
)
def test_a_bad_resource_identifier_is_refused_by_key(resource: str, problem: str) -> None:
    config = _config(DevIdentityProvider(port=free_port()))
    config["policies"][0]["resource"] = resource
    config["protected_resource"]["resource"] = resource
    with pytest.raises(ConfigError) as refused:
        parse_settings(config)
    message = str(refused.value)
    assert "policies[0].resource: " in message and "protected_resource.resource: " in message
    assert problem in message


def test_the_readme_mcp_example_answers_as_documented() -> None:
    """The README's MCP-server example: its config validates, and the 401 and the document it shows are ours."""
    from pathlib import Path

    import yaml

    from verifier.doors.refusals import refuse
    from verifier.errors import MissingToken
    from verifier.policy.metadata import resource_documents
    from verifier.policy.rules import PolicySet
    from verifier.request import RequestAttributes

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("**An MCP server behind the verifier.**") :]
    config, header, document = (
        re.search(rf"```{kind}\n(.*?)```", section, re.DOTALL).group(1)  # type: ignore[union-attr]
        for kind in ("yaml", "text", "json")
    )
    settings = parse_settings({**yaml.safe_load(config), "http": {"listen": "127.0.0.1:0"}})
    assert settings.policies is not None
    policies = PolicySet(settings.policies, settings.protected_resource)
    attrs = RequestAttributes(method="POST", scheme="https", host="mcp.example.test", path="/mcp", headers={})
    route = policies.match(attrs)
    assert route is not None
    answer = refuse(MissingToken("no access token"), realm=settings.realm, route_params=route.challenge)
    documented = dict(line.split(": ", 1) for line in header.strip().splitlines()[1:])
    assert dict(answer.response_headers)["www-authenticate"] == documented["WWW-Authenticate"]
    served = resource_documents(settings.policies, settings.protected_resource, ["https://idp.example.test"], [],
                                dpop_configured=False)  # fmt: skip
    assert json.loads(document) in [d.document for d in served]


async def test_both_grpc_doors_relay_the_routes_resource_metadata() -> None:
    """Envoy's ext_authz gRPC (denied_response) and our own Check carry the same challenge as forward-auth."""
    import grpc
    from doorkit import running_verifier
    from envoy.service.auth.v3 import attribute_context_pb2 as ac
    from envoy.service.auth.v3 import external_auth_pb2 as ea
    from envoy.service.auth.v3 import external_auth_pb2_grpc as ea_grpc

    from verifier.settings import PolicySettings, Requirements, RouteMatch
    from verifier.v1 import verifier_pb2, verifier_pb2_grpc

    policy = PolicySettings(
        name="orders", match=RouteMatch(path_prefix="/orders"), require=Requirements(scopes_any=("orders:read",)),
        resource=ORDERS,
    )  # fmt: skip
    http = ac.AttributeContext.HttpRequest(method="GET", path="/orders/1", host="evil.example.test", scheme="https")
    expected = {"realm": "verifier", "resource_metadata": f"{API}{WELL_KNOWN}/orders", "scope": "orders:read"}
    async with running_verifier({"policies": (policy,)}) as (app, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            envoy = await ea_grpc.AuthorizationStub(channel).Check(
                ea.CheckRequest(attributes=ac.AttributeContext(request=ac.AttributeContext.Request(http=http)))
            )
            headers = {h.header.key.lower(): h.header.value for h in envoy.denied_response.headers}
            assert parse_challenge(headers["www-authenticate"]) == ("Bearer", expected)
            own = await verifier_pb2_grpc.VerifierStub(channel).Check(
                verifier_pb2.CheckRequest(method="GET", host="evil.example.test", path="/orders/1")
            )
            ours = {h.name.lower(): h.value for h in own.response_headers}
            assert parse_challenge(ours["www-authenticate"]) == ("Bearer", expected)
