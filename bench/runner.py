"""Runs a benchmark: starts the issuer and the servers, plans the points, alternates targets, scores goals.

Targets, each measured on every door in the same run and alternated within each repetition so that
drift (thermal, noisy neighbours) hits all of them alike:

* ``verifier`` -- ``python -m verifier serve --config`` pointed at the bench issuer
* ``noop``     -- bench/noop.py: the same stack deciding nothing (the ceiling)
* ``naive``    -- bench/naive.py on the same stack: PyJWKClient per request (what a user writes)
* ``floor``    -- bench/floor.py: in-process signature verify (+parse) per algorithm

Closed-loop maximum throughput uses h2load (gRPC, one repeated token) and wrk (HTTP/1.1), or the
bench's own closed loop for gRPC scenarios whose token changes per request. Latency comes only from
the open-loop generator (bench/loadgen.py), measured from the intended send time.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import floor, issuer, loadgen, procstat, tools, wire
from bench.scenarios import Scenario
from bench.wire import Door, Target

PROJECT_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class Options:
    """How long and how much to run."""

    scenarios: list[Scenario]
    doors: list[Door]
    out_dir: Path
    duration_s: float = 5.0
    warmup_s: float = 1.0
    reps: int = 3
    load_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)
    workers: tuple[int, ...] = (1, 2)
    pool_per_point: int = 25_000  # first-seen tokens per (door, rep): above the expected checks/s x duration
    with_verifier: bool = True
    with_naive: bool = True
    verifier_cmd: tuple[str, ...] = (sys.executable, "-m", "verifier", "serve", "--config")


def free_port() -> int:
    """An ephemeral loopback port (closed again: a small race we accept for a bench)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(addr: str, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_S) -> None:
    host, _, port = addr.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {addr} after {timeout}s")


def _wait_healthz(addr: str, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT_S) -> None:
    _wait_port(addr, proc, timeout)
    host, _, port = addr.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection(host, int(port), timeout=1)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{addr}/healthz never answered 200")


def check_once(target: Target, door: Door, token: str) -> bool:
    """One real check through ``door``; True when allowed. The bench's guard against fast wrong answers."""
    if door is Door.HTTP:
        host, _, port = target.http_addr.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", wire.FORWARD_AUTH_PATH, headers=wire.http_headers(token))
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp.status == 200
    import grpc

    with grpc.insecure_channel(target.grpc_addr) as channel:
        resp = channel.unary_unary(door.grpc_method)(wire.grpc_payload(door, token), timeout=5)
    return wire.verifier_allowed(resp) if door is Door.GRPC else wire.envoy_allowed(resp)


