"""verifier.state: the memory and SQLite stores (replay keys, token buckets) on a frozen clock, and its settings."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import FrozenClock, file_modes, made_under_umask_022
from tokenkit import NOW

from verifier.app import shared_state
from verifier.errors import ReplayStoreFull, StateUnavailable
from verifier.observe.metrics import Metrics
from verifier.settings import ConfigError
from verifier.state import StateConfig, parse_state_config
from verifier.state.base import FULL_LOG_SECONDS, REPLAY_DIGEST_BYTES, TakeResult, replay_digest
from verifier.state.memory import SLICE_SECONDS, MemoryState
from verifier.state.sqlite import SQLITE_FILE, SqliteState

ReplayStore = MemoryState | SqliteState
Make = Callable[..., ReplayStore]


@pytest.fixture
def state(clock: FrozenClock) -> MemoryState:
    return MemoryState(clock)


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, clock: FrozenClock, tmp_path: Path) -> Iterator[Make]:
    """Builds replay stores of one kind (`max_replay_entries=` optional); the SQLite ones share `tmp_path`."""
    built: list[SqliteState] = []

    def build(max_replay_entries: int = 100_000) -> ReplayStore:
        if request.param == "memory":
            return MemoryState(clock, max_replay_entries=max_replay_entries)
        store = SqliteState(str(tmp_path), clock, max_replay_entries=max_replay_entries)
        built.append(store)
        return store

    yield build
    for store in built:
        store._db.close()


@pytest.fixture
def replay(make: Make) -> ReplayStore:
    return make()


# --- first_use ------------------------------------------------------------------------------------


async def test_first_use_is_true_once_then_false_until_the_ttl_passes(replay: ReplayStore, clock: FrozenClock) -> None:
    assert await replay.first_use("jti-1", 10) is True
    assert await replay.first_use("jti-1", 10) is False
    assert await replay.seen("jti-1") is True
    clock.advance(9.999)
    assert await replay.first_use("jti-1", 10) is False
    clock.advance(0.001)  # exactly ttl later the key has expired
    assert await replay.seen("jti-1") is False
    assert await replay.first_use("jti-1", 10) is True
    assert await replay.first_use("jti-1", 10) is False


async def test_first_use_keys_are_independent(replay: ReplayStore) -> None:
    assert await replay.first_use("a", 10) is True
    assert await replay.first_use("b", 10) is True
    assert await replay.first_use("a", 10) is False


async def test_first_use_drops_expired_keys_first_and_stays_bounded(make: Make, clock: FrozenClock) -> None:
    state = make(max_replay_entries=3)
    await state.first_use("short", 1)
    await state.first_use("long-1", 100)
    await state.first_use("long-2", 100)
    clock.advance(2)
    assert await state.first_use("new", 100) is True  # "short" expired: no live key evicted
    assert state.evictions == 0 and len(state) == 3
    assert await state.first_use("long-1", 100) is False


async def test_a_full_table_refuses_a_new_value_and_never_lets_a_remembered_one_pass(make: Make) -> None:
    """Full of live values, the store refuses the newcomer (fail closed) rather than forget a live one:
    evicting "soon" made its replay pass until its window closed."""
    state = make(max_replay_entries=2)
    assert await state.first_use("soon", 10) is True
    assert await state.first_use("later", 50) is True
    try:
        third: object = await state.first_use("third", 50)
    except StateUnavailable as exc:
        third = exc.code
    replays = [await state.first_use("soon", 10), await state.first_use("later", 50)]
    assert (third, replays) == ("replay_store_full", [False, False])
    assert await state.seen("third") is False  # refused: not remembered, so a retry may pass later
    assert len(state) == 2


async def test_a_full_table_accepts_again_once_its_values_expire(make: Make, clock: FrozenClock) -> None:
    """Expired values are still purged: a table that was full takes new values once they have expired."""
    state = make(max_replay_entries=2)
    await state.first_use("a", 10)
    await state.first_use("b", 20)
    with pytest.raises(ReplayStoreFull):
        await state.first_use("c", 10)
    clock.advance(10)  # "a" has expired, "b" has not
    assert await state.first_use("c", 10) is True
    with pytest.raises(ReplayStoreFull):
        await state.first_use("d", 10)
    assert await state.first_use("b", 20) is False
    clock.advance(10)
    assert [await state.first_use(k, 10) for k in ("b", "d")] == [True, True]
    assert state.refused_full == 2 and len(state) == 2


async def test_a_full_table_still_answers_a_replay_as_a_replay(make: Make) -> None:
    """Only a new value is refused as "full": a remembered one is still the client's replay (401, not 503)."""
    state = make(max_replay_entries=1)
    await state.first_use("a", 10)
    assert await state.first_use("a", 10) is False
    assert await state.seen("a") is True and state.refused_full == 0


