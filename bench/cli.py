"""``python -m bench run --scenario NAME ... | --all [--quick]``: run, then write results and print goals.

Scenarios (bench/scenarios.py) run together against the same-run baselines; each suite (introspection,
workers, memory, dpop, soak, nginx, edge) then runs in turn, writing into its own sub-folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import report, runner
from bench.scenarios import SCENARIOS, SUITES, Scenario, Suite, select
from bench.wire import Door

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _options(args: argparse.Namespace, scenarios: list[Scenario], out: Path) -> runner.Options:
    out.mkdir(parents=True, exist_ok=True)
    doors = [Door(d) for d in args.door] if args.door else list(Door)
    common = dict(
        scenarios=scenarios, doors=doors, out_dir=out, with_verifier=not args.no_verifier, with_naive=not args.no_naive
    )
    if args.quick:
        opts = runner.Options(
            **common,
            duration_s=1.0,
            warmup_s=0.3,
            reps=1,
            load_fractions=(0.25, 0.5),
            workers=(1, 2),
            pool_per_point=5_000,
        )
    else:
        opts = runner.Options(**common)
    overrides = {k: v for k, v in (("duration_s", args.duration), ("reps", args.reps)) if v is not None}
    return runner.Options(**{**opts.__dict__, **overrides}) if overrides else opts


def run(args: argparse.Namespace, passed_on: list[str]) -> int:
    """Run the selected scenarios, then each suite; exit status 0 even on a MISS (a goal is a finding)."""
    if args.all:
        scenarios, suites = list(SCENARIOS.values()), list(SUITES.values())
    else:
        scenarios, suites = select(args.scenario or ["jwt-cached"])
    if passed_on and not suites:
        raise SystemExit(f"unrecognized arguments: {' '.join(passed_on)}")
    out = Path(args.out) if args.out else RESULTS_DIR / time.strftime("%Y%m%d-%H%M%S")
    if scenarios:
        run_scenarios(args, _options(args, scenarios, out))
    for suite in suites:
        run_suite(suite, args, passed_on, out / suite.name if scenarios or len(suites) > 1 else out)
    return 0


def run_suite(suite: Suite, args: argparse.Namespace, passed_on: list[str], out: Path) -> None:
    """One suite with the run's options (``--quick`` as the suite reads it, ``--duration``, ``--out``)."""
    import importlib

    argv = [*(suite.quick if args.quick else ()), "--out", str(out), *passed_on]
    for option in suite.shared:
        if getattr(args, option) is not None:
            argv += [f"--{option}", str(getattr(args, option))]
    print(f"bench: scenario {suite.name}: {' '.join(argv)}", file=sys.stderr)
    importlib.import_module(f"bench.{suite.module}").main(argv)


def run_scenarios(args: argparse.Namespace, opts: runner.Options) -> None:
    """The token scenarios at every door, with the no-op, naive and floor baselines of the same run."""
    from tqdm import tqdm

    bench = runner.Bench(opts)
    started = time.time()
    try:
        print(f"bench: results in {opts.out_dir}", file=sys.stderr)
        bench.start_issuer()
        bench.targets["noop"] = bench.start_baseline("noop")
        if opts.with_naive:
            bench.targets["naive"] = bench.start_baseline("naive")
        if opts.with_verifier:
            try:
                bench.targets["verifier"] = bench.start_verifier()
            except Exception as exc:
                bench.warnings.append(f"verifier did not start: {exc} (see verifier.log)")
                print(f"bench: verifier did not start: {exc}", file=sys.stderr)
        print("bench: minting token pools ...", file=sys.stderr)
        for s in opts.scenarios:
            for rep in range(opts.reps):
                for door in opts.doors:
                    if "verifier" in bench.targets:
                        bench.tokens_for(s, door, rep)
        steps = list(runner.plan(bench)) + list(runner.workers_plan(bench))
        steps.append(("floor: in-process verify", bench.measure_floor))
        with tqdm(steps, unit="point", file=sys.stderr, dynamic_ncols=True) as bar:
            for label, action in bar:
                bar.set_description(label)
                try:
                    action()
                except Exception as exc:
                    bench.warnings.append(f"{label}: {exc!r}")
    finally:
        bench.stop()
    machine = runner.machine_info()
    goal_list = report.goals(bench.points, bench.floor, [d.value for d in opts.doors])
    plots = report.plot(bench.points, opts.out_dir)
    opts_line = (
        f"{'quick' if args.quick else 'full'}; {opts.duration_s:g} s per point after {opts.warmup_s:g} s "
        f"warm-up; {opts.reps} alternating repetition(s); scenarios: "
        f"{', '.join(s.name for s in opts.scenarios)}; took {time.time() - started:.0f} s"
    )
    md = report.markdown(
        points=bench.points,
        floor=bench.floor,
        goal_list=goal_list,
        machine=machine,
        opts_line=opts_line,
        warnings=bench.warnings,
        plots=plots,
    )
    (opts.out_dir / "results.md").write_text(md)
    (opts.out_dir / "results.json").write_text(
        json.dumps(
            {
                "options": opts_line,
                "machine": machine,
                "floor": bench.floor,
                "warnings": bench.warnings,
                "goals": [
                    dict(
                        name=g.name,
                        value=g.value,
                        threshold=g.threshold,
                        at_least=g.at_least,
                        verdict=g.verdict,
                        detail=g.detail,
                    )
                    for g in goal_list
                ],
                "points": bench.points,
            },
            indent=1,
            default=str,
        )
    )
    print(md)
    for g in goal_list:
        print(f"{g.verdict:4}  {g.name}: {g.value:.2f} ({'>=' if g.at_least else '<='} {g.threshold}; {g.detail})")
    print(f"bench: wrote {opts.out_dir}/results.md, results.json and {len(plots)} plot(s)", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m bench``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description="edge token verifier benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run scenarios and write results under bench/results/<timestamp>/")
    which = p.add_mutually_exclusive_group()
    names = "; ".join(f"{s.name}: {s.description}" for s in SUITES.values())
    which.add_argument(
        "--scenario",
        action="append",
        help=f"one of: {', '.join(SCENARIOS)} (or a prefix); or a suite ({names}); repeatable",
    )
    which.add_argument("--all", action="store_true", help="every scenario and every suite")
    p.add_argument("--quick", action="store_true", help="1 s points, one repetition; suites' smoke options")
    p.add_argument("--door", action="append", choices=[d.value for d in Door], help="limit to these doors")
    p.add_argument("--duration", type=float, help="seconds per point (overrides the mode's default)")
    p.add_argument("--reps", type=int, help="alternating repetitions (default 3, --quick 1; nginx, edge too)")
    p.add_argument("--out", help="results folder (default bench/results/<timestamp>; a suite's: <out>/<name>)")
    p.add_argument("--no-verifier", action="store_true", help="baselines only")
    p.add_argument("--no-naive", action="store_true", help="skip the naive PyJWKClient baseline")
    args, passed_on = parser.parse_known_args(argv)
    sys.exit(run(args, passed_on))
