"""The metrics the alerts in deploy/prometheus/rules.yml need: Redis up, the key refresh interval, SSF polls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from doorkit import free_port, running_verifier
from prometheus_client import CollectorRegistry
from redis_harness import start_redis
from ssf_transmitter import SsfTransmitter

from verifier import app as app_module
from verifier.app import HttpSessions
from verifier.clock import SystemClock
from verifier.observe.metrics import RevocationMetrics
from verifier.revocation import RevocationService, parse_revocation_config
from verifier.state import StateConfig
from verifier.state.memory import MemoryState
from verifier.tokens.fetch import HttpFetcher

pytestmark = pytest.mark.integration


async def _eventually(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.fixture(autouse=True)
def quick_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "METRICS_REFRESH_SECONDS", 0.1)


async def test_redis_up_gauge_follows_a_real_redis(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    try:
        async with running_verifier({"state": StateConfig(redis_url=redis.url, timeout_seconds=0.2)}) as (app, _):
            up = 'verifier_state_up{backend="redis"} 1.0'
            down = 'verifier_state_up{backend="redis"} 0.0'
            await _eventually(lambda: up in app.metrics.render().decode())
            redis.stop()
            await _eventually(lambda: down in app.metrics.render().decode())
            redis.start()  # same port: the gauge comes back
            await _eventually(lambda: up in app.metrics.render().decode())
    finally:
        redis.stop()


async def test_no_redis_gauge_without_redis() -> None:
    async with running_verifier() as (app, _):
        await asyncio.sleep(0.3)
        assert "verifier_state_up{" not in app.metrics.render().decode()


async def test_refresh_interval_is_the_providers_max_age() -> None:
    async with running_verifier() as (app, idp):  # the dev provider sends Cache-Control: max-age=300
        wanted = f'verifier_jwks_refresh_interval_seconds{{issuer="{idp.issuer}"}} 300.0'
        await _eventually(lambda: wanted in app.metrics.render().decode())
        assert f'verifier_jwks_key_age_seconds{{issuer="{idp.issuer}"}}' in app.metrics.render().decode()


@pytest.mark.parametrize("reachable", [True, False])
async def test_ssf_polls_are_counted_by_result(reachable: bool) -> None:
    with SsfTransmitter(audience="https://verifier.example.test/ssf") as tx:
        issuer = tx.issuer if reachable else f"http://127.0.0.1:{free_port()}"
        config = parse_revocation_config(
            {
                "transmitters": [
                    {
                        "issuer": issuer,
                        "audience": "https://verifier.example.test/ssf",
                        "delivery": "poll",
                        "algorithms": ["ES256"],
                        "poll_interval_seconds": 0.1,
                        "fetch_timeout_seconds": 0.5,
                        "allow_insecure_http": True,  # the test transmitter is plain http on loopback
                    }
                ]
            }
        )
        registry = CollectorRegistry()
        sessions, clock = HttpSessions(), SystemClock()
        service = RevocationService(
            config, state=MemoryState(clock), fetcher=HttpFetcher(sessions.providers), clock=clock,
            metrics=RevocationMetrics(registry), session=sessions.ssf,
        )
        try:
            if reachable:
                await service.start()
            else:  # start() waits for the transmitter; the poller runs all the same
                start = asyncio.ensure_future(service.start())
            result = "ok" if reachable else "error"
            await _eventually(
                lambda: (
                    (
                        registry.get_sample_value("verifier_ssf_polls_total", {"transmitter": issuer, "result": result})
                        or 0
                    )
                    >= 1
                )
            )
        finally:
            if not reachable:
                start.cancel()
            await service.stop()
            await sessions.close()
