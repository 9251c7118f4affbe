"""The embedded store's idempotency keys: (room, sender, cid) → the event that used them.

A repeated cid must answer with its original event forever (PROTOCOL.md), so every key is kept.
Kept as a unique index on the log itself, the keys were half the pages every commit wrote and
fsynced: each new key lands on a random leaf of a large b-tree. So the log holds no key index;
the keys live in `search.db` (`cids`), derived from the log by the search index's consumer
thread like the full-text index, with their own offset, in transactions of thousands of keys that
wait for no fsync.

What the consumer has not indexed yet, the writer holds in memory (`RecentKeys`): it adds each
key as it writes the event and forgets keys once the consumer reports them indexed. A crash
loses that memory, and possibly the consumer's newest transactions (`synchronous=NORMAL`), keys
and offset together; so before the writer starts, `catch_up` indexes every event past the offset
(the log is the truth, and this makes the memory start empty).

Functions here take the caller's connection; `RecentKeys` belongs to the writer thread.
"""

from __future__ import annotations

import collections
import sqlite3
from typing import Final

import orjson

SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS cids("
    " room TEXT NOT NULL, sender TEXT NOT NULL, cid TEXT NOT NULL, id INTEGER NOT NULL,"
    " PRIMARY KEY(room, sender, cid)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS cids_progress(id INTEGER NOT NULL)",
)

Key = tuple[str, str, str]  # room, sender, cid


def create(conn: sqlite3.Connection) -> int:
    """Create the tables inside the caller's transaction; returns the offset."""
    for statement in SCHEMA:
        conn.execute(statement)
    row = conn.execute("SELECT id FROM cids_progress").fetchone()
    if row is None:
        conn.execute("INSERT INTO cids_progress(id) VALUES (0)")
        return 0
    return int(row[0])


def index_after(conn: sqlite3.Connection, log: str, offset: int, upto: int) -> None:
    """Index the keys of the log's events `offset < id <= upto` (the log attached as `log`),
    inside the caller's transaction, and move the offset to `upto`.

    One statement in SQLite's C code. An event repeating a key (the writer never writes one)
    would keep the first."""
    conn.execute(
        f"INSERT OR IGNORE INTO cids(room, sender, cid, id) SELECT room, sender, cid, id"
        f" FROM {log}.events WHERE id > ? AND id <= ? ORDER BY id",
        (offset, upto),
    )
    conn.execute("UPDATE cids_progress SET id=?", (upto,))


def catch_up(conn: sqlite3.Connection, log: str) -> int:
    """Index every key past the offset (blocking, one transaction); returns the new offset."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        offset = conn.execute("SELECT id FROM cids_progress").fetchone()[0]
        top = conn.execute(f"SELECT MAX(id) FROM {log}.events").fetchone()[0] or 0
        if top > offset:
            index_after(conn, log, offset, top)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return int(max(top, offset))


def lookup(conn: sqlite3.Connection, key: Key) -> int | None:
    """The event id indexed for `key`, if any.

    `fetchall` runs the statement to its end, which ends its read transaction: a later lookup
    must see what the consumer committed since (a statement left open would pin a snapshot)."""
    rows = conn.execute("SELECT id FROM cids WHERE room=? AND sender=? AND cid=?", key).fetchall()
    return int(rows[0][0]) if rows else None


def lookup_many(conn: sqlite3.Connection, keys: list[Key]) -> dict[Key, int]:
    """The event ids indexed for those of `keys` the index holds: one statement (the keys
    travel as one JSON text, so its SQL is the same for any number of them)."""
    rows = conn.execute(
        "SELECT c.room, c.sender, c.cid, c.id FROM json_each(?) AS j JOIN cids AS c"
        " ON c.room = j.value->>0 AND c.sender = j.value->>1 AND c.cid = j.value->>2",
        (orjson.dumps(keys).decode(),),
    ).fetchall()
    return {(room, sender, cid): int(event_id) for room, sender, cid, event_id in rows}


class RecentKeys:
    """The keys written since the consumer's offset, in the writer thread's memory."""

    def __init__(self) -> None:
        self._ids: dict[Key, int] = {}
        self._order: collections.deque[tuple[int, Key]] = collections.deque()

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, key: Key) -> int | None:
        return self._ids.get(key)

    def add(self, key: Key, event_id: int) -> None:
        self._ids[key] = event_id
        self._order.append((event_id, key))

    def forget_upto(self, indexed: int) -> None:
        """Drop the keys of events `id <= indexed`: the index holds them now."""
        order, ids = self._order, self._ids
        while order and order[0][0] <= indexed:
            event_id, key = order.popleft()
            if ids.get(key) == event_id:
                del ids[key]

    def mark(self) -> int:
        """Where a transaction starts, for `undo`."""
        return len(self._order)

    def undo(self, mark: int) -> None:
        """Drop the keys added since `mark`: their transaction was rolled back."""
        order, ids = self._order, self._ids
        while len(order) > mark:
            _, key = order.pop()
            ids.pop(key, None)
