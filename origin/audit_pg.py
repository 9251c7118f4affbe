"""The audit store on PostgreSQL: one table, `audit_log`, in the shard's schema (asyncpg through
trio-asyncio; the caller has opened the loop).

Its own table and its own migration counter (`audit_schema_version`), apart from the relational
store's, so the two evolve independently; its own small pool (the store's pool is busy with the
message path). Each call is one `aio_as_trio` crossing doing the whole unit of work.

Append-only, twice over: a trigger refuses UPDATE, DELETE and TRUNCATE on `audit_log` for
everyone, and the migration revokes those privileges from PUBLIC and from the owning role itself,
so a stray statement fails on permissions before it reaches the trigger. (A superuser or the
owner can undo both; the hash chain and its anchor are for them.)

Durability: `open_pool` sets `synchronous_commit=on`, so `append` returns once PostgreSQL has
the records on disk. A taken seq is `conflict` (the unique key), other failures `unavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import trio
from trio_asyncio import aio_as_trio

from node.errors import UNAVAILABLE, GB6Error
from origin.audit import AuditLimits, AuditRecord
from origin.audit_store import COLUMNS, AuditQuery, record_from_row, record_row, where
from origin.pg_errors import DB_ERRORS, translate
from origin.pg_schema import check_schema_name
from origin.pg_store import open_pool
from origin.schema_version import check_known

_CLOSE_TIMEOUT_S: Final = 10.0

# Each step runs once per schema, in order; `{s}` is the quoted schema name.
_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE {s}.audit_log(
        seq bigint PRIMARY KEY, ts bigint NOT NULL, actor text NOT NULL, action text NOT NULL,
        org text, instance text, target text, outcome text NOT NULL, details text NOT NULL,
        prev bytea NOT NULL, hash bytea NOT NULL);
    CREATE INDEX audit_log_by_org ON {s}.audit_log(org, seq);
    CREATE INDEX audit_log_by_instance ON {s}.audit_log(instance, seq);
    CREATE INDEX audit_log_by_actor ON {s}.audit_log(actor, seq);
    CREATE INDEX audit_log_by_action ON {s}.audit_log(action, seq);
    CREATE INDEX audit_log_by_ts ON {s}.audit_log(ts);
    CREATE FUNCTION {s}.audit_log_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
    CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON {s}.audit_log
        FOR EACH ROW EXECUTE FUNCTION {s}.audit_log_refuse();
    CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON {s}.audit_log
        FOR EACH STATEMENT EXECUTE FUNCTION {s}.audit_log_refuse();
    REVOKE UPDATE, DELETE, TRUNCATE ON {s}.audit_log FROM PUBLIC;
    REVOKE UPDATE, DELETE, TRUNCATE ON {s}.audit_log FROM CURRENT_USER;
    """,
)


class PgAuditStore:
    """The audit store port on PostgreSQL. A component: `await nursery.start(store.run)`
    inside `trio_asyncio.open_loop()`."""

    def __init__(self, dsn: str, limits: AuditLimits | None = None, *, schema: str = "gb6") -> None:
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.limits = limits or AuditLimits()
        self._pool: Any = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._pool = await open_pool(self.dsn, self.schema, "gb6-audit", 2)
        try:
            await self._call(self._migrate, "audit migration")
            task_status.started()
            await trio.sleep_forever()
        finally:
            pool, self._pool = self._pool, None
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_CLOSE_TIMEOUT_S) as scope:
                    await aio_as_trio(pool.close)()
                if scope.cancelled_caught:
                    pool.terminate()

    async def _call(self, fn: Any, doing: str, *args: Any) -> Any:
        """One crossing into asyncio running `fn(*args)`; its failures become GB6Error."""
        if self._pool is None:
            raise GB6Error(UNAVAILABLE, "the audit store is not running")
        try:
            return await aio_as_trio(fn)(*args)
        except DB_ERRORS as exc:
            raise translate(exc, doing) from None

    async def _migrate(self) -> None:
        s = f'"{self.schema}"'
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"gb6.audit.migrate.{self.schema}",
            )
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {s}.audit_schema_version(version integer NOT NULL)"
            )
            version = await conn.fetchval(f"SELECT version FROM {s}.audit_schema_version")
            if version is None:
                version = 0
                await conn.execute(f"INSERT INTO {s}.audit_schema_version(version) VALUES (0)")
            check_known("the audit log", version, len(_MIGRATIONS))
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                await conn.execute(script.replace("{s}", s))
                await conn.execute(f"UPDATE {s}.audit_schema_version SET version = {number}")

    # --- the port ------------------------------------------------------------------------

    async def append(self, records: Sequence[AuditRecord]) -> None:
        rows = [record_row(r) for r in records]
        if not rows:
            return

        async def fn() -> None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    f"INSERT INTO audit_log({COLUMNS})"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    rows,
                )

        # Once sent, learn the outcome: a cancelled caller must not leave the log guessing.
        with trio.CancelScope(shield=True):
            await self._call(fn, "audit append")

    async def head(self) -> AuditRecord | None:
        async def fn() -> Any:
            async with self._pool.acquire() as conn:
                return await conn.fetchrow(
                    f"SELECT {COLUMNS} FROM audit_log ORDER BY seq DESC LIMIT 1"
                )

        row = await self._call(fn, "audit read")
        return None if row is None else record_from_row(row)

    async def scan(self, after: int, limit: int) -> list[AuditRecord]:
        async def fn() -> Any:
            async with self._pool.acquire() as conn:
                return await conn.fetch(
                    f"SELECT {COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                    after,
                    limit,
                )

        return [record_from_row(r) for r in await self._call(fn, "audit read")]

    async def query(self, q: AuditQuery) -> list[AuditRecord]:
        q = q.checked(self.limits)
        args: list[Any] = []

        def mark(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        def mark_set(ids: list[str]) -> str:
            args.append(ids)
            return f"SELECT unnest(${len(args)}::text[])"

        sql = f"SELECT {COLUMNS} FROM audit_log WHERE {where(q, mark, mark_set)}"
        sql += f" ORDER BY seq DESC LIMIT {q.limit}"

        async def fn() -> Any:
            async with self._pool.acquire() as conn:
                return await conn.fetch(sql, *args)

        return [record_from_row(r) for r in await self._call(fn, "audit read")]
