"""``python -m bench run --scenario memory [--tokens 1000000]``: the verifier's resident memory during a junk flood.

One verifier (default config: refused-token cache of 100,000 entries) behind forward-auth; wrk sends
junk tokens made in its Lua script, a different one on every request (half look like a JWS with an
unknown ``kid``, half are opaque junk; 100-200 bytes each), in chunks of ``--chunk`` seconds until
``--tokens`` requests have been answered. Every 0.5 s, from before the flood until ``--settle`` s after
it, the bench samples the PSS of the verifier's supervisor + worker and the serving worker's VmRSS;
VmHWM summed over both bounds the peak. Goal (issue "Hostile input"): resident size below 300 MB.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from bench import idp, load, procs, report, wire
from bench.runner import Context
from bench.wire import Door

GOAL_MB = 300.0
SAMPLE_S = 0.5

WRK_JUNK = r"""
-- A distinct junk token on every request, made here (a million tokens would not fit a file).
local offset, nthreads, counter, i = %(offset)d, %(threads)d, 0, 0
function setup(thread) thread:set("tid", counter); counter = counter + 1 end
local head = "eyJhbGciOiJFUzI1NiIsImtpZCI6Im5vcGUiLCJ0eXAiOiJhdCtqd3QifQ"
local filler = "Qk1PTkVZLXJhbmRvbS1sb29raW5nLWJ5dGVzLWZvci10aGUtZmxvb2QtdGVzdA"
function init(args) i = tid end
function request()
  i = i + nthreads
  local n, t = offset + i
  if n %% 2 == 0 then
    t = head .. ".eyJzdWIiOiJ" .. string.format("%%015d", n) .. filler
      .. "." .. filler .. string.format("%%015d", n * 7)
  else
    t = string.format("junk-%%015d-", n) .. filler .. string.format("%%015d", n * 13)
  end
  return wrk.format("GET", "%(path)s", {["Authorization"] = "Bearer " .. t, ["X-Forwarded-Method"] = "GET",
    ["X-Forwarded-Uri"] = "%(uri)s", ["X-Forwarded-Host"] = "%(host)s", ["X-Forwarded-Proto"] = "https"})
