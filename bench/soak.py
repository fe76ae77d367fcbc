"""``python -m bench run --scenario soak --minutes 30 --rate-fraction 0.7``: a long open loop; is memory flat?

One verifier, one dev issuer (bench/idp.py). The load is the issue's mix (#24 goal 6), per ten requests:
eight valid cached tokens (a pool of 50, minted at start, living past the run), one first-seen token
(minted by the dev issuer just before its window, never sent again, living ``--token-ttl`` seconds,
default 120, so the verified-token cache reaches its steady size in the warm-up) and one junk token
(bench/idp.py ``garbage``: random strings and JWT look-alikes with an unknown key id, each sent once).

First the maximum throughput of the mix over forward-auth is measured (wrk, closed loop, 3 s). Then
the open-loop generators offer ``--rate-fraction`` of it (or ``--rate`` checks/s) in back-to-back 10 s
windows for ``--minutes``: 80% over forward-auth and, at the same time, 20% over gRPC (the verifier's own
door and Envoy's ext_authz, alternating by window). After each window the bench samples the verifier's
PSS (supervisor + worker), the worker's VmRSS and open file descriptors, and the sizes of the
verified-token and refused-token caches (``verifier_token_cache_entries`` from its metrics listener).

Flat-ness: the least-squares slope of the worker's VmRSS over the last two thirds of the samples (the
first third is the warm-up: caches filling to their steady size) against 0.1 MiB/min (PASS/MISS), the
open fds' against 1/min; PSS is shown, not judged (it moves when other processes map the same files).
``--memdebug S``: the worker also reports every S seconds what grows inside it (tracemalloc, object counts
by type, big containers) into ``memdebug.jsonl`` (bench/memdebug/sitecustomize.py); its RSS is then
tracemalloc's too.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import idp, procs, report, runner, wire
from bench.runner import Context
from bench.wire import Door, Target

WINDOW_S = 10.0  # one sample per window
CACHED_POOL = 50  # distinct valid tokens, each cached after its first check
FIRST_SEEN_SLOT, JUNK_SLOT = 8, 9  # of every ten requests; the other eight are cached
GRPC_SHARE = 0.2  # of the offered rate, over gRPC alongside forward-auth
WARMUP_SHARE = 1 / 3  # the samples before the fit
RSS_FLAT_MIB_PER_MIN = 0.1
FD_FLAT_PER_MIN = 1.0
MEMDEBUG = Path(__file__).resolve().parent / "memdebug"


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


class Mix:
    """The soak's tokens: cached, first-seen and junk, in that proportion (8:1:1)."""

    def __init__(self, issuer: idp.Issuer, *, first_seen_ttl_s: int, lifetime_s: int) -> None:
        self._idp, self._ttl, self.minted, self._cached_sent = issuer.idp, first_seen_ttl_s, 0, 0
        self.cached = [self._mint("soak-cached", i, lifetime_s) for i in range(CACHED_POOL)]

    def _mint(self, who: str, i: int, ttl: int) -> str:
        return self._idp.mint(sub=f"{who}-{i}", aud=wire.AUDIENCE, ttl=ttl)

    def tokens(self, n: int) -> list[str]:
        """``n`` tokens in the mix; the first-seen ones minted now."""
        junk = iter(idp.garbage(n // 10 + 1))
        out = []
        for i in range(n):
            slot = i % 10
            if slot == JUNK_SLOT:
                out.append(next(junk))
            elif slot == FIRST_SEEN_SLOT:
                self.minted += 1
                out.append(self._mint("soak-first-seen", self.minted, self._ttl))
            else:
                self._cached_sent += 1
                out.append(self.cached[self._cached_sent % CACHED_POOL])
        return out


def cache_entries(metrics_addr: str) -> dict[str, int | None]:
    """``verifier_token_cache_entries`` from the worker's /metrics: the verified- and refused-token caches' sizes."""
    out: dict[str, int | None] = dict(positive_entries=None, negative_entries=None)
    host, _, port = metrics_addr.rpartition(":")
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except (OSError, http.client.HTTPException):
        return out
    for line in text.splitlines():
        for cache in ("positive", "negative"):
            if line.startswith(f'verifier_token_cache_entries{{cache="{cache}"}} '):
                out[f"{cache}_entries"] = int(float(line.split()[-1]))
    return out


def _loads(target: Target, mix: Mix, rate: float, grpc_door: Door) -> dict[Door, tuple[float, list[bytes]]]:
    """One window's load: door -> (its rate, its requests), a little more than 10 s of them."""
    rates = {Door.HTTP: rate * (1 - GRPC_SHARE), grpc_door: rate * GRPC_SHARE}
    return {
        door: (r, [wire.payload(door, t, target.addr(door)) for t in mix.tokens(int(r * (WINDOW_S + 0.2) * 1.05) + 10)])
        for door, r in rates.items()
    }


def _window(ctx: Context, target: Target, loads: dict[Door, tuple[float, list[bytes]]]) -> dict[str, Any]:
    """One 10 s window: forward-auth and gRPC open loops side by side; their sums."""
    grpc_door = next(door for door in loads if door.is_grpc)
    with concurrent.futures.ThreadPoolExecutor(len(loads)) as pool:
        futures = {
            door: pool.submit(runner.open_loop, ctx, target, door, payloads, r, duration_s=WINDOW_S, warmup_s=0.2)
            for door, (r, payloads) in loads.items()
        }
        points = {door: f.result() for door, f in futures.items()}
    total = {k: sum(p[k] for p in points.values()) for k in ("throughput", "allowed", "refusals", "errors", "dropped")}
    return dict(
        achieved=total["throughput"],
        allowed=total["allowed"],
        refused=total["refusals"],
        errors=total["errors"] + total["dropped"],
        p99_http_ms=points[Door.HTTP]["latency"]["p99"],
        p99_grpc_ms=points[grpc_door]["latency"]["p99"],
        grpc_door=grpc_door.value,
        client_cpu_s=sum(p["client_cpu_s"] for p in points.values()),
    )


def run(ctx: Context) -> None:
    """The soak; writes results and soak.png."""
    minutes, fraction = ctx.opt("minutes", 10.0, 0.5), ctx.opt("rate_fraction", 0.7)
    ttl, memdebug = int(ctx.opt("token_ttl", 120)), ctx.opt("memdebug", None)
    env = None
    if memdebug:
        env = dict(BENCH_MEMDEBUG=str(ctx.out / "memdebug.jsonl"), BENCH_MEMDEBUG_INTERVAL=str(memdebug))
        env["PYTHONPATH"] = ":".join(p for p in (str(MEMDEBUG), os.environ.get("PYTHONPATH", "")) if p)
    issuer = idp.Issuer(ctx.servers)
    metrics = f"127.0.0.1:{procs.free_port()}"
    target = ctx.servers.start_verifier(issuer.url, env=env, root_yaml=f'metrics: {{listen: "{metrics}"}}\n')
    mix = Mix(issuer, first_seen_ttl_s=ttl, lifetime_s=int(minutes * 60) + 900)
    vmax = runner.closed(ctx, target, Door.HTTP, mix.tokens(30_000), duration_s=3)["throughput"]
    rate = ctx.opt("rate", vmax * fraction)  # a fixed rate: the same load whatever else the machine runs
    print(f"bench: soak mix max {vmax:,.0f}/s; offering {rate:,.0f}/s for {minutes:g} min", file=sys.stderr)
    t0, samples, window, n = time.monotonic(), [], {}, 0
    # The next window's tokens are minted while this one runs, so the load pauses only between windows.
    prepare = concurrent.futures.ThreadPoolExecutor(1)
    grpc_doors = (Door.GRPC, Door.EXT_AUTHZ)
    loads = prepare.submit(_loads, target, mix, rate, grpc_doors[0])
    while True:  # a sample, then a window, whose numbers go with the next sample
        s: dict[str, Any] = dict(t_s=time.monotonic() - t0, pss_kib=procs.pss_kib(target.pids), loadavg=procs.loadavg())
        samples.append(
            s
            | window
            | cache_entries(metrics)
            | dict(worker_rss_kib=procs.max_rss_kib(target.pids), fds=procs.open_fds(target.pids))
        )
        if time.monotonic() >= t0 + minutes * 60:
            break
        this, loads = loads.result(), prepare.submit(_loads, target, mix, rate, grpc_doors[(n + 1) % 2])
        try:
            window = _window(ctx, target, this)
        except Exception as exc:  # a generator that failed: say so, keep soaking
            ctx.warnings.append(f"window {n} at t={s['t_s']:.0f}s: {exc!r}")
            window = {}
        n += 1
        print(
            f"bench: t={s['t_s']:4.0f}s worker {samples[-1]['worker_rss_kib'] / 1024:6.1f} MiB "
            f"errors {window.get('errors')} p99 {window.get('p99_http_ms', float('nan')):.2f} ms",
            file=sys.stderr,
        )
    prepare.shutdown(cancel_futures=True)
    ts = [s["t_s"] / 60 for s in samples]
    panels = [
        report.Panel(
            title="verifier memory",
            xlabel="minutes",
            ylabel="MiB",
            lines=[
                ("worker VmRSS", ts, [s["worker_rss_kib"] / 1024 for s in samples], "-"),
                ("PSS (supervisor + worker)", ts, [s["pss_kib"] / 1024 for s in samples], "--"),
            ],
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
        minutes=minutes,
        rate_fraction=fraction,
        token_ttl_s=ttl,
        max_throughput=vmax,
        rate=rate,
        fixed_rate=ctx.opt("rate", None) is not None,
        first_seen_minted=mix.minted,
        memdebug=memdebug,
        samples=samples,
        warnings=ctx.warnings,
    )
    result["summary"] = summary(samples)
    report.write(ctx.out, markdown(ctx, result), result)
    sm = result["summary"]
    rss = sm["slope"]["worker_rss_kib"]
    print(f"{report.verdict(sm['rss_flat'])} worker VmRSS slope {rss:+.3f} MiB/min (last 2/3)")


def summary(ss: list[dict[str, Any]]) -> dict[str, Any]:
    """Slopes over the last two thirds (and after the first window), the ranges, the totals."""
    tail = ss[int(len(ss) * WARMUP_SHARE) :]
    out: dict[str, Any] = dict(warmup_end_s=tail[0]["t_s"] if tail else None, slope={}, slope_whole={})
    for key, scale in (("pss_kib", 1024), ("worker_rss_kib", 1024), ("fds", 1)):
        for name, part in (("slope", tail), ("slope_whole", ss[1:])):
            out[name][key] = slope([s["t_s"] / 60 for s in part], [s[key] / scale for s in part])
        values = [s[key] / scale for s in tail] or [0.0]
        out[f"{key}_tail"] = dict(first=values[0], min=min(values), max=max(values), last=values[-1])
    for key in ("allowed", "refused", "errors"):
        out[key] = sum(s.get(key) or 0 for s in ss)
    out["windows"] = sum("achieved" in s for s in ss)
    out["rss_flat"] = out["slope"]["worker_rss_kib"] <= RSS_FLAT_MIB_PER_MIN
    out["fds_flat"] = out["slope"]["fds"] <= FD_FLAT_PER_MIN
    return out


def markdown(ctx: Context, r: dict[str, Any]) -> str:
    """Samples, slopes and the flat-ness verdicts."""
    ss, sm = r["samples"], r["summary"]
    rows = [
        [
            f"{s['t_s']:.0f}",
            f"{s['pss_kib'] / 1024:.1f}",
            f"{s['worker_rss_kib'] / 1024:.1f}",
            s["fds"],
            report.fmt(s.get("positive_entries")),
            report.fmt(s.get("negative_entries")),
            report.fmt(s.get("achieved")),
            report.fmt(s.get("refused")),
            report.fmt(s.get("p99_http_ms"), 2),
            report.fmt(s.get("p99_grpc_ms"), 2),
            report.fmt(s.get("errors")),
            report.cores(s.get("client_cpu_s"), WINDOW_S),
            s["loadavg"],
        ]
        for s in ss
    ]
    headers = ["t (s)", "PSS (MiB)", "worker VmRSS (MiB)", "open fds", "verified cache", "refused cache"]
    headers += ["achieved/s", "refused", "p99 fa ms"]
    headers += ["p99 gRPC ms", "errors+dropped", "client CPU (cores)", "load avg"]
    judged = [
        ["PSS", "pss_kib", " MiB", None, "(shown: moves with other processes mapping the same files)"],
        ["worker VmRSS", "worker_rss_kib", " MiB", RSS_FLAT_MIB_PER_MIN, ""],
        ["open fds", "fds", "", FD_FLAT_PER_MIN, ""],
    ]
    flat_rows = []
    for name, key, unit, limit, note in judged:
        rng = sm[f"{key}_tail"]
        flat_rows.append(
            [
                name,
                f"{rng['first']:.1f} / {rng['min']:.1f} / {rng['max']:.1f} / {rng['last']:.1f}",
                f"{sm['slope'][key]:+.3f}{unit}/min",
                f"{sm['slope_whole'][key]:+.3f}{unit}/min",
                note or f"<= {limit:g}{unit}/min",
                report.verdict(sm["slope"][key] <= limit) if limit else "",
            ]
        )
    at = f"--rate: {r['rate'] / r['max_throughput']:.2f}" if r["fixed_rate"] else f"{r['rate_fraction']:g}"
    what = f"{r['minutes']:g} min open loop at {at} x the mix's maximum over forward-auth "
    what += f"({r['max_throughput']:,.0f}/s with wrk) = {r['rate']:,.0f} checks/s, {1 - GRPC_SHARE:.0%} forward-auth "
    what += f"and {GRPC_SHARE:.0%} gRPC (own door / ext_authz by window); mix per ten: 8 valid cached (pool of "
    what += f"{CACHED_POOL}), 1 first-seen ES256 from the dev issuer (lives {r['token_ttl_s']} s; "
    what += f"{r['first_seen_minted']:,} minted), 1 junk"
    what += "; --memdebug: the worker runs tracemalloc" if r["memdebug"] else ""
    answers = f"Answers: {sm['allowed']:,} allowed, {sm['refused']:,} refused "
    answers += f"({sm['refused'] / max(1, sm['allowed'] + sm['refused']):.1%}; the mix's junk is 10%), "
    answers += f"{sm['errors']:,} errors+dropped over {sm['windows']} windows."
    lines = [ctx.header(what), "", report.table(headers, rows), "", answers, ""]
    warm = f"after the warm-up (t >= {sm['warmup_end_s']:.0f} s)" if sm["warmup_end_s"] is not None else ""
    lines.append(
        report.table(
            [
                "flat-ness",
                f"{warm}: first / min / max / last",
                "slope, last 2/3",
                "slope, after first window",
                "limit",
                "result",
            ],
            flat_rows,
        )
    )
    return "\n".join([*lines, "", "![soak](soak.png)", *[f"- warning: {w}" for w in r["warnings"]]]) + "\n"
