"""Overload at the three doors (issue #24 goal 4): far past capacity, directly and through the shipped Envoy.

**The gRPC doors**: h2load, the HTTP/2 stream bound off and on.

Per door and bound: the capacity (closed loop inside the bound, 4 clients x 8 streams), then the flood
(32 clients x 100 streams, ``grpc-timeout: 100m``; ``--deadline-ms 0``: none, budget 1 s), with

* served: the verifier's own decision counter over the flood (h2load cannot read gRPC statuses);
* answers over the caller's deadline + 100 ms, from h2load's per-request log;
* refused streams (RST_STREAM, h2load's "errored"): the transport's early refusal past the bound;
* RSS before, right after and a few seconds after; a gRPC health check right after.

*before* is the bound before #24 (1000: grpc.aio queued every accepted call), or with ``--before DIR`` that
checkout's verifier with its defaults; *shipped* is this tree's defaults.

**The forward-auth door and Envoy in front** (``--routes http,envoy-grpc,envoy-http``, ``--kinds``): wrk, closed
loop, at ``HTTP_CAPACITY`` connections (capacity), then a flood at each of ``HTTP_FLOODS`` connections (``--floods``;
``--connections N``: that one), one repeated token (``cached``) or a rotation of distinct ones (``first-seen``).
Envoy runs the shipped deploy/envoy templates (tests/integration's rig, ``--concurrency 1``) in front of an nginx
``return 200``. *Served* is the 2xx answers;
the budget is 1 s (an HTTP caller sends no deadline), checked against wrk's slowest answer and its timeouts
(unanswered in 5 s).
*before* is ``http.shed_after_seconds`` off, or with ``--before DIR`` that checkout's defaults.

**The goal**, per door and token kind, from the shipped points (:func:`verdicts`): PASS/MISS for goodput (median
served >= 80% of capacity), budget (no answer past it in any repetition), RSS (after <= 1.5x before) and healthy
(a health check and a real check answered right after, within 1 s). The verifier's CPU per answer (/proc,
served or refused) is the scheduling-independent figure next to them.
"""

from __future__ import annotations

import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import baselines, edge, idp, load, procs, report, wire
from bench.runner import Context
from bench.wire import Door, Target
from verifier.settings import DEFAULT_GRPC_MAX_CONCURRENT_STREAMS, DEFAULT_SHED_AFTER_SECONDS, MAX_DEADLINE_SECONDS

BEFORE = 1000
FLOOD = (32, 100)  # h2load clients x streams: the load
# `--grpc-floods`: each h2load flood as CLIENTSxSTREAMS; 128x100 is many gateways' connections (each held to the bound)
GRPC_FLOODS = (FLOOD,)
CAPACITY = (4, 8)
HTTP_CAPACITY = 16  # wrk connections that saturate the forward-auth door: its capacity
# The floods, in wrk connections: 10x the concurrency that saturates the door (a closed loop has no offered rate:
# 10x its capacity is 10x the callers it can keep busy), and 60x, where the stack itself keeps ~60% (see `_stack`).
HTTP_FLOODS = (160, 1000)
SHED_DEFAULT = DEFAULT_SHED_AFTER_SECONDS
SHED_OFF = MAX_DEADLINE_SECONDS  # http.shed_after_seconds as before #24 goal 4: never reached
HTTP_BUDGET_MS = 1000  # no caller deadline on HTTP: the 1 s
GOODPUT_GOAL, RSS_GOAL, HEALTHY_WITHIN_S = 0.8, 1.5, 1.0  # the goal 4
SHIPPED = "shipped"
NOOP = "no-op"  # bench/baselines.py on the same stack, for the forward-auth door's cached points


@dataclass(frozen=True)
class Variant:
    """One verifier configuration under the flood: this tree's defaults (``shipped``), or the one before."""

    name: str
    tree: Path | None = None  # another checkout's verifier
    grpc_bound: int | None = None  # grpc_max_concurrent_streams (None: the tree's default)
    shed_after: float | None = None  # http.shed_after_seconds (None: the tree's default)

    def yaml(self) -> tuple[str, str]:
        """(root, http section) configuration lines."""
        root = f"grpc_max_concurrent_streams: {self.grpc_bound}\n" if self.grpc_bound is not None else ""
        return root, f"shed_after_seconds: {self.shed_after}" if self.shed_after is not None else ""


def variants(ctx: Context, grpc: bool) -> tuple[Variant, Variant]:
    """(before, shipped): ``--before DIR``'s defaults, else this tree with the bound/shedding of before #24."""
    before = ctx.opt("before", None)
    if before:
        old = Variant("before", tree=Path(before).resolve())
    else:
        old = Variant("before", grpc_bound=BEFORE) if grpc else Variant("before", shed_after=SHED_OFF)
    return old, Variant(SHIPPED)


