"""Issuer templates against the embedded dev provider with tenant paths (`DevIdentityProvider(tenants=...)`):
the `tid` check, a cross-tenant forgery, a flood of made-up tenants, and `verifier explain` on a tenant's token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from doorkit import http_exchange

from verifier.app import App
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.explain import explain
from verifier.settings import load_settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def idp() -> AsyncIterator[DevIdentityProvider]:
    provider = DevIdentityProvider(port=0, tenants=("contoso", "fabrikam", "northwind"))
    await provider.start()
    try:
        yield provider
    finally:
        await provider.stop()


def write_config(path: Path, idp: DevIdentityProvider, **template: Any) -> Path:
    issuer = {
        "issuer": idp.issuer + "/{tenant}",
        "audiences": [DEV_AUDIENCE],
        "algorithms": ["ES256"],
        "allow_insecure_http": True,
        "tenants": ["contoso", "fabrikam"],
        "tenant_claim": "tid",
        **template,
    }
    path.write_text(yaml.safe_dump({"http": {"listen": "127.0.0.1:0"}, "issuers": [issuer]}))
    return path


@pytest.fixture
async def verifier(idp: DevIdentityProvider, tmp_path: Path) -> AsyncIterator[App]:
    app = App(load_settings(write_config(tmp_path / "verifier.yaml", idp)))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0)


async def answer(app: App, token: str, route: str = "/") -> tuple[int, str]:
    raw = (
        f"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\nX-Forwarded-Uri: {route}\r\n\r\n"
    )
    reply = await http_exchange(app.ports.http or 0, raw.encode())
    head = reply.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}
    return int(head[0].split(" ")[1]), headers.get("x-verifier-reason", "")


async def test_a_tenant_s_token_needs_its_own_key_and_a_tid_naming_its_tenant(
    idp: DevIdentityProvider, verifier: App
) -> None:
    assert await answer(verifier, idp.mint(tenant="contoso", claims={"tid": "contoso"})) == (200, "ok")
    assert await answer(verifier, idp.mint(tenant="fabrikam", claims={"tid": "fabrikam"})) == (200, "ok")
    # Contoso's admin mints a token naming fabrikam's issuer, with contoso's key: fabrikam's keys lack it.
    forged = idp.mint(tenant="contoso", claims={"iss": idp.tenant_issuer("fabrikam"), "tid": "fabrikam"})
    assert await answer(verifier, forged) == (401, "key_unknown")
    # A tid naming another tenant than iss is refused before any fetch.
    before = sum(idp.requests.values())
    assert await answer(verifier, idp.mint(tenant="contoso", claims={"tid": "fabrikam"})) == (401, "claim_invalid")
    assert await answer(verifier, idp.mint(tenant="northwind", claims={"tid": "northwind"})) == (
        401,
        "tenant_not_allowed",
    )
    # The template string itself is no issuer.
    literal = idp.mint(tenant="contoso", claims={"iss": idp.issuer + "/{tenant}", "tid": "{tenant}"})
    assert await answer(verifier, literal) == (401, "issuer_unknown")
    assert sum(idp.requests.values()) == before
    assert not any("northwind" in path for path in idp.requests)


async def test_a_flood_of_made_up_tenants_reaches_the_provider_a_bounded_number_of_times(
    idp: DevIdentityProvider, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "any.yaml", idp, tenants="any", new_tenants_per_minute=4, max_tenants=2)
    app = App(load_settings(config))
    await app.start()
    try:
        held = idp.mint(tenant="contoso", claims={"tid": "contoso"})
        assert await answer(app, held) == (200, "ok")
        idp.requests.clear()
        flood = [
            idp.mint(tenant="contoso", claims={"iss": idp.tenant_issuer(f"x{i}"), "tid": f"x{i}"}) for i in range(200)
        ]
        answers = await asyncio.gather(*(answer(app, token) for token in flood))
        assert set(answers) == {(503, "provider_unavailable")}
        assert sum(idp.requests.values()) <= 4, idp.requests
        assert await answer(app, held) == (200, "ok")
        assert sum(idp.requests.values()) <= 4
    finally:
        await app.stop(grace=0)


async def test_explain_names_the_template_and_the_tenant_s_keys(idp: DevIdentityProvider, tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path / "verifier.yaml", idp))
    token = idp.mint(tenant="fabrikam", claims={"tid": "fabrikam"})
    report = await explain(settings, f"Bearer {token}", path="/hello")
    assert report.answer["status"] == 200, report.as_text()
    text = report.as_text()
    assert "is configured" in text and "dev-fabrikam-es256" in text, text
    refused = await explain(settings, f"Bearer {idp.mint(tenant='northwind', claims={'tid': 'northwind'})}")
    failed = [check.step for check in refused.checks if check.result == "failed"]
    assert failed == ["issuer"], refused.as_text()


async def test_a_route_may_trust_the_whole_template_or_one_tenant(idp: DevIdentityProvider, tmp_path: Path) -> None:
    path = write_config(tmp_path / "routes.yaml", idp)
    config = yaml.safe_load(path.read_text())
    template = config["issuers"][0]["issuer"]
    config["policies"] = [
        {"match": {"path_prefix": "/contoso"}, "require": {"issuers_any": [idp.tenant_issuer("contoso")]}},
        {"match": {"path_prefix": "/"}, "require": {"issuers_any": [template]}},
    ]
    path.write_text(yaml.safe_dump(config))
    app = App(load_settings(path))
    await app.start()

    async def on(route: str, token: str) -> tuple[int, str]:
        return await answer(app, token, route)

    try:
        contoso = idp.mint(tenant="contoso", claims={"tid": "contoso"})
        fabrikam = idp.mint(tenant="fabrikam", claims={"tid": "fabrikam"})
        assert await on("/anything", contoso) == (200, "ok")  # the template stands for its tenants
        assert await on("/anything", fabrikam) == (200, "ok")
        assert await on("/contoso/orders", contoso) == (200, "ok")
        assert await on("/contoso/orders", fabrikam) == (401, "issuer_not_trusted")  # tenant B on tenant A's route
    finally:
        await app.stop(grace=0)