@dataclass
class Bench:
    """One benchmark run: its processes, keys, tokens and the points measured so far."""

    opts: Options
    points: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)
    keys: dict[str, issuer.SigningKey] = field(default_factory=dict)
    issuer_url: str = ""
    floor: dict[str, dict[str, float]] = field(default_factory=dict)
    _pools: dict[tuple[str, str, int], list[str]] = field(default_factory=dict)
    cached_token: str = ""

    # --- processes ---------------------------------------------------------------------------------

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        logf = (self.opts.out_dir / log).open("ab")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
        self.procs.append(proc)
        return proc

    def start_issuer(self) -> None:
        """Keys, and verifier.devidp publishing them in a process of its own."""
        port = free_port()
        self.issuer_url = f"http://127.0.0.1:{port}"
        self.keys = issuer.generate_keys()
        keys = self.opts.out_dir / "issuer" / "keys.json"
        issuer.write_keys(keys, self.keys)
        cmd = [sys.executable, "-m", "bench.idp_helper", "--port", str(port), "--keys", str(keys)]
        proc = self._spawn(cmd, "issuer.log")
        _wait_port(f"127.0.0.1:{port}", proc)
        self.cached_token = issuer.mint(self.keys["ES256"], self.issuer_url, 1)[0]

    def start_baseline(self, name: str, workers: int = 1) -> Target:
        """The no-op (or naive) server on fresh ports."""
        grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "bench.noop", "--grpc", grpc_addr, "--http", http_addr, "--workers", str(workers)]
        if name == "naive":
            cmd += ["--decide", "naive", "--issuer", self.issuer_url]
        proc = self._spawn(cmd, f"{name}.log")
        _wait_port(grpc_addr, proc)
        _wait_port(http_addr, proc)
        return Target(
            name=name if workers == 1 else f"{name}x{workers}",
            grpc_addr=grpc_addr,
            http_addr=http_addr,
            pids=(proc.pid,),
        )

    def start_verifier(self) -> Target:
        """``verifier serve`` with a config pointing at the bench issuer."""
        grpc_addr, http_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        config = self.opts.out_dir / "verifier.yaml"
        config.write_text(
            f'grpc: {{listen: "{grpc_addr}"}}\n'
            f'http: {{listen: "{http_addr}"}}\n'
            f'metrics: {{listen: "127.0.0.1:{free_port()}"}}\n'
            "issuers:\n"
            f'  - issuer: "{self.issuer_url}"\n'
            f'    audiences: ["{wire.AUDIENCE}"]\n'
            "    algorithms: [ES256, RS256, EdDSA]\n"
            "    leeway_seconds: 30\n"
            "    allow_insecure_http: true\n"  # the bench issuer is plain http on loopback
        )
        proc = self._spawn([*self.opts.verifier_cmd, str(config)], "verifier.log")
        _wait_port(grpc_addr, proc)
        _wait_healthz(http_addr, proc)
        return Target(name="verifier", grpc_addr=grpc_addr, http_addr=http_addr, pids=(proc.pid,))

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

    # --- tokens ------------------------------------------------------------------------------------

    def tokens_for(self, scenario: Scenario, door: Door, rep: int) -> list[str]:
        """The tokens one point sends: a fresh pool per (scenario, door, rep) so none is ever cached."""
        if scenario.kind == "cached":
            return [self.cached_token]
        key = (scenario.name, door.value, rep)
        if key not in self._pools:
            n = self.opts.pool_per_point
            if scenario.kind == "garbage":
                self._pools[key] = issuer.garbage_tokens(n)
            else:
                self._pools[key] = issuer.mint(self.keys[scenario.alg], self.issuer_url, n)
        return self._pools[key]

    def probe_token(self, scenario: Scenario) -> str:
        """A token of the scenario's kind that no load point sends (so probing does not warm a cache)."""
        if scenario.kind == "garbage":
            return issuer.garbage_tokens(1)[0]
        if scenario.kind == "cached":
            return self.cached_token
        return issuer.mint(self.keys[scenario.alg], self.issuer_url, 1)[0]

    # --- points ------------------------------------------------------------------------------------

    def _record(self, point: dict[str, Any]) -> dict[str, Any]:
        self.points.append(point)
        with (self.opts.out_dir / "points.jsonl").open("a") as fh:
            fh.write(json.dumps(point) + "\n")
        return point

    def verify_answer(self, target: Target, door: Door, scenario: Scenario) -> bool:
        """Refuse to time a server that answers wrongly."""
        if target.name.startswith("noop"):
            return True
        try:
            allowed = check_once(target, door, self.probe_token(scenario))
        except Exception as exc:
            self.warnings.append(f"{target.name}/{door.value}/{scenario.name}: probe failed: {exc!r}")
            return False
        if allowed != scenario.expect_allow:
            self.warnings.append(
                f"{target.name}/{door.value}/{scenario.name}: WRONG ANSWER (allowed={allowed}, "
                f"expected {scenario.expect_allow})"
            )
            return False
        return True

    def max_throughput(self, target: Target, door: Door, scenario: Scenario, rep: int, **extra: Any) -> dict[str, Any]:
        """Closed-loop maximum throughput of ``target`` at ``door``, with the server's CPU per check."""
        correct = self.verify_answer(target, door, scenario)
        tokens = self.tokens_for(scenario, door, rep)
        work = self.opts.out_dir / "work"
        work.mkdir(exist_ok=True)
        point: dict[str, Any] = dict(
            rep=rep,
            door=door.value,
            target=target.name,
            scenario=scenario.name,
            mode="closed",
            correct=correct,
            pool=len(tokens),
            **extra,
        )
        if door is Door.HTTP:
            cpu0 = procstat.cpu_seconds(target.pids)
            res = tools.wrk(addr=target.http_addr, tokens=tokens, workdir=work, duration_s=self.opts.duration_s)
            server_cpu = procstat.cpu_seconds(target.pids) - cpu0
            point.update(
                tool="wrk",
                throughput=res.throughput,
                requests=res.requests,
                errors=res.errors,
                refusals=res.refusals,
                client_cpu_s=res.cpu_s,
                seconds=res.seconds,
                reused=max(0, res.requests - len(tokens)) if scenario.distinct_tokens else 0,
            )
        elif not scenario.distinct_tokens:
            cpu0 = procstat.cpu_seconds(target.pids)
            res = tools.h2load(
                door=door,
                addr=target.grpc_addr,
                body=wire.grpc_payload(door, tokens[0]),
                workdir=work,
                duration_s=self.opts.duration_s,
                warmup_s=self.opts.warmup_s,
            )
            # h2load's warm-up requests also cost the server CPU; scale by the measured share.
            server_cpu = (procstat.cpu_seconds(target.pids) - cpu0) * (
                self.opts.duration_s / (self.opts.duration_s + self.opts.warmup_s)
            )
            point.update(
                tool="h2load",
                throughput=res.throughput,
                requests=res.requests,
                errors=res.errors,
                refusals=None,
                client_cpu_s=res.cpu_s,
                seconds=res.seconds,
                reused=0,
            )
        else:
            lr, server_cpu = self._own_load(target, door, tokens, mode="closed", rate=0.0)
            point.update(
                tool="bench.loadgen",
                throughput=lr.throughput,
                requests=lr.completed,
                errors=lr.errors,
                refusals=lr.denied,
                client_cpu_s=lr.cpu_s,
                seconds=lr.window_s,
                reused=lr.reused_payloads,
            )
        point["server_cpu_s"] = server_cpu
        point["cpu_per_check_us"] = server_cpu / point["requests"] * 1e6 if point["requests"] else None
        return self._record(point)

    def _own_load(
        self,
        target: Target,
        door: Door,
        tokens: list[str],
        *,
        mode: str,
        rate: float,
        connections: int = 16,
        processes: int = 1,
    ) -> tuple[loadgen.LoadResult, float]:
        payload_file = self.opts.out_dir / "work" / f"payloads-{door.value}-{secrets.token_hex(4)}.bin"
        payload_file.parent.mkdir(exist_ok=True)
        addr = target.addr(door)
        loadgen.write_payloads(payload_file, [wire.payload(door, t, addr) for t in tokens])
        samples: list[float] = []

        def on_window(start: float, end: float) -> None:
            # Sample the server's CPU at the measured window's edges (the load runs in other processes).
            for t in (start, end):
                delay = t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                samples.append(procstat.cpu_seconds(target.pids))

        spec = loadgen.LoadSpec(
            door=door.value,
            addr=addr,
            mode=mode,
            payload_file=str(payload_file),
            duration_s=self.opts.duration_s,
            warmup_s=self.opts.warmup_s,
            rate=rate,
            connections=connections,
            concurrency=32,
            processes=processes,
        )
        result = loadgen.run(spec, on_window=on_window)
        payload_file.unlink()
        return result, samples[1] - samples[0]

    def open_loop(
        self, target: Target, door: Door, scenario: Scenario, rep: int, rate: float, fraction: float
    ) -> dict[str, Any]:
        """Fixed-rate latency of ``target`` at ``rate`` checks/s (from the intended send time)."""
        correct = self.verify_answer(target, door, scenario)
        tokens = self.tokens_for(scenario, door, rep)
        # A gRPC channel multiplexes; HTTP/1.1 needs enough connections that each one's share of the
        # schedule (rate / connections) leaves room for the answer.
        conns = 4 if door.is_grpc else max(8, min(64, int(rate / 500)))
        lr, server_cpu = self._own_load(target, door, tokens, mode="open", rate=rate, connections=conns)
        j = lr.to_json()
        return self._record(
            dict(
                rep=rep,
                door=door.value,
                target=target.name,
                scenario=scenario.name,
                mode="open",
                offered_rate=rate,
                fraction=fraction,
                throughput=lr.throughput,
                requests=lr.completed,
                errors=lr.errors,
                dropped=lr.dropped,
                refusals=lr.denied,
                client_cpu_s=lr.cpu_s,
                server_cpu_s=server_cpu,
                correct=correct,
                tool="bench.loadgen",
                latency=j["latency"],
                service=j["service"],
                lag=j["lag"],
                latency_hdr=j["latency_hdr"],
                cpu_per_check_us=server_cpu / lr.completed * 1e6 if lr.completed else None,
            )
        )

    def measure_floor(self) -> None:
        """Baseline (c) per algorithm."""
        for alg, key in self.keys.items():
            tokens = issuer.mint(key, self.issuer_url, 200)
            self.floor[alg] = floor.measure(
                key, tokens, self.issuer_url, min_time_s=0.1 if self.opts.duration_s < 2 else 0.3
            )