async def test_refusals_of_a_full_table_are_counted_and_logged_at_most_every_few_seconds(
    make: Make, clock: FrozenClock, caplog: pytest.LogCaptureFixture
) -> None:
    state = make(max_replay_entries=1)
    await state.first_use("dpop:jti:REMEMBERED-VALUE", 100)
    for _ in range(3):
        with pytest.raises(ReplayStoreFull):
            await state.first_use("dpop:jti:SECRET-VALUE", 100)
    clock.advance(FULL_LOG_SECONDS)
    with pytest.raises(ReplayStoreFull):
        await state.first_use("dpop:jti:SECRET-VALUE", 100)
    lines = [r for r in caplog.records if getattr(r, "event", "") == "replay_store_full"]
    assert [(r.refused, r.held, r.max_replay_entries) for r in lines] == [(1, 1, 1), (3, 1, 1)]  # type: ignore[attr-defined]
    assert state.refused_full == 4
    said = caplog.text + " ".join(str(vars(r)) for r in caplog.records)
    assert "SECRET" not in said and "REMEMBERED" not in said


async def test_the_metric_counts_the_refusals_of_a_full_table(make: Make) -> None:
    state = make(max_replay_entries=1)
    metrics = Metrics()
    metrics.replay_store(lambda: state.refused_full)
    assert b"verifier_replay_store_full_total 0.0" in metrics.render()
    await state.first_use("a", 10)
    with pytest.raises(ReplayStoreFull):
        await state.first_use("b", 10)
    assert b"verifier_replay_store_full_total 1.0" in metrics.render()


async def test_memory_remembers_a_value_for_its_ttl_and_at_most_a_slice_more(clock: FrozenClock) -> None:
    """Expiries are rounded up to a one-second slice: never forgotten early, dropped within a slice after."""
    state = MemoryState(clock)
    clock.advance(0.3)
    assert await state.first_use("k", 10) is True
    clock.advance(9.999)
    assert await state.first_use("k", 10) is False
    clock.advance(0.001 + SLICE_SECONDS)
    assert await state.first_use("k", 10) is True


async def test_memory_holds_a_digest_not_the_value(clock: FrozenClock) -> None:
    state = MemoryState(clock)
    await state.first_use("dpop:jti:" + "x" * 500, 10)
    assert state._live == {replay_digest("dpop:jti:" + "x" * 500)}
    assert all(len(d) == REPLAY_DIGEST_BYTES == 16 for d in state._live)


async def test_sqlite_processes_sharing_a_full_file_refuse_and_never_delete_each_others_live_keys(
    tmp_path: Path, clock: FrozenClock
) -> None:
    one = SqliteState(str(tmp_path), clock, max_replay_entries=2)
    two = SqliteState(str(tmp_path), clock, max_replay_entries=2)
    try:
        assert await one.first_use("a", 10) is True
        assert await two.first_use("b", 10) is True
        for store in (one, two):
            with pytest.raises(ReplayStoreFull):
                await store.first_use("c", 10)
        assert [await s.first_use(k, 10) for s in (one, two) for k in ("a", "b")] == [False] * 4
        assert len(one) == 2
    finally:
        one._db.close()
        two._db.close()


async def test_a_sqlite_file_from_before_the_bound_is_counted_when_opened(tmp_path: Path, clock: FrozenClock) -> None:
    """A file written by an older verifier has no key count: it is counted at open, so its keys count."""
    db = sqlite3.connect(tmp_path / SQLITE_FILE)
    db.execute("CREATE TABLE seen (key BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID")
    db.execute("INSERT INTO seen VALUES (?, ?)", (replay_digest("old"), NOW + 100))
    db.commit()
    db.close()
    stores = [SqliteState(str(tmp_path), clock, max_replay_entries=1) for _ in range(3)]  # every open counts once
    try:
        assert stores[0]._db.execute("SELECT n FROM seen_count").fetchall() == [(1,)]
        assert await stores[1].first_use("old", 10) is False
        with pytest.raises(ReplayStoreFull):
            await stores[2].first_use("new", 10)
        assert stores[0]._db.execute("SELECT n FROM seen_count").fetchall() == [(1,)]
    finally:
        for store in stores:
            store._db.close()


