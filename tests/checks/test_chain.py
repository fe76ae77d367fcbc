"""The pipeline as a declared chain, built from fakes: no App, no keys, no servers.

What the chain promises (issue #19 part 1): a check in the list is applied by every entry point
(`decide_cached`, `decide_after_miss`, `authenticate`) and cannot be skipped by a cache hit; its
declarations decide the fast path and the reuse lifetime; an authenticator that is not responsible
lets the token fall through to the next, and a token nobody takes is refused 401 invalid_token.
"""

from __future__ import annotations

import asyncio
import gc
import types
from typing import ClassVar

import pytest
from support import FrozenClock

from verifier import pipeline as pipeline_module
from verifier.authenticators import JwtAuthenticator, NotResponsible, OpaqueIntrospection, Seen
from verifier.checks.base import Check, Route
from verifier.credentials import Credential
from verifier.decision import Decision
from verifier.errors import BadSignature, ClaimInvalid, Forbidden, InvalidToken, VerifierError
from verifier.observe.metrics import Metrics
from verifier.pipeline import Admitted, Pipeline
from verifier.principal import NO_ROLES, Principal
from verifier.request import RequestAttributes
from verifier.tokens.cache import ExpiringCache
from verifier.tokens.jwks import KeyStore
from verifier.tokens.jwt import JwtVerifier

NOW = 1_700_000_000.0
EDGE_MAX_AGE = 60


def _principal(token: str, **claims: object) -> Principal:
    return Principal(
        issuer="https://idp.test",
        subject=token,
        client_id=None,
        scopes=(),
        roles=NO_ROLES,  # as the authenticators' `roles_of` gives a token without roles
        expires_at=NOW + 3600,
        claims={"sub": token, **claims},
    )


class FakeAuthenticator:
    """Takes tokens starting with `prefix`; `slow-` tokens need I/O (verify_now says None)."""

    sends_to = None  # takes tokens that name their issuer

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.asked: list[str] = []
        self.verified: list[str] = []

    def _take(self, token: str, seen: Seen) -> None:
        self.asked.append(token)
        if not token.startswith(self.prefix):
            raise NotResponsible
        seen.issuer, seen.alg = "https://idp.test", "fake"

    def verify_now(self, token: str, seen: Seen) -> Principal | None:
        self._take(token, seen)
        if "slow" in token:
            return None
        self.verified.append(token)
        return _principal(token, tenant=token.rsplit("-", 1)[-1])

    async def verify(self, token: str, token_hash: bytes, seen: Seen) -> Principal:
        self._take(token, seen)
        await asyncio.sleep(0)
        self.verified.append(token)
        return _principal(token, tenant=token.rsplit("-", 1)[-1])


class CountedCheck(Check):
    """A check answered from memory that counts its runs; `refusal` says why it refuses, or None."""

    from_memory = True

    def __init__(self) -> None:
        self.runs = 0

    def refusal(self, principal: Principal, attrs: RequestAttributes) -> Forbidden | None:
        raise NotImplementedError

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        self.runs += 1
        refused = self.refusal(principal, attrs)
        if refused is not None:
            raise refused
        return principal


class TenantCheck(CountedCheck):
    """A new check as a deployment would add one: the token's tenant must be `acme`."""

    per_request = False

    def refusal(self, principal: Principal, attrs: RequestAttributes) -> Forbidden | None:
        if principal.claims.get("tenant") != "acme":
            return Forbidden("wrong tenant", code="forbidden")  # a catalogued code
        return None


class AsyncTenantCheck(TenantCheck):
    """The same rule asked of a remote service: not answered from memory."""

    from_memory = False

    async def check(
        self, principal: Principal, credential: Credential, attrs: RequestAttributes, route: Route
    ) -> Principal:
        await asyncio.sleep(0)
        return self.check_now(principal, attrs, route)


class PerRequestCheck(CountedCheck):
    """Depends on the request itself (as a certificate or a counter does), answered from memory."""

    per_request = True

    def refusal(self, principal: Principal, attrs: RequestAttributes) -> Forbidden | None:
        if attrs.headers.get("x-ok") != "1":
            return Forbidden("request refused", code="role_missing")  # a catalogued code
        return None


