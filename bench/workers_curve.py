"""``python -m bench run --scenario workers [--quick] [--workers 1,2]``:
the verifier's throughput against worker processes.

For each N, a verifier with ``workers: N`` (N forked processes on SO_REUSEPORT listeners) and the no-op
with ``--workers N`` are measured alternately, closed loop, with one repeated valid ES256 token
(``jwt-cached``): forward-auth with wrk (1 thread, 16 connections), the gRPC door and Envoy's ext_authz
with h2load (1 thread, 8 clients x 16 streams). The load generator runs on the same 2 cores, so each
row shows the server's and the generator's CPU in cores (CPU seconds / measured seconds): when their
sum reaches the machine's core count, the curve is bounded by the machine, not by the server. "machine
busy" is the whole machine's non-idle share over the point (/proc/stat), other sessions' work included.
Writes results.md, results.json and throughput-vs-workers.png under bench/results/<timestamp>-workers/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import extras, runner
from bench.scenarios import SCENARIOS
from bench.wire import Door, Target

DOORS = (Door.HTTP, Door.GRPC, Door.EXT_AUTHZ)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every (workers, target, door) point; returns the results (also written under ``--out``)."""
    counts = [int(n) for n in args.workers.split(",")]
    out = extras.out_dir("workers", args.out)
    duration = args.duration or (2.0 if args.quick else 5.0)
    opts = runner.Options(
        scenarios=[], doors=list(DOORS), out_dir=out, duration_s=duration, warmup_s=0.5, with_naive=False
    )
    bench = runner.Bench(opts)
    scenario = SCENARIOS["jwt-cached"]
    load_start = extras.loadavg()
    points: list[dict[str, Any]] = []
    started = time.time()
    try:
        bench.start_issuer()
        for k, n in enumerate(counts):
            targets: dict[str, Target] = {}
            v = extras.start_verifier(bench, workers=n, log=f"verifier-x{n}.log")
            targets["verifier"] = Target(**{**v.__dict__, "name": f"verifier x{n}"})
            targets["noop"] = bench.start_baseline("noop", workers=n)
            time.sleep(0.5)  # let every worker finish binding
            try:
                for door in DOORS:
                    order = ("verifier", "noop") if k % 2 == 0 else ("noop", "verifier")
                    for name in order:
                        busy0, idle0 = extras.machine_busy()
                        p = bench.max_throughput(targets[name], door, scenario, 0, workers=n, series="workers-curve")
                        busy1, idle1 = extras.machine_busy()
                        # Whole machine, over the point (probe and warm-up included): other work shows here.
                        machine = (busy1 - busy0) / max(1e-9, (busy1 - busy0) + (idle1 - idle0))
                        p.update(kind=name, loadavg=extras.loadavg(), machine_busy=machine)
                        points.append(p)
                        print(
                            f"bench: x{n} {name:8} {door.value:9} {p['throughput']:9,.0f}/s "
                            f"server {p['server_cpu_s'] / p['seconds']:.2f} cores "
                            f"client {p['client_cpu_s'] / p['seconds']:.2f} cores",
                            file=sys.stderr,
                        )
            finally:
                for t in targets.values():
                    bench.stop(t)
    finally:
        bench.stop()
    result = dict(
        options=dict(workers=counts, duration_s=duration),
        took_s=time.time() - started,
        loadavg_start=load_start,
        loadavg_end=extras.loadavg(),
        cores=os.cpu_count(),
        warnings=bench.warnings,
        points=points,
    )
    result["plot"] = plot(points, out)
    extras.write(out, markdown(result), result)
    return result


def plot(points: list[dict[str, Any]], out: Path) -> str:
    """throughput-vs-workers.png: one panel per door, verifier and no-op."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DOORS), figsize=(5 * len(DOORS), 4), squeeze=False)
    for ax, door in zip(axes[0], DOORS, strict=True):
        for kind, style in (("verifier", "-"), ("noop", "--")):
            ps = sorted(
                (p for p in points if p["door"] == door.value and p["kind"] == kind), key=lambda p: p["workers"]
            )
            if ps:
                ax.plot([p["workers"] for p in ps], [p["throughput"] for p in ps], style, marker="o", label=kind)
        ax.set_title(f"{door.value}: throughput vs worker processes")
        ax.set_xlabel("worker processes")
        ax.set_ylabel("checks/s (closed loop, jwt-cached)")
        ax.set_ylim(bottom=0)
        ax.set_xticks(sorted({p["workers"] for p in points}))
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "throughput-vs-workers.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def markdown(result: dict[str, Any]) -> str:
    """The table and the scaling ratios."""
    pts = result["points"]
    rows = []
    for p in pts:
        secs = p["seconds"] or 1
        server, client = p["server_cpu_s"] / secs, p["client_cpu_s"] / secs
        rows.append(
            [
                p["door"],
                p["kind"],
                p["workers"],
                f"{p['throughput']:,.0f}",
                f"{server:.2f}",
                f"{client:.2f} ({p['tool']})",
                f"{server + client:.2f} / {result['cores']}",
                f"{p['machine_busy']:.0%}",
                f"{p['cpu_per_check_us']:.0f}" if p.get("cpu_per_check_us") else "n/a",
                p["errors"],
                "yes" if p["correct"] else "NO",
                p["loadavg"],
            ]
        )
    scaling = []
    counts = result["options"]["workers"]
    if len(counts) > 1:
        for door in DOORS:
            for kind in ("verifier", "noop"):
                tp = {p["workers"]: p["throughput"] for p in pts if p["door"] == door.value and p["kind"] == kind}
                if counts[0] in tp and counts[-1] in tp and tp[counts[0]]:
                    scaling.append(
                        [door.value, kind, f"{tp[counts[-1]] / tp[counts[0]]:.2f}x ({counts[0]} -> {counts[-1]})"]
                    )
    lines = [
        f"Closed loop, jwt-cached, {result['options']['duration_s']:g} s per point; verifier `workers: N` vs "
        f"`bench.noop --workers N`, alternated. Load average (1/5/15 min) at start {result['loadavg_start']}, "
        f"at end {result['loadavg_end']}; took {result['took_s']:.0f} s.",
        "",
        extras.table(
            [
                "door",
                "target",
                "workers",
                "checks/s",
                "server CPU (cores)",
                "generator CPU (cores)",
                "server + generator / cores",
                "machine busy",
                "server CPU/check us",
                "errors",
                "correct",
                "load avg",
            ],
            rows,
            right=[False, False, True, True, True, True, True, True, True, True, False, False],
        ),
    ]
    if scaling:
        lines += ["", extras.table(["door", "target", "throughput ratio"], scaling, right=[False, False, True])]
    lines += ["", f"![throughput vs worker processes]({Path(result['plot']).name})"]
    if result["warnings"]:
        lines += ["", *[f"- warning: {w}" for w in result["warnings"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench run --scenario workers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s points (default 5 s)")
    parser.add_argument("--duration", type=float, help="seconds per point")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--out", help="results folder (default bench/results/<timestamp>-workers)")
    run(parser.parse_args(argv))
