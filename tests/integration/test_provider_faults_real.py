"""Provider faults against the real, certified OpenID Provider (npm `oidc-provider`) on loopback.

The provider is slowed and broken with `op_harness.set_fault`, and stopped with `stop()`. The verifier
runs in-process with the production `HttpFetcher`, so every deadline here is the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from doorkit import http_exchange
from grpc_health.v1 import health_pb2, health_pb2_grpc
from op_harness import OpenIDProvider
from rigs import provider_fixture, verifier_trusting
from support import timed

from verifier.app import App

pytestmark = pytest.mark.integration

FETCH_TIMEOUT = 0.5  # seconds
SLACK = 0.5  # seconds past the deadline tolerated on a loaded runner


provider = provider_fixture("provider")


@pytest.fixture
async def verifier(provider: OpenIDProvider) -> AsyncIterator[App]:
    async with verifier_trusting(
        provider,
        grpc=True,
        jwks_cooldown_seconds=0.0,
        fetch_timeout_seconds=FETCH_TIMEOUT,
        jwks_min_ttl_seconds=1,
        jwks_max_ttl_seconds=1,
    ) as app:
        yield app


async def _status(app: App, token: str) -> tuple[int, float]:
    """The answer's status, and the seconds it took less how long a loaded machine held this process (the
    verifier's) meanwhile: a loaded machine's delay is not the verifier's (support.timed)."""
    assert app.ports.http is not None
    raw = f"GET /v1/forward-auth/ HTTP/1.1\r\nHost: v\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    answer, took, late = await timed(http_exchange(app.ports.http, raw))
    return int(answer.split(b" ", 2)[1]), took - late


