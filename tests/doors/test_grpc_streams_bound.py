"""The gRPC doors' overload bound: HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection (issue #24 goal 4).

grpc.aio queues every accepted call without limit and serves them in order; under a flood each call expired
in the queue. The bound is announced in the server's first SETTINGS frame, read here off the wire.
"""

from __future__ import annotations

import asyncio
import struct

import grpc
import pytest
from doorkit import running_verifier
from support import FrozenClock
from tokenkit import DISCOVERY_URL, JWKS_URL, NOW, FakeFetcher, discovery_document, issuer_settings

from verifier.app import App
from verifier.settings import DEFAULT_GRPC_MAX_CONCURRENT_STREAMS, Listen, Settings
from verifier.v1 import verifier_pb2, verifier_pb2_grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, MAX_CONCURRENT_STREAMS = 0x4, 0x3


async def _announced_streams(port: int) -> int | None:
    """The server's SETTINGS_MAX_CONCURRENT_STREAMS (None: not announced, i.e. unlimited)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(PREFACE + struct.pack(">I", 0)[1:] + bytes([SETTINGS, 0]) + struct.pack(">I", 0))
        await writer.drain()
        while True:
            head = await asyncio.wait_for(reader.readexactly(9), 10)
            length = int.from_bytes(head[:3], "big")
            kind, flags = head[3], head[4]
            payload = await reader.readexactly(length)
            if kind == SETTINGS and not flags & 0x1:  # the server's own settings, not an ACK of ours
                for i in range(0, length, 6):
                    ident, value = struct.unpack(">HI", payload[i : i + 6])
                    if ident == MAX_CONCURRENT_STREAMS:
                        return int(value)
                return None
    finally:
        writer.close()


async def _announced_by_app(jwks_document: dict[str, object], **options: object) -> int | None:
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, jwks_document)
    settings = Settings(
        grpc=Listen(host="127.0.0.1", port=0),
        http=None,
        metrics=None,
        issuers=(issuer_settings(),),
        **options,  # type: ignore[arg-type]
    )
    app = App(settings, clock=FrozenClock(NOW), fetcher=fetcher)
    await app.start()
    try:
        assert app.ports.grpc is not None
        return await _announced_streams(app.ports.grpc)
    finally:
        await app.stop(grace=0.1)


async def test_the_default_bound_is_announced_to_every_client(jwks_document) -> None:  # type: ignore[no-untyped-def]
    assert await _announced_by_app(jwks_document) == DEFAULT_GRPC_MAX_CONCURRENT_STREAMS


async def test_the_bound_is_a_setting(jwks_document) -> None:  # type: ignore[no-untyped-def]
    # 4 is the bound measured to keep goodput under a 10x flood (docs/BENCHMARKS.md); any value is announced
    assert await _announced_by_app(jwks_document, grpc_max_concurrent_streams=4) == 4
    assert await _announced_by_app(jwks_document, grpc_max_concurrent_streams=3) == 3


BURST = 256  # calls started at once on one fresh channel: 64x the shipped bound
LOOP_CALLERS, LOOP_CALLS = 64, 8  # then a closed loop: each caller's next call as soon as its last is answered


async def _burst_then_loop(port: int, request: bytes) -> tuple[int, dict[str, int]]:
    """A grpc-python (grpc.aio) client's burst on a fresh channel, then its closed loop: (answers, errors by code)."""
    answered, errors = 0, {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary("/verifier.v1.Verifier/Check")

        async def one() -> None:
            nonlocal answered
            try:
                await check(request, timeout=20)
                answered += 1
            except grpc.aio.AioRpcError as exc:
                key = f"{exc.code().name}: {exc.details()}"
                errors[key] = errors.get(key, 0) + 1

        async def caller() -> None:
            for _ in range(LOOP_CALLS):
                await one()

        await asyncio.gather(*(one() for _ in range(BURST)))
        await asyncio.gather(*(caller() for _ in range(LOOP_CALLERS)))
    return answered, errors


@pytest.mark.parametrize("bound", [None, 4], ids=["default", "4"])
async def test_a_grpc_python_clients_burst_past_the_bound_waits_at_the_client_and_is_never_refused(
    bound: int | None,
) -> None:
    # A gRPC client reads the server's SETTINGS before its first call and keeps calls past the bound queued
    # on its own side; the transport must not refuse the next call on a slot the previous one just freed
    # (with gRPC's overload protection on, the server counted the stream until Python dropped its call:
    # 10-30% of a grpc.aio client's calls failed UNAVAILABLE "RST_STREAM with error code 7").
    options = {} if bound is None else {"grpc_max_concurrent_streams": bound}
    async with running_verifier(options) as (app, idp):
        request = verifier_pb2.CheckRequest(
            method="GET", host="api", path="/x", headers={"authorization": f"Bearer {idp.mint(sub='burst')}"}
        ).SerializeToString()
        assert app.ports.grpc is not None

        answered, errors = await _burst_then_loop(app.ports.grpc, request)

        assert errors == {}
        assert answered == BURST + LOOP_CALLERS * LOOP_CALLS


async def test_a_flood_of_forged_tokens_past_the_bound_never_gets_an_allow_and_a_valid_token_is_served() -> None:
    async with running_verifier() as (app, idp):
        assert app.ports.grpc is not None
        valid = idp.mint(sub="legit")
        forged = [valid[: valid.rindex(".") + 1] + "A" * 86 for _ in range(1)] + [f"garbage-{i}" for i in range(200)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)

            async def check(token: str) -> verifier_pb2.CheckResponse | grpc.StatusCode:
                request = verifier_pb2.CheckRequest(path="/", headers={"authorization": f"Bearer {token}"})
                try:
                    return await stub.Check(request, timeout=20)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()

            answers = await asyncio.gather(*(check(t) for t in [*forged, valid, *forged]))

        legit = answers[len(forged)]
        refused = answers[: len(forged)] + answers[len(forged) + 1 :]
        # Every forged token: a refusal, or a standard "retry later" status; never an allow.
        for answer in refused:
            if isinstance(answer, grpc.StatusCode):
                assert answer in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
            else:
                assert not answer.allowed and answer.http_status in (401, 503)
        assert isinstance(legit, verifier_pb2.CheckResponse) and legit.allowed and legit.subject == "legit"
