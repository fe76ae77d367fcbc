"""Load generation: the bench's own open/closed loop, and the C generators wrk and h2load.

**Open loop** (latency) follows wrk2's model: every request has an *intended* send time on a fixed
schedule (rate / connections per HTTP/1.1 keep-alive connection; one global schedule for gRPC, whose
streams multiplex). Latency is measured from the intended time, so when the server stalls, every
request that should have been sent during the stall is charged for it: coordinated omission is not
hidden. Requests not completed before the drain deadline are counted as ``dropped`` and recorded at
the deadline (a lower bound). The *send lag* (actual - intended) shows the generator's own share.
**Closed loop** keeps ``concurrency`` requests in flight (maximum throughput where the C tools cannot
vary the request). The generator is ``python -m bench.load SPEC``, a process of its own: it prints ``ready``, waits for
``go <perf_counter start>``, runs and prints one JSON line with its HdrHistograms encoded.

The open loop runs in bench/openloop.py's C generator (bench/c/openloop.c) when it builds, whose own
send lag is microseconds where this Python one's is 0.1-40 ms on a busy machine; ``generator="python"``
(or a machine without gcc / libnghttp2-dev) keeps the Python one. Either way the result is a
:class:`LoadResult` whose ``tool`` says which ran.

**wrk** (forward-auth) and **h2load** (gRPC) give closed-loop maximum throughput only (their latencies
hide coordinated omission). They must cost less than the server they measure: one fixed request is
wrk's static request (no Lua per request); a rotation is pre-built raw requests that a two-line Lua
``request()`` hands out in turn. Every result carries the generator's own CPU (rusage of the reaped
tool, ``os.times`` of the bench's processes), shown next to the server's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from bench import openloop, procs, wire
from bench.wire import Door

DRAIN_S = 2.0  # after the schedule ends, how long late requests may still complete
PERCENTILES = (50.0, 90.0, 99.0, 99.9, 100.0)


def new_histogram() -> HdrHistogram:
    """Microseconds up to 2 minutes (slower is a hang, not a latency), 3 significant digits."""
    return HdrHistogram(1, 120_000_000, 3)


def summarize(hist: HdrHistogram) -> dict[str, float]:
    """Percentiles in milliseconds."""
    n = hist.get_total_count()
    out = {f"p{p:g}": hist.get_value_at_percentile(p) / 1000 if n else float("nan") for p in PERCENTILES}
    return out | {"mean": hist.get_mean_value() / 1000 if n else float("nan"), "count": n}


@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    """One point of the bench's own generator."""

    door: str
    addr: str
    mode: str  # "open" or "closed"
    payload_file: str  # length-prefixed records (see write_payloads)
    duration_s: float
    warmup_s: float = 0.5
    rate: float = 0.0  # open loop: requests per second
    connections: int = 8
    concurrency: int = 32  # closed loop: requests in flight
    generator: str = "auto"  # open loop: "c" (bench/openloop.py), "python" (this module), "auto" (C if it builds)
    pool_max: int = 0  # gRPC open loop, C generator: grow the connections up to this (Envoy's pool); 0 fixed


@dataclass(kw_only=True)
class LoadResult:
    """What one point measured."""

    completed: int = 0
    allowed: int = 0
    denied: int = 0
    errors: int = 0
    dropped: int = 0
    reused_payloads: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0  # the generator's own CPU over the whole run
    wall_s: float = 0.0
    latency: HdrHistogram = field(default_factory=new_histogram)  # from intended send (open) / send (closed)
    service: HdrHistogram = field(default_factory=new_histogram)  # from actual send
    lag: HdrHistogram = field(default_factory=new_histogram)  # the generator's own: actual - intended send
    tool: str = "bench.load"  # which generator ran (see run)
    connections_opened: int = 0  # the C generator's connections at the end (pool mode: grown from the spec's)

    @property
    def throughput(self) -> float:
        """Completed requests per second over the measured window."""
        return self.completed / self.window_s if self.window_s else 0.0

    def to_json(self) -> dict[str, Any]:
        """Raw numbers, percentiles and the encoded histograms."""
        out = {k: v for k, v in asdict(self).items() if not isinstance(v, HdrHistogram)}
        out["throughput"] = self.throughput
        for name in ("latency", "service", "lag"):
            out[name] = summarize(getattr(self, name))
            out[name + "_hdr"] = getattr(self, name).encode().decode()
        return out