ROUTES = ("grpc-doors", "http", "envoy-grpc", "envoy-http")
DECISION = re.compile(r'verifier_decisions_total\{door="\w+",outcome="(\w+)",reason="(\w+)"\} ([\d.e+]+)')


def _decisions(metrics_addr: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10).read().decode()
    counts: dict[str, float] = {}
    for outcome, reason, value in DECISION.findall(text):
        counts[f"{outcome}/{reason}"] = counts.get(f"{outcome}/{reason}", 0.0) + float(value)
    return counts


def _healthy(target: Target) -> tuple[bool, float]:
    started = time.monotonic()
    with grpc.insecure_channel(target.grpc_addr) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:  # failed or timed out: not healthy
            return False, time.monotonic() - started
    return answer.status == health_pb2.HealthCheckResponse.SERVING, time.monotonic() - started


def _noop_answered(target: Target) -> tuple[float, float]:
    """The no-op's count of answered Check calls (bench/baselines.py), and how long asking took (its health)."""
    started = time.monotonic()
    with grpc.insecure_channel(target.grpc_addr) as channel:
        answered = channel.unary_unary(f"/{baselines.ANSWERED_SERVICE}/Answered")(b"", timeout=2)
    return float(answered.decode()), time.monotonic() - started


def grpc_floods(ctx: Context) -> list[tuple[int, int]]:
    """The gRPC floods, h2load (clients, streams): ``--grpc-floods 32x100,128x100``, else GRPC_FLOODS."""
    given = ctx.opt("grpc_floods", None)
    try:
        floods = [tuple(int(n) for n in f.split("x")) for f in given.split(",") if f] if given else list(GRPC_FLOODS)
    except ValueError:
        floods = []
    if not floods or any(len(f) != 2 or min(f) < 1 for f in floods):
        raise SystemExit(f"--grpc-floods: CLIENTSxSTREAMS, comma-separated, e.g. 32x100,128x100 (got {given!r})")
    return [(f[0], f[1]) for f in floods]


def _start(ctx: Context, issuer: idp.Issuer, variant: Variant) -> tuple[Target, str]:
    """A verifier of ``variant`` with a metrics listener; (target, metrics address)."""
    metrics_addr = f"127.0.0.1:{procs.free_port()}"
    root, http = variant.yaml()
    target = ctx.servers.start_verifier(
        issuer.url,
        name=f"verifier-{variant.name}",
        root_yaml=f'metrics: {{listen: "{metrics_addr}"}}\n' + root,
        http_yaml=http,
        tree=variant.tree,
    )
    return target, metrics_addr


