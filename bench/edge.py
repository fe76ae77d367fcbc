"""``python -m bench run --scenario edge|nginx [--quick]``: the fast path at the edge, every gateway side by side.

Routes, measured alternately in each repetition with wrk and one repeated ES256 token (what a busy
client sends), against one verifier (``python -m verifier serve``, default ``edge_cache``):

* ``nginx``                  -- nginx proxying to a ``return 200`` upstream, no plugin (the ceiling)
* ``nginx+lua no-op``        -- the same with an empty ``access_by_lua`` and ``header_filter_by_lua``: what entering
  the two Lua phases costs (Kong pays it on every request, plugin or not), the plugin's floor
* ``nginx+plugin reuse on``  -- the same behind kong/plugins/edge-verifier (run unmodified under the PDK
  shim of tests/kong/shim), decision cache on: it asks the verifier about once per max-age
* ``nginx+plugin reuse off`` -- ``cache_entries = 0``: every request asks the verifier
* ``nginx auth_request reuse`` -- the shipped deploy/nginx/nginx.conf.template (one worker): ``auth_request``
  to the verifier, its answers kept in nginx's ``proxy_cache`` for their ``X-Accel-Expires`` (issue #23)
* ``envoy none``             -- Envoy proxying to the same upstream, no auth (Envoy's ceiling)
* ``envoy jwt_authn``        -- Envoy's own JWT filter, keys inline (no verifier)
* ``envoy ext_authz grpc``   -- ext_authz over gRPC to the verifier's Envoy Check service
* ``envoy ext_authz http``   -- ext_authz HTTP service to the verifier's /v1/forward-auth
* ``envoy lua reuse``        -- deploy/envoy/envoy-reuse.yaml.template: a Lua filter asking the same door and
  reusing each answer for its max-age (issue #23; no released ext_authz reuses answers)

``nginx`` runs the first four (the Kong Lua plugin's cost), ``edge`` all ten. nginx has 1 worker;
Envoy (``--concurrency 1``) and the shipped nginx are the test rig's (tests/integration/gateways.py), so
the bench measures the configuration the tests check. Throughput: wrk with ``--connections`` (16), closed
loop. Latency: wrk with one connection (no queueing, so p50 is the service time). For the nginx routes also the
nginx worker's CPU time per request (utime + stime from /proc over the requests wrk completed: what the route
costs, whatever else the machine runs), and the open loop (bench/c/openloop.c, bench/load.py's Python loop as a
fallback) at ``--rate-fraction`` (default 0.25) of
plain nginx's median throughput, p50 from the intended send (after the closed-loop repetitions, alternated
again). The goals: plugin with reuse on >= 0.85x plain nginx and <= 30 us p50 added in the open loop (#24 goal
5); reuse off >= 0.5x; Envoy HTTP mode >= 2x gRPC mode; (#23) nginx auth_request reuse >= 0.75x nginx, Envoy Lua
reuse >= 0.5x Envoy.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import idp, load, openloop, procs, report, wire
from bench.runner import Context

SHIM_DIR = Path("tests", "kong", "shim")  # the PDK shim, under a checkout
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LUA_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")
LUA_PATH = "/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua"
LUA_CPATH = "/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;/usr/lib/aarch64-linux-gnu/lua/5.1/?.so"
PATH = "/api/orders/42"
PLAIN, REUSE_ON, REUSE_OFF = "nginx", "nginx+plugin reuse on", "nginx+plugin reuse off"
NOOP = "nginx+lua no-op"
ENVOY_NONE, ENVOY_JWT, ENVOY_GRPC, ENVOY_HTTP = (
    "envoy none",
    "envoy jwt_authn",
    "envoy ext_authz grpc",
    "envoy ext_authz http",
)
NGINX_AUTH, ENVOY_REUSE = "nginx auth_request reuse", "envoy lua reuse"
BEFORE_REUSE = "nginx+plugin reuse on, --before"  # the plugin of another checkout (--before), same nginx config
NGINX_ROUTES = (PLAIN, NOOP, REUSE_ON, REUSE_OFF)
OPEN_LOOP_ROUTES = (PLAIN, NOOP, REUSE_ON)  # reuse off would be near its own capacity at plain nginx's 25%
ROUTES = (*NGINX_ROUTES, NGINX_AUTH, ENVOY_NONE, ENVOY_JWT, ENVOY_GRPC, ENVOY_HTTP, ENVOY_REUSE)
# the same proxy without auth
BASELINE = {r: (ENVOY_NONE if r.startswith("envoy") else PLAIN) for r in (*ROUTES, BEFORE_REUSE)}
CACHE_ENTRIES = {REUSE_ON: 10_000, REUSE_OFF: 0}  # the plugin's cache size with reuse on (its default) and off
CALLGRIND_WARMUP = 300  # requests per route before callgrind's counters are zeroed (the JIT's traces form meanwhile)
RATIO_GOALS = (
    (REUSE_ON, PLAIN, 0.85),  # #24 goal 5
    (REUSE_OFF, PLAIN, 0.5),
    (ENVOY_HTTP, ENVOY_GRPC, 2.0),
    (NGINX_AUTH, PLAIN, 0.75),  # issue #23
    (ENVOY_REUSE, ENVOY_NONE, 0.5),  # issue #23
)
P50_ADDED_GOAL_US = 30.0
NOISY_SPREAD = 1.15  # max/min throughput over repetitions above which a route is flagged as noisy
OPEN_NOISY_SPREAD = 2.0  # max/min open-loop p50 over repetitions above which the p50 added is flagged as noise

NGINX_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    lua_package_path "{repo}/?.lua;{shim}/sha256/?.lua;{shim}/?.lua;{lua_path};;";
    lua_package_cpath "{lua_cpath};;";
    lua_socket_log_errors off;
    init_by_lua_block {{ require("kong_shim").init("{tmp}/shim.json") }}
    upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{  # the upstream: answers at once
        listen 127.0.0.1:{upstream_port};
        location / {{ return 200 "ok\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{port};
        location = /__shim/cache {{ content_by_lua_block {{ require("kong_shim").report_cache() }} }}
        location /plain/ {{
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://backend;
        }}
        location /noop/ {{
            access_by_lua_block {{ local _ = 0 }}
            header_filter_by_lua_block {{ local _ = 0 }}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://backend;
        }}
        location /checked/ {{
            access_by_lua_block {{ require("kong_shim").access() }}
            header_filter_by_lua_block {{ require("kong_shim").header_filter() }}
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://backend;
        }}
    }}
}}
"""


