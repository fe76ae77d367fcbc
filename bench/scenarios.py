"""The scenarios of ``python -m bench run``: one registry, one runner (bench/runner.py), one command line.

* the token scenarios (bench/tokens.py ``KINDS``: ``jwt-cached``, ``jwt-first-seen-*``, ``garbage-flood``)
  run together at every door against the same-run baselines;
* every other scenario is a :class:`Suite`: a function ``run(ctx)`` of its module that starts the
  servers it needs (a provider, worker processes, nginx, Envoy) through the same runner and keeps the
  same method (baselines in the same run, alternation, open loop from the intended send time). Its
  own options are declared here, so ``run`` knows them and refuses them when the suite is not chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench import dpop, edge, generators, introspection, memory, overload, soak, workers
from bench.runner import Context
from bench.tokens import KINDS, TokenKind


@dataclass(frozen=True, kw_only=True)
class Suite:
    """A scenario with servers of its own."""

    name: str
    run: Callable[[Context], None]
    description: str
    options: tuple[tuple[str, type, str], ...] = ()  # (flag, type, help) beyond run's own


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            name="introspection",
            run=introspection.run,
            description="opaque tokens against a ~20 ms provider: hot, distinct, flood; batch on/off; naive",
            options=(
                ("--rate", float, "offered checks/s (introspection: default 1000; soak: instead of --rate-fraction)"),
                ("--delay", float, "provider latency in seconds (default 0.02)"),
                ("--before", str, "another checkout (the code before a change): its verifier (nginx: plugin) runs too"),
                ("--only", str, "comma-separated scenarios of hot,distinct,flood (default all)"),
                ("--syscalls", int, "1: the verifier's syscalls and context switches per token asked (perf stat)"),
                ("--floor", int, "1: the no-op on the same stack at the same rate in distinct (CPU per request)"),
            ),
        ),
        Suite(
            name="workers",
            run=workers.run,
            description="verifier throughput against worker processes (forward-auth, gRPC), with the no-op",
            options=(("--workers", str, "comma-separated worker counts (default 1,2)"),),
        ),
        Suite(
            name="memory",
            run=memory.run,
            description="verifier RSS during a flood of distinct junk tokens (1,000,000; --quick 20,000)",
            options=(
                ("--tokens", int, "distinct junk tokens to send"),
                ("--chunk", float, "seconds per wrk run (default 10)"),
                ("--settle", float, "seconds after the flood before 'after' (default 5)"),
                ("--threads", int, "wrk threads (default 1)"),
                ("--connections", int, "wrk connections (memory: 32; nginx, edge: 16)"),
            ),
        ),
        Suite(
            name="dpop",
            run=dpop.run,
            description="DPoP-bound cached token + a fresh proof per request over forward-auth, with the no-op",
            options=(
                ("--pool", int, "proofs minted per closed-loop point (default 30000)"),
                ("--fraction", float, "open-loop rate as a fraction of the DPoP max (default 0.5)"),
            ),
        ),
        Suite(
            name="soak",
            run=soak.run,
            description="cached/first-seen/junk over forward-auth + gRPC, open loop for N minutes; RSS, fds every 10 s",
            options=(
                ("--minutes", float, "how long (default 10, --quick 0.5)"),
                ("--rate-fraction", float, "of the mix's closed-loop maximum (default 0.7)"),
                ("--rate", float, ""),
                ("--token-ttl", int, "lifetime of the first-seen tokens in seconds (default 120)"),
                ("--memdebug", float, "seconds between the worker's tracemalloc/gc reports (memdebug.jsonl; off)"),
            ),
        ),
        Suite(
            name="overload",
            run=overload.run,
            description="far past capacity at the three doors, directly and through the shipped Envoy (#24 goal 4)",
            options=(
                ("--deadline-ms", int, "the flood's grpc-timeout (default 100; 0: none, budget 1 s)"),
                ("--routes", str, "overload: comma-separated grpc-doors,http,envoy-grpc,envoy-http (default all)"),
                ("--kinds", str, "overload HTTP routes: token kinds, cached,first-seen (default both)"),
                ("--pool", int, "overload first-seen: distinct tokens per phase (default 30,000)"),
                ("--before", str, "another checkout (the code before a change): its defaults are the 'before' variant"),
                ("--connections", int, "overload: wrk connections of one HTTP flood (instead of --floods)"),
                ("--floods", str, "overload HTTP: comma-separated wrk connections of the floods (default 160,1000)"),
                ("--grpc-floods", str, "overload gRPC: comma-separated h2load CLIENTSxSTREAMS floods (default 32x100)"),
            ),
        ),
        Suite(
            name="nginx",
            run=edge.run_nginx,
            description="the Kong Lua plugin's cost in front of an nginx route, with plain nginx",
            options=(
                ("--connections", int, "wrk connections for throughput (default 16; memory: 32)"),
                ("--instructions", int, "nginx: also callgrind's instructions per request over N requests (per run)"),
                ("--before", str, ""),
            ),
        ),
        Suite(
            name="generators",
            run=generators.run,
            description="the open-loop generators' own send lag at a no-op, C (bench/c/openloop.c) vs Python",
        ),
        Suite(
            name="edge",
            run=edge.run,
            description="every gateway side by side: nginx (+plugin), Envoy (none, jwt_authn, ext_authz)",
            options=(("--connections", int, ""),),
        ),
    )
}


def select(names: list[str]) -> tuple[list[TokenKind], list[Suite]]:
    """Token scenarios and suites by name or name prefix (``jwt-first-seen`` selects all three)."""
    kinds: list[TokenKind] = []
    suites: list[Suite] = []
    for name in names:
        if name in SUITES:
            suites += [SUITES[name]] if SUITES[name] not in suites else []
            continue
        matched = [k for k in KINDS if k.name == name or k.name.startswith(name + "-")]
        if not matched:
            known = ", ".join([*(k.name for k in KINDS), *SUITES])
            raise SystemExit(f"unknown scenario {name!r}; known: {known}")
        kinds += [k for k in matched if k not in kinds]
    return kinds, suites


def suite_options() -> dict[str, tuple[type, str, list[str]]]:
    """Every suite option: flag -> (type, help, the suites that take it)."""
    out: dict[str, Any] = {}
    for s in SUITES.values():
        for flag, kind, text in s.options:
            out.setdefault(flag, (kind, text, []))[2].append(s.name)
    return out
