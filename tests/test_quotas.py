"""Plans and quotas: every quota kind at its limit and one past it, where the resource is made.

Three seams: the pure core (origin/quotas.py) with an injected clock, the origin shard in this
process on its real SQLite store (restarted on the same data directory), and a real `gb6 run`
over HTTP and the WebSocket (the errors clients see). The store's count queries run on every
adapter (SQLite, PostgreSQL, Kafka + PostgreSQL) through the store contract's fixture.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from node.config import Config, load
from node.errors import INVALID, NOT_FOUND, QUOTA_EXCEEDED, GB6Error
from node.ids import new_id
from origin.membership import Principal
from origin.plans import RESOURCES, Plan, builtin_plans, parse_plans, unlimited_quotas
from origin.quotas import DAY_MS, QuotaEvent, Quotas, day_start_ms
from origin.records import FileRecord, Instance, Org, RoomRecord, User
from origin.shard import OriginShard
from origin.sqlite_store import Appended, AppendResult, now_ms
from tests.conftest import Node, Peer, connect, running_node
from tests.test_store_contract import Backend, append, item, serving
from tests.test_store_contract import backend as backend  # the adapter fixture, reused

# Each reads "today's" or "this month's" usage after sending.
pytestmark = pytest.mark.usefixtures("within_one_utc_day")

TINY = {
    "users": 3,
    "bots": 1,
    "rooms": 2,
    "connections": 2,
    "media_participants": 2,
    "messages": 4,
    "stored_bytes": 100,
    "recording_minutes": 10,
    "webhook_calls": 3,
}
TINY_TOML = "[plans.tiny.quotas]\n" + "".join(f"{k} = {v}\n" for k, v in TINY.items())


def refused(exc: pytest.ExceptionInfo[GB6Error], resource: str) -> None:
    assert exc.value.code == QUOTA_EXCEEDED, exc.value
    assert resource in exc.value.message and "tiny" in exc.value.message, exc.value.message


# --- plans from the config -----------------------------------------------------------------


def test_plans_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "gb6.toml"
    path.write_text(
        TINY_TOML
        + "[plans.tiny]\nrate = 5.0\nburst = 10\n"
        + "[plans.tiny.pricing]\ncurrency = 'EUR'\n"
        + "[plans.free.quotas]\nrooms = 7\n"
    )
    config = load(path, {})
    tiny, free = config.plans["tiny"], config.plans["free"]
    assert dict(tiny.quotas) == TINY and tiny.pricing == {"currency": "EUR"}
    # free keeps its built-in quotas except the one set; unlimited is always there, unlimited.
    assert free.quotas["rooms"] == 7
    assert free.quotas["users"] == builtin_plans()["free"].quotas["users"]
    assert config.plans["unlimited"].quotas == unlimited_quotas()
    # The rate lives in the plan; rate_plans is derived (unlimited has none: no rate limit).
    assert {n: (r.rate, r.burst) for n, r in config.rate_plans.items()} == {
        "free": (50.0, 100),
        "tiny": (5.0, 10),
    }
    # A resource left out is unlimited.
    assert parse_plans({"p": {"quotas": {"users": 1}}}, {})["p"].quotas["rooms"] is None


@pytest.mark.parametrize(
    "plans",
    [
        {"tiny": {"quotas": {"chairs": 1}}},  # unknown resource
        {"tiny": {"quotas": {"users": -1}}},
        {"tiny": {"quotas": {"users": "many"}}},
        {"tiny": {"quotas": {"users": True}}},
        {"tiny": {"color": "red"}},
        {"tiny": {"rate": 0, "burst": 1}},
        {"unlimited": {"quotas": {"users": 1}}},  # unlimited has no quotas
        {"bad name!": {}},
    ],
)
def test_bad_plans_are_refused_with_a_clear_error(plans: dict[str, Any]) -> None:
    with pytest.raises(GB6Error) as exc:
        parse_plans(plans, {})
    assert exc.value.code == INVALID and "config" in exc.value.message


# --- the pure core -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.ms = 1_795_000_000_000  # some day in 2026, mid-day UTC

    def __call__(self) -> int:
        return self.ms


def core(clock: Clock | None = None) -> tuple[Quotas, list[QuotaEvent]]:
    plans = {**builtin_plans(), "tiny": Plan("tiny", {**unlimited_quotas(), **TINY})}
    q = Quotas(
        plans, lambda inst: "tiny" if inst.startswith("t") else "unlimited", clock or Clock()
    )
    events: list[QuotaEvent] = []
    q.listeners.append(events.append)
    return q, events


def test_every_kind_at_its_limit_then_refused_changing_nothing() -> None:
    q, _ = core()
    for resource in ("users", "bots", "rooms", "stored_bytes"):
        for _ in range(TINY[resource]):
            with q.reserve("t1", resource):
                pass
        with pytest.raises(GB6Error) as exc:
            q.reserve("t1", resource)
        refused(exc, resource)
        assert q.used("t1", resource) == TINY[resource]
    for resource in ("connections", "media_participants"):
        for _ in range(TINY[resource]):
            q.acquire("t1", resource)
        with pytest.raises(GB6Error) as exc:
            q.acquire("t1", resource)
        refused(exc, resource)
        q.release("t1", resource)
        q.acquire("t1", resource)  # a released slot is free again
    for resource in ("messages", "recording_minutes", "webhook_calls"):
        q.charge("t1", resource, TINY[resource])
        with pytest.raises(GB6Error) as exc:
            q.charge("t1", resource, 1)
        refused(exc, resource)
        assert q.used("t1", resource) == TINY[resource]
    # Another instance, and an unlimited plan, are not touched.
    q.charge("t2", "messages", 4)
    q.charge("u1", "messages", 10**9)
    assert {u.resource: u.used for u in q.usage("t2")}["messages"] == 4


def test_a_reservation_counts_until_it_is_committed_or_cancelled() -> None:
    q, _ = core()
    first = q.reserve("t1", "rooms")
    second = q.reserve("t1", "rooms")
    with pytest.raises(GB6Error):  # both slots are held by writes in flight
        q.reserve("t1", "rooms")
    assert q.used("t1", "rooms") == 0  # in flight is not used
    second.cancel()
    first.commit()
    first.cancel()  # once done, nothing more happens
    assert q.used("t1", "rooms") == 1
    with pytest.raises(RuntimeError), q.reserve("t1", "rooms"):
        raise RuntimeError("the write failed")
    assert q.used("t1", "rooms") == 1
    q.reserve("t1", "rooms").commit()
    assert q.used("t1", "rooms") == 2


def test_events_at_80_and_100_percent_once_per_crossing_per_period() -> None:
    clock = Clock()
    q, events = core(clock)

    def levels() -> list[tuple[str, int, int]]:
        return [(e.resource, e.level, e.used) for e in events]

    q.charge("t1", "recording_minutes", 7)
    assert levels() == []
    q.charge("t1", "recording_minutes", 1)  # 8 of 10
    assert levels() == [("recording_minutes", 80, 8)]
    q.charge("t1", "recording_minutes", 1)
    assert len(events) == 1  # not per request
    q.charge("t1", "recording_minutes", 1)  # 10 of 10
    assert levels()[-1] == ("recording_minutes", 100, 10)
    assert events[-1].period is not None and events[-1].limit == 10
    with pytest.raises(GB6Error):
        q.charge("t1", "recording_minutes", 1)
    assert len(events) == 2  # refusals announce nothing
    # Jumping over both levels at once announces both.
    q.charge("t1", "webhook_calls", 3)
    assert levels()[-2:] == [("webhook_calls", 80, 3), ("webhook_calls", 100, 3)]
    # The next UTC day: webhook calls start again at 0 and may be announced again; the month's
    # recording minutes do not.
    events.clear()
    clock.ms = day_start_ms(clock.ms) + DAY_MS + 1
    assert q.used("t1", "webhook_calls") == 0
    q.charge("t1", "webhook_calls", 3)
    assert levels() == [("webhook_calls", 80, 3), ("webhook_calls", 100, 3)]
    assert q.used("t1", "recording_minutes") == 10
    # Concurrent: at 100 %, falling just below does not re-arm (no flapping); falling well
    # below does.
    events.clear()
    q.acquire("t1", "connections")
    q.acquire("t1", "connections")
    assert levels() == [("connections", 80, 2), ("connections", 100, 2)]
    for _ in range(3):
        q.release("t1", "connections")
        q.acquire("t1", "connections")
    # 1 of 2 is 50 %: both re-armed, so each return to 2 announces again: held and concurrent
    # levels re-arm 10 points below them.
    assert len(events) == 2 + 3 * 2


def test_overrides_replace_the_plans_limit_for_one_instance() -> None:
    q, _ = core()
    q.charge("t1", "messages", 4)
    q.set_override("t1", "messages", 6)
    q.charge("t1", "messages", 2)
    with pytest.raises(GB6Error) as exc:
        q.charge("t1", "messages", 1)
    assert "6" in exc.value.message
    q.set_override("t1", "messages", None)  # unlimited for this one
    q.charge("t1", "messages", 1000)
    q.clear_override("t1", "messages")
    assert q.limit("t1", "messages") == 4 and q.limit("t2", "messages") == 4
    with pytest.raises(GB6Error) as bad:
        q.set_override("t1", "chairs", 1)
    assert bad.value.code == INVALID


# --- the origin shard on its real store ----------------------------------------------------


def shard_config(data: Path) -> Config:
    plans = {**builtin_plans(), "tiny": Plan("tiny", {**unlimited_quotas(), **TINY})}
    return Config(data_dir=data, plans=plans)


@asynccontextmanager
async def running_shard(data: Path) -> AsyncIterator[OriginShard]:
    async with trio.open_nursery() as nursery:
        shard = OriginShard(shard_config(data))
        with trio.fail_after(10):
            await nursery.start(shard.run)
        try:
            yield shard
        finally:
            with trio.fail_after(10):
                await shard.drain()
            nursery.cancel_scope.cancel()


async def send(shard: OriginShard, who: Principal, room: str, cid: str) -> Appended:
    box: list[AppendResult] = []
    await shard.append(who, room, "message", cid, box.append, body={"text": cid})
    with trio.fail_after(10):
        await shard.drain()
    if isinstance(box[0], GB6Error):
        raise box[0]
    return box[0]


def f1_month(rec: FileRecord) -> str:
    return datetime.datetime.fromtimestamp(rec.created_at / 1000, tz=datetime.UTC).strftime("%Y-%m")


def principal(shard: OriginShard, user: User) -> Principal:
    who = shard.state.principal(user.id)
    assert who is not None
    return who


def usage(shard: OriginShard, instance: str) -> dict[str, int]:
    return {u["resource"]: u["used"] for u in shard.quota_usage(instance)["usage"]}


async def test_each_quota_at_the_shard_then_after_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    events: list[QuotaEvent] = []
    async with running_shard(data) as shard:
        shard.quotas.listeners.append(events.append)
        org = await shard.create_org("acme", None)
        inst = (await shard.create_instance(org.id, "main", None, "tiny")).id
        other = (await shard.create_instance(org.id, "other", None, "tiny")).id
        # users: 3, then refused; bots count apart.
        alice, bob, _ = [await shard.create_user(inst, n, "member") for n in "abc"]
        with pytest.raises(GB6Error) as exc:
            await shard.create_user(inst, "dave", "member")
        refused(exc, "users")
        await shard.create_user(inst, "robot", "bot")
        with pytest.raises(GB6Error) as exc:
            await shard.create_user(inst, "robot2", "bot")
        refused(exc, "bots")
        assert sorted(u.name for u in shard.users.values() if u.instance == inst) == [
            *"abc",
            "robot",
        ]
        # Another instance has its own counters.
        await shard.create_user(other, "x", "member")
        # rooms: 2, then refused, nothing made.
        a = principal(shard, alice)
        r1 = (await shard.create_room(a, "r1", "chat", [bob.id], False)).record.id
        await shard.create_room(a, "r2", "chat", [], False)
        with pytest.raises(GB6Error) as exc:
            await shard.create_room(a, "r3", "chat", [], False)
        refused(exc, "rooms")
        assert len(shard.rooms_of(a)) == 2
        # messages: 4 sends a day; a repeat (same cid) and an edit do not count.
        seqs = [(await send(shard, a, r1, f"m{i}")).event.seq for i in range(3)]
        assert (await send(shard, a, r1, "m0")).duplicate
        edited: list[AppendResult] = []
        await shard.append(a, r1, "edit", "e1", edited.append, body={"text": "x"}, target=1)
        await send(shard, a, r1, "m3")
        with pytest.raises(GB6Error) as exc:
            await send(shard, a, r1, "m4")
        refused(exc, "messages")
        # At the limit a repeat still gets its original seq, and takes nothing.
        again = await send(shard, a, r1, "m1")
        assert again.duplicate and again.event.seq == 2
        await shard.drain()
        assert seqs == [1, 2, 3] and shard.rooms[r1].head == 5  # 4 sends and the edit
        assert [e.seq for e in await shard.events_after(r1, 0, 100)] == [1, 2, 3, 4, 5]
        # stored bytes: 60 + 40, then one byte more is refused and no file is written.
        f1 = await shard.put_file(a, r1, "text/plain", b"x" * 60)
        await shard.put_file(a, r1, "text/plain", b"y" * 40)
        assert (await shard.billing.usage(inst, f1_month(f1)))["stored_bytes"] == 100
        blobs_before = sorted(p.name for p in (data / "blobs").rglob("*") if p.is_file())
        with pytest.raises(GB6Error) as exc:
            await shard.put_file(a, r1, "text/plain", b"z")
        refused(exc, "stored_bytes")
        assert sorted(p.name for p in (data / "blobs").rglob("*") if p.is_file()) == blobs_before
        before = usage(shard, inst)
        assert before == {
            **dict.fromkeys(RESOURCES, 0),
            "users": 3,
            "bots": 1,
            "rooms": 2,
            "messages": 4,
            "stored_bytes": 100,
        }
        # Each full quota was announced at 80 % and 100 %, once.
        seen = [(e.resource, e.level) for e in events if e.instance == inst]
        assert sorted(seen) == sorted(
            (r, lv)
            for r in ("users", "bots", "rooms", "messages", "stored_bytes")
            for lv in (80, 100)
        )
        assert len({(e.resource, e.level) for e in events}) == len(events)

    # A restart counts from the store and memory: the same usage, the same refusals.
    async with running_shard(data) as shard:
        events.clear()
        shard.quotas.listeners.append(events.append)
        assert usage(shard, inst) == before
        assert usage(shard, other)["users"] == 1
        a = principal(shard, alice)
        for attempt, resource in (
            (shard.create_user(inst, "dave", "member"), "users"),
            (shard.create_room(a, "r3", "chat", [], False), "rooms"),
            (send(shard, a, r1, "m4"), "messages"),
            (shard.put_file(a, r1, "text/plain", b"z"), "stored_bytes"),
        ):
            with pytest.raises(GB6Error) as exc:
                await attempt
            refused(exc, resource)
        assert events == []  # loaded levels count as announced: nothing is announced again
        assert (await shard.get_file(a, f1.id))[0].size == 60
        # Nothing refused was made: the store holds 4 users, 2 rooms, 4 sends of instance.
        assert sum(1 for u in shard.users.values() if u.instance == inst) == 4
        assert await shard.store.messages_since(day_start_ms(now_ms())) == {inst: 4}


async def test_concurrent_creators_do_not_both_take_the_last_slot(tmp_path: Path) -> None:
    async with running_shard(tmp_path / "data") as shard:
        org = await shard.create_org("acme", None)
        inst = (await shard.create_instance(org.id, "main", None, "tiny")).id
        alice = await shard.create_user(inst, "alice", "member")
        a = principal(shard, alice)
        await shard.create_room(a, "r1", "chat", [], False)
        results: list[str] = []

        async def create(kind: str, name: str) -> None:
            try:
                if kind == "room":
                    await shard.create_room(a, name, "chat", [], False)
                else:
                    await shard.create_user(inst, name, "member")
                results.append("ok")
            except GB6Error as exc:
                results.append(exc.code)

        await shard.create_user(inst, "bob", "member")
        for kind in ("room", "user"):  # one slot left of each: 5 creators race for it
            results.clear()
            async with trio.open_nursery() as nursery:
                for i in range(5):
                    nursery.start_soon(create, kind, f"{kind}{i}")
            assert sorted(results) == ["ok"] + [QUOTA_EXCEEDED] * 4
        assert len(shard.rooms_of(a)) == 2
        assert sum(1 for u in shard.users.values() if u.instance == inst) == 3
        assert usage(shard, inst)["rooms"] == 2 and usage(shard, inst)["users"] == 3


async def test_a_resend_at_the_limit_while_its_original_is_under_way_gets_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The send that takes the day's last message is still on its way to the store when its
    client, reconnected, sends it again: the resend waits for the original's answer and gets
    its seq, not `quota_exceeded` for a message that is delivered (DESIGN §3.3)."""
    async with running_shard(tmp_path / "data") as shard, trio.open_nursery() as nursery:
        org = await shard.create_org("acme", None)
        inst = (await shard.create_instance(org.id, "main", None, "tiny")).id  # 4 sends a day
        a = principal(shard, await shard.create_user(inst, "alice", "member"))
        r1 = (await shard.create_room(a, "r1", "chat", [], False)).record.id
        for i in range(3):
            await send(shard, a, r1, f"m{i}")
        submit, held = shard.store.submit_append, trio.Event()

        async def holding(item: Any) -> None:
            async def later() -> None:
                await held.wait()
                await submit(item)

            if item.cid == "last":
                nursery.start_soon(later)
            else:
                await submit(item)

        monkeypatch.setattr(shard.store, "submit_append", holding)
        first: list[AppendResult] = []
        again: list[AppendResult] = []
        await shard.append(a, r1, "message", "last", first.append, body={"text": "last"})
        await shard.append(a, r1, "message", "last", again.append, body={"text": "last"})
        await trio.sleep(0.2)
        assert not first and not again  # the resend waits for the original
        held.set()
        with trio.fail_after(10):
            while not (first and again):  # noqa: ASYNC110
                await trio.sleep(0.01)
        original, resent = first[0], again[0]
        assert isinstance(original, Appended) and isinstance(resent, Appended), (first, again)
        assert not original.duplicate and original.event.seq == 4
        assert resent.duplicate and resent.event.seq == 4
        refused_send: list[AppendResult] = []
        await shard.append(a, r1, "message", "new", refused_send.append, body={"text": "x"})
        with trio.fail_after(10):
            while not refused_send:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert isinstance(refused_send[0], GB6Error) and refused_send[0].code == QUOTA_EXCEEDED


