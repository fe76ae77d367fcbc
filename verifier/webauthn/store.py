"""The credential registry: WebAuthn credentials per user (issuer and subject), behind `CredentialStore`.

`SqliteCredentialStore` is the default: one SQLite file (stdlib `sqlite3`), every call run in a worker
thread (`asyncio.to_thread`) so the event loop never waits on the disk. The interface is small on
purpose, so a PostgreSQL or Redis store can sit behind it for several replicas. The sign counter is
updated with a compare-and-set (WebAuthn Level 3 section 6.1.1), so two replicas racing on the same
assertion cannot both move it. A store that cannot answer raises `StateUnavailable` (fail closed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Protocol, TypeVar

from verifier.errors import StateUnavailable
from verifier.private_files import open_sqlite

_T = TypeVar("_T")
BUSY_SECONDS = 5.0  # a statement waits this long for another worker's write, then `StateUnavailable`


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StoredCredential:
    """One registered credential. `credential_id` is raw bytes; base64url wherever it leaves us."""

    credential_id: bytes
    issuer: str
    subject: str
    public_key: bytes  # the COSE_Key, CBOR-encoded (WebAuthn Level 3 section 6.5.1.1)
    sign_count: int
    aaguid: bytes
    transports: tuple[str, ...] = ()
    name: str = ""
    attestation_format: str = "none"
    user_verified: bool = False  # UV at registration
    backup_eligible: bool = False
    created_at: float = 0.0  # epoch seconds
    last_used_at: float | None = None
    disabled: bool = False
    disabled_at: float | None = None  # epoch seconds (this verifier's clock) of the revocation that disabled it


class DuplicateCredential(Exception):
    """The credential id is registered already (to this user or another)."""


class CredentialStore(Protocol):
    """Where credentials live; every method is safe to call concurrently."""

    async def add(self, credential: StoredCredential) -> None:
        """Stores a new credential; raises `DuplicateCredential` if its id is taken."""
        ...

    async def get(self, credential_id: bytes) -> StoredCredential | None:
        """The credential with this id, whoever owns it."""
        ...

    async def for_user(self, issuer: str, subject: str) -> list[StoredCredential]:
        """A user's credentials, oldest first (disabled ones included)."""
        ...

    async def delete(self, issuer: str, subject: str, credential_id: bytes) -> bool:
        """Removes one of the user's credentials; False when the user has no such credential."""
        ...

    async def disable(self, issuer: str, subject: str, credential_ids: list[bytes] | None, *, at: float) -> int:
        """Disables the listed credentials of the user (None: all of them) as of `at` (epoch seconds: their
        `disabled_at`; one disabled already keeps its own); returns how many."""
        ...

    async def use(self, credential_id: bytes, *, old_count: int, new_count: int, used_at: float) -> bool:
        """Records a use: sets the counter to `new_count` only if it is still `old_count` (compare-and-set)."""
        ...

    async def close(self) -> None:
        """Releases the store."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS webauthn_credentials (
    credential_id BLOB PRIMARY KEY,
    issuer TEXT NOT NULL,
    subject TEXT NOT NULL,
    public_key BLOB NOT NULL,
    sign_count INTEGER NOT NULL,
    aaguid BLOB NOT NULL,
    transports TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL DEFAULT '',
    attestation_format TEXT NOT NULL DEFAULT 'none',
    user_verified INTEGER NOT NULL DEFAULT 0,
    backup_eligible INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    last_used_at REAL,
    disabled INTEGER NOT NULL DEFAULT 0,
    disabled_at REAL
);
CREATE INDEX IF NOT EXISTS webauthn_credentials_user ON webauthn_credentials (issuer, subject);
"""
_COLUMNS = (
    "credential_id, issuer, subject, public_key, sign_count, aaguid, transports, name, attestation_format, "
    "user_verified, backup_eligible, created_at, last_used_at, disabled, disabled_at"
)
# A file from before `disabled_at`: the column is added on open, and a credential disabled then is taken as
# disabled at that moment (when is unknown; erring late only asks its user for a fresher login to enroll again).
_UPGRADE = (
    "ALTER TABLE webauthn_credentials ADD COLUMN disabled_at REAL",
    "UPDATE webauthn_credentials SET disabled_at = ? WHERE disabled = 1 AND disabled_at IS NULL",
)


def _row(row: tuple[object, ...]) -> StoredCredential:
    (cid, issuer, subject, key, count, aaguid, transports, name, fmt, uv, be, created, used, disabled, at) = row
    return StoredCredential(
        credential_id=bytes(cid),  # type: ignore[call-overload]
        issuer=str(issuer),
        subject=str(subject),
        public_key=bytes(key),  # type: ignore[call-overload]
        sign_count=int(count),  # type: ignore[call-overload]
        aaguid=bytes(aaguid),  # type: ignore[call-overload]
        transports=tuple(t for t in str(transports).split(",") if t),
        name=str(name),
        attestation_format=str(fmt),
        user_verified=bool(uv),
        backup_eligible=bool(be),
        created_at=float(created),  # type: ignore[arg-type]
        last_used_at=None if used is None else float(used),  # type: ignore[arg-type]
        disabled=bool(disabled),
        disabled_at=None if at is None else float(at),  # type: ignore[arg-type]
    )


