"""bench/c/openloop.c, the bench's C open-loop generator, against tiny servers started here: it counts what
the schedule sent and what came back (Content-Length and chunked answers, statuses), charges latency from
the intended send time, counts a server that closes, garbles, stays silent or refuses instead of hanging
or crashing, and reads gRPC statuses from the trailers (and the allow rule from the answer message)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("hdrh")
pytest.importorskip("grpc")

import grpc
from support import free_port

from bench import load, openloop, wire
from bench.wire import Door
from verifier.doors.grpc import server_options

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
RATE, DURATION, WARMUP = 400.0, 1.0, 0.2
SCHEDULED = int(RATE * DURATION)  # requests whose intended send time falls in the measured window
# Seconds a run waits for answers after its window before it counts the rest dropped. A run ends as soon as every
# request is answered, so where the test expects none dropped this only bounds how long a stalled runner may hold
# the answers back (the tiny servers here run in this process); 2 s was a stall away from `dropped == 1`.
DRAIN = 20.0
# Where the server fails (closes, garbles), the drain the tests' time bounds assume.
FAULT_DRAIN = 2.0


@pytest.fixture(scope="module")
def exe() -> Path:
    path = openloop.binary()
    assert path is not None, f"the C generator does not build: {openloop.unavailable()}"
    return path


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], str]]:
    """Start an asyncio TCP server on loopback running ``handler`` per connection; its host:port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers: list[asyncio.base_events.Server] = []

    def start(handler: Handler) -> str:
        server = asyncio.run_coroutine_threadsafe(asyncio.start_server(handler, "127.0.0.1", 0), loop).result(5)
        servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for s in servers:
        loop.call_soon_threadsafe(s.close)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def run(exe: Path, addr: str, tmp_path: Path, *extra: str, payloads: list[bytes] | None = None, **kw: Any) -> Any:
    """One run of the generator (HTTP unless told); its JSON answer. Fails if it hangs past its own deadline."""
    file = tmp_path / "payloads.bin"
    load.write_payloads(file, payloads or [wire.http_request({"Authorization": "Bearer t"}, addr)])
    args = dict(grpc_method=None, rate=RATE, connections=4, duration_s=DURATION, warmup_s=WARMUP, drain_s=DRAIN) | kw
    cmd = [str(exe), *openloop.argv(addr=addr, payload_file=str(file), **args), *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    answer["took_s"] = time.monotonic() - t0
    return answer


async def _requests(reader: asyncio.StreamReader) -> Any:
    while True:
        try:
            yield await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return


def answering(*answers: bytes, delay_s: float = 0.0) -> Handler:
    """A keep-alive server giving ``answers`` in turn, each after ``delay_s``."""
    count = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for _ in _requests(reader):
            if delay_s:
                await asyncio.sleep(delay_s)
            writer.write(answers[count[0] % len(answers)])
            count[0] += 1
            await writer.drain()
        writer.close()

    return handle


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
CHUNKED_TRAILER = b"HTTP/1.1 401 Unauthorized\r\ntransfer-encoding: chunked\r\n\r\n2;x=y\r\nno\r\n0\r\nX-T: 1\r\n\r\n"


def test_every_scheduled_request_is_sent_and_answered_once(exe: Path, serve: Any, tmp_path: Path) -> None:
    addr = serve(answering(OK, CHUNKED, CHUNKED_TRAILER, OK))
    a = run(exe, addr, tmp_path)
    assert a["scheduled"] == SCHEDULED and a["sent"] == SCHEDULED and a["completed"] == SCHEDULED
    assert a["dropped"] == 0 and sum(a["errors"].values()) == 0
    assert a["http_status"]["401"] == pytest.approx(SCHEDULED / 4, abs=2)
    assert a["http_status"]["200"] + a["http_status"]["401"] == SCHEDULED
    assert a["latency"]["count"] == SCHEDULED and a["lag"]["count"] == SCHEDULED
    assert sum(c for _, c in a["latency"]["buckets"]) == SCHEDULED
    assert a["latency"]["p50"] <= a["latency"]["p99"] <= a["latency"]["max"]
    assert a["took_s"] < WARMUP + DURATION + DRAIN / 2  # it ended once all were answered, not at the drain's end


def test_a_server_that_says_connection_close_is_reconnected_without_errors(
    exe: Path, serve: Any, tmp_path: Path
) -> None:
    """nginx closes a keep-alive connection after keepalive_requests answers, saying so in the last one."""

    async def close_every_third(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        async for _ in _requests(reader):
            n += 1
            last = n % 3 == 0
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok" if last else OK)
            await writer.drain()
            if last:
                break
        writer.close()

    a = run(exe, serve(close_every_third), tmp_path, rate=200)
    assert a["completed"] == a["scheduled"] == 200 and sum(a["errors"].values()) == 0 and a["dropped"] == 0
    assert a["disconnects"] >= 60


def test_poisson_keeps_the_rate_on_average(exe: Path, serve: Any, tmp_path: Path) -> None:
    a = run(exe, serve(answering(OK)), tmp_path, poisson=True, duration_s=2.0)
    assert a["poisson"] is True and a["completed"] == a["scheduled"]
    assert a["scheduled"] == pytest.approx(2 * RATE, rel=0.15)


def test_latency_is_the_servers_time_and_charged_from_the_intended_send(exe: Path, serve: Any, tmp_path: Path) -> None:
    # One connection, 20 ms per answer, 100 requests/s: every request waits for the one before it, so
    # the backlog grows (1.2 s x 100/s offered, 50/s served); latency from the intended send grows with it.
    a = run(exe, serve(answering(OK, delay_s=0.02)), tmp_path, rate=100, connections=1, drain_s=3.0)
    assert 20_000 <= a["service"]["p50"] < 200_000, a["service"]  # microseconds
    assert a["latency"]["max"] > 300_000, a["latency"]  # the last in the queue waited for those before it
    assert a["wait"]["p99"] > 300_000  # ... which is waiting for the connection, not the generator's lag
    assert a["lag"]["p50"] < a["service"]["p50"]


def test_a_server_that_closes_without_answering_is_counted_not_hung(exe: Path, serve: Any, tmp_path: Path) -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    a = run(exe, serve(close_at_once), tmp_path, drain_s=FAULT_DRAIN)
    assert a["completed"] == 0 and a["errors"]["closed"] > SCHEDULED / 2
    assert a["errors"]["closed"] + a["dropped"] == a["scheduled"]  # each sent one lost to the close, or never sent
    assert a["took_s"] < WARMUP + DURATION + 4


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nextra bytes nobody asked for",
        bytes(range(256)) * 40 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
    ],
)
def test_a_garbled_answer_is_counted_malformed(exe: Path, serve: Any, tmp_path: Path, garbage: bytes) -> None:
    a = run(exe, serve(answering(garbage)), tmp_path, rate=100, drain_s=FAULT_DRAIN)
    # each garbled answer drops its connection (bytes after a whole answer: the answer counts, the bytes drop it)
    assert a["errors"]["malformed"] + a["unsolicited"] >= 90, a
    assert a["errors"]["malformed"] + a["dropped"] + a["completed"] == a["scheduled"]
    assert a["took_s"] < WARMUP + DURATION + 4


