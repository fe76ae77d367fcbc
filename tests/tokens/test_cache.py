"""verifier.tokens.cache: a bounded map whose entries never outlive their own expiry."""

from __future__ import annotations

import pytest
from support import FrozenClock
from tokenkit import NOW

from verifier.tokens import cache as cache_module
from verifier.tokens.cache import ExpiringCache


@pytest.fixture
def cache(clock: FrozenClock) -> ExpiringCache[str]:
    return ExpiringCache(3, clock)


def test_returns_a_stored_value_until_its_expiry(cache: ExpiringCache[str], clock: FrozenClock) -> None:
    cache.put(b"k", "v", NOW + 10)
    assert cache.get(b"k") == "v"
    clock.advance(9.999)
    assert cache.get(b"k") == "v"


def test_an_entry_is_gone_at_its_expiry_and_is_evicted(cache: ExpiringCache[str], clock: FrozenClock) -> None:
    cache.put(b"k", "v", NOW + 10)
    clock.advance(10)
    assert cache.get(b"k") is None
    assert len(cache) == 0


def test_a_missing_key_is_none(cache: ExpiringCache[str]) -> None:
    assert cache.get(b"nope") is None


@pytest.mark.parametrize("expires_at", [NOW, NOW - 1, 0.0])
def test_an_already_expired_value_is_not_stored(cache: ExpiringCache[str], expires_at: float) -> None:
    cache.put(b"k", "v", expires_at)
    assert len(cache) == 0
    assert cache.get(b"k") is None


def test_the_oldest_entry_is_evicted_when_full(cache: ExpiringCache[str]) -> None:
    for i in range(4):
        cache.put(bytes([i]), str(i), NOW + 60)
    assert len(cache) == 3
    assert cache.get(b"\x00") is None
    assert [cache.get(bytes([i])) for i in (1, 2, 3)] == ["1", "2", "3"]


def test_a_flood_of_distinct_keys_never_grows_past_the_bound(clock: FrozenClock) -> None:
    cache: ExpiringCache[int] = ExpiringCache(100, clock)
    for i in range(10_000):
        cache.put(i.to_bytes(4, "big"), i, NOW + 60)
    assert len(cache) == 100
    assert cache.get((9_999).to_bytes(4, "big")) == 9_999


def test_replacing_a_key_when_full_evicts_nothing(cache: ExpiringCache[str]) -> None:
    for key in (b"a", b"b", b"c"):
        cache.put(key, key.decode(), NOW + 60)
    cache.put(b"a", "A", NOW + 120)
    assert len(cache) == 3
    assert (cache.get(b"a"), cache.get(b"b"), cache.get(b"c")) == ("A", "b", "c")


def test_replacing_a_key_takes_the_new_expiry(cache: ExpiringCache[str], clock: FrozenClock) -> None:
    cache.put(b"a", "old", NOW + 100)
    cache.put(b"a", "new", NOW + 5)
    clock.advance(6)
    assert cache.get(b"a") is None


@pytest.mark.parametrize("bound", [0, -1])
def test_a_cache_with_no_room_stores_nothing(clock: FrozenClock, bound: int) -> None:
    cache: ExpiringCache[str] = ExpiringCache(bound, clock)
    cache.put(b"k", "v", NOW + 60)
    assert len(cache) == 0 and cache.get(b"k") is None


def test_discard_and_clear(cache: ExpiringCache[str]) -> None:
    cache.put(b"a", "a", NOW + 60)
    cache.put(b"b", "b", NOW + 60)
    cache.discard(b"a")
    cache.discard(b"missing")
    assert (cache.get(b"a"), cache.get(b"b")) == (None, "b")
    cache.clear()
    assert len(cache) == 0


def test_expiry_follows_wall_time_not_monotonic_time(cache: ExpiringCache[str]) -> None:
    class WallJumps(FrozenClock):
        def now(self) -> float:
            return NOW + 3600

    jumping: ExpiringCache[str] = ExpiringCache(3, WallJumps(NOW))
    jumping.put(b"k", "v", NOW + 60)  # already expired by the wall clock
    assert jumping.get(b"k") is None


