"""The token scenarios: each token kind at every door against the same-run baselines, alternated.

Targets, each measured at every door in the same run and alternated within each repetition so that
drift (thermal, noisy neighbours) hits all of them alike: ``verifier`` (``python -m verifier serve``
pointed at the bench's provider), ``noop`` and ``naive`` (bench/baselines.py: the same stack deciding
nothing, or verifying with a fresh PyJWKClient per request) and ``floor`` (bench/floor.py: in-process
parse + signature verify per algorithm). Maximum throughput is closed loop (:func:`runner.closed`);
latency is open loop at fractions of the no-op's maximum, from the intended send time.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import floor, idp, procs, report, runner, wire
from bench.report import Goal, fmt, median
from bench.runner import Context
from bench.wire import Door

# The goals of the benchmark issue.
GOAL_CACHED_THROUGHPUT = 0.8  # verifier cached max / no-op max, same door, at least (forward-auth: #24 goal 1)
GOAL_CACHED_THROUGHPUT_GRPC = 0.85  # the same for the gRPC doors (#24 goal 3)
GOAL_P99_RATIO = 1.3  # verifier p99 / no-op p99 at half the no-op's max rate, at most
GOAL_CPU_RATIO = 1.5  # first-seen ES256 server CPU per check / raw parse+verify, at most (#24 goal 2)
GOAL_FORWARD_AUTH = 1.0  # forward-auth cached max / gRPC cached max, at least
HALF = 0.5
LAG_TRUST = 0.1  # an open-loop row is a server figure when the generator's send lag p99 is <= this x the no-op's p99
P99_SPREAD_TRUST = 2.0  # ... and each target's p99 varies at most this much (max/min) across repetitions
NOOP_LIKE = "noop-like-verifier"  # the no-op with a serving worker's GC and gRPC settings (open loop at HALF only)
# At HALF at a gRPC door the no-op and the verifier also run with the other client model (bench/runner.py,
# GRPC_CLIENTS: the run's --grpc-client, default Envoy's pool, next to fixed connections), under these names.
OTHER_CLIENT = {"noop": "noop, {} client", "verifier": "verifier, {} client"}
TWO = ("verifier", "noop")


@dataclass(frozen=True, kw_only=True)
class TokenKind:
    """What a token scenario sends: one repeated token, each token once, or junk (refused)."""

    name: str
    kind: str  # "cached", "first_seen" or "garbage"
    alg: str = "ES256"
    description: str = ""

    @property
    def expect_allow(self) -> bool:
        """Whether the verifier must allow these tokens."""
        return self.kind != "garbage"


KINDS = (
    TokenKind(name="jwt-cached", kind="cached", description="one valid ES256 token, repeated"),
    TokenKind(name="jwt-first-seen-es256", kind="first_seen", alg="ES256", description="each ES256 token once"),
    TokenKind(name="jwt-first-seen-rs256", kind="first_seen", alg="RS256", description="each RS256 token once"),
    TokenKind(name="jwt-first-seen-eddsa", kind="first_seen", alg="EdDSA", description="each EdDSA token once"),
    TokenKind(name="garbage-flood", kind="garbage", description="distinct junk tokens, every one refused"),
)
CACHED = KINDS[0]


def run(ctx: Context, kinds: list[TokenKind]) -> None:
    """Every kind at every door, with the baselines; writes results.md/json and latency-vs-load.png."""
    from tqdm import tqdm

    quick = ctx.quick
    doors = [Door(d) for d in ctx.args.door] if ctx.args.door else list(Door)
    duration, warmup = ctx.opt("duration", 5.0, 1.0), 0.3 if quick else 1.0
    reps, fractions = ctx.opt("reps", 3, 1), (0.25, 0.5) if quick else (0.25, 0.5, 0.75, 0.9)
    pool_size = 5_000 if quick else 25_000  # first-seen tokens per (door, rep): above checks/s x duration
    issuer = idp.Issuer(ctx.servers)
    targets = {"noop": ctx.servers.start_baseline("noop")}
    if not ctx.args.no_verifier:  # the verifier's settings on the no-op: its code apart from them
        targets[NOOP_LIKE] = ctx.servers.start_baseline("noop", settings="verifier").renamed(NOOP_LIKE)
    if not ctx.args.no_naive:
        targets["naive"] = ctx.servers.start_baseline("naive", issuer=issuer.url)
    if not ctx.args.no_verifier:
        try:
            policies = wire.TWO_POLICIES if getattr(ctx.args, "policies", False) else ""
            targets["verifier"] = ctx.servers.start_verifier(issuer.url, root_yaml=policies)
        except RuntimeError as exc:
            ctx.warnings.append(f"verifier did not start: {exc} (see verifier.log)")
    pools: dict[tuple[str, str, int], list[str]] = {}

    def tokens(kind: TokenKind, door: Door, rep: int) -> list[str]:
        if kind.kind == "cached":
            return [issuer.cached_token]
        if (kind.name, door.value, rep) not in pools:
            make = idp.garbage(pool_size) if kind.kind == "garbage" else issuer.mint(kind.alg, pool_size)
            pools[(kind.name, door.value, rep)] = make
        return pools[(kind.name, door.value, rep)]

    def probe(kind: TokenKind) -> str:  # a token of the kind that no load point sends
        if kind.kind == "cached":
            return issuer.cached_token
        return idp.garbage(1)[0] if kind.kind == "garbage" else issuer.mint(kind.alg, 1)[0]

    points: list[dict[str, Any]] = []
    noop_max: dict[tuple[Door, int], float] = {}

    def point(name: str, door: Door, kind: TokenKind, rep: int) -> None:
        target = targets[name]
        correct = name == "noop" or ctx.guard(target, door, probe(kind), kind.expect_allow)
        p = runner.closed(ctx, target, door, tokens(kind, door, rep), duration_s=duration, warmup_s=warmup)
        points.append(ctx.record(p | dict(rep=rep, scenario=kind.name, correct=correct)))
        if name == "noop":
            noop_max[(door, rep)] = p["throughput"]

    def open_points(door: Door, rep: int, fraction: float) -> None:
        rate = open_rate(noop_max, door, fraction)
        names = [n for n in ("noop", NOOP_LIKE, "verifier") if n in targets and (fraction == HALF or n != NOOP_LIKE)]
        runs = [(n, targets[n], None) for n in names]
        if door.is_grpc and fraction == HALF:  # the other client model, next to the run's
            other = next(c for c in runner.GRPC_CLIENTS if c != ctx.opt("grpc_client", runner.GRPC_CLIENTS[0]))
            runs += [(n, targets[n].renamed(OTHER_CLIENT[n].format(other)), other) for n in OTHER_CLIENT if n in names]
        for name, target, client in runs if rep % 2 == 0 else runs[::-1]:
            payloads = [wire.payload(door, issuer.cached_token, targets[name].addr(door))]
            p = runner.open_loop(
                ctx, target, door, payloads, rate, duration_s=duration, warmup_s=warmup, grpc_client=client
            )
            points.append(ctx.record(p | dict(rep=rep, scenario=CACHED.name, fraction=fraction, correct=True)))

    for kind in kinds:  # mint every pool before the first point
        for rep in range(reps):
            for door in doors if "verifier" in targets else ():
                tokens(kind, door, rep)
    steps: list[tuple[str, Callable[[], None]]] = []
    for rep in range(reps):
        for d in doors:
            steps.append((f"rep {rep + 1} {d}: noop max", lambda d=d, r=rep: point("noop", d, CACHED, r)))
            if "verifier" in targets:
                for k in kinds:
                    steps.append((f"rep {rep + 1} {d}: {k.name}", lambda d=d, r=rep, k=k: point("verifier", d, k, r)))
            if "naive" in targets:
                steps.append((f"rep {rep + 1} {d}: naive", lambda d=d, r=rep: point("naive", d, CACHED, r)))
    for rep in range(reps):
        for d in doors:
            for f in fractions:
                steps.append((f"rep {rep + 1} {d}: open loop {f:.0%}", lambda d=d, r=rep, f=f: open_points(d, r, f)))
    with tqdm(steps, unit="point", file=sys.stderr, dynamic_ncols=True) as bar:
        for label, action in bar:
            bar.set_description(label)
            try:
                action()
            except Exception as exc:
                ctx.warnings.append(f"{label}: {exc!r}")
    keys = idp.read_keys(issuer.keys_file)
    floors = {
        alg: floor.measure(alg, key, issuer.mint(alg, 200), issuer.url, min_time_s=0.1 if quick else 0.3)
        for alg, (_kid, key) in keys.items()
    }
    ctx.servers.stop()
    goal_list = goals(points, floors, [d.value for d in doors])
    plot = latency_plot(points, ctx)
    opts = f"{'quick' if quick else 'full'}; {duration:g} s per point after {warmup:g} s warm-up; {reps} alternating "
    opts += f"repetition(s); scenarios: {', '.join(k.name for k in kinds)}"
    md = markdown(ctx, points, floors, goal_list, opts, plot)
    data = dict(options=opts, machine=procs.machine_info(), floor=floors, warnings=ctx.warnings, points=points)
    report.write(ctx.out, md, data | dict(goals=[g.__dict__ | {"met": g.met} for g in goal_list]))
    for g in goal_list:
        print(f"{report.verdict(g.met):8} {g.name}: {g.value:.2f} ({g.detail})")


def _group(points: list[dict[str, Any]], mode: str, *keys: str) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        if p["mode"] == mode:
            out[tuple(p[k] for k in keys)].append(p)
    return out


def goals(points: list[dict[str, Any]], floors: dict[str, dict[str, float]], doors: list[str]) -> list[Goal]:
    """The four goals of the benchmark issue, per door where it applies."""
    closed = _group(points, "closed", "door", "target", "scenario")
    opened = _group(points, "open", "door", "target", "fraction")

    def tput(door: str, target: str, scenario: str = CACHED.name) -> float:
        return median(p["throughput"] for p in closed.get((door, target, scenario), []))

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    out = []
    for door in doors:
        v, n = tput(door, "verifier"), tput(door, "noop")
        out.append(
            Goal(
                name=f"cached throughput vs no-op ({door})",
                value=ratio(v, n),
                threshold=GOAL_CACHED_THROUGHPUT if door == "http" else GOAL_CACHED_THROUGHPUT_GRPC,
                detail=f"{v:.0f} / {n:.0f} checks/s",
            )
        )
    for door in doors:
        half = {t: opened.get((door, t, HALF), []) for t in ("verifier", "noop", NOOP_LIKE)}
        v, n, g = (median(p["latency"]["p99"] for p in half[t]) for t in ("verifier", "noop", NOOP_LIKE))
        vs, ns = (median(p["service"]["p99"] for p in half[t]) for t in ("verifier", "noop"))
        # From the actual send: without the wait for a free stream (the verifier's bound) or the generator's lag.
        service = f"; service p99 {vs:.2f} / {ns:.2f} ms"
        same = f"; vs the no-op with the verifier's settings {ratio(v, g):.2f} ({g:.2f} ms)" if half[NOOP_LIKE] else ""
        lag = generator_lag(half["verifier"] + half["noop"], n)
        out.append(
            Goal(
                name=f"p99 at half no-op max vs no-op ({door})",
                value=ratio(v, n),
                threshold=GOAL_P99_RATIO,
                at_least=False,
                detail=f"{v:.2f} / {n:.2f} ms{client_model(half, opened, door)}{paired(half)}{service}{same}; {lag}",
            )
        )
    raw = floors.get("ES256", {}).get("parse_verify_us", float("nan"))
    for door in doors:
        c = median(p["cpu_per_check_us"] for p in closed.get((door, "verifier", "jwt-first-seen-es256"), []))
        out.append(
            Goal(
                name=f"first-seen ES256 CPU/check vs raw parse+verify ({door})",
                value=ratio(c, raw),
                threshold=GOAL_CPU_RATIO,
                at_least=False,
                detail=f"{c:.0f} / {raw:.0f} us",
            )
        )
    h, g = tput("http", "verifier"), tput("grpc", "verifier")
    out.append(
        Goal(
            name="forward-auth vs gRPC cached throughput",
            value=ratio(h, g),
            threshold=GOAL_FORWARD_AUTH,
            detail=f"{h:.0f} / {g:.0f} checks/s",
        )
    )
    return out


def open_rate(noop_max: dict[tuple[Door, int], float], door: Door, fraction: float) -> float:
    """An open loop's rate: ``fraction`` of the no-op's maximum at ``door``, the median over the repetitions
    (all measured before any open loop): one repetition's maximum cut by a stall moves no repetition's rate."""
    return max(50.0, median(m for (d, _rep), m in noop_max.items() if d is door) * fraction)


def client_model(
    half: dict[str, list[dict[str, Any]]], opened: dict[tuple[Any, ...], list[dict[str, Any]]], door: str
) -> str:
    """The gRPC client model of the row (runner.GRPC_CLIENTS, with the connections the verifier's runs
    opened), and the ratio under the other model measured next to it."""
    clients = {p.get("client") for p in half["verifier"] + half["noop"]} - {None, ""}
    if len(clients) != 1:
        return ""
    (client,) = clients
    opened_by = median(p.get("connections_opened", 0) for p in half["verifier"])
    text = f"; {client} client ({opened_by:.0f} connections to the verifier)"
    for other in runner.GRPC_CLIENTS:
        names = {t: OTHER_CLIENT[t].format(other) for t in OTHER_CLIENT}
        v, n = (median(p["latency"]["p99"] for p in opened.get((door, names[t], HALF), [])) for t in TWO)
        if other != client and v == v and n == n and n:
            text += f"; {other} client {v / n:.2f} ({v:.2f} / {n:.2f} ms)"
    return text


def paired(half: dict[str, list[dict[str, Any]]]) -> str:
    """The verifier's p99 over the no-op's of the same repetition (run back to back at the same rate), each
    repetition's ratio and their median: drift between repetitions cancels out of these."""
    by_rep = {t: {p["rep"]: p["latency"]["p99"] for p in half[t]} for t in ("verifier", "noop")}
    ratios = [by_rep["verifier"][r] / n for r, n in sorted(by_rep["noop"].items()) if n and r in by_rep["verifier"]]
    if not ratios:
        return ""
    return f"; per repetition {', '.join(f'{x:.2f}' for x in ratios)} (median {median(ratios):.2f})"


