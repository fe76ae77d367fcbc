"""The fixtures the integration test modules share.

- Gateway rigs: a module-scoped echo upstream and local issuer, the real verifier trusting it
  (`verifier_fixture`), and the autouse clearing of the upstream's log. tests/integration/conftest.py
  offers `upstream` and `issuer` to every integration test (a module defining its own keeps it); a module
  wanting the clearing imports `fresh_upstream_log` (autouse where it is imported). tests/kong imports them
  by name from here. The gateways themselves are started by `gateways.start_gateway` (one place for every
  shipped configuration).
- A real redis-server of its own per test (`redis_server`, offered to all by conftest.py).
- The real OpenID Provider (op_harness): `provider_fixture` makes a module's provider fixture, and
  `verifier_trusting` runs the verifier in this process trusting the provider's API tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from doorkit import door_settings
from gateways import GATEWAY_KINDS, EchoUpstream, GatewayProcess, LocalIssuer, start_gateway_for, start_verifier
from op_harness import API_AUDIENCE, OpenIDProvider, start_provider
from redis.asyncio import Redis
from redis_harness import RedisServer, start_redis

from verifier.app import App
from verifier.settings import IssuerSettings, Listen, Settings


@pytest.fixture(scope="module")
def upstream() -> Iterator[EchoUpstream]:
    """The protected application: records every request that reached it."""
    server = EchoUpstream()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_upstream_log(upstream: EchoUpstream) -> None:
    """Each test sees only the requests it caused."""
    upstream.clear()


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    """A local issuer minting tokens the rigs' verifiers trust."""
    server = LocalIssuer()
    yield server
    server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own on a loopback port (nothing persisted), stopped afterwards."""
    server = start_redis(tmp_path)
    yield server
    server.stop()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A plain client of `redis_server`, to look at what the verifier's stores wrote."""
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def provider_fixture(name: str, scope: str = "function") -> Any:
    """A fixture named `name`: a real OpenID Provider of its own per `scope`, stopped afterwards.

    In a test module: `op = provider_fixture("op", scope="module")`.
    """

    @pytest.fixture(name=name, scope=scope)
    def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenIDProvider]:
        provider = start_provider(tmp_path_factory)
        try:
            yield provider
        finally:
            provider.stop()

    return running


def verifier_fixture(name: str = "verifier", **extra_config: Any) -> Any:
    """A module fixture named `name`: the real verifier (`start_verifier`) trusting the module's `issuer`, with
    `extra_config` added to its configuration, stopped afterwards.

    In a test module: `verifier = verifier_fixture(policies=POLICIES)`.
    """

    @pytest.fixture(name=name, scope="module")
    def running(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
        proc = start_verifier(tmp_path_factory.mktemp(name), issuer=issuer.issuer, extra_config=extra_config)
        try:
            yield proc
        finally:
            proc.stop()

    return running


def gateway_fixture(
    name: str, kinds: Sequence[str] = GATEWAY_KINDS, wrap: Callable[[str, str], Any] | None = None
) -> Any:
    """A module fixture named `name`, one per gateway kind in `kinds`: that shipped configuration in front of the
    module's `verifier` fixture (`start_verifier`), passing to `upstream`; its URL (or `wrap(kind, url)`),
    stopped afterwards.

    In a test module: `edge = gateway_fixture("edge")`.
    """

    @pytest.fixture(name=name, scope="module", params=kinds)
    def running(
        request: pytest.FixtureRequest,
        verifier: GatewayProcess,
        upstream: EchoUpstream,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[Any]:
        gw = start_gateway_for(request.param, tmp_path_factory.mktemp(request.param), verifier, upstream.port)
        try:
            yield gw.url if wrap is None else wrap(request.param, gw.url)
        finally:
            gw.stop()

    return running


@contextlib.asynccontextmanager
async def verifier_trusting(
    provider: OpenIDProvider, *, grpc: bool = False, **issuer_options: Any
) -> AsyncIterator[App]:
    """The verifier in this process (forward-auth door, and the gRPC one with `grpc`), trusting `provider`'s
    API tokens (ES256, RS256, EdDSA for API_AUDIENCE; `issuer_options` are further IssuerSettings); its keys
    are loaded when this yields."""
    settings = Settings(
        grpc=Listen(host="127.0.0.1", port=0) if grpc else None,
        http=Listen(host="127.0.0.1", port=0),
        forward_auth=door_settings(),  # shedding only past 5 s: a starved test process is not an overload
        metrics=None,
        issuers=(
            IssuerSettings(
                issuer=provider.issuer,
                audiences=(API_AUDIENCE,),
                algorithms=("ES256", "RS256", "EdDSA"),
                **issuer_options,
            ),
        ),
    )
    app = App(settings)
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 15)
        yield app
    finally:
        await app.stop(grace=0.5)
