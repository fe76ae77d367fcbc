"""Every verifier-side wait ends before the gateway's (issue #26 G9).

A slow introspection provider (2 s default timeout) used to outlast the Kong plugins' 1 s deadline, which
`fail_open` then turned into a pass. The doors now answer 503 retry-later once `deadline_seconds` has
passed; the provider call goes on (single flight) and its answer serves the retry.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
import pytest
from doorkit import door_settings, http_exchange
from rawprovider import RawProvider, json_route
from support import timed
from tokenkit import AUDIENCE

from verifier.app import App
from verifier.settings import DEFAULT_DEADLINE_SECONDS, ConfigError, IssuerSettings, Listen, Settings, parse_settings
from verifier.tokens.introspection import parse_introspection_config
from verifier.v1 import verifier_pb2, verifier_pb2_grpc

PLUGIN_TIMEOUT = 1.0  # seconds: the Lua and Python Kong plugins' default `timeout` (1000 ms)
# Seconds the introspection provider takes, within the verifier's timeout for it (PROVIDER_TIMEOUT), and far
# past the deadline: an answer before PROVIDER_DELAY is the deadline's, even on a loaded machine.
PROVIDER_DELAY = 3.0
PROVIDER_TIMEOUT = 10.0
RETRY_WITHIN = 20.0  # seconds the retries may take in all before the provider's answer must have served one
# The deadline's answer must come before PLUGIN_TIMEOUT, 0.2 s after it falls due: a runner that stalls this
# process for longer around that moment makes one answer late. Such a measurement says nothing, so it is taken
# again with a new token, up to this many times; an answer late on a machine that did not stall fails at once,
# and a door whose deadline is too late is late every time (stalls only ever add time), so it fails too.
ATTEMPTS = 5

T = TypeVar("T")


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
            {"client_id": "verifier", "client_secret_env": "VERIFIER_RAW_SECRET", "timeout_seconds": PROVIDER_TIMEOUT},
            "issuers[0].introspection",
        )
        settings = Settings(
            grpc=Listen(host="127.0.0.1", port=0),
            http=Listen(host="127.0.0.1", port=0),
            forward_auth=door_settings(),  # a shed answer (at once) is not the deadline's
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


async def in_time(ask: Callable[[str], Awaitable[T]]) -> tuple[T, str]:
    """The answer to `ask(token)` for a new slow opaque token, and the token, from the first attempt answered
    before PLUGIN_TIMEOUT; an attempt answered later is only taken again where the machine stalled it."""
    for attempt in range(ATTEMPTS):
        token = f"opaque-slow-{uuid.uuid4().hex}"
        answer, took, late = await timed(ask(token))
        assert DEFAULT_DEADLINE_SECONDS <= took < PROVIDER_DELAY, took  # the deadline's answer, not the provider's
        if took < PLUGIN_TIMEOUT:
            return answer, token
        assert late > 0, f"answered after {took:.2f} s on a machine that did not stall"
        print(f"attempt {attempt}: answered after {took:.2f} s, {late:.2f} s of it a stalled machine")
    raise AssertionError(f"no answer before {PLUGIN_TIMEOUT} s in {ATTEMPTS} attempts")


async def test_forward_auth_answers_503_retry_later_before_the_gateway_gives_up(app: App) -> None:
    port = app.ports.http
    assert port is not None

    def exchange(token: str) -> Awaitable[bytes]:
        raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n"
        return http_exchange(port, raw.encode())

    answer, token = await in_time(exchange)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"retry-after:" in answer.lower()
    # the provider call went on (single flight): once it has answered, a retry is served from its answer
    # (were it cancelled at the deadline, every retry would start a new call and be refused again)
    await retried_until_200(lambda: exchange(token))


async def retried_until_200(exchange: Callable[[], Awaitable[bytes]]) -> float:
    """Seconds until a retry is answered 200; every answer before it must be the deadline's 503."""
    started = time.monotonic()
    while not (answer := await exchange()).startswith(b"HTTP/1.1 200"):
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert time.monotonic() - started < RETRY_WITHIN, "the provider's answer never served a retry"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_grpc_check_answers_503_before_the_deadline_even_when_the_caller_waits_longer(app: App) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
        stub = verifier_pb2_grpc.VerifierStub(channel)

        async def check(token: str) -> verifier_pb2.CheckResponse:
            request = verifier_pb2.CheckRequest(method="GET", host="api", path="/x",
                                                headers={"Authorization": f"Bearer {token}"})
            return await stub.Check(request, timeout=10)

        answer, _ = await in_time(check)
        assert not answer.allowed and answer.http_status == 503


@pytest.mark.parametrize("value", [0, -1, 30.5])
def test_deadline_seconds_is_validated(value: float) -> None:
    with pytest.raises(ConfigError, match="deadline_seconds"):
        parse_settings({
            "http": {"listen": "127.0.0.1:0"},
            "issuers": [{"issuer": "https://idp.example.test", "audiences": ["a"], "algorithms": ["ES256"]}],
            "deadline_seconds": value,
        })
