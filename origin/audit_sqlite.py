"""The audit store on SQLite: one table in a file of its own (audit.db in the data directory).

A file apart from gb6.db: the audit log has its own writer and its own lifetime (it is kept as
evidence when everything else is thrown away), and an append never waits behind the message
path's group commit.

Threading: one worker thread (origin/sqlite_worker.py), started and joined by `run`, owns the
only connection and does every call (appends are batched by the log already, reads are rare:
admin listings and the verifier). Durability: WAL with
`synchronous=FULL`, so `append` returns only after its commit reached the disk.

Append-only: the code has no UPDATE or DELETE, and triggers make SQLite refuse both, so a
mistaken or injected statement fails instead of rewriting history. (Someone with the file can
drop the triggers: that is what the hash chain and its anchor are for.)

`readonly=True` (the `gb6 audit verify` command) opens an existing file read-only, never
creates or migrates one, and reads a missing file as an empty log.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
import trio

from node.errors import CONFLICT, INTERNAL, UNAVAILABLE, GB6Error
from origin.audit import AuditLimits, AuditRecord
from origin.audit_store import COLUMNS, AuditQuery, record_from_row, record_row, where
from origin.schema_version import migrate_sqlite
from origin.sqlite_worker import SqliteWorker

_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE audit(
        seq INTEGER PRIMARY KEY, ts INTEGER NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, org TEXT, instance TEXT, target TEXT, outcome TEXT NOT NULL,
        details TEXT NOT NULL, prev BLOB NOT NULL, hash BLOB NOT NULL);
    CREATE INDEX audit_by_org ON audit(org, seq);
    CREATE INDEX audit_by_instance ON audit(instance, seq);
    CREATE INDEX audit_by_actor ON audit(actor, seq);
    CREATE INDEX audit_by_action ON audit(action, seq);
    CREATE INDEX audit_by_ts ON audit(ts);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """,
)
T = TypeVar("T")


def _translate(exc: sqlite3.Error) -> GB6Error:
    if isinstance(exc, sqlite3.IntegrityError):
        return GB6Error(CONFLICT, f"audit store (sqlite) refused the write: {exc}")
    if isinstance(exc, sqlite3.OperationalError):  # locked, disk full, I/O error, unopenable
        return GB6Error(UNAVAILABLE, f"audit store (sqlite) unavailable: {exc}")
    return GB6Error(INTERNAL, f"audit store (sqlite) failed: {type(exc).__name__}: {exc}")


class SqliteAuditStore:
    """The audit store port on SQLite. A component: `await nursery.start(store.run)`."""

    def __init__(
        self, path: Path, limits: AuditLimits | None = None, *, readonly: bool = False
    ) -> None:
        self.path = path
        self.limits = limits or AuditLimits()
        self.readonly = readonly
        self._worker = SqliteWorker("gb6-audit-sqlite", self._open, _translate)

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._worker.run(task_status=task_status)

    def _open(self) -> sqlite3.Connection:
        if self.readonly:
            if self.path.exists():
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            # A missing file reads as an empty log: an empty in-memory one, nothing created.
            conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=30.0
            )
        try:
            if not self.readonly:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
            migrate_sqlite(conn, "the audit log", _MIGRATIONS)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._worker.call(fn)

    # --- the port ------------------------------------------------------------------------

    async def append(self, records: Sequence[AuditRecord]) -> None:
        rows = [record_row(r) for r in records]
        if not rows:
            return

        def fn(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                f"INSERT INTO audit({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            conn.execute("COMMIT")
            return True

        await self._call(fn)

    async def head(self) -> AuditRecord | None:
        def fn(conn: sqlite3.Connection) -> AuditRecord | None:
            row = conn.execute(f"SELECT {COLUMNS} FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            return None if row is None else record_from_row(row)

        return await self._call(fn)

    async def scan(self, after: int, limit: int) -> list[AuditRecord]:
        def fn(conn: sqlite3.Connection) -> list[AuditRecord]:
            rows = conn.execute(
                f"SELECT {COLUMNS} FROM audit WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
            return [record_from_row(r) for r in rows]

        return await self._call(fn)

    async def query(self, q: AuditQuery) -> list[AuditRecord]:
        q = q.checked(self.limits)
        args: list[Any] = []

        def mark(value: Any) -> str:
            args.append(value)
            return "?"

        def mark_set(ids: list[str]) -> str:
            args.append(orjson.dumps(ids).decode())
            return "SELECT value FROM json_each(?)"

        sql = f"SELECT {COLUMNS} FROM audit WHERE {where(q, mark, mark_set)}"
        sql += f" ORDER BY seq DESC LIMIT {q.limit}"

        def fn(conn: sqlite3.Connection) -> list[AuditRecord]:
            return [record_from_row(r) for r in conn.execute(sql, args).fetchall()]

        return await self._call(fn)
