"""The scenarios of ``python -m bench run``: which tokens are sent, what answer is expected, and how.

Two kinds, one command line (``--scenario NAME`` or ``--all``, ``--quick``, ``--duration``, ``--out``):

* a :class:`Scenario` is a token kind measured at every door by bench/runner.py against the same-run
  baselines (no-op, naive, crypto floor), alternated per repetition; a new credential kind is one more
  entry in :data:`SCENARIOS` whose ``kind`` :meth:`runner.Bench.tokens_for` mints;
* a :class:`Suite` starts servers of its own (a provider, worker processes, nginx, Envoy) and keeps the
  same method inside its module (baseline in the same run, alternation, open loop from the intended
  send time); its options after ``--scenario NAME`` are passed on (``--minutes 10`` for soak).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.wire import Door


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One benchmark scenario."""

    name: str
    kind: str  # "cached": one repeated token; "first_seen": each token once; "garbage": junk, refused
    alg: str = "ES256"
    expect_allow: bool = True
    doors: tuple[Door, ...] = (Door.GRPC, Door.EXT_AUTHZ, Door.HTTP)
    description: str = ""

    @property
    def distinct_tokens(self) -> bool:
        """Whether every request carries a different token (so h2load's fixed body cannot be used)."""
        return self.kind != "cached"


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(name="jwt-cached", kind="cached", description="one valid ES256 token, repeated"),
        Scenario(name="jwt-first-seen-es256", kind="first_seen", alg="ES256", description="each ES256 token once"),
        Scenario(name="jwt-first-seen-rs256", kind="first_seen", alg="RS256", description="each RS256 token once"),
        Scenario(name="jwt-first-seen-eddsa", kind="first_seen", alg="EdDSA", description="each EdDSA token once"),
        Scenario(name="garbage-flood", kind="garbage", expect_allow=False, description="distinct junk tokens"),
        # LATER: opaque-introspection, dpop-bound, webauthn-assertion, nginx-lua-door.
    )
}


@dataclass(frozen=True, kw_only=True)
class Suite:
    """A scenario with servers of its own: ``bench.<module>.main(argv)`` writes results.md and results.json."""

    name: str
    module: str
    description: str
    quick: tuple[str, ...] = ("--quick",)  # the smoke-run options
    shared: tuple[str, ...] = ("duration",)  # which of ``run``'s --duration / --reps it understands


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            name="introspection",
            module="introspection_bench",
            description="opaque tokens against a ~20 ms provider: hot, distinct, flood; batch on/off; naive",
        ),
        Suite(
            name="workers",
            module="workers_curve",
            description="verifier throughput against worker processes (forward-auth, gRPC), with the no-op",
        ),
        Suite(
            name="memory",
            module="memory",
            description="verifier RSS during a flood of distinct junk tokens (1,000,000; --quick 20,000)",
            quick=("--tokens", "20000", "--chunk", "2", "--settle", "1"),
            shared=(),
        ),
        Suite(
            name="dpop",
            module="dpop_bench",
            description="DPoP-bound cached token + a fresh proof per request over forward-auth, with the no-op",
        ),
        Suite(
            name="soak",
            module="soak",
            description="open loop at a fraction of the maximum for N minutes; RSS and open fds every 10 s",
            quick=("--minutes", "0.5"),
            shared=(),
        ),
        Suite(
            name="nginx",
            module="scenario_nginx",
            shared=("duration", "reps"),
            description="the Kong Lua plugin's cost in front of an nginx route, with plain nginx",
        ),
        Suite(
            name="edge",
            module="scenario_edge",
            shared=("duration", "reps"),
            description="every gateway side by side: nginx (+plugin), Envoy (none, jwt_authn, ext_authz)",
        ),
    )
}


def select(names: list[str]) -> tuple[list[Scenario], list[Suite]]:
    """Scenarios and suites by name or name prefix (``jwt-first-seen`` selects all three algorithms)."""
    out: list[Scenario] = []
    suites: list[Suite] = []
    for name in names:
        if name in SUITES:
            suites += [SUITES[name]] if SUITES[name] not in suites else []
            continue
        matched = [s for s in SCENARIOS.values() if s.name == name or s.name.startswith(name + "-")]
        if not matched:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join([*SCENARIOS, *SUITES])}")
        out += [s for s in matched if s not in out]
    return out, suites
