"""Opaque tokens go only to the one issuer configured to introspect them (#18 F10).

An opaque token does not say who issued it. With two issuers doing introspection, every opaque token
went to the first one: issuer B's bearer tokens were disclosed to A. Now at most one issuer takes
opaque tokens (`introspection.opaque_tokens`, default true); the others introspect only their own
JWTs (`introspect_jwts`), and a configuration that cannot tell is refused at start-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from doorkit import free_port, http_exchange

from verifier.app import App
from verifier.devidp import DEV_AUDIENCE, DevIdentityProvider
from verifier.settings import ConfigError, parse_settings


def _issuer(idp: DevIdentityProvider, env: str, **introspection: Any) -> dict[str, Any]:
    return {
        "issuer": idp.issuer,
        "audiences": [DEV_AUDIENCE],
        "algorithms": ["ES256"],
        "allow_insecure_http": True,  # the development provider on loopback
        "introspection": {"client_id": idp.introspection_client_id, "client_secret_env": env, **introspection},
    }


@pytest.fixture
async def providers(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[DevIdentityProvider, DevIdentityProvider]]:
    a, b = DevIdentityProvider(port=free_port()), DevIdentityProvider(port=free_port())
    await a.start()
    await b.start()
    monkeypatch.setenv("ROUTING_SECRET_A", a.introspection_client_secret)
    monkeypatch.setenv("ROUTING_SECRET_B", b.introspection_client_secret)
    yield a, b
    await a.stop()
    await b.stop()


def test_two_issuers_introspecting_opaque_tokens_are_refused_naming_the_key(
    providers: tuple[DevIdentityProvider, DevIdentityProvider],
) -> None:
    a, b = providers
    with pytest.raises(ConfigError) as refused:
        parse_settings({
            "http": {"listen": "127.0.0.1:0"},
            "issuers": [_issuer(a, "ROUTING_SECRET_A"), _issuer(b, "ROUTING_SECRET_B")],
        })
    message = str(refused.value)
    assert "issuers[1].introspection.opaque_tokens" in message and "issuers[0]" in message


@pytest.mark.parametrize("b_first", [False, True], ids=["opaque-issuer-second", "opaque-issuer-first"])
async def test_an_opaque_token_is_sent_only_to_the_issuer_that_takes_opaque_tokens(
    providers: tuple[DevIdentityProvider, DevIdentityProvider], b_first: bool
) -> None:
    a, b = providers
    issuers = [
        {**_issuer(a, "ROUTING_SECRET_A", opaque_tokens=False), "introspect_jwts": True},
        _issuer(b, "ROUTING_SECRET_B"),
    ]
    settings = parse_settings({
        "http": {"listen": "127.0.0.1:0"},
        "issuers": issuers[::-1] if b_first else issuers,
    })
    app = App(settings)
    await app.start()
    try:
        await asyncio.wait_for(app.wait_serving(), 10)

        async def status(token: str) -> int:
            raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
            assert app.ports.http is not None
            return int((await http_exchange(app.ports.http, raw)).split(b" ", 2)[1])

        a.reset_counts()
        b.reset_counts()
        assert await status(b.mint_opaque(sub="bob")) == 200
        assert await status(a.mint_opaque(sub="alice")) == 401  # A's opaque tokens are not taken
        assert a.tokens_asked == 0, "an opaque token was disclosed to an issuer that did not take it"
        assert b.tokens_asked == 2
        await status(a.mint(sub="alice"))  # A still introspects its own JWTs (the dev IdP calls them inactive)
        assert a.tokens_asked == 1 and b.tokens_asked == 2
    finally:
        await app.stop(grace=0.2)
