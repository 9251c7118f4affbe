"""The billing store on PostgreSQL (asyncpg through trio-asyncio): `billing_*` tables.

Ownership: `run` opens a small pool of its own (`pg_store.open_pool`, the caller has opened the
trio-asyncio loop) on the store's schema, creates its tables, serves, and closes the pool on
exit. Every call is one `aio_as_trio` crossing running one transaction, shielded once started
(asyncpg's command timeout bounds it), so a cancelled caller never leaves its outcome unknown.

Concurrency: `apply` locks the consumer's offset row (`FOR UPDATE`), so two consumers under one
name cannot both apply the same batch; `close` takes a transaction-level advisory lock keyed by
the schema, so invoice numbers are assigned one at a time and a month is closed once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import orjson
import trio
from trio_asyncio import aio_as_trio

from node.errors import UNAVAILABLE, GB6Error
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
from origin.pg_errors import DB_ERRORS, translate
from origin.pg_schema import check_schema_name
from origin.pg_store import open_pool

T = TypeVar("T")
_CLOSE_TIMEOUT_S: Final = 10.0
_SCHEMA: Final = """
    CREATE TABLE IF NOT EXISTS billing_usage(instance text NOT NULL, period text NOT NULL,
        metric text NOT NULL, quantity bigint NOT NULL, PRIMARY KEY (instance, period, metric));
    CREATE TABLE IF NOT EXISTS billing_seats(instance text NOT NULL, period text NOT NULL,
        user_id text NOT NULL, PRIMARY KEY (instance, period, user_id));
    CREATE TABLE IF NOT EXISTS billing_usage_keys(instance text NOT NULL, key text NOT NULL,
        PRIMARY KEY (instance, key));
    CREATE TABLE IF NOT EXISTS billing_offsets(consumer text PRIMARY KEY, value text NOT NULL);
    CREATE TABLE IF NOT EXISTS billing_invoices(number bigint PRIMARY KEY,
        instance text NOT NULL, period text NOT NULL, currency text NOT NULL,
        total bigint NOT NULL, closed_at bigint NOT NULL, document bytea NOT NULL,
        UNIQUE (instance, period));
