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

Expiry is wall-clock time (the processes and a restarted host share it). Expired keys are purged
about once a second; past `max_entries` the keys closest to expiry go first, counted in `evictions`,
as in `MemoryState`. Token buckets stay in this process's memory (`take`): a rate limit is not a
security boundary worth a write per request. Every other SQLite error is `StateUnavailable` (fail
closed).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3

from verifier.clock import Clock
from verifier.config.state import DEFAULT_MAX_ENTRIES
from verifier.errors import StateUnavailable
from verifier.private_files import REPLAY_FILE, private_sqlite
from verifier.state.base import TakeResult
from verifier.state.memory import MemoryState

log = logging.getLogger("verifier.state")

SQLITE_FILE = REPLAY_FILE  # in `state.path`
CHECKPOINT_PAGES = 100  # the WAL is copied into the file every ~100 KB (~30 writes), ~0.1 ms each time
BUSY_SECONDS = 0.25  # a write waits this long for another process's (they take microseconds), then 503
PURGE_SECONDS = 1.0  # expired keys are deleted about this often

_FIRST_USE = (
    "INSERT INTO seen (key, expires) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET expires = excluded.expires WHERE seen.expires <= ?"
)


def _digest(key: str) -> bytes:
    """The stored form of a key: 16 bytes of its SHA-256 (a third of a DPoP key's text: fewer pages written)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:16]


class SqliteState:
    """Replay keys in a file every process of this host shares; buckets in this process's memory."""

    def __init__(self, directory: str, clock: Clock, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.path = os.path.join(directory, SQLITE_FILE)
        self._clock = clock
        self._max = max_entries
        self._buckets = MemoryState(clock, max_entries=max_entries)
        self.evictions = 0  # live keys dropped because the table was full
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
            db.execute("CREATE TABLE IF NOT EXISTS seen (key BLOB PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID")
            db.execute("CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires)")
            checked = db.execute("PRAGMA quick_check").fetchall()
            if checked != [("ok",)]:
                raise sqlite3.DatabaseError(f"quick_check: {checked[:3]}")
            self._rows = int(db.execute("SELECT count(*) FROM seen").fetchone()[0])  # as far as this process knows
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

    def __len__(self) -> int:
        return self._count()

    def _count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM seen").fetchone()[0])

    async def first_use(self, key: str, ttl_seconds: float) -> bool:
        """True the first time any process of this host sees `key` within `ttl_seconds`."""
        if not ttl_seconds > 0:
            raise ValueError("ttl_seconds must be positive")
        now = self._clock.now()
        try:
            if self._clock.monotonic() >= self._next_purge:
                self._trim(now)
            first = self._db.execute(_FIRST_USE, (_digest(key), now + ttl_seconds, now)).rowcount == 1
            if first:
                self._rows += 1
                if self._rows > self._max:
                    self._trim(now, keep=key)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"replay store unavailable: {type(exc).__name__}") from exc
        return first

    async def seen(self, key: str) -> bool:
        """True while `key` is marked (by any process of this host)."""
        try:
            args = (_digest(key), self._clock.now())
            row = self._db.execute("SELECT 1 FROM seen WHERE key = ? AND expires > ?", args)
            return row.fetchone() is not None
        except sqlite3.Error as exc:
            raise StateUnavailable(f"replay store unavailable: {type(exc).__name__}") from exc

    def _trim(self, now: float, keep: str = "") -> None:
        """Deletes expired keys; past the bound, the live keys closest to expiry too (they matter least),
        never `keep`, the key just written."""
        self._next_purge = self._clock.monotonic() + PURGE_SECONDS
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            rows = max(0, self._rows - self._db.execute("DELETE FROM seen WHERE expires <= ?", (now,)).rowcount)
            if rows > self._max:  # counted only then: a count is a scan (another process's keys are in it)
                rows = self._count()
            excess = rows - self._max
            if excess > 0:
                self._db.execute(
                    "DELETE FROM seen WHERE key IN (SELECT key FROM seen WHERE key != ? ORDER BY expires LIMIT ?)",
                    (_digest(keep), excess),
                )
                self.evictions += excess
                rows -= excess
        self._rows = rows

    async def take(self, key: str, *, rate_per_second: float, burst: int, now: float) -> TakeResult:
        """Token bucket, in this process's memory."""
        return await self._buckets.take(key, rate_per_second=rate_per_second, burst=burst, now=now)

    async def close(self) -> None:
        """Closes the file (its keys stay for the next process)."""
        await self._buckets.close()
        self._db.close()
