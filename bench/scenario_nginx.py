"""``python -m bench run --scenario nginx [--quick]``: the Kong Lua plugin's cost in front of a route, in one run.

Three routes on the same nginx build, measured alternately in each repetition with wrk and one repeated
token (what a busy client sends):

* ``plain``           -- nginx proxying to a local upstream, no plugin (the ceiling)
* ``plugin+cache``    -- the same route behind kong/plugins/edge-verifier (decision cache on, 10000 entries)
* ``plugin-nocache``  -- the same, ``cache_entries = 0``: every request asks the verifier

The plugin runs unmodified under the PDK shim of tests/kong/shim (as tests/kong does), asking the
real verifier (``python -m verifier serve``, bench/runner.py's) whose keys come from the bench issuer.
The upstream is an nginx ``return 200`` server block in the same nginx, so it costs next to nothing and
the difference between routes is the plugin and the verifier. Whether ``plugin+cache`` saves anything
depends on the verifier: it reuses only answers marked ``Cache-Control: max-age`` (``no-store`` today),
and the table shows the shim's cache hits.

Throughput: wrk, ``--connections`` (16) connections, closed loop. Added latency: wrk with one
connection (no queueing, so p50 is the service time; closed-loop tails are not reported as latency).
Writes results.md/results.json under bench/results/<timestamp>-nginx/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import runner, tools, wire

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIM_DIR = PROJECT_ROOT / "tests" / "kong" / "shim"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
LUA_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")
SYSTEM_LUA_PATH = "/usr/share/lua/5.1/?.lua;/usr/share/lua/5.1/?/init.lua"
SYSTEM_LUA_CPATH = "/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;/usr/lib/aarch64-linux-gnu/lua/5.1/?.so"
PATH = "/api/orders/42"
ROUTES = ("plain", "plugin+cache", "plugin-nocache")
CACHE_ENTRIES = {"plugin+cache": 10_000, "plugin-nocache": 0}

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

WRK_SCRIPT = r"""
wrk.headers["Authorization"] = "Bearer %(token)s"
"""


@dataclass(frozen=True, kw_only=True)
class Nginx:
    """One nginx running the plugin with one configuration (and the plain route beside it)."""

    proc: subprocess.Popen[bytes]
    tmp: str
    base: str

    def url(self, route: str) -> str:
        """Where wrk sends the requests of `route`."""
        prefix = "/plain" if route == "plain" else "/checked"
        return f"{self.base}{prefix}{PATH}"

    def cache_stats(self) -> dict[str, Any]:
        """The decision cache's counters in this nginx's worker."""
        with urllib.request.urlopen(f"{self.base}/__shim/cache", timeout=5) as r:
            return dict(json.loads(r.read()))

    def stop(self) -> None:
        """Stop nginx and remove its prefix."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _module_dir() -> str:
    for d in LUA_MODULE_DIRS:
        if os.path.exists(os.path.join(d, "ngx_http_lua_module.so")):
            return d
    raise SystemExit("nginx's Lua module is missing: run .ci/setup.d/30-nginx-lua.sh")