def start_nginx(
    ctx: Context,
    verifier_http: str,
    cache_entries: int,
    tmp: str,
    root: Path = procs.PROJECT_ROOT,
    callgrind: Path | None = None,
) -> tuple[str, int]:
    """nginx with the plugin of the checkout ``root`` asking the verifier at ``verifier_http``; (its base URL, its
    upstream's port). ``callgrind``: run it as one process (``master_process off``: the pid started serves) under
    valgrind's callgrind, writing its dumps there."""
    modules = next((d for d in LUA_MODULE_DIRS if os.path.exists(f"{d}/ngx_http_lua_module.so")), None)
    if modules is None:
        raise SystemExit("nginx's Lua module is missing: run .ci/setup.d/30-nginx-lua.sh")
    os.chmod(tmp, 0o755)  # workers run as nobody when started as root
    port, upstream = procs.free_port(), procs.free_port()
    conf = {"url": f"http://{verifier_http}{wire.FORWARD_AUTH_PATH}", "cache_entries": cache_entries}
    Path(tmp, "shim.json").write_text(json.dumps({"plugin_conf": conf}))
    Path(tmp, "nginx.conf").write_text(
        NGINX_CONF.format(
            tmp=tmp,
            modules=modules,
            repo=root,
            shim=root / SHIM_DIR,
            lua_path=LUA_PATH,
            lua_cpath=LUA_CPATH,
            port=port,
            upstream_port=upstream,
        )
    )
    cmd = [NGINX, "-p", tmp, "-c", "nginx.conf", "-e", f"{tmp}/error.log", "-g", "daemon off;"]
    if callgrind is not None:
        callgrind.mkdir(parents=True, exist_ok=True)
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={callgrind}/callgrind.%p", *cmd[:-1]]
        cmd.append("daemon off; master_process off;")
    proc = ctx.servers.spawn(cmd, "nginx.log")
    procs.wait_port(f"127.0.0.1:{port}", proc, timeout=120 if callgrind else procs.START_TIMEOUT_S)
    return f"http://127.0.0.1:{port}", upstream


