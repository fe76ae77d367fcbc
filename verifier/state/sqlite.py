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

Expiry is wall-clock time (the processes and a restarted host share it). Expired keys are purged about once
a second, and at once when a purpose is past its bound. Each key carries its `Purpose` (a small integer
column), and each purpose has its own bound (`ReplayBounds`), so a flood of DPoP proofs fills only the DPoP
part and never refuses an SET or a logout token. A live key is never deleted to make room (that would let
its value be replayed until its window closes, as `MemoryState` explains): when a purpose holds more than
its bound of live keys, the key just written is taken back and `first_use` raises `ReplayStoreFull` (503
`replay_store_full`, `Retry-After` the seconds until that purpose's earliest live key expires), counted in
`refused_full` and logged at most every 10 s per purpose. Every process takes back only its own key, so
processes racing at the bound may both refuse (conservative), never delete each other's live keys, and leave
the purpose at its bound. The number of keys per purpose is kept in the file by triggers (`seen_counts`),
exact whichever process writes, and read in O(1) after each new key (count(*) scans: ~80 ms at a million
keys). That costs a new key ~10 us more (a page more per write, and the read; ~50 -> ~60 us on a loaded
2-vCPU host); a replay costs what it did. A file from before purposes is upgraded when opened: its keys
count as DPoP keys (their purpose is not known; DPoP is the part they cannot crowd out a revocation from), a
key used again takes its caller's purpose. At 1 KB pages the file holds ~145 bytes a key (~145 MB at the
default bound, which realistic load stays well below: ~40 MB at 4,000 new keys a second). Token buckets stay
in this process's memory (`take`, bounded by `max_entries`; an evicted idle bucket opens no replay): a rate
limit is not a security boundary worth a write per request. Every other SQLite error is `StateUnavailable`
(fail closed).
"""

from __future__ import annotations

import logging
import os
import sqlite3

from verifier.clock import Clock
from verifier.config.state import DEFAULT_REPLAY_BOUNDS, ReplayBounds
from verifier.errors import StateUnavailable
from verifier.private_files import REPLAY_FILE, open_sqlite
from verifier.state.base import FullLog, Limits, Purpose, TakeResult, replay_digest, retry_after
from verifier.state.memory import MemoryState

log = logging.getLogger("verifier.state")
Buckets = MemoryState | None  # where `take` keeps this process's token buckets

SQLITE_FILE = REPLAY_FILE  # in `state.path`
CHECKPOINT_PAGES = 100  # the WAL is copied into the file every ~100 KB (~30 writes), ~0.1 ms each time
BUSY_SECONDS = 0.25  # a write waits this long for another process's (they take microseconds), then 503
PURGE_SECONDS = 1.0  # expired keys are deleted about this often

# A purpose's number in the file (the `purpose` column); never renumbered: files outlive versions. 0 is what
# a key from before purposes counts as. `_SCHEMA` lists them (VALUES) for the counts.
PURPOSE_CODES = {Purpose.DPOP: 0, Purpose.WEBAUTHN: 1, Purpose.REVOCATION: 2}

_FIRST_USE = (
    "INSERT INTO seen (key, expires, purpose) VALUES (?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET expires = excluded.expires, purpose = excluded.purpose "
    "WHERE seen.expires <= ?"
)
_HELD = "SELECT n FROM seen_counts WHERE purpose = ?"
_TRIM = "DELETE FROM seen WHERE purpose = ? AND expires <= ?"  # one range of the index per purpose
_OLDEST = "SELECT min(expires) FROM seen WHERE purpose = ? AND expires > ?"  # the index's first live row
# The number of keys per purpose, kept by triggers in the file: every process's writes keep it exact, and
# reading it is O(1) where count(*) scans (~80 ms at a million keys).
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS seen (key BLOB PRIMARY KEY, expires REAL NOT NULL, purpose INTEGER NOT NULL DEFAULT 0)"
    " WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS seen_purpose_expires ON seen (purpose, expires)",
    "CREATE TABLE IF NOT EXISTS seen_counts (purpose INTEGER PRIMARY KEY, n INTEGER NOT NULL)",
    # Counted once per purpose, for a file without its count (new, or from before purposes); never twice.
    "INSERT OR IGNORE INTO seen_counts (purpose, n) "
    "SELECT column1, (SELECT count(*) FROM seen WHERE purpose = column1) FROM (VALUES (0), (1), (2))",
    "CREATE TRIGGER IF NOT EXISTS seen_added AFTER INSERT ON seen BEGIN "
    "UPDATE seen_counts SET n = n + 1 WHERE purpose = NEW.purpose; END",
    "CREATE TRIGGER IF NOT EXISTS seen_removed AFTER DELETE ON seen BEGIN "
    "UPDATE seen_counts SET n = n - 1 WHERE purpose = OLD.purpose; END",
    "CREATE TRIGGER IF NOT EXISTS seen_moved AFTER UPDATE OF purpose ON seen WHEN OLD.purpose != NEW.purpose BEGIN "
    "UPDATE seen_counts SET n = n - 1 WHERE purpose = OLD.purpose; "
    "UPDATE seen_counts SET n = n + 1 WHERE purpose = NEW.purpose; END",
)
# A file from before purposes: one count for every key, kept by triggers of the same names. Dropped (in the
# transaction that creates the new ones) before `_SCHEMA` runs.
_UPGRADE = (
    "ALTER TABLE seen ADD COLUMN purpose INTEGER NOT NULL DEFAULT 0",
    "DROP TRIGGER IF EXISTS seen_added",
    "DROP TRIGGER IF EXISTS seen_removed",
    "DROP TABLE IF EXISTS seen_count",
    "DROP INDEX IF EXISTS seen_expires",
)


def _prepare(db: sqlite3.Connection) -> None:
    """The file's settings and schema (a file from before purposes upgraded), then a check of its pages."""
    db.execute("PRAGMA page_size=1024")  # a new file's: each write logs ~3 KB of pages, not ~10
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")  # a sync under the write lock would stall every worker's loop
    db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
    with db:  # one transaction: a process opening the file beside this one sees all of it or none
        db.execute("BEGIN IMMEDIATE")
        columns = [row[1] for row in db.execute("PRAGMA table_info(seen)")]
        if columns and "purpose" not in columns:
            for statement in _UPGRADE:
                db.execute(statement)
        for statement in _SCHEMA:
            db.execute(statement)
    checked = db.execute("PRAGMA quick_check").fetchall()
    if checked != [("ok",)]:
        raise sqlite3.DatabaseError(f"quick_check: {checked[:3]}")


