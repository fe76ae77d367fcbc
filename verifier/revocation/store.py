"""Where revocation entries live: this process's memory, or Redis shared by every replica.

In Redis, entries sit in one hash (`{prefix}revocations`, field = entry id, value = the entry's JSON)
and every change is published on `{prefix}revocations:changes` in the same MULTI as the write, so an
event received by one replica reaches the others' in-memory index within one pub/sub hop. A periodic
full reload repairs anything a dropped subscription missed; after a reconnect the reload runs at once.
The subscription is this replica's only way to hear of others' entries, so while it is known lost (an error,
or `SUBSCRIPTION_SILENCE_SECONDS` without even the PONG of a heartbeat PING) the index refuses to decide
(503) until the subscription is back and a full reload has run: a cut-off replica never passes a token
that others refuse for longer than that.

A Redis that restarts without persistence (or is flushed) comes back empty, and "no entries" must
never be believed: a disabled account would be allowed again. The hash therefore carries an epoch
field, written once by whoever finds it missing. A reload that finds no epoch, or another epoch than
the one this replica last saw, means Redis lost the hash: the replica first writes back every entry
it holds (ids are deterministic, so several replicas restoring at once agree), then adopts the hash.

A Redis restarted from an older RDB snapshot (its default persistence), or a failover to a replica behind, comes back
with the epoch the replicas know but without the changes made since. Every write (`WRITE_SCRIPT`, `EXPIRE_SCRIPT`)
therefore also bumps a `~version` field and publishes the new version with the change; each replica remembers the
highest version it saw (its writes, the changes it heard, its reloads). A reload that finds a lower one is a
rollback: the replica writes back every entry it holds and deletes again the ids it saw deleted (`MAX_TOMBSTONES`;
a lift made after the snapshot must not come back with it), with a version past the one it remembers, then adopts
the hash. A write by a replica that remembers a higher version than Redis holds is refused (`StateUnavailable`), so
no write after a rollback reuses a version and hides it; its next reload restores. (A replica that never saw the
later versions, one started after the rollback, writes on: a replica that did, reloading only after those writes
reached its version, misses the rollback.) The restore also runs on the empty-Redis path above.

Without Redis, entries live in a SQLite file (`SqliteStore`) in `state.path`, or in a directory the
supervisor keeps for its lifetime: a reloaded or restarted worker reads them back, and a worker
started beside the old one during a reload sees the old one's last writes (it polls the file's
`data_version`). Every write is committed with `synchronous=FULL` (fsync'd) before it returns, so a
202 to a transmitter means the entry is on disk.

Entries past their expiry are dropped from Redis by whichever replica's maintenance finds them so, but only once
Redis's clock agrees (`EXPIRE_SCRIPT`, `EXPIRY_GRACE_SECONDS`): on the replica's own clock, one running ahead deleted
every live entry for every replica.

Every Redis failure on a write becomes `StateUnavailable` (the event's sender retries); the
subscriber reconnects on its own and never takes the replica down.

Redis replicates asynchronously: a write the primary answered can die with it, and a replica promoted by
Sentinel (or a managed Redis's failover) never saw it, while the transmitter, having had its 202, never resends.
With `replicas` (`state.redis_revocation_replicas`) above 0, every `put` is followed on the same connection by
`WAIT replicas REPLICA_WAIT_SECONDS`; fewer replicas confirming raises `RevocationNotReplicated` (a
`StateUnavailable`: the sender is not acknowledged and retries) after the entry was written to the primary and
published. A sender need not retry (an operator, a logout sender), and a failover to a replica without the entry
makes every reload drop it: `verifier.revocation.service.RevocationService` keeps what was not confirmed and
writes it again on each reload until `WAIT` confirms it.

`put` waits, and `delete` when asked (`replicated`: the kill switch's lift of a claims override, below). What else
is lost in a failover is fail closed: an expiry brings back an entry no live token can match, and the lift of a
refusal (operator's or RISC account-enabled) brings the refusal back; ids are never reused by another revocation
(the kill switch's are fresh, a SET's are its jti's), so a lift only ever removes the entry it named: lost, it re-
revokes. A claims override (CAEP claims announcements) is not a refusal: from a `replace` transmitter it may have
raised claims (a scope, a role, `acr`), so its lift taking those away is itself a revocation, and a lost one would
hand them back: it waits as a `put` does. The decision path never writes here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from verifier.config.state import DEFAULT_KEY_PREFIX
from verifier.errors import RevocationNotReplicated, StateUnavailable
from verifier.private_files import REVOCATIONS_FILE, open_sqlite
from verifier.revocation.entry import Entry

log = logging.getLogger("verifier.revocation")

DEFAULT_TIMEOUT_SECONDS = 1.0  # seconds per Redis operation; writes are off the hot path
RECONNECT_MIN_SECONDS = 0.1  # first wait before resubscribing; doubles up to the cap
RECONNECT_MAX_SECONDS = 5.0
EPOCH_FIELD = b"~epoch"  # in the entries' hash; entry ids start with "ev-" or "op-", never "~"
VERSION_FIELD = b"~version"  # in the entries' hash: bumped by every write (`WRITE_SCRIPT`, `EXPIRE_SCRIPT`)
# Ids this replica saw deleted (lifts, never expiries) and not added again since: deleted again when Redis is found
# rolled back (its snapshot may predate the deletion; ids are never reused). Beyond this many the oldest is forgotten.
MAX_TOMBSTONES = 10_000
LISTEN_POLL_SECONDS = 1.0  # the subscriber wakes at least this often (heartbeat, cancellation)
# A subscription that has heard nothing from Redis (not even the PONG of the heartbeat PING sent after each silent
# poll) for this long is taken as lost: a partition that drops packets without a reset never raises, and the
# replica would go on answering "no entry" while others' entries pass it by.
SUBSCRIPTION_SILENCE_SECONDS = 3.0
HEARTBEAT = b"verifier-revocations"
SQLITE_FILE = REVOCATIONS_FILE  # in `state.path`
SQLITE_POLL_SECONDS = 0.25  # how often a local store looks for another worker's writes
SQLITE_BUSY_SECONDS = 5.0  # a write waits this long for another worker's transaction
DELETE_SQL = "DELETE FROM entries WHERE id = ?"
# Seconds `WAIT` gives the replicas to confirm a revocation write: replication within a region takes
# milliseconds, and it must stay below the store's socket timeout (`DEFAULT_TIMEOUT_SECONDS`), or the
# connection gives up before WAIT answers.
REPLICA_WAIT_SECONDS = 0.5
# An entry is dropped from Redis once its `expires_at` is this far past on Redis's clock (`EXPIRE_SCRIPT`), never on
# the clock of the replica whose maintenance found it expired: one replica's clock running ahead (by a day, say)
# deleted every live entry for every replica, and the replicas whose clocks are right let the revoked tokens pass.
# The margin covers replicas' clocks behind Redis's; each replica stops matching an entry on its own clock anyway.
EXPIRY_GRACE_SECONDS = 60.0
EXPIRE_BATCH = 500  # ids per `EXPIRE_SCRIPT` call
# KEYS[1] the entries' hash; ARGV[1] the changes' channel, ARGV[2] the grace (seconds), ARGV[3] the highest version
# the caller saw, ARGV[4..] entry ids. Deletes the entries whose `expires_at` (seconds) is at least the grace before
# Redis's TIME, bumps the version and publishes their removal (as `expired`: no tombstone), and returns their ids.
# Nothing is done in a hash whose version is below the caller's (rolled back: the caller's reload restores it).
EXPIRE_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], '~version') or '0')
if current < tonumber(ARGV[3]) then return {} end
local time = redis.call('TIME')
local cutoff = tonumber(time[1]) + tonumber(time[2]) / 1000000 - tonumber(ARGV[2])
local removed = {}
for i = 4, #ARGV do
  local text = redis.call('HGET', KEYS[1], ARGV[i])
  if text then
    local ok, entry = pcall(cjson.decode, text)
    local expires = ok and type(entry) == 'table' and entry['expires_at']
    if type(expires) == 'number' and expires <= cutoff then
      redis.call('HDEL', KEYS[1], ARGV[i])
      removed[#removed + 1] = ARGV[i]
    end
  end
end
if #removed > 0 then
  local version = redis.call('HINCRBY', KEYS[1], '~version', 1)
  redis.call('PUBLISH', ARGV[1], cjson.encode({version = version, expired = removed}))
end
return removed
"""
# KEYS[1] the entries' hash; ARGV[1] the changes' channel, ARGV[2] the highest version the caller saw, ARGV[3] a new
# epoch (set if missing) for a restore, '' for a plain write, ARGV[4] the change's JSON object, ARGV[5] n, ARGV[6 ..
# 5 + 2n] id and JSON of each entry to set, then the ids to delete. A plain write into a hash whose version is below
# the caller's is refused (rolled back); otherwise the version becomes one past the higher of the two, and the change
# is published with it. Returns the new version.
WRITE_SCRIPT = """
local current = tonumber(redis.call('HGET', KEYS[1], '~version') or '0')
local floor = tonumber(ARGV[2])
if current < floor and ARGV[3] == '' then
  return redis.error_reply('ROLLBACK revocation hash at version ' .. current .. ', seen at ' .. floor)
end
local i = 6
for _ = 1, tonumber(ARGV[5]) do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
for j = i, #ARGV do redis.call('HDEL', KEYS[1], ARGV[j]) end
if ARGV[3] ~= '' then redis.call('HSETNX', KEYS[1], '~epoch', ARGV[3]) end
local version = math.max(current, floor) + 1
redis.call('HSET', KEYS[1], '~version', version)
redis.call('PUBLISH', ARGV[1], '{"version":' .. string.format('%d', version) .. ',' .. string.sub(ARGV[4], 2))
return version
"""