def write_payloads(path: Path, payloads: Sequence[bytes]) -> None:
    """Store request payloads as 4-byte big-endian length + bytes records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(struct.pack(">I", len(p)) + p for p in payloads))


def read_payloads(path: Path) -> list[bytes]:
    """What ``write_payloads`` wrote."""
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


class _Payloads:
    """Hands out payloads in order, each once; wraps around (and counts it) when the pool runs dry."""

    def __init__(self, payloads: list[bytes]) -> None:
        self._payloads, self._i, self.reused = payloads or [b""], 0, 0

    def next(self) -> bytes:
        self.reused += self._i >= len(self._payloads)
        self._i += 1
        return self._payloads[(self._i - 1) % len(self._payloads)]


class _Recorder:
    def __init__(self, measure_from: float, measure_to: float) -> None:
        self.result = LoadResult(window_s=measure_to - measure_from)
        self.window = (measure_from, measure_to)

    def record(self, outcome: str, intended: float, sent: float, done: float) -> None:
        # A request belongs to the window its intended send time falls in (the schedule is the truth).
        if not self.window[0] <= intended < self.window[1]:
            return
        r = self.result
        if outcome == "error":
            r.errors += 1
            return
        r.allowed += outcome == "allow"
        r.denied += outcome == "deny"
        r.completed += 1
        r.latency.record_value(max(1, int((done - intended) * 1e6)))
        r.service.record_value(max(1, int((done - sent) * 1e6)))
        r.lag.record_value(max(1, int((sent - intended) * 1e6)))

    def drop(self, intended: float, deadline: float) -> None:
        if self.window[0] <= intended < self.window[1]:
            self.result.dropped += 1
            self.result.latency.record_value(max(1, int((deadline - intended) * 1e6)))


# --- HTTP/1.1 ---------------------------------------------------------------------------------------


class _HttpConn(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[int] | None = None
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
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

    async def outcome(self, data: bytes) -> str:
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            status = await self._waiter
        except (ConnectionError, OSError):
            return "error"
        return "allow" if status == 200 else "deny" if status in (401, 403) else "error"


async def _run_http(spec: LoadSpec, payloads: _Payloads, rec: _Recorder, start: float, end: float) -> None:
    host, _, port = spec.addr.rpartition(":")
    n = spec.connections if spec.mode == "open" else spec.concurrency
    conns = [(await asyncio.get_running_loop().create_connection(_HttpConn, host, int(port)))[1] for _ in range(n)]
    deadline = end + DRAIN_S

    async def open_conn(conn: _HttpConn, first: float, interval: float) -> None:
        i = 0
        while (intended := first + i * interval) < end:
            i += 1
            if time.perf_counter() >= deadline:  # the rest of this connection's schedule is charged until then
                rec.drop(intended, deadline)
                continue
            await _sleep_until(intended)
            sent = time.perf_counter()
            outcome = await conn.outcome(payloads.next())
            rec.record(outcome, intended, sent, time.perf_counter())
            if outcome == "error" and conn.transport.is_closing():
                return

    async def closed_conn(conn: _HttpConn) -> None:
        while (sent := time.perf_counter()) < end:
            outcome = await conn.outcome(payloads.next())
            rec.record(outcome, sent, sent, time.perf_counter())
            if outcome == "error" and conn.transport.is_closing():
                return

    await _sleep_until(start)
    if spec.mode == "open":
        interval = n / spec.rate
        # Half a slot into each: no intended time falls on the window's edges, where float rounding alone
        # would decide whether a send counts (0.3 s at 100/s came out as 29, 30 or 31 sends).
        slot = 1 / spec.rate
        await asyncio.gather(*(open_conn(c, start + (k + 0.5) * slot, interval) for k, c in enumerate(conns)))
    else:
        await asyncio.gather(*(closed_conn(c) for c in conns))
    for c in conns:
        c.transport.close()


# --- gRPC (HTTP/2) ----------------------------------------------------------------------------------


async def _run_grpc(spec: LoadSpec, payloads: _Payloads, rec: _Recorder, start: float, end: float) -> None:
    import grpc

    door = Door(spec.door)
    # One channel per connection; a local subchannel pool keeps them from sharing one TCP connection.
    opts = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(spec.addr, options=opts) for _ in range(max(1, spec.connections))]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 10)
    calls = [ch.unary_unary(door.grpc_method) for ch in channels]  # bytes in, bytes out

    async def one(k: int, intended: float) -> None:
        sent = time.perf_counter()
        try:
            resp = await calls[k % len(calls)](payloads.next(), timeout=end + DRAIN_S - sent + 1)
            outcome = "allow" if wire.allowed(door, resp) else "deny"
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
        interval, i = 1.0 / spec.rate, 0
        first = start + 0.5 * interval  # half a slot in, as the HTTP loop: no send on the window's edges
        pending: dict[asyncio.Task[None], float] = {}
        while first + i * interval < end:
            await _sleep_until(first + i * interval)
            now = time.perf_counter()
            # Everything due is issued now, charged from its own intended time.
            while (intended := first + i * interval) <= now and intended < end:
                task = asyncio.ensure_future(one(i, intended))
                pending[task] = intended
                task.add_done_callback(lambda t: pending.pop(t, None))
                i += 1
        if pending:
            _, not_done = await asyncio.wait(set(pending), timeout=DRAIN_S)
            for task in not_done:
                rec.drop(pending[task], time.perf_counter())
                task.cancel()
    for ch in channels:
        await ch.close()


async def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def _child_main(spec_json: str) -> None:
    import uvloop

    uvloop.install()
    spec = LoadSpec(**json.loads(spec_json))
    payloads = _Payloads(read_payloads(Path(spec.payload_file)))
    print("ready", flush=True)
    start = float(sys.stdin.readline().split()[1])
    end = start + spec.warmup_s + spec.duration_s
    rec = _Recorder(start + spec.warmup_s, end)
    cpu0 = os.times()
    runner = _run_http if spec.door == Door.HTTP.value else _run_grpc
    asyncio.run(runner(spec, payloads, rec, start, end))
    cpu1 = os.times()
    rec.result.cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    rec.result.wall_s = time.perf_counter() - start
    rec.result.reused_payloads = payloads.reused
    print(json.dumps(rec.result.to_json()), flush=True)


def run(spec: LoadSpec, *, on_window: Callable[[float, float], None] | None = None) -> LoadResult:
    """Run ``spec`` in a process of its own; ``on_window(start, end)`` is called with the measured
    window's edges (perf_counter clock) so the caller can sample the server meanwhile. An open loop runs
    in the C generator unless ``spec.generator`` is "python" or it cannot be built ("c" then fails)."""
    exe = openloop.binary() if spec.mode == "open" and spec.generator != "python" else None
    if exe is not None:
        return _run_c(spec, exe, on_window)
    if spec.mode == "open" and spec.generator == "c":
        raise RuntimeError(f"the C open-loop generator cannot be built: {openloop.unavailable()}")
    text = _handshake([sys.executable, "-m", "bench.load", json.dumps(asdict(spec))], spec, on_window)
    part = json.loads(text.strip().splitlines()[-1])
    out = LoadResult(**{k: part[k] for k in ("completed", "allowed", "denied", "errors", "dropped", "reused_payloads")})
    out.cpu_s, out.wall_s, out.window_s = part["cpu_s"], part["wall_s"], part["window_s"]
    for name in ("latency", "service", "lag"):
        setattr(out, name, HdrHistogram.decode(part[name + "_hdr"].encode()))
    if spec.mode == "open" and spec.generator == "auto":
        out.tool = f"bench.load (C generator unavailable: {openloop.unavailable()})"
    return out


def _handshake(cmd: list[str], spec: LoadSpec, on_window: Callable[[float, float], None] | None) -> str:
    """Start a generator that prints ``ready``, tell it ``go <perf_counter start>``, return its output."""
    proc = subprocess.Popen(procs.placed("generator", cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"load generator failed to start: {cmd[0]}")
    start = time.perf_counter() + 0.3  # time to connect
    proc.stdin.write(f"go {start!r}\n")
    proc.stdin.flush()
    if on_window is not None:
        on_window(start + spec.warmup_s, start + spec.warmup_s + spec.duration_s)
    text = proc.communicate()[0]
    if proc.returncode != 0 or not text.strip():
        raise RuntimeError(f"load generator {cmd[0]} exited with {proc.returncode}")
    return text


def _run_c(spec: LoadSpec, exe: Path, on_window: Callable[[float, float], None] | None) -> LoadResult:
    """``spec`` by the C generator (bench/openloop.py): one process, one schedule over the connections."""
    door = Door(spec.door)
    args = openloop.argv(
        grpc_method=door.grpc_method if door.is_grpc else None,
        addr=spec.addr,
        payload_file=spec.payload_file,
        rate=spec.rate,
        connections=spec.connections,
        duration_s=spec.duration_s,
        warmup_s=spec.warmup_s,
        drain_s=DRAIN_S,
        pool_max=spec.pool_max,
    )
    part = json.loads(_handshake([str(exe), *args, "--go-stdin"], spec, on_window).strip().splitlines()[-1])
    out = LoadResult(**openloop.outcome(part, door.is_grpc), dropped=part["dropped"], tool="openloop (C)")
    out.completed = out.allowed + out.denied
    out.reused_payloads, out.cpu_s = part["reused_payloads"], part["cpu_s"]
    out.wall_s, out.window_s = part["wall_s"], part["window_s"]
    out.connections_opened = part.get("connections_opened", spec.connections)
    for name in ("latency", "service", "lag"):
        setattr(out, name, openloop.histogram(part[name]["buckets"]))
    return out


def sample_at_edges(sample: Callable[[], Any]) -> tuple[list[Any], Callable[[float, float], None]]:
    """An ``on_window`` that calls ``sample`` at the window's start and end; the samples land in the list."""
    samples: list[Any] = []

    def on_window(start: float, end: float) -> None:
        for t in (start, end):
            time.sleep(max(0.0, t - time.perf_counter()))
            samples.append(sample())

    return samples, on_window


