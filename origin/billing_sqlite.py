"""The embedded billing store: `billing.db`, an SQLite file of its own in the data directory.

Threading: one worker thread (`SqliteWorker`), started and joined by `run`, owns the only
connection and runs every call, one transaction each; callers wait on a trio.Event. Billing calls
are rare and a meter batch is one call, so there is nothing to group-commit.

Durability: WAL with `synchronous=FULL`: usage records and invoices cannot be rebuilt from the
log of record, so a call returns only once its commit reached the disk.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import orjson
import trio

from node.errors import INTERNAL, UNAVAILABLE, GB6Error
from origin.billing import check_month, day_of, month_of
from origin.billing_store import (
    InvoiceMaker,
    StoredInvoice,
    UsageDelta,
    check_list,
    check_record,
    check_ts,
    shift_closed,
    usage_key_check,
)
from origin.sqlite_worker import SqliteWorker

T = TypeVar("T")
_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS usage(instance TEXT NOT NULL, period TEXT NOT NULL,
        metric TEXT NOT NULL, quantity INTEGER NOT NULL,
        PRIMARY KEY(instance, period, metric)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS seats(instance TEXT NOT NULL, period TEXT NOT NULL,
        user TEXT NOT NULL, PRIMARY KEY(instance, period, user)) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS usage_keys(instance TEXT NOT NULL, key TEXT NOT NULL,
        PRIMARY KEY(instance, key)) WITHOUT ROWID""",
    "CREATE TABLE IF NOT EXISTS offsets(consumer TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS invoices(number INTEGER PRIMARY KEY, instance TEXT NOT NULL,
        period TEXT NOT NULL, currency TEXT NOT NULL, total INTEGER NOT NULL,
        closed_at INTEGER NOT NULL, document BLOB NOT NULL, UNIQUE(instance, period))""",
)


def _translate(exc: sqlite3.Error) -> GB6Error:
    if isinstance(exc, sqlite3.OperationalError):  # locked, disk full, I/O error, unopenable
        return GB6Error(UNAVAILABLE, f"billing store (sqlite) unavailable: {exc}")
    return GB6Error(INTERNAL, f"billing store (sqlite) failed: {type(exc).__name__}: {exc}")


def _transaction(fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    def tx(conn: sqlite3.Connection) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    return tx


def _stored(row: Sequence[Any]) -> StoredInvoice:
    number, instance, period, currency, total, closed_at, document = row
    return StoredInvoice(
        number, instance, period, currency, total, closed_at, orjson.loads(document)
    )


_INVOICE_COLS: Final = "number, instance, period, currency, total, closed_at, document"


def _add(conn: sqlite3.Connection, delta: UsageDelta) -> None:
    """Add `delta` (its months not yet shifted) inside the caller's transaction."""
    instances = sorted({k[0] for k in delta.counts} | {k[0] for k in delta.seats})
    closed: set[tuple[str, str]] = set()
    for inst in instances:
        rows = conn.execute("SELECT period FROM invoices WHERE instance=?", (inst,)).fetchall()
        closed.update((inst, r[0]) for r in rows)
    delta = shift_closed(delta, lambda inst, month: (inst, month) in closed)
    conn.executemany(
        "INSERT INTO usage(instance, period, metric, quantity) VALUES (?, ?, ?, ?)"
        " ON CONFLICT(instance, period, metric)"
        " DO UPDATE SET quantity = quantity + excluded.quantity",
        [(*key, n) for key, n in sorted(delta.counts.items())],
    )
    conn.executemany(
        "INSERT OR IGNORE INTO seats(instance, period, user) VALUES (?, ?, ?)", sorted(delta.seats)
    )


def _usage(conn: sqlite3.Connection, instance: str, period: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT metric, quantity FROM usage WHERE instance=? AND period=?", (instance, period)
    ).fetchall()
    out = {metric: int(q) for metric, q in rows}
    seats = conn.execute(
        "SELECT COUNT(*) FROM seats WHERE instance=? AND period=?", (instance, period)
    ).fetchone()[0]
    if seats:
        out["seats"] = int(seats)
    return out