async def test_media_recording_and_webhook_quotas_at_their_api(tmp_path: Path) -> None:
    """What the SFU (`shard.quotas.acquire/release`), the recorder and the webhook sender
    (`shard.charge_usage`: quota and billing record in one call) use."""
    async with running_shard(tmp_path / "data") as shard:
        org = await shard.create_org("acme", None)
        inst = (await shard.create_instance(org.id, "main", None, "tiny")).id
        events: list[QuotaEvent] = []
        shard.quotas.listeners.append(events.append)
        q = shard.quotas
        q.acquire(inst, "media_participants")
        q.acquire(inst, "media_participants")
        with pytest.raises(GB6Error) as exc:
            q.acquire(inst, "media_participants")
        refused(exc, "media_participants")
        q.release(inst, "media_participants")
        q.acquire(inst, "media_participants")
        await shard.charge_usage(inst, "recording_minutes", 3, "rec_1:0")
        await shard.charge_usage(inst, "recording_minutes", 3, "rec_1:0")  # a repeat: nothing
        await shard.charge_usage(inst, "recording_minutes", 7, "rec_1:3")
        with pytest.raises(GB6Error) as exc:
            await shard.charge_usage(inst, "recording_minutes", 1, "rec_1:10")
        refused(exc, "recording_minutes")
        for i in range(3):
            await shard.charge_usage(inst, "webhook_calls", 1, f"call{i}")
        with pytest.raises(GB6Error) as exc:
            await shard.charge_usage(inst, "webhook_calls", 1, "call3")
        refused(exc, "webhook_calls")
        got = usage(shard, inst)
        assert (got["media_participants"], got["recording_minutes"], got["webhook_calls"]) == (
            2,
            10,
            3,
        )
        # Media: announced again after falling to 1 of 2 (50 %: well below, so re-armed).
        announced = ["media_participants"] * 2 + ["recording_minutes", "webhook_calls"]
        assert sorted((e.resource, e.level) for e in events) == sorted(
            (r, lv) for r in announced for lv in (80, 100)
        )
        periods = {u["resource"]: u["period"] for u in shard.quota_usage(inst)["usage"]}
        assert periods["media_participants"] is None
        assert len(periods["recording_minutes"]) == 7 and len(periods["webhook_calls"]) == 10
        # Billing has the records, each key once (refused ones are not there).
        month = await shard.billing.usage(inst, periods["recording_minutes"])
        assert month["recording_minutes"] == 10 and month["webhook_calls"] == 3
    # After a restart the period's counts come back from billing's records.
    async with running_shard(tmp_path / "data") as shard:
        got = usage(shard, inst)
        assert (got["recording_minutes"], got["webhook_calls"]) == (10, 3)
        with pytest.raises(GB6Error) as exc:
            await shard.charge_usage(inst, "webhook_calls", 1, "call4")
        refused(exc, "webhook_calls")
        assert got["media_participants"] == 0  # sessions did not survive the process