def test_a_silent_server_ends_at_the_deadline_with_every_request_dropped(exe: Path, serve: Any, tmp_path: Path) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 20)
        await asyncio.sleep(30)

    a = run(exe, serve(silent), tmp_path, rate=100, drain_s=0.5)
    assert a["completed"] == 0 and a["dropped"] == a["scheduled"] == 100
    assert a["latency"]["p50"] > 500_000  # charged until the deadline (us)
    assert a["took_s"] < WARMUP + DURATION + 0.5 + 3


def test_connection_refused_is_counted_and_retried(exe: Path, tmp_path: Path) -> None:
    a = run(exe, f"127.0.0.1:{free_port()}", tmp_path, rate=100, drain_s=0.2)
    assert a["completed"] == 0 and a["sent"] == 0 and a["dropped"] == a["scheduled"] == 100
    assert a["connect_failures"] > 4  # the four connections, retried
    assert a["took_s"] < WARMUP + DURATION + 3


def test_bad_options_are_refused(exe: Path) -> None:
    for bad in (["--mode", "ftp"], ["--rate", "-1"], ["--allow", "x=1"], ["--addr", "nocolon"]):
        args = ["--addr", "127.0.0.1:1", "--raw", "/dev/null", "--mode", "http", *bad]
        proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 2, (bad, proc.stdout)