class ReuseCap(Check):
    """Allows everything, but lets a gateway reuse the answer for 7 seconds at most."""

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        return principal

    def reuse_left(self, principal: Principal, route: Route, now: float) -> float | None:
        return 7.0


def _pipeline(checks: list[Check], authenticators: list[FakeAuthenticator] | None = None) -> Pipeline:
    clock = FrozenClock(NOW)
    return Pipeline(
        authenticators=authenticators if authenticators is not None else [FakeAuthenticator("tok-")],
        checks=checks,
        positive=ExpiringCache(100, clock),
        negative=ExpiringCache(100, clock),
        clock=clock,
        metrics=Metrics(),
        realm="test",
        negative_ttl=30,
        audit_enabled=False,
        edge_max_age=EDGE_MAX_AGE,
    )


def _attrs(token: str, **headers: str) -> RequestAttributes:
    return RequestAttributes("GET", "https", "api.test", "/x", {"authorization": f"Bearer {token}", **headers})


def _hits(pipeline: Pipeline) -> int:
    return pipeline._metrics._hot.cache[("positive", "hit")]


def test_a_per_request_check_runs_on_every_cache_hit_and_forbids_reuse() -> None:
    check = PerRequestCheck()
    pipeline = _pipeline([check])
    first = pipeline.decide_cached(_attrs("tok-acme", **{"x-ok": "1"}))
    assert first is not None and first.allowed and first.cache_max_age == 0
    for _ in range(3):
        hit = pipeline.decide_cached(_attrs("tok-acme", **{"x-ok": "1"}))
        assert hit is not None and hit.allowed and hit.cache_max_age == 0
    assert check.runs == 4 and _hits(pipeline) == 3
    refused = pipeline.decide_cached(_attrs("tok-acme"))  # the same cached token, a request that fails
    assert refused is not None and not refused.allowed and refused.reason == "role_missing"
    assert check.runs == 5


@pytest.mark.parametrize("kind", [TenantCheck, AsyncTenantCheck], ids=["from-memory", "with-io"])
async def test_a_listed_check_is_applied_by_every_entry_point(kind: type[TenantCheck]) -> None:
    check = kind()
    pipeline = _pipeline([check])
    for token in ("tok-evil", "tok-slow-evil"):
        first = pipeline.decide_cached(_attrs(token))
        if first is None:  # the check (or the authenticator) needs I/O
            first = await pipeline.decide_after_miss(_attrs(token), "test")
        assert not first.allowed and first.reason == "forbidden"
        assert any(record.principal.subject == token for _, record, _ in pipeline._positive.entries())
        cached = pipeline.decide_cached(_attrs(token))  # a cache hit: the check still runs
        assert cached is None if not kind.from_memory else (cached is not None and cached.reason == "forbidden")
        slow = await pipeline.decide_after_miss(_attrs(token), "test")
        assert not slow.allowed and slow.reason == "forbidden"
        with pytest.raises(Forbidden):
            await pipeline.authenticate(_attrs(token))
    assert (await pipeline.decide(_attrs("tok-acme"), "test")).allowed
    assert (await pipeline.authenticate(_attrs("tok-acme"))).subject == "tok-acme"
    assert (await pipeline.decide(_attrs("tok-slow-acme"), "test")).allowed


async def test_a_check_needing_io_sends_a_cached_token_down_the_asynchronous_path() -> None:
    check = AsyncTenantCheck()
    pipeline = _pipeline([check])
    assert pipeline.decide_cached(_attrs("tok-acme")) is None  # admitted, then the check needs I/O
    assert pipeline.decide_cached(_attrs("tok-acme")) is None  # the hit does not skip it
    assert check.runs == 0
    assert (await pipeline.decide_after_miss(_attrs("tok-acme"), "test")).allowed
    assert check.runs == 1


def test_a_check_caps_how_long_a_gateway_may_reuse_the_answer() -> None:
    pipeline = _pipeline([ReuseCap()])
    for _ in range(2):
        decision = pipeline.decide_cached(_attrs("tok-acme"))
        assert decision is not None and decision.allowed and decision.cache_max_age == 7
    bare = _pipeline([]).decide_cached(_attrs("tok-acme"))
    assert bare is not None and bare.cache_max_age == EDGE_MAX_AGE


