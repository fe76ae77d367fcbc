"""Results: Markdown tables, ``results.md`` + ``results.json``, PASS/MISS verdicts and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def median(values: Iterable[float | None]) -> float:
    """Median of the measured values (None and NaN left out); NaN when none."""
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else float("nan")


def fmt(v: float | None, digits: int = 0) -> str:
    """``1,234`` (or ``-`` when not measured)."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def verdict(ok: bool | None) -> str:
    """PASS, MISS (bold) or N/A when not measured or not conclusive."""
    return "N/A" if ok is None else "**PASS**" if ok else "**MISS**"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], left: int = 1) -> str:
    """A Markdown table; the first ``left`` columns are left-aligned, the others right-aligned."""
    align = ["---" if i < left else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def cores(cpu_s: float | None, seconds: float | None) -> str:
    """CPU seconds over wall seconds, as cores in use."""
    return fmt(cpu_s / seconds, 2) if cpu_s is not None and seconds else "-"


@dataclass(frozen=True, kw_only=True)
class Goal:
    """One goal and how the run scored against it."""

    name: str
    value: float
    threshold: float
    at_least: bool = True
    detail: str = ""

    @property
    def met(self) -> bool | None:
        """Whether the measured value meets the threshold (None when not measured)."""
        if math.isnan(self.value):
            return None
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    def row(self) -> list[str]:
        """goal | ratio | target | result | detail."""
        target = f"{'>=' if self.at_least else '<='} {self.threshold:g}"
        return [self.name, fmt(self.value, 2), target, verdict(self.met), self.detail]


def goals_table(goals: Sequence[Goal]) -> str:
    """The goals as a table."""
    return table(["goal", "ratio", "target", "result", "detail"], [g.row() for g in goals])


def write(out: Path, md: str, data: dict[str, Any]) -> None:
    """``results.md`` and ``results.json`` in ``out``; the Markdown also goes to stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    print(md)
    print(f"bench: wrote {out}/results.md and results.json", file=sys.stderr)


@dataclass(kw_only=True)
class Panel:
    """One chart: lines of (label, xs, ys, style), an optional horizontal goal line and shaded span."""

    title: str
    xlabel: str
    ylabel: str
    lines: list[tuple[str, list[float], list[float], str]] = field(default_factory=list)
    log: bool = False
    hline: tuple[float, str] | None = None
    span: tuple[float, float, str] | None = None


def plot(path: Path, panels: Sequence[Panel]) -> str:
    """The panels side by side in one PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        for label, xs, ys, style in p.lines:
            ax.plot(xs, ys, style, marker="o", label=label)
        if p.hline:
            ax.axhline(p.hline[0], linestyle="--", color="red", label=p.hline[1])
        if p.span:
            ax.axvspan(p.span[0], p.span[1], alpha=0.15, label=p.span[2])
        ax.set(title=p.title, xlabel=p.xlabel, ylabel=p.ylabel)
        if p.log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
