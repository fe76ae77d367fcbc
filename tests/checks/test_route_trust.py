"""Per-route trust (#21 item 3): a policy names the issuers, audiences and clients whose tokens it takes.

Two development providers play two tenants: A issues JWTs, B issues opaque tokens (introspection).
A route for tenant B refuses tenant A's tokens and the reverse, cached token or not; an opaque token
on a route that does not trust B is never sent to B's introspection endpoint (counted at the
provider); routes without `issuers_any`/`audiences_any`/`clients_any` keep the global rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from doorkit import http_exchange
from support import free_port

from verifier.app import App
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.settings import ConfigError, parse_settings

ORDERS = "https://orders.example.test"  # an audience only the /aud route asks for


def _issuer(idp: DevIdentityProvider, **extra: Any) -> dict[str, Any]:
    return {
        "issuer": idp.issuer,
        "audiences": [DEV_AUDIENCE],
        "algorithms": ["ES256"],
        "allow_insecure_http": True,  # the development providers on loopback
        **extra,
    }


def _policies(a: DevIdentityProvider, b: DevIdentityProvider) -> list[dict[str, Any]]:
    return [
        {"name": "tenant-a", "match": {"path_prefix": "/tenant-a/"}, "require": {"issuers_any": [a.issuer]}},
        {"name": "tenant-b", "match": {"path_prefix": "/tenant-b/"}, "require": {"issuers_any": [b.issuer]}},
        {"name": "aud", "match": {"path_prefix": "/aud"}, "require": {"audiences_any": [ORDERS]}},
        {"name": "client", "match": {"path_prefix": "/client"}, "require": {"clients_any": ["mcp-client"]}},
        {"name": "both", "match": {"path_prefix": "/both"}, "require": {"clients_any": ["mcp-client", "dev-client"]}},
        {"name": "rest", "match": {"path_prefix": "/"}},
    ]


Tenants = tuple[App, DevIdentityProvider, DevIdentityProvider]


@contextlib.asynccontextmanager
async def _serving(
    monkeypatch: pytest.MonkeyPatch, configure: Callable[[DevIdentityProvider, DevIdentityProvider], dict[str, Any]]
) -> AsyncIterator[Tenants]:
    """Two development providers (their introspection secrets in TRUST_SECRET_A/_B) and a verifier
    configured by `configure(a, b)`."""
    a, b = DevIdentityProvider(port=free_port()), DevIdentityProvider(port=free_port())
    await a.start()
    await b.start()
    monkeypatch.setenv("TRUST_SECRET_A", a.introspection_client_secret)
    monkeypatch.setenv("TRUST_SECRET_B", b.introspection_client_secret)
    app = App(parse_settings({"http": {"listen": "127.0.0.1:0"}, **configure(a, b)}))
    await app.start()
    try:
        await asyncio.wait_for(app.wait_serving(), 10)
        yield app, a, b
    finally:
        await app.stop(grace=0.2)
        await a.stop()
        await b.stop()


def _introspection(idp: DevIdentityProvider, env: str) -> dict[str, str]:
    return {"client_id": idp.introspection_client_id, "client_secret_env": env}


@pytest.fixture
async def tenants(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Tenants]:
    """A issues JWTs, B opaque tokens."""

    def configure(a: DevIdentityProvider, b: DevIdentityProvider) -> dict[str, Any]:
        issuers = [_issuer(a), _issuer(b, introspection=_introspection(b, "TRUST_SECRET_B"))]
        return {"issuers": issuers, "policies": _policies(a, b)}

    async with _serving(monkeypatch, configure) as running:
        yield running


async def _ask(app: App, path: str, token: str) -> tuple[int, dict[str, str]]:
    raw = (
        f"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nX-Forwarded-Uri: {path}\r\nAuthorization: Bearer {token}\r\n\r\n"
    ).encode()
    assert app.ports.http is not None
    head = (await http_exchange(app.ports.http, raw)).split(b"\r\n\r\n", 1)[0].decode()
    lines = head.split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}


async def test_a_tenant_a_token_is_refused_on_tenant_b_routes_and_allowed_on_its_own(
    tenants: Tenants,
) -> None:
    app, a, _ = tenants
    token = a.mint(sub="alice")
    assert (await _ask(app, "/tenant-a/orders", token))[0] == 200
    status, headers = await _ask(app, "/tenant-b/orders", token)  # the same token, now from the cache
    assert (status, headers["x-verifier-reason"]) == (401, "issuer_not_trusted")
    assert headers["www-authenticate"].startswith('Bearer realm="verifier", error="invalid_token"')
    assert (await _ask(app, "/rest", token))[0] == 200  # a route without issuers_any: the global rule
    fresh = a.mint(sub="alice")  # first seen on the wrong route: refused, and not remembered as bad
    assert (await _ask(app, "/tenant-b/x", fresh))[1]["x-verifier-reason"] == "issuer_not_trusted"
    assert (await _ask(app, "/tenant-a/x", fresh))[0] == 200


async def test_an_opaque_token_never_reaches_an_introspection_endpoint_the_route_does_not_trust(
    tenants: Tenants,
) -> None:
    app, a, b = tenants
    b.reset_counts()
    opaque = b.mint_opaque(sub="bob")
    status, headers = await _ask(app, "/tenant-a/orders", opaque)
    assert (status, headers["x-verifier-reason"]) == (401, "issuer_not_trusted")
    assert b.tokens_asked == 0, "an opaque token went to a provider the route does not trust"
    assert (await _ask(app, "/tenant-b/orders", opaque))[0] == 200  # B's route: introspected at B, once
    assert b.tokens_asked == 1
    assert (await _ask(app, "/tenant-a/orders", opaque))[1]["x-verifier-reason"] == "issuer_not_trusted"  # cached
    assert (await _ask(app, "/rest", opaque))[0] == 200
    assert b.tokens_asked == 1
    assert a.tokens_asked == 0


async def test_audiences_any_takes_a_token_for_one_of_its_audiences_only(
    tenants: Tenants,
) -> None:
    app, a, _ = tenants
    both = a.mint(claims={"aud": [DEV_AUDIENCE, ORDERS]})
    assert (await _ask(app, "/aud", both))[0] == 200
    status, headers = await _ask(app, "/aud", a.mint())  # aud is only the global audience
    assert (status, headers["x-verifier-reason"]) == (401, "audience_not_trusted")
    assert 'error="invalid_token"' in headers["www-authenticate"]
    hostile = a.mint(claims={"aud": [DEV_AUDIENCE, {"a": ORDERS}, [ORDERS], 7]})  # no crash, no match
    assert (await _ask(app, "/aud", hostile))[1]["x-verifier-reason"] == "audience_not_trusted"


@pytest.mark.parametrize(
    ("claims", "allowed"),
    [
        ({"client_id": "mcp-client"}, True),
        ({"client_id": None, "azp": "mcp-client"}, True),  # no client_id: azp (Keycloak, Entra v2)
        ({"azp": "mcp-client", "client_id": "mcp-client"}, True),  # both, the same client (Keycloak service accounts)
        ({}, False),  # client_id dev-client
        ({"azp": "mcp-client"}, False),  # client_id dev-client besides: two clients, dev-client not listed
        ({"azp": "other", "client_id": "mcp-client"}, False),  # the same, the other way round
    ],
)
async def test_clients_any_admits_a_token_only_when_every_client_it_names_is_listed(
    tenants: Tenants, claims: dict[str, Any], allowed: bool
) -> None:
    app, a, _ = tenants
    status, headers = await _ask(app, "/client", a.mint(claims=claims))
    if allowed:
        assert status == 200
    else:
        assert (status, headers["x-verifier-reason"]) == (403, "client_not_allowed")
        assert 'error="insufficient_scope"' in headers["www-authenticate"]


# A token naming two clients: `client_id` (RFC 9068 2.2) one, `azp` (OIDC Core 2) another, as a Keycloak token
# exchanged by one client for another's session (its service-account `client_id` mapper and its `azp`) carries.
TWO_CLIENTS = {"client_id": "dev-client", "azp": "mcp-client"}
ADMIN_TOKEN = "an-admin-token-for-the-route-trust-tests-0123"


@pytest.mark.parametrize("kind", ["jwt", "opaque"])
async def test_a_token_naming_two_clients_passes_a_route_for_one_of_them_only_if_it_lists_both(
    tenants: Tenants, kind: str
) -> None:
    """The attacker's token, requested by dev-client in mcp-client's name (or the reverse), on a route for
    mcp-client alone: it was admitted as mcp-client (`azp`) while revocation, the rate limit, the audit line and
    the upstream knew it as dev-client (`client_id`)."""
    app, a, b = tenants
    for claims in (TWO_CLIENTS, {"client_id": "mcp-client", "azp": "dev-client"}):
        token = a.mint(claims=claims) if kind == "jwt" else b.mint_opaque(claims=claims)
        status, headers = await _ask(app, "/client", token)
        assert (status, headers.get("x-verifier-reason")) == (403, "client_not_allowed"), claims
        assert (await _ask(app, "/both/x", token))[0] == 200  # a route listing both clients takes it
        assert (await _ask(app, "/rest", token))[0] == 200  # and a route naming no client


async def test_the_audit_line_of_a_token_naming_two_clients_names_both(
    tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    """The clients the route judged: `client_id`, and the other as `azp` (one line per token checked)."""
    caplog.set_level(logging.INFO, logger="verifier.audit")
    app, a, b = tenants
    tokens = (a.mint(claims=TWO_CLIENTS), b.mint_opaque(claims=TWO_CLIENTS), a.mint(claims={"azp": "dev-client"}))
    for token in tokens:
        assert (await _ask(app, "/both", token))[0] == 200
    lines = [json.loads("{" + r.__dict__["_json_fields"] + "}") for r in caplog.records
             if r.name == "verifier.audit" and r.msg == "signature_check"]  # fmt: skip
    assert [(line["client_id"], line.get("azp")) for line in lines] == [
        ("dev-client", "mcp-client"), ("dev-client", "mcp-client"), ("dev-client", None)]  # fmt: skip


@pytest.mark.parametrize("claims", [{"azp": ["mcp-client"]}, {"client_id": 7, "azp": "mcp-client"}, {"azp": {}}])
async def test_a_client_claim_that_is_not_a_string_refuses_the_token(tenants: Tenants, claims: dict[str, Any]) -> None:
    """Not a client any entry, allow-list or upstream could name the same way: refused, whatever the route."""
    app, a, b = tenants
    for token in (a.mint(claims=claims), b.mint_opaque(claims=claims)):
        for path in ("/client", "/rest"):
            status, headers = await _ask(app, path, token)
            assert (status, headers.get("x-verifier-reason")) == (401, "claim_invalid"), (claims, path)


@pytest.fixture
async def killable(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Tenants]:
    """The tenants, the kill switch on the HTTP listener, and each token's `client_id` sent to the upstream."""
    monkeypatch.setenv("VERIFIER_ADMIN_TOKEN", ADMIN_TOKEN)

    def configure(a: DevIdentityProvider, b: DevIdentityProvider) -> dict[str, Any]:
        issuers = [_issuer(a), _issuer(b, introspection=_introspection(b, "TRUST_SECRET_B"))]
        upstream = {"headers": [{"header": "X-Authenticated-Client", "claim": "client_id"}]}
        return {"issuers": issuers, "policies": _policies(a, b), "revocation": {"transmitters": []},
                "upstream": upstream}  # fmt: skip

    async with _serving(monkeypatch, configure) as running:
        yield running