# --- the C generators -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ToolResult:
    """Closed-loop maximum throughput from a C generator."""

    tool: str
    requests: int
    errors: int  # transport/protocol errors
    refusals: int  # non-2xx answers (HTTP); h2load cannot see gRPC statuses
    seconds: float
    cpu_s: float  # the generator's own CPU
    p50_us: float = float("nan")
    p99_us: float = float("nan")
    max_us: float = float("nan")
    timeouts: int = 0  # wrk: requests unanswered within its --timeout (counted in errors too)

    @property
    def throughput(self) -> float:
        """Answers per second, refusals included (the garbage flood is all refusals)."""
        return self.requests / self.seconds if self.seconds else 0.0


def _reaped(cmd: list[str], timeout: float) -> tuple[str, float]:
    """Run ``cmd``; its output and its CPU seconds (the reaped child's rusage)."""
    t0 = os.times()
    proc = subprocess.Popen(procs.placed("generator", cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        out = proc.communicate()[0]
    t1 = os.times()
    return out, (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)


def _lua_string(s: str) -> str:
    return "[==[" + s + "]==]"


WRK_ROTATION = """
local path, nthreads, counter, reqs, n, i = %s, %d, 0, {}, 0, 0
function setup(thread) thread:set("tid", counter); counter = counter + 1 end
function init(args)
  local f = io.open(path, "rb"); local data = f:read("*a"); f:close()
  for r in data:gmatch("([^%%z]+)") do n = n + 1; reqs[n] = r end
  i = tid
end
function request() i = i + nthreads; return reqs[i %% n + 1] end
"""

WRK_DONE = r"""
function done(summary, latency, requests)
  io.write(string.format('BENCH_JSON {"requests": %d, "duration_us": %d, "status_errors": %d, '
    .. '"socket_errors": %d, "p50_us": %d, "p99_us": %d, '
    .. '"max_us": %d, "timeouts": %d}\n', summary.requests, summary.duration,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout, latency:percentile(50), latency:percentile(99), latency.max, summary.errors.timeout))
end
"""


def wrk(
    url: str,
    *,
    workdir: Path,
    duration_s: float,
    headers: dict[str, str] | None = None,
    rotation: Sequence[bytes] = (),
    lua: str = "",
    connections: int = 16,
    threads: int = 1,
    timeout_s: float = 2.0,
) -> ToolResult:
    """Closed-loop HTTP/1.1 GETs of ``url`` by wrk: one fixed request with ``headers`` (wrk's static
    request: no Lua per request), or ``rotation`` (raw requests, each handed out in turn, wrapping
    around: the caller compares ``requests`` with the pool), or ``lua`` (a script's own ``request()``).
    ``timeout_s``: wrk's ``--timeout``, past which an unanswered request counts in ``timeouts`` (and ``errors``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if rotation:
        requests_file = workdir / f"wrk-requests-{os.getpid()}.bin"
        requests_file.write_bytes(b"\0".join(rotation))
        lua = WRK_ROTATION % (_lua_string(str(requests_file)), threads)
    for name, value in (headers or {}).items():
        lua += f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}\n"
    script = workdir / f"wrk-{os.getpid()}.lua"
    script.write_text(lua + WRK_DONE)
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration_s))}s", "-s", str(script)]
    cmd += ["--timeout", f"{timeout_s:g}s"]
    out, cpu = _reaped([*cmd, url], timeout=duration_s + 60)
    m = re.search(r"BENCH_JSON (\{.*\})", out)
    if not m:
        raise RuntimeError(f"wrk output not understood:\n{out}")
    j = json.loads(m.group(1))
    return ToolResult(
        tool="wrk" if not rotation else f"wrk ({len(rotation):,} requests)",
        requests=j["requests"],
        errors=j["socket_errors"],
        refusals=j["status_errors"],
        seconds=j["duration_us"] / 1e6,
        cpu_s=cpu,
        p50_us=j["p50_us"],
        p99_us=j["p99_us"],
        max_us=j["max_us"],
        timeouts=j["timeouts"],
    )


def h2load(
    door: Door,
    addr: str,
    body: bytes,
    *,
    workdir: Path,
    duration_s: float,
    warmup_s: float,
    clients: int = 8,
    streams: int = 16,
    headers: Sequence[str] = (),
    log: Path | None = None,
) -> ToolResult:
    """Closed-loop gRPC unary calls at ``door`` with one fixed request message (``clients`` x ``streams``);
    ``headers`` such as ``grpc-timeout: 100m``; ``log``: h2load's per-request log (start, status, microseconds)."""
    body_file = workdir / f"h2load-{door.value}.bin"
    body_file.parent.mkdir(parents=True, exist_ok=True)
    body_file.write_bytes(wire.grpc_frame(body))
    cmd = ["h2load", "-c", str(clients), "-m", str(streams), "-t", "1", "-D", f"{duration_s:g}s"]
    cmd += ["--warm-up-time", f"{max(1, round(warmup_s * 1000))}ms", "-d", str(body_file)]
    for header in ("content-type: application/grpc", "te: trailers", *headers):
        cmd += ["-H", header]
    cmd += ["--log-file", str(log)] if log is not None else []
    cmd += [f"http://{addr}{door.grpc_method}"]
    out, cpu = _reaped(cmd, timeout=duration_s + warmup_s + 30)
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not m:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    ok, failed, errored = (int(g) for g in m.groups())
    # With -D, h2load counts only requests started after the warm-up.
    return ToolResult(tool="h2load", requests=ok, errors=failed + errored, refusals=0, seconds=duration_s, cpu_s=cpu)


if __name__ == "__main__":
    _child_main(sys.argv[1])