async def test_a_not_responsible_authenticator_falls_through_to_the_next() -> None:
    first, second = FakeAuthenticator("jwt-"), FakeAuthenticator("tok-")
    pipeline = _pipeline([], [first, second])
    assert (await pipeline.decide(_attrs("tok-acme"), "test")).allowed
    assert (await pipeline.decide(_attrs("tok-slow-acme"), "test")).allowed
    assert first.verified == [] and "tok-acme" in first.asked
    assert second.verified == ["tok-acme", "tok-slow-acme"]


@pytest.mark.parametrize("token", ["opaque-acme", "slow-opaque"])
async def test_a_token_no_authenticator_takes_is_refused_401_invalid_token(token: str) -> None:
    pipeline = _pipeline([], [FakeAuthenticator("jwt-"), FakeAuthenticator("tok-")])
    decision = await pipeline.decide(_attrs(token), "test")
    assert (decision.status, decision.reason) == (401, "token_malformed")
    assert 'error="invalid_token"' in dict(decision.response_headers)["www-authenticate"]
    with pytest.raises(VerifierError) as raised:
        await pipeline.authenticate(_attrs(token))
    assert raised.value.code == "token_malformed"


class _Introspector:
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def introspect(self, token: str, token_hash: bytes) -> Principal:
        self.tokens.append(token)
        return _principal("opaque")


async def test_the_real_authenticators_say_not_responsible_for_the_other_kind() -> None:
    provider = _Introspector()
    opaque = OpaqueIntrospection("https://idp.test", provider)
    # No issuer: never reached for an opaque token (a real verifier: the compiled build checks the type).
    jwt = JwtAuthenticator(JwtVerifier({}, KeyStore({}), FrozenClock(NOW), max_token_bytes=8192))
    with pytest.raises(NotResponsible):
        jwt.verify_now("an-opaque-token", Seen())
    with pytest.raises(NotResponsible):
        await jwt.verify("an-opaque-token", b"", Seen())
    a_jwt = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln"
    with pytest.raises(NotResponsible):
        opaque.verify_now(a_jwt, Seen())
    with pytest.raises(NotResponsible):
        await opaque.verify(a_jwt, b"", Seen())
    assert provider.tokens == []  # a JWT is never disclosed to the opaque-token provider
    seen = Seen()
    assert opaque.verify_now("an-opaque-token", seen) is None and seen.alg == "introspection"
    assert (await opaque.verify("an-opaque-token", b"", seen)).subject == "opaque"


def test_the_cache_holds_a_named_frozen_record() -> None:
    check = PerRequestCheck()
    pipeline = _pipeline([check, TenantCheck()])
    pipeline.decide_cached(_attrs("tok-acme", **{"x-ok": "1"}))
    ((_, record, _),) = pipeline._positive.entries()
    assert isinstance(record, Admitted) and isinstance(record.allowed, Decision)
    assert record.principal.subject == "tok-acme" and len(record.checks) == 2
    with pytest.raises(AttributeError):  # immutable (a NamedTuple; a frozen dataclass raises a subclass of it)
        record.checks = ()  # type: ignore[misc]


def _tracked_from(root: object) -> dict[int, object]:
    """The GC-tracked objects reachable from `root` (types and modules aside), by id."""
    found: dict[int, object] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in found or isinstance(node, type | types.ModuleType | types.FunctionType):
            continue
        if gc.is_tracked(node):
            found[id(node)] = node
        stack.extend(gc.get_referents(node))
    return found


def test_a_cached_token_is_three_objects_for_the_garbage_collector() -> None:
    """A verified token's cache record lives as long as the token (100,000 of them per worker by default), and
    the cyclic collector walks every tracked object in it each time it collects their generation: a full
    collection over a full cache paused a worker ~0.23 s with seven objects per token (docs/BENCHMARKS.md).
    The record, its principal and its answer; no entry tuple, credential tuple or `__dict__` beside them."""
    pipeline = _pipeline([])
    for token in ("tok-one", "tok-two"):
        assert pipeline.decide_cached(_attrs(token)) is not None
    gc.collect()
    gc.collect()  # a tuple of tuples (the headers) is untracked by the collection after its members'
    (_, one, _), (_, two, _) = pipeline._positive.entries()
    reached_one, reached_two = _tracked_from(one), _tracked_from(two)
    own = [type(o).__name__ for i, o in reached_one.items() if i not in reached_two]
    assert sorted(own) == ["Admitted", "Decision", "Principal"]
    held = [o for o in gc.get_referents(pipeline._positive._data) if gc.is_tracked(o)]
    assert sorted(map(id, held)) == sorted([id(one), id(two)])  # the cache holds the records themselves