"""
_INVOICE_COLS: Final = "number, instance, period, currency, total, closed_at, document"


def _stored(row: Any) -> StoredInvoice:
    return StoredInvoice(
        int(row["number"]),
        row["instance"],
        row["period"],
        row["currency"],
        int(row["total"]),
        int(row["closed_at"]),
        orjson.loads(row["document"]),
    )


async def _add(conn: Any, delta: UsageDelta, close_key: str) -> None:
    """Add `delta` (months not yet shifted) inside the caller's transaction (asyncio side).
    Shares the lock that `close` takes alone (`close_key`), to its commit: a month closed
    meanwhile would otherwise miss this usage, which it never read and which this add did not
    shift, since the month was open when it looked."""
    await conn.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0))", close_key)
    instances = sorted({k[0] for k in delta.counts} | {k[0] for k in delta.seats})
    rows = await conn.fetch(
        "SELECT instance, period FROM billing_invoices WHERE instance = ANY($1::text[])", instances
    )
    closed = {(r["instance"], r["period"]) for r in rows}
    delta = shift_closed(delta, lambda inst, month: (inst, month) in closed)
    if delta.counts:
        keys = sorted(delta.counts)
        await conn.execute(
            "INSERT INTO billing_usage(instance, period, metric, quantity)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])"
            " ON CONFLICT (instance, period, metric)"
            " DO UPDATE SET quantity = billing_usage.quantity + excluded.quantity",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [delta.counts[k] for k in keys],
        )
    if delta.seats:
        seats = sorted(delta.seats)
        await conn.execute(
            "INSERT INTO billing_seats(instance, period, user_id)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
            [s[0] for s in seats],
            [s[1] for s in seats],
            [s[2] for s in seats],
        )


async def _usage(conn: Any, instance: str, period: str) -> dict[str, int]:
    rows = await conn.fetch(
        "SELECT metric, quantity FROM billing_usage WHERE instance = $1 AND period = $2",
        instance,
        period,
    )
    out = {r["metric"]: int(r["quantity"]) for r in rows}
    seats = await conn.fetchval(
        "SELECT count(*) FROM billing_seats WHERE instance = $1 AND period = $2", instance, period
    )
    if seats:
        out["seats"] = int(seats)
    return out


class PgBillingStore:
    """The `BillingStore` port on PostgreSQL, in `schema` (see origin/billing_store.py).

    A component: `await nursery.start(store.run)` inside `trio_asyncio.open_loop()`.
    """

    def __init__(self, dsn: str, *, schema: str = "gb6", pool_size: int = 2) -> None:
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self._close_key = f"gb6.billing.close.{self.schema}"  # see `close` and `_add`
        self._pool_size = pool_size
        self._pool: Any = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._pool = await open_pool(self.dsn, self.schema, "gb6-billing", self._pool_size)
        try:
            await self._tx(self._migrate)
            task_status.started()
            await trio.sleep_forever()
        finally:
            pool, self._pool = self._pool, None
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                    await aio_as_trio(pool.close)()
                if scope.cancelled_caught:
                    pool.terminate()

    async def _migrate(self, conn: Any) -> None:
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"gb6.billing.{self.schema}"
        )
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        await conn.execute(_SCHEMA)

    async def _tx(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """`fn(conn)` in one transaction, in one crossing; shielded once started."""
        if self._pool is None:
            raise GB6Error(UNAVAILABLE, "the billing store is not running")

        async def run() -> T:
            async with self._pool.acquire() as conn, conn.transaction():
                return await fn(conn)

        try:
            with trio.CancelScope(shield=True):
                value: T = await aio_as_trio(run)()
            return value
        except DB_ERRORS as exc:
            raise translate(exc, "billing store") from exc

    async def offset(self, consumer: str) -> str | None:
        async def q(conn: Any) -> str | None:
            value = await conn.fetchval(
                "SELECT value FROM billing_offsets WHERE consumer = $1", consumer
            )
            return None if value is None else str(value)

        return await self._tx(q)

    async def apply(
        self, consumer: str, expected: str | None, resume: str, delta: UsageDelta
    ) -> bool:
        async def tx(conn: Any) -> bool:
            stored = await conn.fetchval(
                "SELECT value FROM billing_offsets WHERE consumer = $1 FOR UPDATE", consumer
            )
            if stored != expected:
                return False
            if stored is None:
                # The first batch: two first batches race on the insert; the loser conflicts.
                inserted = await conn.fetchval(
                    "INSERT INTO billing_offsets(consumer, value) VALUES ($1, $2)"
                    " ON CONFLICT DO NOTHING RETURNING 1",
                    consumer,
                    resume,
                )
                if inserted is None:
                    return False
            else:
                await conn.execute(
                    "UPDATE billing_offsets SET value = $2 WHERE consumer = $1", consumer, resume
                )
            await _add(conn, delta, self._close_key)
            return True

        return await self._tx(tx)

    async def record(self, instance: str, metric: str, quantity: int, key: str, ts: int) -> bool:
        check_record(instance, metric, quantity, key)
        check_ts(ts)
        delta = UsageDelta(
            {(instance, day_of(ts), metric): quantity, (instance, month_of(ts), metric): quantity}
        )

        async def tx(conn: Any) -> bool:
            inserted = await conn.fetchval(
                "INSERT INTO billing_usage_keys(instance, key) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                instance,
                key,
            )
            if inserted is None:
                return False
            await _add(conn, delta, self._close_key)
            return True

        return await self._tx(tx)

    async def usage(self, instance: str, period: str) -> dict[str, int]:
        usage_key_check(instance, period)
        return await self._tx(lambda conn: _usage(conn, instance, period))

    async def close(
        self, instance: str, month: str, make: InvoiceMaker, closed_at: int
    ) -> StoredInvoice:
        usage_key_check(instance, check_month(month))

        async def tx(conn: Any) -> StoredInvoice:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", self._close_key
            )
            row = await conn.fetchrow(
                f"SELECT {_INVOICE_COLS} FROM billing_invoices WHERE instance = $1 AND period = $2",
                instance,
                month,
            )
            if row is not None:
                return _stored(row)
            inv = make(await _usage(conn, instance, month))
            number = await conn.fetchval(
                "SELECT COALESCE(MAX(number), 0) + 1 FROM billing_invoices"
            )
            stored = StoredInvoice(
                int(number), instance, month, inv.currency, inv.total, closed_at, inv.to_json()
            )
            await conn.execute(
                f"INSERT INTO billing_invoices({_INVOICE_COLS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                stored.number,
                instance,
                month,
                inv.currency,
                inv.total,
                closed_at,
                orjson.dumps(stored.document),
            )
            return stored

        return await self._tx(tx)

    async def invoice(self, instance: str, month: str) -> StoredInvoice | None:
        usage_key_check(instance, check_month(month))

        async def q(conn: Any) -> StoredInvoice | None:
            row = await conn.fetchrow(
                f"SELECT {_INVOICE_COLS} FROM billing_invoices WHERE instance = $1 AND period = $2",
                instance,
                month,
            )
            return None if row is None else _stored(row)

        return await self._tx(q)

    async def invoices(
        self, instance: str, *, after: str | None = None, limit: int = 100
    ) -> list[StoredInvoice]:
        check_list(limit, after)

        async def q(conn: Any) -> list[StoredInvoice]:
            rows = await conn.fetch(
                f"SELECT {_INVOICE_COLS} FROM billing_invoices WHERE instance = $1"
                " AND period > $2 ORDER BY period LIMIT $3",
                instance,
                after or "",
                limit,
            )
            return [_stored(r) for r in rows]

        return await self._tx(q)
