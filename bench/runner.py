"""The one runner under every scenario: the run's options and servers, and its two ways to measure a point.

* :func:`closed` -- maximum throughput, closed loop: wrk at forward-auth (one fixed request, or a
  rotation of pre-built requests), h2load at the gRPC doors when the message is fixed, else the bench's
  own closed loop; the server's CPU (/proc) next to the generator's, so a reader sees which side was
  the limit. Only throughput is taken from closed loops: their latencies hide coordinated omission.
* :func:`open_loop` -- latency at a fixed offered rate from the intended send time (bench/load.py: the C
  generator of bench/openloop.py when it builds, ``--generator python`` for the Python one), with the
  generator's own send lag next to it.

Every point is preceded by the correctness guard (:meth:`Context.guard`): one real check with a
request the load never sends must get the expected answer, or the point is flagged WRONG ANSWERS.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import load, procs, wire
from bench.procs import Servers
from bench.wire import Door, Target


@dataclass
class Context:
    """One scenario's run: where it writes, its options, its servers and warnings."""

    out: Path
    quick: bool
    args: argparse.Namespace  # every option of ``run``; None when not given
    servers: Servers
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    loadavg_start: str = field(default_factory=procs.loadavg)

    def opt(self, name: str, default: Any, quick: Any = None) -> Any:
        """The option as given, else its ``--quick`` value in a quick run, else ``default``."""
        given = getattr(self.args, name, None)
        if given is not None:
            return given
        return quick if self.quick and quick is not None else default

    @property
    def work(self) -> Path:
        """Scratch files (payloads, wrk scripts)."""
        (self.out / "work").mkdir(parents=True, exist_ok=True)
        return self.out / "work"

    def guard(self, target: Target, door: Door, token: str, expect_allow: bool, **headers: str) -> bool:
        """Refuse to time a server that answers wrongly: one real check, compared with ``expect_allow``."""
        label = f"{target.name}/{door.value}"
        try:
            allowed = procs.check_once(target, door, token, headers or None)
        except Exception as exc:
            self.warnings.append(f"{label}: probe failed: {exc!r}")
            return False
        if allowed != expect_allow:
            self.warnings.append(f"{label}: WRONG ANSWER (allowed={allowed}, expected {expect_allow})")
        return allowed == expect_allow

    def header(self, what: str) -> str:
        """The first line of a suite's results: what ran, and how busy the machine was."""
        return (
            f"{what}. Load average (1/5/15 min) at start {self.loadavg_start}, at end {procs.loadavg()}; "
            f"took {time.time() - self.started:.0f} s."
        )

    def record(self, point: dict[str, Any]) -> dict[str, Any]:
        """Append ``point`` to points.jsonl as it is measured (a crash keeps what was measured)."""
        with (self.out / "points.jsonl").open("a") as fh:
            fh.write(json.dumps(point, default=str) + "\n")
        return point


