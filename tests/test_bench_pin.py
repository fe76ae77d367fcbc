"""bench --pin: the servers on the last CPU, the load generators and the bench itself on the others."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench import procs


def test_unpinned_commands_run_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs, "PINNED", None)
    assert procs.placed("server", ["python", "-V"]) == ["python", "-V"]
    assert procs.placed("generator", ["h2load"]) == ["h2load"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs 2 CPUs")
def test_pinned_servers_and_generators_run_on_cpus_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    before = os.sched_getaffinity(0)
    monkeypatch.setattr(procs, "PINNED", None)
    try:
        servers, generators = procs.pin()
        assert servers and generators and not servers & generators
        assert servers | generators == before
        assert os.sched_getaffinity(0) == generators  # the bench itself sits with the generators
        probe = [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
        for role, cpus in (("server", servers), ("generator", generators)):
            shown = subprocess.run(procs.placed(role, probe), capture_output=True, text=True, check=True).stdout
            assert shown.strip() == str(sorted(cpus))
    finally:
        os.sched_setaffinity(0, before)


def test_pinning_needs_two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(procs.os, "sched_getaffinity", lambda _pid: {0})
    with pytest.raises(SystemExit, match="2 CPUs"):
        procs.pin()