def generator_lag(points: list[dict[str, Any]], noop_p99_ms: float) -> str:
    """The open-loop generator's own send lag over ``points`` (its worst p99), and whether the row is a
    server figure: the lag at most LAG_TRUST of the no-op's p99, and each target's p99 steady across
    repetitions (max/min at most P99_SPREAD_TRUST; a machine that stalls the server swings it)."""
    if not points:
        return "no open-loop points"
    lag = max(p["lag"]["p99"] for p in points)
    tools = ", ".join(sorted({p["tool"].split(" (")[0] for p in points}))
    text = f"generator ({tools}) send lag p99 {lag * 1000:.0f} us"
    p99s: dict[str, list[float]] = defaultdict(list)
    for p in points:
        p99s[p["target"]].append(p["latency"]["p99"])
    spread = max((max(v) / min(v) for v in p99s.values() if min(v) > 0), default=1.0)
    if not lag <= LAG_TRUST * noop_p99_ms:
        text += f" > {LAG_TRUST:.0%} of the no-op's p99: NOT a server figure"
    elif spread > P99_SPREAD_TRUST:
        text += f"; p99 varied {spread:.1f}x across repetitions: NOT a server figure"
    return text


def markdown(
    ctx: Context,
    points: list[dict[str, Any]],
    floors: dict[str, dict[str, float]],
    goal_list: list[Goal],
    opts: str,
    plot: str,
) -> str:
    """Goals, maximum throughput (server and client CPU side by side), latency, floor, machine."""
    closed = _group(points, "closed", "door", "target", "scenario")
    opened = _group(points, "open", "door", "target", "fraction")

    def med(ps: list[dict[str, Any]], key: str, sub: str = "") -> float:
        return median((p[key][sub] if sub else p[key]) for p in ps if p.get(key) is not None)

    def cores(ps: list[dict[str, Any]], key: str) -> str:
        return fmt(median(p[key] / p["seconds"] for p in ps if p["seconds"]), 2)

    rows = [
        [
            *k,
            fmt(med(ps, "throughput")),
            fmt(med(ps, "cpu_per_check_us")),
            cores(ps, "server_cpu_s"),
            cores(ps, "client_cpu_s"),
            ps[0]["tool"],
            sum(p["errors"] or 0 for p in ps),
            fmt(med(ps, "refusals")),
            sum(p["reused"] for p in ps),
            f"{len(ps)}{'' if all(p['correct'] for p in ps) else ' WRONG ANSWERS'}",
        ]
        for k, ps in sorted(closed.items())
    ]
    closed_headers = ["door", "target", "scenario", "checks/s", "server CPU/check (us)", "server CPU (cores)"]
    closed_headers += ["client CPU (cores)", "tool", "errors", "refused", "tokens reused", "runs"]
    open_rows = [
        [door, target, f"{frac:.2f}", fmt(med(ps, "offered_rate")), fmt(med(ps, "throughput"))]
        + [fmt(med(ps, "latency", k), 2) for k in ("p50", "p90", "p99", "p99.9", "p100")]
        + [fmt(med(ps, "lag", "p50"), 3), fmt(med(ps, "lag", "p99"), 3), sum(p["dropped"] for p in ps)]
        + [cores(ps, "server_cpu_s"), cores(ps, "client_cpu_s"), ps[0]["tool"].split(" (")[0]]
        + [ps[0].get("client") or "-", fmt(med(ps, "connections_opened"))]
        for (door, target, frac), ps in sorted(opened.items())
    ]
    open_headers = ["door", "target", "load (x no-op max)", "offered/s", "achieved/s", "p50", "p90", "p99", "p99.9"]
    open_headers += ["max", "generator lag p50", "generator lag p99", "dropped", "server CPU (cores)"]
    open_headers += ["client CPU (cores)", "generator", "gRPC client", "connections"]
    floor_rows = [
        [a, *(fmt(f[k], 1) for k in ("verify_us", "parse_verify_us", "pyjwt_decode_us"))] for a, f in floors.items()
    ]
    lines = [f"Run: {opts}", "", "### Goals (medians of alternating runs)", "", report.goals_table(goal_list)]
    lines += ["", "### Maximum throughput (closed loop)", "", report.table(closed_headers, rows, left=3)]
    lines += ["", "### Latency at fixed offered load (open loop, from intended send time; ms)", ""]
    lines += [report.table(open_headers, open_rows, left=2), "", "### Physical floor: in-process, per check (us)", ""]
    lines += [report.table(["alg", "signature verify", "parse + verify", "pyjwt.decode"], floor_rows)]
    lines += ["", "### Warnings", "", *[f"- {w}" for w in ctx.warnings]] if ctx.warnings else []
    lines += ["", "### Machine", "", *[f"- {k}: {v}" for k, v in procs.machine_info().items()]]
    return "\n".join([*lines, "", f"![latency-vs-load]({plot.rsplit('/', 1)[-1]})"]) + "\n"


def latency_plot(points: list[dict[str, Any]], ctx: Context) -> str:
    """latency-vs-load.png: per door, p50/p99/p99.9 against the offered rate for each target."""
    opened = _group(points, "open", "door", "target", "fraction")
    panels = []
    for door in sorted({d for d, _, _ in opened}):
        panel = report.Panel(
            title=f"{door}: latency vs offered load (open loop)",
            xlabel="offered checks/s",
            ylabel="ms from intended send",
            log=True,
        )
        for target in sorted({t for d, t, _ in opened if d == door}):
            fracs = sorted(f for d, t, f in opened if d == door and t == target)
            rates = [median(p["offered_rate"] for p in opened[(door, target, f)]) for f in fracs]
            for pct, style in (("p50", ":"), ("p99", "-"), ("p99.9", "--")):
                ys = [median(p["latency"][pct] for p in opened[(door, target, f)]) for f in fracs]
                panel.lines.append((f"{target} {pct}", rates, ys, style))
        panels.append(panel)
    return report.plot(ctx.out / "latency-vs-load.png", panels) if panels else ""
