"""``python -m bench run --scenario soak --minutes 10 --rate-fraction 0.7``: a long open loop; is memory flat?

One verifier behind forward-auth. First its maximum throughput is measured (wrk, closed loop, 3 s) on
the soak's own mix: 90% one valid cached ES256 token, 10% distinct junk (each refused once and then
remembered by the bounded refused-token cache). Then the open-loop generator offers ``--rate-fraction``
of that maximum in back-to-back 10 s windows for ``--minutes``; after each window the bench samples the
verifier's PSS (supervisor + worker), the worker's VmRSS and open file descriptors, and the window's p99.

Flat-ness: least-squares slopes over the second half of the samples (the first half includes warm-up
growth: the bounded caches filling to their bound), and, for reference, over all samples after the
first window. Flat means a second-half slope of the worker's VmRSS <= 1 MiB/min and of open fds <= 1/min
(PSS is shown too; it also moves when other processes map the same shared files).
"""

from __future__ import annotations

import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench import idp, procs, report, runner, wire
from bench.runner import Context
from bench.wire import Door

WINDOW_S = 10.0  # one sample per window
JUNK_EVERY = 10  # every tenth request: distinct junk
RSS_FLAT_MIB_PER_MIN = 1.0
FD_FLAT_PER_MIN = 1.0


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def run(ctx: Context) -> None:
    """The soak; writes results and soak.png."""
    minutes, fraction = ctx.opt("minutes", 10.0, 0.5), ctx.opt("rate_fraction", 0.7)
    issuer = idp.Issuer(ctx.servers)
    target, token = ctx.servers.start_verifier(issuer.url), issuer.cached_token

    def mix(n: int) -> list[str]:
        return [secrets.token_urlsafe(40) if i % JUNK_EVERY == JUNK_EVERY - 1 else token for i in range(n)]

    vmax = runner.closed(ctx, target, Door.HTTP, mix(50_000), duration_s=3)["throughput"]
    rate = vmax * fraction
    print(f"bench: soak mix max {vmax:,.0f}/s; offering {rate:,.0f}/s for {minutes:g} min", file=sys.stderr)
    t0, samples, window = time.monotonic(), [], {}
    while True:  # a sample, then a window, whose numbers go with the next sample
        s: dict[str, Any] = dict(t_s=time.monotonic() - t0, pss_kib=procs.pss_kib(target.pids), loadavg=procs.loadavg())
        samples.append(
            s | window | dict(worker_rss_kib=procs.max_rss_kib(target.pids), fds=procs.open_fds(target.pids))
        )
        if time.monotonic() >= t0 + minutes * 60:
            break
        tokens = mix(int(rate * (WINDOW_S + 0.2) * 1.05) + 10)
        payloads = [wire.http_request(wire.http_headers(t), target.http_addr) for t in tokens]
        p = runner.open_loop(ctx, target, Door.HTTP, payloads, rate, duration_s=WINDOW_S, warmup_s=0.2)
        window = dict(achieved=p["throughput"], p99_ms=p["latency"]["p99"], client_cpu_s=p["client_cpu_s"])
        window.update(allowed=p["allowed"], refused=p["refusals"], errors=p["errors"] + p["dropped"])
        print(
            f"bench: t={s['t_s']:4.0f}s PSS {s['pss_kib'] / 1024:6.1f} MiB p99 {window['p99_ms']:.2f} ms",
            file=sys.stderr,
        )
    ts = [s["t_s"] / 60 for s in samples]
    panels = [
        report.Panel(
            title="verifier PSS (supervisor + worker)",
            xlabel="minutes",
            ylabel="MiB",
            lines=[("PSS", ts, [s["pss_kib"] / 1024 for s in samples], "-")],
        ),
        report.Panel(
            title="verifier open fds",
            xlabel="minutes",
            ylabel="fds",
            lines=[("open fds", ts, [s["fds"] for s in samples], "--")],
        ),
    ]
    report.plot(ctx.out / "soak.png", panels)
    result = dict(
        minutes=minutes, rate_fraction=fraction, max_throughput=vmax, rate=rate, samples=samples, warnings=ctx.warnings
    )
    report.write(ctx.out, markdown(ctx, result), result)


def markdown(ctx: Context, r: dict[str, Any]) -> str:
    """Samples, slopes and the flat-ness verdicts."""
    ss = r["samples"]
    slopes = {}
    for span, part in (("half", ss[len(ss) // 2 :]), ("whole", ss[1:])):
        minutes = [s["t_s"] / 60 for s in part]
        for key, scale in (("pss_kib", 1024), ("worker_rss_kib", 1024), ("fds", 1)):
            slopes[(span, key)] = slope(minutes, [s[key] / scale for s in part])
    rows = [
        [
            f"{s['t_s']:.0f}",
            f"{s['pss_kib'] / 1024:.1f}",
            f"{s['worker_rss_kib'] / 1024:.1f}",
            s["fds"],
            report.fmt(s.get("achieved")),
            report.fmt(s.get("p99_ms"), 2),
            report.fmt(s.get("errors")),
            report.cores(s.get("client_cpu_s"), WINDOW_S),
            s["loadavg"],
        ]
        for s in ss
    ]
    headers = ["t (s)", "PSS (MiB)", "worker VmRSS (MiB)", "open fds", "achieved/s", "p99 ms", "errors+dropped"]
    flat = [["PSS", "pss_kib", " MiB/min", None, "(shown: moves with other processes mapping the same files)"]]
    flat += [
        ["worker VmRSS", "worker_rss_kib", " MiB/min", RSS_FLAT_MIB_PER_MIN, ""],
        ["open fds", "fds", " /min", FD_FLAT_PER_MIN, ""],
    ]
    flat_rows = [
        [
            name,
            f"{slopes['half', key]:+.2f}{unit}",
            f"{slopes['whole', key]:+.2f}{unit}",
            note or f"<= {limit:g}{unit} (second half)",
            report.verdict(slopes["half", key] <= limit) if limit else "",
        ]
        for name, key, unit, limit, note in flat
    ]
    what = f"{r['minutes']:g} min open loop on forward-auth at {r['rate_fraction']:g} x the mix's maximum "
    what += f"({r['max_throughput']:,.0f}/s with wrk) = {r['rate']:,.0f} checks/s; mix: 90% one cached valid token, "
    what += "10% distinct junk"
    lines = [ctx.header(what), "", report.table([*headers, "client CPU (cores)", "load avg"], rows)]
    lines += [
        "",
        report.table(["flat-ness", "slope, second half", "slope, after first window", "limit", "result"], flat_rows),
    ]
    return "\n".join([*lines, "", "![soak](soak.png)", *[f"- warning: {w}" for w in r["warnings"]]]) + "\n"
