"""``python -m bench run --scenario introspection [--quick]``: opaque tokens against a provider with ~20 ms latency.

The provider is verifier/devidp.py in a helper process (bench/idp_helper.py) with ``delay_seconds``
(default 0.02), so every introspection call takes at least that long. Three targets, alternated per
scenario, all at the forward-auth door:

* ``verifier batch off`` -- ``introspection: {endpoint: .../introspect}``: one POST per distinct token,
  single flight and caches in front of it;
* ``verifier batch on``  -- the same plus ``batch_endpoint: .../introspect/batch``;
* ``naive``              -- bench/naive_introspect.py: the same asyncio + httptools stack, one provider
  call per request, nothing cached (what a user writes first).

Three scenarios, each an open loop at ``--rate`` checks/s (default 1,000; latency from the intended
send time, 64 keep-alive connections so that a 20 ms answer does not queue on its connection):

* ``hot``      -- 100 live tokens, cycled (a fresh 100 per target, so nothing is cached before the run);
* ``distinct`` -- a pool of 10,000 live tokens, each sent once (quick mode sends the first rate x 5 s);
* ``flood``    -- distinct junk (not JWTs, so it goes to introspection), each sent twice, the second
  time (pool / rate) seconds after the first: the repeat must come from the negative cache.

Provider calls are read from devidp's counters at the measured window's edges (per 1,000 checks) and
over the whole run (warm-up included) to compare with the distinct tokens the run sent.
Goals (issue "Opaque tokens"): tokens asked of the provider <= distinct live tokens sent (hot,
distinct) and <= distinct junk sent (flood); verifier p99 <= provider latency + 5 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from typing import Any

from bench import extras, loadgen, procstat, runner, wire
from bench.idp_helper import CLIENT_ID, SECRET_ENV
from bench.wire import Door, Target

HOT_TOKENS = 100
DISTINCT_TOKENS = 10_000
CONNECTIONS = 64  # rate x latency x headroom: each connection sends every 64 ms, answers take ~21 ms
P99_BUDGET_MS = 5.0  # on top of the provider's latency
SCENARIOS = ("hot", "distinct", "flood")
TARGETS = ("verifier batch off", "verifier batch on", "naive")


def _get(url: str, method: str = "GET") -> dict[str, Any]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return dict(json.loads(resp.read()))


class Provider:
    """The helper process and its control port."""

    def __init__(self, bench: runner.Bench, delay_s: float, opaque: int) -> None:
        self.port, self.control = runner.free_port(), runner.free_port()
        self.tokens_file = bench.opts.out_dir / "opaque-tokens.txt"
        cmd = [
            sys.executable,
            "-m",
            "bench.idp_helper",
            "--port",
            str(self.port),
            "--control",
            str(self.control),
            "--delay",
            str(delay_s),
            "--opaque",
            str(opaque),
            "--tokens",
            str(self.tokens_file),
        ]
        logf = (bench.opts.out_dir / "provider.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=runner.PROJECT_ROOT)
        bench.procs.append(self.proc)
        runner._wait_port(f"127.0.0.1:{self.control}", self.proc, timeout=60)
        self.tokens = self.tokens_file.read_text().split()

    @property
    def issuer(self) -> str:
        """The provider's issuer URL."""
        return f"http://127.0.0.1:{self.port}"

    def counts(self) -> dict[str, int]:
        """devidp's call counters."""
        return {k: int(v) for k, v in _get(f"http://127.0.0.1:{self.control}/counts").items()}

    def reset(self) -> None:
        """Zero the counters."""
        _get(f"http://127.0.0.1:{self.control}/reset", "POST")


def _asks(c: dict[str, int]) -> int:
    """Tokens the provider was asked about (one per POST /introspect, all of a batch)."""
    return c["introspection_calls"] + c["batch_tokens"]


def _calls(c: dict[str, int]) -> int:
    """HTTP requests the provider served."""
    return c["introspection_calls"] + c["batch_calls"]


def _diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a[k] for k in a}