def sequential_requests(url: str, n: int, headers: dict[str, str]) -> None:
    """``n`` GETs of ``url`` one after another on one keep-alive connection; each must be answered 200."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=120)
    for _ in range(n):
        conn.request("GET", parts.path, headers=headers)
        answer = conn.getresponse()
        answer.read()
        if answer.status != 200:
            raise SystemExit(f"{url}: HTTP {answer.status} under callgrind")
    conn.close()


def callgrind_instructions(pid: int, url: str, n: int, headers: dict[str, str], dumps: Path) -> float:
    """User-space instructions per request of the callgrind-run nginx ``pid`` over ``n`` sequential requests to
    ``url``, after CALLGRIND_WARMUP ones (counters zeroed, then dumped: the newest dump holds just the ``n``)."""
    sequential_requests(url, CALLGRIND_WARMUP, headers)
    subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, check=True)
    sequential_requests(url, n, headers)
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
    time.sleep(0.5)
    newest = max(dumps.glob(f"callgrind.{pid}.*"), key=lambda f: int(f.name.rsplit(".", 1)[1]))
    return int(re.findall(r"^(?:totals|summary): (\d+)", newest.read_text(), re.M)[0]) / n


def instructions(
    ctx: Context, verifier_http: str, token: str, n: int, roots: dict[str, Path], runs: int
) -> dict[str, list[float]]:
    """Per route, the nginx worker's user-space instructions per request (callgrind), one value per run: each run a
    fresh nginx per checkout (``roots``: route of its plugin -> checkout), plain and no-op in the first one's. A
    fresh process because LuaJIT forms its traces differently from one process to the next (~10%)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing: run .ci/setup.d/40-bench.sh")
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, list[float]] = {}
    for _ in range(runs):
        for i, (route, root) in enumerate(roots.items()):
            tmp = tempfile.mkdtemp(prefix="bench-nginx-callgrind-")
            try:
                base, _ = start_nginx(ctx, verifier_http, CACHE_ENTRIES[REUSE_ON], tmp, root, Path(tmp, "dumps"))
                proc = ctx.servers.procs[-1]
                paths = {PLAIN: "/plain", NOOP: "/noop", route: "/checked"} if i == 0 else {route: "/checked"}
                for name, prefix in paths.items():
                    count = callgrind_instructions(proc.pid, f"{base}{prefix}{PATH}", n, headers, Path(tmp, "dumps"))
                    out.setdefault(name, []).append(count)
                    print(f"callgrind {name:32} {count:9,.0f} instructions/request", file=sys.stderr)
                proc.terminate()
                proc.wait(30)
                ctx.servers.procs.remove(proc)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def run_nginx(ctx: Context) -> None:
    """The nginx routes only: the Kong Lua plugin's cost in front of a route."""
    run(ctx, NGINX_ROUTES)


