"""The kv port on PostgreSQL: one table, `<schema>.kv (key bytea PRIMARY KEY, value bytea)`.

asyncpg runs under trio-asyncio: whoever runs this component has opened
`trio_asyncio.open_loop()` around it (the node's supervisor does at process start; tests open
one themselves). Each call crosses into asyncio once, with one asyncio coroutine doing all of
the call's database work, and is bounded by `op_timeout_s` (a Trio cancel scope; asyncpg then
cancels the query on the server).

Atomicity without transactions: every compare-and-set is one statement. Creating is
`INSERT … ON CONFLICT DO NOTHING`, replacing is `UPDATE … WHERE value = expected`, deleting is
`DELETE … WHERE value = expected`; under READ COMMITTED a concurrent writer of the same row makes
the statement wait and then re-check its WHERE against the row that won, so of many callers
expecting one value exactly one succeeds. bytea compares bytewise, so key order is the port's.

Migrations run on start, in one transaction under an advisory lock keyed by the schema, so
several processes starting at once apply each step once. The schema name is an argument (tests
use a fresh one each) and must be a plain lower-case identifier.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from node.errors import INTERNAL, UNAVAILABLE, GB6Error, invalid
from origin.kv import Entry, KvLimits, ScanRange, not_running, scan_range
from origin.pg_errors import DB_ERRORS, transient
from origin.pg_store import keep_session
from origin.schema_version import check_known

_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")

# Each step runs once per schema, in order; `{s}` is the quoted schema name.
_MIGRATIONS: Final[tuple[str, ...]] = (
    "CREATE TABLE {s}.kv (key bytea PRIMARY KEY, value bytea NOT NULL)",
)


@contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Turn asyncpg's and the network's errors into GB6Error, once, here at the edge: what a
    retry may get past (a lost connection, a statement timeout, a deadlock, a server shutting
    down: `pg_errors.transient`) is `unavailable`, the rest `internal` (origin/kv.py)."""
    try:
        yield
    except GB6Error:
        raise
    except trio.TooSlowError:
        raise GB6Error(UNAVAILABLE, f"kv store (postgres) timed out: {what}") from None
    except Exception as exc:
        if isinstance(exc, DB_ERRORS) and transient(exc):
            raise GB6Error(UNAVAILABLE, f"kv store (postgres) {what} failed: {exc}") from None
        raise GB6Error(
            INTERNAL, f"kv store (postgres) failed on {what}: {type(exc).__name__}: {exc}"
        ) from None


