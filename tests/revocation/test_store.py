"""verifier.revocation.store.SqliteStore: the local durable store used without Redis (#18 F9)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from support import file_modes, opened_together

from verifier import private_files
from verifier.errors import StateUnavailable
from verifier.revocation.entry import Effect, Entry, KeyKind, Match, SubjectKey
from verifier.revocation.store import SQLITE_FILE, SqliteStore


def entry(entry_id: str, sub: str = "user-1") -> Entry:
    return Entry(id=entry_id, key=SubjectKey(KeyKind.ISS_SUB, sub, "https://idp.example.test"),
                 effect=Effect.ACCOUNT_DISABLED, match=Match.ALL, event_time=time.time(), expires_at=None,
                 source="operator", event="operator")


async def test_entries_outlive_the_store_that_wrote_them(tmp_path: Path) -> None:
    first = SqliteStore(str(tmp_path))
    await first.put([entry("op-1"), entry("op-2", "user-2")])
    await first.delete(["op-2"])
    await first.close()
    second = SqliteStore(str(tmp_path))
    try:
        assert [e.id for e in await second.sync([])] == ["op-1"]
    finally:
        await second.close()


async def test_a_put_replacing_entries_removes_them_in_the_same_transaction(tmp_path: Path) -> None:
    """The kill switch's entry posted again takes the old one's place: one write, never both nor neither."""
    store = SqliteStore(str(tmp_path))
    try:
        await store.put([entry("op-old"), entry("op-other", "user-2")])
        await store.put([entry("op-new")], replacing=["op-old", "op-new"])  # its own id is never removed
        assert sorted(e.id for e in await store.sync([])) == ["op-new", "op-other"]
    finally:
        await store.close()


async def test_every_commit_is_fsynced(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path))
    try:
        assert (await store._run("PRAGMA synchronous"))[0][0] == 2  # FULL: fsync before put() returns
        assert (await store._run("PRAGMA journal_mode"))[0][0] == "wal"
    finally:
        await store.close()


async def test_another_workers_write_is_picked_up_by_polling(tmp_path: Path) -> None:
    """During a SIGHUP reload the old worker keeps writing while the new one already loaded."""
    old, new = SqliteStore(str(tmp_path)), SqliteStore(str(tmp_path))
    reloads: list[int] = []

    async def reload() -> None:
        reloads.append(len(await new.sync([])))

    await new.subscribe()
    listener = asyncio.ensure_future(new.listen(lambda added, removed: None, reload, lambda: None))
    try:
        await old.put([entry("op-late")])
        for _ in range(100):
            if reloads:
                break
            await asyncio.sleep(0.02)
        assert reloads == [1]
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        await old.close()
        await new.close()


async def test_an_unreadable_row_is_skipped_not_fatal(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path))
    await store.put([entry("op-1")])
    with sqlite3.connect(tmp_path / SQLITE_FILE) as raw:
        raw.execute("INSERT INTO entries (id, entry) VALUES ('bad', '{\"id\": 1}')")
        raw.execute("INSERT INTO entries (id, entry) VALUES ('huge', ?)",
                    (entry("huge").to_json().replace('"event_time":', '"event_time":1' + "0" * 400 + ',"x":'),))
    try:
        assert [e.id for e in await store.sync([])] == ["op-1"]
    finally:
        await store.close()


async def test_the_file_and_its_wal_are_private_to_the_verifier_user(tmp_path: Path) -> None:
    """Entries name subjects and e-mail addresses: never readable by another local user, whatever the umask
    (and a file an older version left 0644 is narrowed when opened)."""
    (tmp_path / f"{SQLITE_FILE}-wal").write_bytes(b"")
    (tmp_path / f"{SQLITE_FILE}-wal").chmod(0o644)
    previous = os.umask(0o022)
    try:
        store = SqliteStore(str(tmp_path))
        await store.put([entry("op-1", "alice@example.test")])
    finally:
        os.umask(previous)
    try:
        modes = file_modes(tmp_path)
        assert SQLITE_FILE in modes and modes == dict.fromkeys(modes, 0o600)
    finally:
        await store.close()


async def test_workers_opening_a_new_file_together_wait_for_the_one_making_it(tmp_path: Path) -> None:
    """`verifier serve --workers N` starts its workers together, each opening the file; a journal-mode change meeting
    the lock of the worker making it was refused at once ("database is locked", whatever the busy timeout), and that
    worker's start-up failed. Each waits instead (`private_files.OPEN_SECONDS`), and they all share one file."""
    stores = opened_together(tmp_path / SQLITE_FILE, lambda: SqliteStore(str(tmp_path)))
    try:
        await stores[0].put([entry("op-1")])
        for store in stores:
            assert [e.id for e in await store.sync([])] == ["op-1"]
    finally:
        for store in stores:
            await store.close()


def test_a_file_still_locked_after_the_start_up_wait_fails_start_up(tmp_path: Path, monkeypatch: Any) -> None:
    """Fail closed: a worker never runs without its revocation entries."""
    monkeypatch.setattr(private_files, "OPEN_SECONDS", 0.2)
    holder = sqlite3.connect(tmp_path / SQLITE_FILE, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StateUnavailable, match=r"revocation store .* unusable: database is locked, still after"):
            SqliteStore(str(tmp_path))
    finally:
        holder.close()