def run(ctx: Context, routes: tuple[str, ...] = ROUTES) -> None:
    """Every route, alternated; writes results. ``--before DIR``: also the plugin of that checkout (reuse on, in an
    nginx of its own, same configuration); ``--instructions N``: also callgrind's instructions per request."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: run .ci/setup.d/40-bench.sh")
    duration, reps, connections = ctx.opt("duration", 5.0, 1.0), ctx.opt("reps", 3, 1), ctx.opt("connections", 16)
    roots = {REUSE_ON: procs.PROJECT_ROOT}
    if before := ctx.opt("before", None):
        roots[BEFORE_REUSE] = Path(before).resolve()
        routes = (*routes, BEFORE_REUSE)
    issuer = idp.Issuer(ctx.servers)
    target, token = ctx.servers.start_verifier(issuer.url), issuer.cached_token
    entries = CACHE_ENTRIES | {r: CACHE_ENTRIES[REUSE_ON] for r in roots}
    tmps = {r: tempfile.mkdtemp(prefix="bench-nginx-") for r in entries}
    # the nginx serving each route: plain and no-op are locations of reuse on's
    nginx_of = {PLAIN: tmps[REUSE_ON], NOOP: tmps[REUSE_ON]} | tmps
    envoys: list[Any] = []
    try:
        bases = {
            r: start_nginx(ctx, target.http_addr, entries[r], tmps[r], roots.get(r, procs.PROJECT_ROOT))
            for r in entries
        }
        urls = {PLAIN: f"{bases[REUSE_ON][0]}/plain{PATH}", NOOP: f"{bases[REUSE_ON][0]}/noop{PATH}"}
        urls |= {r: f"{bases[r][0]}/checked{PATH}" for r in entries}
        if ENVOY_NONE in routes:
            urls |= start_envoys(ctx, issuer, target, bases[REUSE_ON][1], envoys)
        cpu = {r: nginx_of[r] for r in routes if r in nginx_of}
        samples = measure(ctx, {r: urls[r] for r in routes}, token, duration, reps, connections, cpu)
        rows: dict[str, dict[str, Any]] = {}
        for route in routes:
            s, tputs = samples[route], [x[0].throughput for x in samples[route]]
            rows[route] = dict(throughput=statistics.median(tputs), spread=max(tputs) / min(tputs))
            rows[route].update(
                p50_ms=statistics.median(x[1].p50_us for x in s) / 1000,
                p99_ms=statistics.median(x[1].p99_us for x in s) / 1000,
            )
            rows[route].update(
                non_2xx=sum(x[0].refusals + x[1].refusals for x in s),
                socket_errors=sum(x[0].errors + x[1].errors for x in s),
            )
            rows[route].update(client_cpu_cores=statistics.median(x[0].cpu_s / x[0].seconds for x in s))
            if route in cpu:
                rows[route]["worker_cpu_us"] = statistics.median(x[2] for x in s)
            if route in entries:
                with urllib.request.urlopen(f"{bases[route][0]}/__shim/cache", timeout=5) as r:
                    stats = json.loads(r.read())
                rows[route]["cache"] = f"{stats['hits']:,} / {stats['misses']:,}" if entries[route] else "off"
        fraction = ctx.opt("rate_fraction", 0.25)
        rate = fraction * rows[PLAIN]["throughput"]
        open_routes = {r: urls[r] for r in OPEN_LOOP_ROUTES if r in routes}
        for route, points in open_loop(ctx, open_routes, token, rate, duration, reps).items():
            rows[route].update(open_p50_ms=statistics.median(p[0] for p in points) / 1000, open_rate=rate)
            rows[route].update(open_lag_ms=statistics.median(p[1] for p in points) / 1000)
            rows[route].update(open_lag_p99_ms=statistics.median(p[2] for p in points) / 1000, open_tool=points[0][3])
            rows[route].update(open_spread=max(p[0] for p in points) / max(1.0, min(p[0] for p in points)))
        if n := ctx.opt("instructions", 0):
            for route, counts in instructions(ctx, target.http_addr, token, n, roots, min(reps, 3)).items():
                rows[route]["instructions"] = statistics.median(counts)
                rows[route]["instructions_runs"] = counts
    finally:
        for e in envoys:
            e.stop()
        ctx.servers.stop()
        for tmp in tmps.values():
            shutil.rmtree(tmp, ignore_errors=True)
    what = f"{'quick' if ctx.quick else 'full'}; {duration:g} s per point; {reps} alternating repetition(s); "
    what += f"one repeated ES256 token; open loop at {fraction:g} x plain nginx's throughput ({rate:,.0f} req/s); "
    what += "nginx 1 worker, Envoy --concurrency 1, verifier 1 process"
    report.write(
        ctx.out,
        markdown(ctx, rows, what),
        dict(options=what, machine=procs.machine_info(), rows=rows, goals=goals(rows)),
    )


def worker_cpu_s(tmp: str) -> float:
    """CPU seconds (user + system) the workers of the nginx started in ``tmp`` have used so far."""
    master = Path(tmp, "nginx.pid").read_text().strip()
    total = 0
    for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (proc(5) fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


OPEN_LOOP_GENERATORS = 4  # bench.load processes sharing the schedule: one alone falls behind on a busy machine
NGINX_KEEPALIVE_REQUESTS = 1000  # nginx's default: a connection closes after this many, so spread the schedule


def open_loop(
    ctx: Context, urls: dict[str, str], token: str, rate: float, duration: float, reps: int
) -> dict[str, list[tuple[float, float, float, str]]]:
    """Per route and repetition, the open loop at ``rate``: (p50 from the intended send, the generator's
    p50 and p99 send lag, all in us; the generator); routes alternated. The C generator (bench/openloop.py)
    runs the schedule alone; the Python fallback splits it over OPEN_LOOP_GENERATORS processes."""
    generator = ctx.opt("generator", "auto")
    n = 1 if generator != "python" and openloop.binary() is not None else OPEN_LOOP_GENERATORS
    out: dict[str, list[tuple[float, float, float, str]]] = {r: [] for r in urls}
    connections = max(8, int(rate / n * (duration + 1) / NGINX_KEEPALIVE_REQUESTS) + 1)
    for rep in range(reps):
        for route in urls if rep % 2 == 0 else reversed(urls):
            addr, _, path = urls[route].removeprefix("http://").partition("/")
            payloads = ctx.work / "edge-open-loop.bin"
            load.write_payloads(payloads, [wire.http_request({"Authorization": f"Bearer {token}"}, addr, "/" + path)])
            spec = load.LoadSpec(
                door=wire.Door.HTTP.value,
                addr=addr,
                mode="open",
                payload_file=str(payloads),
                duration_s=duration,
                rate=rate / n,
                connections=min(connections, 64),
                generator=generator,
            )
            with ThreadPoolExecutor(n) as pool:
                parts = list(pool.map(load.run, [spec] * n))
            latency, lag = load.new_histogram(), load.new_histogram()
            for r in parts:
                latency.add(r.latency)
                lag.add(r.lag)
                if r.errors or r.denied or r.dropped:
                    ctx.warnings.append(
                        f"open loop, {route}: {r.errors} errors, {r.denied} refused, {r.dropped} dropped"
                    )
            tool = parts[0].tool.split(" (")[0] + ("" if n == 1 else f" x{n}")
            lag99 = lag.get_value_at_percentile(99)
            out[route].append((latency.get_value_at_percentile(50), lag.get_value_at_percentile(50), lag99, tool))
            print(
                f"rep {rep + 1}/{reps} {route:24} open loop {rate:,.0f} req/s p50 {out[route][-1][0]:.0f} us"
                f" ({tool}: generator lag p50 {out[route][-1][1]:.0f} us, p99 {lag99:.0f} us)",
                file=sys.stderr,
            )
    return out


def start_envoys(ctx: Context, issuer: idp.Issuer, target: Any, upstream: int, envoys: list[Any]) -> dict[str, str]:
    """The shipped nginx and the five Envoy routes (tests/integration/gateways.py's rigs); their URLs."""
    sys.path[:0] = [str(procs.PROJECT_ROOT / "tests" / "integration"), str(procs.PROJECT_ROOT / "tests")]
    import gateways

    def port(addr: str) -> int:
        return int(addr.rsplit(":", 1)[1])

    start: dict[str, Callable[[], Any]] = {
        NGINX_AUTH: lambda: gateways.start_nginx(ctx.out, port(target.http_addr), upstream, workers=1),
        ENVOY_NONE: lambda: gateways.start_envoy(ctx.out, "none", upstream_port=upstream),
        ENVOY_JWT: lambda: gateways.start_envoy(
            ctx.out,
            "jwt_authn",
            upstream_port=upstream,
            jwt_issuer=issuer.url,
            jwks=issuer.idp.jwks(),
            jwt_audiences=(wire.AUDIENCE,),
        ),
        ENVOY_GRPC: lambda: gateways.start_envoy(
            ctx.out, "grpc", verifier_grpc_port=port(target.grpc_addr), upstream_port=upstream
        ),
        ENVOY_HTTP: lambda: gateways.start_envoy(
            ctx.out, "http", verifier_http_port=port(target.http_addr), upstream_port=upstream
        ),
        ENVOY_REUSE: lambda: gateways.start_envoy(
            ctx.out, "reuse", verifier_http_port=port(target.http_addr), upstream_port=upstream
        ),
    }
    urls = {}
    for route, make in start.items():
        envoys.append(make())
        urls[route] = f"{envoys[-1].url}{PATH}"
    return urls


def measure(
    ctx: Context,
    urls: dict[str, str],
    token: str,
    duration: float,
    reps: int,
    connections: int,
    cpu: dict[str, str] | None = None,
) -> dict[str, list[Any]]:
    """Per route and repetition: (throughput at ``connections``, latency at one connection, nginx worker CPU us per
    request over the throughput point or NaN), routes alternated; ``cpu``: route -> the folder of its nginx."""
    cpu = cpu or {}
    headers = {"Authorization": f"Bearer {token}"}
    for route, url in urls.items():  # the bench refuses to measure a route that does not answer 200
        host, _, path = url.removeprefix("http://").partition("/")
        if (status := procs.get_status(host, "/" + path, headers)) != 200:
            raise SystemExit(f"{route}: a request got {status}, not 200 (see {ctx.out}/verifier.log)")
    samples: dict[str, list[Any]] = {r: [] for r in urls}
    for rep in range(reps):
        for route in urls if rep % 2 == 0 else reversed(urls):
            before = worker_cpu_s(cpu[route]) if route in cpu else math.nan
            tput = load.wrk(
                urls[route], workdir=ctx.work, duration_s=duration, headers=headers, connections=connections
            )
            used = worker_cpu_s(cpu[route]) - before if route in cpu else math.nan
            lat = load.wrk(urls[route], workdir=ctx.work, duration_s=duration, headers=headers, connections=1)
            samples[route].append((tput, lat, used / tput.requests * 1e6 if tput.requests else math.nan))
            print(
                f"rep {rep + 1}/{reps} {route:24} {tput.throughput:9,.0f} req/s  p50(c=1) {lat.p50_us:.0f} us"
                f"  worker CPU {samples[route][-1][2]:.1f} us/request",
                file=sys.stderr,
            )
    return samples


def goals(rows: dict[str, dict[str, Any]]) -> list[report.Goal]:
    """The ratio goals of the routes measured, the worker CPU ratio of reuse on, and its p50 budget (open loop)."""
    out = [
        report.Goal(
            name=f"{route} / {against}",
            value=rows[route]["throughput"] / rows[against]["throughput"],
            threshold=minimum,
        )
        for route, against, minimum in RATIO_GOALS
        if route in rows and against in rows
    ]
    on, plain = rows[REUSE_ON], rows[PLAIN]
    if "worker_cpu_us" in on and "worker_cpu_us" in plain:
        out.append(
            report.Goal(
                name=f"{PLAIN} / {REUSE_ON}, nginx worker CPU per request",
                value=plain["worker_cpu_us"] / on["worker_cpu_us"],
                threshold=RATIO_GOALS[0][2],
                detail="scheduling-independent",
            )
        )
        out.append(
            report.Goal(
                name=f"{REUSE_ON}: nginx worker CPU added per request (us)",
                value=on["worker_cpu_us"] - plain["worker_cpu_us"],
                threshold=P50_ADDED_GOAL_US,
                at_least=False,
                detail="no I/O on a reused answer: the p50 added at low load, scheduling-independent",
            )
        )
    if "open_p50_ms" in on and "open_p50_ms" in plain:
        added, how = (on["open_p50_ms"] - plain["open_p50_ms"]) * 1000, f"open loop, {on['open_rate']:,.0f} req/s"
        if (lag := max(on["open_lag_ms"], plain["open_lag_ms"]) * 1000) > P50_ADDED_GOAL_US:
            # the generator's own scheduling noise is larger than the budget it should resolve
            how += f"; generator lag p50 {lag:.0f} us > {P50_ADDED_GOAL_US:g} us: noise, see worker CPU added"
        elif (spread := max(on.get("open_spread", 1.0), plain.get("open_spread", 1.0))) > OPEN_NOISY_SPREAD:
            # the generator kept its schedule, but the machine did not keep the server's
            how += f"; open-loop p50 varied {spread:.1f}x across repetitions: noise, see worker CPU added"
    else:
        added, how = (on["p50_ms"] - plain["p50_ms"]) * 1000, "wrk, 1 connection"
    return [
        *out,
        report.Goal(
            name=f"{REUSE_ON}: p50 added (us)", value=added, threshold=P50_ADDED_GOAL_US, at_least=False, detail=how
        ),
    ]


def _open_cell(r: dict[str, Any]) -> str:
    """The open-loop p50 with the generator's own lag (p50 / p99) and which generator ran."""
    if "open_p50_ms" not in r:
        return "-"
    lag = f"{r['open_lag_ms'] * 1000:.0f}" + (f" / {r['open_lag_p99_ms'] * 1000:.0f}" if "open_lag_p99_ms" in r else "")
    return f"{r['open_p50_ms'] * 1000:.0f} (lag {lag}, {r.get('open_tool', 'bench.load')})"


def markdown(ctx: Context, rows: dict[str, dict[str, Any]], what: str) -> str:
    """The result table (medians over repetitions), the goals and any noise warnings."""
    headers = ["route", "req/s (c=16)", "vs baseline", "spread", "p50 c=1 (us)", "p50 added (us)", "p99 c=1 (us)"]
    headers += [
        "open-loop p50 (generator lag p50 / p99) (us)",
        "worker CPU/request (us)",
        "callgrind instructions/request (runs)",
        "non-2xx",
        "wrk CPU (cores)",
        "plugin cache hits / misses",
    ]
    table = []
    for route, r in rows.items():
        base = rows[BASELINE[route]]
        table.append(
            [
                route,
                report.fmt(r["throughput"]),
                f"{r['throughput'] / base['throughput']:.2f}x ({BASELINE[route]})",
                f"{r['spread']:.2f}",
                f"{r['p50_ms'] * 1000:.0f}",
                f"{(r['p50_ms'] - base['p50_ms']) * 1000:+.0f}",
                f"{r['p99_ms'] * 1000:.0f}",
                _open_cell(r),
                f"{r['worker_cpu_us']:.1f}" if "worker_cpu_us" in r else "-",
                (
                    f"{r['instructions']:,.0f} ({', '.join(f'{x:,.0f}' for x in r['instructions_runs'])})"
                    if "instructions" in r
                    else "-"
                ),
                r["non_2xx"],
                f"{r['client_cpu_cores']:.2f}",
                r.get("cache", "-"),
            ]
        )
    notes = []
    if max(os.getloadavg()) > (os.cpu_count() or 1) / 2:
        notes.append("other work shared the machine (see the load average), so absolute numbers and ratios are noisy")
    if noisy := [r for r in rows if rows[r]["spread"] > NOISY_SPREAD]:
        notes.append(f"throughput varied by more than {NOISY_SPREAD:.2f}x across repetitions for: {', '.join(noisy)}")
    lines = [ctx.header(what), "", report.table(headers, table), "", report.goals_table(goals(rows))]
    return "\n".join([*lines, "", *[f"- {n}" for n in notes + ctx.warnings]]) + "\n"
