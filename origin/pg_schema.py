"""The PostgreSQL store's schema: migrations, and the event partitions made on demand.

Everything lives in one schema per store (`gb6` unless told otherwise), named on the pool's
`search_path`, so tests isolate themselves in a schema of their own and SQL stays unqualified.

Migrations run at start, in one transaction, under a transaction-level advisory lock keyed by
the schema: two processes starting at once apply them once (the second waits, then finds the
version current). `schema_version` holds the number of migrations applied.

Events are partitioned by customer and time: LIST by instance, each instance's partition
RANGE-partitioned by month of `ts` (UTC). Partitions are made when a batch first needs them (or
the month after it, near a month's end), in a short transaction of their own (before the
batch's), under an advisory lock, so two writers can race for the same month harmlessly; they
are attached without holding up reads and writes of `events` (see `Partitions`). Names come
from an md5 of the instance id, never from the id itself.

PostgreSQL requires a partitioned table's unique constraints to hold its partition keys, so
`events` cannot enforce (room, seq) or (room, sender, cid). The small unpartitioned `event_keys`
table does: one row per event with those keys and where the event lives (instance, ts). The
writer inserts into both in one statement; lookups by key go through `event_keys`, whose
(instance, ts) prunes `events` to one partition.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import re
import time
from typing import Any, Final

from node.errors import invalid
from node.log import log
from origin.pg_errors import DB_ERRORS
from origin.schema_version import check_known

_SCHEMA_NAME: Final = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_LOCK_TIMEOUT: Final = "5s"  # partition DDL waits at most this long (behind other DDL)
_AHEAD_MS: Final = 3 * 86_400_000  # next month's partitions are made this long before it
_AHEAD_LOCK_TIMEOUT: Final = "200ms"  # ... waiting this long at most (other DDL)
_AHEAD_RETRY_S: Final = 60.0  # ... and tried again this long after a failure

_MIGRATIONS: Final[tuple[str, ...]] = (
    """
    CREATE TABLE orgs(
        id text PRIMARY KEY, name text NOT NULL, parent text REFERENCES orgs(id),
        created_at bigint NOT NULL);
    CREATE TABLE instances(
        id text PRIMARY KEY, org text NOT NULL REFERENCES orgs(id), name text NOT NULL,
        region text NOT NULL, plan text NOT NULL, status text NOT NULL,
        created_at bigint NOT NULL);
    CREATE TABLE users(
        id text PRIMARY KEY, instance text NOT NULL REFERENCES instances(id),
        name text NOT NULL, role text NOT NULL, created_at bigint NOT NULL);
    CREATE TABLE tokens(
        id text PRIMARY KEY, digest text NOT NULL UNIQUE,
        user_id text NOT NULL REFERENCES users(id), expires_at bigint NOT NULL,
        revoked boolean NOT NULL DEFAULT false, created_at bigint NOT NULL);
    CREATE TABLE rooms(
        id text PRIMARY KEY, instance text NOT NULL REFERENCES instances(id),
        name text NOT NULL, kind text NOT NULL, open boolean NOT NULL, creator text NOT NULL,
        created_at bigint NOT NULL);
    CREATE TABLE members(
        room text NOT NULL, user_id text NOT NULL, read bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (room, user_id));
    CREATE INDEX members_by_user ON members(user_id);
    CREATE TABLE event_keys(
        room text NOT NULL, seq bigint NOT NULL, sender text NOT NULL, cid text NOT NULL,
        instance text NOT NULL, ts bigint NOT NULL,
        PRIMARY KEY (room, seq), UNIQUE (room, sender, cid));
    CREATE SEQUENCE event_ids;
    CREATE TABLE events(
        id bigint NOT NULL DEFAULT nextval('event_ids'),
        instance text NOT NULL, room text NOT NULL, seq bigint NOT NULL, ts bigint NOT NULL,
        type text NOT NULL, sender text NOT NULL, cid text NOT NULL, body bytea,
        thread bigint, target bigint, emoji text, deleted boolean NOT NULL DEFAULT false,
        current_body bytea, edited bigint, tsv tsvector
    ) PARTITION BY LIST (instance);
    CREATE INDEX events_room_seq ON events(room, seq);
    CREATE INDEX events_room_target ON events(room, target) WHERE target IS NOT NULL;
    CREATE INDEX events_tsv ON events USING gin(tsv);
    CREATE TABLE files(
        id text PRIMARY KEY, room text NOT NULL REFERENCES rooms(id), uploader text NOT NULL,
        size bigint NOT NULL, type text NOT NULL, created_at bigint NOT NULL);
    CREATE TABLE meta(key text PRIMARY KEY, value text NOT NULL);
    """,
    # Tenancy (origin/tenancy.py): soft-deleted orgs and users, org members and their
    # tokens, API keys (digests only, like tokens; permissions space-separated).
    """
    ALTER TABLE orgs ADD COLUMN deleted boolean NOT NULL DEFAULT false;
    ALTER TABLE users ADD COLUMN status text NOT NULL DEFAULT 'active';
    CREATE TABLE org_members(
        id text PRIMARY KEY, org text NOT NULL REFERENCES orgs(id), name text NOT NULL,
        role text NOT NULL, created_at bigint NOT NULL);
    CREATE TABLE member_tokens(
        id text PRIMARY KEY, digest text NOT NULL UNIQUE,
        member text NOT NULL REFERENCES org_members(id), expires_at bigint NOT NULL,
        revoked boolean NOT NULL DEFAULT false, created_at bigint NOT NULL);
    CREATE TABLE api_keys(
        id text PRIMARY KEY, digest text NOT NULL UNIQUE, org text NOT NULL REFERENCES orgs(id),
        instance text REFERENCES instances(id), name text NOT NULL, permissions text NOT NULL,
        created_by text NOT NULL, expires_at bigint, revoked boolean NOT NULL DEFAULT false,
        created_at bigint NOT NULL);
    """,
    # Ids compare bytewise, whatever the database's locale: under an ICU en-US collation the
    # keys' btree inserts took ~20% longer than under "C" (bench/RESULTS.md, 2026-11-26
    # evening). No rewrite of the rows, the indexes are rebuilt. `events.instance` is the
    # partition key, which PostgreSQL cannot retype; it routes rows and is in no index.
    """
    ALTER TABLE event_keys ALTER COLUMN room TYPE text COLLATE "C",
        ALTER COLUMN sender TYPE text COLLATE "C", ALTER COLUMN cid TYPE text COLLATE "C",
        ALTER COLUMN instance TYPE text COLLATE "C";
    ALTER TABLE events ALTER COLUMN room TYPE text COLLATE "C",
        ALTER COLUMN sender TYPE text COLLATE "C", ALTER COLUMN cid TYPE text COLLATE "C";
    """,
)


def check_schema_name(name: str) -> str:
    if not _SCHEMA_NAME.fullmatch(name):
        raise invalid(
            f"schema name {name!r} must be 1-63 lowercase letters, digits or '_',"
            " not starting with a digit"
        )
    return name


SCHEMA_VERSION: Final = len(_MIGRATIONS)  # what `migrate` brings a schema to
_MIGRATE_TIMEOUT_S: Final = 3600.0


async def migrate(conn: Any, schema: str) -> int:
    """Apply what is missing (asyncio side); returns the schema version.

    Not bound by the pool's 30 s `command_timeout`, but by `_MIGRATE_TIMEOUT_S`: a migration
    that rebuilds indexes of a large store takes longer, and one cut short rolls back and is
    tried again at every start, so the origin would never start. Another process starting
    meanwhile waits for it on the advisory lock, as long."""
    t = _MIGRATE_TIMEOUT_S
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            f"gb6.migrate.{schema}",
            timeout=t,
        )
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_version(version integer NOT NULL)'
        )
        version = await conn.fetchval(f'SELECT version FROM "{schema}".schema_version')
        if version is None:
            version = 0
            await conn.execute(f'INSERT INTO "{schema}".schema_version(version) VALUES (0)')
        check_known(f"schema {schema}", version, len(_MIGRATIONS))
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            await conn.execute(script, timeout=t)
            await conn.execute(f'UPDATE "{schema}".schema_version SET version = {number}')
            version = number
        return int(version)


def month_of(ts_ms: int) -> tuple[int, int, int]:
    """(month key, first ms of the month, first ms of the next), UTC."""
    day = datetime.datetime.fromtimestamp(ts_ms / 1000, tz=datetime.UTC)
    start = datetime.datetime(day.year, day.month, 1, tzinfo=datetime.UTC)
    nxt = datetime.datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=datetime.UTC)
    key = day.year * 100 + day.month
    return key, int(start.timestamp() * 1000), int(nxt.timestamp() * 1000)


class Partitions:
    """Makes the partitions a batch needs; remembers the ones it knows exist (asyncio side).

    A partition is made whole, then attached: ATTACH PARTITION takes a SHARE UPDATE EXCLUSIVE
    lock on its parent, which reads and writes of `events` do not conflict with, where CREATE
    TABLE … PARTITION OF takes ACCESS EXCLUSIVE, which waits behind every read under way (a long
    search, say: past `_LOCK_TIMEOUT` the whole batch failed) and holds up every read after it.
    In the last `_AHEAD_MS` of a month the next month's partitions are made too, so the batches
    at midnight on the first do not all make them at once: in a transaction of their own, whose
    failure does not fail the batch (they are tried again `_AHEAD_RETRY_S` later)."""

    def __init__(self, schema: str) -> None:
        self._schema = schema
        self._known: set[tuple[str, int]] = set()
        self._ahead_after = -math.inf  # next month's are not tried before (they failed)

    def forget(self) -> None:
        self._known.clear()

    def _missing(self, instances: set[str], ts_ms: int) -> list[tuple[str, int, int, int]]:
        """(instance, month key, first ms, first ms of the next month) not known to exist: the
        month of `ts_ms`, and near its end the next one (unless that failed a moment ago)."""
        months = [month_of(ts_ms)]
        if months[0][2] - ts_ms <= _AHEAD_MS and time.monotonic() >= self._ahead_after:
            months.append(month_of(months[0][2]))
        return [
            (i, key, start, end)
            for key, start, end in months
            for i in sorted(instances)
            if (i, key) not in self._known
        ]

    def known(self, instances: set[str], ts_ms: int) -> bool:
        """True when `ensure` has nothing to do for these."""
        return not self._missing(instances, ts_ms)

    async def ensure(self, conn: Any, instances: set[str], ts_ms: int) -> None:
        """On a connection in no transaction: the DDL commits in transactions of its own."""
        missing = self._missing(instances, ts_ms)
        if not missing:
            return
        assert not conn.is_in_transaction()
        this_month = month_of(ts_ms)[0]
        needed = [m for m in missing if m[1] == this_month]
        if needed:
            await self._make_all(conn, needed, _LOCK_TIMEOUT)
        ahead = [m for m in missing if m[1] != this_month]
        if ahead:  # not needed yet: a failure does not fail the batch, and waits a while
            try:
                await self._make_all(conn, ahead, _AHEAD_LOCK_TIMEOUT)
            except DB_ERRORS as exc:
                self._ahead_after = time.monotonic() + _AHEAD_RETRY_S
                log("partitions_ahead_failed", instances=len(ahead), error=repr(exc))

    async def _make_all(
        self, conn: Any, missing: list[tuple[str, int, int, int]], lock_timeout: str
    ) -> None:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{lock_timeout}'")
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"gb6.partition.{self._schema}",
            )
            for instance, key, start, end in missing:
                parent = "ev_" + hashlib.md5(instance.encode()).hexdigest()
                values = await conn.fetchval(
                    "SELECT format('FOR VALUES IN (%L)', $1::text)", instance
                )
                await self._make(conn, "events", parent, "PARTITION BY RANGE (ts)", values)
                values = f"FOR VALUES FROM ({int(start)}) TO ({int(end)})"
                await self._make(conn, parent, f"{parent}_{key}", "", values)
        self._known.update((i, key) for i, key, _, _ in missing)

    async def _make(self, conn: Any, parent: str, name: str, by: str, values: str) -> None:
        """Make table `name` like `parent` and attach it with bounds `values` (SQL), unless it
        exists: one that exists was attached in the transaction that made it."""
        schema = self._schema
        if await conn.fetchval(
            "SELECT to_regclass(format('%I.%I', $1::text, $2::text))", schema, name
        ):
            return
        create, attach = await conn.fetchrow(  # format() quotes the names for us
            "SELECT format('CREATE TABLE %I.%I (LIKE %I.%I INCLUDING DEFAULTS"
            " INCLUDING CONSTRAINTS INCLUDING STORAGE)', $1::text, $2::text, $1::text, $3::text),"
            " format('ALTER TABLE %I.%I ATTACH PARTITION %I.%I', $1::text, $3::text, $1::text,"
            " $2::text)",
            schema,
            name,
            parent,
        )
        await conn.execute(f"{create} {by}")
        await conn.execute(f"{attach} {values}")
