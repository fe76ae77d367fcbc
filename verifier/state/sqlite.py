"""One host's `SharedState` replay memory in a SQLite file, so it outlives the worker that wrote it.

Single-use values (DPoP proof `jti`s, WebAuthn challenges, SSF and logout-token `jti`s) must stay
single-use across everything an operator does to a running `verifier serve` without Redis: a worker
restarted after a crash, the new worker started beside the old one on SIGHUP (both answer on the same
sockets for a while), and, with `state.path`, a full restart. In memory, each of those forgot every
value it had seen, and a captured DPoP proof passed again within its `iat` window. So without Redis
`verifier serve` keeps the replay keys in `replay.sqlite3` in `state.path` (or in the directory the
supervisor keeps), shared by every process on the host.

Each `first_use` is one `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired` on the event loop's thread:
a local file in WAL mode, ~20 us alone (served, a DPoP check took ~50 us more CPU than with the keys in
memory, 0.85x the throughput, until proof keys were held parsed: docs/BENCHMARKS.md, "Replay keys in a
file"); a thread hop would cost more than the write. Nothing is fsync'd (`synchronous=OFF`): a write reaches the OS at
once, so it survives a process crash, which is what a worker restart is; with `NORMAL` the fsync that
comes with reusing the WAL ran under the write lock on a loop and put the DPoP p99 at 5-7 ms. A file
damaged by a crash of the host is moved aside at open and a new one started (the host was down
longer than most proof windows). Pages are 1 KB and the WAL is checkpointed every 100 pages, by the
write that fills it: ~0.1 ms at a time and a WAL of ~100 KB (SQLite's default, 1,000 pages of 4 KB,
stalled the loop ~1 ms each time; a checkpoint in another thread could never finish while the loop
kept writing, and the WAL grew without bound).

Expiry is wall-clock time (the processes and a restarted host share it). Expired keys are purged about
once a second, and at once when the table is past its bound. A live key is never deleted to make room
(that would let its value be replayed until its window closes, as `MemoryState` explains): when the
table holds more than `max_replay_entries` live keys, the key just written is taken back and `first_use`
raises `ReplayStoreFull` (503 `replay_store_full`), counted in `refused_full` and logged at most every
10 s. Every process takes back only its own key, so processes racing at the bound may both refuse
(conservative), never delete each other's live keys, and leave the table at the bound. The number of
keys is kept in the file by triggers (`seen_count`), exact whichever process (or older verifier) writes,
and read in O(1) after each new key (count(*) scans: ~80 ms at a million keys). That costs a new key ~10
us more (a page more per write, and the read; ~50 -> ~60 us on a loaded 2-vCPU host); a replay costs
what it did. At 1 KB pages the file holds ~145 bytes a key (~145 MB at the default bound, which
realistic load stays well below: ~40 MB at 4,000 new keys a second). Token buckets stay in this
process's memory (`take`, bounded by `max_entries`; an evicted idle bucket opens no replay): a rate
limit is not a security boundary worth a write per request. Every other SQLite error is
`StateUnavailable` (fail closed).
"""

from __future__ import annotations

import logging
import os
import sqlite3

from verifier.clock import Clock
from verifier.config.state import DEFAULT_MAX_REPLAY_ENTRIES as MAX_REPLAY_ENTRIES
from verifier.errors import StateUnavailable
from verifier.private_files import REPLAY_FILE, private_sqlite
from verifier.state.base import FullLog, TakeResult, replay_digest
from verifier.state.memory import MemoryState

log = logging.getLogger("verifier.state")
Buckets = MemoryState | None  # where `take` keeps this process's token buckets

SQLITE_FILE = REPLAY_FILE  # in `state.path`
CHECKPOINT_PAGES = 100  # the WAL is copied into the file every ~100 KB (~30 writes), ~0.1 ms each time
BUSY_SECONDS = 0.25  # a write waits this long for another process's (they take microseconds), then 503
PURGE_SECONDS = 1.0  # expired keys are deleted about this often

_FIRST_USE = (
    "INSERT INTO seen (key, expires) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET expires = excluded.expires WHERE seen.expires <= ?"
)
# The number of keys, kept by triggers in the file: every process's writes (an older verifier's too)
# keep it exact, and reading it is O(1) where count(*) scans (~80 ms at a million keys).
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS seen (key BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires)",
    "CREATE TABLE IF NOT EXISTS seen_count (n INTEGER NOT NULL)",
    # Counted once, for a file without the count (new, or an older verifier's); never a second row.
    "INSERT INTO seen_count (n) SELECT (SELECT count(*) FROM seen) WHERE NOT EXISTS (SELECT 1 FROM seen_count)",
    "CREATE TRIGGER IF NOT EXISTS seen_added AFTER INSERT ON seen BEGIN UPDATE seen_count SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS seen_removed AFTER DELETE ON seen BEGIN UPDATE seen_count SET n = n - 1; END",
)