def closed(
    ctx: Context,
    target: Target,
    door: Door,
    tokens: Sequence[str],
    *,
    duration_s: float,
    warmup_s: float = 0.5,
    headers: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Closed-loop maximum throughput of ``target`` at ``door`` sending ``tokens`` (or, at forward-auth,
    requests with ``headers``) in turn; with server and client CPU."""
    cpu0 = procs.cpu_seconds(target.pids)
    if door is Door.HTTP:
        hs = list(headers) or [wire.http_headers(t) for t in tokens]
        url = f"http://{target.http_addr}{wire.FORWARD_AUTH_PATH}"
        if len(hs) == 1:
            r = load.wrk(url, workdir=ctx.work, duration_s=duration_s, headers=hs[0])
        else:
            rotation = [wire.http_request(h, target.http_addr) for h in hs]
            r = load.wrk(url, workdir=ctx.work, duration_s=duration_s, rotation=rotation)
        server_cpu = procs.cpu_seconds(target.pids) - cpu0
        reused = max(0, r.requests - len(hs)) if len(hs) > 1 else 0
        p = dict(tool=r.tool, requests=r.requests, errors=r.errors, refusals=r.refusals, seconds=r.seconds)
        p.update(client_cpu_s=r.cpu_s, reused=reused)
    elif len(tokens) == 1:
        body = wire.grpc_payload(door, tokens[0])
        r = load.h2load(door, target.grpc_addr, body, workdir=ctx.work, duration_s=duration_s, warmup_s=warmup_s)
        # h2load's warm-up requests also cost the server CPU; scale by the measured share.
        server_cpu = (procs.cpu_seconds(target.pids) - cpu0) * duration_s / (duration_s + warmup_s)
        p = dict(tool=r.tool, requests=r.requests, errors=r.errors, refusals=None, seconds=r.seconds)
        p.update(client_cpu_s=r.cpu_s, reused=0)
    else:
        payloads = [wire.payload(door, t, target.addr(door)) for t in tokens]
        lr, window = _own(ctx, target, door, payloads, "closed", 0, duration_s=duration_s, warmup_s=warmup_s)
        server_cpu = window["cpu"]
        p = dict(tool="bench.load", requests=lr.completed, errors=lr.errors, refusals=lr.denied, seconds=lr.window_s)
        p.update(client_cpu_s=lr.cpu_s, reused=lr.reused_payloads)
    p.update(
        mode="closed",
        door=door.value,
        target=target.name,
        pool=len(headers) or len(tokens),
        throughput=p["requests"] / p["seconds"] if p["seconds"] else 0.0,
        server_cpu_s=server_cpu,
        cpu_per_check_us=server_cpu / p["requests"] * 1e6 if p["requests"] else None,
        loadavg=procs.loadavg(),
    )
    return p


def _own(
    ctx: Context,
    target: Target,
    door: Door,
    payloads: Sequence[bytes],
    mode: str,
    rate: float,
    *,
    duration_s: float,
    warmup_s: float,
    connections: int = 16,
    sample: Callable[[], dict[str, float]] | None = None,
    generator: str | None = None,
    pool_max: int = 0,
) -> tuple[load.LoadResult, dict[str, float]]:
    """The bench's own generator; the server's CPU (and ``sample()``) over the measured window."""
    payload_file = ctx.work / f"payloads-{secrets.token_hex(4)}.bin"
    load.write_payloads(payload_file, payloads)
    samples, on_window = load.sample_at_edges(lambda: {"cpu": procs.cpu_seconds(target.pids), **(sample or dict)()})
    spec = load.LoadSpec(
        door=door.value,
        addr=target.addr(door),
        mode=mode,
        payload_file=str(payload_file),
        duration_s=duration_s,
        warmup_s=warmup_s,
        rate=rate,
        connections=connections,
        generator=generator or ctx.opt("generator", "auto"),
        pool_max=pool_max,
    )
    try:
        result = load.run(spec, on_window=on_window)
    finally:
        payload_file.unlink()
    return result, {k: samples[1][k] - samples[0][k] for k in samples[0]}


# gRPC open loops (C generator): GRPC_CONNECTIONS connections, and the client model. "pool" (default), as
# Envoy's HTTP/2 connection pool and the Kong Python plugin: another connection when every one's streams
# (the peer's SETTINGS_MAX_CONCURRENT_STREAMS) are in use, up to GRPC_POOL_MAX. "fixed": the connections
# only, the rest queued at the client, as one grpc C-core channel per connection. The same for a server
# without a stream bound (the no-op: 100 each here), which never fills them at the loads measured.
GRPC_CONNECTIONS = 4
GRPC_POOL_MAX = 64
GRPC_CLIENTS = ("pool", "fixed")


def open_loop(
    ctx: Context,
    target: Target,
    door: Door,
    payloads: Sequence[bytes],
    rate: float,
    *,
    duration_s: float,
    warmup_s: float = 0.5,
    connections: int | None = None,
    sample: Callable[[], dict[str, float]] | None = None,
    generator: str | None = None,
    grpc_client: str | None = None,
) -> dict[str, Any]:
    """Latency of ``target`` at ``rate`` requests/s from the intended send time, sending ``payloads`` in turn
    (by ``generator``: "c", "python" or "auto"; default the run's ``--generator``; at a gRPC door the client
    model ``grpc_client`` of GRPC_CLIENTS, default the run's ``--grpc-client``, else "pool")."""
    # A gRPC channel multiplexes; HTTP/1.1 needs enough connections that each one's share of the
    # schedule (rate / connections) leaves room for the answer.
    conns = connections or (GRPC_CONNECTIONS if door.is_grpc else max(8, min(64, int(rate / 500))))
    client = (grpc_client or ctx.opt("grpc_client", "pool")) if door.is_grpc else ""
    pool_max = max(conns, GRPC_POOL_MAX) if client == "pool" else 0
    lr, window = _own(
        ctx,
        target,
        door,
        payloads,
        "open",
        rate,
        connections=conns,
        duration_s=duration_s,
        warmup_s=warmup_s,
        sample=sample,
        generator=generator,
        pool_max=pool_max,
    )
    server_cpu, j = window.pop("cpu"), lr.to_json()
    if "unavailable" in lr.tool and (note := f"open loop ran in {lr.tool}") not in ctx.warnings:
        ctx.warnings.append(note)
    return dict(
        mode="open",
        door=door.value,
        target=target.name,
        offered_rate=rate,
        throughput=lr.throughput,
        requests=lr.completed,
        allowed=lr.allowed,
        refusals=lr.denied,
        errors=lr.errors,
        dropped=lr.dropped,
        reused=lr.reused_payloads,
        seconds=lr.window_s,
        client_cpu_s=lr.cpu_s,
        server_cpu_s=server_cpu,
        cpu_per_check_us=server_cpu / lr.completed * 1e6 if lr.completed else None,
        tool=lr.tool,
        client=client if lr.tool.startswith("openloop") else "",  # the Python loop has one model
        connections_opened=lr.connections_opened,
        latency=j["latency"],
        service=j["service"],
        lag=j["lag"],
        latency_hdr=j["latency_hdr"],
        loadavg=procs.loadavg(),
        window=window,
    )
