"""``python -m bench run --scenario edge [--quick]``: the fast path at the edge, every gateway side by side in one run.

Nine routes, measured alternately in each repetition with wrk and one repeated ES256 token (what a
busy client sends), against one verifier (``python -m verifier serve``, default ``edge_cache``: allows
reusable for 10 s):

* ``nginx``                 -- nginx proxying to a ``return 200`` upstream, no plugin (the ceiling)
* ``nginx+plugin reuse on`` -- the same behind kong/plugins/edge-verifier, decision cache on: the
  plugin asks the verifier about once per max-age and answers the rest from its per-worker LRU
* ``nginx auth_request reuse``-- the shipped deploy/nginx/nginx.conf.template (one worker): ``auth_request`` to
  the verifier, its answers kept in nginx's ``proxy_cache`` for their ``X-Accel-Expires`` (issue #23)
* ``nginx+plugin reuse off``-- ``cache_entries = 0``: every request asks the verifier, which answers
  from its own token cache
* ``envoy none``            -- Envoy proxying to the same upstream, no auth (Envoy's ceiling)
* ``envoy jwt_authn``       -- Envoy's own JWT filter, keys inline (no verifier)
* ``envoy ext_authz grpc``  -- ext_authz over gRPC to the verifier's Envoy Check service
* ``envoy ext_authz http``  -- ext_authz HTTP service to the verifier's /v1/forward-auth
* ``envoy lua reuse``       -- deploy/envoy/envoy-reuse.yaml.template: a Lua filter asking the same door and
  reusing each answer for its max-age (issue #23; no released ext_authz reuses answers)

nginx (1 worker) reuses bench/scenario_nginx.py; Envoy (``--concurrency 1``) is the test rig's
(tests/integration/gateways.py start_envoy), so the bench measures the configuration the tests check.
Throughput: wrk, ``--connections`` (16), closed loop. Latency: wrk with one connection (no queueing, so
p50 is the service time). The goals (issue "The fast path at the edge"): plugin with reuse on >= 0.9x
plain nginx and <= 30 us p50 added; reuse off >= 0.5x; Envoy HTTP mode >= 2x gRPC mode.
Writes results.md/results.json under bench/results/<timestamp>-edge/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import runner, scenario_nginx, wire

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PLAIN = "nginx"
REUSE_ON = "nginx+plugin reuse on"
REUSE_OFF = "nginx+plugin reuse off"
NGINX_AUTH = "nginx auth_request reuse"
ENVOY_NONE = "envoy none"
ENVOY_JWT = "envoy jwt_authn"
ENVOY_GRPC = "envoy ext_authz grpc"
ENVOY_HTTP = "envoy ext_authz http"
ENVOY_REUSE = "envoy lua reuse"
ROUTES = (PLAIN, REUSE_ON, REUSE_OFF, NGINX_AUTH, ENVOY_NONE, ENVOY_JWT, ENVOY_GRPC, ENVOY_HTTP, ENVOY_REUSE)
#: Each route's baseline for "vs" and "p50 added": the same proxy without auth.
BASELINE = {r: (ENVOY_NONE if r.startswith("envoy") else PLAIN) for r in ROUTES}
#: The plugin's cache size with reuse on (its schema default) and off (entries).
CACHE_ENTRIES = {REUSE_ON: 10_000, REUSE_OFF: 0}
# The goals: (label, route, against, minimum throughput ratio); and the p50 budget of reuse on (us).
RATIO_GOALS = (
    ("nginx+plugin reuse on / nginx", REUSE_ON, PLAIN, 0.9),
    ("nginx+plugin reuse off / nginx", REUSE_OFF, PLAIN, 0.5),
    ("envoy ext_authz http / grpc", ENVOY_HTTP, ENVOY_GRPC, 2.0),
    ("nginx auth_request reuse / nginx", NGINX_AUTH, PLAIN, 0.75),  # issue #23
    ("envoy lua reuse / envoy none", ENVOY_REUSE, ENVOY_NONE, 0.5),  # issue #23
)
P50_ADDED_GOAL_US = 30.0
#: Spread (max/min over repetitions) above which a route's throughput is flagged as noisy.
NOISY_SPREAD = 1.15


def _gateways() -> Any:
    """tests/integration/gateways.py (the Envoy rig), imported from its folder (it needs tests/support.py too)."""
    sys.path[:0] = [str(PROJECT_ROOT / "tests" / "integration"), str(PROJECT_ROOT / "tests")]
    import gateways

    return gateways


def _upstream_port(n: scenario_nginx.Nginx) -> int:
    """The port of the ``return 200`` server inside scenario_nginx's nginx (Envoy proxies to it too)."""
    conf = Path(n.tmp, "nginx.conf").read_text()
    found = re.search(r"upstream backend \{ server 127\.0\.0\.1:(\d+);", conf)
    if found is None:
        raise RuntimeError("no upstream in scenario_nginx's nginx.conf")
    return int(found.group(1))


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def goals(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal with its measured value and whether it was met."""
    out = []
    for label, route, against, minimum in RATIO_GOALS:
        ratio = rows[route]["throughput"] / rows[against]["throughput"]
        out.append({"goal": f"{label} >= {minimum:g}x", "measured": f"{ratio:.2f}x", "met": ratio >= minimum})
    added = (rows[REUSE_ON]["p50_ms"] - rows[PLAIN]["p50_ms"]) * 1000
    out.append(
        {
            "goal": f"nginx+plugin reuse on: p50 added <= {P50_ADDED_GOAL_US:g} us",
            "measured": f"{added:+.0f} us",
            "met": added <= P50_ADDED_GOAL_US,
        }
    )
    return out


def markdown(rows: dict[str, dict[str, Any]], opts_line: str, machine: dict[str, Any], notes: list[str]) -> str:
    """The result table (medians over repetitions), the goals and any noise warnings."""
    lines = [
        f"Run: {opts_line}",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} CPUs; load average at start "
        f"{machine.get('loadavg', '?')}; nginx 1 worker; Envoy --concurrency 1; verifier 1 process",
        "",
        "| route | req/s (c=16) | vs baseline | spread | p50 c=1 (us) | p50 added (us) | p99 c=1 (us) | non-2xx | "
        "plugin cache hits / misses |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for route in ROUTES:
        r, base = rows[route], rows[BASELINE[route]]
        lines.append(
            f"| {route} | {r['throughput']:,.0f} | {r['throughput'] / base['throughput']:.2f}x ({BASELINE[route]}) | "
            f"{r['spread']:.2f} | {r['p50_ms'] * 1000:.0f} | {(r['p50_ms'] - base['p50_ms']) * 1000:+.0f} | "
            f"{r['p99_ms'] * 1000:.0f} | {r['non_2xx']} | {r.get('cache', '-')} |"
        )
    lines += ["", "| goal | measured | met |", "|---|---:|---|"]
    for g in goals(rows):
        lines.append(f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench run --scenario edge", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s points, one repetition")
    parser.add_argument("--duration", type=float, help="seconds per point (default 5, --quick 1)")
    parser.add_argument("--reps", type=int, help="alternating repetitions (default 3, --quick 1)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections for throughput")
    parser.add_argument("--out", help="results folder (default bench/results/<timestamp>-edge)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: run .ci/setup.d/40-bench.sh")
    duration = args.duration or (1.0 if args.quick else 5.0)
    reps = args.reps or (1 if args.quick else 3)
    out = Path(args.out) if args.out else RESULTS_DIR / (time.strftime("%Y%m%d-%H%M%S") + "-edge")
    out.mkdir(parents=True, exist_ok=True)
    gateways = _gateways()
    loadavg_start = os.getloadavg()

    bench = runner.Bench(runner.Options(scenarios=[], doors=[], out_dir=out, with_naive=False))
    started = time.time()
    nginxes: dict[str, scenario_nginx.Nginx] = {}
    rigs: dict[str, Any] = {}
    urls: dict[str, str] = {}
    samples: dict[str, list[dict[str, Any]]] = {r: [] for r in ROUTES}
    try:
        bench.start_issuer()
        target = bench.start_verifier()
        token = bench.cached_token
        for route, entries in CACHE_ENTRIES.items():
            nginxes[route] = scenario_nginx.start_nginx(target.http_addr, entries)
            urls[route] = nginxes[route].url(route)
        urls[PLAIN] = nginxes[REUSE_ON].url("plain")
        upstream = _upstream_port(nginxes[REUSE_ON])
        jwks = {"keys": [key.public_jwk() for key in bench.keys.values()]}
        start: dict[str, Callable[[], Any]] = {
            NGINX_AUTH: lambda: gateways.start_nginx(out, _port(target.http_addr), upstream, workers=1),
            ENVOY_NONE: lambda: gateways.start_envoy(out, "none", upstream_port=upstream),
            ENVOY_JWT: lambda: gateways.start_envoy(
                out,
                "jwt_authn",
                upstream_port=upstream,
                jwt_issuer=bench.issuer_url,
                jwks=jwks,
                jwt_audiences=(wire.AUDIENCE,),
            ),
            ENVOY_GRPC: lambda: gateways.start_envoy(
                out, "grpc", verifier_grpc_port=_port(target.grpc_addr), upstream_port=upstream
            ),
            ENVOY_HTTP: lambda: gateways.start_envoy(
                out, "http", verifier_http_port=_port(target.http_addr), upstream_port=upstream
            ),
            ENVOY_REUSE: lambda: gateways.start_envoy(
                out, "reuse", verifier_http_port=_port(target.http_addr), upstream_port=upstream
            ),
        }
        for route, make in start.items():
            rigs[route] = make()
            urls[route] = f"{rigs[route].url}{scenario_nginx.PATH}"
        for route in ROUTES:
            status = scenario_nginx.check_route(urls[route], token)
            if status != 200:
                raise SystemExit(f"{route}: a request got {status}, not 200 (see {out}/verifier.log)")
        for rep in range(reps):
            order = ROUTES if rep % 2 == 0 else tuple(reversed(ROUTES))
            for route in order:
                tput = scenario_nginx.run_wrk(
                    urls[route], token, connections=args.connections, duration_s=duration, workdir=out
                )
                lat = scenario_nginx.run_wrk(urls[route], token, connections=1, duration_s=duration, workdir=out)
                samples[route].append({"throughput": tput, "latency": lat})
                print(
                    f"rep {rep + 1}/{reps} {route:24} {tput['throughput']:9,.0f} req/s  p50(c=1) {lat['p50_us']} us",
                    file=sys.stderr,
                )
        rows: dict[str, dict[str, Any]] = {}
        for route in ROUTES:
            s = samples[route]
            tputs = [x["throughput"]["throughput"] for x in s]
            row: dict[str, Any] = {
                "route": route,
                "throughput": statistics.median(tputs),
                "spread": max(tputs) / min(tputs),
                "p50_ms": statistics.median(x["latency"]["p50_us"] for x in s) / 1000,
                "p99_ms": statistics.median(x["latency"]["p99_us"] for x in s) / 1000,
                "non_2xx": sum(x["throughput"]["status_errors"] + x["latency"]["status_errors"] for x in s),
                "socket_errors": sum(x["throughput"]["socket_errors"] + x["latency"]["socket_errors"] for x in s),
            }
            if CACHE_ENTRIES.get(route):
                stats = nginxes[route].cache_stats()
                row["cache"] = f"{stats['hits']:,} / {stats['misses']:,}"
            elif route in CACHE_ENTRIES:
                row["cache"] = "off"
            rows[route] = row
    finally:
        for n in {id(n): n for n in nginxes.values()}.values():
            n.stop()
        for e in rigs.values():
            e.stop()
        bench.stop()

    machine = {**runner.machine_info(), "loadavg": " ".join(f"{x:.1f}" for x in loadavg_start)}
    notes = []
    cores = os.cpu_count() or 1
    if max(loadavg_start) > cores / 2:
        notes.append(
            f"load average {machine['loadavg']} on {cores} CPUs at the start: other work shared the machine, "
            "so absolute numbers (and ratios between routes measured at different moments) are noisy"
        )
    noisy = [r for r in ROUTES if rows[r]["spread"] > NOISY_SPREAD]
    if noisy:
        notes.append(f"throughput varied by more than {NOISY_SPREAD:.2f}x across repetitions for: {', '.join(noisy)}")
    opts_line = (
        f"{'quick' if args.quick else 'full'}; {duration:g} s per point; {reps} alternating repetition(s); "
        f"one repeated ES256 token; took {time.time() - started:.0f} s"
    )
    md = markdown(rows, opts_line, machine, notes)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(
        json.dumps(
            {"options": opts_line, "machine": machine, "rows": rows, "goals": goals(rows), "samples": samples},
            indent=1,
        )
    )
    print(md)
    print(f"bench: wrote {out}/results.md and results.json", file=sys.stderr)
