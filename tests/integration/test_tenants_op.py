"""Issuer templates against real providers: two npm oidc-provider instances as the tenants of one host.

A path-prefix proxy (tenant_proxy.py) puts `tenant-a` and `tenant-b` under one http://127.0.0.1:<port>,
as Entra, Keycloak realms or Auth0/Okta custom domains do, and counts every request by tenant, so the
tests can prove which requests a token caused: none for a tenant off the allow-list, a bounded number
for a flood of made-up tenant names.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from doorkit import http_exchange
from jwt.algorithms import ECAlgorithm
from op_harness import API_AUDIENCE, OpenIDProvider
from support import free_port
from tenant_proxy import TenantProxy

from verifier.app import App
from verifier.settings import IssuerSettings, Listen, Settings

pytestmark = pytest.mark.integration

TENANTS = ("tenant-a", "tenant-b")


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TenantProxy, dict[str, OpenIDProvider]]]:
    with TenantProxy() as proxy:
        providers: dict[str, OpenIDProvider] = {}
        try:
            for tenant in TENANTS:
                port = free_port()
                proxy.backends[tenant] = port
                op = OpenIDProvider(tmp_path_factory.mktemp(tenant), port=port, issuer=proxy.issuer(tenant))
                providers[tenant] = op
                op.start()
            yield proxy, providers
        finally:
            for op in providers.values():
                op.stop()


def template(proxy: TenantProxy, **overrides: Any) -> IssuerSettings:
    values: dict[str, Any] = {
        "issuer": proxy.origin + "/{tenant}",
        "audiences": (API_AUDIENCE,),
        "algorithms": ("ES256",),
        "allow_insecure_http": True,
        "tenants": TENANTS,
        "jwks_cooldown_seconds": 30.0,
        "fetch_timeout_seconds": 5.0,
    }
    values.update(overrides)
    return IssuerSettings(**values)


@pytest.fixture
async def start_verifier() -> AsyncIterator[Any]:
    apps: list[App] = []

    async def start(issuer: IssuerSettings) -> App:
        app = App(Settings(grpc=None, http=Listen(host="127.0.0.1", port=0), metrics=None, issuers=(issuer,)))
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop(grace=0.5)


async def check(app: App, token: str) -> tuple[int, str]:
    raw = f"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\nX-Forwarded-Uri: /a\r\n\r\n"
    answer = await http_exchange(app.ports.http, raw.encode())
    reason = next(
        (
            line.split(b":", 1)[1].strip().decode()
            for line in answer.split(b"\r\n")
            if line.lower().startswith(b"x-verifier-reason")
        ),
        "",
    )
    return int(answer.split(b" ", 2)[1]), reason


def forge(op: OpenIDProvider, iss: str) -> str:
    """A token signed with `op`'s real ES256 key that names another issuer (what a tenant admin can mint)."""
    private = next(k for k in op.private_jwks()["keys"] if k["alg"] == "ES256")
    key = ECAlgorithm.from_jwk(json.dumps(private))
    now = int(time.time())
    claims = {
        "iss": iss,
        "aud": API_AUDIENCE,
        "sub": "mallory",
        "iat": now,
        "exp": now + 300,
        "jti": secrets.token_hex(8),
    }
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": private["kid"], "typ": "at+jwt"})


async def test_each_tenant_s_tokens_verify_with_that_tenant_s_keys_fetched_once(
    tenants: tuple[TenantProxy, dict[str, OpenIDProvider]], start_verifier: Any
) -> None:
    proxy, ops = tenants
    app = await start_verifier(template(proxy))
    proxy.reset()
    for tenant in TENANTS:
        token = await asyncio.to_thread(ops[tenant].client_credentials_token)
        proxy.reset()
        results = await asyncio.gather(*(check(app, token) for _ in range(5)))  # five at once: one fetch
        assert results == [(200, "ok")] * 5
        assert proxy.count(tenant) == 2, proxy.requests  # discovery and JWKS, once
    # Tenant A's own key cannot vouch for tenant B: B's keys are fetched from B's path and lack it.
    assert await check(app, forge(ops["tenant-a"], proxy.issuer("tenant-b"))) == (401, "key_unknown")


async def test_a_tenant_off_the_allow_list_is_refused_without_any_request_to_it(
    tenants: tuple[TenantProxy, dict[str, OpenIDProvider]], start_verifier: Any
) -> None:
    proxy, ops = tenants
    app = await start_verifier(template(proxy, tenants=("tenant-a",)))
    token = await asyncio.to_thread(ops["tenant-b"].client_credentials_token)
    proxy.reset()
    assert await check(app, token) == (401, "tenant_not_allowed")
    assert proxy.count() == 0, proxy.requests
    # Lookalike issuers never reach a fetch either: another path depth, an encoded slash, a dot segment.
    for iss in (
        proxy.issuer("tenant-a/x"),
        proxy.origin + "/tenant-a%2f..",
        proxy.origin + "/..",
        proxy.origin.replace("127.0.0.1", "localhost") + "/tenant-a",
    ):
        assert await check(app, forge(ops["tenant-a"], iss)) == (401, "issuer_unknown"), iss
    assert proxy.count() == 0, proxy.requests


async def test_a_flood_of_made_up_tenants_costs_a_bounded_number_of_requests_and_entries(
    tenants: tuple[TenantProxy, dict[str, OpenIDProvider]], start_verifier: Any
) -> None:
    proxy, ops = tenants
    budget, max_tenants = 5, 3
    app = await start_verifier(
        template(proxy, tenants=(), any_tenant=True, new_tenants_per_minute=budget, max_tenants=max_tenants)
    )
    held_token = await asyncio.to_thread(ops["tenant-a"].client_credentials_token)
    assert await check(app, held_token) == (200, "ok")  # tenant-a is held before the flood
    proxy.reset()
    flood = [forge(ops["tenant-a"], proxy.issuer(f"t{secrets.token_hex(6)}")) for _ in range(300)]
    answers: list[tuple[int, str]] = []
    for start in range(0, len(flood), 50):
        answers += await asyncio.gather(*(check(app, token) for token in flood[start : start + 50]))
    assert {answer for answer in answers} == {(503, "provider_unavailable")}
    # Each tried tenant costs one discovery (a 404); the bucket allows `budget` new tenants a minute.
    assert proxy.count() <= budget, proxy.requests
    # The same made-up tenants again: remembered as failed, no new request.
    proxy.reset()
    await asyncio.gather(*(check(app, token) for token in flood[:20]))
    assert proxy.count() == 0, proxy.requests
    tenant_keys = app.keys.templates[0]
    assert tenant_keys.tenants_held <= max_tenants
    assert len(tenant_keys._failed) <= max_tenants and not tenant_keys._pending
    # A tenant already held is not starved by the flood.
    assert await check(app, held_token) == (200, "ok")
    assert proxy.count() == 0


async def test_discovery_and_keys_are_fetched_per_tenant_under_the_pinned_host(
    tenants: tuple[TenantProxy, dict[str, OpenIDProvider]], start_verifier: Any, tmp_path: Path
) -> None:
    proxy, ops = tenants
    app = await start_verifier(template(proxy))
    token = await asyncio.to_thread(ops["tenant-b"].client_credentials_token)
    assert await check(app, token) == (200, "ok")
    held = app.keys.get(proxy.issuer("tenant-b"))
    assert held is not None and held.metadata["issuer"] == proxy.issuer("tenant-b")
    assert set(held.kids) == set(ops["tenant-b"].kids())
    assert app.keys.get(proxy.issuer("tenant-a")) is None  # no token of tenant-a: nothing fetched for it