class SqliteState:
    """Replay keys in a file every process of this host shares; buckets in this process's memory."""

    def __init__(
        self, directory: str, clock: Clock, *, buckets: Buckets = None, max_replay_entries: int = MAX_REPLAY_ENTRIES
    ) -> None:
        """`buckets` holds this process's token buckets (the root's, bounded by `state.max_entries`)."""
        if max_replay_entries < 1:
            raise ValueError("max_replay_entries must be at least 1")
        self.path = os.path.join(directory, SQLITE_FILE)
        self._clock = clock
        self._max = max_replay_entries
        self._buckets = buckets or MemoryState(clock)
        self.full = FullLog(clock, "sqlite")
        try:
            self._db = self._open()
        except sqlite3.OperationalError as exc:  # cannot open, locked past the busy timeout, I/O error
            raise StateUnavailable(f"replay store {self.path} unusable: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # not a database, or corrupt (a power loss: writes are not fsync'd)
            self._db = self._start_over(exc)
        self._next_purge = 0.0  # monotonic

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            private_sqlite(self.path), isolation_level=None, check_same_thread=False, timeout=BUSY_SECONDS
        )
        try:
            db.execute("PRAGMA page_size=1024")  # a new file's: each write logs ~3 KB of pages, not ~10
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")  # a sync under the write lock would stall every worker's loop
            db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
            with db:  # one transaction: a process opening the file beside this one sees all of it or none
                db.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    db.execute(statement)
            checked = db.execute("PRAGMA quick_check").fetchall()
            if checked != [("ok",)]:
                raise sqlite3.DatabaseError(f"quick_check: {checked[:3]}")
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _start_over(self, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
        """Moves a damaged file aside and starts an empty one. Only a crash of the host damages it (the writes
        reach the OS at once), and a host that went down was down for longer than most proofs' windows."""
        aside = f"{self.path}.damaged-{int(self._clock.now())}"
        log.error(
            "replay store damaged; moved aside, starting empty",
            extra={"event": "replay_store", "error": str(exc), "moved_to": aside},
        )
        try:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.replace(self.path + suffix, aside + suffix)
            return self._open()
        except (OSError, sqlite3.Error) as again:
            raise StateUnavailable(f"replay store {self.path} unusable: {again}") from again

    @property
    def evictions(self) -> int:
        """Buckets dropped because their table was full (never a replay key)."""
        return self._buckets.evictions

    @property
    def refused_full(self) -> int:
        """New keys this process refused because the table was full of live ones."""
        return self.full.refused

    def __len__(self) -> int:
        return self._count()

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])

    async def first_use(self, key: str, ttl_seconds: float) -> bool:
        """True the first time any process of this host sees `key` within `ttl_seconds` (False on a
        replay); raises `ReplayStoreFull` when the table holds `max_replay_entries` live keys."""
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        now = self._clock.now()
        digest = replay_digest(key)
        try:
            if self._clock.monotonic() >= self._next_purge:
                self._trim(now)
            if self._db.execute(_FIRST_USE, (digest, now + ttl_seconds, now)).rowcount != 1:
                return False  # live: a replay
            if self._held() <= self._max:
                return True
            # Past the bound (this key, or another process's, took the last place): expired keys make room,
            # live ones never do. Each process takes back only its own key, so racing ones may both refuse
            # at the boundary (conservative), and the table never stays above the bound.
            self._trim(now)
            held = self._held()
            if held <= self._max:
                return True
            self._db.execute("DELETE FROM seen WHERE key = ?", (digest,))
        except sqlite3.Error as exc:
            raise StateUnavailable(f"replay store unavailable: {type(exc).__name__}") from exc
        raise self.full.refuse(held - 1, self._max)

    def _held(self) -> int:
        return int(self._db.execute("SELECT n FROM seen_count").fetchone()[0])

    def _live(self, digest: bytes, now: float) -> bool:
        row = self._db.execute("SELECT 1 FROM seen WHERE key = ? AND expires > ?", (digest, now))
        return row.fetchone() is not None

    async def seen(self, key: str) -> bool:
        """True while `key` is marked (by any process of this host)."""
        try:
            return self._live(replay_digest(key), self._clock.now())
        except sqlite3.Error as exc:
            raise StateUnavailable(f"replay store unavailable: {type(exc).__name__}") from exc

    def _trim(self, now: float) -> None:
        """Deletes expired keys (never a live one)."""
        self._next_purge = self._clock.monotonic() + PURGE_SECONDS
        self._db.execute("DELETE FROM seen WHERE expires <= ?", (now,))

    async def take(self, key: str, *, rate_per_second: float, burst: int, now: float) -> TakeResult:
        """Token bucket, in this process's memory."""
        return await self._buckets.take(key, rate_per_second=rate_per_second, burst=burst, now=now)

    async def close(self) -> None:
        """Closes the file (its keys stay for the next process)."""
        await self._buckets.close()
        self._db.close()
