"""A hostile caller on the gRPC port (a compromised pod, a misrouted client): whatever it sends, both Check services
fail closed with a stable code, keep answering everyone else, and never take a decision from call metadata.

Message-level cases go through grpcio's generic calls with raw bytes; frame-level ones (HTTP/2 rapid reset, a
client that never opens its flow-control window, exact `grpc-timeout` strings) through `rawh2`, a raw HTTP/2 client
(the venv has no `h2`).
"""

from __future__ import annotations

import asyncio
import gzip

import grpc
import pytest
from doorkit import running_verifier, until_pending
from envoy.service.auth.v3 import external_auth_pb2 as ea
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rawh2 import INITIAL_WINDOW_SIZE, RawH2
from support import timed
from test_overload import _app as overload_app
from tokenkit import DISCOVERY_URL, JWKS_URL, FakeFetcher, claims, discovery_document

from verifier.doors.grpc import ENVOY_SERVICE, OWN_SERVICE
from verifier.v1 import verifier_pb2

OWN = f"/{OWN_SERVICE}/Check"
ENVOY = f"/{ENVOY_SERVICE}/Check"
MAX_MESSAGE = 1 << 20  # `grpc.max_receive_message_length`


def _raw(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    """A Check taking and returning bytes: any message, well-formed or not."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def _own(path: str = "/x", **headers: str) -> bytes:
    return verifier_pb2.CheckRequest(  # type: ignore[no-any-return]
        method="GET", scheme="https", host="api", path=path, headers=headers
    ).SerializeToString()


def _envoy() -> ea.CheckRequest:
    request = ea.CheckRequest()
    http = request.attributes.request.http
    http.method, http.scheme, http.host, http.path = "GET", "https", "api", "/x"
    return request


async def _still_serves(channel: grpc.aio.Channel, token: str) -> None:
    """A plain caller on the same connection is answered as before."""
    answer = verifier_pb2.CheckResponse.FromString(await _raw(channel, OWN)(_own(authorization=f"Bearer {token}")))
    assert answer.allowed and answer.reason == "ok"


async def test_a_message_over_the_limit_is_resource_exhausted_and_the_door_serves_on() -> None:
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            big = _own(**{"x-pad": "a" * MAX_MESSAGE})
            for method in (OWN, ENVOY):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _raw(channel, method)(big, timeout=10)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await _still_serves(channel, idp.mint(sub="carol"))


async def test_a_gzip_bomb_is_measured_after_decompression() -> None:
    """8 MiB of one header value compresses to ~8 KiB: the limit holds for what it decompresses to."""
    bomb = _own(**{"x-pad": "a" * (8 * MAX_MESSAGE)})
    assert len(gzip.compress(bomb)) < MAX_MESSAGE // 16
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            for method in (OWN, ENVOY):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _raw(channel, method)(bomb, timeout=10, compression=grpc.Compression.Gzip)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await _still_serves(channel, idp.mint(sub="carol"))


async def test_huge_metadata_is_refused_by_the_transport_and_the_door_serves_on() -> None:
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _raw(channel, OWN)(_own(), metadata=(("x-pad", "a" * (64 * 1024)),), timeout=10)
            assert refused.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            await _still_serves(channel, idp.mint(sub="carol"))


async def test_call_metadata_never_carries_a_decision() -> None:
    """Credentials, identity, a request id or a trace context in the call's metadata: the request itself has no
    token, so it is refused as having none, through both doors."""
    async with running_verifier() as (app, idp):
        token = idp.mint(sub="carol")
        metadata = (
            ("authorization", f"Bearer {token}"),
            ("dpop", "x"),
            ("x-authenticated-userid", "admin"),
            ("x-request-id", "1"),
            ("x-forwarded-proto", "https"),
            ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            own = verifier_pb2.CheckResponse.FromString(await _raw(channel, OWN)(_own(), metadata=metadata))
            assert (own.allowed, own.reason) == (False, "token_missing")
            envoy = ea.CheckResponse.FromString(
                await _raw(channel, ENVOY)(_envoy().SerializeToString(), metadata=metadata)
            )
            assert envoy.status.code == grpc.StatusCode.UNAUTHENTICATED.value[0]


async def test_a_streaming_client_on_the_unary_check_is_judged_on_its_first_message_or_ends_at_its_deadline() -> None:
    """Two messages on the unary Check: the first is judged (the second, with a token, is never read). None at all:
    grpc.aio never answers, so the call holds one of its connection's streams until the caller's deadline, or the
    connection's age and grace without one (test_grpc_connection_age.py)."""
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stream = channel.stream_unary(OWN, request_serializer=None, response_deserializer=None)
            two = await stream(iter([_own(), _own(authorization=f"Bearer {idp.mint()}")]), timeout=10)
            assert verifier_pb2.CheckResponse.FromString(two).reason == "token_missing"
            with pytest.raises(grpc.aio.AioRpcError) as none:
                await stream(iter([]), timeout=0.5)
            assert none.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await _still_serves(channel, idp.mint(sub="carol"))


@pytest.mark.parametrize("timeout", [1e-9, 0.0])
async def test_a_deadline_already_spent_ends_the_call_or_gets_the_true_answer(timeout: float) -> None:
    """`grpc-timeout: 1n` (and what grpcio sends for 0): DEADLINE_EXCEEDED, or (a call the transport let through in
    time) the answer the request gets anyway; never another answer, never a wait or a crash."""
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            for headers, reason in (({"authorization": f"Bearer {idp.mint()}"}, "ok"), ({}, "token_missing")):
                try:
                    answer = await _raw(channel, OWN)(_own(**headers), timeout=timeout)
                except grpc.aio.AioRpcError as late:
                    assert late.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                else:
                    assert verifier_pb2.CheckResponse.FromString(answer).reason == reason
            await _still_serves(channel, idp.mint(sub="carol"))


async def test_a_deadline_of_a_century_is_answered_as_any_other() -> None:
    """A `grpc-timeout` in hours past what a deadline of nanoseconds since now can hold in 32 bits is no error and
    no overflow. (grpcio's client cannot send the largest, `99999999H`: past ~290 years its own int64 nanoseconds
    overflow and it fails the call itself; an exact header needs a raw HTTP/2 client.)"""
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            token = idp.mint(sub="carol")
            own = await _raw(channel, OWN)(_own(authorization=f"Bearer {token}"), timeout=3e9)
            assert verifier_pb2.CheckResponse.FromString(own).allowed


async def test_a_caller_that_cancels_mid_decision_leaves_no_task_and_others_are_answered(
    mint,
    jwks_document,  # type: ignore[no-untyped-def]
) -> None:
    fetcher = FakeFetcher()
    fetcher.serve(DISCOVERY_URL, discovery_document())
    fetcher.serve(JWKS_URL, jwks_document)
    app = overload_app(fetcher)
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 5)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            check = _raw(channel, OWN)
            await check(_own(authorization=f"Bearer {mint(claims())}"))  # warm: the baseline has its tasks
            baseline = len(asyncio.all_tasks())
            fetcher.delay = 30.0
            slow = asyncio.ensure_future(check(_own(authorization=f"Bearer {mint(claims(), 'ES256', kid='new')}")))
            await until_pending(app, 1)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            deadline = asyncio.get_running_loop().time() + 10
            while app.pipeline._pending and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            assert app.pipeline._pending == 0  # the cancelled call's decision was let go
            fetcher.delay = 0.0
            answer = verifier_pb2.CheckResponse.FromString(await check(_own(authorization=f"Bearer {mint(claims())}")))
            assert answer.allowed
            while len(asyncio.all_tasks()) > baseline and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            assert len(asyncio.all_tasks()) <= baseline
    finally:
        await app.stop(grace=0.1)