class SqliteBillingStore:
    """The `BillingStore` port on SQLite (see origin/billing_store.py). A component."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._worker = SqliteWorker("gb6-billing-sqlite", self._open, _translate)

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute("COMMIT")
        return conn

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._worker.run(task_status=task_status)

    async def offset(self, consumer: str) -> str | None:
        def q(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM offsets WHERE consumer=?", (consumer,)).fetchone()
            return None if row is None else str(row[0])

        return await self._worker.call(q)

    async def apply(
        self, consumer: str, expected: str | None, resume: str, delta: UsageDelta
    ) -> bool:
        @_transaction
        def tx(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT value FROM offsets WHERE consumer=?", (consumer,)).fetchone()
            if (None if row is None else row[0]) != expected:
                return False
            _add(conn, delta)
            conn.execute(
                "INSERT INTO offsets(consumer, value) VALUES (?, ?)"
                " ON CONFLICT(consumer) DO UPDATE SET value = excluded.value",
                (consumer, resume),
            )
            return True

        return await self._worker.call(tx)

    async def record(self, instance: str, metric: str, quantity: int, key: str, ts: int) -> bool:
        check_record(instance, metric, quantity, key)
        check_ts(ts)
        delta = UsageDelta(
            {(instance, day_of(ts), metric): quantity, (instance, month_of(ts), metric): quantity}
        )

        @_transaction
        def tx(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT OR IGNORE INTO usage_keys(instance, key) VALUES (?, ?)", (instance, key)
            )
            if cur.rowcount == 0:
                return False
            _add(conn, delta)
            return True

        return await self._worker.call(tx)

    async def usage(self, instance: str, period: str) -> dict[str, int]:
        usage_key_check(instance, period)
        return await self._worker.call(lambda conn: _usage(conn, instance, period))

    async def close(
        self, instance: str, month: str, make: InvoiceMaker, closed_at: int
    ) -> StoredInvoice:
        usage_key_check(instance, check_month(month))

        @_transaction
        def tx(conn: sqlite3.Connection) -> StoredInvoice:
            row = conn.execute(
                f"SELECT {_INVOICE_COLS} FROM invoices WHERE instance=? AND period=?",
                (instance, month),
            ).fetchone()
            if row is not None:
                return _stored(row)
            inv = make(_usage(conn, instance, month))
            number = conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM invoices").fetchone()[0]
            stored = StoredInvoice(
                number, instance, month, inv.currency, inv.total, closed_at, inv.to_json()
            )
            conn.execute(
                f"INSERT INTO invoices({_INVOICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    number,
                    instance,
                    month,
                    inv.currency,
                    inv.total,
                    closed_at,
                    orjson.dumps(stored.document),
                ),
            )
            return stored

        return await self._worker.call(tx)

    async def invoice(self, instance: str, month: str) -> StoredInvoice | None:
        usage_key_check(instance, check_month(month))

        def q(conn: sqlite3.Connection) -> StoredInvoice | None:
            row = conn.execute(
                f"SELECT {_INVOICE_COLS} FROM invoices WHERE instance=? AND period=?",
                (instance, month),
            ).fetchone()
            return None if row is None else _stored(row)

        return await self._worker.call(q)

    async def invoices(
        self, instance: str, *, after: str | None = None, limit: int = 100
    ) -> list[StoredInvoice]:
        check_list(limit, after)

        def q(conn: sqlite3.Connection) -> list[StoredInvoice]:
            rows = conn.execute(
                f"SELECT {_INVOICE_COLS} FROM invoices WHERE instance=? AND period > ?"
                " ORDER BY period LIMIT ?",
                (instance, after or "", limit),
            ).fetchall()
            return [_stored(r) for r in rows]

        return await self._worker.call(q)