_Step = tuple[str, Sequence[tuple[str, ...]]]  # one SQL statement and the rows it runs for


class Change(Protocol):
    """Receives changes made by any replica (this one included)."""

    def __call__(self, added: list[Entry], removed: list[str]) -> None:
        """Applies added entries and removed ids."""
        ...


class RevocationStore(Protocol):
    """The entries every replica shares."""

    async def sync(self, held: list[Entry]) -> list[Entry]:
        """Every stored entry; raises `StateUnavailable`.

        `held` is what this replica holds now: a store that lost its contents since the last call
        (Redis restarted empty) gets them back before answering, so a loss is never adopted.
        """
        ...

    async def put(self, entries: Iterable[Entry], *, replacing: Iterable[str] = ()) -> None:
        """Adds or replaces entries, removes the ids `replacing` in the same write, and tells every replica; raises
        `StateUnavailable`."""
        ...

    async def delete(self, ids: Iterable[str], *, replicated: bool = False) -> None:
        """Removes entries and tells every replica; raises `StateUnavailable`. `replicated`: as `put`, confirmed by
        the Redis replicas (`RevocationNotReplicated`) when the store has any to ask."""
        ...

    async def expire(self, ids: Sequence[str]) -> list[str]:
        """Removes those of `ids` whose entry has expired on the store's clock (and tells every replica): the ones
        removed. Raises `StateUnavailable`."""
        ...

    async def listen(
        self, on_change: Change, on_reconnect: Callable[[], Awaitable[None]], on_lost: Callable[[], None]
    ) -> None:
        """Delivers other replicas' changes until cancelled; `on_reconnect` runs after each resubscribe, `on_lost`
        as soon as changes may be going unheard (the subscription broken or silent)."""
        ...

    async def subscribe(self) -> None:
        """Subscribes before the first load, so no change falls between the load and the subscription."""
        ...

    async def close(self) -> None:
        """Releases connections."""
        ...