async def _healthy(app: App) -> None:
    assert app.ports.http is not None and app.ports.grpc is not None
    assert (await http_exchange(app.ports.http, b"GET /healthz HTTP/1.1\r\nHost: v\r\n\r\n")).startswith(
        b"HTTP/1.1 200"
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def _rotated_token(provider: OpenIDProvider) -> str:
    """A token under a kid the verifier has never seen (the JWKS keeps the old keys too).

    Break the JWKS first where the verifier must not learn the new kid: its background refresh runs
    every second (max-age 1) and would otherwise fetch the rotated JWKS before the fault is in place.
    """
    await asyncio.to_thread(provider.rotate_keys, retain_previous=True)
    return await asyncio.to_thread(provider.client_credentials_token, alg="ES256")


def _jwks_errors(app: App, issuer: str) -> float:
    labels = {"issuer": issuer, "result": "error"}
    return app.metrics.registry.get_sample_value("verifier_jwks_fetch_total", labels) or 0.0


async def _jwks_fetch_failed(app: App, issuer: str, *, after: float = 0.0) -> None:
    """Waits (bounded) until more than `after` JWKS fetches failed: the fault is observed, not assumed."""
    deadline = time.monotonic() + 15
    while _jwks_errors(app, issuer) <= after:
        assert time.monotonic() < deadline, "no JWKS fetch failed"
        await asyncio.sleep(0.05)


async def _eventually_allowed(app: App, token: str) -> None:
    """Retries until the token is allowed (bounded): a refresh still in flight from the fault may fail once."""
    deadline = time.monotonic() + 15
    while (await _status(app, token))[0] != 200:
        assert time.monotonic() < deadline, "the provider is back but the new kid is never fetched"
        await asyncio.sleep(0.05)


async def test_unknown_kid_while_jwks_hangs_returns_within_fetch_timeout(
    provider: OpenIDProvider, verifier: App
) -> None:
    await asyncio.to_thread(provider.set_fault, "jwks", delay_ms=10_000)  # before the rotation can be seen
    rotated = await _rotated_token(provider)
    status, elapsed = await _status(verifier, rotated)
    assert status == 503  # fail closed, "retry later": a rotation cannot be told from a forgery now
    assert elapsed < FETCH_TIMEOUT + SLACK, elapsed
    await _healthy(verifier)


@pytest.mark.parametrize("http_status", [500, 503, 404])
async def test_jwks_errors_keep_cached_keys_and_refuse_unknown_kids(
    provider: OpenIDProvider, verifier: App, http_status: int
) -> None:
    known = await asyncio.to_thread(provider.client_credentials_token, alg="RS256")
    await asyncio.to_thread(provider.set_fault, "jwks", status=http_status)  # before the rotation can be seen
    rotated = await _rotated_token(provider)
    await _jwks_fetch_failed(verifier, provider.issuer)  # the cached keys must survive a failed refresh
    assert (await _status(verifier, known))[0] == 200
    status, elapsed = await _status(verifier, rotated)
    assert status == 503 and elapsed < FETCH_TIMEOUT + SLACK
    await _healthy(verifier)
    await asyncio.to_thread(provider.clear_faults)
    await _eventually_allowed(verifier, rotated)  # the provider is back: the new kid is fetched


async def test_slow_jwks_within_the_deadline_still_loads(provider: OpenIDProvider, verifier: App) -> None:
    await asyncio.to_thread(provider.set_fault, "jwks", delay_ms=int(FETCH_TIMEOUT * 400))  # before the rotation
    rotated = await _rotated_token(provider)
    # Only a JWKS fetch slowed to 40% of the deadline can teach the verifier the new kid; a stalled runner may
    # stretch one past the deadline (a 503, "retry later"), so the token is asked for again until allowed.
    await _eventually_allowed(verifier, rotated)


async def test_provider_stopped_service_stays_serving_and_fails_closed(provider: OpenIDProvider, verifier: App) -> None:
    known = await asyncio.to_thread(provider.client_credentials_token, alg="EdDSA")
    await asyncio.to_thread(provider.set_fault, "jwks", status=500)  # the rotation is never seen before the stop
    rotated = await _rotated_token(provider)
    await asyncio.to_thread(provider.stop)
    # a background refresh meets the refused connection meanwhile
    await _jwks_fetch_failed(verifier, provider.issuer, after=_jwks_errors(verifier, provider.issuer))
    await _healthy(verifier)
    assert (await _status(verifier, known))[0] == 200
    status, elapsed = await _status(verifier, rotated)
    assert status == 503 and elapsed < FETCH_TIMEOUT + SLACK


@pytest.mark.parametrize("fault", ["slow", "500", "refused"])
async def test_introspection_faults_fail_closed_within_the_deadline(provider: OpenIDProvider, fault: str) -> None:
    from op_harness import VERIFIER_CLIENT_ID, VERIFIER_CLIENT_SECRET
    from prometheus_client import CollectorRegistry

    from verifier.app import HttpSessions, build_introspector
    from verifier.clock import SystemClock
    from verifier.errors import ProviderUnavailable
    from verifier.observe.audit import token_hash
    from verifier.tokens.introspection import IntrospectionConfig

    token = await asyncio.to_thread(provider.opaque_token)
    endpoint = provider.introspection_endpoint
    if fault == "slow":
        await asyncio.to_thread(provider.set_fault, "introspection", delay_ms=10_000)
    elif fault == "500":
        await asyncio.to_thread(provider.set_fault, "introspection", status=500)
    else:
        await asyncio.to_thread(provider.stop)
    sessions = HttpSessions()
    try:
        introspector = build_introspector(
            issuer=provider.issuer,
            audiences=("https://opaque.example.test",),
            config=IntrospectionConfig(
                client_id=VERIFIER_CLIENT_ID,
                client_secret=VERIFIER_CLIENT_SECRET,
                endpoint=endpoint,
                timeout_seconds=FETCH_TIMEOUT,
            ),
            endpoint=None,
            http=sessions.introspection,
            clock=SystemClock(),
            registry=CollectorRegistry(),
        )
        try:

            async def refused() -> None:
                with pytest.raises(ProviderUnavailable):
                    await introspector.introspect(token, token_hash(token))

            _, took, late = await timed(refused())
            assert took - late < FETCH_TIMEOUT + SLACK, (took, late)
        finally:
            await introspector.close()
    finally:
        await sessions.close()
