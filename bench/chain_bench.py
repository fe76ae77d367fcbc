"""`decide_cached` for a cached token: the pipeline of another tree against this one, in one process.

Issue #19 part 1 (the pipeline as a declared chain) must not slow the hot path. The other tree's
`pipeline.py` (before the change) is loaded under another module name; both pipelines are built on
the same `App` parts (key store, clock, metrics; a cache each) and timed alternately with timeit
(best of 3 repeats per round), ROUNDS rounds, medians.

Scenarios: `plain` (no policy, no revocation: the stored answer stands), `policy` (a route policy
requiring a scope: the checks run on each hit).

    PYTHONPATH=. python3 bench/chain_bench.py /path/to/before/verifier/pipeline.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

NUMBER = 50_000


def _load_before(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("before_pipeline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _before(module: Any, app: Any) -> Any:
    """The old constructor (keyword arguments as app.py passed them before #19)."""
    from verifier.policy.rules import PolicySet
    from verifier.tokens.cache import ExpiringCache

    s = app.settings
    return module.Pipeline(
        jwt=app.jwt,
        positive=ExpiringCache(s.cache.token_entries, app.clock),
        negative=ExpiringCache(s.cache.negative_entries, app.clock),
        clock=app.clock,
        metrics=app.metrics,
        realm=s.realm,
        negative_ttl=s.cache.negative_ttl_seconds,
        audit_enabled=s.audit,
        policies=PolicySet(s.policies),
        dpop=None,
        dpop_algs=app.dpop.algorithms,
        authorization_endpoint=lambda issuer: app._discovered("authorization_endpoint", issuer)(),
        edge_max_age=s.edge_cache.max_age_seconds,
        refusal_max_age=s.edge_cache.refusal_max_age_seconds,
    )


async def _scenario(before: Any, scenario: str, rounds: int) -> tuple[float, float]:
    from doorkit import running_verifier

    from verifier.request import RequestAttributes
    from verifier.settings import PolicySettings, Requirements, RouteMatch

    options: dict[str, object] = {}
    if scenario == "policy":
        require = Requirements(scopes_all=("read",))
        options["policies"] = (PolicySettings(name="api", match=RouteMatch(path_prefix="/orders"), require=require),)
    async with running_verifier(options) as (app, idp):
        token = idp.mint()
        attrs = RequestAttributes("GET", "https", "api.example.test", "/orders", {"authorization": f"Bearer {token}"})
        pipelines = {"before": _before(before, app), "after": app.pipeline}
        runs: dict[str, list[float]] = {name: [] for name in pipelines}
        for name, pipeline in pipelines.items():
            first = pipeline.decide_cached(attrs)
            assert first is not None and first.allowed, name
        for i in range(rounds):
            for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                decide = pipelines[name].decide_cached
                seconds = min(timeit.repeat(lambda decide=decide: decide(attrs), number=NUMBER, repeat=3))
                runs[name].append(seconds / NUMBER * 1e9)
        return statistics.median(runs["before"]), statistics.median(runs["after"])


def main() -> None:
    """Prints a Markdown table of medians, ns per decide_cached."""
    parser = argparse.ArgumentParser()
    parser.add_argument("before", help="the before tree's verifier/pipeline.py")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    before = _load_before(args.before)
    print(f"decide_cached, cached token: medians of {args.rounds} alternating rounds in one process, ns per call\n")
    print("| scenario | before ns | after ns | after / before |\n| --- | ---: | ---: | ---: |")
    for scenario in ("plain", "policy"):
        b, a = asyncio.run(_scenario(before, scenario, args.rounds))
        print(f"| {scenario} | {b:.0f} | {a:.0f} | {a / b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