def _point(
    bench: runner.Bench,
    provider: Provider,
    target: Target,
    scenario: str,
    tokens: list[str],
    rate: float,
    probe: str,
    expect_allow: bool,
) -> dict[str, Any]:
    """One open-loop point; the counters are zeroed after the correctness probe."""
    o = bench.opts
    correct = runner.check_once(target, Door.HTTP, probe) == expect_allow
    if not correct:
        bench.warnings.append(f"{target.name}/{scenario}: WRONG ANSWER on the probe (expected allow={expect_allow})")
    work = o.out_dir / "work"
    work.mkdir(exist_ok=True)
    payload_file = work / f"payloads-{secrets.token_hex(4)}.bin"
    loadgen.write_payloads(payload_file, [wire.http_request(t, target.http_addr) for t in tokens])
    provider.reset()
    marks: list[tuple[float, dict[str, int]]] = []

    def on_window(start: float, end: float) -> None:
        for t in (start, end):
            delay = t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            marks.append(
                (
                    procstat.cpu_seconds(target.pids),
                    provider.counts() | {"pcpu": int(procstat.cpu_seconds([provider.proc.pid]) * 1e6)},
                )
            )

    spec = loadgen.LoadSpec(
        door=Door.HTTP.value,
        addr=target.http_addr,
        mode="open",
        payload_file=str(payload_file),
        duration_s=o.duration_s,
        warmup_s=o.warmup_s,
        rate=rate,
        connections=CONNECTIONS,
    )
    lr = loadgen.run(spec, on_window=on_window)
    payload_file.unlink()
    total = provider.counts()
    window = _diff(marks[0][1], marks[1][1])
    sent = int(rate * (o.warmup_s + o.duration_s))
    distinct = min(len(tokens), sent)
    j = lr.to_json()
    checks = lr.completed or 1
    point = dict(
        scenario=scenario,
        target=target.name,
        offered_rate=rate,
        throughput=lr.throughput,
        completed=lr.completed,
        allowed=lr.allowed,
        denied=lr.denied,
        errors=lr.errors,
        dropped=lr.dropped,
        latency=j["latency"],
        lag=j["lag"],
        latency_hdr=j["latency_hdr"],
        client_cpu_s=lr.cpu_s,
        server_cpu_s=marks[1][0] - marks[0][0],
        provider_cpu_s=(window["pcpu"]) / 1e6,
        window_calls_per_1000=_calls(window) * 1000 / checks,
        window_asks_per_1000=_asks(window) * 1000 / checks,
        run_calls=_calls(total),
        run_asks=_asks(total),
        run_sent=sent,
        run_distinct=distinct,
        pool=len(tokens),
        correct=correct,
        loadavg=extras.loadavg(),
    )
    with (o.out_dir / "points.jsonl").open("a") as fh:
        fh.write(json.dumps(point) + "\n")
    print(
        f"bench: {scenario:8} {target.name:18} p50 {j['latency']['p50']:.2f} ms p99 {j['latency']['p99']:.2f} ms "
        f"asks/1000 {point['window_asks_per_1000']:.0f} calls/1000 {point['window_calls_per_1000']:.0f} "
        f"run asks {point['run_asks']} / distinct {distinct}",
        file=sys.stderr,
    )
    return point


def _start_naive(bench: runner.Bench, provider: Provider, env: dict[str, str]) -> Target:
    addr = f"127.0.0.1:{runner.free_port()}"
    cmd = [
        sys.executable,
        "-m",
        "bench.naive_introspect",
        "--http",
        addr,
        "--endpoint",
        f"{provider.issuer}/introspect",
    ]
    logf = (bench.opts.out_dir / "naive.log").open("ab")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=runner.PROJECT_ROOT, env=env)
    bench.procs.append(proc)
    runner._wait_port(addr, proc)
    return Target(name="naive", grpc_addr="", http_addr=addr, pids=(proc.pid,))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (scenario, target) point; returns the results (also written under ``--out``)."""
    duration = args.duration or (4.0 if args.quick else 10.0)
    out = extras.out_dir("introspection", args.out)
    opts = runner.Options(scenarios=[], doors=[], out_dir=out, duration_s=duration, warmup_s=1.0, with_naive=False)
    bench = runner.Bench(opts)
    load_start = extras.loadavg()
    env = {**os.environ, SECRET_ENV: secrets.token_urlsafe(24)}
    os.environ[SECRET_ENV] = env[SECRET_ENV]  # the helper and the verifiers inherit it
    sent = int(args.rate * (opts.warmup_s + duration))
    points: list[dict[str, Any]] = []
    started = time.time()
    try:
        # Fresh live tokens for every (scenario, target): hot and distinct pools, plus probes.
        need = (HOT_TOKENS + DISTINCT_TOKENS + 4) * len(TARGETS)
        provider = Provider(bench, args.delay, need)
        pool = iter(provider.tokens)
        base = f"{provider.issuer}/introspect"
        intro = f'    introspection: {{client_id: {CLIENT_ID}, client_secret_env: {SECRET_ENV}, endpoint: "{base}"'
        targets = {
            "verifier batch off": extras.start_verifier(
                bench, issuer_url=provider.issuer, extra_issuer=intro + "}\n", log="verifier-batch-off.log"
            ),
            "verifier batch on": extras.start_verifier(
                bench,
                issuer_url=provider.issuer,
                extra_issuer=intro + f', batch_endpoint: "{base}/batch"}}\n',
                log="verifier-batch-on.log",
            ),
            "naive": _start_naive(bench, provider, env),
        }
        targets = {name: Target(**{**t.__dict__, "name": name}) for name, t in targets.items()}
        for k, scenario in enumerate(SCENARIOS):
            order = TARGETS if k % 2 == 0 else TARGETS[::-1]
            for name in order:
                if scenario == "hot":
                    tokens = [next(pool) for _ in range(HOT_TOKENS)]
                    probe, allow = next(pool), True
                elif scenario == "distinct":
                    tokens = [next(pool) for _ in range(DISTINCT_TOKENS)]
                    probe, allow = next(pool), True
                else:
                    junk = [secrets.token_urlsafe(32) for _ in range(max(1, sent // 2))]
                    tokens = junk + junk  # each junk token twice, pool/rate seconds apart
                    probe, allow = secrets.token_urlsafe(32), False
                p = _point(bench, provider, targets[name], scenario, tokens, args.rate, probe, allow)
                if scenario == "flood":
                    p["pool"] = len(junk)
                    p["run_distinct"] = min(len(junk), sent)
                points.append(p)
    finally:
        bench.stop()
    result = dict(
        options=dict(rate=args.rate, delay_s=args.delay, duration_s=duration, warmup_s=opts.warmup_s),
        took_s=time.time() - started,
        loadavg_start=load_start,
        loadavg_end=extras.loadavg(),
        machine=runner.machine_info(),
        warnings=bench.warnings,
        points=points,
    )
    extras.write(out, markdown(result), result)
    return result


def goals(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for every verifier point."""
    budget = result["options"]["delay_s"] * 1000 + P99_BUDGET_MS
    out = []
    for p in result["points"]:
        if p["target"] == "naive":
            continue
        label = f"{p['scenario']}, {p['target']}"
        kind = "junk" if p["scenario"] == "flood" else "live"
        lost = p["errors"] + p["dropped"]
        # Requests that failed or were never sent make "distinct sent" an over-count: not conclusive.
        asks_ok: bool | None = (p["run_asks"] <= p["run_distinct"] and p["correct"]) if not lost else None
        out.append(
            (
                f"{label}: tokens asked <= distinct {kind} tokens sent",
                f"{p['run_asks']:,} <= {p['run_distinct']:,}" + (f" ({lost:,} errors/dropped)" if lost else ""),
                asks_ok,
            )
        )
        out.append((f"{label}: p99 <= {budget:g} ms", f"{p['latency']['p99']:.2f} ms", p["latency"]["p99"] <= budget))
    return out