async def test_reflection_and_health_name_the_services_and_nothing_of_the_configuration() -> None:
    async with running_verifier() as (app, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            asks = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol=OWN_SERVICE),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="verifier.settings.Settings"),
                reflection_pb2.ServerReflectionRequest(file_by_filename="verifier/settings.py"),
            ]
            answers = [answer async for answer in stub.ServerReflectionInfo(iter(asks))]
            listed = {s.name for s in answers[0].list_services_response.service}
            assert listed == {
                OWN_SERVICE,
                ENVOY_SERVICE,
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }
            files = answers[1].file_descriptor_response.file_descriptor_proto
            assert files and all(b"issuer" not in f and idp_free(f) for f in files)
            assert all(a.HasField("error_response") for a in answers[2:])
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert health.ListFields() == [(health_pb2.HealthCheckResponse.DESCRIPTOR.fields_by_name["status"], 1)]


def idp_free(descriptor: bytes) -> bool:
    """No address, path or secret of this deployment in a served descriptor."""
    return b"127.0.0.1" not in descriptor and b"/work/" not in descriptor and b"http://" not in descriptor


def _spellings_own(*, one_name: bool) -> bytes:
    """Our CheckRequest as large as a message may be: one name in as many spellings as fit (two spellings are two
    lines of one field, joined), or as many distinct names of the same length (nothing to join)."""
    message = verifier_pb2.CheckRequest(method="GET", scheme="https", host="api", path="/x")
    name, i = "abcdefghijklmnop", 0
    while message.ByteSize() < MAX_MESSAGE - 8192:
        for _ in range(100):
            if one_name:
                spelled = "".join(c.upper() if i >> k & 1 else c for k, c in enumerate(name))
            else:
                spelled = "".join(chr(97 + (i // 26**k) % 26) for k in range(len(name)))
            message.headers[spelled] = "v" * 18
            i += 1
    return message.SerializeToString()  # type: ignore[no-any-return]


def _repeats_envoy() -> bytes:
    """Envoy's CheckRequest (`encode_raw_headers`) as large as a message may be: one header line, repeated."""
    request = _envoy()
    raw = request.attributes.request.http.header_map.headers
    while request.ByteSize() < MAX_MESSAGE - 4096:
        for _ in range(1000):
            raw.add(key="a", raw_value=b"")
    return request.SerializeToString()  # type: ignore[no-any-return]


async def test_a_header_repeated_to_the_message_limit_is_translated_in_linear_time() -> None:
    """Each repeat in `header_map` was joined onto the value so far: a 1 MiB request of 210,000 `a:` lines held the
    event loop (every caller's decisions) for ~5 s of copying. Joined once, it takes what parsing it takes. (Our
    own door's map holds each spelling once: at most ~26,000 spellings of one name fit, joined in ~30 ms.)"""
    hostile = _repeats_envoy()
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            _, took, late = await timed(_raw(channel, ENVOY)(hostile, timeout=30))
            assert took - late < 1.0, (took, late)
            await _still_serves(channel, idp.mint(sub="carol"))


async def test_an_envoy_check_with_both_header_forms_is_invalid_argument_whichever_disagrees() -> None:
    """Envoy sends `headers` or, with `encode_raw_headers`, `header_map`, never both. Both, disagreeing: the door
    judged `headers` alone (a valid token there, `Bearer a.b.c` in the other form: allowed), whatever the caller
    meant by the other."""
    async with running_verifier() as (app, idp):
        token = idp.mint(sub="carol")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            for mapped, raw in ((f"Bearer {token}", "Bearer a.b.c"), ("Bearer a.b.c", f"Bearer {token}")):
                request = _envoy()
                http = request.attributes.request.http
                http.headers["authorization"] = mapped
                http.header_map.headers.add(key="authorization", raw_value=raw.encode())
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _raw(channel, ENVOY)(request.SerializeToString(), timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # `headers` holding only an x-request-id entry (which the key drops) beside a raw map: both forms too
            # (judged on the raw map before); in one message and in two the parser merges.
            request = _envoy()
            request.attributes.request.http.headers["x-request-id"] = "r-1"
            raw = ea.CheckRequest()
            raw.attributes.request.http.header_map.headers.add(
                key="authorization", raw_value=f"Bearer {token}".encode()
            )
            merged = request.SerializeToString() + raw.SerializeToString()
            request.MergeFrom(raw)
            for data in (request.SerializeToString(), merged):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _raw(channel, ENVOY)(data, timeout=10)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await _still_serves(channel, token)


async def test_one_name_in_every_spelling_costs_our_door_what_as_many_distinct_names_cost() -> None:
    """26,000 spellings of one name (1 MiB) were joined onto the value so far: ~0.5 s of the event loop, ten times
    what 26,000 distinct names cost. Joined once, the two cost the same."""
    hostile, plain = _spellings_own(one_name=True), _spellings_own(one_name=False)
    async with running_verifier() as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            check = _raw(channel, OWN)
            await check(plain, timeout=30)  # warm
            _, plain_took, plain_late = await timed(check(plain, timeout=30))
            answer, took, late = await timed(check(hostile, timeout=30))
            assert verifier_pb2.CheckResponse.FromString(answer).reason == "token_missing"
            assert took - late < 3 * (plain_took - plain_late) + 0.05, (took, late, plain_took, plain_late)
            await _still_serves(channel, idp.mint(sub="carol"))


async def _counted(app, port: int, calls):  # type: ignore[no-untyped-def]
    """Counts the checks the door runs (remembered answers and decisions) into `calls[0]`; checks the count works."""
    doors = app.grpc
    recall, decide = doors._recall, doors._decider

    def counted_recall(*args):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return recall(*args)

    async def counted_decide(*args):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return await decide(*args)

    doors._recall, doors._decider = counted_recall, counted_decide
    client = await RawH2.open(port)
    client.call(1, OWN, _own())
    await client.read(lambda c: c.streams[1].ended)
    client.close()
    assert calls[0] >= 1


@pytest.mark.parametrize(
    ("timeout", "answered"),
    [("0n", None), ("1n", None), ("0S", None), ("99999999H", True), ("99999999n", None), ("-1S", False),
     ("1x", False), ("", False)],
)  # fmt: skip
async def test_an_exact_grpc_timeout_ends_the_call_in_time_or_gets_the_true_answer(
    timeout: str, answered: bool | None
) -> None:
    """`grpc-timeout` as a client writes it, largest and smallest: `99999999H` (11,000 years) is answered; a spent
    one ends the call (or, let through in time, gets the true answer); one that is no timeout is reset by the
    transport. None waits, none gets another answer, and the door serves on."""
    async with running_verifier() as (app, idp):
        assert app.ports.grpc is not None
        client = await RawH2.open(app.ports.grpc)
        try:
            client.call(1, OWN, _own(authorization=f"Bearer {idp.mint()}"), timeout=timeout)
            await client.read(lambda c: c.streams[1].ended or c.streams[1].reset is not None)
            stream = client.streams[1]
            assert stream.ended or stream.reset is not None  # never a wait
            if stream.data:
                assert verifier_pb2.CheckResponse.FromString(stream.data[5:]).reason == "ok"
            if answered is not None:
                assert bool(stream.data) is answered
        finally:
            client.close()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            await _still_serves(channel, idp.mint(sub="carol"))


async def test_streams_opened_and_reset_at_once_cost_the_door_nothing_and_it_serves_on() -> None:
    """HTTP/2 rapid reset (CVE-2023-44487): 5,000 calls each reset as soon as sent, on one connection, past the
    4-stream bound (a reset frees its stream at once). grpc's C core drops them before grpc.aio takes them (its
    mitigation, from 1.59.2; pyproject.toml pins grpcio >= 1.66): not one reaches the door."""
    async with running_verifier() as (app, idp):
        assert app.ports.grpc is not None
        calls = [0]
        await _counted(app, app.ports.grpc, calls)
        before = calls[0]
        client = await RawH2.open(app.ports.grpc)
        try:
            message = _own(authorization=f"Bearer {idp.mint()}")
            for i in range(5000):
                client.call(1 + 2 * i, OWN, message)
                client.reset(1 + 2 * i)
                if i % 200 == 0:
                    await client.writer.drain()
            await client.writer.drain()
            await client.read(lambda c: c.closed, timeout=2)
        finally:
            client.close()
        assert calls[0] - before < 50, calls[0] - before
        assert app.pipeline._pending == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            await _still_serves(channel, idp.mint(sub="carol"))


@pytest.mark.parametrize("acknowledged", [False, True])
async def test_a_client_that_never_opens_its_window_holds_four_answers_at_most(acknowledged: bool) -> None:
    """A client that announces a flow-control window of 0 and never opens it: the server cannot send an answer,
    so each call's answer waits in its memory while the stream stays open. 200 calls on one connection: four are
    held (SETTINGS_MAX_CONCURRENT_STREAMS), the rest refused by the transport, whether the client opened them
    before acknowledging the bound or after; other callers are answered."""
    async with running_verifier() as (app, idp):
        assert app.ports.grpc is not None
        client = await RawH2.open(app.ports.grpc, settings=((INITIAL_WINDOW_SIZE, 0),))
        try:
            if acknowledged:
                await client.read(lambda c: False, timeout=0.5)  # the server's SETTINGS, acknowledged
            message = _own(authorization=f"Bearer {idp.mint()}")
            for i in range(200):
                client.call(1 + 2 * i, OWN, message)
            await client.read(lambda c: False, timeout=2)
            streams = list(client.streams.values())
            held = [s for s in streams if s.reset is None and not s.ended]
            assert len(held) <= 4 and not any(s.data for s in streams)
            assert len([s for s in streams if s.reset is not None]) >= 196
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
                await _still_serves(channel, idp.mint(sub="carol"))
        finally:
            client.close()
