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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

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
_KEYS: Final = (
    "INSERT INTO event_keys(room, seq, sender, cid, instance, ts)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],"
    " $6::bigint[]) ON CONFLICT DO NOTHING RETURNING room, seq"
)
_EVENTS: Final = (
    "INSERT INTO events(instance, room, seq, ts, type, sender, cid, body, thread, target,"
    " emoji, tsv)"
    " SELECT instance, room, seq, ts, type, sender, cid, body, thread, target, emoji,"
    " tsv::tsvector"
    " FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[], $6::text[],"
    " $7::text[], $8::bytea[], $9::bigint[], $10::bigint[], $11::text[], $12::text[])"
    " WITH ORDINALITY AS t(instance, room, seq, ts, type, sender, cid, body, thread, target,"
    " emoji, tsv, n) ORDER BY n"  # event ids (search's newest-first order) follow log order
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
_SAVE_OFFSETS: Final = (
    "INSERT INTO log_offsets(consumer, topic, partition, next)"
    " SELECT $1, $2, p, n FROM unnest($3::integer[], $4::bigint[]) AS t(p, n)"
    " ON CONFLICT (consumer, topic, partition)"
    " DO UPDATE SET next = GREATEST(log_offsets.next, excluded.next)"
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
            heads[e.event.room] = max(heads.get(e.event.room, 0), e.event.seq)
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
        async with self._pool.acquire() as conn:
            months: dict[int, set[str]] = {}
            first_ts: dict[int, int] = {}
            for e in events:
                key = month_of(e.event.ts)[0]
                months.setdefault(key, set()).add(e.instance)
                first_ts.setdefault(key, e.event.ts)
            for key, instances in months.items():
                await self._partitions.ensure(conn, instances, first_ts[key])
            async with conn.transaction():
                if events:
                    await self._insert(conn, events)
                parts = sorted(resume)
                await conn.execute(
                    _SAVE_OFFSETS,
                    self._name,
                    self._topic,
                    parts,
                    [resume[p] for p in parts],
                )

    async def _insert(self, conn: Any, events: Sequence[LoggedEvent]) -> None:
        rows = [e.event for e in events]
        fresh = await conn.fetch(
            _KEYS,
            [r.room for r in rows],
            [r.seq for r in rows],
            [r.sender for r in rows],
            [r.cid for r in rows],
            [e.instance for e in events],
            [r.ts for r in rows],
        )
        new = {(r[0], int(r[1])) for r in fresh}
        todo = [e for e in events if (e.event.room, e.event.seq) in new]
        if not todo:
            return
        columns: list[list[Any]] = [[] for _ in range(12)]
        for e in todo:
            ev = e.event
            tsv = tsvector_literal(_text(ev.body)) if ev.type == "message" else None
            values = (
                e.instance,
                ev.room,
                ev.seq,
                ev.ts,
                ev.type,
                ev.sender,
                ev.cid,
                e.body,
                ev.thread,
                ev.target,
                ev.emoji,
                tsv,
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        await conn.execute(_EVENTS, *columns)
        for e in todo:  # side effects on targets, in log order
            ev = e.event
            if ev.type == "edit" and ev.target is not None:
                await conn.execute(
                    _EDIT,
                    e.instance,
                    ev.room,
                    ev.target,
                    orjson.dumps(ev.body) if ev.body is not None else None,
                    ev.seq,
                    tsvector_literal(_text(ev.body)),
                )
            elif ev.type == "delete" and ev.target is not None:
                await conn.execute(_DELETE, e.instance, ev.room, ev.target)
