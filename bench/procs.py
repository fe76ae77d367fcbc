"""The processes of a run: ports, start and stop, and what /proc says about them (CPU, memory, fds).

:class:`Servers` starts every server a scenario needs (the dev provider, the verifier with a config
written here, the baselines of bench/baselines.py) in processes of their own, logging into the run's
folder, and stops them all at the end. CPU comes from ``/proc/<pid>/stat`` (utime + stime, all threads
and descendants), memory from ``status`` (VmRSS, VmHWM) and ``smaps_rollup`` (PSS), see proc(5).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import wire
from bench.wire import Door, Target

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0
_TICKS = os.sysconf("SC_CLK_TCK")


# `--pin` (`pin`): the servers (verifier, baselines, provider) on the last CPU, the load generators and the bench
# itself on the others, so a server's latency tail is its own and not the generator's preemption of it (a 2-core
# host: one core each). None: the scheduler places every process (the default).
PINNED: tuple[frozenset[int], frozenset[int]] | None = None


def pin() -> tuple[frozenset[int], frozenset[int]]:
    """Pins from now on (`PINNED`): (the servers' CPUs, the generators' CPUs); this process goes to the generators'."""
    global PINNED
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f"--pin needs 2 CPUs or more, this process may use {len(cpus)}")
    PINNED = frozenset(cpus[-1:]), frozenset(cpus[:-1])
    os.sched_setaffinity(0, PINNED[1])
    return PINNED


def placed(role: str, cmd: Sequence[str]) -> list[str]:
    """`cmd` pinned as a "server" or a "generator" under `--pin` (`taskset` execs it: the same pid), else as is."""
    if PINNED is None:
        return list(cmd)
    cpus = PINNED[0] if role == "server" else PINNED[1]
    return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]


def free_port() -> int:
    """An ephemeral loopback port (closed again: a small race we accept for a bench)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(addr: str, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_S) -> None:
    """Until something accepts on ``addr``; fails when ``proc`` exits first."""
    host, _, port = addr.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {addr} after {timeout}s")


def get_status(addr: str, path: str, headers: dict[str, str] | None = None) -> int:
    """The status of one GET."""
    host, _, port = addr.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def check_once(target: Target, door: Door, token: str, headers: dict[str, str] | None = None) -> bool:
    """One real check through ``door``; True when allowed. The bench's guard against fast wrong answers."""
    if door is Door.HTTP:
        return get_status(target.http_addr, wire.FORWARD_AUTH_PATH, headers or wire.http_headers(token)) == 200
    import grpc

    with grpc.insecure_channel(target.grpc_addr) as channel:
        resp = channel.unary_unary(door.grpc_method)(wire.grpc_payload(door, token), timeout=5)
    return wire.allowed(door, resp)


# --- /proc ------------------------------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                out.extend(tree(int(child)))
    return out


def _sum(pids: Sequence[int], read: Any) -> int:
    total = 0
    for root in pids:
        for pid in tree(root):
            with contextlib.suppress(OSError, ValueError):
                total += read(pid)
    return total


def _field(pid: int, file: str, name: str) -> int:
    for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of ``pids`` and their descendants (fields 14 and 15 of stat)."""

    def read(pid: int) -> int:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])

    return _sum(pids, read) / _TICKS


def cpu_split(pids: Sequence[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pids`` and their descendants: ``cpu_seconds`` in its two parts."""

    def stat_field(index: int) -> Any:
        def read(pid: int) -> int:
            stat = Path(f"/proc/{pid}/stat").read_text()
            return int(stat[stat.rindex(")") + 2 :].split()[index])

        return read

    return _sum(pids, stat_field(11)) / _TICKS, _sum(pids, stat_field(12)) / _TICKS


def rss_kib(pids: Sequence[int]) -> int:
    """VmRSS summed over the trees."""
    return _sum(pids, lambda pid: _field(pid, "status", "VmRSS"))


def pss_kib(pids: Sequence[int]) -> int:
    """PSS summed over the trees: shared pages counted once."""
    return _sum(pids, lambda pid: _field(pid, "smaps_rollup", "Pss"))


def hwm_kib(pids: Sequence[int]) -> int:
    """VmHWM (peak resident size) summed over the trees: an upper bound of the tree's peak."""
    return _sum(pids, lambda pid: _field(pid, "status", "VmHWM"))


def max_rss_kib(pids: Sequence[int]) -> int:
    """The largest VmRSS of one process in the tree (the serving worker, under the supervisor)."""
    procs = [p for root in pids for p in tree(root) if p != root or len(tree(root)) == 1]
    return max((rss_kib([p]) for p in procs), default=0)


def open_fds(pids: Sequence[int]) -> int:
    """Open file descriptors summed over the trees."""
    return _sum(pids, lambda pid: len(os.listdir(f"/proc/{pid}/fd")))


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, its idle + iowait seconds) from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICKS, idle / _TICKS


