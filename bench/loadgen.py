"""The bench's own load generator: open-loop (fixed arrival rate) and closed-loop, over several processes.

Open loop follows wrk2's model: every request has an *intended* send time on a fixed schedule
(rate / connections per connection for HTTP/1.1 keep-alive, one global schedule for HTTP/2 where
streams multiplex). Latency is measured from the intended time, so when the server stalls, every
request that should have been sent during the stall is charged for it: coordinated omission is not
hidden. Requests whose intended time falls inside the run but that could not be completed before the
drain deadline are counted as ``dropped`` and recorded at the deadline (a lower bound), never
silently forgotten. The histogram of *send lag* (actual - intended) shows the generator's own
share: an event loop wakes up to ~1 ms late, and a saturated client shows up here and in ``cpu_s``.

Closed loop keeps ``concurrency`` requests in flight and measures from the actual send: it finds the
maximum throughput (used where h2load/wrk cannot vary the token per request).

Each process is ``python -m bench.loadgen``: it reads a JSON spec from argv, prints ``ready``, waits for
``go <monotonic start>`` on stdin, runs, and prints one JSON result line. :func:`run` fans a spec out
over processes and merges their HdrHistograms.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from bench.wire import Door

HIST_MAX_US = 120_000_000  # 2 minutes: anything slower is a hang, not a latency
HIST_DIGITS = 3
DRAIN_S = 2.0  # after the schedule ends, how long late requests may still complete


def new_histogram() -> HdrHistogram:
    """A microsecond histogram with 3 significant digits."""
    return HdrHistogram(1, HIST_MAX_US, HIST_DIGITS)


@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    """One load-generation point."""

    door: str
    addr: str
    mode: str  # "open" or "closed"
    payload_file: str  # length-prefixed records (see write_payloads)
    duration_s: float
    warmup_s: float = 0.5
    rate: float = 0.0  # open loop: requests per second, total over all processes
    connections: int = 8  # total over all processes
    concurrency: int = 32  # closed loop: requests in flight, total over all processes
    processes: int = 1
    # set per process by run():
    index: int = 0


@dataclass(kw_only=True)
class LoadResult:
    """What one point measured (merged over processes)."""

    completed: int = 0
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    dropped: int = 0
    reused_payloads: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0  # the generator's own CPU over the whole run, all processes
    wall_s: float = 0.0
    latency: HdrHistogram = field(default_factory=new_histogram)  # from intended send (open) / send (closed)
    service: HdrHistogram = field(default_factory=new_histogram)  # from actual send
    lag: HdrHistogram = field(default_factory=new_histogram)  # actual - intended send

    @property
    def throughput(self) -> float:
        """Completed requests per second over the measured window."""
        return self.completed / self.window_s if self.window_s else 0.0

    def to_json(self) -> dict[str, Any]:
        """Raw numbers and the encoded histograms."""
        out = {k: v for k, v in asdict(self).items() if not isinstance(v, HdrHistogram)}
        out["throughput"] = self.throughput
        for name in ("latency", "service", "lag"):
            out[name] = summarize(getattr(self, name))
            out[name + "_hdr"] = getattr(self, name).encode().decode()
        return out


PERCENTILES = (50.0, 90.0, 99.0, 99.9, 100.0)


def summarize(hist: HdrHistogram) -> dict[str, float]:
    """Percentiles in milliseconds."""
    if hist.get_total_count() == 0:
        return {f"p{p:g}": float("nan") for p in PERCENTILES} | {"mean": float("nan"), "count": 0}
    out = {f"p{p:g}": hist.get_value_at_percentile(p) / 1000 for p in PERCENTILES}
    out["mean"] = hist.get_mean_value() / 1000
    out["count"] = hist.get_total_count()
    return out


def write_payloads(path: Path, payloads: list[bytes]) -> None:
    """Store request payloads as 4-byte big-endian length + bytes records."""
    with path.open("wb") as fh:
        for p in payloads:
            fh.write(struct.pack(">I", len(p)))
            fh.write(p)


def read_payloads(path: Path, index: int, stride: int) -> list[bytes]:
    """Records ``index``, ``index + stride``, ... : each process gets its own share of a token pool."""
    data = path.read_bytes()
    out, pos, i = [], 0, 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        pos += 4
        if i % stride == index:
            out.append(data[pos : pos + n])
        pos += n
        i += 1
    return out


class _Payloads:
    """Hands out payloads in order, each once; wraps around (and counts it) when the pool runs dry."""

    def __init__(self, payloads: list[bytes]) -> None:
        self._payloads = payloads or [b""]
        self._i = 0
        self.reused = 0

    def next(self) -> bytes:
        if self._i >= len(self._payloads):
            self.reused += 1
        p = self._payloads[self._i % len(self._payloads)]
        self._i += 1
        return p


class _Recorder:
    def __init__(self, measure_from: float, measure_to: float) -> None:
        self.result = LoadResult(window_s=measure_to - measure_from)
        self.measure_from = measure_from
        self.measure_to = measure_to

    def record(self, outcome: str, intended: float, sent: float, done: float) -> None:
        # A request belongs to the window its intended send time falls in (open loop: the schedule
        # is the truth; closed loop: intended == sent).
        if not self.measure_from <= intended < self.measure_to:
            return
        r = self.result
        if outcome == "allow":
            r.allowed += 1
        elif outcome == "deny":
            r.denied += 1
        else:
            r.errors += 1
            return
        r.completed += 1
        r.latency.record_value(max(1, int((done - intended) * 1e6)))
        r.service.record_value(max(1, int((done - sent) * 1e6)))
        r.lag.record_value(max(1, int((sent - intended) * 1e6)))

    def drop(self, intended: float, deadline: float) -> None:
        if self.measure_from <= intended < self.measure_to:
            self.result.dropped += 1
            self.result.latency.record_value(max(1, int((deadline - intended) * 1e6)))


# --- HTTP/1.1 -------------------------------------------------------------------------------------


class _HttpConn(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._parser.feed_data(data)

    def on_message_complete(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._parser.get_status_code())

    def connection_lost(self, exc: Exception | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("connection closed"))

    def send(self, data: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._waiter


def _http_outcome(status: int) -> str:
    if status == 200:
        return "allow"
    if status in (401, 403):
        return "deny"
    return "error"


async def _http_open_conn(
    conn: _HttpConn, payloads: _Payloads, rec: _Recorder, first: float, interval: float, end: float, deadline: float
) -> None:
    i = 0
    while True:
        intended = first + i * interval
        if intended >= end:
            return
        now = time.perf_counter()
        if now >= deadline:
            # Everything still on this connection's schedule is charged until the deadline.
            while intended < end:
                rec.drop(intended, deadline)
                i += 1
                intended = first + i * interval
            return
        if now < intended:
            await asyncio.sleep(intended - now)
        sent = time.perf_counter()
        try:
            status = await conn.send(payloads.next())
            outcome = _http_outcome(status)
        except (ConnectionError, OSError):
            outcome = "error"
        rec.record(outcome, intended, sent, time.perf_counter())
        if outcome == "error" and conn.transport is not None and conn.transport.is_closing():
            return
        i += 1


async def _http_closed_conn(conn: _HttpConn, payloads: _Payloads, rec: _Recorder, end: float) -> None:
    while (sent := time.perf_counter()) < end:
        try:
            outcome = _http_outcome(await conn.send(payloads.next()))
        except (ConnectionError, OSError):
            rec.record("error", sent, sent, time.perf_counter())
            return
        rec.record(outcome, sent, sent, time.perf_counter())


async def _run_http(spec: LoadSpec, payloads: _Payloads, rec: _Recorder, start: float, end: float) -> None:
    loop = asyncio.get_running_loop()
    host, _, port = spec.addr.rpartition(":")
    n = spec.connections if spec.mode == "open" else spec.concurrency
    conns = []
    for _ in range(n):
        _, proto = await loop.create_connection(_HttpConn, host, int(port))
        conns.append(proto)
    await _sleep_until(start)
    if spec.mode == "open":
        interval = n / spec.rate
        tasks = [
            _http_open_conn(c, payloads, rec, start + k * interval / n, interval, end, end + DRAIN_S)
            for k, c in enumerate(conns)
        ]
    else:
        tasks = [_http_closed_conn(c, payloads, rec, end) for c in conns]
    await asyncio.gather(*tasks)
    for c in conns:
        if c.transport is not None:
            c.transport.close()


# --- gRPC (HTTP/2) --------------------------------------------------------------------------------


def _grpc_outcome_fn(door: Door) -> Any:
    from bench import wire

    if door is Door.GRPC:
        return lambda resp: "allow" if wire.verifier_allowed(resp) else "deny"
    return lambda resp: "allow" if wire.envoy_allowed(resp) else "deny"


async def _run_grpc(spec: LoadSpec, payloads: _Payloads, rec: _Recorder, start: float, end: float) -> None:
    import grpc

    door = Door(spec.door)
    outcome_of = _grpc_outcome_fn(door)
    # One channel per connection; a local subchannel pool keeps them from sharing one TCP connection.
    channels = [
        grpc.aio.insecure_channel(spec.addr, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, spec.connections))
    ]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 10)
    calls = [ch.unary_unary(door.grpc_method) for ch in channels]  # bytes in, bytes out

    async def one(k: int, intended: float) -> None:
        sent = time.perf_counter()
        try:
            resp = await calls[k % len(calls)](payloads.next(), timeout=end + DRAIN_S - sent + 1)
            outcome = outcome_of(resp)
        except grpc.aio.AioRpcError:
            outcome = "error"
        rec.record(outcome, intended, sent, time.perf_counter())

    await _sleep_until(start)
    if spec.mode == "closed":

        async def worker(k: int) -> None:
            while (t := time.perf_counter()) < end:
                await one(k, t)

        await asyncio.gather(*(worker(k) for k in range(spec.concurrency)))
    else:
        interval = 1.0 / spec.rate
        pending: dict[asyncio.Task[None], float] = {}
        i = 0
        while (intended := start + i * interval) < end:
            now = time.perf_counter()
            if now < intended:
                await asyncio.sleep(intended - now)
                now = time.perf_counter()
            # Everything due is issued now, charged from its own intended time.
            while (intended := start + i * interval) <= now and intended < end:
                task = asyncio.ensure_future(one(i, intended))
                pending[task] = intended
                task.add_done_callback(lambda t: pending.pop(t, None))
                i += 1
        if pending:
            _, not_done = await asyncio.wait(set(pending), timeout=DRAIN_S)
            deadline = time.perf_counter()
            for task in not_done:
                rec.drop(pending[task], deadline)
                task.cancel()
    for ch in channels:
        await ch.close()


async def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def _child_main(spec_json: str) -> None:
    spec = LoadSpec(**json.loads(spec_json))
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    payloads = _Payloads(read_payloads(Path(spec.payload_file), spec.index, spec.processes))
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    start = float(line[1])
    rec = _Recorder(start + spec.warmup_s, start + spec.warmup_s + spec.duration_s)
    end = start + spec.warmup_s + spec.duration_s
    cpu0 = os.times()
    runner = _run_http if spec.door == Door.HTTP.value else _run_grpc
    asyncio.run(runner(spec, payloads, rec, start, end))
    cpu1 = os.times()
    r = rec.result
    r.cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    r.wall_s = time.perf_counter() - start
    r.reused_payloads = payloads.reused
    print(json.dumps(r.to_json()), flush=True)


def merge(parts: list[dict[str, Any]]) -> LoadResult:
    """Merge per-process results: counts add, histograms add, the window is shared."""
    out = LoadResult()
    for p in parts:
        for name in ("completed", "allowed", "denied", "errors", "dropped", "reused_payloads"):
            setattr(out, name, getattr(out, name) + p[name])
        out.cpu_s += p["cpu_s"]
        out.wall_s = max(out.wall_s, p["wall_s"])
        out.window_s = p["window_s"]
        for name in ("latency", "service", "lag"):
            getattr(out, name).add(HdrHistogram.decode(p[name + "_hdr"].encode()))
    return out


def run(spec: LoadSpec, *, on_window: Any = None) -> LoadResult:
    """Run ``spec`` over ``spec.processes`` processes; ``on_window(start, end)`` is called at the
    measured window's start and end (monotonic clock) so the caller can sample server CPU."""
    procs = []
    for k in range(spec.processes):
        part = dict(asdict(spec), index=k)
        part["rate"] = spec.rate / spec.processes
        part["connections"] = max(1, spec.connections // spec.processes)
        part["concurrency"] = max(1, spec.concurrency // spec.processes)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen", json.dumps(part)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("load generator failed to start")
    start = time.perf_counter() + 0.3  # time to connect
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(f"go {start!r}\n")
        p.stdin.flush()
    if on_window is not None:
        on_window(start + spec.warmup_s, start + spec.warmup_s + spec.duration_s)
    parts = []
    for p in procs:
        assert p.stdout is not None
        out = p.stdout.read()
        if p.wait() != 0 or not out.strip():
            raise RuntimeError(f"load generator exited with {p.returncode}")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    return merge(parts)


if __name__ == "__main__":
    _child_main(sys.argv[1])