def point(
    ctx: Context,
    issuer: idp.Issuer,
    door: Door,
    variant: Variant,
    *,
    deadline_ms: int | None,
    flood_shape: tuple[int, int] = FLOOD,
) -> dict[str, Any]:
    """One verifier of ``variant`` (or the grpc.aio no-op with the verifier's server options, ``NOOP``): its
    capacity, then the flood of ``flood_shape``. Served: the verifier's allow counter (the no-op's answered count)."""
    noop = variant.name == NOOP
    if noop:
        target, metrics_addr = ctx.servers.start_baseline("noop", settings="verifier"), ""
    else:
        target, metrics_addr = _start(ctx, issuer, variant)
    bound = variant.grpc_bound if variant.grpc_bound is not None else DEFAULT_GRPC_MAX_CONCURRENT_STREAMS

    def decisions() -> dict[str, float]:
        return {"allow/noop": _noop_answered(target)[0]} if noop else _decisions(metrics_addr)

    try:
        body = wire.grpc_payload(door, issuer.cached_token)
        duration = ctx.opt("duration", 5.0, 3.0)

        def h2load(shape: tuple[int, int], **extra: Any) -> load.ToolResult:
            clients, streams = shape
            return load.h2load(
                door,
                target.grpc_addr,
                body,
                workdir=ctx.work,
                duration_s=duration,
                warmup_s=0.5,
                clients=clients,
                streams=streams,
                **extra,
            )

        cap_cpu0 = procs.cpu_seconds(target.pids)
        cap = h2load(CAPACITY)
        cap_cpu = procs.cpu_seconds(target.pids) - cap_cpu0
        time.sleep(1)
        rss0, before = procs.rss_kib(target.pids), decisions()
        log = ctx.work / f"h2load-{door.value}-{variant.name}.log"
        log.unlink(missing_ok=True)
        headers = [f"grpc-timeout: {deadline_ms}m"] if deadline_ms is not None else []
        cpu0 = procs.cpu_seconds(target.pids)
        flood = h2load(flood_shape, headers=headers, log=log)
        cpu = procs.cpu_seconds(target.pids) - cpu0
        if noop:
            answered, health_s = _noop_answered(target)
            healthy = health_s <= HEALTHY_WITHIN_S
        else:
            healthy, health_s = _healthy(target)
        rss1 = procs.rss_kib(target.pids)
        after = {"allow/noop": answered} if noop else _decisions(metrics_addr)
        time.sleep(3)
        rss2 = procs.rss_kib(target.pids)
    finally:
        ctx.servers.stop(target)
    # h2load's log covers the warm-up too: every answer counts against the budget.
    elapsed_ms = sorted(int(line.split()[2]) / 1000 for line in log.read_text().splitlines() if line.strip())
    budget_ms = (deadline_ms if deadline_ms is not None else 900) + 100
    late = sum(e >= deadline_ms for e in elapsed_ms) if deadline_ms is not None else 0
    decided = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    served = sum(v for k, v in decided.items() if k.startswith("allow/"))
    capacity = cap.requests / cap.seconds
    return ctx.record(
        dict(
            door=door.value,
            variant=variant.name,
            bound=bound if variant.tree is None else "before's default",
            flood=f"{flood_shape[0]}x{flood_shape[1]}",
            deadline_ms=deadline_ms,
            capacity=capacity,
            served=served,
            served_per_s=served / duration,
            seconds=duration,
            served_share=served / duration / capacity if capacity else None,
            # Answered after the caller's deadline: gRPC's own DEADLINE_EXCEEDED (h2load logs no gRPC status), so
            # a decision made for one of them never reached its caller. Served in time, at least: served - late.
            late=late,
            in_time_share=max(0.0, served - late) / duration / capacity if capacity else None,
            # scheduling-independent goodput: served per verifier CPU-second, against the capacity point's
            served_per_cpu_share=_per_cpu_share(max(0.0, served - late), cpu, cap.requests, cap_cpu),
            decisions=decided,
            streams=len(elapsed_ms),
            refused_streams=flood.errors,
            max_ms=elapsed_ms[-1] if elapsed_ms else None,
            p99_ms=elapsed_ms[int(len(elapsed_ms) * 0.99)] if elapsed_ms else None,
            over_budget=sum(e > budget_ms for e in elapsed_ms),
            budget_ms=budget_ms,
            # scheduling-independent: the verifier's CPU per decision it made over the flood
            verifier_cpu_us=cpu / max(1.0, sum(decided.values())) * 1e6,
            verifier_cores=cpu / duration,
            rss_before_mb=rss0 / 1024,
            rss_after_mb=rss1 / 1024,
            rss_settled_mb=rss2 / 1024,
            healthy=healthy,
            health_s=health_s,
            loadavg=procs.loadavg(),
        )
    )


def _per_cpu_share(served: float, cpu: float, cap_served: float, cap_cpu: float) -> float | None:
    """Served per verifier CPU-second under the flood, as a share of the same at capacity: what goodput would be
    if the verifier had had as much CPU as at capacity (the machine's other load moves the wall-clock share)."""
    if not (cpu and cap_cpu and cap_served):
        return None
    return (served / cpu) / (cap_served / cap_cpu)


def _get(addr: str, path: str, headers: dict[str, str]) -> tuple[int, float]:
    started = time.monotonic()
    try:
        status = procs.get_status(addr, path, headers)
    except OSError:
        status = 0
    return status, time.monotonic() - started


