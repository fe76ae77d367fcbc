"""Every verifier-side wait ends before the gateway's (issue #26 G9).

A slow introspection provider (2 s default timeout) used to outlast the Kong plugins' 1 s deadline, which
`fail_open` then turned into a pass. The doors now answer 503 retry-later once `deadline_seconds` has
passed; the provider call goes on (single flight) and its answer serves the retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from doorkit import http_exchange
from rawprovider import RawProvider, json_route
from tokenkit import AUDIENCE

from verifier.app import App
from verifier.settings import DEFAULT_DEADLINE_SECONDS, ConfigError, IssuerSettings, Listen, Settings, parse_settings
from verifier.tokens.introspection import parse_introspection_config
from verifier.v1 import verifier_pb2, verifier_pb2_grpc

PLUGIN_TIMEOUT = 1.0  # seconds: the Lua and Python Kong plugins' default `timeout` (1000 ms)
PROVIDER_DELAY = 1.5  # seconds the introspection provider takes, within its 2 s timeout


@pytest.fixture
async def app(monkeypatch: pytest.MonkeyPatch, jwks_document: dict[str, object]) -> AsyncIterator[App]:
    monkeypatch.setenv("VERIFIER_RAW_SECRET", "s3cret")
    async with RawProvider() as provider:
        provider.routes["/.well-known/openid-configuration"] = json_route(
            {"issuer": provider.url, "jwks_uri": provider.url + "/jwks",
             "introspection_endpoint": provider.url + "/introspect"}
        )
        provider.routes["/jwks"] = json_route(jwks_document)
        provider.routes["/introspect"] = json_route(
            {"active": True, "sub": "slow", "aud": AUDIENCE}, delay=PROVIDER_DELAY
        )
        introspection = parse_introspection_config(
            {"client_id": "verifier", "client_secret_env": "VERIFIER_RAW_SECRET"}, "issuers[0].introspection"
        )
        settings = Settings(
            grpc=Listen(host="127.0.0.1", port=0),
            http=Listen(host="127.0.0.1", port=0),
            metrics=None,
            issuers=(IssuerSettings(issuer=provider.url, audiences=(AUDIENCE,), algorithms=("ES256",),
                                    introspection=introspection),),
        )
        verifier = App(settings)
        await verifier.start()
        await asyncio.wait_for(verifier.keys.wait_ready(), 10)
        try:
            yield verifier
        finally:
            await verifier.stop(grace=0.5)


def test_the_default_deadline_is_below_the_plugins_timeout() -> None:
    assert DEFAULT_DEADLINE_SECONDS < PLUGIN_TIMEOUT


async def test_forward_auth_answers_503_retry_later_before_the_gateway_gives_up(app: App) -> None:
    assert app.ports.http is not None
    raw = b"GET /v1/forward-auth HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer opaque-slow-1\r\n\r\n"
    started = time.monotonic()
    answer = await http_exchange(app.ports.http, raw)
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"retry-after:" in answer.lower()
    assert elapsed < PLUGIN_TIMEOUT, elapsed
    await asyncio.sleep(PROVIDER_DELAY)  # the provider call went on; its answer serves the retry
    assert (await http_exchange(app.ports.http, raw)).startswith(b"HTTP/1.1 200")


async def test_grpc_check_answers_503_before_the_deadline_even_when_the_caller_waits_longer(app: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
        stub = verifier_pb2_grpc.VerifierStub(channel)
        started = time.monotonic()
        answer = await stub.Check(
            verifier_pb2.CheckRequest(method="GET", host="api", path="/x",
                                      headers={"Authorization": "Bearer opaque-slow-2"}),
            timeout=10,
        )
        assert time.monotonic() - started < PLUGIN_TIMEOUT
        assert not answer.allowed and answer.http_status == 503


@pytest.mark.parametrize("value", [0, -1, 30.5])
def test_deadline_seconds_is_validated(value: float) -> None:
    with pytest.raises(ConfigError, match="deadline_seconds"):
        parse_settings({
            "http": {"listen": "127.0.0.1:0"},
            "issuers": [{"issuer": "https://idp.example.test", "audiences": ["a"], "algorithms": ["ES256"]}],
            "deadline_seconds": value,
        })
