"""How long a gRPC connection lives: `grpc_max_connection_age_seconds`, then `grpc_max_connection_age_grace_seconds`
for the calls in flight, then the connection is closed, whatever it holds.

grpc.aio never answers a unary call that half-closes without a message (nor one whose message never ends), and the
door's deadline cannot reach it (the handler runs once the message is in): without the bound such a call held its
stream until the caller's deadline, or for ever without one, and a caller holding only such calls held its
connection (a descriptor, its memory) for ever. Frame-level callers go through `rawh2`.
"""

from __future__ import annotations

import asyncio
import resource

import grpc
import pytest
from doorkit import held_open, running_verifier
from rawh2 import DATA, PREFACE, SETTINGS, RawH2, frame, grpc_message

from verifier.doors.grpc import OWN_SERVICE, connection_cap
from verifier.v1 import verifier_pb2

OWN = f"/{OWN_SERVICE}/Check"
AGE, GRACE = 1.0, 1.0
BOUND = AGE * 1.1 + GRACE  # gRPC adds up to 10% of jitter to the age
SHORT = {"grpc_max_connection_age_seconds": AGE, "grpc_max_connection_age_grace_seconds": GRACE}


def _own(**headers: str) -> bytes:
    return verifier_pb2.CheckRequest(  # type: ignore[no-any-return]
        method="GET", scheme="https", host="api", path="/x", headers=headers
    ).SerializeToString()


async def test_a_connection_holding_only_calls_that_never_finish_is_closed_within_the_bound() -> None:
    """Four streams (the per-connection bound), none ever a whole request: one half-closed with no message (HEADERS
    with END_STREAM), one with HEADERS only, one with half a message, one with an empty DATA frame ending it. Before
    the bound they were held past any deadline; now the server sends GOAWAY and closes the connection."""
    async with running_verifier(SHORT) as (app, idp):
        assert app.ports.grpc is not None
        client = await RawH2.open(app.ports.grpc)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            client.start(1, OWN, end_stream=True)
            client.start(3, OWN)
            client.start(5, OWN)
            client.writer.write(frame(DATA, 0, 5, grpc_message(_own())[:10]))
            client.start(7, OWN)
            client.writer.write(frame(DATA, 0x1, 7, b""))
            await client.read(lambda c: False, timeout=BOUND + 3.0)  # until the server closes it
            took = loop.time() - started
        finally:
            client.close()
        assert client.closed and client.goaway is not None, "held past the bound"
        assert took < BOUND + 1.0, took
        assert not any(stream.data for stream in client.streams.values())
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            answer = await channel.unary_unary(OWN)(_own(authorization=f"Bearer {idp.mint()}"), timeout=10)
            assert verifier_pb2.CheckResponse.FromString(answer).allowed


async def test_a_connection_that_never_sends_its_preface_is_closed_within_the_bound() -> None:
    """A cleartext connection that sends nothing at all (no HTTP/2 preface): held until gRPC's handshake timeout
    (120 s) at best; now closed with the others at its age and grace."""
    async with running_verifier(SHORT) as (app, _):
        assert app.ports.grpc is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", app.ports.grpc)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while await asyncio.wait_for(reader.read(4096), BOUND + 3.0):  # the server's SETTINGS, then its end
                pass
        except TimeoutError:
            raise AssertionError("held past the bound") from None
        finally:
            writer.close()
        assert loop.time() - started < BOUND + 1.0


HANDSHAKE, SLACK = 1.0, 2.0  # grpc_handshake_timeout_seconds below, and a loaded machine's lateness on top of it


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(PREFACE[:10], id="half-a-preface"),
        pytest.param(PREFACE, id="preface-no-settings"),
    ],
)
async def test_a_cleartext_connection_without_its_preface_and_settings_is_closed_at_the_handshake_timeout(
    sent: bytes,
) -> None:
    """gRPC's handshake timeout covers a cleartext connection too: its HTTP/2 preface and first SETTINGS frame must
    come within `grpc_handshake_timeout_seconds` of the accept (C core closes the transport otherwise), well before
    the connection's age (300 s by default, kept here)."""
    async with running_verifier({"grpc_handshake_timeout_seconds": HANDSHAKE}) as (app, _):
        assert app.ports.grpc is not None
        took = await held_open(app.ports.grpc, sent, within=HANDSHAKE + SLACK)
        assert took is not None, "held past the handshake timeout"
        assert took >= HANDSHAKE * 0.8, took