def http_point(
    ctx: Context,
    issuer: idp.Issuer,
    route: str,
    tokens: str,
    pools: dict[str, list[str]],
    upstream: int,
    variant: Variant,
    connections: int,
) -> dict[str, Any]:
    """One verifier (and for an Envoy route, the shipped Envoy in front): capacity, then the flood at
    ``connections``, by wrk."""
    target, metrics_addr = _start(ctx, issuer, variant)
    envoy = None
    try:
        if route == "http":
            addr, path = target.http_addr, wire.FORWARD_AUTH_PATH
            headers = wire.http_headers
        else:
            envoy = _start_envoy(ctx, route, target, upstream)
            addr, path = envoy.url.removeprefix("http://"), edge.PATH

            def headers(token: str, scheme: str = "Bearer") -> dict[str, str]:
                return {"Authorization": f"{scheme} {token}"}

        url = f"http://{addr}{path}"
        duration = ctx.opt("duration", 5.0, 3.0)

        def wrk(connections: int, pool: list[str]) -> load.ToolResult:
            if tokens == "cached":
                return load.wrk(
                    url,
                    workdir=ctx.work,
                    duration_s=duration,
                    headers=headers(issuer.cached_token),
                    connections=connections,
                    timeout_s=5,
                )
            rotation = [wire.http_request(headers(t), addr, path) for t in pool]
            return load.wrk(
                url, workdir=ctx.work, duration_s=duration, rotation=rotation, connections=connections, timeout_s=5
            )

        if _get(addr, path, headers(issuer.cached_token))[0] != 200:
            raise SystemExit(f"{route}: a request got no 200 (see {ctx.out})")
        cap_cpu0 = procs.cpu_seconds(target.pids)
        cap = wrk(HTTP_CAPACITY, pools["capacity"])
        cap_cpu = procs.cpu_seconds(target.pids) - cap_cpu0
        time.sleep(1)
        rss0, before = procs.rss_kib(target.pids), _decisions(metrics_addr)
        cpu0 = procs.cpu_seconds(target.pids)
        flood = wrk(connections, pools["flood"])
        cpu = procs.cpu_seconds(target.pids) - cpu0
        served_status, served_s = _get(addr, path, headers(issuer.cached_token))
        health_status, health_s = _get(target.http_addr, "/healthz", {})
        rss1 = procs.rss_kib(target.pids)
        after = _decisions(metrics_addr)
        time.sleep(3)
        rss2 = procs.rss_kib(target.pids)
    finally:
        if envoy is not None:
            envoy.stop()
        ctx.servers.stop(target)
    decided = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}
    served = flood.requests - flood.refusals
    capacity = (cap.requests - cap.refusals) / cap.seconds
    return ctx.record(
        dict(
            door=route,
            tokens=tokens,
            variant=variant.name,
            shed_after=(
                "before's default"
                if variant.tree is not None
                else "off"
                if variant.shed_after == SHED_OFF
                else variant.shed_after or SHED_DEFAULT
            ),
            capacity=capacity,
            capacity_non_2xx=cap.refusals,
            served=served,
            served_per_s=served / flood.seconds,
            served_share=served / flood.seconds / capacity if capacity else None,
            served_per_cpu_share=_per_cpu_share(served, cpu, cap.requests - cap.refusals, cap_cpu),
            capacity_cpu_us=cap_cpu / max(1, cap.requests) * 1e6,
            connections=connections,
            answers=flood.requests,
            non_2xx=flood.refusals,
            timeouts=flood.timeouts,
            socket_errors=flood.errors - flood.timeouts,
            decisions=decided,
            pool=len(pools["flood"]) if tokens != "cached" else 1,
            wrapped=tokens != "cached" and flood.requests > len(pools["flood"]),  # some were seen before
            p99_ms=flood.p99_us / 1000,
            max_ms=flood.max_us / 1000,
            # scheduling-independent: the verifier's CPU per answer it gave (served or shed) over the flood
            verifier_cpu_us=cpu / max(1.0, sum(decided.values())) * 1e6,
            verifier_cores=cpu / flood.seconds,
            over_budget=flood.max_us / 1000 > HTTP_BUDGET_MS or flood.timeouts > 0,
            budget_ms=HTTP_BUDGET_MS,
            rss_before_mb=rss0 / 1024,
            rss_after_mb=rss1 / 1024,
            rss_settled_mb=rss2 / 1024,
            healthy=health_status == 200 and served_status == 200,
            health_s=max(health_s, served_s),
            loadavg=procs.loadavg(),
        )
    )


def floods(ctx: Context) -> list[int]:
    """The HTTP floods' wrk connections: ``--connections N`` (one), else ``--floods`` (a list), else HTTP_FLOODS."""
    if ctx.opt("connections", None):
        return [ctx.opt("connections", None)]
    given = ctx.opt("floods", None)
    try:
        counts = [int(c) for c in given.split(",") if c] if given else list(HTTP_FLOODS)
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"--floods: connection counts, comma-separated (got {given!r})")
    return counts


