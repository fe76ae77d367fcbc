"""Files the verifier writes are its user's alone (0600), whatever the umask; the private keys it reads should be.

The SQLite stores hold revocation entries (subjects, e-mail addresses), replay keys and WebAuthn
credentials: with the usual umask 022 they were created 0644, readable by every local user. SQLite
gives a database's `-wal` and `-shm` files its mode when it creates them; ones an older version left
behind are narrowed here too.

The private keys the settings name (a listener's `tls.key_file`, the identity assertion's and the
introspection client's `private_key_file`) are the operator's files: the verifier only says when others
can read one (`exposed_mode`), and refuses it only when told to (`readable_key_files: refuse`), because a
Kubernetes Secret volume is 0644 unless its `defaultMode` says otherwise.

The SQLite stores open their files here (`open_sqlite`), made private first. The workers of `verifier serve
--workers N` open the same files at once at start-up, and a journal-mode change that meets another worker's lock on
a new file is refused at once ("database is locked"), whatever the busy timeout: the opening is tried again for up
to OPEN_SECONDS, and start-up fails after that: a worker never runs without its store.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Callable

PRIVATE_MODE = 0o600
SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")
REVOCATIONS_FILE = "revocations.sqlite3"  # in `state.path`: revocation entries
REPLAY_FILE = "replay.sqlite3"  # in `state.path`: replay keys
# Permission bits of a private key file that let users other than its owner read or change it. Group read is
# allowed when root owns the file (PostgreSQL's rule for ssl_key_file): an administrator granted that group
# the key on purpose (Debian's ssl-cert; Kubernetes' fsGroup with a Secret's `defaultMode: 0440`).
EXPOSING_BITS = 0o077
ROOT_OWNED_EXPOSING_BITS = 0o037
# Opening a SQLite file (start-up) waits this long for the other workers opening it at the same time: each changes
# its journal mode and creates its schema under the write lock, which a loaded host holds for longer than a store's
# busy timeout, and a journal-mode change that meets another's lock on a new file is refused without waiting.
OPEN_SECONDS = 10.0
OPEN_RETRY_SECONDS = 0.05
_LOCKED = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # "database is locked", "database table is locked"


def sqlite_problem(path: str) -> str:
    """Why a worker could not open the SQLite file `path` (with its -wal/-shm/-journal), or "".

    Checked when the configuration is loaded, so `check-config`, `serve` and SIGHUP refuse it by name
    instead of every worker crashing on it at start. A symbolic link, or a file another user owns, is
    refused too: in a directory others can write (state.path: /tmp, an emptyDir), someone else could have
    made it, and would then read and rewrite the revocation entries or replay keys (chmod 0600 follows a
    link). A file that is there but not SQLite is found only when it is opened.
    """
    for suffix in SQLITE_COMPANIONS:
        file = path + suffix
        try:
            found = os.lstat(file)
        except OSError:  # not there (or its directory is not: the caller's directory check names that)
            continue
        if stat.S_ISLNK(found.st_mode):  # whoever could write the directory chose where the store goes
            return f"{file!r} is a symbolic link: name the file itself"
        if not stat.S_ISREG(found.st_mode) or not os.access(file, os.R_OK | os.W_OK):
            return f"{file!r} is there but is not a file this user can read and write"
        if found.st_uid != os.geteuid():  # another user made it: they can rewrite the entries (lift a kill switch)
            return f"{file!r} belongs to another user (uid {found.st_uid}): the verifier's own files only"
    return ""


def private_sqlite(path: str) -> str:
    """Creates the SQLite file `path` 0600 if missing, and narrows it and its companions to 0600; returns `path`.

    `:memory:` is left alone. An OSError (a directory that does not exist) is left to `sqlite3.connect`.
    """
    if path == ":memory:" or path.startswith("file:"):
        return path
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_MODE))
    for suffix in SQLITE_COMPANIONS:
        with contextlib.suppress(OSError):
            os.chmod(path + suffix, PRIVATE_MODE)
    return path


def open_sqlite(path: str, prepare: Callable[[sqlite3.Connection], None], *, busy_seconds: float) -> sqlite3.Connection:
    """The SQLite file `path` (`private_sqlite`), connected in autocommit mode for any thread, each statement waiting
    `busy_seconds` for another connection's lock, once `prepare` (journal mode, schema) has run on it.

    A lock met while opening or preparing (another worker opening the file) is waited out, trying again every
    OPEN_RETRY_SECONDS, for OPEN_SECONDS; then, or on any other error, the connection is closed and the
    `sqlite3.Error` raised (the store's `StateUnavailable`: its worker does not start).
    """
    deadline = time.monotonic() + OPEN_SECONDS
    while True:
        db = sqlite3.connect(private_sqlite(path), isolation_level=None, check_same_thread=False, timeout=busy_seconds)
        try:
            prepare(db)
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _LOCKED:  # none: raised by Python code
                raise
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError(f"{exc}, still after {OPEN_SECONDS:g} s") from exc
            time.sleep(OPEN_RETRY_SECONDS)
        except BaseException:
            db.close()
            raise


def exposed_mode(path: str) -> int | None:
    """The permission bits of the private key file `path` when users other than its owner may read or change
    it (see EXPOSING_BITS), else None; None too when it cannot be looked at (its reader names that).

    The link is followed: a Kubernetes Secret's file is a link into the volume's current data, whose mode counts.
    """
    try:
        found = os.stat(path)
    except OSError:
        return None
    mode = stat.S_IMODE(found.st_mode)
    exposing = ROOT_OWNED_EXPOSING_BITS if found.st_uid == 0 else EXPOSING_BITS
    return mode if mode & exposing else None