def start_nginx(verifier_http: str, cache_entries: int) -> Nginx:
    """nginx with the plugin asking the verifier at `verifier_http` (host:port)."""
    tmp = tempfile.mkdtemp(prefix="bench-nginx-")
    os.chmod(tmp, 0o755)  # workers run as nobody when started as root
    port, upstream_port = runner.free_port(), runner.free_port()
    plugin_conf = {"url": f"http://{verifier_http}{wire.FORWARD_AUTH_PATH}", "cache_entries": cache_entries}
    Path(tmp, "shim.json").write_text(json.dumps({"plugin_conf": plugin_conf}))
    Path(tmp, "nginx.conf").write_text(
        NGINX_CONF.format(
            tmp=tmp,
            modules=_module_dir(),
            repo=PROJECT_ROOT,
            shim=SHIM_DIR,
            lua_path=SYSTEM_LUA_PATH,
            lua_cpath=SYSTEM_LUA_CPATH,
            port=port,
            upstream_port=upstream_port,
        )
    )
    proc = subprocess.Popen(
        [NGINX, "-p", tmp, "-c", "nginx.conf", "-e", f"{tmp}/error.log", "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    runner._wait_port(f"127.0.0.1:{port}", proc)
    return Nginx(proc=proc, tmp=tmp, base=f"http://127.0.0.1:{port}")


def run_wrk(url: str, token: str, *, connections: int, duration_s: float, workdir: Path) -> dict[str, Any]:
    """One closed-loop wrk run; requests, seconds, errors and latency percentiles (us)."""
    return tools.run_wrk(
        url,
        WRK_SCRIPT % {"token": token},
        workdir=workdir,
        name="nginx",
        duration_s=duration_s,
        connections=connections,
    )


def check_route(url: str, token: str) -> int:
    """The status one request gets (the bench refuses to measure a route that does not answer 200)."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def markdown(rows: list[dict[str, Any]], opts_line: str, machine: dict[str, Any]) -> str:
    """The result table (medians over repetitions)."""
    plain = next(r for r in rows if r["route"] == "plain")
    lines = [
        f"Run: {opts_line}",
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} CPUs; nginx 1 worker; verifier 1 process",
        "",
        "| route | req/s (c=16) | vs plain | p50 c=1 (ms) | p50 added (ms) | p99 c=1 (ms) | non-2xx | "
        "cache hits / misses |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['route']} | {r['throughput']:,.0f} | {r['throughput'] / plain['throughput']:.2f} | "
            f"{r['p50_ms']:.3f} | {r['p50_ms'] - plain['p50_ms']:+.3f} | {r['p99_ms']:.3f} | {r['non_2xx']} | "
            f"{r.get('cache', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m bench run --scenario nginx", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s points, one repetition")
    parser.add_argument("--duration", type=float, help="seconds per point (default 5, --quick 1)")
    parser.add_argument("--reps", type=int, help="alternating repetitions (default 3, --quick 1)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections for throughput")
    parser.add_argument("--out", help="results folder (default bench/results/<timestamp>-nginx)")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: run .ci/setup.d/40-bench.sh")
    duration = args.duration or (1.0 if args.quick else 5.0)
    reps = args.reps or (1 if args.quick else 3)
    out = Path(args.out) if args.out else RESULTS_DIR / (time.strftime("%Y%m%d-%H%M%S") + "-nginx")
    out.mkdir(parents=True, exist_ok=True)

    bench = runner.Bench(runner.Options(scenarios=[], doors=[], out_dir=out, with_naive=False))
    started = time.time()
    nginxes: dict[str, Nginx] = {}
    samples: dict[str, list[dict[str, Any]]] = {r: [] for r in ROUTES}
    try:
        bench.start_issuer()
        target = bench.start_verifier()
        token = bench.cached_token
        for route, entries in CACHE_ENTRIES.items():
            nginxes[route] = start_nginx(target.http_addr, entries)
        nginxes["plain"] = nginxes["plugin+cache"]  # the plain route of the same nginx
        for route in ROUTES:
            status = check_route(nginxes[route].url(route), token)
            if status != 200:
                raise SystemExit(f"{route}: a request got {status}, not 200 (see {out}/verifier.log)")
        for rep in range(reps):
            order = ROUTES if rep % 2 == 0 else tuple(reversed(ROUTES))
            for route in order:
                url = nginxes[route].url(route)
                tput = run_wrk(url, token, connections=args.connections, duration_s=duration, workdir=out)
                lat = run_wrk(url, token, connections=1, duration_s=duration, workdir=out)
                samples[route].append({"throughput": tput, "latency": lat})
                print(
                    f"rep {rep + 1}/{reps} {route:15} {tput['throughput']:9,.0f} req/s  "
                    f"p50(c=1) {lat['p50_us'] / 1000:.3f} ms",
                    file=sys.stderr,
                )
        rows = []
        for route in ROUTES:
            s = samples[route]
            row: dict[str, Any] = {
                "route": route,
                "throughput": statistics.median(x["throughput"]["throughput"] for x in s),
                "p50_ms": statistics.median(x["latency"]["p50_us"] for x in s) / 1000,
                "p99_ms": statistics.median(x["latency"]["p99_us"] for x in s) / 1000,
                "non_2xx": sum(x["throughput"]["status_errors"] + x["latency"]["status_errors"] for x in s),
                "socket_errors": sum(x["throughput"]["socket_errors"] + x["latency"]["socket_errors"] for x in s),
            }
            if route != "plain":
                stats = nginxes[route].cache_stats()
                row["cache"] = f"{stats['hits']:,} / {stats['misses']:,}"
            rows.append(row)
    finally:
        for n in {id(n): n for n in nginxes.values()}.values():
            n.stop()
        bench.stop()

    machine = runner.machine_info()
    opts_line = (
        f"{'quick' if args.quick else 'full'}; {duration:g} s per point; {reps} alternating repetition(s); "
        f"one repeated ES256 token; took {time.time() - started:.0f} s"
    )
    md = markdown(rows, opts_line, machine)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(
        json.dumps({"options": opts_line, "machine": machine, "rows": rows, "samples": samples}, indent=1)
    )
    print(md)
    print(f"bench: wrote {out}/results.md and results.json", file=sys.stderr)
