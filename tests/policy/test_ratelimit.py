"""Per-identity rate limits: one bucket per identity, whatever limit class applies (issue #26 G14)."""

from __future__ import annotations

import re

import pytest
from support import FrozenClock

from verifier.errors import RateLimited
from verifier.policy.ratelimit import RateLimiter
from verifier.principal import Principal
from verifier.settings import RateLimit, RateLimitSettings
from verifier.state.base import Limits
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
    return RateLimiter(settings, MemoryState(clock), clock, configured=str)


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


class _Shares:
    """A state that records the share each take names, and serves it from a real memory store."""

    def __init__(self, clock: FrozenClock) -> None:
        self.memory = MemoryState(clock, max_entries=3)
        self.shares: list[str] = []

    async def take(
        self, key: str, *, rate_per_second: float, burst: int, now: float, share: str = "", hold: Limits = ()
    ) -> object:
        self.shares.append(share)
        return await self.memory.take(
            key, rate_per_second=rate_per_second, burst=burst, now=now, share=share, hold=hold
        )


async def test_a_bucket_is_counted_in_its_issuer_entry_s_share_a_tenant_in_its_template_s() -> None:
    """The share a take names is the `issuers[]` entry covering the principal's issuer (`KeyStore.configured`):
    a template's tenants all name the template, never their own issuer (which anyone could mint)."""
    clock = FrozenClock()
    template = "https://login.example.test/{tenant}"

    def configured(issuer: str) -> str:
        return template if issuer.startswith("https://login.example.test/") else issuer

    state = _Shares(clock)
    limiter = RateLimiter(RateLimitSettings(default=RateLimit(per_second=1, burst=2)), state, clock,
                          configured=configured)  # fmt: skip
    for issuer in ("https://login.example.test/t1", "https://login.example.test/t2", "https://idp.example.test"):
        await limiter.check(alice(issuer=issuer))
    assert state.shares == [template, template, "https://idp.example.test"]


async def test_without_redis_a_flood_of_identities_at_one_issuer_refuses_no_identity_of_another() -> None:
    """The memory store's bound (`state.max_entries`, every issuer together) is never a refusal: past it the least
    recently used bucket is forgotten and starts full again. So a caller minting identities at one issuer gets
    another issuer's new and existing users no 503 and no 429, at most one more burst for them."""
    clock = FrozenClock()
    state = _Shares(clock)
    limiter = RateLimiter(RateLimitSettings(default=RateLimit(per_second=1, burst=2)), state, clock, configured=str)
    await limiter.check(alice())
    for i in range(50):
        minted = alice(issuer="https://login.example.test/open")._replace(subject=f"minted-{i}")
        await limiter.check(minted)
    await limiter.check(alice())  # forgotten under the flood: a full bucket again, never a refusal
    await limiter.check(alice()._replace(subject="bob"))
    assert state.memory.evictions == 50  # 48 by the flood, one each for alice and bob


# An RFC 8941 sf-string (printable ASCII, `"` and `\` escaped) and the draft's parameters after it.
_SF_POLICY = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*";q=\d+;w=\d+')
_SF_LEFT = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*";r=\d+;t=\d+')


async def test_ratelimit_headers_name_any_role_as_a_valid_structured_field_string() -> None:
    # The policy is named after the role that set the limit, a config key the IdP's role names dictate (Entra group
    # names, say): a quote, a backslash or a non-ASCII letter went into the header as it is, so a client's
    # structured-field parser refused the whole header (draft-ietf-httpapi-ratelimit-headers; RFC 8941 3.3.3).
    names = ('a"b', "x y\\z", "Prüfer", "50%", "Pr%C3%BCfer", "tab\there")
    clock = FrozenClock()
    settings = RateLimitSettings(roles=tuple((name, RateLimit(per_second=1, burst=5)) for name in names))
    limiter = RateLimiter(settings, MemoryState(clock), clock, configured=str)
    labels = []
    for name in names:
        headers = dict(await limiter.check(alice(name)._replace(subject=name)))
        assert _SF_POLICY.fullmatch(headers["ratelimit-policy"]), headers
        assert _SF_LEFT.fullmatch(headers["ratelimit"]), headers
        labels.append(headers["ratelimit-policy"].partition(";")[0])
    assert len(set(labels)) == len(names)  # no two roles read as one policy
    assert labels[:3] == ['"a\\"b"', '"x y\\\\z"', '"Pr%C3%BCfer"']
    plain = dict(await limiter.check(alice("reader")._replace(subject="r")))
    assert plain == {}  # no limit for this role and no default: no headers


def test_of_two_roles_as_fast_the_larger_burst_wins_whatever_the_order() -> None:
    """"The most generous role wins" compared the rate alone: of two roles with the same rate, the one a frozenset
    happened to list first won (its order follows the strings' hashes, another in each process), so a user holding
    both got the larger burst on one replica and the smaller on the next, under another policy name."""
    clock = FrozenClock(1_700_000_000.0)
    for i in range(16):  # with a hash-ordered pick, each pair fails half the time
        small, large = f"team-{i}", f"partner-{i}"
        settings = RateLimitSettings(
            roles=((small, RateLimit(per_second=10, burst=5)), (large, RateLimit(per_second=10, burst=100)))
        )
        limiter = RateLimiter(settings, MemoryState(clock), clock, configured=str)
        chosen = limiter.limit_for(alice(small, large))
        assert chosen is not None and chosen[1].burst == 100, (small, large)