async def _kill_client(app: App, client: str) -> None:
    body = json.dumps({"subject": {"format": "complex", "application": {"format": "opaque", "id": client}}}).encode()
    raw = (
        f"POST /v1/admin/revocations HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    assert app.ports.http is not None
    assert (await http_exchange(app.ports.http, raw)).startswith(b"HTTP/1.1 201")


@pytest.mark.parametrize("kind", ["jwt", "opaque"])
async def test_a_client_revoked_by_the_kill_switch_refuses_a_token_naming_it_as_either_client(
    killable: Tenants, kind: str
) -> None:
    """mcp-client is revoked: the token dev-client requested in its name (`azp: mcp-client`) was still allowed, on
    the route for mcp-client too, its upstream told `X-Authenticated-Client: dev-client`."""
    app, a, b = killable
    mint = (lambda c: a.mint(claims=c)) if kind == "jwt" else (lambda c: b.mint_opaque(claims=c))
    named_by_azp, named_by_client_id, other = (
        mint(TWO_CLIENTS),
        mint({"client_id": "mcp-client", "azp": "dev-client"}),
        mint({}),
    )
    for token in (named_by_azp, named_by_client_id, other):  # judged and cached before the revocation
        status, headers = await _ask(app, "/both", token)
        assert (status, headers["x-authenticated-client"]) == (
            200,
            "mcp-client" if token is named_by_client_id else "dev-client",
        )
    await _kill_client(app, "mcp-client")
    for token in (named_by_azp, named_by_client_id):
        for path in ("/both", "/rest", "/client"):
            status, headers = await _ask(app, path, token)
            assert status in (401, 403) and status != 200, (path, status)
        assert (await _ask(app, "/rest", token))[1]["x-verifier-reason"] == "token_revoked"
    assert (await _ask(app, "/rest", other))[0] == 200  # dev-client's own tokens pass


def test_an_unknown_issuer_in_issuers_any_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match=r"policies\[0\]\.require\.issuers_any\[0\]: 'https://typo\.test' is not"):
        parse_settings(
            {
                "http": {"listen": "127.0.0.1:0"},
                "issuers": [{"issuer": "https://idp.test", "audiences": ["x"], "algorithms": ["ES256"]}],
                "policies": [{"match": {"path_prefix": "/"}, "require": {"issuers_any": ["https://typo.test"]}}],
            }
        )