def machine_info() -> dict[str, Any]:
    """What the numbers ran on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    versions = {}
    for tool, flag in (("wrk", "-v"), ("h2load", "--version")):
        with contextlib.suppress(OSError):
            out = subprocess.run([tool, flag], capture_output=True, text=True, timeout=5)
            versions[tool] = (out.stdout or out.stderr).strip().splitlines()[0]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def plan(bench: Bench) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The steps of a run, in order; each is (label, action). Targets alternate within a repetition."""
    o = bench.opts
    cached = next((s for s in o.scenarios if s.kind == "cached"), None)
    from bench.scenarios import SCENARIOS

    cached_s = cached or SCENARIOS["jwt-cached"]
    noop_max: dict[tuple[str, int], float] = {}

    def noop_point(door: Door, rep: int) -> None:
        p = bench.max_throughput(bench.targets["noop"], door, cached_s, rep)
        noop_max[(door.value, rep)] = p["throughput"]

    def open_points(door: Door, rep: int, fraction: float) -> None:
        rate = max(50.0, noop_max[(door.value, rep)] * fraction)
        names = ["noop"] + (["verifier"] if "verifier" in bench.targets else [])
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            bench.open_loop(bench.targets[name], door, cached_s, rep, rate, fraction)

    for rep in range(o.reps):
        for door in o.doors:
            yield f"rep {rep + 1} {door.value}: noop max", lambda d=door, r=rep: noop_point(d, r)
            if "verifier" in bench.targets:
                for s in o.scenarios:
                    if door in s.doors:
                        yield (
                            f"rep {rep + 1} {door.value}: verifier {s.name}",
                            lambda d=door, r=rep, s=s: bench.max_throughput(bench.targets["verifier"], d, s, r),
                        )
            if "naive" in bench.targets:
                yield (
                    f"rep {rep + 1} {door.value}: naive",
                    lambda d=door, r=rep: bench.max_throughput(bench.targets["naive"], d, cached_s, r),
                )
            for f in o.load_fractions:
                yield f"rep {rep + 1} {door.value}: open loop {f:.0%}", lambda d=door, r=rep, f=f: open_points(d, r, f)


def workers_plan(bench: Bench) -> Iterator[tuple[str, Callable[[], Any]]]:
    """Throughput against worker processes for the no-op (the verifier has no --workers yet)."""
    from bench.scenarios import SCENARIOS

    for n in bench.opts.workers:

        def run_n(n: int = n) -> None:
            target = bench.start_baseline("noop", workers=n)
            try:
                for door in bench.opts.doors:
                    bench.max_throughput(target, door, SCENARIOS["jwt-cached"], 0, workers=n, series="workers")
            finally:
                bench.stop(target)

        yield f"workers: noop x{n}", run_n


def median(values: list[float]) -> float:
    """Median, NaN when empty."""
    return statistics.median(values) if values else float("nan")
