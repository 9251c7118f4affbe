"""The embedded store's idempotency keys live in search.db, derived from the log (cid_index.py).

A repeated cid answers with its original event however long ago it was sent: while the writer
still holds its key, once the index consumer took it over, after the index lost transactions or
was deleted, and in a data directory written before the keys moved (a schema migration).

search.db is written without fsync, so it records the boot it is open in: one left open by
another boot (the machine went down) or unreadable is rebuilt from the log at start; one left
open by a crashed process of this boot is kept (the kernel held its writes).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
import trio
import trio_asyncio
from test_store_contract import LIMITS, Recorder, append, item, room, seqs, submit, tenant

from node.errors import UNAVAILABLE, GB6Error
from origin import sqlite_store
from origin.sqlite_store import SqliteStore


def _indexed_keys(data: Path) -> set[tuple[str, str, str]]:
    conn = sqlite3.connect(str(data / "search.db"))
    try:
        return set(conn.execute("SELECT room, sender, cid FROM cids").fetchall())
    finally:
        conn.close()


def _lose_index(data: Path) -> None:
    for name in ("search.db", "search.db-wal", "search.db-shm"):
        (data / name).unlink(missing_ok=True)


async def _until_indexed(data: Path, *keys: tuple[str, str, str]) -> None:
    with trio.fail_after(10):
        while not set(keys) <= _indexed_keys(data):  # noqa: ASYNC110 - another thread writes it
            await trio.sleep(0.02)


async def test_repeats_are_found_once_the_index_holds_their_keys(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gb6.db", LIMITS, Recorder())
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(store.run)
        t = await tenant(store)
        r = await room(store, t)
        a = await append(store, item(r, t.alice, "a"))
        await _until_indexed(tmp_path, (r, t.alice, "a"))
        # The writer forgets a key the index holds (at its next batch): the index answers.
        again = await append(store, item(r, t.alice, "a", body={"text": "other"}))
        assert again.duplicate and again.event == a.event
        # A second key, indexed after that lookup: a later lookup sees it (no stale snapshot).
        b = await append(store, item(r, t.alice, "b"))
        await _until_indexed(tmp_path, (r, t.alice, "b"))
        await append(store, item(r, t.bob, "c"))  # a batch after the index took "b"
        assert (await append(store, item(r, t.alice, "b"))).event == b.event
        assert await store.event_by_cid(r, t.alice, "b") == b.event
        assert await store.event_by_cid(r, t.bob, "c") is not None  # a key the writer holds
        assert await store.event_by_cid(r, t.bob, "a") is None
        assert seqs(await store.events_after(r, 0, 100)) == [1, 2, 3]
        nursery.cancel_scope.cancel()


async def test_a_lost_index_is_rebuilt_from_the_log_before_the_first_send(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gb6.db", LIMITS, Recorder())
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(store.run)
        t = await tenant(store)
        r = await room(store, t)
        sent = [await append(store, item(r, t.alice, f"m{i}")) for i in range(20)]
        nursery.cancel_scope.cancel()
    _lose_index(tmp_path)

    reopened = SqliteStore(tmp_path / "gb6.db", LIMITS, Recorder())
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reopened.run)
        assert len(_indexed_keys(tmp_path)) == 20  # before anything was sent
        for i in (0, 7, 19):
            again = await append(reopened, item(r, t.alice, f"m{i}"))
            assert again.duplicate and again.event == sent[i].event
        assert (await append(reopened, item(r, t.alice, "new"))).event.seq == 21
        with trio.fail_after(10):  # the full-text index is rebuilt too
            assert [e.seq for e in await reopened.search([r], "m7", 10)] == [8]
        nursery.cancel_scope.cancel()


async def test_a_data_directory_from_before_the_move_keeps_its_keys(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "gb6.db", LIMITS, Recorder())
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(store.run)
        t = await tenant(store)
        r = await room(store, t)
        sent = [await append(store, item(r, t.alice, f"m{i}")) for i in range(5)]
        nursery.cancel_scope.cancel()
    # Put the log back as schema 3 left it: the key index in the events table, no search.db.
    conn = sqlite3.connect(str(tmp_path / "gb6.db"), isolation_level=None)
    conn.executescript(
        """
        BEGIN;
        CREATE TABLE old_events(
            id INTEGER PRIMARY KEY, room TEXT NOT NULL, seq INTEGER NOT NULL,
            ts INTEGER NOT NULL, type TEXT NOT NULL, sender TEXT NOT NULL, cid TEXT NOT NULL,
            body BLOB, thread INTEGER, target INTEGER, emoji TEXT,
            deleted INTEGER NOT NULL DEFAULT 0, current BLOB, edited INTEGER,
            UNIQUE(room, seq), UNIQUE(room, sender, cid));
        INSERT INTO old_events SELECT * FROM events;
        DROP TABLE events;
        ALTER TABLE old_events RENAME TO events;
        PRAGMA user_version=3;
        COMMIT;
        """
    )
    conn.close()
    _lose_index(tmp_path)

    reopened = SqliteStore(tmp_path / "gb6.db", LIMITS, Recorder())
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reopened.run)
        assert await reopened.events_after(r, 0, 100) == [s.event for s in sent]
        again = await append(reopened, item(r, t.alice, "m3"))
        assert again.duplicate and again.event == sent[3].event
        assert (await append(reopened, item(r, t.alice, "m5"))).event.seq == 6
        nursery.cancel_scope.cancel()
    conn = sqlite3.connect(str(tmp_path / "gb6.db"))
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name='events'").fetchone()
    conn.close()
    assert "cid)" not in sql.replace(" ", "")  # the log no longer indexes keys


async def test_sends_are_refused_while_the_index_is_too_far_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_MAX_RECENT_KEYS", 5)
    store = SqliteStore(tmp_path / "gb6.db", LIMITS, Recorder())
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(store.run)
        t = await tenant(store)
        r = await room(store, t)
        running = threading.Event()

        def slow(_conn: object) -> None:
            running.set()
            time.sleep(0.3)

        nursery.start_soon(store.write, slow)  # the ten sends below queue up into one batch
        await trio.to_thread.run_sync(running.wait)
        pending = [await submit(store, item(r, t.alice, f"m{i}")) for i in range(10)]
        with trio.fail_after(10):
            await store.wait_idle()
        got = [p() for p in pending]
        assert [g.unwrap().event.seq for g in got[:5]] == [1, 2, 3, 4, 5]
        for g in got[5:]:
            with pytest.raises(GB6Error) as refused:
                g.unwrap()
            assert refused.value.code == UNAVAILABLE
        # Once the index has caught up, the refused sends go through, and repeats still dedup.
        await _until_indexed(tmp_path, *((r, t.alice, f"m{i}") for i in range(5)))
        retried = [await append(store, item(r, t.alice, f"m{i}")) for i in range(10)]
        assert [a.duplicate for a in retried] == [True] * 5 + [False] * 5
        assert seqs(await store.events_after(r, 0, 100)) == list(range(1, 11))
        nursery.cancel_scope.cancel()


def _boot_record(data: Path) -> list[str]:
    conn = sqlite3.connect(str(data / "search.db"))
    try:
        return [row[0] for row in conn.execute("SELECT boot FROM opened")]
    finally:
        conn.close()


def _mark(data: Path, boot: str) -> None:
    """As a process of `boot` would leave search.db, with a table that shows a rebuild."""
    conn = sqlite3.connect(str(data / "search.db"), isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS marker(x)")
    conn.execute("DELETE FROM opened")
    conn.execute("INSERT INTO opened VALUES (?)", (boot,))
    conn.close()


def _has_marker(data: Path) -> bool:
    conn = sqlite3.connect(str(data / "search.db"))
    try:
        return (
            conn.execute("SELECT 1 FROM sqlite_master WHERE name='marker'").fetchone() is not None
        )
    finally:
        conn.close()


_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@pytest.mark.skipif(not _BOOT_ID.exists(), reason="no boot id: search.db is fsynced instead")
async def test_an_index_left_open_by_another_boot_is_rebuilt(tmp_path: Path) -> None:
    boot = await trio.Path(_BOOT_ID).read_text()
    boot = boot.strip()
    store = SqliteStore(tmp_path / "gb6.db", LIMITS, Recorder())
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert _boot_record(tmp_path) == [boot]  # recorded while open
        t = await tenant(store)
        r = await room(store, t)
        sent = [await append(store, item(r, t.alice, f"word{i}")) for i in range(5)]
        nursery.cancel_scope.cancel()
    assert _boot_record(tmp_path) == []  # a clean stop erases it

    for left_by, rebuilt in ((boot, False), ("another-boot", True), (None, True)):
        if left_by is None:  # not a database at all
            for name in ("search.db-wal", "search.db-shm"):
                (tmp_path / name).unlink(missing_ok=True)
            (tmp_path / "search.db").write_bytes(b"\x00garbage" * 500)
        else:
            _mark(tmp_path, left_by)
        reopened = SqliteStore(tmp_path / "gb6.db", LIMITS, Recorder())
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            await nursery.start(reopened.run)
            assert (left_by is not None and _has_marker(tmp_path)) is not rebuilt, left_by
            assert _boot_record(tmp_path) == [boot]
            again = await append(reopened, item(r, t.alice, "word3"))
            assert again.duplicate and again.event == sent[3].event
            with trio.fail_after(10):
                assert [e.seq for e in await reopened.search([r], "word2", 10)] == [3]
            nursery.cancel_scope.cancel()