@pytest.mark.parametrize(
    ("listed", "accepted"),
    [
        ("https://login.example.test/{tenant}/v2.0", True),  # the template string itself
        ("https://login.example.test/acme/v2.0", True),  # one concrete issuer of it
        ("https://login.example.test/acme/x/v2.0", False),  # a placeholder stands for one segment
        ("https://evil.example.test/acme/v2.0", False),
    ],
)
def test_issuers_any_may_name_an_issuer_template_or_a_concrete_issuer_of_it(listed: str, accepted: bool) -> None:
    from verifier.config.base import Reader
    from verifier.config.policy import check_trusted_issuers, parse_policy

    configured = ("https://idp.test", "https://login.example.test/{tenant}/v2.0")
    policy = parse_policy(Reader({"match": {}, "require": {"issuers_any": [listed]}}, "policies[0]"), 0)
    if accepted:
        check_trusted_issuers((policy,), configured)
    else:
        with pytest.raises(ConfigError, match="is not a configured issuer"):
            check_trusted_issuers((policy,), configured)


@pytest.fixture
async def opaque_tenants(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Tenants]:
    """Both tenants issue opaque tokens; every route trusts one of them (the catch-all trusts A)."""

    def configure(a: DevIdentityProvider, b: DevIdentityProvider) -> dict[str, Any]:
        issuers = [
            _issuer(a, introspection=_introspection(a, "TRUST_SECRET_A")),
            _issuer(b, introspection=_introspection(b, "TRUST_SECRET_B")),
        ]
        policies = [
            {"match": {"path_prefix": "/tenant-a/"}, "require": {"issuers_any": [a.issuer]}},
            {"match": {"path_prefix": "/tenant-b/"}, "require": {"issuers_any": [b.issuer]}},
            {"match": {"path_prefix": "/"}, "require": {"issuers_any": [a.issuer]}},
        ]
        return {"issuers": issuers, "policies": policies}

    async with _serving(monkeypatch, configure) as running:
        yield running