def test_a_flood_of_refused_tokens_shares_its_refusals() -> None:
    """Each refused token is remembered (a replay costs one lookup), up to 100,000 per worker: sharing the refusal
    keeps each entry one object for the collector (the `Refused` record), not three."""
    pipeline = _pipeline([])
    for token in ("junk-1", "junk-2", "junk-3"):
        decision = pipeline.decide_cached(_attrs(token))
        assert decision is not None and decision.status == 401
    held = [refused for _, refused, _ in pipeline._negative.entries()]
    assert len(held) == 3 and held[0].error is held[1].error is held[2].error
    assert held[0].error.__traceback__ is None
    again = pipeline.decide_cached(_attrs("junk-1"))  # from the negative cache: the same answer
    assert again is not None and again == decision
    gc.collect()
    gc.collect()
    reached = [_tracked_from(refused) for refused in held]
    own = [type(o).__name__ for i, o in reached[0].items() if i not in reached[1]]
    assert own == ["Refused"]


def test_a_refusal_with_state_of_its_own_is_held_on_its_own_and_the_shared_ones_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert pipeline_module._held(InvalidToken("bad")) is pipeline_module._held(InvalidToken("bad"))
    assert pipeline_module._held(InvalidToken("bad")) is not pipeline_module._held(InvalidToken("worse"))
    assert pipeline_module._held(InvalidToken("bad")) is not pipeline_module._held(BadSignature("bad"))
    assert pipeline_module._held(InvalidToken("bad", code="claim_invalid")) is not pipeline_module._held(
        InvalidToken("bad")
    )
    first, second = ClaimInvalid("bad", claim="aud"), ClaimInvalid("bad", claim="iss")
    assert pipeline_module._held(first) is first and pipeline_module._held(second) is second
    monkeypatch.setattr(pipeline_module, "MAX_HELD_REFUSALS", 3)
    monkeypatch.setattr(pipeline_module, "_HELD_REFUSALS", {})
    for n in range(10):
        pipeline_module._held(InvalidToken(f"alg a{n} is not allowed"))
        assert len(pipeline_module._HELD_REFUSALS) <= 3


class OnlyBound(Check):
    """Applies to tokens carrying a `bound` claim only (as DPoP and mTLS do)."""

    per_request = True
    runs: ClassVar[int] = 0

    def for_token(self, principal: Principal, credential: Credential) -> bool:
        return "bound" in principal.claims

    def check_now(self, principal: Principal, attrs: RequestAttributes, route: Route) -> Principal:
        OnlyBound.runs += 1
        return principal


def test_a_check_that_does_not_apply_to_a_token_leaves_the_fast_answer_alone() -> None:
    pipeline = _pipeline([OnlyBound()])
    first = pipeline.decide_cached(_attrs("tok-acme"))
    second = pipeline.decide_cached(_attrs("tok-acme"))
    assert first is second and second is not None and second.cache_max_age == EDGE_MAX_AGE
    assert OnlyBound.runs == 0


class StepUpLike(PerRequestCheck):
    """A per-request check bound to some routes (as WebAuthn step-up is)."""

    def for_route(self, route: Route) -> bool:
        return route.step_up


