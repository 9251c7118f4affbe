"""The full-text index: a consumer of the log with its own offset, in a database of its own.

The index is derived data, so it stays off the commit path (DESIGN §3.5): the writer commits
messages to the log and only nudges this consumer, whose thread reads the new events, applies
them to an FTS5 table in `search.db`, and stores how far it got in the same transaction. A
crash loses at most its newest transactions (`synchronous=NORMAL`), index and offset together,
and the next start carries on from the offset; a deleted `search.db` is rebuilt from the log.

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

_BATCH: Final = 5000  # events per index transaction
_GATHER_S: Final = 0.1  # how long new events gather before a pass, when no search waits
_SCHEMA: Final = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS events_fts"
    " USING fts5(text, tokenize='unicode61 remove_diacritics 2')",
    "CREATE TABLE IF NOT EXISTS progress(id INTEGER NOT NULL)",
)


def _text(body: bytes | None) -> str | None:
    if body is None:
        return None
    text = orjson.loads(body).get("text")
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
        self._waiters: list[tuple[int, trio.Event]] = []

    def open(self) -> int:
        """Create the schema (blocking); returns the offset. Run before readers attach."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT id FROM progress").fetchone()
            if row is None:
                conn.execute("INSERT INTO progress(id) VALUES (0)")
            conn.execute("COMMIT")
            self._indexed = row[0] if row else 0
            return self._indexed
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # rebuilt from the log if a crash loses it
        return conn

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

    def _main(self, token: trio.lowlevel.TrioToken) -> None:
        conn = self._connect()
        conn.execute("ATTACH DATABASE ? AS log", (str(self._log_path),))  # only ever read
        try:
            while not self._stopping.is_set():
                self._wake.wait(1.0)
                if not self._searching.is_set():
                    # Nobody waits: let events gather, so each pass writes one larger FTS
                    # segment instead of one per commit.
                    self._stopping.wait(_GATHER_S)
                self._wake.clear()
                while not self._stopping.is_set():
                    try:
                        indexed, more = self._index_batch(conn)
                    except sqlite3.Error as exc:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        log("search_index_failed", error=str(exc))
                        break  # retried on the next nudge or within a second
                    try:
                        token.run_sync_soon(self._advance, indexed)
                    except trio.RunFinishedError:
                        return
                    if not more:
                        break
        finally:
            conn.close()

    def _index_batch(self, conn: sqlite3.Connection) -> tuple[int, bool]:
        """Index the next events after the offset, in one transaction; (offset, more left).

        New messages go in with one statement that runs in SQLite's C code (no Python per
        message, no GIL held); only edits and deletes, which are rare, take a Python step."""
        # Deferred: an immediate transaction would take the write lock of the log as well.
        conn.execute("BEGIN")
        offset = conn.execute("SELECT id FROM progress").fetchone()[0]
        top = conn.execute("SELECT MAX(id) FROM log.events").fetchone()[0] or 0
        upto = min(top, offset + _BATCH)
        if upto <= offset:
            conn.execute("COMMIT")
            return offset, False
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
        conn.execute("COMMIT")
        return upto, upto < top
