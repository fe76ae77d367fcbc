"""``python -m bench run --scenario generators``: the open-loop generators' own send lag, C against Python.

An open-loop row is a server figure only when the generator keeps its schedule much better than the
latency it reports. This suite measures both generators in the same run against the same no-op server
(bench/baselines.py): per door, the no-op's closed-loop maximum, then at each fraction of it the C
generator (bench/c/openloop.c) and bench/load.py's Python loop, alternated within each repetition. Both
measure latency from the intended send time; their send lag (actual send - the moment the request could
have been sent) is the generator's own share. Reported: medians over repetitions of p50/p99 latency and
p50/p99 lag, and the generator's CPU.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from bench import procs, report, runner, wire
from bench.report import fmt, median
from bench.runner import Context
from bench.wire import Door

GENERATORS = ("c", "python")
FRACTIONS = (0.25, 0.5)


def run(ctx: Context) -> None:
    """Each door's no-op maximum, then both generators at FRACTIONS of it; results.md/json."""
    doors = [Door(d) for d in ctx.args.door] if ctx.args.door else [Door.HTTP, Door.GRPC]
    duration, warmup, reps = ctx.opt("duration", 3.0, 1.0), 0.5, ctx.opt("reps", 3, 1)
    target = ctx.servers.start_baseline("noop")
    points: list[dict[str, Any]] = []
    for rep in range(reps):
        for door in doors:
            tokens = ["generator-check"]
            closed = runner.closed(ctx, target, door, tokens, duration_s=duration, warmup_s=warmup)
            payloads = [wire.payload(door, tokens[0], target.addr(door))]
            for fraction in FRACTIONS:
                rate = max(50.0, closed["throughput"] * fraction)
                for gen in GENERATORS if rep % 2 == 0 else GENERATORS[::-1]:
                    p = runner.open_loop(ctx, target, door, payloads, rate, duration_s=duration, generator=gen)
                    points.append(ctx.record(p | dict(rep=rep, fraction=fraction, generator=gen)))
                    print(f"rep {rep + 1} {door} {fraction:.2f} {gen:6}: {summary(p)}", flush=True)
    ctx.servers.stop()
    what = f"{duration:g} s per point, {reps} alternating repetition(s), no-op server, doors {', '.join(doors)}"
    report.write(ctx.out, markdown(ctx, points, what), dict(options=what, machine=procs.machine_info(), points=points))


def summary(p: dict[str, Any]) -> str:
    """One point in a line: latency and lag percentiles (us)."""
    lat, lag = p["latency"], p["lag"]
    return (
        f"{p['offered_rate']:,.0f}/s latency p50 {lat['p50'] * 1000:,.0f} p99 {lat['p99'] * 1000:,.0f} us; "
        f"lag p50 {lag['p50'] * 1000:,.1f} p99 {lag['p99'] * 1000:,.1f} us ({p['tool']})"
    )


def markdown(ctx: Context, points: list[dict[str, Any]], what: str) -> str:
    """Per door and fraction, the two generators side by side (medians, us)."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        groups[(p["door"], p["fraction"], p["generator"])].append(p)
    rows = []
    for (door, fraction, gen), ps in sorted(groups.items()):
        us = [fmt(median(p[h][k] * 1000 for p in ps), 1) for h in ("latency", "lag") for k in ("p50", "p99")]
        cores = median(p["client_cpu_s"] / p["seconds"] for p in ps if p["seconds"])
        errors = sum(p["errors"] + p["dropped"] for p in ps)
        offered = fmt(median(p["offered_rate"] for p in ps))
        rows.append([door, f"{fraction:.2f}", gen, offered, *us, fmt(cores, 2), errors])
    headers = ["door", "load (x no-op max)", "generator", "offered/s", "latency p50", "latency p99", "lag p50"]
    headers += ["lag p99", "generator CPU (cores)", "errors + dropped"]
    lines = [ctx.header(what), "", report.table(headers, rows, left=3)]
    return "\n".join([*lines, "", *[f"- {w}" for w in ctx.warnings]]) + "\n"