async def test_an_operators_override_is_kept_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_shard(data) as shard:
        org = await shard.create_org("acme", None)
        inst = (await shard.create_instance(org.id, "main", None, "tiny")).id
        await shard.set_quota_override(inst, "users", 5)
        await shard.set_quota_override(inst, "rooms", None)
        with pytest.raises(GB6Error) as bad:
            await shard.set_quota_override(inst, "users", -1)
        assert bad.value.code == INVALID
        with pytest.raises(GB6Error) as missing:
            await shard.set_quota_override("ins_nope", "users", 1)
        assert missing.value.code == NOT_FOUND
        for i in range(5):
            await shard.create_user(inst, f"u{i}", "member")
    async with running_shard(data) as shard:
        assert shard.quota_usage(inst)["overrides"] == {"users": 5, "rooms": None}
        with pytest.raises(GB6Error) as exc:
            await shard.create_user(inst, "u5", "member")
        assert exc.value.code == QUOTA_EXCEEDED and "5" in exc.value.message
        await shard.clear_quota_override(inst, "users")
        assert shard.quotas.limit(inst, "users") == 3
        limits = {u["resource"]: u["limit"] for u in shard.quota_usage(inst)["usage"]}
        assert limits["rooms"] is None and limits["users"] == 3


async def test_concurrent_overrides_of_one_instance_both_stick(tmp_path: Path) -> None:
    """Direct callers (not serialized by the admin API's tenancy lock): two overrides started
    together, each storing the whole overrides value, must not lose one another's."""
    data = tmp_path / "data"
    async with running_shard(data) as shard:
        org = await shard.create_org("acme", None)
        inst = (await shard.create_instance(org.id, "main", None, "tiny")).id
        async with trio.open_nursery() as nursery:
            nursery.start_soon(shard.set_quota_override, inst, "users", 7)
            nursery.start_soon(shard.set_quota_override, inst, "rooms", 9)
        assert shard.quota_usage(inst)["overrides"] == {"users": 7, "rooms": 9}
    async with running_shard(data) as shard:  # what the store holds
        assert shard.quota_usage(inst)["overrides"] == {"users": 7, "rooms": 9}
        assert (shard.quotas.limit(inst, "users"), shard.quotas.limit(inst, "rooms")) == (7, 9)


