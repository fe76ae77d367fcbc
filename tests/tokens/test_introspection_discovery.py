"""Where the introspection client finds its endpoint when nobody else has: the issuer's `discovery_url`.

A plain-HTTP RFC 7662 provider on loopback (aiohttp) publishes its discovery document only at a
non-default path, as `discovery_url` in the issuer's settings says; the default well-known path is a 404.
The verifier (`App`, the production client) must look where the operator said, not at the default.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from support import free_port

from verifier.app import App
from verifier.errors import ProviderUnavailable
from verifier.settings import parse_settings

AUDIENCE = "https://api.example.test"
SECRET_ENV = "TEST_INTROSPECTION_DISCOVERY_SECRET"


@pytest.fixture
async def provider(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, list[str]]]:
    """(the issuer URL, the paths the provider was asked for)."""
    monkeypatch.setenv(SECRET_ENV, secrets.token_urlsafe(24))
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    asked: list[str] = []

    async def discovery(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({"issuer": issuer, "introspection_endpoint": issuer + "/oauth/introspect"})

    async def introspect(request: web.Request) -> web.Response:
        asked.append(request.path)
        form = await request.post()
        answer: dict[str, Any] = {"active": False}
        if form.get("token") == "opaque-live-token":
            answer = {"active": True, "sub": "alice", "aud": AUDIENCE, "exp": int(time.time()) + 600}
        return web.json_response(answer)

    async def elsewhere(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/tenant-a/discovery.json", discovery)
    app.router.add_post("/oauth/introspect", introspect)
    app.router.add_route("*", "/{tail:.*}", elsewhere)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield issuer, asked
    await runner.cleanup()


async def test_the_introspection_endpoint_is_discovered_at_the_configured_discovery_url(
    provider: tuple[str, list[str]],
) -> None:
    issuer, asked = provider
    settings = parse_settings(
        {
            "http": {"listen": "127.0.0.1:0"},
            "issuers": [
                {
                    "issuer": issuer,
                    "audiences": [AUDIENCE],
                    "algorithms": ["ES256"],
                    "allow_insecure_http": True,
                    "discovery_url": issuer + "/tenant-a/discovery.json",
                    "jwks_uri": issuer + "/jwks",  # the key store is not started here: nobody else discovers
                    "introspection": {"client_id": "verifier", "client_secret_env": SECRET_ENV, "timeout_seconds": 5},
                }
            ],
        }
    )
    app = App(settings)
    try:
        principal = await app.introspectors[issuer].introspect("opaque-live-token", secrets.token_bytes(32))
    except ProviderUnavailable as exc:
        pytest.fail(f"refused: {exc.description}; the provider was asked for {asked}")
    finally:
        await app.stop(grace=0)
    assert principal.subject == "alice"
    assert asked == ["/tenant-a/discovery.json", "/oauth/introspect"]
