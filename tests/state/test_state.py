"""verifier.state: the memory and SQLite stores (replay keys, token buckets) on a frozen clock, and its settings."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import FrozenClock, file_modes, made_under_umask_022, opened_together
from tokenkit import NOW

from verifier.app import shared_state
from verifier.config.state import ReplayBounds
from verifier.errors import ReplayStoreFull, StateUnavailable
from verifier.observe.metrics import Metrics
from verifier.settings import ConfigError
from verifier.state import StateConfig, parse_state_config
from verifier.state.base import FULL_LOG_SECONDS, REPLAY_DIGEST_BYTES, Purpose, TakeResult, replay_digest
from verifier.state.memory import SLICE_SECONDS, MemoryState
from verifier.state.sqlite import SQLITE_FILE, SqliteState

ReplayStore = MemoryState | SqliteState
DPOP, WEBAUTHN, REVOCATION = Purpose.DPOP, Purpose.WEBAUTHN, Purpose.REVOCATION
Make = Callable[..., ReplayStore]


@pytest.fixture
def state(clock: FrozenClock) -> MemoryState:
    return MemoryState(clock)


@pytest.fixture(params=["memory", "sqlite"])
def make(request: pytest.FixtureRequest, clock: FrozenClock, tmp_path: Path) -> Iterator[Make]:
    """Builds replay stores of one kind (`max_replay_entries=`: each purpose's bound, optional); the SQLite ones
    share `tmp_path`."""
    built: list[SqliteState] = []

    def build(max_replay_entries: int = 100_000) -> ReplayStore:
        bounds = ReplayBounds(dpop=max_replay_entries, webauthn=max_replay_entries, revocation=max_replay_entries)
        if request.param == "memory":
            return MemoryState(clock, replay=bounds)
        store = SqliteState(str(tmp_path), clock, replay=bounds)
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
    assert await replay.first_use("jti-1", 10, purpose=DPOP) is True
    assert await replay.first_use("jti-1", 10, purpose=DPOP) is False
    assert await replay.seen("jti-1", purpose=DPOP) is True
    clock.advance(9.999)
    assert await replay.first_use("jti-1", 10, purpose=DPOP) is False
    clock.advance(0.001)  # exactly ttl later the key has expired
    assert await replay.seen("jti-1", purpose=DPOP) is False
    assert await replay.first_use("jti-1", 10, purpose=DPOP) is True
    assert await replay.first_use("jti-1", 10, purpose=DPOP) is False


async def test_first_use_keys_are_independent(replay: ReplayStore) -> None:
    assert await replay.first_use("a", 10, purpose=DPOP) is True
    assert await replay.first_use("b", 10, purpose=DPOP) is True
    assert await replay.first_use("a", 10, purpose=DPOP) is False


async def test_first_use_drops_expired_keys_first_and_stays_bounded(make: Make, clock: FrozenClock) -> None:
    state = make(max_replay_entries=3)
    await state.first_use("short", 1, purpose=DPOP)
    await state.first_use("long-1", 100, purpose=DPOP)
    await state.first_use("long-2", 100, purpose=DPOP)
    clock.advance(2)
    assert await state.first_use("new", 100, purpose=DPOP) is True  # "short" expired: no live key evicted
    assert state.evictions == 0 and len(state) == 3
    assert await state.first_use("long-1", 100, purpose=DPOP) is False


async def test_a_full_table_refuses_a_new_value_and_never_lets_a_remembered_one_pass(make: Make) -> None:
    """Full of live values, the store refuses the newcomer (fail closed) rather than forget a live one:
    evicting "soon" made its replay pass until its window closed."""
    state = make(max_replay_entries=2)
    assert await state.first_use("soon", 10, purpose=DPOP) is True
    assert await state.first_use("later", 50, purpose=DPOP) is True
    try:
        third: object = await state.first_use("third", 50, purpose=DPOP)
    except StateUnavailable as exc:
        third = exc.code
    replays = [await state.first_use("soon", 10, purpose=DPOP), await state.first_use("later", 50, purpose=DPOP)]
    assert (third, replays) == ("replay_store_full", [False, False])
    assert await state.seen("third", purpose=DPOP) is False  # refused: not remembered, so a retry may pass later
    assert len(state) == 2


async def test_a_full_table_accepts_again_once_its_values_expire(make: Make, clock: FrozenClock) -> None:
    """Expired values are still purged: a table that was full takes new values once they have expired."""
    state = make(max_replay_entries=2)
    await state.first_use("a", 10, purpose=DPOP)
    await state.first_use("b", 20, purpose=DPOP)
    with pytest.raises(ReplayStoreFull):
        await state.first_use("c", 10, purpose=DPOP)
    clock.advance(10)  # "a" has expired, "b" has not
    assert await state.first_use("c", 10, purpose=DPOP) is True
    with pytest.raises(ReplayStoreFull):
        await state.first_use("d", 10, purpose=DPOP)
    assert await state.first_use("b", 20, purpose=DPOP) is False
    clock.advance(10)
    assert [await state.first_use(k, 10, purpose=DPOP) for k in ("b", "d")] == [True, True]
    assert state.refused_full == 2 and len(state) == 2


async def test_a_full_table_still_answers_a_replay_as_a_replay(make: Make) -> None:
    """Only a new value is refused as "full": a remembered one is still the client's replay (401, not 503)."""
    state = make(max_replay_entries=1)
    await state.first_use("a", 10, purpose=DPOP)
    assert await state.first_use("a", 10, purpose=DPOP) is False
    assert await state.seen("a", purpose=DPOP) is True and state.refused_full == 0


async def test_refusals_of_a_full_table_are_counted_and_logged_at_most_every_few_seconds(
    make: Make, clock: FrozenClock, caplog: pytest.LogCaptureFixture
) -> None:
    state = make(max_replay_entries=1)
    await state.first_use("dpop:jti:REMEMBERED-VALUE", 100, purpose=DPOP)
    for _ in range(3):
        with pytest.raises(ReplayStoreFull):
            await state.first_use("dpop:jti:SECRET-VALUE", 100, purpose=DPOP)
    clock.advance(FULL_LOG_SECONDS)
    with pytest.raises(ReplayStoreFull):
        await state.first_use("dpop:jti:SECRET-VALUE", 100, purpose=DPOP)
    lines = [r for r in caplog.records if getattr(r, "event", "") == "replay_store_full"]
    assert [(r.refused, r.held, r.max_replay_entries) for r in lines] == [(1, 1, 1), (3, 1, 1)]  # type: ignore[attr-defined]
    assert state.refused_full == 4
    said = caplog.text + " ".join(str(vars(r)) for r in caplog.records)
    assert "SECRET" not in said and "REMEMBERED" not in said


async def test_a_full_revocation_part_is_logged_even_while_a_dpop_flood_is_being_logged(
    make: Make, clock: FrozenClock, caplog: pytest.LogCaptureFixture
) -> None:
    """The log is rate-limited per purpose: a DPoP flood's lines never hide that revocations are refused, and
    each line names its purpose and the seconds until that part has room."""
    state = make(max_replay_entries=1)
    await state.first_use("dpop:jti:1", 60, purpose=DPOP)
    await state.first_use("ssf:1", 300, purpose=REVOCATION)
    for _ in range(3):
        with pytest.raises(ReplayStoreFull):
            await state.first_use("dpop:jti:2", 60, purpose=DPOP)
    clock.advance(1)
    with pytest.raises(ReplayStoreFull):
        await state.first_use("ssf:2", 300, purpose=REVOCATION)
    lines = [vars(r) for r in caplog.records if getattr(r, "event", "") == "replay_store_full"]
    assert [(r["purpose"], r["refused"], r["retry_after"]) for r in lines] == [("dpop", 1, 60), ("revocation", 1, 299)]


async def test_the_metric_counts_the_refusals_of_a_full_table_per_purpose(make: Make) -> None:
    """One series per purpose, each always there (three fixed label values, none a client's)."""
    state = make(max_replay_entries=1)
    metrics = Metrics()
    metrics.replay_store(lambda: state.full.refused)
    assert _full_series(metrics) == {"dpop": 0.0, "webauthn": 0.0, "revocation": 0.0}
    await state.first_use("a", 10, purpose=DPOP)
    with pytest.raises(ReplayStoreFull):
        await state.first_use("b", 10, purpose=DPOP)
    await state.first_use("ssf:1", 10, purpose=REVOCATION)
    for _ in range(2):
        with pytest.raises(ReplayStoreFull):
            await state.first_use("ssf:2", 10, purpose=REVOCATION)
    assert _full_series(metrics) == {"dpop": 1.0, "webauthn": 0.0, "revocation": 2.0}


def _full_series(metrics: Metrics) -> dict[str, float]:
    """`verifier_replay_store_full_total` by its labels (each must be `purpose` alone)."""
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "verifier_replay_store_full_total":
                assert list(sample.labels) == ["purpose"]
                found[sample.labels["purpose"]] = sample.value
    return found


async def test_a_full_purpose_refuses_only_its_own_new_values(make: Make, clock: FrozenClock) -> None:
    """Each purpose has its own bound: DPoP proofs filling theirs never refuse an SET or logout jti, nor a
    WebAuthn challenge, and a full revocation part never refuses a DPoP proof. Before, one bound for all."""
    state = make(max_replay_entries=3)
    for i in range(3):
        assert await state.first_use(f"dpop:jti:{i}", 60, purpose=DPOP) is True
    with pytest.raises(ReplayStoreFull) as dpop_full:
        await state.first_use("dpop:jti:3", 60, purpose=DPOP)
    assert dpop_full.value.purpose == "dpop"
    for i in range(3):
        assert await state.first_use(f"ssf:{i}", 300, purpose=REVOCATION) is True
        assert await state.first_use(f"webauthn:{i}", 120, purpose=WEBAUTHN) is True
    with pytest.raises(ReplayStoreFull) as revocation_full:
        await state.first_use("logout:3", 300, purpose=REVOCATION)
    assert revocation_full.value.purpose == "revocation"
    assert await state.first_use("ssf:0", 300, purpose=REVOCATION) is False  # still a replay, full or not
    assert [state.held(p) for p in (DPOP, WEBAUTHN, REVOCATION)] == [3, 3, 3]
    assert state.full.refused == {DPOP: 1, WEBAUTHN: 0, REVOCATION: 1}
    clock.advance(60)  # the proofs expire: DPoP has room again, the revocation part is still full
    assert await state.first_use("dpop:jti:3", 60, purpose=DPOP) is True
    with pytest.raises(ReplayStoreFull):
        await state.first_use("logout:3", 300, purpose=REVOCATION)


async def test_retry_after_is_the_seconds_until_the_purposes_oldest_live_value_expires(
    make: Make, clock: FrozenClock
) -> None:
    """Not a fixed 1: when the refused purpose's earliest live value expires (at least 1 s, at most the refused
    value's TTL), whatever the other purposes hold."""
    state = make(max_replay_entries=2)
    await state.first_use("logout:soonest", 5, purpose=REVOCATION)  # another purpose's: not what DPoP waits for
    await state.first_use("dpop:jti:a", 30, purpose=DPOP)
    clock.advance(5)
    await state.first_use("dpop:jti:b", 100, purpose=DPOP)
    clock.advance(5)

    async def refused(ttl: float) -> int:
        with pytest.raises(ReplayStoreFull) as caught:
            await state.first_use(f"dpop:jti:{clock.now()}:{ttl}", ttl, purpose=DPOP)
        return caught.value.retry_after

    assert await refused(60) == 20  # "a" expires 30 s after it came, 10 s ago
    assert await refused(7) == 7  # capped at the refused value's own window
    clock.advance(19.5)
    assert await refused(60) == 1  # half a second left: never 0
    clock.advance(0.5)
    assert await state.first_use("dpop:jti:c", 200, purpose=DPOP) is True  # and then there is room
    assert await refused(200) == 75  # now "b" is the oldest: 100 s after it came, 25 s ago


async def test_memory_remembers_a_value_for_its_ttl_and_at_most_a_slice_more(clock: FrozenClock) -> None:
    """Expiries are rounded up to a one-second slice: never forgotten early, dropped within a slice after."""
    state = MemoryState(clock)
    clock.advance(0.3)
    assert await state.first_use("k", 10, purpose=DPOP) is True
    clock.advance(9.999)
    assert await state.first_use("k", 10, purpose=DPOP) is False
    clock.advance(0.001 + SLICE_SECONDS)
    assert await state.first_use("k", 10, purpose=DPOP) is True


async def test_memory_holds_a_digest_not_the_value(clock: FrozenClock) -> None:
    state = MemoryState(clock)
    await state.first_use("dpop:jti:" + "x" * 500, 10, purpose=DPOP)
    assert state._tables[DPOP].live == {replay_digest("dpop:jti:" + "x" * 500)}
    assert all(len(d) == REPLAY_DIGEST_BYTES == 16 for d in state._tables[DPOP].live)


async def test_sqlite_processes_sharing_a_full_file_refuse_and_never_delete_each_others_live_keys(
    tmp_path: Path, clock: FrozenClock
) -> None:
    one = SqliteState(str(tmp_path), clock, replay=ReplayBounds(dpop=2, webauthn=2, revocation=2))
    two = SqliteState(str(tmp_path), clock, replay=ReplayBounds(dpop=2, webauthn=2, revocation=2))
    try:
        assert await one.first_use("a", 10, purpose=DPOP) is True
        assert await two.first_use("b", 10, purpose=DPOP) is True
        for store in (one, two):
            with pytest.raises(ReplayStoreFull):
                await store.first_use("c", 10, purpose=DPOP)
        assert [await s.first_use(k, 10, purpose=DPOP) for s in (one, two) for k in ("a", "b")] == [False] * 4
        assert len(one) == 2
    finally:
        one._db.close()
        two._db.close()


# The replay file as the verifier wrote it before purposes (0.x Unreleased): one count for every key.
_FILE_BEFORE_PURPOSES = (
    "CREATE TABLE seen (key BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX seen_expires ON seen (expires)",
    "CREATE TABLE seen_count (n INTEGER NOT NULL)",
    "INSERT INTO seen_count (n) VALUES (0)",
    "CREATE TRIGGER seen_added AFTER INSERT ON seen BEGIN UPDATE seen_count SET n = n + 1; END",
    "CREATE TRIGGER seen_removed AFTER DELETE ON seen BEGIN UPDATE seen_count SET n = n - 1; END",
)


async def test_a_sqlite_file_from_before_purposes_is_upgraded_and_its_keys_count_as_dpop(
    tmp_path: Path, clock: FrozenClock
) -> None:
    """A file written before purposes (or before the bound: no count at all) is counted when opened, once,
    its keys as DPoP keys (their purpose is unknown): they stay refused as replays, and they never crowd out
    a revocation. A key used again after it expired takes its caller's purpose, and the counts follow."""
    db = sqlite3.connect(tmp_path / SQLITE_FILE)
    for statement in _FILE_BEFORE_PURPOSES:
        db.execute(statement)
    db.execute("INSERT INTO seen (key, expires) VALUES (?, ?)", (replay_digest("old"), NOW + 100))
    db.execute("INSERT INTO seen (key, expires) VALUES (?, ?)", (replay_digest("ssf:old"), NOW + 5))
    db.commit()
    db.close()
    bounds = ReplayBounds(dpop=2, webauthn=1, revocation=1)
    stores = [SqliteState(str(tmp_path), clock, replay=bounds) for _ in range(3)]  # every open counts once
    try:
        counts = "SELECT purpose, n FROM seen_counts ORDER BY purpose"
        assert stores[0]._db.execute(counts).fetchall() == [(0, 2), (1, 0), (2, 0)]
        assert await stores[1].first_use("old", 10, purpose=DPOP) is False
        assert await stores[1].first_use("ssf:old", 10, purpose=REVOCATION) is False
        with pytest.raises(ReplayStoreFull):
            await stores[2].first_use("new", 10, purpose=DPOP)
        assert await stores[2].first_use("ssf:new", 10, purpose=REVOCATION) is True
        clock.advance(6)  # "ssf:old" expired: used again, it is a revocation key now
        stores[0]._next_purge = math.inf  # not purged first: the upsert takes the expired row over
        assert await stores[0].first_use("ssf:old", 10, purpose=WEBAUTHN) is True
        assert stores[0]._db.execute(counts).fetchall() == [(0, 1), (1, 1), (2, 1)]
        assert [stores[0].held(p) for p in (DPOP, WEBAUTHN, REVOCATION)] == [1, 1, 1]
    finally:
        for store in stores:
            store._db.close()


async def test_first_use_refuses_a_non_positive_ttl(replay: ReplayStore) -> None:
    with pytest.raises(ValueError):
        await replay.first_use("k", 0, purpose=DPOP)


async def test_sqlite_replay_keys_outlive_the_process_that_wrote_them(make: Make, clock: FrozenClock) -> None:
    """A worker restarted after a crash, or its successor on SIGHUP, opens the same file: what the old one
    saw stays seen (in memory it was forgotten, and a captured DPoP proof passed again)."""
    old, new = make(), make()
    assert await old.first_use("dpop:jti:1", 60, purpose=DPOP) is True
    if isinstance(old, MemoryState):
        assert await new.first_use("dpop:jti:1", 60, purpose=DPOP) is True  # what the SQLite store is for
        return
    assert await new.first_use("dpop:jti:1", 60, purpose=DPOP) is False and await new.seen("dpop:jti:1", purpose=DPOP)
    await old.close()
    assert await make().first_use("dpop:jti:1", 60, purpose=DPOP) is False  # a full restart, with state.path
    clock.advance(60)
    assert await new.first_use("dpop:jti:1", 60, purpose=DPOP) is True


async def test_sqlite_replay_store_fails_closed(tmp_path: Path, clock: FrozenClock) -> None:
    """A file that cannot be written is 503 (StateUnavailable), never a first use."""
    store = SqliteState(str(tmp_path), clock)
    other = SqliteState(str(tmp_path), clock)
    other._db.execute("BEGIN EXCLUSIVE")  # another process holds the write lock past the busy timeout
    try:
        with pytest.raises(StateUnavailable):
            await store.first_use("k", 10, purpose=DPOP)
    finally:
        other._db.execute("ROLLBACK")
    assert await store.first_use("k", 10, purpose=DPOP) is True
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
    assert await store.first_use("k", 10, purpose=DPOP) is True
    assert await store.first_use("k", 10, purpose=DPOP) is False
    await store.close()


async def test_the_replay_files_wal_stays_small_under_a_stream_of_writes(tmp_path: Path, clock: FrozenClock) -> None:
    """Each write checkpoints the WAL once it holds 100 pages: it never grows with the traffic."""
    store = SqliteState(str(tmp_path), clock)
    for i in range(5_000):
        assert await store.first_use(f"dpop:jti:{i:040d}", 100, purpose=DPOP)
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
            won += [key for key in keys if await store.first_use(key, 60, purpose=DPOP)]
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


def _flood_purposes(directory: str, bounds: ReplayBounds, side: int, start: Any, results: Any) -> None:
    """One process's half of the race below: rounds of DPoP keys well past the DPoP bound, interleaved with
    revocation and WebAuthn keys (some shared with the other process), all started together; it reports back
    what it won and what it was refused, per purpose."""
    import asyncio

    from verifier.clock import SystemClock

    async def run() -> dict[str, list[int]]:
        store = SqliteState(directory, SystemClock(), replay=bounds)
        outcome: dict[str, list[int]] = {"won": [0, 0, 0], "full": [0, 0, 0]}
        for r in range(10):
            start.wait(60)
            for i in range(60):
                keys = [
                    (DPOP, f"dpop:jti:{side}:{r}:{i}"),
                    (REVOCATION, f"ssf:{r}:{i // 2}"),  # every other one the other process's too
                    (WEBAUTHN, f"webauthn:{side}:{r}:{i}") if i % 10 == 0 else None,
                ]
                for n, pair in enumerate(keys):
                    if pair is None:
                        continue
                    try:
                        outcome["won"][n] += await store.first_use(pair[1], 300, purpose=pair[0])
                    except ReplayStoreFull:
                        outcome["full"][n] += 1
        await store.close()
        return outcome

    results.put(asyncio.run(run()))


def test_two_processes_flooding_dpop_keep_every_purposes_count_exact_and_revocations_accepted(tmp_path: Path) -> None:
    """Two workers on one replay file, one flooding DPoP well past its bound while both take revocation and
    WebAuthn keys: the per-purpose counts in the file stay exact (what count(*) says), DPoP ends at its bound
    and never past it, and not one revocation or WebAuthn key is refused."""
    import multiprocessing

    bounds = ReplayBounds(dpop=500, webauthn=200, revocation=700)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    racers = [
        context.Process(target=_flood_purposes, args=(str(tmp_path), bounds, side, start, results)) for side in (0, 1)
    ]
    for racer in racers:
        racer.start()
    outcomes = [results.get(timeout=120) for _ in racers]
    for racer in racers:
        racer.join(timeout=30)
        assert racer.exitcode == 0
    won = [sum(o["won"][n] for o in outcomes) for n in range(3)]
    full = [sum(o["full"][n] for o in outcomes) for n in range(3)]
    # 1,200 proofs for 500 places (two racing for the last one may both refuse: conservative); 300 SET jtis
    assert won[1:] == [300, 120] and full[1:] == [0, 0]
    assert 400 < won[0] <= 500 and won[0] + full[0] == 1_200
    db = sqlite3.connect(tmp_path / SQLITE_FILE)
    try:
        counted = db.execute("SELECT purpose, n FROM seen_counts ORDER BY purpose").fetchall()
        actual = db.execute("SELECT purpose, count(*) FROM seen GROUP BY purpose ORDER BY purpose").fetchall()
    finally:
        db.close()
    assert counted == actual == [(0, won[0]), (1, 120), (2, 300)]
    store = SqliteState(str(tmp_path), FrozenClock(NOW), replay=bounds)  # a third process: fills DPoP, exactly
    try:
        for i in range(500 - won[0]):
            assert asyncio.run(store.first_use(f"dpop:jti:last:{i}", 300, purpose=DPOP))
        with pytest.raises(ReplayStoreFull):
            asyncio.run(store.first_use("dpop:jti:one-more", 300, purpose=DPOP))
        assert [store.held(p) for p in (DPOP, WEBAUTHN, REVOCATION)] == [500, 120, 300]
    finally:
        store._db.close()


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
    await state.first_use("k", 10, purpose=DPOP)
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
        ({"webauthn_replay_share": 0}, "state.webauthn_replay_share"),
        ({"revocation_replay_share": 0.3}, "state.revocation_replay_share"),  # DPoP, the bulk, would get too little
        ({"revocation_replay_share": "2%"}, "state.revocation_replay_share"),
        ({"max_replay_entries": 40}, "state.webauthn_replay_share"),  # 2% of 40 is no place at all
        (
            {"max_replay_entries": 100, "webauthn_replay_share": 0.1, "revocation_replay_share": 0.005},
            "state.revocation_replay_share",
        ),
        ({"redis_max_replay_entries": 0}, "state.redis_max_replay_entries"),
        (
            {"redis_url": "redis://x", "key_prefix": "a:", "redis_max_replay_entries": 40},
            "state.webauthn_replay_share",
        ),  # with Redis, the shares split Redis's bound: 2% of 40 is no place
        ({"redis": "redis://x"}, "state.redis"),
        ("redis://x", "state"),
        ({"redis_revocation_replicas": 1}, "state.redis_revocation_replicas"),  # no Redis, no replicas to ask
        (
            {"redis_url": "redis://x", "key_prefix": "a:", "redis_revocation_replicas": -1},
            "state.redis_revocation_replicas",
        ),
        (
            {"redis_url": "redis://x", "key_prefix": "a:", "redis_revocation_replicas": 17},
            "state.redis_revocation_replicas",
        ),
        (
            {"redis_url": "redis://x", "key_prefix": "a:", "redis_revocation_replicas": "1"},
            "state.redis_revocation_replicas",
        ),
    ],
)
def test_settings_errors_name_the_key(data: Any, key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_state_config(data)
    assert str(refused.value).startswith(key + ": ")


def test_the_replay_bound_is_split_per_purpose_with_dpop_taking_the_rest() -> None:
    """The default: 2% each for WebAuthn challenges and revocation events, which are few; DPoP gets 96%."""
    assert parse_state_config(None).replay_bounds == ReplayBounds(dpop=960_000, webauthn=20_000, revocation=20_000)
    config = parse_state_config(
        {"max_replay_entries": 10_000, "webauthn_replay_share": 0.001, "revocation_replay_share": 0.25}
    )
    assert config.replay_bounds == ReplayBounds(dpop=7_490, webauthn=10, revocation=2_500)
    assert StateConfig(max_replay_entries=1).replay_bounds == ReplayBounds(dpop=1, webauthn=1, revocation=1)
    with pytest.raises(ValueError):
        ReplayBounds(dpop=0, webauthn=1, revocation=1)


async def test_with_redis_the_shares_split_redis_own_bound_and_the_root_hands_it_to_the_store(
    clock: FrozenClock,
) -> None:
    """Redis's bound is every replica's together, so larger by default (4,000,000); the same shares split it,
    and only it is checked against them with a redis_url (a small local bound beside Redis is no error)."""
    assert parse_state_config(None).redis_replay_bounds == ReplayBounds(
        dpop=3_840_000, webauthn=80_000, revocation=80_000
    )
    config = parse_state_config(
        {
            "redis_url": "redis://127.0.0.1:1/0",
            "key_prefix": "v1:",
            "max_replay_entries": 40,
            "redis_max_replay_entries": 10_000,
            "revocation_replay_share": 0.25,
        }
    )
    assert config.redis_replay_bounds == ReplayBounds(dpop=7_300, webauthn=200, revocation=2_500)
    state = shared_state(config, clock)
    assert state._bounds == config.redis_replay_bounds  # type: ignore[attr-defined]
    await state.close()


async def test_redis_revocation_replicas_reaches_the_revocation_store_and_defaults_to_none() -> None:
    """`state.redis_revocation_replicas`: 0 by default (no WAIT, the behaviour before it); what is set is what the
    root hands the Redis revocation store."""
    from verifier.app import revocation_store
    from verifier.revocation.store import RedisStore

    assert parse_state_config(None).redis_revocation_replicas == 0
    for wanted in (0, 2):
        config = parse_state_config(
            {"redis_url": "redis://127.0.0.1:1/0", "key_prefix": "v1:", "redis_revocation_replicas": wanted}
        )
        store = revocation_store(config)
        assert isinstance(store, RedisStore) and store.replicas == wanted
        await store.close()


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


def test_a_worker_opening_the_file_while_another_holds_it_past_the_busy_timeout_waits_instead_of_failing(
    tmp_path: Path,
) -> None:
    """Workers open the replay file together at start-up, each changing its journal mode and creating the schema
    under the write lock; on a loaded host one holds it past BUSY_SECONDS (0.25 s), and a journal-mode change meeting
    a lock is refused at once. The opener waits (OPEN_SECONDS) instead of failing its worker's start-up."""
    import threading

    from verifier.state import sqlite as sqlite_state

    clock = FrozenClock(NOW)
    asyncio.run(SqliteState(str(tmp_path), clock).close())  # the file exists, with its schema
    holder = sqlite3.connect(str(tmp_path / SQLITE_FILE), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")  # another worker's long schema transaction
    release = threading.Timer(4 * sqlite_state.BUSY_SECONDS, holder.rollback)
    release.start()
    try:
        store = SqliteState(str(tmp_path), clock)  # raised StateUnavailable ("database is locked")
    finally:
        release.join()
        holder.close()
    asyncio.run(store.close())


async def test_workers_opening_a_new_file_together_wait_for_the_one_making_it(tmp_path: Path) -> None:
    """As the revocation and credential stores (one `private_files.open_sqlite`): a new file, its maker's lock."""
    stores = opened_together(tmp_path / SQLITE_FILE, lambda: SqliteState(str(tmp_path), FrozenClock(NOW)))
    try:
        assert await stores[0].first_use("k", 60, purpose=Purpose.DPOP)
        for store in stores:
            assert not await store.first_use("k", 60, purpose=Purpose.DPOP)
    finally:
        for store in stores:
            await store.close()