def loadavg() -> str:
    """The 1/5/15-minute load averages, formatted."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict[str, Any]:
    """What the numbers ran on."""
    cpu, mem = "unknown", ""
    with contextlib.suppress(OSError):
        cpu = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        cpu = cpu.split(":", 1)[1].strip()
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    tools = {}
    for tool, flag in (("wrk", "-v"), ("h2load", "--version")):
        with contextlib.suppress(OSError):
            out = subprocess.run([tool, flag], capture_output=True, text=True, timeout=5)
            tools[tool] = (out.stdout or out.stderr).strip().splitlines()[0]
    return dict(
        cpu=cpu,
        cores=os.cpu_count(),
        memory=mem,
        kernel=platform.release(),
        python=platform.python_version(),
        tools=tools,
        loadavg=loadavg(),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


# --- servers ----------------------------------------------------------------------------------------


@dataclass
class Servers:
    """Every process a run started, logging into ``out``; :meth:`stop` ends them."""

    out: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    verifier_cmd: tuple[str, ...] = (sys.executable, "-m", "verifier", "serve", "--config")

    def spawn(
        self, cmd: Sequence[str], log: str, env: dict[str, str] | None = None, cwd: Path = PROJECT_ROOT
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in the project root (or ``cwd``), its output appended to ``out/log``."""
        self.out.mkdir(parents=True, exist_ok=True)
        logf = (self.out / log).open("ab")
        proc = subprocess.Popen(
            placed("server", cmd), stdout=logf, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})}
        )
        self.procs.append(proc)
        return proc

    def start_verifier(
        self,
        issuer: str,
        *,
        name: str = "verifier",
        workers: int = 1,
        issuer_yaml: str = "",
        root_yaml: str = "",
        http_yaml: str = "",
        env: dict[str, str] | None = None,
        tree: Path | None = None,
    ) -> Target:
        """``python -m verifier serve`` for ``issuer``; ``issuer_yaml``/``root_yaml`` extend the config,
        ``http_yaml`` (``key: value, ...``) the ``http`` section, ``env`` the environment.

        ``tree``: another checkout's verifier (the code before a change, measured in the same run).

        No metrics listener: with ``workers: N`` each worker would take the configured port + its index.
        """
        grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config = self.out / f"{name.replace(' ', '-')}-{free_port()}.yaml"
        self.out.mkdir(parents=True, exist_ok=True)
        config.write_text(
            f'grpc: {{listen: "{grpc_addr}"}}\nhttp: {{listen: "{http_addr}"{", " + http_yaml if http_yaml else ""}}}\n'
            + (f"workers: {workers}\n" if workers != 1 else "")
            + f'issuers:\n  - issuer: "{issuer}"\n    audiences: ["{wire.AUDIENCE}"]\n'
            "    algorithms: [ES256, RS256, EdDSA]\n    leeway_seconds: 30\n"
            "    allow_insecure_http: true\n"  # the bench's provider is plain http on loopback
             + issuer_yaml + root_yaml
        )
        env = {**(env or {}), "PYTHONPATH": str(tree)} if tree else env
        proc = self.spawn([*self.verifier_cmd, str(config)], f"{name.replace(' ', '-')}.log", env, tree or PROJECT_ROOT)
        wait_port(grpc_addr, proc)
        wait_port(http_addr, proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError, http.client.HTTPException):
                if get_status(http_addr, "/healthz") == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{http_addr}/healthz never answered 200")
            time.sleep(0.1)
        return Target(name=name, grpc_addr=grpc_addr, http_addr=http_addr, pids=(proc.pid,))

    def start_baseline(self, decide: str = "noop", *, workers: int = 1, issuer: str = "", **flags: str) -> Target:
        """bench/baselines.py (``noop``, ``naive`` or ``introspect``) on fresh ports, in ``workers`` processes."""
        grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "bench.baselines", "--http", http_addr, "--decide", decide, "--issuer", issuer]
        cmd += ["--grpc", grpc_addr] if decide != "introspect" else []
        for k, v in flags.items():
            cmd += [f"--{k.replace('_', '-')}", v]
        started = [self.spawn(cmd, f"{decide}.log") for _ in range(workers)]  # sharing the ports (SO_REUSEPORT)
        for proc in started:
            wait_port(http_addr, proc)
            if decide != "introspect":
                wait_port(grpc_addr, proc)
        name = decide if workers == 1 else f"{decide} x{workers}"
        return Target(name=name, grpc_addr=grpc_addr, http_addr=http_addr, pids=tuple(p.pid for p in started))

    def stop(self, target: Target | None = None) -> None:
        """Stop one target's processes, or all of them."""
        for proc in list(self.procs):
            if target is None or proc.pid in target.pids:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                self.procs.remove(proc)
