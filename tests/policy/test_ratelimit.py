"""Per-identity rate limits: one bucket per identity, whatever limit class applies (issue #26 G14)."""

from __future__ import annotations

import pytest
from support import FrozenClock

from verifier.errors import RateLimited
from verifier.policy.ratelimit import RateLimiter
from verifier.principal import Principal
from verifier.settings import RateLimit, RateLimitSettings
from verifier.state.memory import MemoryState


def alice(*roles: str, issuer: str = "https://idp.example.test") -> Principal:
    return Principal(issuer=issuer, subject="alice", client_id=None, scopes=(), roles=frozenset(roles),
                     expires_at=2e9, claims={})


@pytest.fixture
def limiter() -> RateLimiter:
    clock = FrozenClock()
    settings = RateLimitSettings(
        default=RateLimit(per_second=1, burst=2),
        roles=(("reader", RateLimit(per_second=2, burst=2)), ("writer", RateLimit(per_second=3, burst=2))),
    )
    return RateLimiter(settings, MemoryState(clock), clock)


async def test_changing_limit_class_does_not_give_a_fresh_bucket(limiter: RateLimiter) -> None:
    # tokens of one user with different roles (one per scope set, say) used to get one bucket each
    await limiter.check(alice())
    await limiter.check(alice())
    for roles in (("reader",), ("writer",), ("reader", "writer")):
        with pytest.raises(RateLimited):
            await limiter.check(alice(*roles))


async def test_other_identities_have_their_own_buckets(limiter: RateLimiter) -> None:
    for _ in range(2):
        await limiter.check(alice())
    await limiter.check(alice(issuer="https://other.example.test"))
    await limiter.check(Principal(issuer="https://idp.example.test", subject="bob", client_id=None, scopes=(),
                                  roles=frozenset(), expires_at=2e9, claims={}))