async def test_first_use_refuses_a_non_positive_ttl(replay: ReplayStore) -> None:
    with pytest.raises(ValueError):
        await replay.first_use("k", 0)


async def test_sqlite_replay_keys_outlive_the_process_that_wrote_them(make: Make, clock: FrozenClock) -> None:
    """A worker restarted after a crash, or its successor on SIGHUP, opens the same file: what the old one
    saw stays seen (in memory it was forgotten, and a captured DPoP proof passed again)."""
    old, new = make(), make()
    assert await old.first_use("dpop:jti:1", 60) is True
    if isinstance(old, MemoryState):
        assert await new.first_use("dpop:jti:1", 60) is True  # what the SQLite store is for
        return
    assert await new.first_use("dpop:jti:1", 60) is False and await new.seen("dpop:jti:1")
    await old.close()
    assert await make().first_use("dpop:jti:1", 60) is False  # a full restart, with state.path
    clock.advance(60)
    assert await new.first_use("dpop:jti:1", 60) is True


async def test_sqlite_replay_store_fails_closed(tmp_path: Path, clock: FrozenClock) -> None:
    """A file that cannot be written is 503 (StateUnavailable), never a first use."""
    store = SqliteState(str(tmp_path), clock)
    other = SqliteState(str(tmp_path), clock)
    other._db.execute("BEGIN EXCLUSIVE")  # another process holds the write lock past the busy timeout
    try:
        with pytest.raises(StateUnavailable):
            await store.first_use("k", 10)
    finally:
        other._db.execute("ROLLBACK")
    assert await store.first_use("k", 10) is True
    (tmp_path / "nowhere").write_text("a file, not a directory")
    with pytest.raises(StateUnavailable):
        SqliteState(str(tmp_path / "nowhere"), clock)
    store._db.close()
    other._db.close()


