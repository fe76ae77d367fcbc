"""``python -m bench run --scenario NAME ... | --all [--quick]``: run, write results, print the goals.

The token scenarios run together against the same-run baselines; each suite then runs in turn
(bench/scenarios.py), writing into its own sub-folder when the run has several.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import procs, tokens
from bench.runner import GRPC_CLIENTS, Context
from bench.scenarios import SUITES, select, suite_options
from bench.tokens import KINDS
from bench.wire import Door

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run(args: argparse.Namespace) -> int:
    """Run the selected scenarios, then each suite; exit status 0 even on a MISS (a goal is a finding)."""
    kinds, suites = (list(KINDS), list(SUITES.values())) if args.all else select(args.scenario or ["jwt-cached"])
    for flag, (_kind, _text, owners) in suite_options().items():
        if getattr(args, flag[2:].replace("-", "_")) is not None and not {s.name for s in suites} & set(owners):
            raise SystemExit(f"unrecognized arguments: {flag} (an option of: {', '.join(owners)})")
    out = Path(args.out) if args.out else RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S")
    print(f"bench: results in {out}", file=sys.stderr)
    if getattr(args, "pin", False):
        servers, generators = procs.pin()
        print(f"bench: pinned: servers on CPU {sorted(servers)}, generators on {sorted(generators)}", file=sys.stderr)
    nested = bool(kinds) or len(suites) > 1
    if kinds:
        ctx = Context(out=out, quick=args.quick, args=args, servers=procs.Servers(out))
        try:
            tokens.run(ctx, kinds)
        finally:
            ctx.servers.stop()
    for suite in suites:
        where = out / suite.name if nested else out
        print(f"bench: scenario {suite.name} -> {where}", file=sys.stderr)
        ctx = Context(out=where, quick=args.quick, args=args, servers=procs.Servers(where))
        try:
            suite.run(ctx)
        finally:
            ctx.servers.stop()
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m bench``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description="edge token verifier benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run scenarios and write results under bench/results/<timestamp>/")
    which = p.add_mutually_exclusive_group()
    names = [*(k.name for k in KINDS), *(f"{s.name} ({s.description})" for s in SUITES.values())]
    which.add_argument("--scenario", action="append", help=f"one of: {'; '.join(names)}; a prefix; repeatable")
    which.add_argument("--all", action="store_true", help="every scenario")
    p.add_argument("--quick", action="store_true", help="short points, one repetition: the smoke run")
    p.add_argument("--door", action="append", choices=[d.value for d in Door], help="token scenarios: these doors")
    p.add_argument("--duration", type=float, help="seconds per point (overrides the scenario's default)")
    p.add_argument("--reps", type=int, help="alternating repetitions (default 3, --quick 1)")
    p.add_argument("--out", help="results folder (default bench/results/<timestamp>; a suite's: <out>/<name>)")
    p.add_argument("--no-verifier", action="store_true", help="token scenarios: baselines only")
    p.add_argument("--no-naive", action="store_true", help="token scenarios: skip the naive PyJWKClient baseline")
    p.add_argument(
        "--policies",
        action="store_true",
        help="token scenarios: the verifier with two route policies (the second matches)",
    )
    p.add_argument(
        "--generator",
        choices=("auto", "c", "python"),
        help="open loops: bench/c/openloop.c (c), bench/load.py's Python loop (python), C if it builds (auto, default)",
    )
    p.add_argument(
        "--grpc-client",
        choices=GRPC_CLIENTS,
        help="gRPC open loops (C generator): Envoy's connection pool, another connection when every one's streams "
        "are in use (pool, default), or fixed connections queueing the rest (fixed, a grpc C-core channel each)",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="servers on the last CPU, load generators and the bench on the others (a server's tail is its own)",
    )
    for flag, (kind, text, owners) in suite_options().items():
        p.add_argument(flag, type=kind, help=f"{text} [{', '.join(owners)}]")
    sys.exit(run(parser.parse_args(argv)))