def stack_points(ctx: Context, token: str, counts: list[int]) -> list[dict[str, Any]]:
    """The same capacity and floods against the no-op on the same stack (bench/baselines.py: uvloop + httptools,
    a canned 200, nothing decided): the share of its capacity the stack itself keeps at each flood's connections,
    and its CPU per answer at each (the kernel's and the loop's, which no door can lower). One point per flood."""
    target = ctx.servers.start_baseline("noop")
    try:
        url = f"http://{target.http_addr}{wire.FORWARD_AUTH_PATH}"
        duration = ctx.opt("duration", 5.0, 3.0)
        runs = []
        for connections in (HTTP_CAPACITY, *counts):
            cpu0 = procs.cpu_seconds(target.pids)
            run = load.wrk(
                url,
                workdir=ctx.work,
                duration_s=duration,
                headers=wire.http_headers(token),
                connections=connections,
                timeout_s=5,
            )
            runs.append((run, procs.cpu_seconds(target.pids) - cpu0))
            time.sleep(1)
    finally:
        ctx.servers.stop(target)
    (cap, cap_cpu), *flooded = runs
    capacity = cap.requests / cap.seconds
    return [
        ctx.record(
            dict(
                door="http",
                tokens="cached",
                variant=NOOP,
                connections=connections,
                capacity=capacity,
                served_per_s=flood.requests / flood.seconds,
                served_share=flood.requests / flood.seconds / capacity if capacity else None,
                served_per_cpu_share=_per_cpu_share(flood.requests, cpu, cap.requests, cap_cpu),
                capacity_cpu_us=cap_cpu / max(1, cap.requests) * 1e6,
                verifier_cpu_us=cpu / max(1, flood.requests) * 1e6,
                max_ms=flood.max_us / 1000,
                loadavg=procs.loadavg(),
            )
        )
        for connections, (flood, cpu) in zip(counts, flooded, strict=True)
    ]


def _start_envoy(ctx: Context, route: str, target: Target, upstream: int) -> Any:
    """The shipped template for ``route`` (tests/integration/gateways.py's rig)."""
    sys.path[:0] = [str(procs.PROJECT_ROOT / "tests" / "integration"), str(procs.PROJECT_ROOT / "tests")]
    import gateways

    mode = route.removeprefix("envoy-")
    addr = target.grpc_addr if mode == "grpc" else target.http_addr
    port = int(addr.rsplit(":", 1)[1])
    ports = {"verifier_grpc_port": port} if mode == "grpc" else {"verifier_http_port": port}
    return gateways.start_envoy(ctx.work, mode, upstream_port=upstream, **ports)