async def test_a_damaged_replay_file_is_moved_aside_and_a_new_one_started(
    tmp_path: Path, clock: FrozenClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes are not fsync'd, so a crash of the host can leave the file damaged: the verifier must come
    back (an empty replay memory after a host went down), not refuse every DPoP request until an operator
    steps in."""
    (tmp_path / "replay.sqlite3").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4080)
    with caplog.at_level("ERROR", logger="verifier.state"):
        store = SqliteState(str(tmp_path), clock)
    assert [r.getMessage() for r in caplog.records] == ["replay store damaged; moved aside, starting empty"]
    assert len(list(tmp_path.glob("replay.sqlite3.damaged-*"))) == 1
    assert await store.first_use("k", 10) is True and await store.first_use("k", 10) is False
    await store.close()


async def test_the_replay_files_wal_stays_small_under_a_stream_of_writes(tmp_path: Path, clock: FrozenClock) -> None:
    """Each write checkpoints the WAL once it holds 100 pages: it never grows with the traffic."""
    store = SqliteState(str(tmp_path), clock)
    for i in range(5_000):
        assert await store.first_use(f"dpop:jti:{i:040d}", 100)
    assert (tmp_path / "replay.sqlite3-wal").stat().st_size < 300_000  # ~15 MB without the checkpoints
    assert len(store) == 5_000
    await store.close()


def _race(directory: str, rounds: list[list[str]], start: Any, results: Any) -> None:
    """One process's half of the race below: first_use on every key of each round (both processes start each
    round together), the wins reported back."""
    import asyncio

    from verifier.clock import SystemClock

    async def run() -> list[str]:
        store = SqliteState(directory, SystemClock())
        won = []
        for keys in rounds:
            start.wait(60)  # both ready for this round: go
            won += [key for key in keys if await store.first_use(key, 60)]
        await store.close()
        return won

    results.put(asyncio.run(run()))


def test_two_processes_racing_on_the_same_keys_each_key_is_first_used_once(tmp_path: Path) -> None:
    """The SIGHUP overlap: the old and the new worker write the same file at once. Every key is a first use
    for exactly one of them, and neither is refused for the other's lock. Twenty rounds, each started by both
    at once (one process going up the round's keys, the other down), so a process descheduled for a while on a
    loaded machine still races in the other rounds."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rounds = [[f"dpop:jti:{r}:{i}" for i in range(500)] for r in range(20)]
    start, results = context.Barrier(2), context.Queue()
    racers = [
        context.Process(target=_race, args=(str(tmp_path), [keys[::step] for keys in rounds], start, results))
        for step in (1, -1)
    ]
    for racer in racers:
        racer.start()
    wins = [results.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join(timeout=30)
        assert racer.exitcode == 0
    assert sorted(wins[0] + wins[1]) == sorted(key for keys in rounds for key in keys)  # each won once, by one
    assert wins[0] and wins[1], [len(w) for w in wins]  # and they did race


# --- take (token bucket) --------------------------------------------------------------------------


async def test_bucket_allows_exactly_burst_then_refuses(state: MemoryState) -> None:
    results = [await state.take("user", rate_per_second=1, burst=3, now=NOW) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert [r.remaining for r in results] == [2, 1, 0, 0]
    assert results[0] == TakeResult(allowed=True, remaining=2, retry_after_seconds=0.0, limit=3, reset_seconds=1.0)
    assert results[3] == TakeResult(allowed=False, remaining=0, retry_after_seconds=1.0, limit=3, reset_seconds=3.0)


async def test_bucket_refills_one_token_exactly_at_the_boundary(state: MemoryState) -> None:
    for _ in range(2):
        await state.take("k", rate_per_second=0.5, burst=2, now=NOW)
    refused = await state.take("k", rate_per_second=0.5, burst=2, now=NOW + 1.999)
    assert not refused.allowed
    assert refused.retry_after_seconds == pytest.approx(0.001, abs=1e-6)  # wall seconds near 1.7e9
    allowed = await state.take("k", rate_per_second=0.5, burst=2, now=NOW + 2.0)  # one token, exactly
    assert allowed.allowed and allowed.remaining == 0
    assert not (await state.take("k", rate_per_second=0.5, burst=2, now=NOW + 2.0)).allowed


@pytest.mark.parametrize("rate", [0.1, 1 / 3, 7.0, 1000.0])
async def test_bucket_boundary_survives_float_rounding(state: MemoryState, rate: float) -> None:
    await state.take("k", rate_per_second=rate, burst=1, now=NOW)
    assert (await state.take("k", rate_per_second=rate, burst=1, now=NOW + 1 / rate)).allowed


async def test_bucket_never_holds_more_than_burst(state: MemoryState) -> None:
    await state.take("k", rate_per_second=10, burst=2, now=NOW)
    later = await state.take("k", rate_per_second=10, burst=2, now=NOW + 3600)
    assert later.allowed and later.remaining == 1


async def test_bucket_refused_takes_do_not_drain_it_further(state: MemoryState) -> None:
    await state.take("k", rate_per_second=1, burst=1, now=NOW)
    for _ in range(5):
        assert not (await state.take("k", rate_per_second=1, burst=1, now=NOW + 0.5)).allowed
    assert (await state.take("k", rate_per_second=1, burst=1, now=NOW + 1)).allowed


async def test_bucket_ignores_a_clock_going_back(state: MemoryState) -> None:
    await state.take("k", rate_per_second=1, burst=1, now=NOW)
    assert not (await state.take("k", rate_per_second=1, burst=1, now=NOW - 100)).allowed
    assert not (await state.take("k", rate_per_second=1, burst=1, now=NOW + 0.5)).allowed
    assert (await state.take("k", rate_per_second=1, burst=1, now=NOW + 1)).allowed


async def test_buckets_are_bounded_and_evict_the_least_recently_used(clock: FrozenClock) -> None:
    state = MemoryState(clock, max_entries=2)
    await state.take("a", rate_per_second=1, burst=1, now=NOW)
    await state.take("b", rate_per_second=1, burst=1, now=NOW)
    await state.take("a", rate_per_second=1, burst=1, now=NOW)  # "a" is now the most recent
    await state.take("c", rate_per_second=1, burst=1, now=NOW)
    assert state.evictions == 1 and len(state) == 2
    assert not (await state.take("a", rate_per_second=1, burst=1, now=NOW)).allowed
    assert (await state.take("b", rate_per_second=1, burst=1, now=NOW)).allowed  # evicted, so full


async def test_full_buckets_are_dropped_without_counting_an_eviction(clock: FrozenClock) -> None:
    state = MemoryState(clock, max_entries=2)
    await state.take("a", rate_per_second=1, burst=1, now=NOW)
    await state.take("b", rate_per_second=1, burst=1, now=NOW)
    await state.take("c", rate_per_second=1, burst=1, now=NOW + 5)
    assert state.evictions == 0 and len(state) == 1


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (float("inf"), 1), (1, 0)])
async def test_bucket_refuses_a_meaningless_shape(state: MemoryState, rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        await state.take("k", rate_per_second=rate, burst=burst, now=NOW)


async def test_close_forgets_everything(state: MemoryState) -> None:
    await state.first_use("k", 10)
    await state.take("k", rate_per_second=1, burst=1, now=NOW)
    await state.close()
    assert len(state) == 0


# --- settings and the builder ---------------------------------------------------------------------


def test_without_settings_state_lives_in_memory(clock: FrozenClock) -> None:
    assert parse_state_config(None) == StateConfig()
    assert isinstance(shared_state(None, clock), MemoryState)
    assert isinstance(shared_state(parse_state_config({"max_entries": 10}), clock), MemoryState)


async def test_a_path_builds_a_state_on_a_file_in_it(clock: FrozenClock, tmp_path: Path) -> None:
    state = shared_state(parse_state_config({"path": str(tmp_path)}), clock)
    assert isinstance(state, SqliteState) and Path(state.path).parent == tmp_path
    await state.close()


async def test_a_redis_url_builds_a_redis_state(clock: FrozenClock, monkeypatch: pytest.MonkeyPatch) -> None:
    from verifier.state.redis import RedisState

    monkeypatch.setenv("REDIS_PW", "pw")
    config = parse_state_config(
        {"redis_url": "redis://127.0.0.1:1/0", "key_prefix": "v1:", "timeout_seconds": 0.1, "password_env": "REDIS_PW"}
    )
    assert config.redis_url == "redis://127.0.0.1:1/0" and config.key_prefix == "v1:" and config.password == "pw"
    assert "pw" not in repr(config).replace("password_env", "")
    state = shared_state(config, clock)
    assert isinstance(state, RedisState)
    await state.close()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"redis_url": "http://x"}, "state.redis_url"),
        ({"redis_url": "redis://:secret@x:6379"}, "state.redis_url"),
        ({"redis_url": ""}, "state.redis_url"),
        ({"redis_url": "redis://x", "password_env": "STATE_UNSET_VARIABLE"}, "state.password_env"),
        ({"redis_url": "redis://x"}, "state.key_prefix"),  # #26 G6: two deployments would share everything
        ({"redis_url": "redis://x", "key_prefix": ""}, "state.key_prefix"),
        ({"redis_url": "redis://x", "key_prefix": "a:", "path": "/tmp"}, "state.path"),
        ({"path": "/nonexistent/verifier-state"}, "state.path"),
        ({"password_env": "HOME"}, "state.password_env"),
        ({"key_prefix": 3}, "state.key_prefix"),
        ({"timeout_seconds": 0}, "state.timeout_seconds"),
        ({"timeout_seconds": 60}, "state.timeout_seconds"),
        ({"max_entries": 0}, "state.max_entries"),
        ({"max_entries": True}, "state.max_entries"),
        ({"redis": "redis://x"}, "state.redis"),
        ("redis://x", "state"),
    ],
)
def test_settings_errors_name_the_key(data: Any, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_state_config(data)
    assert str(refused.value).startswith(key + ": ")


def test_sqlite_replay_file_is_private_to_the_verifier_user(tmp_path: Path, clock: FrozenClock) -> None:
    """Replay keys, WAL and shared memory are 0600 whatever the umask: another local user reads nothing."""
    store = made_under_umask_022(lambda: SqliteState(str(tmp_path), clock))
    try:
        modes = file_modes(tmp_path)
        assert "replay.sqlite3" in modes and modes == dict.fromkeys(modes, 0o600)
    finally:
        store._db.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis://x:6379/0?password=hunter2",
        "rediss://x:6379/0?socket_timeout=1&PASSWORD=hunter2",
        "unix:///run/redis.sock?db=0&password=hunter2",
        "redis://x:6379/0?password",
        "redis://x:6379/0?pass%77ord=hunter2",
    ],
)
def test_a_password_in_the_redis_urls_query_is_refused_as_in_its_user_part(url: str) -> None:
    """redis-py takes `?password=` from the URL's query as it takes `user:password@`: the rule that keeps the
    password out of the config file (a ConfigMap, `explain` notes, error text) is `state.password_env`, and
    the query went round it."""
    with pytest.raises(ConfigError) as refused:
        parse_state_config({"redis_url": url, "key_prefix": "a:"})
    assert str(refused.value).startswith("state.redis_url: ") and "password_env" in str(refused.value)
    assert "hunter2" not in str(refused.value)
