"""Overload: bounded first-seen checks shed load with 503/RESOURCE_EXHAUSTED; the caller's gRPC deadline is honoured."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from doorkit import until_pending
from support import FrozenClock, timed
from tokenkit import DISCOVERY_URL, JWKS_URL, KIDS, NOW, FakeFetcher, claims, discovery_document, issuer_settings

from verifier.app import App
from verifier.request import RequestAttributes
from verifier.settings import Listen, Settings
from verifier.v1 import verifier_pb2, verifier_pb2_grpc


def _app(fetcher: FakeFetcher, **options: object) -> App:
    settings = Settings(
        grpc=Listen(host="127.0.0.1", port=0),
        http=None,
        metrics=None,
        issuers=(issuer_settings(jwks_cooldown_seconds=0.0, fetch_timeout_seconds=5.0),),
        **options,  # type: ignore[arg-type]
    )
    return App(settings, clock=FrozenClock(NOW), fetcher=fetcher)


def _attrs(token: str) -> RequestAttributes:
    return RequestAttributes(
        method="GET", scheme="https", host="h", path="/", headers={"authorization": f"Bearer {token}"}
    )


async def test_checks_past_the_bound_are_shed_with_503_and_retry_after(mint, jwks_document) -> None:  # type: ignore[no-untyped-def]
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, jwks_document)
    app = _app(fetcher, max_pending_checks=2)
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 5)
        fetcher.delay = 2.0  # every refresh now hangs: unknown kids wait for it
        slow = [mint(claims(), "ES256", kid=f"rotated-{i}") for i in range(2)]
        pending = [asyncio.ensure_future(app.pipeline.decide(_attrs(t), "test")) for t in slow]
        await until_pending(app, 2)
        shed = await app.pipeline.decide(_attrs(mint(claims(), "ES256", kid="rotated-x")), "test")
        assert shed.status == 503 and shed.reason == "overloaded"
        assert ("retry-after", "1") in shed.response_headers
        # A token already verified is still answered from the cache while the bound is reached.
        fetcher.delay = 0.0
        await asyncio.gather(*pending)
        ok = await app.pipeline.decide(_attrs(mint(claims(), "ES256", kid=KIDS["ES256"])), "test")
        assert ok.allowed
    finally:
        await app.stop(grace=0.1)


async def test_grpc_overload_is_resource_exhausted_and_the_deadline_is_honoured(mint, jwks_document) -> None:  # type: ignore[no-untyped-def]
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, jwks_document)
    app = _app(fetcher, max_pending_checks=1)
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 5)
        fetcher.delay = 2.0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)

            def request(kid: str) -> verifier_pb2.CheckRequest:
                return verifier_pb2.CheckRequest(
                    path="/", headers={"authorization": f"Bearer {mint(claims(), 'ES256', kid=kid)}"}
                )

            async def expired() -> grpc.StatusCode:
                with pytest.raises(grpc.aio.AioRpcError) as deadline:
                    await stub.Check(request("slow-1"), timeout=0.3)
                return deadline.value.code()

            code, took, late = await timed(expired())  # less how long a loaded machine held this process
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert took - late < 1.0, (took, late)
            first = asyncio.ensure_future(stub.Check(request("slow-2"), timeout=30))
            await until_pending(app, 1)
            with pytest.raises(grpc.aio.AioRpcError) as shed:
                await stub.Check(request("slow-3"), timeout=5)
            assert shed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            fetcher.delay = 0.0
            first.cancel()
    finally:
        await app.stop(grace=0.1)