# --- gRPC ----------------------------------------------------------------------------------------------


@pytest.fixture
def grpc_server() -> Iterator[tuple[str, list[Any]]]:
    """Both gRPC doors as generic handlers: a token "allow" is allowed, "deny" refused in the answer,
    "abort" answered with grpc-status UNAUTHENTICATED; each call's deadline is recorded."""
    from envoy.service.auth.v3 import external_auth_pb2 as envoy_pb2

    from verifier.v1 import verifier_pb2

    deadlines: list[Any] = []

    def token(door: Door, request: bytes) -> str:
        return wire.authorization(door, request).removeprefix("Bearer ")

    def check(door: Door) -> Any:
        def handle(request: bytes, context: Any) -> bytes:
            deadlines.append(context.time_remaining())
            t = token(door, request)
            if t == "abort":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "no")
            return wire.ANSWERS[(door, t == "allow")]

        return grpc.unary_unary_rpc_method_handler(handle)

    assert verifier_pb2 and envoy_pb2
    handlers = {
        "verifier.v1.Verifier": {"Check": check(Door.GRPC)},
        "envoy.service.auth.v3.Authorization": {"Check": check(Door.EXT_AUTHZ)},
    }
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(s, m) for s, m in handlers.items()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", deadlines
    finally:
        server.stop(0)


@pytest.mark.parametrize("door", [Door.GRPC, Door.EXT_AUTHZ])
def test_grpc_status_and_the_allow_rule_are_read_from_the_answer(
    exe: Path, grpc_server: tuple[str, list[Any]], tmp_path: Path, door: Door
) -> None:
    addr, deadlines = grpc_server
    payloads = [wire.grpc_payload(door, t) for t in ("allow", "deny", "abort", "allow")]
    a = run(exe, addr, tmp_path, payloads=payloads, grpc_method=door.grpc_method, rate=200, grpc_timeout="5S")
    n = a["scheduled"]
    assert n == 200 and a["completed"] == n and a["dropped"] == 0 and sum(a["errors"].values()) == 0
    assert a["grpc_status"]["16"] == pytest.approx(n / 4, abs=2)
    assert a["grpc_status"]["0"] == a["allowed"] + a["denied"] == n - a["grpc_status"]["16"]
    assert a["allowed"] == pytest.approx(n / 2, abs=2) and a["denied"] == pytest.approx(n / 4, abs=2)
    assert deadlines and all(d is not None and 0 < d <= 5 for d in deadlines)  # grpc-timeout was sent
    errors = a["grpc_status"]["16"]
    assert openloop.outcome(a, grpc=True) == dict(allowed=a["allowed"], denied=a["denied"], errors=errors)


def test_grpc_streams_in_flight_are_bounded_and_the_wait_is_charged(exe: Path, tmp_path: Path) -> None:
    """At most --max-streams calls in flight per connection; the rest wait, charged from their intended time."""
    lock, now, peak = threading.Lock(), [0], [0]

    def slow(_request: bytes, _context: Any) -> bytes:
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.05)
        with lock:
            now[0] -= 1
        return wire.ANSWERS[(Door.GRPC, True)]

    server = grpc.server(futures.ThreadPoolExecutor(16))
    handler = grpc.method_handlers_generic_handler(
        "verifier.v1.Verifier", {"Check": grpc.unary_unary_rpc_method_handler(slow)}
    )
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        payloads = [wire.grpc_payload(Door.GRPC, "t")]
        a = run(
            exe,
            f"127.0.0.1:{port}",
            tmp_path,
            "--max-streams",
            "2",
            payloads=payloads,
            grpc_method=Door.GRPC.grpc_method,
            rate=60,
            connections=1,
            drain_s=DRAIN,
        )
    finally:
        server.stop(0)
    assert peak[0] == 2  # 60/s x 50 ms would need 3 in flight
    assert a["completed"] == a["allowed"] == a["scheduled"] == 60 and a["dropped"] == 0
    assert a["wait"]["max"] > 100_000 and a["latency"]["max"] > 150_000  # the backlog grew, and was charged


