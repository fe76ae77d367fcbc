"""`decide_cached` for a cached token, two source trees alternately in the same run (issue #19 part 1).

Each round starts one child process per tree (PYTHONPATH=<tree>), alternating which goes first; each
child builds a real `App` (tests/doorkit.running_verifier), caches one token and times
`decide_cached` with timeit (best of 3 repeats). Medians over ROUNDS rounds.

Scenarios: `plain` (no policy, no revocation: the stored answer stands), `policy` (a route policy
requiring a scope: the checks run on each hit).

    python3 bench/chain_bench.py BEFORE_TREE AFTER_TREE [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import timeit

NUMBER = 50_000
SCENARIOS = ("plain", "policy")


async def _child(scenario: str) -> float:
    from doorkit import running_verifier

    from verifier.request import RequestAttributes
    from verifier.settings import PolicySettings, Requirements, RouteMatch

    options: dict[str, object] = {}
    if scenario == "policy":
        options["policies"] = (
            PolicySettings(
                name="api", match=RouteMatch(path_prefix="/orders"), require=Requirements(scopes_all=("read",))
            ),
        )
    async with running_verifier(options) as (app, idp):
        attrs = RequestAttributes(
            "GET", "https", "api.example.test", "/orders", {"authorization": f"Bearer {idp.mint()}"}
        )
        first = app.pipeline.decide_cached(attrs)
        assert first is not None and first.allowed
        seconds = min(timeit.repeat(lambda: app.pipeline.decide_cached(attrs), number=NUMBER, repeat=3))
        return seconds / NUMBER * 1e9


def _run(tree: str, scenario: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.path.join(tree, "tests")])}
    out = subprocess.run(
        [sys.executable, __file__, "--child", scenario], env=env, check=True, capture_output=True, text=True, cwd=tree
    ).stdout
    return float(json.loads(out.strip().splitlines()[-1])["ns"])


def main() -> None:
    """Prints a Markdown table of medians, ns per decide_cached."""
    parser = argparse.ArgumentParser()
    parser.add_argument("trees", nargs="*")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"ns": asyncio.run(_child(args.child))}))
        return
    before, after = args.trees
    print(f"decide_cached, cached token: medians of {args.rounds} alternating rounds, ns per call\n")
    print("| scenario | before ns | after ns | after / before |\n| --- | ---: | ---: | ---: |")
    for scenario in SCENARIOS:
        runs: dict[str, list[float]] = {before: [], after: []}
        for i in range(args.rounds):
            for tree in (before, after) if i % 2 == 0 else (after, before):
                runs[tree].append(_run(tree, scenario))
        b, a = statistics.median(runs[before]), statistics.median(runs[after])
        print(f"| {scenario} | {b:.0f} | {a:.0f} | {a / b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