def test_stores_drop_expired_entries_so_a_refused_token_cache_holds_only_live_ones(clock: FrozenClock) -> None:
    """Issue #24 (soak): expired entries went only when looked up or pushed out by a full cache."""
    cache: ExpiringCache[str] = ExpiringCache(1000, clock)
    for i in range(100):
        cache.put(b"old%d" % i, "refused", clock.now() + 30)  # one lifetime, as the refused-token cache
    clock.advance(30)
    for i in range(50):
        cache.put(b"new%d" % i, "refused", clock.now() + 30)
    assert len(cache) == 50
    assert all(cache.get(b"new%d" % i) == "refused" for i in range(50))


def test_expired_entries_behind_a_long_lived_one_are_dropped(clock: FrozenClock) -> None:
    """Issue #24 (soak): the sweep stopped at the first live entry, so in the verified-token cache, whose
    entries live as long as their tokens, a long-lived token stored first kept every expired token stored
    after it until the bound pushed them out (the 5-minute soak grew +9 MiB/min)."""
    cache: ExpiringCache[str] = ExpiringCache(100_000, clock)
    for i in range(50):
        cache.put(b"cached%d" % i, "v", clock.now() + 3600)  # a gateway's regular tokens
    for i in range(500):
        cache.put(b"first-seen%d" % i, "v", clock.now() + 120)
    clock.advance(121)
    for i in range(500):
        cache.put(b"later%d" % i, "v", clock.now() + 120)
    assert len(cache) == 50 + 500
    assert all(cache.get(b"cached%d" % i) == "v" for i in range(50))


def test_the_expiry_bookkeeping_stays_bounded(clock: FrozenClock) -> None:
    """Keys replaced, discarded or pushed out leave nothing behind for long."""
    cache: ExpiringCache[int] = ExpiringCache(100, clock)
    for i in range(20_000):
        cache.put(b"same", i, clock.now() + 3600 + i)  # stored again, with a later expiry each time
        cache.put(i.to_bytes(4, "big"), i, clock.now() + 3600)  # a flood past the bound
        cache.discard(b"gone")
        cache.put(b"gone", i, clock.now() + 3600)
    assert len(cache) == 100
    assert len(cache._due) <= 2 * max(len(cache), cache_module.MIN_REBUILD)
    assert cache.get(b"same") == 19_999 and cache.get((19_999).to_bytes(4, "big")) == 19_999


def test_a_full_cache_pushes_out_the_entry_due_soonest(clock: FrozenClock) -> None:
    cache: ExpiringCache[str] = ExpiringCache(3, clock)
    cache.put(b"long", "v", NOW + 3600)
    cache.put(b"short", "v", NOW + 60)
    cache.put(b"mid", "v", NOW + 600)
    cache.put(b"new", "v", NOW + 600)
    assert (cache.get(b"long"), cache.get(b"short"), cache.get(b"mid"), cache.get(b"new")) == ("v", None, "v", "v")


def test_a_live_entry_pushed_out_or_replaced_bumps_the_generation_an_expired_one_does_not(
    clock: FrozenClock,
) -> None:
    from verifier.generation import Generation

    generation = Generation()
    cache: ExpiringCache[str] = ExpiringCache(2, clock, generation)
    cache.put(b"a", "v", NOW + 10)
    cache.put(b"b", "v", NOW + 600)
    assert generation.value == 0
    clock.advance(11)
    cache.put(b"c", "v", NOW + 600)  # "a" expired: swept, no bump
    assert generation.value == 0 and len(cache) == 2
    cache.put(b"d", "v", NOW + 700)  # full: "b" (due soonest, live) pushed out
    assert generation.value == 1 and cache.get(b"b") is None
    cache.put(b"d", "w", NOW + 700)  # replaced
    assert generation.value == 2