class _StreamBoundedServer:
    """A gRPC Check server allowing ``streams`` per connection (as the verifier's 4), each call ``hold_s``
    long; the peak of calls in flight and the connections seen."""

    def __init__(self, streams: int, hold_s: float) -> None:
        self.lock, self.now, self.peak, self.peers = threading.Lock(), 0, 0, set()
        self.hold_s = hold_s
        # the verifier's own server options (its stream bound, grpc.http.overload_protection off)
        options = server_options(streams, reuse_port=False)
        self.server = grpc.server(futures.ThreadPoolExecutor(64), options=options)
        handler = grpc.method_handlers_generic_handler(
            "verifier.v1.Verifier", {"Check": grpc.unary_unary_rpc_method_handler(self.check)}
        )
        self.server.add_generic_rpc_handlers([handler])
        self.addr = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def check(self, _request: bytes, context: Any) -> bytes:
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.peers.add(context.peer())
        time.sleep(self.hold_s)
        with self.lock:
            self.now -= 1
        return wire.ANSWERS[(Door.GRPC, True)]

    def run(self, exe: Path, tmp_path: Path, *extra: str, rate: float, connections: int) -> Any:
        self.server.start()
        try:
            return run(
                exe, self.addr, tmp_path, *extra, payloads=[wire.grpc_payload(Door.GRPC, "t")],
                grpc_method=Door.GRPC.grpc_method, rate=rate, connections=connections, drain_s=DRAIN,
            )
        finally:
            self.server.stop(0)


def test_the_grpc_pool_opens_another_connection_when_every_stream_is_in_use(exe: Path, tmp_path: Path) -> None:
    """--pool-max: as Envoy's pool, a request finding the peer's streams all in use gets a new connection."""
    server = _StreamBoundedServer(streams=2, hold_s=0.05)
    a = server.run(exe, tmp_path, "--pool-max", "8", rate=100, connections=1)  # 100/s x 50 ms: 5 in flight
    assert a["completed"] == a["scheduled"] == 100 and a["dropped"] == 0
    # a stall of this busy machine's server may have had it open more, never past the maximum
    assert server.peak > 2 and 3 <= a["connections_opened"] <= 8 and len(server.peers) == a["connections_opened"]
    assert a["pool_max"] == 8


def test_the_grpc_pool_stops_at_its_maximum_and_the_rest_wait(exe: Path, tmp_path: Path) -> None:
    server = _StreamBoundedServer(streams=2, hold_s=0.05)
    a = server.run(exe, tmp_path, "--pool-max", "2", rate=100, connections=1)
    assert a["completed"] == a["scheduled"] == 100 and a["dropped"] == 0
    assert server.peak == 4 and a["connections_opened"] == 2 == len(server.peers)
    assert a["wait"]["max"] > 50_000  # the backlog was charged


def test_fixed_grpc_connections_hold_the_peers_stream_limit(exe: Path, tmp_path: Path) -> None:
    server = _StreamBoundedServer(streams=2, hold_s=0.05)
    a = server.run(exe, tmp_path, rate=100, connections=1)
    assert server.peak == 2 and a["connections_opened"] == 1 and a["pool_max"] == 0
    assert a["completed"] == a["scheduled"] == 100 and a["latency"]["max"] > 150_000


def test_the_grpc_pool_does_not_grow_at_a_server_without_a_stream_bound(exe: Path, tmp_path: Path) -> None:
    server = _StreamBoundedServer(streams=1000, hold_s=0.05)  # the generator's own cap: 100 per connection
    a = server.run(exe, tmp_path, "--pool-max", "8", rate=100, connections=2)
    assert a["connections_opened"] == 2 and a["completed"] == a["scheduled"] == 100 and server.peak >= 4


