"""``python -m bench run --scenario soak --minutes 10 --rate-fraction 0.7``:
a long open loop; is memory and fd use flat?

One verifier behind forward-auth. First its maximum throughput is measured (wrk, closed loop, 3 s) on
the soak's own mix: 90% one valid cached ES256 token, 10% distinct junk (each refused once and then
remembered by the bounded refused-token cache). Then the bench's open-loop generator offers
``--rate-fraction`` of that maximum in back-to-back 10 s windows for ``--minutes``; after each window
it samples the verifier's resident size (PSS of supervisor + worker, /proc/<pid>/smaps_rollup, and
the worker's VmRSS) and open file descriptors (/proc/<pid>/fd), and records the window's p99.

Flat-ness: least-squares slopes over the second half of the samples (the first half includes warm-up
growth: the bounded caches filling to their bound, first allocations), and, for reference, over all
samples after the first window. Flat means a second-half slope of the worker's VmRSS <= 1 MiB/min and of
open fds <= 1/min (PSS is shown too; it also moves when other processes map the same shared files).
Writes results.md, results.json and soak.png under bench/results/<timestamp>-soak/.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from bench import extras, loadgen, runner, tools, wire
from bench.wire import Door

WINDOW_S = 10.0  # one sample per window
JUNK_SHARE = 0.1  # of requests: distinct junk
RSS_FLAT_MIB_PER_MIN = 1.0
FD_FLAT_PER_MIN = 1.0


def _mix(token: str, n: int) -> list[str]:
    """``n`` tokens: the valid one, and every tenth a fresh junk token."""
    step = round(1 / JUNK_SHARE)
    return [secrets.token_urlsafe(40) if i % step == step - 1 else token for i in range(n)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The soak; returns the results (also written under ``--out``)."""
    out = extras.out_dir("soak", args.out)
    bench = runner.Bench(runner.Options(scenarios=[], doors=[Door.HTTP], out_dir=out, with_naive=False))
    load_start = extras.loadavg()
    started = time.time()
    samples: list[dict[str, Any]] = []
    try:
        bench.start_issuer()
        target = extras.start_verifier(bench)
        token = bench.cached_token
        work = out / "work"
        work.mkdir(exist_ok=True)
        res = tools.wrk(addr=target.http_addr, tokens=_mix(token, 200_000), workdir=work, duration_s=3)
        vmax = res.throughput
        rate = vmax * args.rate_fraction
        print(f"bench: soak mix max {vmax:,.0f}/s; offering {rate:,.0f}/s for {args.minutes:g} min", file=sys.stderr)
        t0 = time.monotonic()

        def sample(window: dict[str, Any] | None) -> None:
            s: dict[str, Any] = dict(
                t_s=time.monotonic() - t0,
                pss_kib=extras.pss_kib(target.pids),
                worker_rss_kib=extras.max_rss_kib(target.pids),
                fds=extras.open_fds(target.pids),
                loadavg=extras.loadavg(),
            )
            if window:
                s.update(window)
            samples.append(s)
            print(
                f"bench: t={s['t_s']:6.0f}s PSS {s['pss_kib'] / 1024:6.1f} MiB fds {s['fds']:4d}"
                + (f" p99 {window['p99_ms']:.2f} ms {window['achieved']:,.0f}/s" if window else ""),
                file=sys.stderr,
            )

        sample(None)
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            n = int(rate * (WINDOW_S + 0.2) * 1.05) + 10
            payload_file = work / f"soak-{secrets.token_hex(4)}.bin"
            loadgen.write_payloads(payload_file, [wire.http_request(t, target.http_addr) for t in _mix(token, n)])
            spec = loadgen.LoadSpec(
                door=Door.HTTP.value,
                addr=target.http_addr,
                mode="open",
                payload_file=str(payload_file),
                duration_s=WINDOW_S,
                warmup_s=0.2,
                rate=rate,
                connections=max(8, min(64, int(rate / 500))),
            )
            lr = loadgen.run(spec)
            payload_file.unlink()
            j = lr.to_json()
            sample(
                dict(
                    achieved=lr.throughput,
                    p50_ms=j["latency"]["p50"],
                    p99_ms=j["latency"]["p99"],
                    allowed=lr.allowed,
                    refused=lr.denied,
                    errors=lr.errors + lr.dropped,
                    client_cpu_s=lr.cpu_s,
                )
            )
    finally:
        bench.stop()
    result = dict(
        minutes=args.minutes,
        rate_fraction=args.rate_fraction,
        max_throughput=vmax,
        rate=rate,
        samples=samples,
        loadavg_start=load_start,
        loadavg_end=extras.loadavg(),
        took_s=time.time() - started,
        warnings=bench.warnings,
    )
    result["plot"] = plot(samples, out)
    extras.write(out, markdown(result), result)
    return result


