"""The relational store's contract (origin/store_port.py), run against every adapter.

SQLite on the test's own directory; PostgreSQL on the service scripts/services starts, in a
fresh schema per test that is dropped afterwards; Kafka as log of record with PostgreSQL as
store (KafkaStore), on a topic and shard name of the test's own, the topic deleted afterwards.
Each test opens its own trio-asyncio loop, as the node's supervisor does at process start. The
last sections hold what only one adapter has (PostgreSQL's migrations under concurrent starts,
its partitions, a failed transaction; Kafka's aborted transactions and fencing).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import outcome
import psutil
import pytest
import trio
import trio_asyncio
from services import require
from trio_asyncio import aio_as_trio

from node.config import Limits
from node.errors import CONFLICT, FORBIDDEN, INVALID, NOT_FOUND, UNAVAILABLE, GB6Error, leaves
from node.events import Event
from node.ids import new_id
from origin.kafka_store import KafkaStore
from origin.persister_main import Settings
from origin.pg_schema import SCHEMA_VERSION
from origin.pg_store import PgStore
from origin.records import FileRecord, Instance, Org, RoomRecord, Token, User
from origin.sqlite_store import SqliteStore, now_ms
from origin.store_port import Appended, AppendItem, AppendResult, RelationalStore
from tests.conftest import broker_pid, frozen, postgres_pids, wait_uncommitted

LIMITS = Limits(max_inflight_appends=2_000, writer_batch=500)
Batch = list[tuple[AppendItem, AppendResult]]


class Recorder:
    """The store's `on_appended`: keeps every batch and answers each op's `reply`."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def __call__(self, results: Batch) -> None:
        self.batches.append(results)
        for item, result in results:
            if item.reply is not None:
                item.reply(result)

    def fresh(self) -> list[Event]:
        """Every new (not repeated) event the store reported, in the order it reported them."""
        return [
            r.event
            for batch in self.batches
            for _, r in batch
            if isinstance(r, Appended) and not r.duplicate
        ]


@attrs.frozen
class Backend:
    """How to make an adapter on one test's own storage (again, to test reopening)."""

    name: str
    make: Callable[[Recorder], RelationalStore]
    dsn: str = ""
    schema: str = ""
    bootstrap: str = ""
    topic: str = ""


@asynccontextmanager
async def serving(backend: Backend, rec: Recorder | None = None) -> AsyncIterator[RelationalStore]:
    """A store serving inside a trio-asyncio loop; drained and closed on exit."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        store = backend.make(rec if rec is not None else Recorder())
        with trio.fail_after(20):
            await nursery.start(store.run)
        try:
            yield store
            with trio.fail_after(20):
                await store.wait_idle()
        finally:
            nursery.cancel_scope.cancel()


async def _pg(dsn: str, *statements: str) -> list[Any]:
    """Run statements on a connection of our own (outside any store); the last one's rows."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    rows: list[Any] = []
    conn = await aio_as_trio(asyncpg.connect)(dsn, timeout=10)
    try:
        for sql in statements:
            rows = await aio_as_trio(conn.fetch)(sql)
    finally:
        await aio_as_trio(conn.close)()
    return rows


