"""Turns measured points into medians, goal ratios (PASS/MISS), a Markdown report and PNG plots."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.runner import median

# The goals of the benchmark issue: (name, threshold, direction).
GOAL_CACHED_THROUGHPUT = 0.8  # verifier cached max / no-op max, same door, at least
GOAL_P99_RATIO = 1.3  # verifier p99 / no-op p99 at half the no-op's max rate, at most
GOAL_CPU_RATIO = 1.3  # first-seen ES256 server CPU per check / raw parse+verify, at most
GOAL_FORWARD_AUTH = 1.0  # forward-auth cached max / gRPC cached max, at least
HALF = 0.5


@dataclass(frozen=True, kw_only=True)
class Goal:
    """One goal and how the run scored against it."""

    name: str
    value: float
    threshold: float
    at_least: bool
    detail: str

    @property
    def verdict(self) -> str:
        """PASS, MISS, or N/A when not measured."""
        if math.isnan(self.value):
            return "N/A"
        ok = self.value >= self.threshold if self.at_least else self.value <= self.threshold
        return "PASS" if ok else "MISS"


def _closed(points: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        if p["mode"] == "closed" and p.get("series") is None:
            out[(p["door"], p["target"], p["scenario"])].append(p)
    return out


def _open(points: list[dict[str, Any]]) -> dict[tuple[str, str, float], list[dict[str, Any]]]:
    out: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        if p["mode"] == "open":
            out[(p["door"], p["target"], p["fraction"])].append(p)
    return out


def _med(ps: list[dict[str, Any]], key: str, sub: str | None = None) -> float:
    vals = [(p[key][sub] if sub else p[key]) for p in ps if p.get(key) is not None]
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return median(vals)


def goals(points: list[dict[str, Any]], floor: dict[str, dict[str, float]], doors: list[str]) -> list[Goal]:
    """Score the four goals of the issue (per door where it applies)."""
    closed, opened = _closed(points), _open(points)
    out = []
    for door in doors:
        v = _med(closed.get((door, "verifier", "jwt-cached"), []), "throughput")
        n = _med(closed.get((door, "noop", "jwt-cached"), []), "throughput")
        out.append(
            Goal(
                name=f"cached throughput vs no-op ({door})",
                value=v / n if n else float("nan"),
                threshold=GOAL_CACHED_THROUGHPUT,
                at_least=True,
                detail=f"{v:.0f} / {n:.0f} checks/s",
            )
        )
    for door in doors:
        v = _med(opened.get((door, "verifier", HALF), []), "latency", "p99")
        n = _med(opened.get((door, "noop", HALF), []), "latency", "p99")
        out.append(
            Goal(
                name=f"p99 at half no-op max vs no-op ({door})",
                value=v / n if n else float("nan"),
                threshold=GOAL_P99_RATIO,
                at_least=False,
                detail=f"{v:.2f} / {n:.2f} ms",
            )
        )
    raw = floor.get("ES256", {}).get("parse_verify_us", float("nan"))
    for door in doors:
        c = _med(closed.get((door, "verifier", "jwt-first-seen-es256"), []), "cpu_per_check_us")
        out.append(
            Goal(
                name=f"first-seen ES256 CPU/check vs raw parse+verify ({door})",
                value=c / raw,
                threshold=GOAL_CPU_RATIO,
                at_least=False,
                detail=f"{c:.0f} / {raw:.0f} us",
            )
        )
    h = _med(closed.get(("http", "verifier", "jwt-cached"), []), "throughput")
    g = _med(closed.get(("grpc", "verifier", "jwt-cached"), []), "throughput")
    out.append(
        Goal(
            name="forward-auth vs gRPC cached throughput",
            value=h / g if g else float("nan"),
            threshold=GOAL_FORWARD_AUTH,
            at_least=True,
            detail=f"{h:.0f} / {g:.0f} checks/s",
        )
    )
    return out


def _fmt(v: float, digits: int = 0) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def markdown(
    *,
    points: list[dict[str, Any]],
    floor: dict[str, dict[str, float]],
    goal_list: list[Goal],
    machine: dict[str, Any],
    opts_line: str,
    warnings: list[str],
    plots: list[str],
) -> str:
    """The report: goals, throughput, latency, floor, machine."""
    closed, opened = _closed(points), _open(points)
    lines = [f"Run: {opts_line}", ""]
    lines += [
        "### Goals (medians of alternating runs)",
        "",
        "| goal | ratio | target | result | detail |",
        "|---|---:|---:|---|---|",
    ]
    for g in goal_list:
        lines.append(
            f"| {g.name} | {_fmt(g.value, 2)} | {'>=' if g.at_least else '<='} {g.threshold} | "
            f"**{g.verdict}** | {g.detail} |"
        )
    lines += [
        "",
        "### Maximum throughput (closed loop)",
        "",
        "| door | target | scenario | checks/s | server CPU/check (us) | client CPU (s) | tool | "
        "errors | refused | tokens reused | runs |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for (door, target, scenario), ps in sorted(closed.items()):
        lines.append(
            f"| {door} | {target} | {scenario} | {_fmt(_med(ps, 'throughput'))} | {_fmt(_med(ps, 'cpu_per_check_us'))} "
            f"| {_fmt(_med(ps, 'client_cpu_s'), 2)} | {ps[0]['tool']} | {sum(p['errors'] or 0 for p in ps)} | "
            f"{_fmt(_med(ps, 'refusals')) if ps[0].get('refusals') is not None else 'n/a'} | "
            f"{sum(p.get('reused') or 0 for p in ps)} | {len(ps)}"
            + ("" if all(p["correct"] for p in ps) else " WRONG ANSWERS")
            + " |"
        )
    lines += [
        "",
        "### Latency at fixed offered load (open loop, from intended send time; ms)",
        "",
        "| door | target | load (x no-op max) | offered/s | achieved/s | p50 | p90 | p99 | p99.9 | max | "
        "send lag p99 | dropped | client CPU (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (door, target, frac), ps in sorted(opened.items()):
        lines.append(
            f"| {door} | {target} | {frac:.2f} | {_fmt(_med(ps, 'offered_rate'))} | {_fmt(_med(ps, 'throughput'))} | "
            + " | ".join(_fmt(_med(ps, "latency", k), 2) for k in ("p50", "p90", "p99", "p99.9", "p100"))
            + f" | {_fmt(_med(ps, 'lag', 'p99'), 2)} | {sum(p['dropped'] for p in ps)} | "
            f"{_fmt(_med(ps, 'client_cpu_s'), 2)} |"
        )
    workers = [p for p in points if p.get("series") == "workers"]
    if workers:
        lines += [
            "",
            "### No-op throughput against worker processes (checks/s)",
            "",
            "| door | workers | checks/s |",
            "|---|---:|---:|",
        ]
        for p in workers:
            lines.append(f"| {p['door']} | {p['workers']} | {_fmt(p['throughput'])} |")
    if floor:
        lines += [
            "",
            "### Physical floor: in-process, per check (us)",
            "",
            "| alg | signature verify | parse + verify | pyjwt.decode |",
            "|---|---:|---:|---:|",
        ]
        for alg, f in floor.items():
            lines.append(f"| {alg} | {f['verify_us']:.1f} | {f['parse_verify_us']:.1f} | {f['pyjwt_decode_us']:.1f} |")
    if warnings:
        lines += ["", "### Warnings", ""] + [f"- {w}" for w in warnings]
    lines += ["", "### Machine", ""] + [f"- {k}: {v}" for k, v in machine.items()]
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(points: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """latency-vs-load.png and throughput-vs-workers.png; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    opened = _open(points)
    doors = sorted({d for d, _, _ in opened})
    if doors:
        fig, axes = plt.subplots(1, len(doors), figsize=(5 * len(doors), 4), squeeze=False)
        for ax, door in zip(axes[0], doors, strict=True):
            for target in sorted({t for d, t, _ in opened if d == door}):
                fracs = sorted(f for d, t, f in opened if d == door and t == target)
                rates = [_med(opened[(door, target, f)], "offered_rate") for f in fracs]
                for pct, style in (("p50", ":"), ("p99", "-"), ("p99.9", "--")):
                    ys = [_med(opened[(door, target, f)], "latency", pct) for f in fracs]
                    ax.plot(rates, ys, style, marker="o", label=f"{target} {pct}")
            ax.set_title(f"{door}: latency vs offered load (open loop)")
            ax.set_xlabel("offered checks/s")
            ax.set_ylabel("ms from intended send")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "latency-vs-load.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path))
    workers = [p for p in points if p.get("series") == "workers"]
    if workers:
        fig, ax = plt.subplots(figsize=(5, 4))
        for door in sorted({p["door"] for p in workers}):
            ps = sorted((p for p in workers if p["door"] == door), key=lambda p: p["workers"])
            ax.plot([p["workers"] for p in ps], [p["throughput"] for p in ps], marker="o", label=f"noop {door}")
        ax.set_title("throughput vs worker processes")
        ax.set_xlabel("worker processes")
        ax.set_ylabel("checks/s (closed loop)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "throughput-vs-workers.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(str(path))
    return written