def run_http(ctx: Context, issuer: idp.Issuer, routes: list[str], points: list[dict[str, Any]]) -> None:
    """The forward-auth door and the Envoy routes, cached and first-seen tokens, alternated."""
    tmp = tempfile.mkdtemp(prefix="bench-overload-nginx-")
    try:
        _, upstream = edge.start_nginx(ctx, "127.0.0.1:1", 0, tmp)  # only its `return 200` upstream is used
        kinds = [k for k in (ctx.opt("kinds", None) or "cached,first-seen").split(",") if k]
        count = ctx.opt("pool", 30_000, 5_000)
        counts = floods(ctx)
        # Minted once: each point starts a verifier with empty caches, so every point sees them first.
        minted = {"capacity": issuer.mint("ES256", count), "flood": issuer.mint("ES256", count)}
        for rep in range(ctx.opt("reps", 2, 1)):
            for route in routes if rep % 2 == 0 else reversed(routes):
                for tokens in kinds:
                    pools = minted if tokens == "first-seen" else {"capacity": [], "flood": []}
                    # The forward-auth door before and as shipped (alternated); Envoy in front of the shipped one.
                    pair = variants(ctx, grpc=False)
                    both = pair if rep % 2 == 0 else pair[::-1]
                    for connections in counts if rep % 2 == 0 else counts[::-1]:
                        for variant in both if route == "http" else pair[1:]:
                            p = http_point(ctx, issuer, route, tokens, pools, upstream, variant, connections)
                            print(
                                f"bench: overload {route} {tokens} -c {connections} {variant.name} rep {rep}: served "
                                f"{p['served_per_s']:,.0f}/s ({p['served_share']:.0%} of capacity), max "
                                f"{p['max_ms']:.0f} ms, {p['non_2xx']:,} non-2xx, {p['timeouts']:,} timeouts",
                                file=sys.stderr,
                            )
                            points.append(p)
                    if route == "http" and tokens == "cached":
                        for p in stack_points(ctx, issuer.cached_token, counts):
                            print(
                                f"bench: overload {route} no-op (the stack) -c {p['connections']} rep {rep}: "
                                f"{p['served_share']:.0%} of its capacity, {p['capacity_cpu_us']:.1f} -> "
                                f"{p['verifier_cpu_us']:.1f} us/answer",
                                file=sys.stderr,
                            )
                            points.append(p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(ctx: Context) -> None:
    """Both gRPC doors (the bound before #24 and the default), then the HTTP routes, alternated; writes results."""
    doors = [Door(d) for d in ctx.opt("door", None) or ()] or [Door.EXT_AUTHZ, Door.GRPC]
    deadline_ms = ctx.opt("deadline_ms", 100) or None
    routes = [r for r in (ctx.opt("routes", None) or ",".join(ROUTES)).split(",") if r]
    if unknown := set(routes) - set(ROUTES):
        raise SystemExit(f"--routes: unknown {sorted(unknown)}; choose from {', '.join(ROUTES)}")
    issuer = idp.Issuer(ctx.servers)
    points: list[dict[str, Any]] = []
    http_routes = [r for r in routes if r != "grpc-doors"]
    if http_routes:
        run_http(ctx, issuer, http_routes, points)
    # The verifier before and as shipped, and the grpc.aio no-op with the verifier's server options (what the
    # stack itself keeps under the same flood), alternated.
    trio = (*variants(ctx, grpc=True), Variant(NOOP))
    floods_ = grpc_floods(ctx)
    for rep in range(ctx.opt("reps", 2, 1) if "grpc-doors" in routes else 0):
        for door in doors:
            for shape in floods_ if rep % 2 == 0 else floods_[::-1]:
                for variant in trio if rep % 2 == 0 else trio[::-1]:
                    p = point(ctx, issuer, door, variant, deadline_ms=deadline_ms, flood_shape=shape)
                    print(
                        f"bench: overload {door.value} -c {shape[0]} -m {shape[1]} {variant.name} rep {rep}: served "
                        f"{p['served']:,.0f} ({p['served_share']:.0%} of capacity; in time "
                        f"{p['in_time_share'] or 0:.0%}, per CPU-second "
                        f"{p['served_per_cpu_share'] or 0:.0%}), max {p['max_ms']:.0f} ms, "
                        f"{p['verifier_cpu_us']:,.0f} us CPU/answer",
                        file=sys.stderr,
                    )
                    points.append(p)
    goal = verdicts(points)
    for line in goal:
        print(f"bench: goal {line}", file=sys.stderr)
    report.write(ctx.out, markdown(ctx, points, goal), dict(points=points, goal=goal, warnings=ctx.warnings))


def _label(p: dict[str, Any]) -> str:
    if "bound" in p:  # gRPC: the door, and the flood's shape when not the 32x100
        flood = p.get("flood", f"{FLOOD[0]}x{FLOOD[1]}")
        clients, streams = flood.split("x")
        return p["door"] if flood == f"{FLOOD[0]}x{FLOOD[1]}" else f"{p['door']} -c {clients} -m {streams}"
    return f"{p['door']} {p['tokens']} -c {p.get('connections', 1000)}"


def verdicts(points: list[dict[str, Any]]) -> list[str]:
    """#24 goal 4 per door (and token kind), from the shipped points: one line each, PASS/MISS per condition."""
    lines = []
    shipped = [p for p in points if p.get("variant") == SHIPPED]
    for label in dict.fromkeys(_label(p) for p in shipped):
        ps = [p for p in shipped if _label(p) == label]
        # gRPC: served in time (a decision answered past the caller's deadline is not served); HTTP: served
        share = statistics.median(p.get("in_time_share", p["served_share"]) or 0.0 for p in ps)
        late = sum(bool(p["over_budget"]) for p in ps)
        rss = max(max(p["rss_after_mb"], p["rss_settled_mb"]) / p["rss_before_mb"] for p in ps)
        health = max(p["health_s"] for p in ps)
        sick = sum(not p["healthy"] or p["health_s"] > HEALTHY_WITHIN_S for p in ps)
        cpu = statistics.median(p["verifier_cpu_us"] for p in ps)
        per_cpu = statistics.median(p.get("served_per_cpu_share") or 0.0 for p in ps)

        def verdict(ok: bool) -> str:
            return "PASS" if ok else "MISS"

        worst = max(p["max_ms"] or 0 for p in ps)
        lines.append(
            f"{label} (shipped, {len(ps)} reps): goodput {verdict(share >= GOODPUT_GOAL)} ({share:.0%} of capacity, "
            f"median; per verifier CPU-second {per_cpu:.0%}); budget {verdict(not late)} ({late} reps with answers "
            f"past {ps[0]['budget_ms']} ms, max {worst:,.0f} ms); RSS {verdict(rss <= RSS_GOAL)} ({rss:.2f}x); "
            f"healthy {verdict(not sick)} ({health * 1000:,.0f} ms); verifier CPU {cpu:,.0f} us/answer"
            + _stack(points, label, ps, share, per_cpu)
            + _grpc_stack(points, label, ps)
        )
    return lines + _by_connections(points)


def _stack(points: list[dict[str, Any]], label: str, ps: list[dict[str, Any]], share: float, per_cpu: float) -> str:
    """For the forward-auth door's cached line: the no-op's own share on the same stack, in the same run, and
    whose a goodput miss is, from the scheduling-independent shares (served per CPU-second against capacity's):
    the machine's (the door keeps the goal per CPU-second: it got less CPU than at capacity), the stack's (the
    no-op does not keep it either at these connections), or the door's."""
    noop = [p for p in points if p.get("variant") == NOOP and "bound" not in p and _label(p) == label]
    if not noop:
        return ""
    median = statistics.median
    stack = median(p["served_share"] or 0.0 for p in noop)
    stack_per_cpu = median(p.get("served_per_cpu_share") or 0.0 for p in noop)
    door_cpu = (median(p["capacity_cpu_us"] for p in ps), median(p["verifier_cpu_us"] for p in ps))
    noop_cpu = (median(p["capacity_cpu_us"] for p in noop), median(p["verifier_cpu_us"] for p in noop))
    if share >= GOODPUT_GOAL:
        whose = ""
    elif per_cpu >= GOODPUT_GOAL:
        whose = f"; the goodput MISS is the machine's: per verifier CPU-second the door keeps {per_cpu:.0%}"
    elif stack_per_cpu < GOODPUT_GOAL:
        whose = f"; the goodput MISS is the stack's: per CPU-second the no-op itself keeps {stack_per_cpu:.0%} here"
    else:
        whose = f"; the goodput MISS is the door's: per CPU-second the no-op keeps {stack_per_cpu:.0%} here"
    return (
        f"; the no-op on the same stack (median of {len(noop)}): {stack:.0%} of its capacity, so the door keeps "
        f"{share / stack if stack else 0:.0%} of the stack's share; CPU per answer at {HTTP_CAPACITY} -> "
        f"{ps[0]['connections']} connections: door {door_cpu[0]:.1f} -> {door_cpu[1]:.1f} us, "
        f"no-op {noop_cpu[0]:.1f} -> {noop_cpu[1]:.1f} us" + whose
    )


def _grpc_stack(points: list[dict[str, Any]], label: str, ps: list[dict[str, Any]]) -> str:
    """For a gRPC door's line: the grpc.aio no-op (the verifier's server options) under the same flood, same run:
    its share of its own capacity, per CPU-second, its CPU per answer, and the door's goodput per CPU-second as a
    share of the no-op's (the scheduling-independent ratio)."""
    noop = [p for p in points if p.get("variant") == NOOP and "bound" in p and _label(p) == label]
    if not noop:
        return ""
    median = statistics.median
    share, per_cpu = (
        median(p["served_share"] or 0.0 for p in noop),
        median(p["served_per_cpu_share"] or 0.0 for p in noop),
    )
    door_rate = median(max(0, p["served"] - p["late"]) / max(1e-9, p["verifier_cores"] * p["seconds"]) for p in ps)
    noop_rate = median(max(0, p["served"] - p["late"]) / max(1e-9, p["verifier_cores"] * p["seconds"]) for p in noop)
    return (
        f"; the grpc.aio no-op under the same flood (median of {len(noop)}): {share:.0%} of its capacity (per "
        f"CPU-second {per_cpu:.0%}), {median(p['verifier_cpu_us'] for p in noop):,.0f} us CPU/answer, max "
        f"{max(p['max_ms'] or 0 for p in noop):,.0f} ms; the door serves {door_rate:,.0f} per CPU-second, "
        f"{door_rate / noop_rate if noop_rate else 0:.0%} of the no-op's {noop_rate:,.0f}"
    )


def _by_connections(points: list[dict[str, Any]]) -> list[str]:
    """One line for the forward-auth door's cached floods: door and no-op shares at each connection count (the
    reading of "10x its capacity" the figures support is the reader's: capacity is taken at HTTP_CAPACITY)."""
    median = statistics.median
    noop = [p for p in points if p.get("variant") == NOOP and "bound" not in p]
    door = [p for p in points if p.get("variant") == SHIPPED and p.get("tokens") == "cached" and p["door"] == "http"]
    counts = sorted({p["connections"] for p in noop} & {p["connections"] for p in door})
    if not counts:
        return []

    def share(ps: list[dict[str, Any]], connections: int) -> str:
        at = [p for p in ps if p["connections"] == connections]
        wall = median(p["served_share"] or 0.0 for p in at)
        return f"{wall:.0%} ({median(p.get('served_per_cpu_share') or 0.0 for p in at):.0%})"

    shares = "; ".join(
        f"-c {c} ({c / HTTP_CAPACITY:g}x): door {share(door, c)}, no-op {share(noop, c)}" for c in counts
    )
    return [
        f"http cached by connections (served / capacity at -c {HTTP_CAPACITY}, medians, per CPU-second in brackets; "
        f"a closed loop offers no rate, so 'Nx its capacity' is N x the {HTTP_CAPACITY} connections that saturate "
        f"the door): {shares}"
    ]


def markdown(ctx: Context, points: list[dict[str, Any]], goal: list[str]) -> str:
    """The goal's verdicts, then the results tables: the gRPC doors (h2load), then the HTTP routes (wrk)."""
    grpc_points = [p for p in points if "bound" in p]
    http_points = [p for p in points if "bound" not in p and p["variant"] != NOOP]
    noop_points = [p for p in points if p.get("variant") == NOOP and "bound" not in p]
    common = ["capacity /s", "served /s", "of capacity (per CPU-s)"]
    tail = ["p99 ms", "max ms", "over budget", "RSS before/after/+3 s MB", "healthy after"]

    def end(p: dict[str, Any]) -> list[str]:
        over = p["over_budget"]
        over = ("yes" if over else "no") if isinstance(over, bool) else f"{over:,}"
        return [
            report.fmt(p["p99_ms"]),
            report.fmt(p["max_ms"]),
            f"{over} (> {p['budget_ms']} ms)",
            f"{p['rss_before_mb']:.0f} / {p['rss_after_mb']:.0f} / {p['rss_settled_mb']:.0f}",
            f"{p['healthy']} ({p['health_s'] * 1000:.0f} ms)",
        ]

    def start(p: dict[str, Any]) -> list[str]:
        per_cpu = p.get("served_per_cpu_share")
        share = f"{p['served_share']:.0%}" + (f" ({per_cpu:.0%})" if per_cpu is not None else "")
        return [report.fmt(p["capacity"]), report.fmt(p["served_per_s"]), share]

    parts = ["# Overload at the three doors", "#24 goal 4, shipped defaults:\n\n" + "\n".join(f"- {g}" for g in goal)]
    if grpc_points:
        parts += [
            ctx.header(
                "gRPC: h2load "
                + ", ".join(f"-c {c} -m {m}" for c, m in grpc_floods(ctx))
                + f", capacity at -c {CAPACITY[0]} -m {CAPACITY[1]}; variant no-op: the grpc.aio no-op with the "
                "verifier's server options, served = its handler's count"
            ),
            report.table(
                [
                    "door",
                    "flood",
                    "variant",
                    "streams/conn",
                    *common,
                    "in time: of capacity",
                    "answers past the deadline",
                    "answers (h2load)",
                    "verifier CPU us/answer",
                    *tail,
                ],
                [
                    [
                        p["door"],
                        p.get("flood", f"{FLOOD[0]}x{FLOOD[1]}"),
                        p["variant"],
                        p["bound"],
                        *start(p),
                        f"{p.get('in_time_share') or 0:.0%}",
                        f"{p.get('late', 0):,}",
                        f"{p['streams']:,}",
                        f"{p['verifier_cpu_us']:.0f}",
                        *end(p),
                    ]
                    for p in grpc_points
                ],
            ),
        ]
    if http_points:
        parts += [
            ctx.header(f"HTTP: wrk -c {', '.join(map(str, floods(ctx)))}, capacity at -c {HTTP_CAPACITY}"),
            report.table(
                [
                    "route",
                    "tokens",
                    "wrk -c",
                    "variant",
                    "shed after s",
                    *common,
                    "non-2xx",
                    "timeouts",
                    "verifier CPU us/answer",
                    *tail,
                ],
                [
                    [
                        p["door"],
                        p["tokens"] + (" (pool wrapped)" if p.get("wrapped") else ""),
                        f"{p['connections']:,}",
                        p["variant"],
                        p["shed_after"],
                        *start(p),
                        f"{p['non_2xx']:,}",
                        f"{p['timeouts']:,}",
                        f"{p['verifier_cpu_us']:.0f}",
                        *end(p),
                    ]
                    for p in http_points
                ],
            ),
        ]
    if noop_points:
        parts += [
            "The no-op on the same stack (bench/baselines.py, cached token's request, same wrk runs):",
            report.table(
                [
                    "wrk -c",
                    "capacity /s",
                    "served /s",
                    "of capacity (per CPU-s)",
                    "CPU us/answer at capacity / flood",
                    "max ms",
                ],
                [
                    [
                        f"{p['connections']:,}",
                        *start(p),
                        f"{p['capacity_cpu_us']:.1f} / {p['verifier_cpu_us']:.1f}",
                        report.fmt(p["max_ms"]),
                    ]
                    for p in noop_points
                ],
            ),
        ]
    return "\n\n".join([*parts, *(f"- {w}" for w in ctx.warnings)]) + "\n"