def test_a_pool_smaller_than_the_connections_is_refused(exe: Path) -> None:
    args = ["--addr", "127.0.0.1:1", "--raw", "/dev/null", "--mode", "grpc", "--connections", "4", "--pool-max", "2"]
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "--pool-max" in proc.stderr


def test_an_http1_server_at_the_grpc_door_is_counted_not_hung(exe: Path, serve: Any, tmp_path: Path) -> None:
    a = run(
        exe, serve(answering(OK)), tmp_path, payloads=[b"msg"], grpc_method=Door.GRPC.grpc_method, rate=100,
        drain_s=FAULT_DRAIN,
    )
    assert a["completed"] == 0 and a["allowed"] == 0
    assert sum(a["errors"].values()) + a["dropped"] == a["scheduled"]
    assert a["took_s"] < WARMUP + DURATION + 4


def test_the_bench_runs_the_c_generator_and_falls_back_to_python(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(load, "DRAIN_S", DRAIN)  # none may be dropped: a stalled runner gets the time
    addr = serve(answering(OK))
    file = tmp_path / "p.bin"
    load.write_payloads(file, [wire.http_request({}, addr)])
    spec = dict(door="http", addr=addr, mode="open", payload_file=str(file), duration_s=0.5, warmup_s=0.1, rate=200)
    c = load.run(load.LoadSpec(**spec, generator="c"))  # type: ignore[arg-type]
    py = load.run(load.LoadSpec(**spec, generator="python"))  # type: ignore[arg-type]
    assert c.tool == "openloop (C)" and py.tool == "bench.load"
    for r in (c, py):
        assert r.completed == r.allowed == 100 and r.errors == r.dropped == 0
        assert r.latency.get_total_count() == 100 and r.lag.get_total_count() == 100


def test_without_a_build_the_bench_falls_back_to_the_python_loop(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "openloop.c"
    broken.write_text("#include <no/such/header.h>\n")
    monkeypatch.setattr(openloop, "SOURCE", broken)
    monkeypatch.setattr(openloop, "BUILD_DIR", tmp_path / "build")
    assert openloop.binary() is None and "gcc failed" in openloop.unavailable()
    addr = serve(answering(OK))
    file = tmp_path / "p.bin"
    load.write_payloads(file, [wire.http_request({}, addr)])
    spec = dict(door="http", addr=addr, mode="open", payload_file=str(file), duration_s=0.3, warmup_s=0.1, rate=100)
    r = load.run(load.LoadSpec(**spec))  # type: ignore[arg-type]
    assert r.tool.startswith("bench.load (C generator unavailable: gcc failed") and r.completed == 30
    with pytest.raises(RuntimeError, match="cannot be built"):
        load.run(load.LoadSpec(**spec, generator="c"))  # type: ignore[arg-type]


def test_a_goal_3_row_says_whether_it_is_a_server_figure() -> None:
    from bench.tokens import generator_lag

    def point(target: str, p99_ms: float, lag_p99_ms: float) -> dict[str, Any]:
        return dict(target=target, tool="openloop (C)", latency=dict(p99=p99_ms), lag=dict(p99=lag_p99_ms))

    steady = [point("noop", 2.0, 0.05), point("noop", 2.4, 0.04), point("verifier", 2.2, 0.06)]
    assert generator_lag(steady, 2.2) == "generator (openloop) send lag p99 60 us"
    lagging = [*steady[:2], point("verifier", 2.2, 0.5)]
    assert generator_lag(lagging, 2.2).endswith("> 10% of the no-op's p99: NOT a server figure")
    swinging = [*steady, point("verifier", 9.0, 0.06)]
    assert generator_lag(swinging, 2.2).endswith("p99 varied 4.1x across repetitions: NOT a server figure")


def test_the_open_loop_rate_is_a_fraction_of_the_no_ops_median_maximum() -> None:
    from bench.tokens import open_rate

    # Repetition 1's maximum was cut by a stall: its open loops must not run at half the load of the others.
    maxima = {(Door.GRPC, 0): 5_700.0, (Door.GRPC, 1): 2_100.0, (Door.GRPC, 2): 5_500.0, (Door.HTTP, 0): 90_000.0}
    assert open_rate(maxima, Door.GRPC, 0.5) == 2_750.0
    assert open_rate(maxima, Door.HTTP, 0.25) == 22_500.0
    assert open_rate({(Door.GRPC, 0): 10.0}, Door.GRPC, 0.5) == 50.0  # the floor


def test_a_goal_3_row_shows_each_repetitions_ratio_the_service_p99_and_the_no_op_with_the_verifiers_settings() -> None:
    from bench.tokens import HALF, NOOP_LIKE, goals

    def point(target: str, rep: int, p99_ms: float) -> dict[str, Any]:
        return dict(mode="open", door="grpc", target=target, fraction=HALF, rep=rep, tool="openloop (C)") | dict(
            latency=dict(p99=p99_ms), service=dict(p99=p99_ms / 2), lag=dict(p99=0.01)
        )

    p99s = {"noop": (4.0, 8.0, 5.0), NOOP_LIKE: (6.0, 9.0, 7.0), "verifier": (6.0, 8.0, 10.0)}
    points = [point(t, rep, ms) for t, values in p99s.items() for rep, ms in enumerate(values)]
    row = next(g for g in goals(points, {}, ["grpc"]) if g.name == "p99 at half no-op max vs no-op (grpc)")
    assert row.value == 8.0 / 5.0  # the medians' ratio, as before
    assert "per repetition 1.50, 1.00, 2.00 (median 1.50)" in row.detail
    assert "service p99 4.00 / 2.50 ms" in row.detail
    assert "vs the no-op with the verifier's settings 1.14 (7.00 ms)" in row.detail


def test_a_grpc_body_file_is_sent_as_it_is(exe: Path, grpc_server: tuple[str, list[Any]], tmp_path: Path) -> None:
    """--raw FILE at the gRPC door: the file is the 5-byte-prefixed message, sent unchanged (h2load's -d)."""
    addr, _ = grpc_server
    body = tmp_path / "body.bin"
    body.write_bytes(wire.grpc_frame(wire.grpc_payload(Door.EXT_AUTHZ, "deny")))
    path = Door.EXT_AUTHZ.grpc_method
    cmd = [str(exe), "--mode", "grpc", "--addr", addr, "--raw", str(body), "--path", path, "--allow", "1.1=0"]
    cmd += ["--rate", "100", "--duration", "0.5", "--connections", "2"]
    a = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout)
    assert a["scheduled"] == 50 and a["grpc_status"] == {"0": 50} and a["denied"] == 50 and a["allowed"] == 0


def test_a_goal_3_row_names_its_grpc_client_model_and_shows_the_other_next_to_it() -> None:
    from bench.tokens import HALF, OTHER_CLIENT, goals

    def point(target: str, rep: int, p99_ms: float, client: str, opened: int) -> dict[str, Any]:
        return dict(mode="open", door="grpc", target=target, fraction=HALF, rep=rep, tool="openloop (C)") | dict(
            latency=dict(p99=p99_ms), service=dict(p99=p99_ms / 2), lag=dict(p99=0.01), client=client,
            connections_opened=opened,
        )

    pool, fixed = (("noop", 5.0), ("verifier", 6.0)), (("noop", 5.0), ("verifier", 12.0))
    points = [point(t, r, ms, "pool", 6 if t == "verifier" else 4) for t, ms in pool for r in range(3)]
    points += [point(OTHER_CLIENT[t].format("fixed"), r, ms, "fixed", 4) for t, ms in fixed for r in range(3)]
    row = next(g for g in goals(points, {}, ["grpc"]) if g.name == "p99 at half no-op max vs no-op (grpc)")
    assert row.value == 6.0 / 5.0
    assert "; pool client (6 connections to the verifier); fixed client 2.40 (12.00 / 5.00 ms)" in row.detail