class PostgresKv:
    """The kv port on PostgreSQL. A component: `await nursery.start(kv.run)`; see origin/kv.py.

    `dsn` is a libpq URL; `pool_size` bounds the connections (and so the concurrent calls; more
    callers wait for a connection inside asyncpg's pool).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "gb6_kv",
        limits: KvLimits | None = None,
        pool_size: int = 4,
        op_timeout_s: float = 10.0,
    ) -> None:
        if not _SCHEMA_NAME.fullmatch(schema):
            raise invalid(f"kv schema name must match {_SCHEMA_NAME.pattern}, not {schema!r}")
        if not 1 <= pool_size <= 100:
            raise invalid(f"kv pool_size must be 1..100, not {pool_size}")
        self.dsn = dsn
        self.schema = schema
        self.limits = limits or KvLimits()
        self.pool_size = pool_size
        self.op_timeout_s = op_timeout_s
        self._table = f'"{schema}".kv'
        self._pool: Any = None

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, apply migrations, serve until cancelled, then close the pool.

        Raises GB6Error `unavailable` when PostgreSQL cannot be reached within `op_timeout_s`.
        """
        if trio_asyncio.current_loop.get() is None:
            raise RuntimeError("PostgresKv.run needs trio_asyncio.open_loop() around it")
        with _mapped("connect"), trio.fail_after(self.op_timeout_s):
            pool = await aio_as_trio(asyncpg.create_pool)(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.op_timeout_s,
                # A write that returns is durable (kv.py), whatever the server's default.
                server_settings={"application_name": "gb6-kv", "synchronous_commit": "on"},
                reset=keep_session,
            )
        try:
            with _mapped("migrate"), trio.fail_after(self.op_timeout_s):
                await aio_as_trio(_migrate)(pool, self.schema)
            self._pool = pool
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._pool = None
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5) as closing:
                    await aio_as_trio(pool.close)()
                if closing.cancelled_caught:
                    pool.terminate()  # a connection would not close in time

    async def _call(self, what: str, fn: Any, *args: Any) -> Any:
        """Run the asyncio coroutine function `fn(pool, *args)` in one crossing."""
        pool = self._pool
        if pool is None:
            raise not_running("postgres")
        with _mapped(what), trio.fail_after(self.op_timeout_s):
            return await aio_as_trio(fn)(pool, *args)

    # --- the port ------------------------------------------------------------------------

    async def get(self, key: bytes) -> bytes | None:
        key = self.limits.key(key)
        value = await self._call(
            "get", _fetchval, f"SELECT value FROM {self._table} WHERE key = $1", key
        )
        return None if value is None else bytes(value)

    async def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        checked = self.limits.keys(keys)
        if not checked:
            return {}
        rows = await self._call(
            "get_many",
            _fetch,
            f"SELECT key, value FROM {self._table} WHERE key = ANY($1::bytea[])",
            checked,
        )
        return {bytes(r[0]): bytes(r[1]) for r in rows}

    async def put(self, key: bytes, value: bytes) -> None:
        key, value = self.limits.key(key), self.limits.value(value)
        await self._call(
            "put",
            _execute,
            f"INSERT INTO {self._table} (key, value) VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            key,
            value,
        )

    async def delete(self, key: bytes) -> None:
        key = self.limits.key(key)
        await self._call("delete", _execute, f"DELETE FROM {self._table} WHERE key = $1", key)

    async def scan(self, prefix: bytes, limit: int, *, after: bytes | None = None) -> list[Entry]:
        rng = scan_range(self.limits, prefix, limit, after)
        if rng.empty:
            return []
        sql, args = self._scan_sql(rng)
        rows = await self._call("scan", _fetch, sql, *args)
        return [Entry(bytes(r[0]), bytes(r[1])) for r in rows]

    def _scan_sql(self, rng: ScanRange) -> tuple[str, list[object]]:
        op = ">=" if rng.start_inclusive else ">"
        if rng.end is None:
            sql = f"SELECT key, value FROM {self._table} WHERE key {op} $1 ORDER BY key LIMIT $2"
            return sql, [rng.start, rng.limit]
        sql = (
            f"SELECT key, value FROM {self._table} WHERE key {op} $1 AND key < $2"
            " ORDER BY key LIMIT $3"
        )
        return sql, [rng.start, rng.end, rng.limit]

    async def compare_and_set(self, key: bytes, expected: bytes | None, new: bytes | None) -> bool:
        key = self.limits.key(key)
        expected = self.limits.optional_value(expected, "expected value")
        new = self.limits.optional_value(new, "new value")
        t = self._table
        if expected is None and new is None:
            sql = f"SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE key = $1)"
            args: list[object] = [key]
        elif expected is None:
            sql = (
                f"INSERT INTO {t} (key, value) VALUES ($1, $2)"
                " ON CONFLICT (key) DO NOTHING RETURNING 1"
            )
            args = [key, new]
        elif new is None:
            sql = f"DELETE FROM {t} WHERE key = $1 AND value = $2 RETURNING 1"
            args = [key, expected]
        else:
            sql = f"UPDATE {t} SET value = $3 WHERE key = $1 AND value = $2 RETURNING 1"
            args = [key, expected, new]
        return await self._call("compare_and_set", _fetchval, sql, *args) is not None


# --- asyncio side: each function is one crossing ----------------------------------------------


async def _fetchval(pool: Any, sql: str, *args: object) -> Any:
    return await pool.fetchval(sql, *args)


async def _fetch(pool: Any, sql: str, *args: object) -> Any:
    return await pool.fetch(sql, *args)


async def _execute(pool: Any, sql: str, *args: object) -> None:
    await pool.execute(sql, *args)


async def _migrate(pool: Any, schema: str) -> None:
    quoted = f'"{schema}"'
    async with pool.acquire() as conn, conn.transaction():
        # Serializes concurrent starts on this schema until the transaction ends.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"gb6-kv:{schema}")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted}.kv_migrations ("
            " version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {quoted}.kv_migrations")
        check_known("the kv", done, len(_MIGRATIONS))
        for number, statement in enumerate(_MIGRATIONS[done:], start=done + 1):
            await conn.execute(statement.format(s=quoted))
            await conn.execute(f"INSERT INTO {quoted}.kv_migrations (version) VALUES ($1)", number)
