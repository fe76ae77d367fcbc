"""Shared pieces of the stand-alone bench commands (introspection, workers, memory, dpop, soak).

Each of those commands starts its own verifier with a config written here, samples the process tree
from /proc, and writes ``results.md``/``results.json`` under ``bench/results/<timestamp>-<name>/``.
The load average is recorded with every table because other work may share the machine's cores.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import procstat, runner, wire

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def out_dir(name: str, given: str | None) -> Path:
    """``given`` or ``bench/results/<timestamp>-<name>``, created."""
    out = Path(given) if given else RESULTS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def loadavg() -> str:
    """The 1/5/15-minute load averages, formatted."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def verifier_config(
    bench: runner.Bench,
    *,
    issuer_url: str | None = None,
    extra_issuer: str = "",
    extra_root: str = "",
    workers: int = 1,
) -> tuple[str, str, Path]:
    """Writes a verifier config pointing at ``issuer_url`` (default the bench issuer); returns (grpc, http, file).

    ``extra_issuer`` is indented YAML appended to the issuer entry; ``extra_root`` is top-level YAML.
    No metrics listener: with ``workers: N`` each worker would take the configured port + its index.
    """
    grpc_addr, http_addr = f"127.0.0.1:{runner.free_port()}", f"127.0.0.1:{runner.free_port()}"
    config = bench.opts.out_dir / f"verifier-{runner.free_port()}.yaml"
    config.write_text(
        f'grpc: {{listen: "{grpc_addr}"}}\n'
        f'http: {{listen: "{http_addr}"}}\n'
        + (f"workers: {workers}\n" if workers != 1 else "")  # absent: one process, no supervisor
        + "issuers:\n"
        f'  - issuer: "{issuer_url or bench.issuer_url}"\n'
        f'    audiences: ["{wire.AUDIENCE}"]\n'
        "    algorithms: [ES256, RS256, EdDSA]\n"
        "    leeway_seconds: 30\n"
        "    allow_insecure_http: true\n" + extra_issuer + extra_root
    )
    return grpc_addr, http_addr, config


def start_verifier(
    bench: runner.Bench, *, log: str = "verifier.log", env: dict[str, str] | None = None, **config: Any
) -> wire.Target:
    """``python -m verifier serve`` with :func:`verifier_config`; waits for gRPC and /healthz."""
    grpc_addr, http_addr, path = verifier_config(bench, **config)
    logf = (bench.opts.out_dir / log).open("ab")
    proc = subprocess.Popen(
        [*bench.opts.verifier_cmd, str(path)],
        stdout=logf,
        stderr=subprocess.STDOUT,
        cwd=runner.PROJECT_ROOT,
        env={**os.environ, **(env or {})},
    )
    bench.procs.append(proc)
    runner._wait_port(grpc_addr, proc)
    runner._wait_healthz(http_addr, proc)
    return wire.Target(name="verifier", grpc_addr=grpc_addr, http_addr=http_addr, pids=(proc.pid,))


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (a ``workers: N`` verifier forks its workers)."""
    return procstat._descendants(pid)


def rss_kib(pids: Sequence[int]) -> int:
    """Resident set size (VmRSS, proc(5)) summed over ``pids`` and their descendants, in KiB."""
    total = 0
    for root in pids:
        for pid in tree_pids(root):
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            except OSError:
                continue
    return total


def pss_kib(pids: Sequence[int]) -> int:
    """Proportional set size (/proc/<pid>/smaps_rollup) summed over the tree: shared pages counted once."""
    total = 0
    for root in pids:
        for pid in tree_pids(root):
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
            except OSError:
                continue
    return total


def max_rss_kib(pids: Sequence[int]) -> int:
    """The largest VmRSS of one process in the tree (the serving worker, under the supervisor)."""
    return max(
        (rss_kib([p]) for root in pids for p in tree_pids(root) if p != root or len(tree_pids(root)) == 1), default=0
    )


def open_fds(pids: Sequence[int]) -> int:
    """Open file descriptors (entries of /proc/<pid>/fd) summed over ``pids`` and their descendants."""
    total = 0
    for root in pids:
        for pid in tree_pids(root):
            try:
                total += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
    return total


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, its idle + iowait seconds) from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / ticks, idle / ticks


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (0 with fewer than two points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """A Markdown table; numbers are right-aligned unless ``right`` says otherwise."""
    right = right or [i > 0 for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write(out: Path, md: str, data: dict[str, Any]) -> None:
    """``results.md`` and ``results.json`` in ``out``; the Markdown also goes to stdout."""
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))
    print(md)
    print(f"bench: wrote {out}/results.md and results.json", file=sys.stderr)


def verdict(ok: bool) -> str:
    """PASS or MISS, bold."""
    return "**PASS**" if ok else "**MISS**"
