"""``python -m bench run --scenario introspection [--quick]``: opaque tokens against a provider with ~20 ms latency.

The provider is verifier/devidp.py in a process of its own (bench/idp.py) with ``delay_seconds``
(``--delay``, default 0.02), so every introspection call takes at least that long. Three targets,
alternated per scenario, all at the forward-auth door: ``verifier batch off`` (``introspection:
{endpoint}``: one POST per distinct token, single flight and caches in front of it), ``verifier batch
on`` (the default configuration, client id and secret only: both endpoints from the provider's discovery,
its ``introspection_batch_endpoint`` included, so batch mode is on by default), and ``naive``
(bench/baselines.py ``introspect``: one provider call per request, nothing cached). Three scenarios, each an
open loop at ``--rate`` checks/s (default 1,000; 64 keep-alive connections so that a 20 ms answer does not queue
on its connection):

* ``hot``      -- 100 live tokens, cycled (a fresh 100 per target, so nothing is cached before the run);
* ``distinct`` -- a pool of 10,000 live tokens, each sent once;
* ``flood``    -- distinct junk (not JWTs, so it goes to introspection), each sent twice, the second
  time (pool / rate) seconds after the first: the repeat must come from the negative cache.

Provider calls are read from devidp's counters at the measured window's edges (per 1,000 checks) and
over the whole run (warm-up included) to compare with the distinct tokens the run sent.
Goals (issue "Opaque tokens"): tokens asked of the provider <= distinct live tokens sent (hot,
distinct) and <= distinct junk sent (flood); verifier p99 <= provider latency + 5 ms; and (#24 goal 7)
verifier CPU per first-seen opaque token <= 300 us: in ``distinct`` every check is a token never seen
before, so the verifier's CPU over the window (from /proc) divided by the tokens it asked the provider
about in the window is the whole cost of one first-seen token (door, pipeline, introspection, audit).

``--before DIR`` runs a second pair of targets, ``before batch off`` / ``before batch on``: the verifier
of another checkout (the code before a change), alternated with the others in the same run. ``--reps N``
repeats every (scenario, target) point N times, alternating; the CPU table gives medians. ``--only
distinct`` runs that scenario alone (#24 goal 7's figure), ``--no-naive`` leaves the naive target out.
``--syscalls 1`` counts the verifier's system calls and context switches over each measured window with
``perf stat`` (kernel tracepoints; needs perf and root) and prints them per token asked of the provider.
``--floor 1`` adds the stack's floor to ``distinct``: the no-op on the verifier's own stack (bench/baselines.py:
uvloop + httptools, a canned 200, nothing decided) at the same rate, its CPU per request being what one
request/answer exchange costs a process on this machine at this rate (wake-up, read, write, TCP on loopback);
a first-seen opaque token makes two (the gateway's request and the provider call).
The verifier's CPU is its process tree's (supervisor and worker) over the measured window only, split into
user and system time.
"""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import idp, procs, report, runner, wire
from bench.runner import Context
from bench.wire import Door

HOT_TOKENS = 100
DISTINCT_TOKENS = 10_000
CONNECTIONS = 64  # rate x latency x headroom: each connection sends every 64 ms, answers take ~21 ms
P99_BUDGET_MS = 5.0  # on top of the provider's latency
SCENARIOS = ("hot", "distinct", "flood")
TARGETS = ("verifier batch off", "verifier batch on", "naive")
FLOOR = "no-op floor"  # --floor: the no-op on the same stack, CPU per request
FIRST_SEEN_CPU_GOAL_US = 300.0  # #24 goal 7: verifier CPU per first-seen opaque token
SYSCALLS = ("read", "write", "epoll_pwait", "epoll_wait", "getpid", "futex")  # --syscalls: counted one by one