class SqliteState:
    """Replay keys in a file every process of this host shares; buckets in this process's memory."""

    def __init__(
        self, directory: str, clock: Clock, *, buckets: Buckets = None, replay: ReplayBounds = DEFAULT_REPLAY_BOUNDS
    ) -> None:
        """`buckets` holds this process's token buckets (the root's, bounded by `state.max_entries`); `replay`,
        the live keys held per purpose (`StateConfig.replay_bounds`; every process of the host should agree)."""
        self.path = os.path.join(directory, SQLITE_FILE)
        self._clock = clock
        # purpose -> (its number in the file, its bound), looked up once per call
        self._purposes = {purpose: (PURPOSE_CODES[purpose], replay.of(purpose)) for purpose in Purpose}
        self._buckets = buckets or MemoryState(clock)
        self.full = FullLog(clock, "sqlite")
        try:
            self._db = self._open()
        except sqlite3.OperationalError as exc:  # cannot open, locked past the start-up wait (OPEN_SECONDS), I/O error
            raise StateUnavailable(f"replay store {self.path} unusable: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # not a database, or corrupt (a power loss: writes are not fsync'd)
            self._db = self._start_over(exc)
        self._next_purge = 0.0  # monotonic

    def _open(self) -> sqlite3.Connection:
        return open_sqlite(self.path, _prepare, busy_seconds=BUSY_SECONDS)

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
        """New keys this process refused because their purpose was full of live ones."""
        return self.full.total

    def __len__(self) -> int:
        return self._count()

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])

    async def first_use(self, key: str, ttl_seconds: float, *, purpose: Purpose) -> bool:
        """True the first time any process of this host sees `key` within `ttl_seconds` (False on a
        replay); raises `ReplayStoreFull` when `purpose` holds its bound of live keys."""
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        now = self._clock.now()
        digest = replay_digest(key)
        code, bound = self._purposes[purpose]
        try:
            if self._clock.monotonic() >= self._next_purge:
                self._trim(now)
            if self._db.execute(_FIRST_USE, (digest, now + ttl_seconds, code, now)).rowcount != 1:
                return False  # live: a replay
            if self._held(code) <= bound:
                return True
            # Past the bound (this key, or another process's, took the last place): expired keys make room,
            # live ones never do. Each process takes back only its own key, so racing ones may both refuse
            # at the boundary (conservative), and the purpose never stays above its bound.
            self._trim(now)
            held = self._held(code)
            if held <= bound:
                return True
            self._db.execute("DELETE FROM seen WHERE key = ?", (digest,))
            oldest = self._db.execute(_OLDEST, (code, now)).fetchone()[0]
        except sqlite3.Error as exc:
            raise StateUnavailable(f"replay store unavailable: {type(exc).__name__}") from exc
        wait = retry_after(oldest if oldest is not None else now + 1, now, ttl_seconds)
        raise self.full.refuse(purpose, held - 1, bound, wait)

    def _held(self, code: int) -> int:
        return int(self._db.execute(_HELD, (code,)).fetchone()[0])

    def held(self, purpose: Purpose) -> int:
        """Keys of `purpose` in the file (expired ones not yet purged included), every process's."""
        return self._held(PURPOSE_CODES[purpose])

    def _live(self, digest: bytes, now: float) -> bool:
        row = self._db.execute("SELECT 1 FROM seen WHERE key = ? AND expires > ?", (digest, now))
        return row.fetchone() is not None

    async def seen(self, key: str, *, purpose: Purpose) -> bool:
        """True while `key` is marked (by any process of this host); a key is one purpose's (`purpose`
        is not needed to find it)."""
        try:
            return self._live(replay_digest(key), self._clock.now())
        except sqlite3.Error as exc:
            raise StateUnavailable(f"replay store unavailable: {type(exc).__name__}") from exc

    def _trim(self, now: float) -> None:
        """Deletes expired keys (never a live one)."""
        self._next_purge = self._clock.monotonic() + PURGE_SECONDS
        self._db.executemany(_TRIM, [(code, now) for code in PURPOSE_CODES.values()])

    async def take(
        self, key: str, *, rate_per_second: float, burst: int, now: float, share: str = "", hold: Limits = ()
    ) -> TakeResult:
        """Token bucket, in this process's memory."""
        return await self._buckets.take(
            key, rate_per_second=rate_per_second, burst=burst, now=now, share=share, hold=hold
        )

    async def close(self) -> None:
        """Closes the file (its keys stay for the next process)."""
        await self._buckets.close()
        self._db.close()