def plot(samples: list[dict[str, Any]], out: Path) -> str:
    """soak.png: PSS and fds over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ts = [s["t_s"] / 60 for s in samples]
    ax.plot(ts, [s["pss_kib"] / 1024 for s in samples], marker="o", label="PSS MiB (supervisor + worker)")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot(ts, [s["fds"] for s in samples], "--", color="gray", marker="x", label="open fds")
    ax2.set_ylabel("open fds")
    ax2.set_ylim(bottom=0)
    fig.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "soak.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def slopes(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per quantity, its slope per minute over the second half and over all samples after the first window."""
    spans = {"second half": samples[len(samples) // 2 :], "after first window": samples[1:]}
    out: dict[str, dict[str, float]] = {}
    for span, ss in spans.items():
        minutes = [s["t_s"] / 60 for s in ss]
        out[span] = {
            "pss": extras.slope(minutes, [s["pss_kib"] / 1024 for s in ss]),
            "worker_rss": extras.slope(minutes, [s["worker_rss_kib"] / 1024 for s in ss]),
            "fds": extras.slope(minutes, [float(s["fds"]) for s in ss]),
        }
    return out


def markdown(r: dict[str, Any]) -> str:
    """Samples, slopes and the flat-ness verdicts."""
    sl = slopes(r["samples"])
    half, whole = sl["second half"], sl["after first window"]
    rows = [
        [
            f"{s['t_s']:.0f}",
            f"{s['pss_kib'] / 1024:.1f}",
            f"{s['worker_rss_kib'] / 1024:.1f}",
            s["fds"],
            f"{s['achieved']:,.0f}" if "achieved" in s else "-",
            f"{s['p99_ms']:.2f}" if "p99_ms" in s else "-",
            f"{s['errors']:,}" if "errors" in s else "-",
            s["loadavg"],
        ]
        for s in r["samples"]
    ]
    lines = [
        f"{r['minutes']:g} min open loop on forward-auth at {r['rate_fraction']:g} x the mix's maximum "
        f"({r['max_throughput']:,.0f}/s with wrk) = {r['rate']:,.0f} checks/s; mix: 90% one cached valid token, "
        f"10% distinct junk. Load average (1/5/15 min) at start {r['loadavg_start']}, at end {r['loadavg_end']}; "
        f"took {r['took_s']:.0f} s.",
        "",
        extras.table(
            [
                "t (s)",
                "PSS (MiB)",
                "worker VmRSS (MiB)",
                "open fds",
                "achieved/s",
                "p99 ms",
                "errors+dropped",
                "load avg",
            ],
            rows,
            right=[True] * 7 + [False],
        ),
        "",
        extras.table(
            ["flat-ness", "slope, second half", "slope, after first window", "limit", "result"],
            [
                [
                    "PSS",
                    f"{half['pss']:+.2f} MiB/min",
                    f"{whole['pss']:+.2f} MiB/min",
                    "(shown: moves with other processes mapping the same files)",
                    "",
                ],
                [
                    "worker VmRSS",
                    f"{half['worker_rss']:+.2f} MiB/min",
                    f"{whole['worker_rss']:+.2f} MiB/min",
                    f"<= {RSS_FLAT_MIB_PER_MIN:g} MiB/min (second half)",
                    extras.verdict(half["worker_rss"] <= RSS_FLAT_MIB_PER_MIN),
                ],
                [
                    "open fds",
                    f"{half['fds']:+.2f} /min",
                    f"{whole['fds']:+.2f} /min",
                    f"<= {FD_FLAT_PER_MIN:g} /min (second half)",
                    extras.verdict(half["fds"] <= FD_FLAT_PER_MIN),
                ],
            ],
            right=[False, True, True, True, False],
        ),
        "",
        f"![soak]({Path(r['plot']).name})",
    ]
    if r["warnings"]:
        lines += ["", *[f"- warning: {w}" for w in r["warnings"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench run --scenario soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate-fraction", type=float, default=0.7, help="of the mix's closed-loop maximum")
    parser.add_argument("--out", help="results folder (default bench/results/<timestamp>-soak)")
    run(parser.parse_args(argv))