def markdown(result: dict[str, Any]) -> str:
    """The table and the goals."""
    o = result["options"]
    lines = [
        f"Open loop at {o['rate']:,.0f} checks/s on forward-auth, {CONNECTIONS} keep-alive connections, "
        f"{o['duration_s']:g} s measured after {o['warmup_s']:g} s warm-up; provider: verifier/devidp.py in its "
        f"own process with delay_seconds={o['delay_s']:g}. Load average (1/5/15 min) at start "
        f"{result['loadavg_start']}, at end {result['loadavg_end']}; took {result['took_s']:.0f} s.",
        "",
        extras.table(
            [
                "scenario",
                "target",
                "achieved/s",
                "p50 ms",
                "p99 ms",
                "p99.9 ms",
                "allowed",
                "refused",
                "errors",
                "provider calls / 1,000 checks",
                "tokens asked / 1,000 checks",
                "run: tokens asked / distinct sent",
                "verifier CPU/check us",
                "provider CPU (cores)",
                "load avg",
            ],
            [
                [
                    p["scenario"],
                    p["target"],
                    f"{p['throughput']:,.0f}",
                    f"{p['latency']['p50']:.2f}",
                    f"{p['latency']['p99']:.2f}",
                    f"{p['latency']['p99.9']:.2f}",
                    f"{p['allowed']:,}",
                    f"{p['denied']:,}",
                    f"{p['errors'] + p['dropped']:,}",
                    f"{p['window_calls_per_1000']:.1f}",
                    f"{p['window_asks_per_1000']:.1f}",
                    f"{p['run_asks']:,} / {p['run_distinct']:,}",
                    f"{p['server_cpu_s'] / max(1, p['completed']) * 1e6:.0f}",
                    f"{p['provider_cpu_s'] / o['duration_s']:.2f}",
                    p["loadavg"],
                ]
                for p in result["points"]
            ],
            right=[False, False] + [True] * 12 + [False],
        ),
        "",
        extras.table(
            ["goal", "measured", "result"],
            [[g, m, "N/A" if ok is None else extras.verdict(ok)] for g, m, ok in goals(result)],
            right=[False, True, False],
        ),
    ]
    if result["warnings"]:
        lines += ["", *[f"- warning: {w}" for w in result["warnings"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m bench run --scenario introspection", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="4 s points (default 10 s)")
    parser.add_argument("--duration", type=float, help="seconds measured per point")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered checks/s (open loop)")
    parser.add_argument("--delay", type=float, default=0.02, help="provider latency in seconds")
    parser.add_argument("--out", help="results folder (default bench/results/<timestamp>-introspection)")
    run(parser.parse_args(argv))