# --- the store's count queries, on every adapter -------------------------------------------


async def test_store_counts_todays_sends_and_stored_bytes(backend: Backend) -> None:
    async with serving(backend) as store:
        org = Org(new_id("org"), "acme", None, now_ms())
        await store.create_org(org)
        insts = [
            Instance(new_id("ins"), org.id, n, "local", "tiny", "active", now_ms()) for n in "ab"
        ]
        for inst in insts:
            await store.create_instance(inst)
        # Senders are ids: the store counts what it holds, whoever sent it.
        users = [new_id("usr") for _ in insts]
        rooms = [
            RoomRecord(new_id("room"), i.id, "r", "chat", False, u, now_ms())
            for i, u in zip(insts, users, strict=True)
        ]
        for user, rec in zip(users, rooms, strict=True):
            await store.create_room(rec, [user])
        for i in range(3):
            await append(store, item(rooms[0].id, users[0], f"c{i}"))
        await append(store, item(rooms[1].id, users[1], "c0"))
        await append(store, item(rooms[0].id, users[0], "r", type="react", target=1, emoji="+1"))
        await store.create_file(
            FileRecord(new_id("file"), rooms[0].id, users[0], 7, "a/b", now_ms())
        )
        await store.create_file(
            FileRecord(new_id("file"), rooms[0].id, users[0], 5, "a/b", now_ms())
        )
        today = day_start_ms(now_ms())
        assert await store.messages_since(today) == {insts[0].id: 3, insts[1].id: 1}
        assert await store.messages_since(now_ms() + DAY_MS) == {}
        assert await store.stored_bytes() == {insts[0].id: 12}
        found = await store.event_by_cid(rooms[0].id, users[0], "c1")
        assert found is not None and (found.seq, found.type, found.cid) == (2, "message", "c1")
        assert await store.event_by_cid(rooms[0].id, users[1], "c1") is None


