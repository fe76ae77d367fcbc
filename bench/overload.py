"""Overload at the gRPC doors (issue #24 goal 4): h2load far past capacity, the HTTP/2 stream bound off and on.

Per door and bound: the capacity (closed loop inside the bound, 4 clients x 8 streams), then the flood
(32 clients x 100 streams, ``grpc-timeout: 100m``; ``--deadline-ms 0``: none, budget 1 s), with

* served: the verifier's own decision counter over the flood (h2load cannot read gRPC statuses);
* answers over the caller's deadline + 100 ms, from h2load's per-request log;
* refused streams (RST_STREAM, h2load's "errored"): the transport's early refusal past the bound;
* RSS before, right after and a few seconds after; a gRPC health check right after.

"1000" is the bound before #24 (grpc.aio queued every accepted call); the other is the shipped default.
"""

from __future__ import annotations

import re
import sys
import time
import urllib.request
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import idp, load, procs, report, wire
from bench.runner import Context
from bench.wire import Door, Target
from verifier.settings import DEFAULT_GRPC_MAX_CONCURRENT_STREAMS

BEFORE = 1000
FLOOD = (32, 100)  # h2load clients x streams: the load
CAPACITY = (4, 8)
DECISION = re.compile(r'verifier_decisions_total\{door="\w+",outcome="(\w+)",reason="(\w+)"\} ([\d.e+]+)')


def _decisions(metrics_addr: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10).read().decode()
    counts: dict[str, float] = {}
    for outcome, reason, value in DECISION.findall(text):
        counts[f"{outcome}/{reason}"] = counts.get(f"{outcome}/{reason}", 0.0) + float(value)
    return counts


def _healthy(target: Target) -> tuple[bool, float]:
    started = time.monotonic()
    with grpc.insecure_channel(target.grpc_addr) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return answer.status == health_pb2.HealthCheckResponse.SERVING, time.monotonic() - started


def point(ctx: Context, issuer: idp.Issuer, door: Door, bound: int, *, deadline_ms: int | None) -> dict[str, Any]:
    """One verifier with ``bound`` streams per connection: its capacity, then the flood."""
    metrics_addr = f"127.0.0.1:{procs.free_port()}"
    target = ctx.servers.start_verifier(
        issuer.url,
        name=f"verifier-{bound}",
        root_yaml=f'metrics: {{listen: "{metrics_addr}"}}\ngrpc_max_concurrent_streams: {bound}\n',
    )
    try:
        body = wire.grpc_payload(door, issuer.cached_token)
        duration = ctx.opt("duration", 5.0, 3.0)

        def h2load(shape: tuple[int, int], **extra: Any) -> load.ToolResult:
            clients, streams = shape
            return load.h2load(
                door,
                target.grpc_addr,
                body,
                workdir=ctx.work,
                duration_s=duration,
                warmup_s=0.5,
                clients=clients,
                streams=streams,
                **extra,
            )

        cap = h2load(CAPACITY)
        time.sleep(1)
        rss0, before = procs.rss_kib(target.pids), _decisions(metrics_addr)
        log = ctx.work / f"h2load-{door.value}-{bound}.log"
        log.unlink(missing_ok=True)
        headers = [f"grpc-timeout: {deadline_ms}m"] if deadline_ms is not None else []
        flood = h2load(FLOOD, headers=headers, log=log)
        healthy, health_s = _healthy(target)
        rss1 = procs.rss_kib(target.pids)
        after = _decisions(metrics_addr)
        time.sleep(3)
        rss2 = procs.rss_kib(target.pids)
    finally:
        ctx.servers.stop(target)
    # h2load's log covers the warm-up too: every answer counts against the budget.
    elapsed_ms = sorted(int(line.split()[2]) / 1000 for line in log.read_text().splitlines() if line.strip())
    budget_ms = (deadline_ms if deadline_ms is not None else 900) + 100
    decided = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    served = sum(v for k, v in decided.items() if k.startswith("allow/"))
    capacity = cap.requests / cap.seconds
    return ctx.record(
        dict(
            door=door.value,
            bound=bound,
            deadline_ms=deadline_ms,
            capacity=capacity,
            served=served,
            served_per_s=served / duration,
            served_share=served / duration / capacity if capacity else None,
            decisions=decided,
            streams=len(elapsed_ms),
            refused_streams=flood.errors,
            max_ms=elapsed_ms[-1] if elapsed_ms else None,
            p99_ms=elapsed_ms[int(len(elapsed_ms) * 0.99)] if elapsed_ms else None,
            over_budget=sum(e > budget_ms for e in elapsed_ms),
            budget_ms=budget_ms,
            rss_before_mb=rss0 / 1024,
            rss_after_mb=rss1 / 1024,
            rss_settled_mb=rss2 / 1024,
            healthy=healthy,
            health_s=health_s,
            loadavg=procs.loadavg(),
        )
    )


def run(ctx: Context) -> None:
    """Both gRPC doors, the bound before #24 and the default, alternated; writes results."""
    doors = [Door(d) for d in ctx.opt("door", None) or ()] or [Door.EXT_AUTHZ, Door.GRPC]
    deadline_ms = ctx.opt("deadline_ms", 100) or None
    issuer = idp.Issuer(ctx.servers)
    points = []
    for rep in range(ctx.opt("reps", 2, 1)):
        for door in doors:
            for bound in (BEFORE, DEFAULT_GRPC_MAX_CONCURRENT_STREAMS):
                p = point(ctx, issuer, door, bound, deadline_ms=deadline_ms)
                print(
                    f"bench: overload {door.value} bound {bound} rep {rep}: served {p['served']:,.0f} "
                    f"({p['served_share']:.0%} of capacity), max {p['max_ms']:.0f} ms",
                    file=sys.stderr,
                )
                points.append(p)
    report.write(ctx.out, markdown(ctx, points), dict(points=points, warnings=ctx.warnings))


def markdown(ctx: Context, points: list[dict[str, Any]]) -> str:
    """The results table."""
    headers = [
        "door",
        "streams/conn",
        "capacity /s",
        "served /s",
        "of capacity",
        "refused streams",
        "p99 ms",
        "max ms",
        "over budget",
        "RSS before/after/+3 s MB",
        "healthy after",
    ]
    rows = [
        [
            p["door"],
            p["bound"],
            report.fmt(p["capacity"]),
            report.fmt(p["served_per_s"]),
            f"{p['served_share']:.0%}",
            f"{p['refused_streams']:,}",
            report.fmt(p["p99_ms"]),
            report.fmt(p["max_ms"]),
            f"{p['over_budget']:,} (> {p['budget_ms']} ms)",
            f"{p['rss_before_mb']:.0f} / {p['rss_after_mb']:.0f} / {p['rss_settled_mb']:.0f}",
            f"{p['healthy']} ({p['health_s'] * 1000:.0f} ms)",
        ]
        for p in points
    ]
    return (
        "\n\n".join(
            [
                "# Overload at the gRPC doors",
                ctx.header(f"h2load -c {FLOOD[0]} -m {FLOOD[1]}, capacity at -c {CAPACITY[0]} -m {CAPACITY[1]}"),
                report.table(headers, rows),
                *(f"- {w}" for w in ctx.warnings),
            ]
        )
        + "\n"
    )
