"""The PostgreSQL persister: writes the log of record's committed events into PostgreSQL.

Rules (DESIGN §3.5):
- It reads with a `LogConsumer` from the offsets it stored, and writes each `LogBatch` in ONE
  PostgreSQL transaction together with the batch's `resume` offsets (table `log_offsets`,
  keyed by consumer and topic). A crash before the commit replays the batch; after it, the
  batch is never read again: every event is written exactly once.
- It is idempotent besides: an event whose (room, seq) is already in `event_keys` is skipped
  with its side effects (an edit's new text, a delete's redaction), and stored offsets never
  move back, so two persisters of one shard (a zombie and its successor) do no harm.
- Edits and deletes update their target in the same transaction, in log order, as the direct
  PostgreSQL store does (pg_append.py), so reads and search see the same rows on both.
- A failed transaction is retried (the batch is the same; nothing of it was written) after a
  pause, until it succeeds or the persister is cancelled; each failure is logged.
- Every crossing into asyncpg is one batch (`aio_as_trio`), on the connection pool its owner
  gives it; partitions a batch needs are made before its transaction (pg_schema.Partitions).
- Every batch is tried first as if all its events were new (`_FIRST`: plain inserts, cheaper
  for PostgreSQL); a unique key violated means a replay, and that batch is written again with
  the statement that skips what is there (`_PERSIST`). Either way, one transaction.
- One round trip per batch in the common case: the rows are built in Python first (outside
  any transaction), then ONE statement inserts the keys, the events whose keys were new, and
  the offsets (`_PERSIST`: a statement is its own transaction). A batch holding edits or
  deletes runs that statement and the target updates in one explicit transaction instead.
  (Before: BEGIN, keys, Python work, events, offsets, COMMIT — five round trips, the
  transaction held open across the Python work, seen as `idle in transaction`.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import orjson
import trio
from trio_asyncio import aio_as_trio

from node.errors import GB6Error
from node.log import log
from origin.kafka_records import LoggedEvent, decode
from origin.log_port import LogBatch, LogConsumer
from origin.pg_errors import DB_ERRORS, translate
from origin.pg_schema import Partitions, month_of
from origin.pg_search import tsvector_literal

_RETRY_S: Final = 1.0

_OFFSETS_TABLE: Final = (
    "CREATE TABLE IF NOT EXISTS log_offsets("
    " consumer text NOT NULL, topic text NOT NULL, partition integer NOT NULL,"
    " next bigint NOT NULL, PRIMARY KEY (consumer, topic, partition))"
)
# `_PERSIST` and `_FIRST`, made of these parts. $1: the events as one jsonb document (each
# an array in `_rows`' order) and $2 their bodies (bytea: a body may hold "\u0000", which
# jsonb refuses), as the writer sends them (pg_append.py: one JSON text costs the origin far
# less CPU than twelve arrays); $3, $4: consumer and topic; $5, $6: partitions and their next
# offsets. Keys first (in `_PERSIST`, ON CONFLICT: a replayed event is skipped), then the
# events whose keys were new, in log order (event ids follow it, per partition; search
# orders by ts first), and the offsets: a data-modifying CTE runs to completion whether or
# not it is read.
_ROWS: Final = (
    " t AS ("
    " SELECT r->>0 AS instance, r->>1 AS room, (r->>2)::bigint AS seq, (r->>3)::bigint AS ts,"
    " r->>4 AS type, r->>5 AS sender, r->>6 AS cid, body, (r->>7)::bigint AS thread,"
    " (r->>8)::bigint AS target, r->>9 AS emoji, r->>10 AS tsv, n"
    " FROM ROWS FROM (jsonb_array_elements($1::jsonb), unnest($2::bytea[])) WITH ORDINALITY"
    " AS e(r, body, n))"
)
_KEYS: Final = (
    " keys AS ("
    " INSERT INTO event_keys(room, seq, sender, cid, instance, ts)"
    " SELECT room, seq, sender, cid, instance, ts FROM t"
)
_OFFSETS: Final = (
    " offsets AS ("
    " INSERT INTO log_offsets(consumer, topic, partition, next)"
    " SELECT $3, $4, p, n FROM unnest($5::integer[], $6::bigint[]) AS o(p, n)"
    " ON CONFLICT (consumer, topic, partition)"
    " DO UPDATE SET next = GREATEST(log_offsets.next, excluded.next))"
    " INSERT INTO events(instance, room, seq, ts, type, sender, cid, body, thread, target,"
    " emoji, tsv)"
)
_PERSIST: Final = (
    f"WITH{_ROWS},{_KEYS} ON CONFLICT DO NOTHING RETURNING room, seq),{_OFFSETS}"
    " SELECT t.instance, t.room, t.seq, t.ts, t.type, t.sender, t.cid, t.body, t.thread,"
    " t.target, t.emoji, t.tsv::tsvector"
    " FROM t JOIN keys ON keys.room = t.room AND keys.seq = t.seq"
    " ORDER BY t.n"
    " RETURNING room, seq"
)
# The first try of every batch: `_PERSIST` without what only a replay needs. ON CONFLICT
# checks each key against both unique indexes of `event_keys` before inserting it, and the
# join and RETURNING build a hash of the keys: PostgreSQL spent ~38 µs of CPU per event on
# `_PERSIST` against ~23 per append in the PostgreSQL store's own insert (bench/RESULTS.md,
# 2026-11-27). A batch read again (a zombie persister beside its successor) fails here on a
# unique key, changing nothing, and is written with `_PERSIST`.
_FIRST: Final = (
    f"WITH{_ROWS},{_KEYS}),{_OFFSETS}"
    " SELECT instance, room, seq, ts, type, sender, cid, body, thread, target, emoji,"
    " tsv::tsvector"
    " FROM t ORDER BY n"
)
# The target's ts from event_keys prunes `events` to one partition.
_EDIT: Final = (
    "UPDATE events SET current_body = $4, edited = $5, tsv = $6::tsvector"
    " WHERE instance = $1 AND room = $2 AND seq = $3"
    " AND ts = (SELECT ts FROM event_keys WHERE room = $2 AND seq = $3)"
)
_DELETE: Final = (
    "WITH message AS ("
    " UPDATE events SET deleted = true, body = NULL, current_body = NULL, tsv = NULL"
    " WHERE instance = $1 AND room = $2 AND seq = $3"
    " AND ts = (SELECT ts FROM event_keys WHERE room = $2 AND seq = $3))"
    " UPDATE events SET deleted = true, body = NULL, current_body = NULL, tsv = NULL"
    " WHERE instance = $1 AND room = $2 AND target = $3 AND type = 'edit'"
)


def _text(body: dict[str, Any] | None) -> str | None:
    text = body.get("text") if isinstance(body, dict) else None
    return text if isinstance(text, str) and text else None


async def prepare(pool: Any, topic: str, consumer: str) -> dict[int, int]:
    """Create the offsets table if missing; the offsets `consumer` stored for `topic`
    (asyncio side: call through `aio_as_trio`)."""
    async with pool.acquire() as conn:
        async with conn.transaction():
            # Two processes creating the table at once would collide on its type: serialize.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('gb6.log_offsets', 0))"
            )
            await conn.execute(_OFFSETS_TABLE)
        rows = await conn.fetch(
            "SELECT partition, next FROM log_offsets WHERE consumer = $1 AND topic = $2",
            consumer,
            topic,
        )
    return {int(r[0]): int(r[1]) for r in rows}


class PgPersister:
    """Writes what `consumer` reads into PostgreSQL (see the module doc).

    `pool` is an asyncpg pool on the store's schema (owned by the caller, open while this
    runs); `on_persisted(room → highest seq)` is called in this task after each commit.
    """

    def __init__(
        self,
        pool: Any,
        schema: str,
        topic: str,
        consumer: LogConsumer,
        on_persisted: Callable[[Mapping[str, int]], None],
        *,
        name: str = "persister",
    ) -> None:
        self._pool = pool
        self._topic = topic
        self._consumer = consumer
        self._on_persisted = on_persisted
        self._name = name
        self._partitions = Partitions(schema)
        self.offsets: dict[int, int] = {}  # after the last batch written
        self.batches = 0  # written; for metrics and tests
        self.replays = 0  # batches that held events written already; same

    async def step(self) -> None:
        """Read the next batch (waits for one) and write it, retrying until it is written."""
        batch = await self._consumer.next_batch()
        await self.write(batch)

    async def run_forever(self) -> None:
        while True:
            await self.step()

    async def write(self, batch: LogBatch) -> None:
        events = [decode(entry) for entry in batch.entries]  # `internal` stops us: not ours
        while True:
            try:
                await self._write_once(events, batch.resume)
                break
            except GB6Error as exc:
                log("persister_retry", topic=self._topic, error=exc.message)
                await trio.sleep(_RETRY_S)
        self.offsets = dict(batch.resume)
        self.batches += 1
        heads: dict[str, int] = {}
        for e in events:
            heads[e.room] = max(heads.get(e.room, 0), e.seq)
        self._on_persisted(heads)

    async def _write_once(self, events: Sequence[LoggedEvent], resume: Mapping[int, int]) -> None:
        # Shielded: once sent, PostgreSQL's answer is awaited (asyncpg's command_timeout
        # bounds it), so a cancelled persister never leaves a half-known transaction.
        with trio.CancelScope(shield=True):
            try:
                await aio_as_trio(self._apply)(events, resume)
            except DB_ERRORS as exc:
                raise translate(exc, "persisting the log") from exc

    async def _apply(self, events: Sequence[LoggedEvent], resume: Mapping[int, int]) -> None:
        # The Python work first, outside the transaction.
        months: dict[int, set[str]] = {}
        first_ts: dict[int, int] = {}
        month: dict[int, int] = {}  # ts → month key: a batch holds few distinct ts
        for e in events:
            ts = e.ts
            key = month.get(ts)
            if key is None:
                key = month[ts] = month_of(ts)[0]
            months.setdefault(key, set()).add(e.instance)
            first_ts.setdefault(key, ts)
        parts = sorted(resume)
        args = (*_rows(events), self._name, self._topic, parts, [resume[p] for p in parts])
        side = [e for e in events if e.type in ("edit", "delete") and e.target is not None]
        async with self._pool.acquire() as conn:
            for key, instances in months.items():
                await self._partitions.ensure(conn, instances, first_ts[key])
            try:  # every event new: the usual case
                if not side:
                    await conn.execute(_FIRST, *args)
                    return
                async with conn.transaction():
                    await conn.execute(_FIRST, *args)
                    for e in side:
                        await self._side_effect(conn, e)
                return
            except asyncpg.UniqueViolationError:
                self.replays += 1  # nothing of it was written; now skip what is there
            if not side:
                await conn.execute(_PERSIST, *args)  # one statement, one transaction
                return
            async with conn.transaction():
                fresh = {(r[0], int(r[1])) for r in await conn.fetch(_PERSIST, *args)}
                for e in side:  # side effects on targets, in log order, of new events only
                    if (e.room, e.seq) in fresh:
                        await self._side_effect(conn, e)

    async def _side_effect(self, conn: Any, e: LoggedEvent) -> None:
        if e.type == "edit":
            await conn.execute(
                _EDIT,
                e.instance,
                e.room,
                e.target,
                e.body_json,
                e.seq,
                tsvector_literal(_text(e.body)),
            )
        else:
            await conn.execute(_DELETE, e.instance, e.room, e.target)


def _rows(events: Sequence[LoggedEvent]) -> tuple[str, list[bytes | None]]:
    """The events as `_PERSIST` takes them: a JSON text of rows, and their bodies."""
    rows: list[list[Any]] = []
    for e in events:
        tsv = tsvector_literal(_text(e.body)) if e.type == "message" else None
        row = [e.instance, e.room, e.seq, e.ts, e.type, e.sender, e.cid, e.thread]
        row += (e.target, e.emoji, tsv)
        rows.append(row)
    return orjson.dumps(rows).decode(), [e.body_json for e in events]
