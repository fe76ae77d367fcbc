"""``python -m bench run --scenario workers [--quick] [--workers 1,2]``: throughput against worker processes.

For each N, a verifier with ``workers: N`` (N forked processes on SO_REUSEPORT listeners) and the no-op
with ``--workers N`` are measured alternately, closed loop, with one repeated valid ES256 token: forward-auth
with wrk, the gRPC door and Envoy's ext_authz with h2load. The generator runs on the same cores, so each
row shows the server's and the generator's CPU in cores: when their sum reaches the machine's core count,
the curve is bounded by the machine, not by the server. "machine busy" is the whole machine's non-idle
share over the point (/proc/stat), other sessions' work included.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench import idp, procs, report, runner
from bench.runner import Context
from bench.wire import Door, Target


def run(ctx: Context) -> None:
    """Every (workers, door, target) point; writes results and throughput-vs-workers.png."""
    counts = [int(n) for n in ctx.opt("workers", "1,2").split(",")]
    duration = ctx.opt("duration", 5.0, 2.0)
    issuer = idp.Issuer(ctx.servers)
    points: list[dict[str, Any]] = []
    for k, n in enumerate(counts):
        targets: dict[str, Target] = {
            "verifier": ctx.servers.start_verifier(issuer.url, name=f"verifier x{n}", workers=n),
            "noop": ctx.servers.start_baseline("noop", workers=n),
        }
        time.sleep(0.5)  # let every worker finish binding
        for door in Door:
            for kind in ("verifier", "noop") if k % 2 == 0 else ("noop", "verifier"):
                target = targets[kind]
                correct = ctx.guard(target, door, issuer.cached_token, True)
                busy0, idle0 = procs.machine_busy()
                p = runner.closed(ctx, target, door, [issuer.cached_token], duration_s=duration)
                busy1, idle1 = procs.machine_busy()
                busy = (busy1 - busy0) / max(1e-9, (busy1 - busy0) + (idle1 - idle0))
                points.append(ctx.record(p | dict(kind=kind, workers=n, machine_busy=busy, correct=correct)))
        for t in targets.values():
            ctx.servers.stop(t)
    cores = os.cpu_count() or 1
    rows = [
        [
            p["door"],
            p["kind"],
            p["workers"],
            report.fmt(p["throughput"]),
            report.cores(p["server_cpu_s"], p["seconds"]),
            f"{report.cores(p['client_cpu_s'], p['seconds'])} ({p['tool']})",
            f"{report.cores(p['server_cpu_s'] + p['client_cpu_s'], p['seconds'])} / {cores}",
            f"{p['machine_busy']:.0%}",
            report.fmt(p["cpu_per_check_us"]),
            p["errors"],
            "yes" if p["correct"] else "NO",
            p["loadavg"],
        ]
        for p in points
    ]
    headers = ["door", "target", "workers", "checks/s", "server CPU (cores)", "generator CPU (cores)"]
    headers += ["server + generator / cores", "machine busy", "server CPU/check us", "errors", "correct", "load avg"]
    scaling = []
    for door in Door:
        for kind in ("verifier", "noop"):
            tp = {p["workers"]: p["throughput"] for p in points if p["door"] == door.value and p["kind"] == kind}
            if len(counts) > 1 and tp.get(counts[0]):
                scaling.append(
                    [door.value, kind, f"{tp[counts[-1]] / tp[counts[0]]:.2f}x ({counts[0]} -> {counts[-1]})"]
                )
    panels = [
        report.Panel(
            title=f"{door.value}: throughput vs worker processes",
            xlabel="worker processes",
            ylabel="checks/s (closed loop, jwt-cached)",
            lines=[
                (
                    kind,
                    counts,
                    [p["throughput"] for p in points if p["door"] == door.value and p["kind"] == kind],
                    style,
                )
                for kind, style in (("verifier", "-"), ("noop", "--"))
            ],
        )
        for door in Door
    ]
    report.plot(ctx.out / "throughput-vs-workers.png", panels)
    what = f"Closed loop, jwt-cached, {duration:g} s per point; verifier `workers: N` vs the no-op with N workers"
    md = [ctx.header(what), "", report.table(headers, rows, left=2)]
    md += ["", report.table(["door", "target", "throughput ratio"], scaling, left=2)] if scaling else []
    md += ["", "![throughput vs worker processes](throughput-vs-workers.png)"]
    md += ["", *[f"- warning: {w}" for w in ctx.warnings]]
    report.write(
        ctx.out,
        "\n".join(md) + "\n",
        dict(workers=counts, duration_s=duration, cores=cores, points=points, warnings=ctx.warnings),
    )