@pytest.mark.parametrize(
    ("timeout", "sent"),
    [
        pytest.param(60.0, b"", id="long-timeout"),
        pytest.param(HANDSHAKE, PREFACE + frame(SETTINGS, 0, 0), id="settings-in-time"),
    ],
)
async def test_a_cleartext_connection_is_held_past_the_bound_above_when_the_timeout_does_not_apply(
    timeout: float, sent: bytes
) -> None:
    """The contrast: a long handshake timeout holds the silent connection (gRPC's default held it 120 s), and a
    client whose preface and SETTINGS came in time keeps its connection past the timeout."""
    async with running_verifier({"grpc_handshake_timeout_seconds": timeout}) as (app, _):
        assert app.ports.grpc is not None
        assert await held_open(app.ports.grpc, sent, within=HANDSHAKE + SLACK) is None


async def test_a_call_with_no_message_and_no_deadline_ends_within_the_bound() -> None:
    """grpcio's own client, a stream of no messages on the unary Check and no deadline: it waited for ever; now the
    connection's end fails it (UNAVAILABLE), and the same channel's next call is answered on a new connection."""
    async with running_verifier(SHORT) as (app, idp):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            empty = channel.stream_unary(OWN, request_serializer=None, response_deserializer=None)
            call = empty(iter([]))
            try:
                await asyncio.wait_for(call.code(), BOUND + 2.0)
            except TimeoutError:
                call.cancel()
                raise AssertionError("held past the bound") from None
            assert await call.code() == grpc.StatusCode.UNAVAILABLE
            answer = await channel.unary_unary(OWN)(_own(authorization=f"Bearer {idp.mint()}"), timeout=10)
            assert verifier_pb2.CheckResponse.FromString(answer).allowed


SLOW = 0.3  # seconds each decision takes: calls are in flight when the connection's age comes


async def test_a_pooled_connection_calling_across_its_age_loses_no_call() -> None:
    """A gateway's pooled connection (Envoy's, the Kong plugin's channels) calling without pause across several
    ages: at each, GOAWAY lets the calls in flight finish within the grace and the client opens a new connection for
    the next; not one call fails. Decisions take 0.3 s so calls are in flight at every GOAWAY (a grace of 0 fails
    them)."""
    async with running_verifier(SHORT) as (app, idp):
        doors = app.grpc
        decide = doors._decider

        async def slow(*args):  # type: ignore[no-untyped-def]
            await asyncio.sleep(SLOW)
            return await decide(*args)

        doors._decider = slow
        doors._own_answers = None  # every call decided (slowly), none remembered
        request = _own(authorization=f"Bearer {idp.mint()}")
        answered, errors = 0, []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            check = channel.unary_unary(OWN)
            stop = asyncio.get_running_loop().time() + 3 * (AGE * 1.1 + SLOW)

            async def caller() -> None:
                nonlocal answered
                while asyncio.get_running_loop().time() < stop:
                    try:
                        answer = await check(request, timeout=10)
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{exc.code().name}: {exc.details()}")
                    else:
                        answered += verifier_pb2.CheckResponse.FromString(answer).allowed

            await asyncio.gather(*(caller() for _ in range(4)))
        assert errors == []
        assert answered >= 4 * 3


async def test_connections_past_the_cap_are_closed_as_they_are_accepted_and_a_freed_place_serves() -> None:
    """A caller opening connections without end held a descriptor each, until the process had none left for its
    other doors, its issuers' fetches or Redis. Past `grpc_max_connections` a new one is closed at once (no SETTINGS,
    end of stream); once the caller's own close, a gateway's connection is served."""
    async with running_verifier({"grpc_max_connections": 3}) as (app, idp):
        assert app.ports.grpc is not None
        clients = [await RawH2.open(app.ports.grpc) for _ in range(6)]
        try:
            for client in clients:
                await client.read(lambda c: False, timeout=0.3)
            assert [c.closed for c in clients] == [False] * 3 + [True] * 3
        finally:
            for client in clients:
                client.close()
        await asyncio.sleep(0.2)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.ports.grpc}") as channel:
            answer = await channel.unary_unary(OWN)(_own(authorization=f"Bearer {idp.mint()}"), timeout=10)
            assert verifier_pb2.CheckResponse.FromString(answer).allowed


def test_the_cap_is_at_most_half_the_open_file_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(3) == 3
    if soft != resource.RLIM_INFINITY:
        assert connection_cap(10 * soft) == soft // 2