# --- a real node: the errors clients see ---------------------------------------------------


@pytest.fixture
def tiny_node(tmp_path: Path) -> Any:
    with running_node(tmp_path, TINY_TOML) as n:
        yield n


async def expect_error(peer: Peer, op: str, code: str, **fields: Any) -> dict[str, Any]:
    reply = await peer.request(op, **fields)
    assert reply["op"] == "error" and reply["code"] == code, reply
    return reply


async def test_clients_get_quota_exceeded_over_http_and_the_websocket(tiny_node: Node) -> None:
    node = tiny_node
    tenant = node.create_tenant(plan="tiny")
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    # The 4th user: HTTP 403 with the code, nothing created.
    r = node.admin("POST", f"/v1/instances/{tenant.instance}/users", {"name": "dave"})
    assert r.status_code == 403 and r.json()["error"]["code"] == QUOTA_EXCEEDED, r.text
    _connect = asynccontextmanager(connect)
    # Connections: 2 at once; a third hello is refused and may try again later.
    async with (
        _connect(node, alice.token) as a,
        _connect(node, bob.token) as b,
        _connect(node) as c,
    ):
        reply = await expect_error(c, "hello", QUOTA_EXCEEDED, token=carol.token)
        assert "connections" in reply["message"]
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]
        await a.ok("room.create", name="r2", kind="chat", members=[])
        await expect_error(a, "room.create", QUOTA_EXCEEDED, name="r3", kind="chat", members=[])
        assert len((await a.ok("rooms"))["rooms"]) == 2
        for i in range(4):
            await a.ok("send", room=room["id"], cid=f"c{i}", body={"text": "hi"})
        await expect_error(b, "send", QUOTA_EXCEEDED, room=room["id"], cid="b", body={"text": "x"})
        repeat = await a.ok("send", room=room["id"], cid="c0", body={"text": "hi"})
        assert repeat["seq"] == 1  # a resend at the limit gets its original seq
        await a.ok("subscribe", room=room["id"], after=0)  # the connection stays usable
        # Files: 100 bytes in all; past that 403 quota_exceeded.
        url = f"{node.http_url}/v1/rooms/{room['id']}/files"
        headers = {"Authorization": f"Bearer {alice.token}", "Content-Type": "text/plain"}
        async with httpx.AsyncClient(timeout=10) as http:
            ok = await http.post(url, content=b"x" * 100, headers=headers)
            assert ok.status_code == 201, ok.text
            over = await http.post(url, content=b"y", headers=headers)
            assert over.status_code == 403 and over.json()["error"]["code"] == QUOTA_EXCEEDED
        await b.ws.aclose()
        # Bob's socket ended: his slot is free again (once the edge has seen the close).
        with trio.fail_after(5):
            while True:
                reply = await c.request("hello", token=carol.token)
                if reply["op"] == "ok":
                    break
                assert reply["code"] == QUOTA_EXCEEDED
                await trio.sleep(0.02)
    # After a restart: today's sends are still counted.
    node.restart()
    async with _connect(node, carol.token) as c:
        await expect_error(c, "room.create", QUOTA_EXCEEDED, name="r3", kind="chat", members=[])
    async with _connect(node, alice.token) as a:
        await expect_error(a, "send", QUOTA_EXCEEDED, room=room["id"], cid="c9", body={"text": "x"})
