"""The scenarios: which tokens are sent, what answer is expected, and how the load is generated.

Extension point: a new credential kind (opaque tokens + introspection, DPoP, WebAuthn, the
nginx+Lua front door) is one more :class:`Scenario` in :data:`SCENARIOS` with its own ``tokens``
kind; bench/runner.py mints by ``kind`` in :meth:`runner.Bench.tokens_for`.
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


def select(names: list[str]) -> list[Scenario]:
    """Scenarios by name or name prefix (``jwt-first-seen`` selects all three algorithms)."""
    out: list[Scenario] = []
    for name in names:
        matched = [s for s in SCENARIOS.values() if s.name == name or s.name.startswith(name + "-")]
        if not matched:
            raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        out += [s for s in matched if s not in out]
    return out
