"""Files the verifier writes are its user's alone (0600), whatever the umask.

The SQLite stores hold revocation entries (subjects, e-mail addresses), replay keys and WebAuthn
credentials: with the usual umask 022 they were created 0644, readable by every local user. SQLite
gives a database's `-wal` and `-shm` files its mode when it creates them; ones an older version left
behind are narrowed here too.
"""

from __future__ import annotations

import contextlib
import os

PRIVATE_MODE = 0o600
SQLITE_COMPANIONS = ("", "-wal", "-shm", "-journal")


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
