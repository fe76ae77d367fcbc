"""bench/edge.py's own arithmetic: the nginx worker's CPU read from /proc, and the #24 goal 5 rows (CPU ratio,
CPU added, the open loop flagged when its generator lags more than the budget it should resolve)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("hdrh")

from bench import edge

#: a worker: burns 0.3 s of CPU, says so, stays alive until told
WORKER = """import time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("done", flush=True)
input()
"""
#: a master: starts the worker, relays its "done", stops it when told
MASTER = """import subprocess, sys
w = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
print(w.stdout.readline().decode().strip(), flush=True)
input()
w.communicate(b"\\n")
"""


def test_worker_cpu_is_the_cpu_of_the_masters_children(tmp_path: Path) -> None:
    master = subprocess.Popen([sys.executable, "-c", MASTER, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert master.stdout is not None and master.stdout.readline().strip() == b"done"
        (tmp_path / "nginx.pid").write_text(f"{master.pid}\n")
        assert 0.25 <= edge.worker_cpu_s(str(tmp_path)) < 2
    finally:
        master.communicate(b"\n", timeout=10)


def _rows(plain_cpu: float, on_cpu: float, plain_lag_ms: float, on_lag_ms: float) -> dict[str, dict[str, float]]:
    def row(tput: float, cpu: float, open_p50_ms: float, lag_ms: float) -> dict[str, float]:
        return dict(throughput=tput, p50_ms=0.05, worker_cpu_us=cpu, open_p50_ms=open_p50_ms, open_lag_ms=lag_ms)

    return {
        edge.PLAIN: row(20_000, plain_cpu, 0.300, plain_lag_ms) | {"open_rate": 5_000},
        edge.REUSE_ON: row(17_000, on_cpu, 0.310, on_lag_ms) | {"open_rate": 5_000},
    }


def test_goal_rows_give_the_cpu_ratio_and_the_cpu_added() -> None:
    goals = {g.name: g for g in edge.goals(_rows(25.0, 30.0, 0.01, 0.01))}

    ratio = goals[f"{edge.PLAIN} / {edge.REUSE_ON}, nginx worker CPU per request"]
    added = goals[f"{edge.REUSE_ON}: nginx worker CPU added per request (us)"]
    assert ratio.value == pytest.approx(25 / 30) and ratio.met is False
    assert added.value == pytest.approx(5.0) and added.met is True
    assert goals[f"{edge.REUSE_ON} / {edge.PLAIN}"].value == pytest.approx(0.85)


def test_an_open_loop_whose_generator_lags_past_the_budget_is_flagged_as_noise() -> None:
    quiet = {g.name: g for g in edge.goals(_rows(25.0, 30.0, 0.010, 0.012))}
    busy = {g.name: g for g in edge.goals(_rows(25.0, 30.0, 0.010, 0.250))}

    name = f"{edge.REUSE_ON}: p50 added (us)"
    assert quiet[name].value == pytest.approx(10.0) and "noise" not in quiet[name].detail
    assert "generator lag p50 250 us" in busy[name].detail and "noise" in busy[name].detail


def test_an_open_loop_whose_p50_swings_across_repetitions_is_flagged_as_noise() -> None:
    """The generator kept its schedule (lag 1 us) but the machine did not keep the server's: a p50 that varied
    4x between repetitions says nothing about 30 us."""
    rows = _rows(25.0, 30.0, 0.001, 0.001)
    steady = {g.name: g for g in edge.goals(rows | {edge.PLAIN: rows[edge.PLAIN] | {"open_spread": 1.2}})}
    swinging = {g.name: g for g in edge.goals(rows | {edge.PLAIN: rows[edge.PLAIN] | {"open_spread": 4.0}})}

    name = f"{edge.REUSE_ON}: p50 added (us)"
    assert "noise" not in steady[name].detail
    assert "varied 4.0x across repetitions: noise" in swinging[name].detail