end
"""


def run(ctx: Context) -> None:
    """The flood, sampled; writes results and rss-during-flood.png."""
    tokens, chunk = ctx.opt("tokens", 1_000_000, 20_000), ctx.opt("chunk", 10.0, 2.0)
    settle, threads, connections = ctx.opt("settle", 5.0, 1.0), ctx.opt("threads", 1), ctx.opt("connections", 32)
    issuer = idp.Issuer(ctx.servers)
    target = ctx.servers.start_verifier(issuer.url)
    ctx.guard(target, Door.HTTP, issuer.cached_token, True)
    samples: list[tuple[float, int]] = []  # (seconds since t0, tree PSS KiB)
    worker_max = [0]
    stopped = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stopped.is_set():
            samples.append((time.monotonic() - t0, procs.pss_kib(target.pids)))
            worker_max[0] = max(worker_max[0], procs.max_rss_kib(target.pids))
            stopped.wait(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(2.0)
    before = (procs.pss_kib(target.pids), procs.max_rss_kib(target.pids))
    flood_start, total, chunks = time.monotonic() - t0, 0, []
    url = f"http://{target.http_addr}{wire.FORWARD_AUTH_PATH}"
    while total < tokens:
        lua = WRK_JUNK % dict(
            offset=len(chunks) * 10**12,
            threads=threads,
            path=wire.FORWARD_AUTH_PATH,
            uri=wire.ORIGINAL_PATH,
            host=wire.ORIGINAL_HOST,
        )
        r = load.wrk(url, workdir=ctx.work, duration_s=chunk, lua=lua, connections=connections, threads=threads)
        total += r.requests
        c = dict(
            total=total,
            requests=r.requests,
            seconds=r.seconds,
            refused=r.refusals,
            errors=r.errors,
            client_cpu_s=r.cpu_s,
        )
        chunks.append(c | dict(pss_kib=procs.pss_kib(target.pids), worker_rss_kib=procs.max_rss_kib(target.pids)))
        print(
            f"bench: {total:>10,} junk tokens sent, {r.throughput:,.0f}/s, PSS {chunks[-1]['pss_kib'] / 1024:.1f} MiB",
            file=sys.stderr,
        )
    flood_end = time.monotonic() - t0
    during = max(kib for t, kib in samples if flood_start <= t <= flood_end)
    time.sleep(settle)
    after = (procs.pss_kib(target.pids), procs.max_rss_kib(target.pids))
    hwm, still_ok = procs.hwm_kib(target.pids), ctx.guard(target, Door.HTTP, issuer.cached_token, True)
    stopped.set()
    sampler.join()
    secs = sum(c["seconds"] for c in chunks)
    mib = [x / 1024 for x in (*before, during, worker_max[0], *after, hwm)]
    result = dict(tokens_sent=total, rate=total / secs if secs else 0.0, refused=sum(c["refused"] for c in chunks))
    result.update(socket_errors=sum(c["errors"] for c in chunks), valid_token_allowed_after=still_ok)
    result.update(
        zip(
            (
                "before_mib",
                "worker_before_mib",
                "during_max_mib",
                "worker_max_mib",
                "after_mib",
                "worker_after_mib",
                "hwm_mib",
            ),
            mib,
            strict=True,
        )
    )
    result.update(chunks=chunks, samples=samples, flood_s=(flood_start, flood_end), warnings=ctx.warnings)
    panel = report.Panel(
        title="verifier memory during a junk flood",
        xlabel="seconds",
        ylabel="MiB",
        hline=(GOAL_MB, f"goal {GOAL_MB:g} MB"),
        span=(flood_start, flood_end, "junk flood"),
    )
    panel.lines.append(
        ("verifier PSS (supervisor + worker)", [t for t, _ in samples], [k / 1024 for _, k in samples], "-")
    )
    report.plot(ctx.out / "rss-during-flood.png", [panel])
    report.write(ctx.out, markdown(ctx, result), result)


def markdown(ctx: Context, r: dict[str, Any]) -> str:
    """The before/during/after table, milestones and the goal."""
    milestones, mark = [], 100_000
    for c in r["chunks"]:  # the first chunk past each multiple of 100,000 tokens, and the last
        if c["total"] >= mark or c is r["chunks"][-1]:
            milestones.append([f"{c['total']:,}", f"{c['pss_kib'] / 1024:.1f}", f"{c['worker_rss_kib'] / 1024:.1f}"])
            mark = (c["total"] // 100_000 + 1) * 100_000
    what = f"{r['tokens_sent']:,} distinct junk tokens over forward-auth (wrk, Lua-generated) at {r['rate']:,.0f}/s; "
    what += f"{r['refused']:,} refused, {r['socket_errors']} socket errors; a valid token still allowed after: "
    what += "yes" if r["valid_token_allowed_after"] else "NO"
    whens = [
        ["before the flood", f"{r['before_mib']:.1f}", f"{r['worker_before_mib']:.1f}"],
        ["during (max of 0.5 s samples)", f"{r['during_max_mib']:.1f}", f"{r['worker_max_mib']:.1f}"],
        ["after (settled)", f"{r['after_mib']:.1f}", f"{r['worker_after_mib']:.1f}"],
        ["peak VmHWM summed over supervisor + worker (upper bound)", f"{r['hwm_mib']:.1f}", ""],
    ]
    mb = 1.048576  # MB per MiB
    ok = r["hwm_mib"] * mb < GOAL_MB and r["tokens_sent"] >= 1_000_000
    measured = f"{r['during_max_mib'] * mb:.0f} MB tree PSS, {r['hwm_mib'] * mb:.0f} MB summed VmHWM"
    lines = [
        ctx.header(what),
        "",
        report.table(["when", "verifier tree PSS (MiB)", "serving worker VmRSS (MiB)"], whens),
    ]
    lines += ["", report.table(["junk tokens sent", "tree PSS (MiB)", "worker VmRSS (MiB)"], milestones)]
    lines += [
        "",
        report.table(
            ["goal", "measured", "result"],
            [[f"resident size < {GOAL_MB:g} MB during the flood", measured, report.verdict(ok)]],
        ),
    ]
    lines += ["", "![RSS during the flood](rss-during-flood.png)"]
    return "\n".join(lines + [f"- warning: {w}" for w in r["warnings"]]) + "\n"
