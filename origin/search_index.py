"""The log's derived indexes: full-text and idempotency keys (cid_index.py), in `search.db`.

A consumer of the log with its own offsets, in a database of its own.

The index is derived data, so it stays off the commit path (DESIGN §3.5): the writer commits
messages to the log and only nudges this consumer, whose thread reads the new events, applies
them to an FTS5 table in `search.db`, and stores how far it got in the same transaction. A
crash loses at most its newest transactions, index and offset together, and the next start
carries on from the offset; a deleted `search.db` is rebuilt from the log.

`search.db` is written without fsync (`synchronous=OFF`): its checkpoints' fsyncs made the log's
commits wait on the disk (store p99 11 vs 8.7 ms at 2,000 appends/s). A process crash cannot
damage such a database (the kernel holds every write); only an OS crash or a power cut can. So
`open` records the boot (Linux's boot id, fsynced) and `stop` erases it after a checkpoint that
does fsync: a record of another boot means the machine went down with the index open, and the
index is rebuilt from the log. Where the boot id is unknown, `search.db` is fsynced as before
(`synchronous=NORMAL`).

Searches read their own writes: `caught_up(id)` waits until everything up to the newest event a
search could see has been indexed (the search bounds the wait, then answers from what is
indexed).
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Final

import orjson
import trio

from node.log import log
from origin import cid_index

_BOOT_ID: Final = Path("/proc/sys/kernel/random/boot_id")
_BATCH: Final = 5000  # events per index transaction
_GATHER_S: Final = 0.1  # how long new events gather before a pass, when no search waits
_SCHEMA: Final = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS events_fts"
    " USING fts5(text, tokenize='unicode61 remove_diacritics 2')",
    "CREATE TABLE IF NOT EXISTS progress(id INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS opened(boot TEXT NOT NULL)",  # see the module docstring
)


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def _text(body: bytes | None) -> str | None:
    """An edit's new text; None for a body with none (or not an object: never stored so)."""
    try:
        value = orjson.loads(body) if body is not None else None
    except orjson.JSONDecodeError:
        return None
    text = value.get("text") if isinstance(value, dict) else None
    return text if isinstance(text, str) and text else None