class MemoryStore:
    """A single replica's store: a dict. Nothing to tell anyone."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    async def sync(self, held: list[Entry]) -> list[Entry]:
        """Every entry (this store is the only copy: nothing can have been lost)."""
        return list(self._entries.values())

    async def put(self, entries: Iterable[Entry], *, replacing: Iterable[str] = ()) -> None:
        """Adds or replaces entries, removes `replacing`."""
        for entry_id in replacing:
            self._entries.pop(entry_id, None)
        for entry in entries:
            self._entries[entry.id] = entry

    async def delete(self, ids: Iterable[str], *, replicated: bool = False) -> None:
        """Removes entries."""
        for entry_id in ids:
            self._entries.pop(entry_id, None)

    async def expire(self, ids: Sequence[str]) -> list[str]:
        """Removes them (one process, one clock: the caller's)."""
        await self.delete(ids)
        return list(ids)

    async def subscribe(self) -> None:
        """Nothing to subscribe to."""

    async def listen(
        self, on_change: Change, on_reconnect: Callable[[], Awaitable[None]], on_lost: Callable[[], None]
    ) -> None:
        """No other replica: waits until cancelled."""
        await asyncio.Event().wait()

    async def close(self) -> None:
        """Forgets everything."""
        self._entries.clear()


def _prepare(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # fsync on every commit: a 202 means on disk
    db.execute("CREATE TABLE IF NOT EXISTS entries (id TEXT PRIMARY KEY, entry TEXT NOT NULL)")


class SqliteStore:
    """One host's durable store: a SQLite file shared by this host's workers (old and new, on a reload)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, SQLITE_FILE)
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time
        try:  # the other workers opening it at start-up are waited for (OPEN_SECONDS), then it fails
            self._db = open_sqlite(self.path, _prepare, busy_seconds=SQLITE_BUSY_SECONDS)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"revocation store {self.path} unusable: {exc}") from exc
        self._version: int | None = None

    async def _run(self, sql: str, rows: Sequence[tuple[str, ...]] | None = None, *more: _Step) -> list[Any]:
        """`sql` alone: a query's rows. With `rows`: `sql` for each, then each of `more` (SQL, rows): one
        transaction."""

        def work() -> list[Any]:
            with self._lock:
                if rows is None:
                    return self._db.execute(sql).fetchall()
                with self._db:  # one transaction
                    self._db.execute("BEGIN IMMEDIATE")
                    for statement, values in ((sql, rows), *more):
                        self._db.executemany(statement, values)
                return []

        try:
            return await asyncio.to_thread(work)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"revocation store unavailable: {type(exc).__name__}") from exc

    async def sync(self, held: list[Entry]) -> list[Entry]:
        """Every stored entry (the file is the only copy: nothing was lost that `held` could restore)."""
        entries: list[Entry] = []
        for entry_id, text in await self._run("SELECT id, entry FROM entries"):
            try:
                entries.append(Entry.from_json(text))
            except ValueError:
                log.warning("revocation entry unreadable", extra={"event": "revocation_store", "entry": entry_id})
        return entries

    async def put(self, entries: Iterable[Entry], *, replacing: Iterable[str] = ()) -> None:
        """INSERT OR REPLACE (and DELETE `replacing`) in one fsync'd transaction."""
        rows = [(e.id, e.to_json()) for e in entries]
        if rows:
            gone = [(i,) for i in set(replacing) - {r[0] for r in rows}]
            await self._run("INSERT OR REPLACE INTO entries (id, entry) VALUES (?, ?)", rows, (DELETE_SQL, gone))

    async def delete(self, ids: Iterable[str], *, replicated: bool = False) -> None:
        """DELETE in one fsync'd transaction."""
        rows = [(i,) for i in ids]
        if rows:
            await self._run(DELETE_SQL, rows)

    async def expire(self, ids: Sequence[str]) -> list[str]:
        """Removes them (one host's workers, one clock: the caller's)."""
        await self.delete(ids)
        return list(ids)

    async def subscribe(self) -> None:
        """Notes the file's version, so the first change by another worker is seen."""
        self._version = (await self._run("PRAGMA data_version"))[0][0]

    async def listen(
        self, on_change: Change, on_reconnect: Callable[[], Awaitable[None]], on_lost: Callable[[], None]
    ) -> None:
        """Reloads (`on_reconnect`) whenever another worker committed to the file (a local file: nothing to lose
        but the file itself, which the periodic reload reports)."""
        while True:
            await asyncio.sleep(SQLITE_POLL_SECONDS)
            try:
                version = (await self._run("PRAGMA data_version"))[0][0]
                if version != self._version:
                    await on_reconnect()
                    self._version = version
            except StateUnavailable as exc:
                log.warning("revocation store unreadable", extra={"event": "revocation_store", "error": str(exc)})

    async def close(self) -> None:
        """Closes the file."""
        with self._lock:
            self._db.close()


class RedisStore:
    """Entries in a Redis hash, changes on a pub/sub channel."""

    def __init__(
        self,
        redis: Redis,
        subscriber: Redis,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        replicas: int = 0,
    ) -> None:
        """The root's clients (`verifier.app.redis_client`): `redis` for reads and writes, built with
        `timeout_seconds` per operation; `subscriber`, a connection that blocks on reads by design. `replicas`
        (`state.redis_revocation_replicas`): how many Redis replicas must confirm a `put` (0: none asked)."""
        if replicas < 0:
            raise ValueError("replicas must be at least 0")
        self.replicas = replicas
        self.hash_key = key_prefix + "revocations"
        self.channel = key_prefix + "revocations:changes"
        self._timeout = timeout_seconds
        self._redis = redis
        self._sub_redis = subscriber
        self._pubsub: Any = None
        self._reconnected = False
        self._heard = 0.0  # the loop's time the subscription last heard from Redis
        self._epoch: bytes | None = None  # the hash's epoch at this replica's last reload
        self._version = 0  # the highest `~version` this replica saw (its writes, changes heard, reloads)
        self._tombstones: dict[str, None] = {}  # ids seen deleted (`MAX_TOMBSTONES`), oldest first

    async def _call(self, operation: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(self._timeout * 4):
                return await operation
        except (RedisError, OSError, TimeoutError) as exc:
            raise StateUnavailable(f"revocation store unavailable: {type(exc).__name__}") from exc

    async def sync(self, held: list[Entry]) -> list[Entry]:
        """HGETALL; when the hash lost its epoch (Redis restarted empty) or went back to a version below the highest
        this replica saw (an older snapshot, a replica behind), `held` is written back first."""
        raw: dict[bytes, bytes] = await self._call(self._redis.hgetall(self.hash_key))
        epoch = raw.pop(EPOCH_FIELD, None)
        version = _version(raw.pop(VERSION_FIELD, None))
        lost = epoch is None or (self._epoch is not None and epoch != self._epoch)
        if lost or version < self._version:
            log.warning(
                "revocation store lost its entries; restoring the ones this replica holds"
                if lost
                else "revocation store went back to an older state; restoring the entries this replica holds",
                extra={
                    "event": "revocation_store_restored",
                    "entries": len(held),
                    "version": version,
                    "seen_version": self._version,
                },
            )
            self._seen(await self._call(self._restore(held)))
            raw = await self._call(self._redis.hgetall(self.hash_key))
            epoch = raw.pop(EPOCH_FIELD, None)
            version = _version(raw.pop(VERSION_FIELD, None))
            if epoch is None or version < self._version:  # lost again between the two calls: on the next reload
                raise StateUnavailable("revocation store lost its entries while restoring them")
        self._epoch = epoch
        self._seen(version)
        entries: list[Entry] = []
        for field, value in raw.items():
            try:
                entries.append(Entry.from_json(value))
            except ValueError:
                log.warning("revocation entry unreadable", extra={"event": "revocation_store", "entry": repr(field)})
        return entries

    def _seen(self, version: int, added: Iterable[Entry] = (), removed: Iterable[str] = ()) -> None:
        """Notes a version of the hash, and the entries added and ids deleted by the change that made it."""
        self._version = max(self._version, version)
        for entry in added:
            self._tombstones.pop(entry.id, None)
        for entry_id in removed:
            self._tombstones.pop(entry_id, None)
            self._tombstones[entry_id] = None
        while len(self._tombstones) > MAX_TOMBSTONES:
            del self._tombstones[next(iter(self._tombstones))]

    async def _restore(self, held: list[Entry]) -> int:
        """Writes every held entry back, deletes again the ids seen deleted (`MAX_TOMBSTONES`), sets a new epoch if
        missing, and publishes it all like any write (`WRITE_SCRIPT`): the new version."""
        ids = {e.id for e in held}
        gone = [i for i in self._tombstones if i not in ids]
        return int(await self._script(held, gone, secrets.token_hex(16)))

    async def put(self, entries: Iterable[Entry], *, replacing: Iterable[str] = ()) -> None:
        """HSET (and HDEL `replacing`) and PUBLISH in one MULTI; with `replicas`, then WAIT for them
        (`RevocationNotReplicated`)."""
        batch = list(entries)
        if not batch:
            return
        ids = {e.id for e in batch}
        gone = [i for i in replacing if i not in ids]
        await self._write(batch, gone, replicated=True)

    async def delete(self, ids: Iterable[str], *, replicated: bool = False) -> None:
        """HDEL and PUBLISH in one MULTI; `replicated`, then WAIT as `put` does."""
        batch = list(ids)
        if not batch:
            return
        await self._write([], batch, replicated=replicated)

    async def expire(self, ids: Sequence[str]) -> list[str]:
        """HDEL (and PUBLISH) those of `ids` whose `expires_at` is `EXPIRY_GRACE_SECONDS` past on Redis's clock, in
        one script (`EXPIRE_SCRIPT`): the ones removed."""
        removed: list[str] = []
        for start in range(0, len(ids), EXPIRE_BATCH):  # a replica far ahead names every entry: Redis not held long
            batch = ids[start : start + EXPIRE_BATCH]
            reply = await self._call(
                self._redis.eval(
                    EXPIRE_SCRIPT, 1, self.hash_key, self.channel, repr(EXPIRY_GRACE_SECONDS), self._version, *batch
                )
            )
            removed += (i.decode() if isinstance(i, bytes) else str(i) for i in reply or ())
        return removed

    async def _write(self, added: list[Entry], removed: list[str], *, replicated: bool) -> None:
        if not (replicated and self.replicas):
            self._seen(int(await self._call(self._script(added, removed))), added, removed)
            return
        version, confirmed = await self._call(self._replicated(added, removed))
        self._seen(version, added, removed)
        if confirmed < self.replicas:
            raise RevocationNotReplicated(
                f"revocation written to the Redis primary but confirmed by {confirmed} of {self.replicas} replicas",
                replicas=self.replicas,
                confirmed=confirmed,
            )

    def _script_args(self, added: list[Entry], removed: list[str], epoch: str) -> list[Any]:
        """`WRITE_SCRIPT`'s keys and arguments (the count of keys first)."""
        change: dict[str, Any] = {"add": [json.loads(e.to_json()) for e in added]}
        if removed:
            change["remove"] = removed
        pairs = [text for e in added for text in (e.id, e.to_json())]
        return [1, self.hash_key, self.channel, self._version, epoch, json.dumps(change), len(added), *pairs, *removed]

    async def _script(self, added: list[Entry], removed: list[str], epoch: str = "") -> Any:
        """`WRITE_SCRIPT`: the new version; `epoch`, a restore's (never refused)."""
        return await self._redis.eval(WRITE_SCRIPT, *self._script_args(added, removed, epoch))

    async def _replicated(self, added: list[Entry], removed: list[str]) -> tuple[int, int]:
        """`WRITE_SCRIPT`, then `WAIT replicas REPLICA_WAIT_SECONDS`, sent together on one connection (WAIT counts
        the replicas that have this connection's writes): the new version and the replicas that confirmed."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.eval(WRITE_SCRIPT, *self._script_args(added, removed, ""))
            pipe.execute_command("WAIT", self.replicas, int(REPLICA_WAIT_SECONDS * 1000))
            version, confirmed = await pipe.execute()
        return int(version), int(confirmed)

    async def subscribe(self) -> None:
        """SUBSCRIBE on a dedicated connection; raises `StateUnavailable`."""
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
        self._pubsub = self._sub_redis.pubsub(ignore_subscribe_messages=True)
        await self._call(self._pubsub.subscribe(self.channel))
        # redis-py reconnects and resubscribes a broken subscription by itself, silently: changes
        # published meanwhile are gone, so every reconnect is flagged and followed by a full reload.
        connection = self._pubsub.connection
        if connection is not None:
            connection.register_connect_callback(self._connected)
        self._reconnected = False
        self._heard = asyncio.get_running_loop().time()

    async def _connected(self, connection: Any) -> None:
        self._reconnected = True

    async def listen(
        self, on_change: Change, on_reconnect: Callable[[], Awaitable[None]], on_lost: Callable[[], None]
    ) -> None:
        """Applies published changes; a PING after each silent poll proves the connection alive. A subscription
        broken, refused or silent for `SUBSCRIPTION_SILENCE_SECONDS` is `on_lost()` at once, then resubscribed
        (backing off), then `on_reconnect()`."""
        delay = RECONNECT_MIN_SECONDS
        loop = asyncio.get_running_loop()
        while True:
            try:
                if self._pubsub is None:
                    await self.subscribe()
                    await on_reconnect()
                message = await self._pubsub.get_message(timeout=LISTEN_POLL_SECONDS)
                delay = RECONNECT_MIN_SECONDS
                if self._reconnected:
                    self._reconnected = False
                    await on_reconnect()
                if message is not None:
                    self._heard = loop.time()
                elif loop.time() - self._heard >= SUBSCRIPTION_SILENCE_SECONDS:
                    raise ConnectionError(f"no answer from Redis for {SUBSCRIPTION_SILENCE_SECONDS:g} s")
                else:
                    await self._pubsub.ping(HEARTBEAT)  # its PONG comes back as a message of its own
            except (RedisError, OSError, StateUnavailable) as exc:
                on_lost()
                log.warning(
                    "revocation subscription lost",
                    extra={"event": "revocation_store", "error": type(exc).__name__, "detail": str(exc)[:200]},
                )
                if self._pubsub is not None:
                    pubsub, self._pubsub = self._pubsub, None
                    with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
                        await asyncio.wait_for(pubsub.aclose(), self._timeout)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                continue
            if message is None or message.get("type") != "message":
                continue
            version, added, removed, lifted = _decode(message.get("data"))
            self._seen(version, added, lifted)
            if added or removed:
                on_change(added, removed)

    async def close(self) -> None:
        """Closes both connection pools."""
        with contextlib.suppress(RedisError, OSError):
            if self._pubsub is not None:
                await self._pubsub.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._sub_redis.aclose()
        with contextlib.suppress(RedisError, OSError):
            await self._redis.aclose()


def _version(raw: bytes | None) -> int:
    """The hash's `~version` (0 when missing or unreadable)."""
    try:
        return int(raw) if raw is not None else 0
    except ValueError:
        return 0


def _decode(data: Any) -> tuple[int, list[Entry], list[str], list[str]]:
    """A published change: its version, the entries added, the ids removed, and of those the ones deleted (not
    expired)."""
    try:
        document = json.loads(data)
        version = int(document.get("version", 0))
        added = [Entry.from_json(json.dumps(item)) for item in document.get("add", [])]
        lifted = [str(i) for i in document.get("remove", [])]
        removed = lifted + [str(i) for i in document.get("expired", [])]
    except (ValueError, TypeError, AttributeError):
        log.warning("revocation change unreadable", extra={"event": "revocation_store"})
        return 0, [], [], []
    return version, added, removed, lifted