async def _drop_schema(dsn: str, schema: str) -> None:
    async with trio_asyncio.open_loop():
        await _pg(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


# A sync fixture, so that require()'s skip keeps its reason (see tests/services.py).
@pytest.fixture(params=["sqlite", "postgres", "kafka"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield Backend("sqlite", lambda rec: SqliteStore(tmp_path / "gb6.db", LIMITS, rec))
    elif request.param == "kafka":
        yield from _kafka()
    else:
        yield from _postgres()


@pytest.fixture
def kafka_backend() -> Iterator[Backend]:
    yield from _kafka()


@pytest.fixture
def pg_backend() -> Iterator[Backend]:
    yield from _postgres()


def _postgres() -> Iterator[Backend]:
    """PostgreSQL in a schema of the test's own, dropped afterwards."""
    dsn = require("postgres")
    schema = f"gb6_store_test_{uuid.uuid4().hex[:12]}"
    try:
        yield Backend("postgres", lambda rec: PgStore(dsn, LIMITS, rec, schema=schema), dsn, schema)
    finally:
        trio.run(_drop_schema, dsn, schema)


def _kafka() -> Iterator[Backend]:
    """KafkaStore: a schema, a topic and a shard name of the test's own, removed afterwards."""
    dsn = require("postgres")
    bootstrap = require("kafka")
    suffix = uuid.uuid4().hex[:12]
    schema, topic, shard = f"gb6_store_test_{suffix}", f"gb6-store-test-{suffix}", f"t{suffix}"

    def make(rec: Recorder) -> RelationalStore:
        return KafkaStore(dsn, bootstrap, topic, shard, LIMITS, rec, schema=schema, partitions=2)

    try:
        yield Backend("kafka", make, dsn, schema, bootstrap, topic)
    finally:
        trio.run(_drop_schema, dsn, schema)
        _delete_topic(bootstrap, topic)


def _delete_topic(bootstrap: str, topic: str) -> None:
    from test_cluster import _delete_topics

    _delete_topics(bootstrap, [topic])


# --- helpers -------------------------------------------------------------------------------


@attrs.frozen
class Tenant:
    org: str
    instance: str
    alice: str
    bob: str
    carol: str


async def tenant(store: RelationalStore) -> Tenant:
    org = Org(new_id("org"), "acme", None, now_ms())
    await store.create_org(org)
    inst = Instance(new_id("ins"), org.id, "main", "local", "free", "active", now_ms())
    await store.create_instance(inst)
    users = []
    for name in ("alice", "bob", "carol"):
        user = User(new_id("usr"), inst.id, name, "member", now_ms())
        await store.create_user(user)
        users.append(user.id)
    return Tenant(org.id, inst.id, *users)


async def room(store: RelationalStore, t: Tenant, members: list[str] | None = None) -> str:
    rec = RoomRecord(new_id("room"), t.instance, "r", "chat", False, t.alice, now_ms())
    await store.create_room(rec, members if members is not None else [t.alice, t.bob])
    return rec.id


def item(room_id: str, sender: str, cid: str, **fields: Any) -> AppendItem:
    fields.setdefault("type", "message")
    if fields["type"] == "message":
        fields.setdefault("body", {"text": cid})
    return AppendItem(room=room_id, sender=sender, cid=cid, **fields)


async def submit(store: RelationalStore, it: AppendItem) -> Callable[[], outcome.Outcome[Appended]]:
    """Queue `it` without waiting for it; the returned function gives its outcome once known."""
    box: list[AppendResult] = []
    await store.submit_append(attrs.evolve(it, reply=box.append))

    def result() -> outcome.Outcome[Appended]:
        assert box, f"no outcome for {it.cid}"
        got = box[0]  # a fresh Outcome each time: an Outcome unwraps once
        return outcome.Error(got) if isinstance(got, GB6Error) else outcome.Value(got)

    return result


async def append(store: RelationalStore, it: AppendItem) -> Appended:
    result = await submit(store, it)
    with trio.fail_after(10):
        await store.wait_idle()
    return result().unwrap()


async def refused(store: RelationalStore, it: AppendItem, code: str) -> GB6Error:
    with pytest.raises(GB6Error) as info:
        await append(store, it)
    assert info.value.code == code, info.value
    return info.value


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events]


# --- the message path ----------------------------------------------------------------------


async def test_appends_get_gapless_seqs_per_room_in_commit_order(backend: Backend) -> None:
    rec = Recorder()
    async with serving(backend, rec) as store:
        t = await tenant(store)
        r1, r2 = await room(store, t), await room(store, t)
        pending = []
        for i in range(120):  # pipelined: nobody waits for an answer before the next op
            pending.append(await submit(store, item((r1, r2)[i % 3 == 0], t.alice, f"c{i}")))
        with trio.fail_after(20):
            await store.wait_idle()
        got = [p().unwrap() for p in pending]
        assert not any(a.duplicate for a in got)
        for r in (r1, r2):
            mine = [a.event for a in got if a.event.room == r]
            # Seqs follow submission order, from 1, without a gap.
            assert seqs(mine) == list(range(1, len(mine) + 1))
            # What the store answered is what it holds.
            assert await store.events_after(r, 0, 1000) == mine
        # The callback saw every op once, batches in commit order, each room's seqs rising.
        reported = rec.fresh()
        assert sorted((e.room, e.seq) for e in reported) == sorted(
            (a.event.room, a.event.seq) for a in got
        )
        for r in (r1, r2):
            assert seqs([e for e in reported if e.room == r]) == sorted(
                e.seq for e in reported if e.room == r
            )
        assert store.commits >= 1


async def test_repeat_cid_answers_the_original_and_writes_nothing(backend: Backend) -> None:
    rec = Recorder()
    async with serving(backend, rec) as store:
        t = await tenant(store)
        r = await room(store, t)
        first = await append(store, item(r, t.alice, "a", body={"text": "original"}))
        again = await append(store, item(r, t.alice, "a", body={"text": "different"}))
        assert again.duplicate and again.event == first.event
        assert again.event.body == {"text": "original"}
        # The same cid from someone else is another message.
        other = await append(store, item(r, t.bob, "a"))
        assert not other.duplicate and other.event.seq == 2
        # Twice in one go: one new event, one repeat of it.
        p1 = await submit(store, item(r, t.alice, "b"))
        p2 = await submit(store, item(r, t.alice, "b"))
        await store.wait_idle()
        assert not p1().unwrap().duplicate and p2().unwrap().duplicate
        assert p2().unwrap().event.seq == p1().unwrap().event.seq == 3
        assert seqs(await store.events_after(r, 0, 100)) == [1, 2, 3]
        assert seqs(rec.fresh()) == [1, 2, 3]
        # A repeat answers with the original even when its checks would fail now.
        edit = await append(store, item(r, t.alice, "e", type="edit", target=1, body={"text": "x"}))
        await append(store, item(r, t.alice, "d", type="delete", target=1))
        redo = await append(store, item(r, t.alice, "e", type="edit", target=1, body={"text": "y"}))
        assert redo.duplicate and redo.event.seq == edit.event.seq
        assert seqs(await store.events_after(r, 0, 100)) == [1, 2, 3, 4, 5]


async def test_concurrent_appends_from_many_tasks_stay_gapless(backend: Backend) -> None:
    tasks, each = 20, 15
    async with serving(backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        commits_before = store.commits
        per_task: dict[int, list[int]] = {}

        async def sender(n: int) -> None:
            got = []
            for i in range(each):
                got.append((await append(store, item(r, t.alice, f"t{n}-{i}"))).event.seq)
            per_task[n] = got

        async with trio.open_nursery() as nursery:
            for n in range(tasks):
                nursery.start_soon(sender, n)
        everything = sorted(s for got in per_task.values() for s in got)
        assert everything == list(range(1, tasks * each + 1))
        assert all(got == sorted(got) for got in per_task.values())
        assert seqs(await store.events_after(r, 0, 1000)) == everything
        # Group commit: many ops share a transaction.
        assert store.commits - commits_before < tasks * each


async def test_a_failing_op_fails_alone(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        ops = [
            item(r, t.alice, "m1"),
            item(r, t.alice, "bad-edit", type="edit", target=99, body={"text": "x"}),
            item(r, t.alice, "m2"),
            item(r, t.bob, "bad-thread", thread=42),
            item(r, t.bob, "react", type="react", target=1, emoji="+1"),
            item(r, t.alice, "m3"),
        ]
        pending = [await submit(store, op) for op in ops]
        await store.wait_idle()
        results = [p() for p in pending]
        errors = {
            ops[i].cid: r.error for i, r in enumerate(results) if isinstance(r, outcome.Error)
        }
        assert set(errors) == {"bad-edit", "bad-thread"}
        assert all(isinstance(e, GB6Error) and e.code == NOT_FOUND for e in errors.values())
        events = await store.events_after(r, 0, 100)
        assert [(e.cid, e.seq) for e in events] == [("m1", 1), ("m2", 2), ("react", 3), ("m3", 4)]
        # Nothing of the failed ops was kept: they can be sent again, correctly.
        fixed = await append(store, item(r, t.bob, "bad-thread", thread=1))
        assert fixed.event.seq == 5 and fixed.event.thread == 1


async def test_edit_delete_react_and_thread_checks(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        r, elsewhere = await room(store, t), await room(store, t)
        msg = (await append(store, item(r, t.alice, "m"))).event.seq
        for i in range(10):  # seqs that are messages there, and nothing here
            await append(store, item(elsewhere, t.alice, f"x{i}"))
        react = await append(store, item(r, t.bob, "r", type="react", target=msg, emoji="+1"))
        edit = await append(
            store, item(r, t.alice, "e1", type="edit", target=msg, body={"text": "m2"})
        )

        def op(cid: str, type_: str, target: int, sender: str = t.alice, **kw: Any) -> AppendItem:
            if type_ == "edit":
                kw.setdefault("body", {"text": "z"})
            if type_ == "react":
                kw.setdefault("emoji", "+1")
            return item(r, sender, cid, type=type_, target=target, **kw)

        # Targets must be messages of this room.
        for type_ in ("edit", "delete", "react"):
            await refused(store, op(f"{type_}-none", type_, 77), NOT_FOUND)
            await refused(store, op(f"{type_}-react", type_, react.event.seq), NOT_FOUND)
            await refused(store, op(f"{type_}-edit", type_, edit.event.seq), NOT_FOUND)
            await refused(store, op(f"{type_}-there", type_, 9), NOT_FOUND)
        await refused(store, item(r, t.bob, "th-none", thread=77), NOT_FOUND)
        await refused(store, item(r, t.bob, "th-react", thread=react.event.seq), NOT_FOUND)
        await refused(store, item(r, t.bob, "th-there", thread=9), NOT_FOUND)
        # Only the sender edits; the sender or a moderator deletes; anyone reacts.
        await refused(store, op("e-bob", "edit", msg, sender=t.bob), FORBIDDEN)
        await refused(store, op("d-bob", "delete", msg, sender=t.bob), FORBIDDEN)
        await append(store, op("r-carol", "react", msg, sender=t.carol, emoji="x"))
        reply = await append(store, item(r, t.bob, "th-ok", thread=msg))
        assert reply.event.thread == msg
        deleted = await append(store, op("d-mod", "delete", msg, sender=t.bob, may_moderate=True))
        assert deleted.event.type == "delete" and deleted.event.target == msg
        # A deleted message can be neither edited, reacted to, nor deleted again.
        for type_ in ("edit", "delete", "react"):
            await refused(store, op(f"{type_}-dead", type_, msg), CONFLICT)
        # It keeps its place in history, without its text or the text of its edits.
        history = {e.seq: e for e in await store.history(r, None, 100)}
        assert history[msg].deleted and history[msg].body is None
        assert history[edit.event.seq].body is None
        assert history[react.event.seq].emoji == "+1"
        assert seqs(list(history.values())) == list(range(1, 7))


async def test_history_pages_and_events_after(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        for i in range(25):
            await store.submit_append(item(r, t.alice, f"h{i}", body={"text": f"n{i}", "i": i}))
        await store.wait_idle()
        assert seqs(await store.history(r, None, 10)) == list(range(16, 26))
        assert seqs(await store.history(r, 16, 10)) == list(range(6, 16))
        assert seqs(await store.history(r, 6, 10)) == list(range(1, 6))
        assert await store.history(r, 1, 10) == []
        assert seqs(await store.events_after(r, 0, 10)) == list(range(1, 11))
        page = await store.events_after(r, 20, 10)
        assert seqs(page) == list(range(21, 26))
        assert page[0].body == {"text": "n20", "i": 20} and page[0].sender == t.alice
        assert page[0].cid == "h20" and page[0].type == "message"
        assert await store.events_after(r, 25, 10) == []
        assert await store.events_after("room_nope", 0, 10) == []
        assert await store.history("room_nope", None, 10) == []


async def test_search_every_word_newest_first_edits_and_deletes(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        r, other, foreign = await room(store, t), await room(store, t), await room(store, t)

        async def say(room_id: str, text: str) -> int:
            return (
                await append(store, item(room_id, t.alice, text, body={"text": text}))
            ).event.seq

        s1 = await say(r, "red apple pie")
        s2 = await say(r, "green apple")
        await say(r, "red car")
        s4 = await say(r, "An APPLE, bright red!")
        o1 = await say(other, "apple in the other room")
        await say(foreign, "apple nobody asked for")

        async def hits(query: str, rooms: list[str] | None = None) -> list[tuple[str, int]]:
            found = await store.search(rooms or [r, other], query, 50)
            return [(e.room, e.seq) for e in found]

        assert await hits("apple red") == [(r, s4), (r, s1)]
        assert await hits("apple") == [(other, o1), (r, s4), (r, s2), (r, s1)]
        assert await hits("apple", [r]) == [(r, s4), (r, s2), (r, s1)]
        assert await hits("apple blue") == []
        assert await hits("purple") == []
        assert await hits("") == [] and await hits("?!") == []
        assert len(await store.search([r, other], "apple", 2)) == 2
        (hit,) = await store.search([r], "pie", 10)
        assert hit.body == {"text": "red apple pie"} and hit.sender == t.alice
        assert hit.type == "message" and not hit.deleted and hit.edited is None
        # Case and Latin diacritics are folded, on both sides.
        cafe = await say(r, "Crème brûlée at the CAFÉ")
        assert await hits("creme cafe") == [(r, cafe)]
        assert await hits("BRÛLÉE") == [(r, cafe)]
        # Quotes and backslashes split words and are never part of one.
        quoted = await say(r, "don't \\panic\\ 'ok'")
        assert await hits("panic DON'T ok") == [(r, quoted)]

        # An edited message is found by its new text, shown with it and the edit's seq.
        whale = await say(r, "blue whale")
        edit = await append(
            store, item(r, t.alice, "e", type="edit", target=whale, body={"text": "grey shark"})
        )
        assert await hits("whale") == []
        (hit,) = await store.search([r], "shark grey", 10)
        assert hit.seq == whale and hit.body == {"text": "grey shark"}
        assert hit.edited == edit.event.seq
        # A deleted message never matches, whatever text it had.
        await append(store, item(r, t.alice, "d", type="delete", target=whale))
        assert await hits("shark") == [] and await hits("whale") == []
        await append(store, item(r, t.alice, "d1", type="delete", target=s4))
        assert await hits("apple red") == [(r, s1)]


# --- tenancy -------------------------------------------------------------------------------


async def test_tokens_and_revocation(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        tok = Token(new_id("tok"), t.alice, now_ms() + 60_000, False)
        await store.create_token(tok, "digest-a")
        assert await store.token("digest-a") == tok
        assert await store.token("digest-nope") is None
        assert not await store.revoke_token(t.bob, tok.id)  # not Bob's
        assert not await store.revoke_token(t.alice, "tok_nope")
        assert (await store.token("digest-a")) == tok
        assert await store.revoke_token(t.alice, tok.id)
        assert await store.token("digest-a") == attrs.evolve(tok, revoked=True)
        with pytest.raises(GB6Error) as info:  # one digest, one token
            await store.create_token(Token(new_id("tok"), t.bob, now_ms(), False), "digest-a")
        assert info.value.code == CONFLICT
        with pytest.raises(GB6Error) as info:
            await store.create_token(Token(new_id("tok"), "usr_nope", now_ms(), False), "d-b")
        assert info.value.code == CONFLICT


async def test_tenancy_is_loaded_back_and_bad_references_refused(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        child = Org(new_id("org"), "child", t.org, now_ms())
        await store.create_org(child)
        orgs, insts, users = await store.load_tenancy()
        assert {o.id: o.parent for o in orgs} == {t.org: None, child.id: t.org}
        assert [i.id for i in insts] == [t.instance]
        assert insts[0] == Instance(
            t.instance, t.org, "main", "local", "free", "active", insts[0].created_at
        )
        assert sorted(u.name for u in users) == ["alice", "bob", "carol"]

        async def fails(code: str, write: Any) -> None:
            with pytest.raises(GB6Error) as info:
                await write
            assert info.value.code == code, info.value

        await fails(NOT_FOUND, store.create_org(Org(new_id("org"), "x", "org_nope", now_ms())))
        await fails(CONFLICT, store.create_org(attrs.evolve(child, name="again")))
        await fails(
            CONFLICT,
            store.create_instance(
                Instance(new_id("ins"), "org_nope", "i", "local", "free", "active", now_ms())
            ),
        )
        await fails(CONFLICT, store.create_user(User(new_id("usr"), "ins_nope", "u", "member", 0)))
        await fails(
            CONFLICT,
            store.create_room(
                RoomRecord(new_id("room"), "ins_nope", "r", "chat", True, t.alice, 0), [t.alice]
            ),
        )
        # Nothing of a refused write was kept.
        assert len((await store.load_tenancy())[0]) == 2
        assert await store.load_rooms() == []


async def test_rooms_members_and_read_seqs(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        rec = RoomRecord(new_id("room"), t.instance, "general", "chat", True, t.alice, now_ms())
        await store.create_room(rec, [t.alice, t.bob])
        empty = await room(store, t, [t.alice])
        for i in range(3):
            await append(store, item(rec.id, t.alice, f"m{i}"))
        await store.set_read(rec.id, t.bob, 2)
        await store.set_read(rec.id, t.bob, 1)  # never moves back
        await store.set_read(rec.id, t.carol, 3)  # not a member: nothing happens
        await store.add_members(rec.id, [t.carol, t.bob])  # Bob already is: his read stays
        await store.remove_members(rec.id, [t.alice])
        rooms = {r.id: (r, head, members) for r, head, members in await store.load_rooms()}
        assert rooms[rec.id] == (rec, 3, {t.bob: 2, t.carol: 0})
        assert rooms[empty][1:] == (0, {t.alice: 0})
        with pytest.raises(GB6Error) as info:
            await store.create_room(rec, [t.alice])
        assert info.value.code == CONFLICT


async def test_a_deleted_user_is_not_added_to_rooms(backend: Backend) -> None:
    """A user deleted while an add or a room's creation naming them was checked and queued:
    the store adds them nowhere (the deletion removed their memberships; one added after it
    would stay, a deleted member of the room for good)."""
    async with serving(backend) as store:
        t = await tenant(store)
        r = await room(store, t, [t.alice])
        await store.delete_user(t.carol)
        await store.add_members(r, [t.bob, t.carol])
        made = await room(store, t, [t.alice, t.carol])
        rooms = {rec.id: members for rec, _, members in await store.load_rooms()}
        assert rooms == {r: {t.alice: 0, t.bob: 0}, made: {t.alice: 0}}


async def test_files_and_meta(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        rec = FileRecord(new_id("file"), r, t.alice, 1234, "image/png", now_ms())
        await store.create_file(rec)
        assert await store.file(rec.id) == rec
        assert await store.file("file_nope") is None
        with pytest.raises(GB6Error) as info:
            await store.create_file(FileRecord(new_id("file"), "room_nope", t.alice, 1, "a/b", 0))
        assert info.value.code == CONFLICT
        assert await store.meta("k") is None
        await store.set_meta("k", "v1")
        await store.set_meta("k", "v2")
        await store.set_meta("other", "")
        assert await store.meta("k") == "v2" and await store.meta("other") == ""


# --- restart -------------------------------------------------------------------------------


async def test_everything_survives_closing_and_reopening(backend: Backend) -> None:
    async with serving(backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        tok = Token(new_id("tok"), t.bob, now_ms() + 60_000, False)
        await store.create_token(tok, "digest-restart")
        await store.set_meta("epoch", "7")
        await store.set_read(r, t.bob, 0)
        for i in range(30):
            await store.submit_append(item(r, t.alice, f"p{i}", body={"text": f"pelican {i}"}))
        await store.wait_idle()
        edit = await append(
            store, item(r, t.alice, "e", type="edit", target=3, body={"text": "ibis"})
        )
        await append(store, item(r, t.alice, "d", type="delete", target=4))
        await store.set_read(r, t.bob, 10)
        before = await store.events_after(r, 0, 100)

    rec = Recorder()
    async with serving(backend, rec) as store:
        orgs, insts, users = await store.load_tenancy()
        assert [o.id for o in orgs] == [t.org] and len(users) == 3
        assert [i.id for i in insts] == [t.instance]
        ((room_rec, head, members),) = await store.load_rooms()
        assert room_rec.id == r and head == 32 and members == {t.alice: 0, t.bob: 10}
        assert await store.events_after(r, 0, 100) == before
        assert await store.token("digest-restart") == tok
        assert await store.meta("epoch") == "7"
        (hit,) = await store.search([r], "ibis", 10)
        assert hit.seq == 3 and hit.edited == edit.event.seq
        assert await store.search([r], "pelican 2", 10) == []  # edited away
        assert await store.search([r], "pelican 3", 10) == []  # deleted
        assert [e.seq for e in await store.search([r], "pelican 29", 10)] == [30]
        # The next seq follows the head; a repeat of an old cid still answers the original.
        assert (await append(store, item(r, t.alice, "after"))).event.seq == 33
        again = await append(store, item(r, t.alice, "p7"))
        assert again.duplicate and again.event.seq == 8
        assert seqs(await store.events_after(r, 0, 100)) == list(range(1, 34))


async def test_appends_queued_when_the_store_stops_are_committed(backend: Backend) -> None:
    """... and answered: a requester never waits for an ok that cannot come."""
    recorder = Recorder()
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        store = backend.make(recorder)
        with trio.fail_after(20):
            await nursery.start(store.run)
        t = await tenant(store)
        r = await room(store, t)
        for i in range(200):
            await store.submit_append(item(r, t.alice, f"q{i}"))
        nursery.cancel_scope.cancel()  # at once: no wait for the writer
    assert seqs(recorder.fresh()) == list(range(1, 201))
    async with serving(backend) as store:
        assert seqs(await store.events_after(r, 0, 1000)) == list(range(1, 201))


# --- PostgreSQL only ------------------------------------------------------------------------


async def _two_started(backend: Backend, nursery: trio.Nursery) -> list[RelationalStore]:
    """Two stores of `backend` started at once, as two processes starting together."""
    stores = [backend.make(Recorder()) for _ in range(2)]
    with trio.fail_after(20):
        async with trio.open_nursery() as starting:
            for s in stores:
                starting.start_soon(nursery.start, s.run)
    return stores


async def test_pg_two_stores_starting_at_once_migrate_once(pg_backend: Backend) -> None:
    """Two processes starting on one fresh schema: both serve, the migrations ran once."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        stores = await _two_started(pg_backend, nursery)
        t = await tenant(stores[0])
        assert (await stores[1].load_tenancy())[1][0].id == t.instance
        rows = await _pg(
            pg_backend.dsn, f'SELECT version FROM "{pg_backend.schema}".schema_version'
        )
        assert [r[0] for r in rows] == [SCHEMA_VERSION]  # one row: each migration ran once
        nursery.cancel_scope.cancel()


async def test_pg_slow_searches_leave_the_writer_a_connection(
    pg_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Searches of a common word over a large instance are slow. However many run, the writer
    keeps a connection to stage on: a first send to a room (its head read) is not held up."""
    import asyncio

    from origin.pg_store import PgStore

    async with serving(pg_backend) as store:
        assert isinstance(store, PgStore)
        t = await tenant(store)
        r1, r2 = await room(store, t), await room(store, t)
        await append(store, item(r1, t.alice, "m1"))
        learn = PgStore._learn_instances

        async def slowly(self: PgStore, c: Any, rooms: list[str]) -> None:
            if list(rooms) == [r1]:  # the searches' (asyncio side: the connection is held)
                await asyncio.sleep(3)
            await learn(self, c, rooms)

        monkeypatch.setattr(PgStore, "_learn_instances", slowly)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(store.search, [r1], "m1", 10)
            await trio.sleep(0.3)  # the searches have their connections
            with trio.fail_after(1.5):
                assert (await append(store, item(r2, t.alice, "first"))).event.seq == 1


async def test_pg_slow_reads_do_not_hold_up_sends(pg_backend: Backend) -> None:
    """Reads that hold every reader's connection (slow ones: a table locked, a large history)
    leave the appends' writer its own: a first send to a room, which reads the room's head,
    is answered at once, not after them."""
    from origin.pg_store import PgStore

    async with serving(pg_backend) as store:
        assert isinstance(store, PgStore)
        t = await tenant(store)
        r = await room(store, t)

        async def slow_read() -> None:
            await store._read(lambda c: c.execute("SELECT pg_sleep(3)"))

        async with trio.open_nursery() as nursery:
            for _ in range(8):  # twice the readers' connections: some wait for one
                nursery.start_soon(slow_read)
            await trio.sleep(0.3)  # the reads have their connections
            with trio.fail_after(1.5):
                assert (await append(store, item(r, t.alice, "first"))).event.seq == 1


async def test_pg_one_instances_slow_searches_do_not_queue_anothers(
    pg_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user searches a common word over a large instance, again and again (each search up to
    its 5 s limit). Another instance's search does not wait behind all of them: one instance's
    searches take their turns among themselves."""
    import asyncio

    from origin.pg_store import PgStore

    async with serving(pg_backend) as store:
        assert isinstance(store, PgStore)
        t, u = await tenant(store), await tenant(store)
        slow, quick = await room(store, t), await room(store, u)
        await append(store, item(slow, t.alice, "m1", body={"text": "word"}))
        await append(store, item(quick, u.alice, "m1", body={"text": "word"}))
        learn = PgStore._learn_instances

        async def slowly(self: PgStore, c: Any, rooms: list[str]) -> None:
            if list(rooms) == [slow]:  # the connection is held meanwhile
                await asyncio.sleep(2)
            await learn(self, c, rooms)

        monkeypatch.setattr(PgStore, "_learn_instances", slowly)
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(store.search, [slow], "word", 10)
            await trio.sleep(0.3)  # the first of them has its connection
            with trio.fail_after(1.5):
                assert [e.room for e in await store.search([quick], "word", 10)] == [quick]
            nursery.cancel_scope.cancel()


async def test_pg_a_migration_may_take_longer_than_a_statement(
    pg_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration that rebuilds a large store's indexes outlasts the pool's statement timeout
    (here 0.5 s against a migration of 1.5 s): cut short, it would roll back at every start and
    the origin would never serve. Two stores start at once: one migrates, the other waits."""
    from origin import pg_schema, pg_store

    monkeypatch.setattr(pg_store, "_COMMAND_TIMEOUT_S", 0.5)
    monkeypatch.setattr(pg_schema, "_MIGRATIONS", [*pg_schema._MIGRATIONS, "SELECT pg_sleep(1.5)"])
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await _two_started(pg_backend, nursery)
        rows = await _pg(
            pg_backend.dsn, f'SELECT version FROM "{pg_backend.schema}".schema_version'
        )
        assert [r[0] for r in rows] == [SCHEMA_VERSION + 1]
        nursery.cancel_scope.cancel()


async def test_pg_a_schema_of_the_previous_version_migrates_with_its_events(
    pg_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upgrading: a store made before the last migration, with events in its partitions, is
    migrated on start; its events, seqs and idempotency keys carry on as before."""
    from origin import pg_schema

    monkeypatch.setattr(pg_schema, "_MIGRATIONS", pg_schema._MIGRATIONS[:-1])
    async with serving(pg_backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        for i in range(5):
            await append(store, item(r, t.alice, f"c{i}", body={"text": f"heron {i}"}))
        before = await store.events_after(r, 0, 100)
    monkeypatch.undo()
    async with serving(pg_backend) as store:
        rows = await _pg(
            pg_backend.dsn, f'SELECT version FROM "{pg_backend.schema}".schema_version'
        )
        assert [r[0] for r in rows] == [SCHEMA_VERSION]
        assert await store.events_after(r, 0, 100) == before
        again = await append(store, item(r, t.alice, "c2"))
        assert again.duplicate and again.event.seq == 3
        assert (await append(store, item(r, t.alice, "c5"))).event.seq == 6
        assert [e.seq for e in await store.search([r], "heron 4", 10)] == [5]


async def test_pg_connections_commit_durably_plan_per_execution_and_never_jit(
    pg_backend: Backend,
) -> None:
    """What every pool of ours asks of its connections, whatever the server's defaults."""
    from origin.pg_store import open_pool

    async with trio_asyncio.open_loop():
        pool = await open_pool(pg_backend.dsn, pg_backend.schema, "gb6-test", 1)
        try:
            got = await aio_as_trio(pool.fetchrow)(
                "SELECT current_setting('synchronous_commit'),"
                " current_setting('plan_cache_mode'), current_setting('jit')"
            )
        finally:
            await aio_as_trio(pool.close)()
    assert tuple(got) == ("on", "force_custom_plan", "off")


async def test_pg_events_live_in_partitions_per_instance_and_month(pg_backend: Backend) -> None:
    async with serving(pg_backend) as store:
        t1, t2 = await tenant(store), await tenant(store)
        r1, r2 = await room(store, t1), await room(store, t2)
        await append(store, item(r1, t1.alice, "a"))
        await append(store, item(r2, t2.alice, "b"))
        month = (await store.events_after(r1, 0, 1))[0].ts
        rows = await _pg(
            pg_backend.dsn,
            f'SET search_path = "{pg_backend.schema}"',
            "SELECT instance, tableoid::regclass::text FROM events ORDER BY instance",
        )
        tables = {r[0]: r[1] for r in rows}
        assert set(tables) == {t1.instance, t2.instance}
        assert len(set(tables.values())) == 2
        import datetime

        day = datetime.datetime.fromtimestamp(month / 1000, tz=datetime.UTC)
        assert all(name.endswith(f"_{day.year}{day.month:02d}") for name in tables.values())


async def test_pg_a_new_instances_first_event_does_not_wait_for_reads_under_way(
    pg_backend: Backend,
) -> None:
    """An instance's first event needs its partitions made. Made while a read of `events` is
    under way (a long search, say), they do not wait for it: before, the whole batch waited
    for the read and was refused past the 5 s lock timeout, holding up every read after it."""
    import asyncpg

    async with serving(pg_backend) as store:
        t1 = await tenant(store)
        r1 = await room(store, t1)
        await append(store, item(r1, t1.alice, "a"))
        reader = await aio_as_trio(asyncpg.connect)(pg_backend.dsn, timeout=10)
        try:
            await aio_as_trio(reader.execute)(
                f'SET search_path = "{pg_backend.schema}"; BEGIN;'
                " SELECT count(*) FROM events WHERE body IS NOT NULL"
            )
            t2 = await tenant(store)
            r2 = await room(store, t2)
            assert (await append(store, item(r2, t2.alice, "b"))).event.seq == 1
            assert seqs(await store.events_after(r1, 0, 10)) == [1]
        finally:
            await aio_as_trio(reader.close)()


async def test_pg_next_months_partitions_are_made_in_the_last_days_of_a_month(
    pg_backend: Backend,
) -> None:
    """So that the first events of a month do not all wait for partitions at midnight."""
    import asyncpg

    from origin.pg_schema import Partitions, month_of

    async with serving(pg_backend):  # migrated
        pass
    _, start, end = month_of(now_ms())
    async with trio_asyncio.open_loop():
        conn = await aio_as_trio(asyncpg.connect)(pg_backend.dsn, timeout=10)
        try:
            await aio_as_trio(conn.execute)(f'SET search_path = "{pg_backend.schema}"')
            partitions = Partitions(pg_backend.schema)
            for instance, ts in (("ins_mid", start + (end - start) // 2), ("ins_end", end - 1)):
                await aio_as_trio(partitions.ensure)(conn, {instance}, ts)

            async def routed(instance: str, ts: int) -> bool:
                try:
                    await aio_as_trio(conn.execute)(
                        "INSERT INTO events(instance, room, seq, ts, type, sender, cid)"
                        f" VALUES ('{instance}', 'r', 1, {ts}, 'message', 'u', 'c')"
                    )
                except asyncpg.exceptions.CheckViolationError:  # no partition holds the row
                    return False
                return True

            assert await routed("ins_mid", end - 1)
            assert not await routed("ins_mid", end)  # made in the month's last days
            assert await routed("ins_end", end)
            assert not await routed("ins_end", month_of(end)[2])  # one month ahead, no more
        finally:
            await aio_as_trio(conn.close)()


async def test_pg_next_months_partitions_failing_do_not_fail_this_months_events(
    pg_backend: Backend,
) -> None:
    """Next month's partitions are not needed yet: when they cannot be made (other DDL holds
    the instance's table), this month's events are written all the same."""
    import hashlib

    import asyncpg

    from origin.pg_schema import Partitions, month_of

    async with serving(pg_backend):  # migrated
        pass
    _, _, end = month_of(now_ms())
    async with trio_asyncio.open_loop():
        conn = await aio_as_trio(asyncpg.connect)(pg_backend.dsn, timeout=10)
        other = await aio_as_trio(asyncpg.connect)(pg_backend.dsn, timeout=10)
        try:
            await aio_as_trio(conn.execute)(f'SET search_path = "{pg_backend.schema}"')
            await aio_as_trio(other.execute)(f'SET search_path = "{pg_backend.schema}"')
            early = end - 4 * 86_400_000  # this month's only
            await aio_as_trio(Partitions(pg_backend.schema).ensure)(conn, {"ins_a"}, early)
            parent = "ev_" + hashlib.md5(b"ins_a").hexdigest()  # the instance's table
            await aio_as_trio(other.execute)(
                f"BEGIN; LOCK TABLE {parent} IN SHARE UPDATE EXCLUSIVE MODE"
            )
            partitions = Partitions(pg_backend.schema)  # a new writer, near the month's end
            await aio_as_trio(partitions.ensure)(conn, {"ins_a"}, end - 1)  # does not raise
            await aio_as_trio(conn.execute)(
                "INSERT INTO events(instance, room, seq, ts, type, sender, cid)"
                f" VALUES ('ins_a', 'r', 1, {end - 1}, 'message', 'u', 'c')"
            )
            with pytest.raises(asyncpg.exceptions.CheckViolationError):  # not made (yet)
                await aio_as_trio(conn.execute)(
                    "INSERT INTO events(instance, room, seq, ts, type, sender, cid)"
                    f" VALUES ('ins_a', 'r', 2, {end}, 'message', 'u', 'c')"
                )
        finally:
            await aio_as_trio(other.close)()
            await aio_as_trio(conn.close)()


async def test_pg_failed_transaction_skips_and_reuses_no_seq(pg_backend: Backend) -> None:
    """A batch whose transaction fails is refused whole (`unavailable`), and the next batch
    takes the seqs it would have had: none skipped, none reused."""
    async with serving(pg_backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        assert (await append(store, item(r, t.alice, "m1"))).event.seq == 1
        (row,) = await _pg(
            pg_backend.dsn,
            f'SET search_path = "{pg_backend.schema}"',
            "SELECT tableoid::regclass::text FROM events",
        )
        month_table = row[0]
        instance_table = month_table.rsplit("_", 1)[0]
        # Take the instance's events away from the writer: its next insert cannot be routed.
        await _pg(
            pg_backend.dsn,
            f'SET search_path = "{pg_backend.schema}"',
            f"ALTER TABLE events DETACH PARTITION {instance_table}",
        )
        pending = [await submit(store, item(r, t.alice, f"lost{i}")) for i in range(3)]
        await store.wait_idle()
        for p in pending:
            with pytest.raises(GB6Error) as info:
                p().unwrap()
            assert info.value.code == UNAVAILABLE
        await _pg(
            pg_backend.dsn,
            f'SET search_path = "{pg_backend.schema}"',
            f"ALTER TABLE events ATTACH PARTITION {instance_table} FOR VALUES IN ('{t.instance}')",
        )
        assert (await append(store, item(r, t.alice, "m2"))).event.seq == 2
        assert (await append(store, item(r, t.alice, "lost0"))).event.seq == 3
        assert seqs(await store.events_after(r, 0, 10)) == [1, 2, 3]


async def test_pg_pipelined_batches_after_a_failed_insert_run_again_and_only_it_is_refused(
    pg_backend: Backend,
) -> None:
    """The writer sends the next batch while an INSERT runs. When that INSERT fails, the batch
    sent behind it (seqs after the failed ones) rolls back and runs again: only the failed
    batch is refused, acknowledged seqs stay gapless, and every refused op can be resent."""
    async with serving(_in_batches_of_ten(pg_backend)) as store:
        t = await tenant(store)
        r = await room(store, t)
        await _pg(
            pg_backend.dsn,
            f'SET search_path = "{pg_backend.schema}"',
            "ALTER TABLE events ADD CONSTRAINT no_poison"
            " CHECK (body IS NULL OR position('poison'::bytea in body) = 0)",
        )
        ops = [
            item(r, (t.alice, t.bob)[i % 2], f"m{i}", body={"text": "poison" if i == 95 else "ok"})
            for i in range(300)
        ]
        pending = [await submit(store, op) for op in ops]  # queued: 30 batches or so
        await store.wait_idle()
        got = [p() for p in pending]
        acked = [g.unwrap().event for g in got if isinstance(g, outcome.Value)]
        refused = [op for op, g in zip(ops, got, strict=True) if isinstance(g, outcome.Error)]
        assert ops[95] in refused and len(refused) <= 10  # the poisoned batch alone
        for g in got:
            if isinstance(g, outcome.Error):
                with pytest.raises(GB6Error) as info:
                    g.unwrap()
                assert info.value.code == UNAVAILABLE
        assert sorted(e.seq for e in acked) == list(range(1, len(acked) + 1))
        assert await store.events_after(r, 0, 1000) == sorted(acked, key=lambda e: e.seq)

        await _pg(
            pg_backend.dsn,
            f'SET search_path = "{pg_backend.schema}"',
            "ALTER TABLE events DROP CONSTRAINT no_poison",
        )
        resent = [await append(store, op) for op in refused]
        assert not any(a.duplicate for a in resent)
        assert [a.event.seq for a in resent] == list(range(len(acked) + 1, 301))
        again = await append(store, ops[0])
        assert again.duplicate and again.event == pending[0]().unwrap().event
        assert seqs(await store.events_after(r, 0, 1000)) == list(range(1, 301))


async def test_pg_event_ids_follow_commit_order(pg_backend: Backend) -> None:
    """The meter reads a PostgreSQL store's events by id (`id > offset`), so ids must follow
    commit order: a batch staged while an INSERT runs is sent only once that one committed.
    Here the first INSERT is held (the events table locked): the second is not at the server
    meanwhile, where the two would take ids at once; once both commit, ids follow seqs."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    # Batches of three: a quarter of that is no backlog to wait for, so the writer sends the
    # next batch behind every INSERT in flight.
    limits = Limits(max_inflight_appends=2_000, writer_batch=3)
    backend = attrs.evolve(
        pg_backend, make=lambda rec: PgStore(pg_backend.dsn, limits, rec, schema=pg_backend.schema)
    )
    async with serving(backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        await append(store, item(r, t.alice, "m0"))  # the writer has what it needs cached
        lock = await aio_as_trio(asyncpg.connect)(
            pg_backend.dsn, timeout=10, server_settings={"search_path": pg_backend.schema}
        )
        watcher = await aio_as_trio(asyncpg.connect)(pg_backend.dsn, timeout=10)
        held = "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))"

        async def inserts_held() -> int:
            # Out of the lock's transaction, which would see the activity of its first look.
            return int(await aio_as_trio(watcher.fetchval)(held, lock.get_server_pid()))

        try:
            await aio_as_trio(lock.execute)("BEGIN; LOCK TABLE events IN SHARE MODE")
            first = await submit(store, item(r, t.alice, "a"))
            with trio.fail_after(10):
                while await inserts_held() < 1:  # noqa: ASYNC110 (polled at the server)
                    await trio.sleep(0.02)
            later = [await submit(store, item(r, t.bob, f"b{i}")) for i in range(3)]
            with trio.move_on_after(1):
                while await inserts_held() < 2:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert await inserts_held() == 1
        finally:
            await aio_as_trio(lock.execute)("ROLLBACK")
            for conn in (lock, watcher):
                await aio_as_trio(conn.close)()
        with trio.fail_after(10):
            await store.wait_idle()
        got = [p().unwrap().event.seq for p in (first, *later)]
        assert got == [2, 3, 4, 5]
        rows = await _pg(
            pg_backend.dsn,
            f'SET search_path = "{pg_backend.schema}"',
            f"SELECT id FROM events WHERE room = '{r}' ORDER BY seq",
        )
        ids = [row[0] for row in rows]
        assert ids == sorted(ids) and len(set(ids)) == 5


def _in_batches_of_ten(pg_backend: Backend) -> Backend:
    """PostgreSQL whose writer takes at most ten ops per batch: many batches in a row."""
    small = Limits(max_inflight_appends=2_000, writer_batch=10)
    return attrs.evolve(
        pg_backend, make=lambda rec: PgStore(pg_backend.dsn, small, rec, schema=pg_backend.schema)
    )


async def test_pg_a_repeat_of_the_batch_in_flight_answers_the_original(
    pg_backend: Backend,
) -> None:
    """The batch staged while an INSERT runs cannot see its rows: when it repeats one of its
    keys, it waits for that INSERT, then answers with the original."""
    async with serving(_in_batches_of_ten(pg_backend)) as store:
        t = await tenant(store)
        r = await room(store, t)
        # Each cid comes back ten ops later: in the next batch of ten.
        ops = [item(r, t.alice, f"m{i % 10 + 10 * (i // 20)}") for i in range(200)]
        pending = [await submit(store, op) for op in ops]
        await store.wait_idle()
        got = [p().unwrap() for p in pending]
        firsts = {op.cid: a for op, a in zip(ops, got, strict=True) if not a.duplicate}
        assert len(firsts) == 100
        for op, a in zip(ops, got, strict=True):
            assert a.event == firsts[op.cid].event
        assert seqs(await store.events_after(r, 0, 1000)) == list(range(1, 101))


async def test_pg_repeats_of_committed_cids_among_pipelined_batches(pg_backend: Backend) -> None:
    """A plain batch is inserted without looking for earlier cids; one that repeats a committed
    key is refused by the unique key, runs again reading them, and the batch staged behind it
    is staged again: repeats answer the original, new ops get gapless seqs."""
    async with serving(_in_batches_of_ten(pg_backend)) as store:
        t = await tenant(store)
        r = await room(store, t)
        first = [await append(store, item(r, t.alice, f"old{i}")) for i in range(20)]
        # Every seventh op resends an old cid: most batches of ten hold one.
        ops = [
            item(r, t.alice, f"old{i % 20}" if i % 7 == 3 else f"new{i}", body={"text": "x"})
            for i in range(200)
        ]
        pending = [await submit(store, op) for op in ops]
        await store.wait_idle()
        got = [p().unwrap() for p in pending]
        for op, a in zip(ops, got, strict=True):
            if op.cid.startswith("old"):
                assert a.duplicate and a.event == first[int(op.cid[3:])].event
            else:
                assert not a.duplicate
        fresh = [a.event.seq for a in got if not a.duplicate]
        assert fresh == list(range(21, 21 + len(fresh)))  # in submission order, no gap
        assert seqs(await store.events_after(r, 0, 1000)) == list(range(1, 21 + len(fresh)))


async def test_pg_nul_characters_are_refused_alone(pg_backend: Backend) -> None:
    """PostgreSQL text cannot hold NUL: such an op is `invalid`, and only it is refused."""
    async with serving(pg_backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        bad = await submit(store, item(r, t.alice, "nul\x00cid"))
        good = await submit(store, item(r, t.alice, "fine", body={"text": "a\x00b"}))
        await store.wait_idle()
        with pytest.raises(GB6Error) as info:
            bad().unwrap()
        assert info.value.code == INVALID
        assert good().unwrap().event.body == {"text": "a\x00b"}
        assert (await store.events_after(r, 0, 10))[0].body == {"text": "a\x00b"}
        with pytest.raises(GB6Error) as info:
            await store.set_meta("k", "v\x00")
        assert info.value.code == INVALID


async def test_pg_unreachable_server_and_bad_settings_say_so() -> None:
    with pytest.raises(GB6Error) as info:
        PgStore("postgresql://gb6:gb6@127.0.0.1:55432/gb6", LIMITS, Recorder(), schema="Bad-Name")
    assert info.value.code == INVALID and "schema name" in info.value.message
    # Port 1 on loopback: nothing listens there.
    store = PgStore("postgresql://gb6:gb6@127.0.0.1:1/gb6", LIMITS, Recorder(), schema="gb6_x")
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        with trio.fail_after(20), pytest.raises(GB6Error) as info:
            await nursery.start(store.run)
    assert info.value.code == UNAVAILABLE and "connecting to PostgreSQL" in info.value.message


# --- Kafka only ------------------------------------------------------------------------------


async def _topic_records(backend: Backend, isolation: str) -> list[tuple[str, int]]:
    """Every (room, seq) in the backend's topic as a consumer with `isolation` reads it."""
    from origin.kafka_consumer import KafkaLogConsumer
    from origin.kafka_tail import committed_records_after

    consumer = KafkaLogConsumer(
        backend.bootstrap, backend.topic, {}, config={"isolation.level": isolation}
    )
    seen: list[tuple[str, int]] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(consumer.run)
        resume: dict[int, int] = {}
        while await trio.to_thread.run_sync(
            committed_records_after, backend.bootstrap, backend.topic, resume
        ):
            with trio.move_on_after(2):
                while True:
                    batch = await consumer.next_batch()
                    seen += [(e.room, e.seq) for e in batch.entries]
                    resume = dict(batch.resume)
            if isolation != "read_committed":
                break  # aborted records are not "committed records after": one pass
        nursery.cancel_scope.cancel()
    return seen


def test_kafka_a_topic_named_like_a_usage_topic_is_refused() -> None:
    """`x.usage` is the usage topic of log `x`: a shard whose log would be named so (its
    `kafka_topic`, or a shard named `a.usage` by default) is refused before it starts."""
    for topic in ("gb6-log-a.usage", "orders.usage"):
        with pytest.raises(GB6Error, match=r"must not end in \.usage") as info:
            KafkaStore("postgresql://x", "127.0.0.1:1", topic, "a", LIMITS, lambda _: None)
        assert info.value.code == INVALID
    KafkaStore("postgresql://x", "127.0.0.1:1", "gb6-log-usage", "usage", LIMITS, lambda _: None)


async def test_kafka_aborted_transaction_leaves_no_gap_and_no_duplicate(
    kafka_backend: Backend,
) -> None:
    """A batch whose Kafka transaction aborts after part of it reached the broker: clients
    get gapless seqs, each once; the log's readers see each (room, seq) once."""
    assert isinstance(kafka_backend, Backend)
    rec = Recorder()
    async with serving(kafka_backend, rec) as store:
        assert isinstance(store, KafkaStore)
        t = await tenant(store)
        r = await room(store, t)
        assert (await append(store, item(r, t.alice, "before"))).event.seq == 1
        store.log.abort_next_batch_after(2)
        pending = [await submit(store, item(r, t.alice, f"a{i}")) for i in range(5)]
        with trio.fail_after(20):
            await store.wait_idle()
        got = [p().unwrap().event.seq for p in pending]
        assert got == [2, 3, 4, 5, 6]
        assert seqs(await store.events_after(r, 0, 100)) == [1, 2, 3, 4, 5, 6]
        assert seqs(rec.fresh()) == [1, 2, 3, 4, 5, 6]
        # After the abort, the next batches go on from there.
        assert (await append(store, item(r, t.alice, "after"))).event.seq == 7
    committed = await _topic_records(kafka_backend, "read_committed")
    assert sorted(s for room_, s in committed if room_ == r) == list(range(1, 8))
    # The aborted records did reach the broker: an uncommitted reader sees them twice.
    raw = await _topic_records(kafka_backend, "read_uncommitted")
    assert sorted(s for room_, s in raw if room_ == r) == [1, 2, 2, 3, 3, 4, 5, 6, 7]


async def test_kafka_resends_known_only_to_postgresql_answer_their_originals(
    kafka_backend: Backend,
) -> None:
    """The sequencer plans a batch as if none of its ops were a resend of one it no longer
    holds in memory, and writes its transaction while PostgreSQL says whether one is. A resend
    found there aborts that transaction (redone without it), and a refusal waits for the answer:
    either way the resend gets its original, and seqs stay gapless."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    rec = Recorder()
    async with serving(kafka_backend, rec) as store:
        assert isinstance(store, KafkaStore)
        t = await tenant(store)
        r = await room(store, t)
        first = await append(store, item(r, t.alice, "a", body={"text": "original"}))
        edit = await append(store, item(r, t.alice, "e", type="edit", target=1, body={"text": "x"}))
        assert seqs(await store.events_after(r, 0, 10)) == [1, 2]  # waits for the persister
        # Hold the persister back, so the delete below stays in the sequencer's memory.
        conn = await aio_as_trio(asyncpg.connect)(kafka_backend.dsn, timeout=10)
        lock = conn.transaction()
        await aio_as_trio(lock.start)()
        await aio_as_trio(conn.execute)(f'LOCK TABLE "{kafka_backend.schema}".events IN SHARE MODE')
        try:
            deleted = await append(store, item(r, t.alice, "del", type="delete", target=1))
            assert deleted.event.seq == 3
            held = store._seq.unpersisted  # the delete's step dropped what PostgreSQL has
            assert (r, t.alice, "e") not in held.keys and (r, t.alice, "a") not in held.keys
            # Checked as new, the edit of a deleted message is refused; as a resend, it is not.
            again = await append(
                store, item(r, t.alice, "e", type="edit", target=1, body={"text": "y"})
            )
            assert again.duplicate and again.event == edit.event
            # A resend among new ops: its first transaction is withdrawn, the redo has seqs 4, 5.
            pending = [await submit(store, item(r, t.alice, cid)) for cid in ("a", "c", "d")]
            with trio.fail_after(20):
                await store.wait_idle()
            a, c, d = (p().unwrap() for p in pending)
            assert a.duplicate and a.event == first.event
            assert (c.duplicate, c.event.seq, d.duplicate, d.event.seq) == (False, 4, False, 5)
            assert store.withdrawn == 1
        finally:
            await aio_as_trio(lock.rollback)()
            await aio_as_trio(conn.close)()
        assert seqs(await store.events_after(r, 0, 10)) == [1, 2, 3, 4, 5]
        assert seqs(rec.fresh()) == [1, 2, 3, 4, 5]
    committed = await _topic_records(kafka_backend, "read_committed")
    assert sorted(s for room_, s in committed if room_ == r) == [1, 2, 3, 4, 5]


async def test_kafka_shard_starts_at_most_one_transaction_per_interval(
    kafka_backend: Backend,
) -> None:
    """Ops arriving one by one share transactions that start at most once per
    `log_transaction_interval_s` (each costs the broker and the origin a fixed CPU); every op
    is still answered, with gapless seqs in the order submitted."""
    async with serving(kafka_backend) as store:
        assert isinstance(store, KafkaStore)
        t = await tenant(store)
        r = await room(store, t)
        await append(store, item(r, t.alice, "first"))
        store.limits = attrs.evolve(store.limits, log_transaction_interval_s=0.2)
        before, t0 = store.commits, trio.current_time()
        pending = []
        for i in range(20):
            pending.append(await submit(store, item(r, t.alice, f"c{i}")))
            await trio.sleep(0.02)
        with trio.fail_after(20):
            await store.wait_idle()
        elapsed = trio.current_time() - t0
        assert [p().unwrap().event.seq for p in pending] == list(range(2, 22))
        assert store.commits - before <= elapsed / 0.2 + 1


class RaisingOnce(Recorder):
    """A `Recorder` whose `call`-th batch raises before any of its ops is answered."""

    def __init__(self, call: int) -> None:
        super().__init__()
        self.call = call

    def __call__(self, results: Batch) -> None:
        if len(self.batches) + 1 == self.call:
            self.batches.append(results)
            raise RuntimeError("a listener's bug, made by the test")
        super().__call__(results)


async def test_kafka_a_failing_on_appended_neither_stops_the_shard_nor_doubles_a_seq(
    kafka_backend: Backend,
) -> None:
    """`on_appended` raises for one committed batch while the next one's transaction has
    started (pipelined batches of two). The sequencer goes on: the log holds each (room, seq)
    once, gapless, and so does PostgreSQL, and later appends go on from there."""
    rec = RaisingOnce(call=3)
    async with serving(kafka_backend, rec) as store:
        assert isinstance(store, KafkaStore)
        t = await tenant(store)
        r = await room(store, t)
        await append(store, item(r, t.alice, "first"))
        store.limits = attrs.evolve(store.limits, writer_batch=2)
        pending = [await submit(store, item(r, t.alice, f"c{i}")) for i in range(12)]
        with trio.fail_after(20):
            await store.wait_idle()
        failed = {it.cid for it, _ in rec.batches[2]}
        answered = [p().unwrap().event.seq for i, p in enumerate(pending) if f"c{i}" not in failed]
        assert len(answered) == 12 - len(failed) and len(failed) >= 1
        assert (await append(store, item(r, t.alice, "after"))).event.seq == 14
        assert seqs(await store.events_after(r, 0, 100)) == list(range(1, 15))
    committed = await _topic_records(kafka_backend, "read_committed")
    assert sorted(s for room_, s in committed if room_ == r) == list(range(1, 15))


async def _filter_ready(store: KafkaStore, room_id: str) -> None:
    """Until the room's resend filter is loaded (origin/key_filter.py)."""
    filters = store._seq.key_filters
    deadline = trio.current_time() + 10
    while not (room_id in filters.rooms and filters.rooms[room_id].ready):
        assert trio.current_time() < deadline, f"the keys of {room_id} were not loaded"
        await trio.sleep(0.01)


async def test_kafka_room_filters_spare_new_cids_the_lookup_and_keep_old_ones(
    kafka_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart, the first commit to a room starts its resend filter, filled from
    PostgreSQL in pages (origin/key_filter.py). Once it is ready, new cids are appended without
    asking PostgreSQL, and a resend of any cid only PostgreSQL held still answers its original."""
    from origin import kafka_store

    monkeypatch.setattr(kafka_store, "_KEYS_PAGE", 3)  # 8 keys: pages of 3, 3 and 2
    async with serving(kafka_backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        firsts = [await append(store, item(r, t.alice, f"k{i}")) for i in range(8)]
    async with serving(kafka_backend) as store:
        assert isinstance(store, KafkaStore)
        assert (await append(store, item(r, t.bob, "n0"))).event.seq == 9
        await _filter_ready(store, r)
        asked = store.keys_asked
        news = [await append(store, item(r, t.bob, f"n{i}")) for i in range(1, 6)]
        assert [a.event.seq for a in news] == [10, 11, 12, 13, 14]
        assert store.keys_asked == asked  # not one lookup
        for first in firsts:
            again = await append(store, item(r, t.alice, first.event.cid))
            assert again.duplicate and again.event == first.event
        assert store.keys_asked >= asked + 8  # possible resends all: PostgreSQL was asked
        assert seqs(await store.events_after(r, 0, 100)) == list(range(1, 15))


async def test_kafka_room_filter_that_made_way_is_started_again(
    kafka_backend: Backend,
) -> None:
    """With the filters' memory full, the filter of the room idle longest makes way for a room
    in use. Meanwhile its new keys are asked of PostgreSQL, and a resend answers its original;
    back in use, the room starts a new filter, loaded from PostgreSQL, that spares new cids the
    lookup."""
    async with serving(kafka_backend) as store:
        assert isinstance(store, KafkaStore)
        filters = store._seq.key_filters
        filters.max_bytes, filters.idle_commits = 800, 2  # two first layers (357 bytes each)
        t = await tenant(store)
        a, b, c = [await room(store, t) for _ in range(3)]
        first = await append(store, item(a, t.alice, "a0"))
        await _filter_ready(store, a)
        await append(store, item(b, t.alice, "b0"))
        await append(store, item(c, t.alice, "c0"))  # `a` idle for two commits: it makes way
        assert a not in filters.rooms and c in filters.rooms and filters.evicted == 1
        again = await append(store, item(a, t.alice, "a0"))
        assert again.duplicate and again.event == first.event
        asked = store.keys_asked
        assert (await append(store, item(a, t.bob, "a1"))).event.seq == 2  # `b` makes way
        assert store.keys_asked > asked  # no filter for `a` when it was planned: asked
        assert b not in filters.rooms and filters.evicted == 2
        await _filter_ready(store, a)
        asked = store.keys_asked
        assert (await append(store, item(a, t.bob, "a2"))).event.seq == 3
        assert store.keys_asked == asked  # ruled out by the new filter
        again = await append(store, item(a, t.alice, "a0"))
        assert again.duplicate and again.event == first.event
        assert seqs(await store.events_after(a, 0, 10)) == [1, 2, 3]


async def test_kafka_room_whose_keys_cannot_be_read_holds_up_no_other_room(
    kafka_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A room whose keys PostgreSQL fails to read asks PostgreSQL about its keys, as before
    filters (a resend still answers its original); the rooms queued behind it get their
    filters all the same, and its own load is tried again until it succeeds."""
    from origin import kafka_store

    monkeypatch.setattr(kafka_store, "_KEYS_RETRY_S", (0.05, 0.2))
    async with serving(kafka_backend) as store:
        t = await tenant(store)
        bad = await room(store, t)
        good = await room(store, t)
        first = await append(store, item(bad, t.alice, "b0"))
        await append(store, item(good, t.alice, "g0"))
    # A real PostgreSQL error (division by zero), only ever raised by `bad`'s rows.
    working = kafka_store._ROOM_KEYS
    failing = working.replace(
        "ORDER BY", f"AND CASE WHEN room = '{bad}' THEN seq / (seq - seq) ELSE 0 END = 0 ORDER BY"
    )
    monkeypatch.setattr(kafka_store, "_ROOM_KEYS", failing)
    async with serving(kafka_backend) as store:
        assert isinstance(store, KafkaStore)
        filters = store._seq.key_filters
        assert (await append(store, item(bad, t.bob, "b1"))).event.seq == 2  # queued first
        assert (await append(store, item(good, t.bob, "g1"))).event.seq == 2
        await _filter_ready(store, good)  # not held up by `bad`
        assert not filters.rooms[bad].ready
        asked = store.keys_asked
        again = await append(store, item(bad, t.alice, "b0"))
        assert again.duplicate and again.event == first.event
        assert (await append(store, item(bad, t.bob, "b2"))).event.seq == 3
        assert store.keys_asked >= asked + 2  # no filter ready: both keys asked
        monkeypatch.setattr(kafka_store, "_ROOM_KEYS", working)  # PostgreSQL answers again
        await _filter_ready(store, bad)
        asked = store.keys_asked
        assert (await append(store, item(bad, t.bob, "b3"))).event.seq == 4
        assert store.keys_asked == asked  # a new cid, ruled out by the filter
        assert (await append(store, item(bad, t.alice, "b0"))).event == first.event
        assert seqs(await store.events_after(bad, 0, 10)) == [1, 2, 3, 4]


async def test_kafka_persister_process_is_started_again_when_it_dies(
    kafka_backend: Backend,
) -> None:
    """The persister runs in a child process. Killed, it is started again from its stored
    offsets: what was acknowledged meanwhile reaches PostgreSQL, each event once."""
    rec = Recorder()
    async with serving(kafka_backend, rec) as store:
        assert isinstance(store, KafkaStore) and store.persister is not None
        t = await tenant(store)
        r = await room(store, t)
        assert (await append(store, item(r, t.alice, "m1"))).event.seq == 1
        assert seqs(await store.events_after(r, 0, 10)) == [1]
        first = store.persister.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for i in range(2, 6):  # acknowledged by the log while no persister runs
            assert (await append(store, item(r, t.alice, f"m{i}"))).event.seq == i
        with trio.fail_after(30):
            assert seqs(await store.events_after(r, 0, 10)) == [1, 2, 3, 4, 5]
        assert store.persister.restarts == 1
        assert store.persister.pid not in (None, first)
    rows = await _pg_rows(kafka_backend, "SELECT seq FROM events WHERE room = $1", r)
    assert sorted(row[0] for row in rows) == [1, 2, 3, 4, 5]


async def test_kafka_rooms_written_by_a_persister_that_died_unreported_are_not_waited_on(
    kafka_backend: Backend,
) -> None:
    """A persister child reports what it wrote after each commit. One killed between the two
    wrote rows its parent never heard of, and its successor starts after them: reads of those
    rooms must not wait for PostgreSQL (they would fail `unavailable` after 10 s each)."""
    rec = Recorder()
    async with serving(kafka_backend, rec) as store:
        assert isinstance(store, KafkaStore) and store.persister is not None
        t = await tenant(store)
        r = await room(store, t)
        process = store.persister
        report = process._on_persisted
        process._on_persisted = lambda heads: None  # the child's reports are lost from here
        assert (await append(store, item(r, t.alice, "m1"))).event.seq == 1
        with trio.fail_after(30):
            query = "SELECT seq FROM events WHERE room = $1"
            while not await _pg_rows(kafka_backend, query, r):  # noqa: ASYNC110 - the child's
                await trio.sleep(0.05)  # written by the child, unreported
        process._on_persisted = report
        pid = process.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        with trio.fail_after(30):
            while process.restarts < 1 or process.pid in (None, pid):  # noqa: ASYNC110
                await trio.sleep(0.05)  # a new child is started after a pause
        with trio.fail_after(5):  # well under the reads' 10 s wait for the persister
            assert seqs(await store.events_after(r, 0, 10)) == [1]
            assert seqs(await store.history(r, None, 10)) == [1]


async def test_kafka_sequencer_does_not_wait_for_a_report_it_already_had(
    kafka_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above `_MAX_UNPERSISTED` entries in memory the sequencer waits for the persister. A
    report that came while it looked elsewhere must count: here the persister writes m1 and
    reports it while the next batch (bob's edit of m1, refused: no records) is looked up, and m1's
    entries join the memory only after that, as m1 settles. Nothing is left for the persister
    to report, so a wait for its next report would hold every later append for good."""
    from origin import kafka_store

    monkeypatch.setattr(kafka_store, "_MAX_UNPERSISTED", 1)  # m1's key and target are 2
    async with serving(kafka_backend) as store:
        assert isinstance(store, KafkaStore)
        t = await tenant(store)
        r = await room(store, t)
        store.limits = attrs.evolve(store.limits, writer_batch=1)  # the edit goes beside m1
        lookup = store._lookup
        edits: list[Callable[[], outcome.Outcome[Appended]]] = []
        calls = 0

        async def looking_up(needs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:  # m1's: the edit is queued before m1's transaction starts
                edit = item(r, t.bob, "e1", type="edit", target=1, body={"text": "x"})
                edits.append(await submit(store, edit))
            elif calls == 2:  # the edit's, while m1 commits: m1 is written and reported
                with trio.fail_after(30):
                    while store._seq.unpersisted.persisted.get(r, 0) < 1:  # noqa: ASYNC110
                        await trio.sleep(0.02)  # the persister's report, from its child
            return await lookup(needs)

        monkeypatch.setattr(store, "_lookup", looking_up)
        first = await submit(store, item(r, t.alice, "m1"))
        with trio.fail_after(30):
            await store.wait_idle()
        assert first().unwrap().event.seq == 1
        with pytest.raises(GB6Error) as info:
            edits[0]().unwrap()
        assert info.value.code == FORBIDDEN
        with trio.fail_after(10):
            assert (await append(store, item(r, t.alice, "m2"))).event.seq == 2


async def test_kafka_persister_process_exits_when_its_stdin_ends(kafka_backend: Backend) -> None:
    """The child's stdin is its parent's pipe: its end (the parent stopped it, or died) makes
    the child exit, even with nothing to write, its stdout still open."""
    async with serving(kafka_backend) as store:  # the schema and the topic exist
        assert isinstance(store, KafkaStore)
        settings = Settings(store.dsn, store.schema, store.bootstrap, store.topic)
        child = subprocess.Popen(  # noqa: ASYNC220 - its pipes are read in a thread below
            [sys.executable, "-m", "origin.persister_main"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(settings.encode())
            child.stdin.flush()
            line = await trio.to_thread.run_sync(child.stdout.readline)
            assert orjson.loads(line).keys() == {"ready"}
            child.stdin.close()
            assert await trio.to_thread.run_sync(lambda: child.wait(15)) == 0
        finally:
            child.kill()
            child.wait()


async def test_kafka_persister_process_says_why_it_stops(kafka_backend: Backend) -> None:
    """A child whose log cannot be read (here: no such topic) exits 1, saying why in one
    structured line, not a traceback."""
    async with serving(kafka_backend) as store:  # the schema exists
        assert isinstance(store, KafkaStore)
        settings = Settings(store.dsn, store.schema, store.bootstrap, store.topic + "-missing")
        done = await trio.run_process(
            [sys.executable, "-m", "origin.persister_main"],
            stdin=settings.encode(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert done.returncode == 1 and done.stdout == b""
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]
    assert [line["event"] for line in lines] == ["persister_failed"]
    assert "-missing" in lines[0]["error"] and "Traceback" not in done.stderr.decode()


async def test_the_persister_writes_a_batch_read_again_once(pg_backend: Backend) -> None:
    """The persister is idempotent: a batch read again (a zombie persister beside its successor,
    a crash before its offsets were known) or one overlapping what is written adds only what is
    new, applies an edit or a delete once, and never moves the stored offsets back."""
    from origin.kafka_records import encode
    from origin.log_port import LogBatch, LogEntry
    from origin.pg_persister import PgPersister, prepare
    from origin.pg_store import open_pool

    async with serving(pg_backend) as store:  # the schema, migrated
        t = await tenant(store)
        r = await room(store, t)
        ts = now_ms()

        def batch(first: int, events: list[Event], resume: int) -> LogBatch:
            entries = []
            for n, e in enumerate(events, start=first):
                record = encode(t.instance, e)
                entries.append(LogEntry(record.room, record.seq, record.payload, 0, n))
            return LogBatch(tuple(entries), {0: resume})

        m1 = Event(r, 1, ts, "message", t.alice, "c1", body={"text": "one"})
        m2 = Event(r, 2, ts, "message", t.alice, "c2", body={"text": "two"})
        edit = Event(r, 3, ts, "edit", t.alice, "c3", body={"text": "uno"}, target=1)
        delete = Event(r, 4, ts, "delete", t.alice, "c4", target=2)
        m5 = Event(r, 5, ts, "message", t.bob, "c5", body={"text": "five"})
        pool = await open_pool(pg_backend.dsn, pg_backend.schema, "test-persister", 2)
        try:
            await aio_as_trio(prepare)(pool, "topic", "persister")
            heads: list[dict[str, int]] = []
            persister = PgPersister(pool, pg_backend.schema, "topic", None, heads.append)  # type: ignore[arg-type]
            with trio.fail_after(30):  # a replay that failed would be retried forever
                await persister.write(batch(0, [m1, m2, edit], 3))
                assert persister.replays == 0
                await persister.write(batch(0, [m1, m2, edit], 3))  # the same batch again
                await persister.write(batch(1, [m2, edit, delete, m5], 5))  # overlapping
                assert persister.replays == 2
                await persister.write(batch(0, [m1], 1))  # an old one: offsets stay where they are
            assert heads == [{r: 3}, {r: 3}, {r: 5}, {r: 1}]
            got = await store.events_after(r, 0, 10)
            assert [(e.seq, e.cid) for e in got] == [
                (1, "c1"),
                (2, "c2"),
                (3, "c3"),
                (4, "c4"),
                (5, "c5"),
            ]
            q = "SELECT seq, edited, current_body, deleted FROM events WHERE room = $1 ORDER BY seq"
            rows = [tuple(x) for x in await aio_as_trio(pool.fetch)(q, r)]
            assert rows == [
                (1, 3, b'{"text":"uno"}', False),  # edited once, by seq 3
                (2, None, None, True),
                (3, None, None, False),
                (4, None, None, False),
                (5, None, None, False),
            ]
            offsets = await aio_as_trio(prepare)(pool, "topic", "persister")
            assert offsets == {0: 5}
        finally:
            await aio_as_trio(pool.close)()


async def _pg_rows(backend: Backend, query: str, *args: Any) -> list[Any]:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    async with trio_asyncio.open_loop():
        conn = await aio_as_trio(asyncpg.connect)(backend.dsn, timeout=10)
        try:
            await aio_as_trio(conn.execute)(f'SET search_path = "{backend.schema}"')
            return list(await aio_as_trio(conn.fetch)(query, *args))
        finally:
            await aio_as_trio(conn.close)()


async def test_kafka_a_second_store_of_the_shard_fences_the_first(kafka_backend: Backend) -> None:
    """Two incarnations of one shard: the later one takes the log; the earlier (a zombie)
    is refused every append from then on and writes nothing."""
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        zombie = kafka_backend.make(Recorder())
        with trio.fail_after(20):
            await nursery.start(zombie.run)
        t = await tenant(zombie)
        r = await room(zombie, t)
        assert (await append(zombie, item(r, t.alice, "m1"))).event.seq == 1
        successor = kafka_backend.make(Recorder())
        with trio.fail_after(20):
            await nursery.start(successor.run)
        err = await refused(zombie, item(r, t.alice, "zombie"), UNAVAILABLE)
        assert "stopped appending" in err.message and "fenced" in err.message
        with pytest.raises(GB6Error) as info:  # and every later one, at once
            await zombie.submit_append(item(r, t.alice, "zombie2"))
        assert info.value.code == UNAVAILABLE
        assert (await append(successor, item(r, t.alice, "m2"))).event.seq == 2
        assert [(e.seq, e.cid) for e in await successor.events_after(r, 0, 10)] == [
            (1, "m1"),
            (2, "m2"),
        ]
        nursery.cancel_scope.cancel()


async def test_kafka_sends_are_acknowledged_while_postgresql_is_frozen_and_land_there_once(
    kafka_backend: Backend,
) -> None:
    """PostgreSQL stops answering (frozen: a failover under way, a partition) while a shard
    serves. Sends to a room whose resend filter is ready need nothing of it: the log of record
    takes them and they are acknowledged meanwhile, and a resend among them answers its
    original. Once PostgreSQL answers again, the persister writes each exactly once, with
    gapless seqs, and reads see them."""
    async with serving(kafka_backend) as store:
        assert isinstance(store, KafkaStore)
        t = await tenant(store)
        r = await room(store, t)
        await append(store, item(r, t.alice, "m0"))
        await _filter_ready(store, r)
        with frozen(*postgres_pids(kafka_backend.dsn)), trio.fail_after(15):
            acked = [await append(store, item(r, t.alice, f"f{i}")) for i in range(20)]
            again = await append(store, item(r, t.alice, "f3"))
        assert [a.event.seq for a in acked] == list(range(2, 22))
        assert again.duplicate and again.event == acked[3].event
        with trio.fail_after(60):
            events = await store.events_after(r, 0, 100)
        assert seqs(events) == list(range(1, 22))
        assert [e.cid for e in events] == ["m0"] + [f"f{i}" for i in range(20)]


async def test_kafka_a_store_stopped_while_the_broker_does_not_answer_stops_at_once(
    kafka_backend: Backend,
) -> None:
    """The broker does not answer while a shard starts its log (frozen): stopping the store
    then (the origin's SIGTERM) must not wait out the log's start (the topic, then each lane's
    `init_transactions`, up to the commit timeout each: 30 s here), or the origin would outlive
    any grace period. An in-place recovery starts its new log the same way."""
    pid = broker_pid(kafka_backend.bootstrap)
    async with trio_asyncio.open_loop():
        store = _short_commits(kafka_backend, LIMITS, 30.0).make(Recorder())
        with frozen(pid):
            with trio.move_on_after(3) as waited:  # PostgreSQL answers; the broker does not
                async with trio.open_nursery() as nursery:
                    await nursery.start(store.run)
            assert waited.cancelled_caught  # it was still starting
            assert trio.current_time() - waited.deadline < 5


async def test_kafka_a_batch_whose_outcome_is_unknown_is_learned_and_the_shard_serves_again(
    kafka_backend: Backend,
) -> None:
    """The broker stops answering during a commit, past the commit timeout and the abort's: the
    batch's op is `unavailable`, the store refuses appends and says it stopped. Once the broker
    is back, the store recovers without a restart: the transaction left open is settled
    (committed or aborted, either may happen), and the shard goes on with no gap and no
    duplicate; if the batch was committed, its event is handed to `on_recovered` (the shard
    publishes it) and a resend of its cid gets it as a repeat."""
    pid = broker_pid(kafka_backend.bootstrap)
    async with serving(_short_commits(kafka_backend, LIMITS, 2.0)) as store:
        recovered, t, r = await _recorded_room(store)
        with frozen(pid):
            result = await submit(store, item(r, t.alice, "unknown"))
            with trio.fail_after(30):
                await store.wait_idle()
            with pytest.raises(GB6Error) as info:
                result().unwrap()
            assert info.value.code == UNAVAILABLE
            assert "stopped appending" in info.value.message
            assert store.stopped is not None
            with pytest.raises(GB6Error):  # refused at once while it recovers
                await store.submit_append(item(r, t.alice, "meanwhile"))
        await _serving_again(store, 120)
        assert store.recoveries == 1
        again = await append(store, item(r, t.alice, "unknown"))
        after = await append(store, item(r, t.alice, "m3"))
        events = await store.events_after(r, 0, 10)
        assert seqs(events) == list(range(1, len(events) + 1))
        assert sorted(e.cid for e in events) == sorted({"m1", "unknown", "m3"})
        if recovered:  # the unknown batch had committed: it is the room's seq 2
            assert [(e.seq, e.cid) for e in recovered] == [(2, "unknown")]
            assert again.duplicate and again.event.seq == 2 and after.event.seq == 3
        else:  # it had not: the resend is new, and takes seq 2
            assert not again.duplicate and again.event.seq == 2 and after.event.seq == 3


async def test_kafka_a_fault_of_ours_in_a_commit_is_an_unknown_outcome_not_an_acknowledgement(
    kafka_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log's append fails with an error that is not the log's answer (a bug of ours) after
    the transaction committed. Its op is not acknowledged (it might not be in the log) and the
    store keeps running: it stops appending, learns the batch's outcome from the log as after a
    broker's silence, and serves again; a resend gets the committed original."""
    async with serving(kafka_backend) as store:
        assert isinstance(store, KafkaStore)
        recovered, t, r = await _recorded_room(store)
        real = store.log.append_batch

        async def committed_then_broken(*args: Any, **kwargs: Any) -> None:
            await real(*args, **kwargs)
            monkeypatch.undo()  # once
            raise RuntimeError("a fault after the commit")

        monkeypatch.setattr(store.log, "append_batch", committed_then_broken)
        err = await refused(store, item(r, t.alice, "faulted"), UNAVAILABLE)
        assert "a fault after the commit" in err.message
        await _serving_again(store, 60)
        assert store.recoveries == 1
        assert [(e.seq, e.cid) for e in recovered] == [(2, "faulted")]
        again = await append(store, item(r, t.alice, "faulted"))
        assert again.duplicate and again.event.seq == 2
        assert (await append(store, item(r, t.alice, "m3"))).event.seq == 3
        assert [(e.seq, e.cid) for e in await store.events_after(r, 0, 10)] == [
            (1, "m1"),
            (2, "faulted"),
            (3, "m3"),
        ]


async def test_kafka_a_batch_whose_outcome_is_unknown_is_answered_while_the_persister_is_behind(
    kafka_backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sequencer holds the next batches while the persister is behind (over
    `_MAX_UNPERSISTED` entries; here PostgreSQL is frozen). A batch in flight whose outcome
    turns unknown meanwhile (the broker stops answering during its commit) is answered
    `unavailable` at once, with the ops held: not once the persister catches up, which it
    cannot do before the recovery (its reads stop at the open transaction), and the recovery
    starts only once every op taken is answered. Once both services are back, the shard
    recovers and goes on gapless."""
    from origin import kafka_store

    monkeypatch.setattr(kafka_store, "_MAX_UNPERSISTED", 1)  # a batch's key and target are 2
    broker, pg = broker_pid(kafka_backend.bootstrap), postgres_pids(kafka_backend.dsn)
    limits = attrs.evolve(LIMITS, writer_batch=1)  # batches of one, pipelined
    async with serving(_short_commits(kafka_backend, limits, 2.0)) as store:
        _, t, r = await _recorded_room(store)
        assert isinstance(store, KafkaStore)
        await _filter_ready(store, r)  # new cids need nothing of PostgreSQL
        with trio.fail_after(30):
            while not store._seq.unpersisted.caught_up([r]):  # noqa: ASYNC110
                await trio.sleep(0.02)  # m1 is in PostgreSQL: nothing held for it
        real, calls, stopped = store.log.append_batch, [0], []

        async def appending(records: Any, **kw: Any) -> None:
            calls[0] += 1
            if calls[0] == 2:  # the second batch: the broker stops answering
                os.kill(broker, signal.SIGSTOP)
                stopped.append(broker)
            await real(records, **kw)

        monkeypatch.setattr(store.log, "append_batch", appending)
        try:
            with frozen(*pg):
                results = [await submit(store, item(r, t.alice, f"a{i}")) for i in range(4)]
                with trio.fail_after(20):  # the commit's timeout and the abort's, 2 s each
                    await store.wait_idle()
                assert results[0]().unwrap().event.seq == 2
                for result in results[1:]:
                    with pytest.raises(GB6Error) as info:
                        result().unwrap()
                    assert info.value.code == UNAVAILABLE
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        await _serving_again(store, 120)
        after = await append(store, item(r, t.alice, "after"))
        events = await store.events_after(r, 0, 10)
        assert seqs(events) == list(range(1, len(events) + 1)) and events[-1].seq == after.event.seq


async def test_kafka_a_batch_committed_while_its_outcome_was_unknown_is_published_once_learned(
    kafka_backend: Backend,
) -> None:
    """The broker has a batch's records and stops answering before the commit request arrives:
    the commit and the abort time out (the op is `unavailable`), and the broker, once back,
    commits it. The recovery learns that from the log: the event goes to `on_recovered` once,
    in place, and a resend of its cid gets it as a repeat."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]

    pid = broker_pid(kafka_backend.bootstrap)
    # Every cid is asked of PostgreSQL (no resend filter): the batch is written while its
    # check runs, and the check waits on a lock the test holds.
    limits = attrs.evolve(LIMITS, key_filter_bytes=0)
    async with serving(_short_commits(kafka_backend, limits, 4.0)) as store:
        recovered, t, r = await _recorded_room(store)
        lock = await aio_as_trio(asyncpg.connect)(kafka_backend.dsn, timeout=10)
        try:
            await aio_as_trio(lock.execute)("BEGIN")
            await aio_as_trio(lock.execute)(
                f'LOCK TABLE "{kafka_backend.schema}".event_keys IN ACCESS EXCLUSIVE MODE'
            )
            result = await submit(store, item(r, t.alice, "committed"))
            await trio.to_thread.run_sync(
                wait_uncommitted, kafka_backend.bootstrap, kafka_backend.topic, r, 2
            )
            with frozen(pid):
                await aio_as_trio(lock.execute)("ROLLBACK")  # the check says: commit
                with trio.fail_after(30):
                    await store.wait_idle()
                with pytest.raises(GB6Error) as info:
                    result().unwrap()
                assert "stopped appending" in info.value.message
        finally:
            await aio_as_trio(lock.close)()
        await _serving_again(store, 120)
        assert [(e.seq, e.cid) for e in recovered] == [(2, "committed")]
        again = await append(store, item(r, t.alice, "committed"))
        assert again.duplicate and again.event.seq == 2
        assert (await append(store, item(r, t.alice, "m3"))).event.seq == 3
        events = await store.events_after(r, 0, 10)
        assert [(e.seq, e.cid) for e in events] == [(1, "m1"), (2, "committed"), (3, "m3")]


async def _serving_again(store: KafkaStore, within_s: float) -> None:
    """Once `store` appends again after it stopped (polled, as /readyz does)."""
    with trio.fail_after(within_s):
        while store.stopped is not None:  # noqa: ASYNC110
            await trio.sleep(0.1)


async def _recorded_room(store: RelationalStore) -> tuple[list[Event], Tenant, str]:
    """What `store` hands to `on_recovered` from now on, a tenant, and a room with seq 1."""
    assert isinstance(store, KafkaStore)
    recovered: list[Event] = []
    store.on_recovered = recovered.extend
    t = await tenant(store)
    r = await room(store, t)
    assert (await append(store, item(r, t.alice, "m1"))).event.seq == 1
    return recovered, t, r


def _short_commits(backend: Backend, limits: Limits, timeout_s: float) -> Backend:
    """`backend`'s schema and topic, for Kafka stores (a shard of their own) that give up on a
    commit after `timeout_s`."""

    def make(rec: Recorder) -> RelationalStore:
        return KafkaStore(
            backend.dsn,
            backend.bootstrap,
            backend.topic,
            f"u{uuid.uuid4().hex[:12]}",
            limits,
            rec,
            schema=backend.schema,
            partitions=2,
            commit_timeout_s=timeout_s,
        )

    return attrs.evolve(backend, make=make)


async def test_kafka_a_shard_cut_off_while_another_origin_took_over_stops_for_good(
    kafka_backend: Backend,
) -> None:
    """The broker stops answering during a commit, and meanwhile another origin of the shard
    starts (it records its incarnation in PostgreSQL before it takes the transactional id).
    This one, the zombie now, does not recover: taking the id back would fence the origin that
    serves the shard. It stops appending for good, and says why, and stops its persister child
    (the newer origin's writes the log)."""
    pid = broker_pid(kafka_backend.bootstrap)
    async with serving(_short_commits(kafka_backend, LIMITS, 2.0)) as store:
        assert isinstance(store, KafkaStore) and store.persister is not None
        _, t, r = await _recorded_room(store)
        child = store.persister.pid
        assert child is not None
        with frozen(pid):
            result = await submit(store, item(r, t.alice, "cut off"))
            await _pg(
                kafka_backend.dsn,
                f"UPDATE \"{kafka_backend.schema}\".meta SET value = 'another'"
                " WHERE key LIKE 'log_writer:%'",
            )
            with trio.fail_after(30):
                await store.wait_idle()
            with pytest.raises(GB6Error):
                result().unwrap()
        with trio.fail_after(60):
            while "another origin" not in getattr(store.stopped, "message", ""):  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert not store.log.serving and store.recoveries == 0  # the id was not taken back
        with pytest.raises(GB6Error) as info:
            await store.submit_append(item(r, t.alice, "after"))
        assert info.value.code == UNAVAILABLE and "another origin" in info.value.message
        with trio.fail_after(15):
            while psutil.pid_exists(child):  # noqa: ASYNC110 - nothing to wait on
                await trio.sleep(0.05)
        assert store.persister.pid is None and store.persister.restarts == 0


async def test_kafka_a_failed_start_of_another_origin_gives_the_shard_back(
    kafka_backend: Backend,
) -> None:
    """Another origin of the shard starts (an operator's slip, say): it records its
    incarnation, takes the transactional id, fencing this one, and fails before it serves
    (here: stopped during its recovery). It gives the shard back: this one finds itself the
    newest again, takes the id back and goes on, instead of stopping for good with no origin
    serving the shard; whether it found out it was fenced before the give-back (and stopped
    appending, and its persister) or after it."""
    async with serving(_short_commits(kafka_backend, LIMITS, 5.0)) as store:
        assert isinstance(store, KafkaStore)
        _, t, r = await _recorded_room(store)

        def twin_store() -> KafkaStore:  # a store runs once: one per start
            return KafkaStore(
                kafka_backend.dsn,
                kafka_backend.bootstrap,
                kafka_backend.topic,
                store._shard,
                LIMITS,
                Recorder(),
                schema=kafka_backend.schema,
                partitions=2,
                commit_timeout_s=5.0,
            )

        for found_out_first in (False, True):
            twin = twin_store()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(twin.run)
                with trio.fail_after(30):
                    while not twin.log.serving:  # noqa: ASYNC110 - it fenced the store
                        await trio.sleep(0.02)
                if found_out_first:
                    await refused(store, item(r, t.alice, "fenced"), UNAVAILABLE)
                    with trio.fail_after(60):
                        while "another origin" not in getattr(store.stopped, "message", ""):  # noqa: ASYNC110
                            await trio.sleep(0.1)
                nursery.cancel_scope.cancel()  # it fails before it serves
            if not found_out_first:
                await refused(store, item(r, t.alice, "fenced"), UNAVAILABLE)
            await _serving_again(store, 60)
        assert store.recoveries == 2
        assert store.persister_restarts == 1  # stopped when fenced, started when given back
        assert (await append(store, item(r, t.alice, "fenced"))).event.seq == 2
        events = await store.events_after(r, 0, 10)
        assert [(e.seq, e.cid) for e in events] == [(1, "m1"), (2, "fenced")]
        assert store.persister is not None and store.persister.pid is not None


async def test_kafka_a_shard_fenced_by_an_older_writer_takes_its_log_back(
    kafka_backend: Backend,
) -> None:
    """A producer of the shard's transactional id that is not a newer origin fences the store
    (a zombie that took the id back before it found out it was one; the broker times out a
    transaction likewise): the store, still the newest origin, recovers in place and takes the
    id back, fencing that producer. Nothing it answered is lost, nothing doubles."""
    from origin.kafka_log import KafkaLog
    from origin.log_port import LogFenced, LogRecord

    async with serving(_short_commits(kafka_backend, LIMITS, 5.0)) as store:
        assert isinstance(store, KafkaStore)
        _, t, r = await _recorded_room(store)
        older = KafkaLog(
            kafka_backend.bootstrap, kafka_backend.topic, store.log.transactional_id, partitions=2
        )
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await nursery.start(older.run)  # its init_transactions fences the store
            err = await refused(store, item(r, t.alice, "fenced"), UNAVAILABLE)
            assert "fenced" in err.message
            await _serving_again(store, 60)
            assert store.recoveries == 1
            with pytest.raises(LogFenced):  # the store took the id back
                await older.append_batch([LogRecord(r, 99, b"never")])
            nursery.cancel_scope.cancel()
        assert (await append(store, item(r, t.alice, "fenced"))).event.seq == 2
        assert (await append(store, item(r, t.alice, "after"))).event.seq == 3
        events = await store.events_after(r, 0, 10)
        assert [(e.seq, e.cid) for e in events] == [(1, "m1"), (2, "fenced"), (3, "after")]


async def _send_while_keys_behind(store: RelationalStore, t: Any, r: str, n: int) -> None:
    """Send `n` messages; one refused while the index's keys are behind is resent, as a client
    would (anything else fails the test)."""
    for i in range(n):
        while True:
            try:
                await append(store, item(r, t.alice, f"m{i}", body={"text": f"h {i}"}))
                break
            except GB6Error as exc:
                assert exc.code == UNAVAILABLE and "behind" in exc.message
                await trio.sleep(0.1)


async def test_sqlite_search_index_goes_on_after_an_unexpected_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded index's thread meets an error that is not SQLite's: it logs it and goes
    on, rather than ending. Ended, it indexed nothing more, and once the writer held too many
    keys waiting for it, every send was refused until a restart."""
    from origin import search_index, sqlite_store

    original = search_index.SearchIndex._index_batch
    failures = [RuntimeError("made by the test")]

    def index_batch(self: search_index.SearchIndex, conn: Any) -> tuple[int, bool]:
        if failures:
            raise failures.pop()
        return original(self, conn)

    monkeypatch.setattr(search_index.SearchIndex, "_index_batch", index_batch)
    monkeypatch.setattr(sqlite_store, "_MAX_RECENT_KEYS", 20)
    backend = Backend("sqlite", lambda rec: SqliteStore(tmp_path / "gb6.db", LIMITS, rec))
    async with serving(backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        with trio.fail_after(30):
            await _send_while_keys_behind(store, t, r, 40)
            assert len(await store.search([r], "h", 50)) == 40
    assert not failures


async def _refused_as_newer(backend: Backend, newer: int) -> None:
    with pytest.raises(BaseException) as info:
        async with serving(backend):
            pass
    found = [e for e in _leaves(info.value) if isinstance(e, GB6Error)]
    assert found, info.value
    assert f"schema version {newer}, newer than this release knows" in found[0].message


def _leaves(exc: BaseException) -> list[BaseException]:
    return leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]


async def test_sqlite_a_store_made_by_a_newer_release_is_refused(tmp_path: Path) -> None:
    """After a rollback, an older release starts on tables a newer one migrated: it would read
    and write them without knowing their changes. It refuses to start, saying why."""
    import sqlite3

    backend = Backend("sqlite", lambda rec: SqliteStore(tmp_path / "gb6.db", LIMITS, rec))
    async with serving(backend):  # made, at this release's version
        pass
    with sqlite3.connect(tmp_path / "gb6.db") as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA user_version = {version + 1}")
    await _refused_as_newer(backend, version + 1)


def test_sqlite_a_file_two_processes_open_at_once_is_migrated_once(tmp_path: Path) -> None:
    """Origins sharing one kv file, started at once: one migrates it while the other waits for
    the write lock, then finds it migrated. Before, the second read the version beside the
    first's migration, ran that migration again ("table kv already exists") and did not start."""
    from origin.kv_sqlite import _MIGRATIONS
    from origin.schema_version import migrate_sqlite, sqlite_statements

    path = tmp_path / "kv.db"
    first = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    first.execute("PRAGMA journal_mode=WAL")
    first.execute("BEGIN IMMEDIATE")  # the first process, migrating
    failed: list[BaseException] = []

    def second_process() -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        try:
            migrate_sqlite(conn, "the kv", _MIGRATIONS)
        except BaseException as exc:
            failed.append(exc)
        finally:
            conn.close()

    second = threading.Thread(target=second_process)
    second.start()
    time.sleep(0.3)  # it has read what it reads without the lock, and waits for the lock
    for script in _MIGRATIONS:
        for statement in sqlite_statements(script):
            first.execute(statement)
    first.execute(f"PRAGMA user_version={len(_MIGRATIONS)}")
    first.execute("COMMIT")
    second.join(30)
    assert not second.is_alive()
    assert failed == []
    assert first.execute("PRAGMA user_version").fetchone()[0] == len(_MIGRATIONS)
    first.close()


async def test_sqlite_kv_opened_while_another_process_holds_its_new_file_waits(
    tmp_path: Path,
) -> None:
    """Another origin has just created the shared kv file and holds its lock (before WAL
    mode): this one's open waits for it, where changing the journal mode failed at once
    ("database is locked") and the origin did not start."""
    from origin.kv import KvLimits
    from origin.kv_sqlite import SqliteKv

    path = tmp_path / "kv.db"
    other = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE made_by_the_other(x)")

    async def release() -> None:
        await trio.sleep(0.5)
        other.execute("COMMIT")

    kv = SqliteKv(path, KvLimits())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(release)
        with trio.fail_after(20):
            await nursery.start(kv.run)
        await kv.put(b"k", b"v")
        assert (await kv.get(b"k")) == b"v"
        nursery.cancel_scope.cancel()
    other.close()


async def test_sqlite_kv_open_waiting_for_another_process_stops_when_cancelled(
    tmp_path: Path,
) -> None:
    """An origin whose start waits for another process holding the shared kv file (the wait
    lasts up to 30 s) stops within a moment when its start is cancelled (a signal). Before,
    the wait ran in a thread that cancellation did not reach, for as long as it lasted."""
    from origin.kv import KvLimits
    from origin.kv_sqlite import SqliteKv

    path = tmp_path / "kv.db"
    other = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE made_by_the_other(x)")
    kv = SqliteKv(path, KvLimits())
    try:
        with trio.fail_after(5):
            with trio.move_on_after(0.5) as waited:
                async with trio.open_nursery() as nursery:
                    await nursery.start(kv.run)
            assert waited.cancelled_caught
    finally:
        other.execute("ROLLBACK")
        other.close()
    # The file is still good for the next start.
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            await nursery.start(kv.run)
        await kv.put(b"k", b"v")
        assert (await kv.get(b"k")) == b"v"
        nursery.cancel_scope.cancel()


async def test_pg_a_store_made_by_a_newer_release_is_refused(pg_backend: Backend) -> None:
    """As on SQLite: a schema a newer release migrated is refused, and left as it is."""
    async with serving(pg_backend):
        pass
    newer = SCHEMA_VERSION + 1
    async with trio_asyncio.open_loop():
        await _pg(
            pg_backend.dsn, f'UPDATE "{pg_backend.schema}".schema_version SET version = {newer}'
        )
    await _refused_as_newer(pg_backend, newer)
    async with trio_asyncio.open_loop():
        rows = await _pg(
            pg_backend.dsn, f'SELECT version FROM "{pg_backend.schema}".schema_version'
        )
    assert [r[0] for r in rows] == [newer]


async def test_sqlite_a_start_that_fails_leaves_no_thread_or_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's start fails at its last step (a connection it cannot open: the disk full,
    too many open files): what it opened before is closed and no thread of it is left behind
    (its writer thread stayed blocked on its queue, holding the database), and it starts
    afterwards."""
    import threading

    from origin import sqlite_store

    connect = sqlite_store._connect
    writable: list[bool] = []

    def failing(path: Path, *, readonly: bool) -> Any:
        if not readonly:
            writable.append(True)
            if len(writable) == 2:  # the writer's, then the checkpointer's
                raise OSError(24, "Too many open files")
        return connect(path, readonly=readonly)

    monkeypatch.setattr(sqlite_store, "_connect", failing)
    backend = Backend("sqlite", lambda rec: SqliteStore(tmp_path / "gb6.db", LIMITS, rec))
    with pytest.raises(BaseException) as info:
        async with serving(backend):
            pass
    assert any(isinstance(e, OSError) for e in _leaves(info.value))
    names = {t.name for t in threading.enumerate()}
    assert not names & {"gb6-sqlite-writer", "gb6-sqlite-ckpt", "gb6-search-index"}, names
    monkeypatch.setattr(sqlite_store, "_connect", connect)
    async with serving(backend) as store:
        t = await tenant(store)
        assert (await append(store, item(await room(store, t), t.alice, "m1"))).event.seq == 1


async def test_sqlite_sends_go_on_while_the_text_index_keeps_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index's text step fails at every try (a body it cannot read, say): the keys of
    sends, which the writer waits for once it holds too many, are indexed all the same, in a
    transaction of their own, so sends are not refused for good."""
    from origin import search_index, sqlite_store

    def failing(self: search_index.SearchIndex, conn: Any, offset: int, upto: int) -> None:
        raise RuntimeError("made by the test: every time")

    monkeypatch.setattr(search_index.SearchIndex, "_index_text", failing)
    monkeypatch.setattr(sqlite_store, "_MAX_RECENT_KEYS", 20)
    backend = Backend("sqlite", lambda rec: SqliteStore(tmp_path / "gb6.db", LIMITS, rec))
    async with serving(backend) as store:
        t = await tenant(store)
        r = await room(store, t)
        with trio.fail_after(30):
            await _send_while_keys_behind(store, t, r, 40)
        assert [e.seq for e in await store.events_after(r, 0, 100)] == list(range(1, 41))