class SearchIndex:
    """Owns `search.db` and the thread that feeds it. `start` and `stop` belong to the store."""

    def __init__(self, path: Path, log_path: Path) -> None:
        self.path = path
        self._log_path = log_path
        self._wake = threading.Event()
        self._searching = threading.Event()  # a search waits for the index
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._indexed = 0  # Trio side: the newest event id known to be indexed
        # The newest event id whose key is committed to `cids`: set by the thread (or by
        # `catch_up_keys`), read by the store's writer thread to forget the keys it holds.
        self.keys_indexed = 0
        self._waiters: list[tuple[int, trio.Event]] = []
        self._boot = _boot_id()

    def open(self) -> int:
        """Create the schema (blocking); returns the offset. Run before readers attach."""
        try:
            stale = self._opened_in_another_boot()
        except sqlite3.DatabaseError as exc:  # damaged: it is derived, so start it again
            stale = f"unreadable: {exc}"
        if stale:
            log("search_index_rebuilt", path=str(self.path), reason=stale)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        conn = self._connect(fsync=True)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT id FROM progress").fetchone()
            if row is None:
                conn.execute("INSERT INTO progress(id) VALUES (0)")
            self.keys_indexed = cid_index.create(conn)
            conn.execute("DELETE FROM opened")
            if self._boot is not None:
                conn.execute("INSERT INTO opened(boot) VALUES (?)", (self._boot,))
            conn.execute("COMMIT")
            self._indexed = row[0] if row else 0
            return self._indexed
        finally:
            conn.close()

    def _opened_in_another_boot(self) -> str | None:
        """Why the index cannot be trusted (it was open when the machine went down), or None."""
        if not self.path.exists():
            return None
        conn = self._connect(fsync=True)
        try:
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='opened'"
            ).fetchone()
            rows = conn.execute("SELECT boot FROM opened").fetchall() if has_table else []
        finally:
            conn.close()
        if rows and rows[0][0] != self._boot:
            return f"open during boot {rows[0][0]}, which ended without closing it"
        return None

    def _close_cleanly(self) -> None:
        """Make everything durable, then erase the boot record (blocking)."""
        conn = self._connect(fsync=True)
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy:
                return  # a reader held the log: leave the record, the next boot rebuilds
            conn.execute("DELETE FROM opened")
        except sqlite3.Error as exc:
            log("search_index_close_failed", error=str(exc))
        finally:
            conn.close()

    def _connect(self, *, fsync: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        if fsync:  # the boot record: fsynced with its commit
            conn.execute("PRAGMA synchronous=FULL")
        else:
            conn.execute(f"PRAGMA synchronous={'NORMAL' if self._boot is None else 'OFF'}")
        return conn

    def catch_up_keys(self) -> None:
        """Index every key the log holds past the keys' offset (blocking; before the writer
        starts, so that it holds no key in memory at first)."""
        conn = self._connect()
        try:
            conn.execute("ATTACH DATABASE ? AS log", (str(self._log_path),))
            self.keys_indexed = cid_index.catch_up(conn, "log")
        finally:
            conn.close()

    def start(self, token: trio.lowlevel.TrioToken) -> None:
        self._thread = threading.Thread(
            target=self._main, args=(token,), name="gb6-search-index", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Blocking: ask the thread to finish and join it."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._close_cleanly()

    def notify(self) -> None:
        """New events were committed to the log (any thread)."""
        self._wake.set()

    async def caught_up(self, event_id: int) -> None:
        """Wait until every event up to `event_id` is indexed (callers bound the wait)."""
        if self._indexed >= event_id:
            return
        done = trio.Event()
        self._waiters.append((event_id, done))
        self._searching.set()
        self._wake.set()
        try:
            await done.wait()
        finally:
            self._waiters = [(i, e) for i, e in self._waiters if e is not done]
            if not self._waiters:
                self._searching.clear()

    def _advance(self, indexed: int) -> None:  # in Trio, from the thread
        self._indexed = max(self._indexed, indexed)
        waiting = []
        for event_id, done in self._waiters:
            if event_id <= self._indexed:
                done.set()
            else:
                waiting.append((event_id, done))
        self._waiters = waiting
        if not waiting:
            self._searching.clear()

    # --- the thread ----------------------------------------------------------------------

    def _open_reader(self) -> sqlite3.Connection:
        conn = self._connect()
        try:
            conn.execute("ATTACH DATABASE ? AS log", (str(self._log_path),))  # only ever read
        except BaseException:
            conn.close()
            raise
        return conn

    def _main(self, token: trio.lowlevel.TrioToken) -> None:
        # Whatever fails is logged and tried again (within a second): the thread never ends
        # before it is stopped, since sends wait for it to index their keys once the writer
        # holds too many (`_MAX_RECENT_KEYS`).
        conn: sqlite3.Connection | None = None
        try:
            while not self._stopping.is_set():
                if conn is None:
                    try:
                        conn = self._open_reader()
                    except Exception as exc:
                        log("search_index_failed", error=repr(exc))
                        self._stopping.wait(1.0)
                        continue
                self._wake.wait(1.0)
                if not self._searching.is_set():
                    # Nobody waits: let events gather, so each pass writes one larger FTS
                    # segment instead of one per commit.
                    self._stopping.wait(_GATHER_S)
                self._wake.clear()
                while not self._stopping.is_set():
                    try:
                        indexed, more = self._index_batch(conn)
                    except Exception as exc:
                        log("search_index_failed", error=repr(exc))
                        try:
                            if conn.in_transaction:
                                conn.execute("ROLLBACK")
                        except sqlite3.Error:  # a connection of its own from now on
                            conn.close()
                            conn = None
                        break  # retried on the next nudge or within a second
                    try:
                        token.run_sync_soon(self._advance, indexed)
                    except trio.RunFinishedError:
                        return
                    if not more:
                        break
        finally:
            if conn is not None:
                conn.close()

    def _index_batch(self, conn: sqlite3.Connection) -> tuple[int, bool]:
        """Index the next events after the offsets, in one transaction; (offset, more left).

        New messages and keys go in with one statement each that runs in SQLite's C code (no
        Python per message, no GIL held); only edits and deletes, which are rare, take a Python
        step."""
        # Deferred: an immediate transaction would take the write lock of the log as well.
        # The keys first, in a transaction of their own: sends wait for them (the writer holds
        # at most `_MAX_RECENT_KEYS`), and a failure of the text's must not hold them back.
        conn.execute("BEGIN")
        keys_offset = conn.execute("SELECT id FROM cids_progress").fetchone()[0]
        top = conn.execute("SELECT MAX(id) FROM log.events").fetchone()[0] or 0
        keys_upto = min(top, keys_offset + _BATCH)
        if keys_upto > keys_offset:
            cid_index.index_after(conn, "log", keys_offset, keys_upto)
        conn.execute("COMMIT")
        self.keys_indexed = max(keys_upto, keys_offset)
        conn.execute("BEGIN")
        offset = conn.execute("SELECT id FROM progress").fetchone()[0]
        upto = min(top, offset + _BATCH)
        if upto > offset:
            self._index_text(conn, offset, upto)
        conn.execute("COMMIT")
        return max(upto, offset), upto < top or keys_upto < top

    def _index_text(self, conn: sqlite3.Connection, offset: int, upto: int) -> None:
        conn.execute(
            "INSERT INTO events_fts(rowid, text)"
            " SELECT id, text FROM (SELECT id, json_extract(CAST(body AS TEXT), '$.text') AS text"
            "  FROM log.events WHERE id > ? AND id <= ? AND type = 'message' AND body IS NOT NULL)"
            " WHERE typeof(text) = 'text' AND text != ''",
            (offset, upto),
        )
        changes = conn.execute(
            "SELECT e.type, e.body, t.id FROM log.events e"
            " JOIN log.events t ON t.room = e.room AND t.seq = e.target"
            " WHERE e.id > ? AND e.id <= ? AND e.type IN ('edit', 'delete') ORDER BY e.id",
            (offset, upto),
        ).fetchall()
        for type_, body, target_id in changes:
            conn.execute("DELETE FROM events_fts WHERE rowid=?", (target_id,))
            text = _text(body) if type_ == "edit" else None
            if text is not None:
                conn.execute("INSERT INTO events_fts(rowid, text) VALUES (?, ?)", (target_id, text))
        conn.execute("UPDATE progress SET id=?", (upto,))