class SyscallCount:
    """``perf stat`` on a target's processes between two calls of ``edge()`` (the measured window's edges)."""

    def __init__(self, pids: tuple[int, ...], out: Path) -> None:
        self.pids, self.out = pids, out
        self.proc: subprocess.Popen[bytes] | None = None
        self.counts: dict[str, float] = {}

    def edge(self) -> dict[str, float]:
        """Starts counting at the first edge, stops and reads the counts at the second."""
        if self.proc is None:
            events = ["raw_syscalls:sys_enter", "context-switches"] + [f"syscalls:sys_enter_{n}" for n in SYSCALLS]
            pids = ",".join(str(pid) for root in self.pids for pid in procs.tree(root))
            cmd = ["perf", "stat", "-x", ",", "-o", str(self.out), "-e", ",".join(events), "-p", pids]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
            for line in self.out.read_text().splitlines():
                fields = line.split(",")
                if len(fields) > 2 and fields[0].isdigit():
                    name = fields[2].removeprefix("syscalls:sys_enter_").removeprefix("raw_syscalls:sys_enter")
                    self.counts[name or "syscalls"] = float(fields[0])
        return {}


def run(ctx: Context) -> None:
    """Every (scenario, target) point, alternated; writes results."""
    rate, delay = ctx.opt("rate", 1000.0), ctx.opt("delay", 0.02)
    duration, warmup, reps = ctx.opt("duration", 10.0, 4.0), 1.0, ctx.opt("reps", 1)
    before = ctx.opt("before", "")
    scenarios = tuple(s for s in SCENARIOS if s in (ctx.opt("only", "") or ",".join(SCENARIOS)).split(","))
    os.environ.setdefault(idp.SECRET_ENV, secrets.token_urlsafe(24))  # the provider and the verifiers inherit it
    sent = int(rate * (warmup + duration))
    distinct_pool = min(DISTINCT_TOKENS, sent)
    names = tuple(t for t in TARGETS if t != "naive" or not ctx.args.no_naive)
    names += ("before batch off", "before batch on") if before else ()
    floor = bool(ctx.opt("floor", 0)) and "distinct" in scenarios
    names += (FLOOR,) if floor else ()
    # Fresh live tokens for every (scenario, target, repetition): hot and distinct pools, plus probes.
    per_point = HOT_TOKENS + distinct_pool + 4
    provider = idp.Issuer(ctx.servers, opaque=per_point * len(names) * reps, delay_s=delay)
    pool = iter(provider.opaque)
    base = f"{provider.url}/introspect"
    intro = f'    introspection: {{client_id: {idp.CLIENT_ID}, client_secret_env: {idp.SECRET_ENV}, endpoint: "{base}"'
    batch = intro + f', batch_endpoint: "{base}/batch"}}\n'  # a tree of before the batch endpoint was discovered
    default = f"    introspection: {{client_id: {idp.CLIENT_ID}, client_secret_env: {idp.SECRET_ENV}}}\n"
    targets = {
        "verifier batch off": ctx.servers.start_verifier(
            provider.url, name="verifier batch off", issuer_yaml=intro + "}\n"
        ),
        "verifier batch on": ctx.servers.start_verifier(provider.url, name="verifier batch on", issuer_yaml=default),
    }
    if "naive" in names:
        targets["naive"] = ctx.servers.start_baseline("introspect", issuer=provider.url).renamed("naive")
    if floor:
        targets[FLOOR] = ctx.servers.start_baseline("noop").renamed(FLOOR)
    if before:
        tree = Path(before).resolve()
        targets["before batch off"] = ctx.servers.start_verifier(
            provider.url, name="before batch off", issuer_yaml=intro + "}\n", tree=tree
        )
        targets["before batch on"] = ctx.servers.start_verifier(
            provider.url, name="before batch on", issuer_yaml=batch, tree=tree
        )

    syscalls = bool(ctx.opt("syscalls", 0))

    def counts() -> dict[str, float]:
        return {**provider.counts(), "provider_cpu": procs.cpu_seconds([provider.proc.pid])}

    def split(target: Any) -> dict[str, float]:
        user, system = procs.cpu_split(target.pids)
        return {"user": user, "system": system}

    points = []
    for rep, k, scenario in ((r, k, s) for r in range(reps) for k, s in enumerate(scenarios)):
        for name in names if (k + rep) % 2 == 0 else names[::-1]:
            target = targets[name]
            if name == FLOOR and scenario != "distinct":
                continue
            if scenario == "flood":
                junk = [secrets.token_urlsafe(32) for _ in range(max(1, sent // 2))]
                tokens, probe, allow, distinct = junk + junk, secrets.token_urlsafe(32), False, min(len(junk), sent)
            else:
                tokens = [next(pool) for _ in range(HOT_TOKENS if scenario == "hot" else distinct_pool)]
                probe, allow, distinct = next(pool), True, min(len(tokens), sent)
            correct = ctx.guard(target, Door.HTTP, probe, allow)
            provider.reset()
            payloads = [wire.http_request(wire.http_headers(t), target.http_addr) for t in tokens]
            perf = SyscallCount(target.pids, ctx.work / f"perf-{len(points)}.txt") if syscalls else None
            p = runner.open_loop(
                ctx,
                target,
                Door.HTTP,
                payloads,
                rate,
                duration_s=duration,
                warmup_s=warmup,
                connections=CONNECTIONS,
                sample=lambda perf=perf, t=target: {**(perf.edge() if perf else {}), **split(t), **counts()},
            )
            total, w, checks = provider.counts(), p["window"], p["requests"] or 1
            p.update(scenario=scenario, correct=correct, run_distinct=distinct, run_sent=sent, pool=len(set(tokens)))
            p.update(rep=rep + 1)
            p.update(window_calls_per_1000=(w["introspection_calls"] + w["batch_calls"]) * 1000 / checks)
            p.update(window_asks_per_1000=(w["introspection_calls"] + w["batch_tokens"]) * 1000 / checks)
            asked = w["introspection_calls"] + w["batch_tokens"]
            first_seen = scenario == "distinct" and name != "naive" and asked
            p.update(first_seen_cpu_us=p["server_cpu_s"] * 1e6 / asked if first_seen else None)
            per = asked if first_seen else checks  # user / system us per first-seen token, else per check
            p.update(user_us=w["user"] * 1e6 / per, system_us=w["system"] * 1e6 / per)
            if perf is not None and asked:
                p.update(per_token={k: v / asked for k, v in perf.counts.items()})
            p.update(run_calls=total["introspection_calls"] + total["batch_calls"], provider_cpu_s=w["provider_cpu"])
            p.update(run_asks=total["introspection_calls"] + total["batch_tokens"])
            points.append(ctx.record(p))
            cpu = f", {p['first_seen_cpu_us']:.0f} us CPU per first-seen token" if p["first_seen_cpu_us"] else ""
            if p.get("per_token"):
                cpu += ", per token: " + " ".join(f"{k} {v:.2f}" for k, v in p["per_token"].items() if v)
            print(
                f"bench: {scenario:8} {name:18} p99 {p['latency']['p99']:.2f} ms, asked {p['run_asks']} / {distinct}"
                + cpu,
                file=sys.stderr,
            )
    result = dict(rate=rate, delay_s=delay, duration_s=duration, warmup_s=warmup, warnings=ctx.warnings, points=points)
    result.update(reps=reps, before=before)
    report.write(ctx.out, markdown(ctx, result), result)


def goals(result: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(goal, measured, met) for every verifier point."""
    budget = result["delay_s"] * 1000 + P99_BUDGET_MS
    out = []
    for name, values in first_seen_cpu(result).items():
        if not name.startswith("before"):
            median = statistics.median(values)
            label = f"distinct, {name}: verifier CPU per first-seen opaque token <= {FIRST_SEEN_CPU_GOAL_US:g} us"
            out.append((label, f"{median:.0f} us (median of {len(values)})", median <= FIRST_SEEN_CPU_GOAL_US))
    for p in result["points"]:
        if p["target"] in ("naive", FLOOR) or p["target"].startswith("before"):
            continue
        label, kind = f"{p['scenario']}, {p['target']}", "junk" if p["scenario"] == "flood" else "live"
        lost = p["errors"] + p["dropped"]
        # Requests that failed or were never sent make "distinct sent" an over-count: not conclusive.
        asks_ok = (p["run_asks"] <= p["run_distinct"] and p["correct"]) if not lost else None
        measured = f"{p['run_asks']:,} <= {p['run_distinct']:,}" + (f" ({lost:,} errors/dropped)" if lost else "")
        out.append((f"{label}: tokens asked <= distinct {kind} tokens sent", measured, asks_ok))
        out.append((f"{label}: p99 <= {budget:g} ms", f"{p['latency']['p99']:.2f} ms", p["latency"]["p99"] <= budget))
    return out


def first_seen_cpu(result: dict[str, Any]) -> dict[str, list[float]]:
    """target -> verifier CPU per first-seen token (us) of each ``distinct`` repetition."""
    out: dict[str, list[float]] = {}
    for p in result["points"]:
        if p.get("first_seen_cpu_us"):
            out.setdefault(p["target"], []).append(p["first_seen_cpu_us"])
    return out


def cpu_table(result: dict[str, Any]) -> str:
    """Medians of CPU per first-seen token, each target against its ``before`` twin when there is one."""
    figures = first_seen_cpu(result)
    rows = []
    for name, values in figures.items():
        twin = figures.get(name.replace("verifier", "before")) if name.startswith("verifier") else None
        median = statistics.median(values)
        ratio = f"{median / statistics.median(twin):.2f}" if twin else "-"
        runs = "; ".join(f"{v:.0f}" for v in values)
        rows.append([name, runs, f"{median:.0f}", ratio])
    floor = [p["cpu_per_check_us"] for p in result["points"] if p["target"] == FLOOR and p["cpu_per_check_us"]]
    if floor:
        name = f"{FLOOR} (CPU per request: one exchange; a first-seen token makes two)"
        rows.append([name, "; ".join(f"{v:.0f}" for v in floor), f"{statistics.median(floor):.0f}", "-"])
    headers = ["target", "CPU per first-seen token, us (repetitions)", "median", "median / before's"]
    return report.table(headers, rows, left=2)


def markdown(ctx: Context, r: dict[str, Any]) -> str:
    """The table and the goals."""
    headers = ["scenario", "target", "achieved/s", "p50 ms", "p99 ms", "p99.9 ms", "allowed", "refused", "errors"]
    headers += ["provider calls / 1,000 checks", "tokens asked / 1,000 checks", "run: tokens asked / distinct sent"]
    headers += [
        "verifier CPU/check us",
        "CPU per first-seen token us",
        "of it user / system us",
        "verifier CPU (cores)",
        "client CPU (cores)",
        "provider CPU (cores)",
        "load avg",
    ]
    rows = [
        [p["scenario"], p["target"], report.fmt(p["throughput"])]
        + [f"{p['latency'][k]:.2f}" for k in ("p50", "p99", "p99.9")]
        + [f"{p['allowed']:,}", f"{p['refusals']:,}", f"{p['errors'] + p['dropped']:,}"]
        + [
            f"{p['window_calls_per_1000']:.1f}",
            f"{p['window_asks_per_1000']:.1f}",
            f"{p['run_asks']:,} / {p['run_distinct']:,}",
        ]
        + [report.fmt(p["cpu_per_check_us"]), report.fmt(p["first_seen_cpu_us"]) if p["first_seen_cpu_us"] else "-"]
        + [f"{p['user_us']:.0f} / {p['system_us']:.0f}" if "user_us" in p else "-"]
        + [report.cores(p["server_cpu_s"], p["seconds"])]
        + [report.cores(p["client_cpu_s"], p["seconds"]), report.cores(p["provider_cpu_s"], p["seconds"]), p["loadavg"]]
        for p in r["points"]
    ]
    what = f"Open loop at {r['rate']:,.0f} checks/s on forward-auth, {CONNECTIONS} keep-alive connections, "
    what += f"{r['duration_s']:g} s measured after {r['warmup_s']:g} s warm-up; provider: verifier/devidp.py in its "
    what += f"own process with delay_seconds={r['delay_s']:g}; {r['reps']} alternating repetition(s)"
    what += f"; before = {r['before']}" if r["before"] else ""
    goal_rows = [[g, m, report.verdict(ok)] for g, m, ok in goals(r)]
    lines = [
        ctx.header(what),
        "",
        report.table(headers, rows, left=2),
        "",
        cpu_table(r),
        "",
        report.table(["goal", "measured", "result"], goal_rows),
    ]
    counted = [p for p in r["points"] if p.get("per_token")]
    if counted:  # --syscalls
        names = list(counted[0]["per_token"])
        rows = [[p["target"], str(p["rep"])] + [f"{p['per_token'].get(n, 0):.2f}" for n in names] for p in counted]
        lines += ["", "Per token asked of the provider (perf stat over the window):", ""]
        lines.append(report.table(["target", "rep", *names], rows, left=2))
    return "\n".join(lines + [f"- warning: {w}" for w in r["warnings"]]) + "\n"