async def test_with_two_opaque_issuers_each_route_asks_only_the_one_it_trusts(opaque_tenants: Tenants) -> None:
    app, a, b = opaque_tenants
    a.reset_counts()
    b.reset_counts()
    b_token = b.mint_opaque(sub="bob")
    status, headers = await _ask(app, "/tenant-a/x", b_token)  # asked of A, the route's issuer: not A's token
    assert (status, headers["x-verifier-reason"]) == (401, "token_inactive")
    assert (a.tokens_asked, b.tokens_asked) == (1, 0)
    assert (await _ask(app, "/tenant-b/x", b_token))[0] == 200  # A's "inactive" was not remembered for B
    assert (a.tokens_asked, b.tokens_asked) == (1, 1)
    assert (await _ask(app, "/tenant-a/x", b_token))[1]["x-verifier-reason"] == "issuer_not_trusted"  # cached
    a_token = a.mint_opaque(sub="alice")
    assert (await _ask(app, "/other", a_token))[0] == 200
    assert (await _ask(app, "/tenant-b/x", a_token))[1]["x-verifier-reason"] == "issuer_not_trusted"
    assert (a.tokens_asked, b.tokens_asked) == (2, 1)
    # Our own endpoints (WebAuthn registry) have no route to tell the two apart: neither is asked.
    from verifier.errors import VerifierError
    from verifier.request import RequestAttributes

    fresh = b.mint_opaque(sub="bob")
    attrs = RequestAttributes("GET", "https", "v", "/v1/webauthn/credentials", {"authorization": f"Bearer {fresh}"})
    with pytest.raises(VerifierError) as refused:
        await app.pipeline.authenticate(attrs)
    assert refused.value.code == "issuer_not_trusted"
    assert (a.tokens_asked, b.tokens_asked) == (2, 1)


def test_two_opaque_issuers_need_every_policy_to_trust_at_most_one() -> None:
    issuers = [
        {"issuer": f"https://{n}.example.test", "audiences": ["x"], "algorithms": ["ES256"],
         "introspection": {"client_id": "v", "client_secret_env": "PATH"}}
        for n in ("a", "b")
    ]  # fmt: skip
    base = {"http": {"listen": "127.0.0.1:0"}, "issuers": issuers}
    with pytest.raises(ConfigError, match=r"issuers\[1\]\.introspection\.opaque_tokens: .*without policies"):
        parse_settings(base)
    policies = [
        {"match": {"path_prefix": "/a"}, "require": {"issuers_any": ["https://a.example.test"]}},
        {"match": {"path_prefix": "/"}},  # no issuers_any: trusts both
    ]
    with pytest.raises(ConfigError, match=r"policies\[1\]\.require\.issuers_any: trusts both"):
        parse_settings({**base, "policies": policies})
    policies[1]["require"] = {"issuers_any": ["https://b.example.test"]}
    assert parse_settings({**base, "policies": policies}).policies is not None
