"""``python -m bench.nginx_ab [--before TEMPLATE] [--reps N] [--duration S] [--instructions N] [--out DIR]``: the
shipped nginx templates against the same nginx without auth, and against another version of the template, in one run
(issue #23).

Routes, alternated in each repetition (wrk, 16 connections, one repeated ES256 token, one real verifier):

* ``nginx``              -- bench/edge.py's plain nginx (the edge scenario's baseline)
* ``shipped, auth off``  -- this tree's deploy/nginx/nginx.conf.template with ``auth_request off``: the same nginx
  without auth, the issue's baseline
* ``shipped``            -- the same template as shipped (``auth_request`` to the verifier, answers reused)
* ``shipped, Lua``       -- deploy/nginx/nginx-lua.conf.template as shipped (verifier-reuse.lua: answers reused
  from a lua_shared_dict instead of proxy_cache)
* ``before``             -- ``--before``'s template (e.g. main's copy), when given

Every shipped nginx has one worker and proxies to the same upstream. Besides throughput it prints the nginx
worker's CPU time per request (utime + stime from /proc over the requests wrk completed): on a machine shared
with other work, throughput follows the scheduler, while CPU per request is what the configuration costs.

``--instructions N`` adds a figure independent of the scheduler altogether: each shipped nginx is started once more
under valgrind's callgrind, and after 300 warm-up requests the worker's user-space instructions over N sequential
requests (one keep-alive connection) are counted (kernel time is not in it: the system calls a configuration makes
are only in the CPU figure).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from bench import edge, idp, load, procs
from bench.runner import Context

OFF, SHIPPED, LUA, BEFORE = "shipped, auth off", "shipped", "shipped, Lua", "before"


def worker_cpu_s(master: int) -> float:
    """CPU seconds (user + system) used so far by the nginx workers of the master ``master``."""
    found = subprocess.run(["pgrep", "-P", str(master), "-f", "worker process"], capture_output=True, text=True)
    total = 0
    for pid in found.stdout.split():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# run_nginx's `nginx -t` check runs plain; the server under callgrind, as one process (`master_process off`: the
# master serves, so the pid we started is the one to zero and dump; valgrind cannot reach a forked worker)
CALLGRIND_NGINX = """#!/bin/sh
for a in "$@"; do [ "$a" = "-t" ] && exec {nginx} "$@"; done
for a; do shift; [ "$a" = "${{a#daemon off;}}" ] || a="master_process off; $a"; set -- "$@" "$a"; done
exec valgrind --tool=callgrind --callgrind-out-file={out}/callgrind.%p {nginx} "$@"
"""


def instructions_per_request(
    gateways: ModuleType, work: Path, start: dict[str, object], url_path: str, n: int, headers: dict[str, str]
) -> float:
    """The nginx worker's user-space instructions per request (callgrind), ``start`` given to start_nginx."""
    out = Path(tempfile.mkdtemp(prefix="callgrind-", dir=work))
    wrapper = out / "nginx"
    wrapper.write_text(CALLGRIND_NGINX.format(nginx=shutil.which("nginx") or "/usr/sbin/nginx", out=out))
    wrapper.chmod(0o755)
    saved, gateways.READY_TIMEOUT_S = gateways.READY_TIMEOUT_S, 120.0
    os.environ["NGINX_BIN"] = str(wrapper)
    try:
        gw = gateways.start_nginx(**start)
    finally:
        del os.environ["NGINX_BIN"]
        gateways.READY_TIMEOUT_S = saved
    try:
        return edge.callgrind_instructions(gw.proc.pid, f"{gw.url}{url_path}", n, headers, out)
    finally:
        gw.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.nginx_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, help="another nginx.conf.template to measure beside this tree's")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--instructions", type=int, default=0, metavar="N", help="also count instructions (callgrind)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="bench-nginx-ab-")))
    args = parser.parse_args()
    sys.path[:0] = [str(procs.PROJECT_ROOT / "tests" / "integration"), str(procs.PROJECT_ROOT / "tests")]
    import gateways

    ctx = Context(out=args.out, quick=False, args=argparse.Namespace(), servers=procs.Servers(args.out))
    issuer = idp.Issuer(ctx.servers)
    target, token = ctx.servers.start_verifier(issuer.url), issuer.cached_token
    verifier_port = int(target.http_addr.rsplit(":", 1)[1])
    tmp, shipped_template, running = tempfile.mkdtemp(prefix="bench-nginx-"), gateways.NGINX_TEMPLATE, []
    try:
        base, upstream = edge.start_nginx(ctx, target.http_addr, 10_000, tmp)
        urls, masters, starts = {edge.PLAIN: f"{base}/plain{edge.PATH}"}, {}, {}
        routes = [(OFF, shipped_template, False, False), (SHIPPED, shipped_template, True, False)]
        routes.append((LUA, shipped_template, True, True))
        if args.before:
            routes.append((BEFORE, args.before.resolve(), True, False))
        for name, template, auth, lua in routes:
            gateways.NGINX_TEMPLATE = template
            running.append(gateways.start_nginx(args.out, verifier_port, upstream, workers=1, auth=auth, lua=lua))
            urls[name], masters[name] = f"{running[-1].url}{edge.PATH}", running[-1].proc.pid
            starts[name] = (
                template,
                {
                    "tmp_path": args.out,
                    "verifier_http_port": verifier_port,
                    "upstream_port": upstream,
                    "workers": 1,
                    "auth": auth,
                    "lua": lua,
                },
            )
        gateways.NGINX_TEMPLATE = shipped_template
        headers = {"Authorization": f"Bearer {token}"}
        tput: dict[str, list[float]] = {r: [] for r in urls}
        cpu_us: dict[str, list[float]] = {r: [] for r in masters}
        for rep in range(args.reps):
            for route in urls if rep % 2 == 0 else reversed(urls):
                before = worker_cpu_s(masters[route]) if route in masters else 0.0
                r = load.wrk(urls[route], workdir=ctx.work, duration_s=args.duration, headers=headers)
                if r.refusals or r.errors:
                    raise SystemExit(f"{route}: {r.refusals} non-2xx and {r.errors} socket errors")
                tput[route].append(r.throughput)
                if route in masters:
                    cpu_us[route].append((worker_cpu_s(masters[route]) - before) / (r.throughput * r.seconds) * 1e6)
                print(f"rep {rep + 1}/{args.reps} {route:18} {r.throughput:9,.0f} req/s", file=sys.stderr)
        instructions: dict[str, float] = {}
        for route, (template, start) in starts.items() if args.instructions else ():
            gateways.NGINX_TEMPLATE = template
            instructions[route] = instructions_per_request(
                gateways, ctx.work, start, edge.PATH, args.instructions, headers
            )
            print(f"{route:18} {instructions[route]:,.0f} instructions/request (callgrind)", file=sys.stderr)
        gateways.NGINX_TEMPLATE = shipped_template
    finally:
        for gw in running:
            gw.stop()
        ctx.servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    off = statistics.median(tput[OFF])
    print(f"{args.reps} alternating repetitions of {args.duration:g} s; load average at the end {procs.loadavg()}\n")
    # Each repetition measures every route within seconds of the baseline: the median of those paired ratios
    # follows the machine's load less than the ratio of two medians does.
    print(
        "| route | req/s (c=16), median | vs shipped, auth off | paired, median | worker CPU/request (us), median |"
        " runs (req/s) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for route, values in tput.items():
        cpu = f"{statistics.median(cpu_us[route]):.1f}" if route in cpu_us else "-"
        runs = ", ".join(f"{v:,.0f}" for v in values)
        median = statistics.median(values)
        paired = statistics.median(v / o for v, o in zip(values, tput[OFF], strict=True))
        print(f"| {route} | {median:,.0f} | {median / off:.2f}x | {paired:.2f}x | {cpu} | {runs} |")
    if instructions:
        print(
            f"\nnginx worker, user-space instructions per request (callgrind, {args.instructions:,} requests, c=1):\n"
        )
        print("| route | instructions/request | vs shipped, auth off |")
        print("|---|---:|---:|")
        for route, count in instructions.items():
            print(f"| {route} | {count:,.0f} | {count / instructions[OFF]:.2f}x |")


if __name__ == "__main__":
    main()