class SqliteCredentialStore:
    """A `CredentialStore` in one SQLite file (or `:memory:` for tests), off the event loop."""

    def __init__(self, path: str, *, now: Callable[[], float] = time.time) -> None:
        """`now`: the time a credential disabled in a file from before `disabled_at` is taken as disabled at."""

        def prepare(db: sqlite3.Connection) -> None:
            if path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
            with db:  # one transaction: a replica opening the file beside sees all or none
                db.execute("BEGIN IMMEDIATE")
                columns = [row[1] for row in db.execute("PRAGMA table_info(webauthn_credentials)")]
                if columns and "disabled_at" not in columns:
                    db.execute(_UPGRADE[0])
                    db.execute(_UPGRADE[1], (now(),))
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)

        # One connection shared by the worker threads, serialized by a lock: SQLite allows one writer
        # anyway, and `:memory:` exists only inside its one connection. The other workers opening the file at
        # start-up are waited for (OPEN_SECONDS), then it fails.
        try:
            self._db = open_sqlite(path, prepare, busy_seconds=BUSY_SECONDS)
        except sqlite3.Error as exc:
            raise StateUnavailable(f"credential store {path} unusable: {exc}") from exc
        self._lock = threading.Lock()

    async def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        def locked() -> _T:
            with self._lock:
                return work(self._db)

        try:
            return await asyncio.to_thread(locked)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:  # a locked, full or broken database: we cannot decide, fail closed
            raise StateUnavailable(f"credential store unavailable: {type(exc).__name__}") from exc

    async def add(self, credential: StoredCredential) -> None:
        """Stores a new credential; raises `DuplicateCredential` if its id is taken."""
        c = credential
        values = (
            c.credential_id,
            c.issuer,
            c.subject,
            c.public_key,
            c.sign_count,
            c.aaguid,
            ",".join(c.transports),
            c.name,
            c.attestation_format,
            int(c.user_verified),
            int(c.backup_eligible),
            c.created_at,
            c.last_used_at,
            int(c.disabled),
            c.disabled_at,
        )

        def insert(db: sqlite3.Connection) -> None:
            db.execute(f"INSERT INTO webauthn_credentials ({_COLUMNS}) VALUES ({', '.join('?' * 15)})", values)  # noqa: S608

        try:
            await self._run(insert)
        except sqlite3.IntegrityError as exc:
            raise DuplicateCredential("credential id already registered") from exc

    async def get(self, credential_id: bytes) -> StoredCredential | None:
        """The credential with this id, whoever owns it."""

        def select(db: sqlite3.Connection) -> StoredCredential | None:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM webauthn_credentials WHERE credential_id = ?",  # noqa: S608
                (credential_id,),
            ).fetchone()
            return None if row is None else _row(row)

        return await self._run(select)

    async def for_user(self, issuer: str, subject: str) -> list[StoredCredential]:
        """A user's credentials, oldest first (disabled ones included)."""

        def select(db: sqlite3.Connection) -> list[StoredCredential]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM webauthn_credentials WHERE issuer = ? AND subject = ? "  # noqa: S608
                "ORDER BY created_at, credential_id",
                (issuer, subject),
            ).fetchall()
            return [_row(r) for r in rows]

        return await self._run(select)

    async def delete(self, issuer: str, subject: str, credential_id: bytes) -> bool:
        """Removes one of the user's credentials; False when the user has no such credential."""

        def remove(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "DELETE FROM webauthn_credentials WHERE issuer = ? AND subject = ? AND credential_id = ?",
                (issuer, subject, credential_id),
            )
            return cursor.rowcount > 0

        return await self._run(remove)

    async def disable(self, issuer: str, subject: str, credential_ids: list[bytes] | None, *, at: float) -> int:
        """Disables the listed credentials of the user (None: all of them) as of `at` (epoch seconds: their
        `disabled_at`; one disabled already keeps its own); returns how many."""

        def update(db: sqlite3.Connection) -> int:
            if credential_ids is None:
                return db.execute(
                    "UPDATE webauthn_credentials SET disabled = 1, disabled_at = ? "
                    "WHERE issuer = ? AND subject = ? AND disabled = 0",
                    (at, issuer, subject),
                ).rowcount
            count = 0
            for cid in credential_ids:
                count += db.execute(
                    "UPDATE webauthn_credentials SET disabled = 1, disabled_at = ? "
                    "WHERE issuer = ? AND subject = ? AND credential_id = ? AND disabled = 0",
                    (at, issuer, subject, cid),
                ).rowcount
            return count

        return await self._run(update)

    async def use(self, credential_id: bytes, *, old_count: int, new_count: int, used_at: float) -> bool:
        """Records a use: sets the counter to `new_count` only if it is still `old_count` (compare-and-set)."""

        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE webauthn_credentials SET sign_count = ?, last_used_at = ? "
                "WHERE credential_id = ? AND sign_count = ? AND disabled = 0",
                (new_count, used_at, credential_id, old_count),
            )
            return cursor.rowcount == 1

        return await self._run(update)

    async def close(self) -> None:
        """Closes the database."""

        def shut(db: sqlite3.Connection) -> None:
            db.close()

        await self._run(shut)
