"""One group commit of appends on PostgreSQL: the body of the writer's transaction (asyncio side).

Rules, the same as the embedded store's:

- Seqs come from the writer's per-room head cache (loaded inside the transaction when missing)
  and are handed out in submission order. The store drops the whole cache when a transaction
  fails, so a seq is never skipped or reused.
- Idempotency first: an op whose (room, sender, cid) exists answers with the original event,
  writes nothing, and is not checked again.
- An op's own failure (`GB6Error`: bad target, not allowed, unknown room) is found by reads
  before the op writes anything, so it needs no savepoint and the batch carries on.

Round trips: a batch of plain messages costs one insert, whatever its size, plus a read of the
heads the writer has not cached: the rows are staged in Python and written with one statement
over one JSON document and one array of bodies (the store caches each room's instance). Such a
batch does not look for earlier cids: `event_keys`' unique (room, sender, cid) refuses the insert
of a repeat whole (`is_repeat`), and the writer runs that batch again with `apply`, which reads
them first (a resend is rare; a read per batch was a third of the batch's time under load).
An op with a target or a thread writes what is staged first (its checks must see it), reads its
target, then writes itself and the target's update.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import attrs
import orjson

from node.errors import CONFLICT, INTERNAL, GB6Error, forbidden, invalid, not_found
from node.events import Event
from node.log import log
from origin.pg_errors import DB_ERRORS
from origin.pg_search import tsvector_literal
from origin.records import event_from_row
from origin.sqlite_store import Appended, AppendItem, AppendResult

_KEY_CONSTRAINT: Final = "event_keys_room_sender_cid_key"  # UNIQUE (room, sender, cid)
EVENT_COLS: Final = "room, seq, ts, type, sender, cid, body, thread, target, emoji, deleted"
_EVENT_COLS_E: Final = ", ".join("e." + c.strip() for c in EVENT_COLS.split(","))

Results = list[tuple[AppendItem, AppendResult]]

HEADS: Final = (
    "SELECT r, COALESCE((SELECT max(seq) FROM event_keys WHERE room = r), 0)"
    " FROM unnest($1::text[]) AS r"
)
# Where each key's event is, one index probe per key of the batch whatever the statistics say
# (a plain join of the unnest with `event_keys` was planned as a hash join over the whole
# table, ~45 ms at 17,000 rows and growing; LATERAL … LIMIT 1 cannot be flattened into it).
# `events` is then read by `fetch_events_at`, only for the keys found (a resend is rare).
KEYS_AT: Final = (
    "SELECT q.room, q.sender, q.cid, k.instance, k.ts, k.seq"
    " FROM unnest($1::text[], $2::text[], $3::text[]) AS q(room, sender, cid)"
    " CROSS JOIN LATERAL (SELECT k.instance, k.ts, k.seq FROM event_keys k"
    " WHERE k.room = q.room AND k.sender = q.sender AND k.cid = q.cid LIMIT 1) k"
)
# Events of one instance at known (ts, room, seq). The instance and the ts are constants when
# PostgreSQL plans it (custom plans in every pool), so it opens and locks only their
# partitions: joined to `event_keys` instead, it locked every partition of every instance and
# month, for a lookup of one key (past the lock table's size, "out of shared memory"). One
# index probe per event, as above: a cached generic plan once scanned both tables per key (a
# 200-key lookup at 40,000 rows: 1 s, against 5 ms; bench/RESULTS.md).
_EVENTS_AT: Final = (
    f"SELECT {_EVENT_COLS_E} FROM unnest($3::text[], $4::bigint[]) AS q(room, seq)"
    " CROSS JOIN LATERAL (SELECT * FROM events e WHERE e.instance = $1"
    " AND e.ts = ANY($2::bigint[]) AND e.room = q.room AND e.seq = q.seq LIMIT 1) e"
)


async def fetch_events_at(conn: Any, places: list[tuple[str, int, str, int]]) -> list[Any]:
    """The rows (`EVENT_COLS`) of the events at (instance, ts, room, seq): a query per instance
    (asyncio side)."""
    by_instance: dict[str, list[tuple[int, str, int]]] = {}
    for instance, ts, room, seq in places:
        by_instance.setdefault(instance, []).append((ts, room, seq))
    rows: list[Any] = []
    for instance, at in sorted(by_instance.items()):
        times = sorted({ts for ts, _, _ in at})
        rooms = [room for _, room, _ in at]
        seqs = [seq for _, _, seq in at]
        rows += await conn.fetch(_EVENTS_AT, instance, times, rooms, seqs)
    return rows


async def fetch_priors(
    conn: Any, keys: Iterable[tuple[str, str, str]]
) -> dict[tuple[str, str, str], Event]:
    """The events already written under these (room, sender, cid) keys (asyncio side)."""
    wanted = list(keys)
    if not wanted:
        return {}
    rooms, senders, cids = (list(col) for col in zip(*wanted, strict=True))
    found = await conn.fetch(KEYS_AT, rooms, senders, cids)
    if not found:
        return {}
    rows = await fetch_events_at(conn, [(r[3], int(r[4]), r[0], int(r[5])) for r in found])
    return {(r[0], r[4], r[5]): event_from_row(r) for r in rows}


# The instance prunes `events` when planning, the ts from `event_keys` when executing: one
# partition is read, however many months the instance has.
_TARGET: Final = (
    "SELECT type, sender, deleted, ts FROM events"
    " WHERE instance = $1 AND room = $2 AND seq = $3"
    " AND ts = (SELECT ts FROM event_keys WHERE room = $2 AND seq = $3)"
)
# The rows travel as one JSON document (each row an array, in `_Staged`'s order) and the bodies
# as one bytea array beside it: asyncpg encodes eleven arrays at ~9 µs of the origin's CPU per
# row (it checks every element for nesting), a JSON text at ~1. jsonb, parsed once (`json` is
# parsed again for every field taken from a row: PostgreSQL's CPU per append +25%). jsonb holds
# no "\u0000", nor do these fields (`has_nul`); bodies may, so they stay bytea.
#
# Event ids follow commit order, which the meter relies on (it reads `id > offset`:
# origin/metering.py). The writer sends a batch's INSERT once the one before committed; the
# transaction-level lock keeps that order for the rest (a batch run again for a repeat, in a
# transaction of its own, beside a later batch's INSERT): each takes its ids (`nextval`) only
# once it holds the lock, which the one before holds until it commits. Nothing waits on the
# client while it holds it.
_INSERT: Final = (
    "WITH ids AS MATERIALIZED ("
    " SELECT pg_advisory_xact_lock(hashtextextended('gb6.event_ids.' || current_schema(), 0))),"
    " rows AS ("
    " SELECT r->>0 AS room, (r->>1)::bigint AS seq, r->>2 AS sender, r->>3 AS cid,"
    " r->>4 AS instance, r->>5 AS type, body, (r->>6)::bigint AS thread,"
    " (r->>7)::bigint AS target, r->>8 AS emoji, r->>9 AS tsv, n"
    " FROM ids, ROWS FROM (jsonb_array_elements($1::jsonb), unnest($2::bytea[]))"
    " WITH ORDINALITY AS t(r, body, n)),"
    " keys AS (INSERT INTO event_keys(room, seq, sender, cid, instance, ts)"
    " SELECT room, seq, sender, cid, instance, $3 FROM rows)"
    " INSERT INTO events(instance, room, seq, ts, type, sender, cid, body, thread, target,"
    " emoji, tsv)"
    " SELECT instance, room, seq, $3, type, sender, cid, body, thread, target, emoji,"
    " tsv::tsvector"
    " FROM rows ORDER BY n"  # event ids (search's newest-first order) follow submission order
)
_EDIT: Final = (
    "UPDATE events SET current_body = $5, edited = $6, tsv = $7::tsvector"
    " WHERE instance = $1 AND ts = $2 AND room = $3 AND seq = $4"
)
# Two updates in one statement, each with a condition an index serves: the message in its
# partition, and its edits through the partial index on (room, target).
_DELETE: Final = (
    "WITH message AS ("
    " UPDATE events SET deleted = true, body = NULL, current_body = NULL, tsv = NULL"
    " WHERE instance = $1 AND ts = $2 AND room = $3 AND seq = $4)"
    " UPDATE events SET deleted = true, body = NULL, current_body = NULL, tsv = NULL"
    " WHERE instance = $1 AND room = $3 AND target = $4 AND type = 'edit'"
)


def _text_of(body: dict[str, Any] | None) -> str | None:
    text = body.get("text") if body is not None else None
    return text if isinstance(text, str) and text else None


def has_nul(item: AppendItem) -> bool:
    """Whether an id, the cid or the emoji holds NUL, which PostgreSQL text cannot: such an op
    is refused alone rather than failing its batch (or, on Kafka, its persisting)."""
    # Four tests, not a generator over the strings: ~0.2 µs against ~1 per op.
    return (
        "\x00" in item.room
        or "\x00" in item.sender
        or "\x00" in item.cid
        or (item.emoji is not None and "\x00" in item.emoji)
    )


def single_write(batch: list[AppendItem]) -> bool:
    """True when a batch is written with one statement: plain ops (no target or thread to check
    against what the batch wrote) and no (room, sender, cid) twice."""
    if any(item.target is not None or item.thread is not None for item in batch):
        return False
    return len({(item.room, item.sender, item.cid) for item in batch}) == len(batch)


@attrs.frozen
class Staged:
    """A batch of plain ops read and staged, not written: its answers once `insert_staged`
    succeeds, its rows, and the keys it writes."""

    results: Results
    rows: list[list[Any]]
    bodies: list[bytes | None]
    ts: int
    keys: set[tuple[str, str, str]]


async def insert_staged(conn: Any, staged: Staged) -> None:
    """Write a staged batch: one statement, a transaction of its own. Raises what `is_repeat`
    knows when a key of the batch was written before (nothing is written then)."""
    await _insert(conn, staged.rows, staged.bodies, staged.ts)


def is_repeat(exc: BaseException) -> bool:
    """True for the error of an insert that repeats an existing (room, sender, cid)."""
    return (
        isinstance(exc, asyncpg.UniqueViolationError)
        and getattr(exc, "constraint_name", None) == _KEY_CONSTRAINT
    )


async def _insert(conn: Any, rows: list[list[Any]], bodies: list[bytes | None], ts: int) -> None:
    if rows:
        await conn.execute(_INSERT, orjson.dumps(rows).decode(), bodies, ts)


@attrs.define
class _Staged:
    """Rows waiting for the next insert, as `_INSERT` takes them."""

    rows: list[list[Any]] = attrs.Factory(list)
    bodies: list[bytes | None] = attrs.Factory(list)

    def __len__(self) -> int:
        return len(self.rows)


def _op_failed(exc: Exception) -> GB6Error:
    """One op's outcome when it raised: its own refusal, or (a bug of ours) `internal`, so
    that it does not refuse the others of its batch."""
    if isinstance(exc, GB6Error):
        return exc
    log("writer_job_failed", error=repr(exc))
    return GB6Error(INTERNAL, "internal error")


class AppendBatch:
    """Applies one batch inside the caller's transaction on `conn`. Mutates `heads` as it goes
    (the caller drops it if the transaction fails)."""

    def __init__(
        self, conn: Any, heads: dict[str, int], instances: dict[str, str], ts: int
    ) -> None:
        self._conn = conn
        self._heads = heads
        self._instances = instances  # room → instance, for every room of the batch it knows
        self._ts = ts
        self._staged = _Staged()
        self._written: set[tuple[str, str, str]] = set()  # keys inserted by this batch

    async def apply(self, items: list[AppendItem]) -> Results:
        results = await self._each(items)
        await self._flush()
        return results

    async def stage(self, items: list[AppendItem]) -> Staged:
        """Stage a batch of plain ops (`single_write`) without writing anything, after reading
        the heads it needs; the rows are written by `insert_staged`, on any connection."""
        await self._load_heads({i.room for i in items if i.room in self._instances})
        return self.stage_loaded(items)

    def stage_loaded(self, items: list[AppendItem]) -> Staged:
        """`stage` once the heads of the batch's rooms are loaded: no round trip, any thread.

        Repeats are not looked for: the insert's unique key on (room, sender, cid) finds them
        (`is_repeat`), and the writer then runs the batch with `apply`, which does."""
        assert single_write(items)
        results: Results = []
        for item in items:
            try:
                results.append((item, self._stage(item, self._instance_of(item))))
            except Exception as exc:
                results.append((item, _op_failed(exc)))
        staged, self._staged = self._staged, _Staged()
        return Staged(results, staged.rows, staged.bodies, self._ts, self._written)

    async def _each(self, items: list[AppendItem]) -> Results:
        await self._load_heads({i.room for i in items if i.room in self._instances})
        priors = await self._priors(items)
        results: Results = []
        for item in items:
            try:
                results.append((item, await self._one(item, priors)))
            except DB_ERRORS:
                raise  # the storage failed: the whole batch is refused by the caller
            except Exception as exc:
                results.append((item, _op_failed(exc)))
        return results

    async def _one(self, item: AppendItem, priors: dict[tuple[str, str, str], Event]) -> Appended:
        key = (item.room, item.sender, item.cid)
        if key in self._written:  # repeated within this batch: read it back as written
            await self._flush()
            (prior,) = (await self._priors([item])).values()
            return Appended(prior, duplicate=True)
        if key in priors:
            return Appended(priors[key], duplicate=True)
        instance = self._instance_of(item)
        if item.target is None and item.thread is None:
            return self._stage(item, instance)
        await self._flush()  # the checks must see what this batch wrote before
        target_ts = await self._check_target(item, instance) if item.target is not None else None
        if item.thread is not None:
            row = await self._conn.fetchrow(_TARGET, instance, item.room, item.thread)
            if row is None or row[0] != "message":
                raise not_found(f"thread root {item.thread} is not a message of this room")
        appended = self._stage(item, instance)
        await self._flush()
        if item.type == "edit":
            await self._conn.execute(
                _EDIT,
                instance,
                target_ts,
                item.room,
                item.target,
                orjson.dumps(item.body) if item.body is not None else None,
                appended.event.seq,
                tsvector_literal(_text_of(item.body)),
            )
        elif item.type == "delete":
            await self._conn.execute(_DELETE, instance, target_ts, item.room, item.target)
        return appended

    def _instance_of(self, item: AppendItem) -> str:
        if has_nul(item):
            raise invalid("ids, cids and emoji must not contain NUL characters")
        instance = self._instances.get(item.room)
        if instance is None:
            raise not_found(f"room {item.room} not found")
        return instance

    async def _check_target(self, item: AppendItem, instance: str) -> int:
        """The target's ts, once it is a live message this op may change."""
        row = await self._conn.fetchrow(_TARGET, instance, item.room, item.target)
        if row is None or row[0] != "message":
            raise not_found(f"target {item.target} is not a message of this room")
        if row[2]:
            raise GB6Error(CONFLICT, f"message {item.target} was deleted")
        if item.type == "edit" and row[1] != item.sender:
            raise forbidden("only the sender can edit a message")
        if item.type == "delete" and row[1] != item.sender and not item.may_moderate:
            raise forbidden("only the sender, the room's creator or an admin can delete")
        return int(row[3])

    def _stage(self, item: AppendItem, instance: str) -> Appended:
        # Everything that can fail (encoding the body) comes before the head moves.
        body = orjson.dumps(item.body) if item.body is not None else None
        tsv = tsvector_literal(_text_of(item.body)) if item.type == "message" else None
        seq = self._heads[item.room] + 1
        row = [item.room, seq, item.sender, item.cid, instance, item.type, item.thread]
        row += (item.target, item.emoji, tsv)
        self._staged.rows.append(row)
        self._staged.bodies.append(body)
        self._heads[item.room] = seq
        self._written.add((item.room, item.sender, item.cid))
        return Appended(item.event(seq, self._ts), duplicate=False)

    async def _flush(self) -> None:
        if not len(self._staged):
            return
        staged, self._staged = self._staged, _Staged()
        await _insert(self._conn, staged.rows, staged.bodies, self._ts)

    async def _load_heads(self, rooms: set[str]) -> None:
        missing = sorted(r for r in rooms if r not in self._heads)
        if missing:
            for room, head in await self._conn.fetch(HEADS, missing):
                self._heads[room] = int(head)

    async def _priors(self, items: list[AppendItem]) -> dict[tuple[str, str, str], Event]:
        keys = {(i.room, i.sender, i.cid) for i in items if not has_nul(i)}
        if not keys:
            return {}
        return await fetch_priors(self._conn, keys)