def test_a_per_request_check_bound_to_a_route_makes_only_that_routes_answers_no_store() -> None:
    from verifier.policy.rules import PolicySet
    from verifier.settings import PolicySettings, Requirements, RouteMatch

    clock = FrozenClock(NOW)
    check = StepUpLike()
    pipeline = Pipeline(
        authenticators=[FakeAuthenticator("tok-")],
        checks=[check],
        positive=ExpiringCache(100, clock),
        negative=ExpiringCache(100, clock),
        clock=clock,
        metrics=Metrics(),
        realm="test",
        negative_ttl=30,
        audit_enabled=False,
        edge_max_age=EDGE_MAX_AGE,
        policies=PolicySet(
            (
                PolicySettings(name="s", match=RouteMatch(path_prefix="/s"), require=Requirements(step_up="webauthn")),
                PolicySettings(name="x", match=RouteMatch(path_prefix="/x"), require=Requirements()),
            )
        ),
    )
    for _ in range(2):
        plain = pipeline.decide_cached(_attrs("tok-acme"))
        assert plain is not None and plain.allowed and plain.cache_max_age == EDGE_MAX_AGE
        stepped = pipeline.decide_cached(_attrs("tok-acme", **{"x-ok": "1"})._replace(path="/s/1"))
        assert stepped is not None and stepped.allowed and stepped.cache_max_age == 0
    assert check.runs == 2


# -- a miss is worked out once (#24 goal 7) -------------------------------------------------------


async def test_a_first_seen_token_needing_io_is_extracted_and_tried_without_io_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`decide_cached` found the token needs I/O; its own `decide_after_miss` carries on from there: the
    credential is not extracted again, no authenticator is asked `verify_now` a second time, and one that said
    "not responsible" is not asked `verify` either."""
    from verifier import pipeline as pipeline_module

    extracted: list[RequestAttributes] = []
    extract = pipeline_module.credentials.extract

    def counted(attrs: RequestAttributes) -> Credential:
        extracted.append(attrs)
        return extract(attrs)

    monkeypatch.setattr(pipeline_module.credentials, "extract", counted)
    other, taker = FakeAuthenticator("jwt-"), FakeAuthenticator("tok-")
    pipeline = _pipeline([TenantCheck()], [other, taker])
    attrs = _attrs("tok-slow-acme")
    assert pipeline.decide_cached(attrs) is None
    decision = await pipeline.decide_after_miss(attrs, "test")
    assert decision.allowed
    assert len(extracted) == 1
    # Each asked once without I/O (`decide_cached`); only the one that needs I/O asked again, with it, and verified it.
    assert other.asked == ["tok-slow-acme"]
    assert taker.asked == ["tok-slow-acme"] * 2
    assert taker.verified == ["tok-slow-acme"]
    assert not pipeline._missed  # taken by the request it was for
    # Refusals too: the check still runs on the carried path.
    wrong = _attrs("tok-slow-evil")
    assert pipeline.decide_cached(wrong) is None
    refused = await pipeline.decide_after_miss(wrong, "test")
    assert not refused.allowed and refused.reason == "forbidden"


async def test_a_token_admitted_meanwhile_is_answered_from_the_cache_on_the_carried_path() -> None:
    """Two requests for one first-seen token both miss; the second to continue finds the first's admission
    and asks no authenticator again."""
    taker = FakeAuthenticator("tok-")
    pipeline = _pipeline([], [taker])
    first, second = _attrs("tok-slow-acme"), _attrs("tok-slow-acme")
    assert pipeline.decide_cached(first) is None and pipeline.decide_cached(second) is None
    assert (await pipeline.decide_after_miss(second, "test")).allowed
    assert (await pipeline.decide_after_miss(first, "test")).allowed
    assert taker.verified == ["tok-slow-acme"]


async def test_misses_whose_slow_path_never_comes_are_not_held_without_bound() -> None:
    """A request can miss and never continue (its connection closed first): what its miss worked out is
    dropped within a bound, and a request whose record was dropped is still decided, the whole way."""
    from verifier.pipeline import MISSED_HELD

    taker = FakeAuthenticator("tok-")
    pipeline = _pipeline([], [taker])
    requests = [_attrs(f"tok-slow-{i}") for i in range(MISSED_HELD + 10)]
    for attrs in requests:
        assert pipeline.decide_cached(attrs) is None
        assert len(pipeline._missed) <= MISSED_HELD
    dropped = requests[0]
    assert id(dropped) not in pipeline._missed
    assert (await pipeline.decide_after_miss(dropped, "test")).allowed
    # The whole way: `verify_now` asked again (twice without I/O, once with it).
    assert taker.asked.count("tok-slow-0") == 3
