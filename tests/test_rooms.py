"""Rooms and membership over a real socket: create, open vs private, add/remove/leave, listing."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import HIDDEN, Node, Peer, Tenant, connect, module_node, refused, running_node

_connect = asynccontextmanager(connect)

node = module_node("rooms")


async def room_ids(peer: Peer) -> set[str]:
    return {r["id"] for r in (await peer.ok("rooms"))["rooms"]}


async def barrier(peer: Peer) -> None:
    """A ping round trip: everything the server wrote to `peer` before it has arrived."""
    await peer.ok("ping")


# --- room.create ---------------------------------------------------------------------------


async def test_create_each_kind_with_defaults(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        made = []
        for kind in ("chat", "meeting", "live"):
            room = (await a.ok("room.create", name=f"{kind} room", kind=kind, members=[]))["room"]
            assert isinstance(room["id"], str) and room["id"]
            assert room["name"] == f"{kind} room"
            assert room["kind"] == kind
            assert room["open"] is False
            made.append(room)
        assert len({r["id"] for r in made}) == 3
        listed = {r["id"]: r for r in (await a.ok("rooms"))["rooms"]}
        assert set(listed) == {r["id"] for r in made}
        for room in made:
            entry = listed[room["id"]]
            assert entry["name"] == room["name"] and entry["kind"] == room["kind"]
            assert entry["head"] == 0 and entry["read"] == 0


async def test_create_open_flag(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        opened = (await a.ok("room.create", name="o", kind="chat", members=[], open=True))["room"]
        assert opened["open"] is True
        closed = (await a.ok("room.create", name="p", kind="chat", members=[], open=False))["room"]
        assert closed["open"] is False


async def test_create_adds_members_only_those_named(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    async with (
        peer_factory(alice.token) as a,
        peer_factory(bob.token) as b,
        peer_factory(carol.token) as c,
    ):
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]
        assert room["id"] in await room_ids(a)
        assert room["id"] in await room_ids(b)
        assert room["id"] not in await room_ids(c)
        # Bob, as a member, may subscribe and send; Carol may not even see the room.
        await b.ok("subscribe", room=room["id"], after=0)
        await b.ok("send", room=room["id"], cid="b1", body={"text": "hi"})
        await refused(c, "subscribe", HIDDEN, room=room["id"], after=0)


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "r", "kind": "voice", "members": []},
        {"name": "r", "kind": "", "members": []},
        {"name": "r", "kind": "CHAT", "members": []},
        {"name": "r", "kind": 1, "members": []},
        {"name": "r", "members": []},
        {"kind": "chat", "members": []},
        {"name": "", "kind": "chat", "members": []},
        {"name": 5, "kind": "chat", "members": []},
        {"name": "r", "kind": "chat", "members": "usr_x"},
        {"name": "r", "kind": "chat", "members": [5]},
        {"name": "r", "kind": "chat", "members": [], "open": "yes"},
        {"name": "r", "kind": "chat", "members": [], "open": 1},
    ],
)
async def test_create_invalid_fields(
    tenant: Tenant, peer_factory: Any, fields: dict[str, Any]
) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        await refused(a, "room.create", ("invalid",), **fields)
        assert await room_ids(a) == set()


async def test_create_with_unknown_or_foreign_member_creates_nothing(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    stranger = node.create_tenant().user("stranger")
    async with peer_factory(alice.token) as a, peer_factory(stranger.token) as s:
        await refused(a, "room.create", HIDDEN, name="r", kind="chat", members=[stranger.id])
        await refused(a, "room.create", HIDDEN, name="r", kind="chat", members=["usr_nope"])
        assert await room_ids(a) == set()
        assert await room_ids(s) == set()


async def test_guest_cannot_create_rooms(tenant: Tenant, peer_factory: Any) -> None:
    guest = tenant.user("guest", role="guest")
    async with peer_factory(guest.token) as g:
        await refused(g, "room.create", ("forbidden",), name="r", kind="chat", members=[])
        await refused(
            g, "room.create", ("forbidden",), name="r", kind="chat", members=[], open=True
        )
        assert await room_ids(g) == set()


async def test_guest_added_to_a_room_takes_part(tenant: Tenant, peer_factory: Any) -> None:
    alice, guest = tenant.user("alice"), tenant.user("guest", role="guest")
    async with peer_factory(alice.token) as a, peer_factory(guest.token) as g:
        room = (await a.ok("room.create", name="r", kind="chat", members=[guest.id]))["room"]
        assert await room_ids(g) == {room["id"]}
        ack = await g.ok("send", room=room["id"], cid="g1", body={"text": "hello"})
        assert ack["seq"] == 1


# --- open and private rooms ----------------------------------------------------------------


async def test_open_room_join_by_any_user_of_the_instance(
    tenant: Tenant, peer_factory: Any
) -> None:
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    async with (
        peer_factory(alice.token) as a,
        peer_factory(bob.token) as b,
        peer_factory(carol.token) as c,
    ):
        room = (await a.ok("room.create", name="lobby", kind="chat", members=[], open=True))["room"]
        await a.ok("send", room=room["id"], cid="a1", body={"text": "welcome"})
        # Before joining, the open room's events are for members only.
        await refused(b, "subscribe", HIDDEN, room=room["id"], after=0)
        await refused(b, "history", HIDDEN, room=room["id"])
        await refused(b, "send", HIDDEN, room=room["id"], cid="x", body={"text": "x"})
        assert room["id"] not in await room_ids(b)

        await a.ok("subscribe", room=room["id"], after=1)
        joined = await b.ok("room.join", room=room["id"])
        assert joined["room"] == {"id": room["id"], "name": "lobby", "kind": "chat", "open": True}
        assert room["id"] in await room_ids(b)
        history = (await b.ok("history", room=room["id"]))["messages"]
        assert [m["body"]["text"] for m in history] == ["welcome"]
        await b.ok("send", room=room["id"], cid="b1", body={"text": "thanks"})
        ev = await a.event("message")
        assert ev["sender"] == bob.id and ev["seq"] == 2

        # Joining again is harmless; Carol can join too.
        await b.ok("room.join", room=room["id"])
        await c.ok("room.join", room=room["id"])
        assert room["id"] in await room_ids(c)


async def test_private_room_is_hidden_from_non_members(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = (await a.ok("room.create", name="secret", kind="chat", members=[]))["room"]
        await a.ok("send", room=room["id"], cid="a1", body={"text": "classified"})
        rid = room["id"]
        await refused(b, "room.join", HIDDEN, room=rid)
        await refused(b, "subscribe", HIDDEN, room=rid, after=0)
        await refused(b, "history", HIDDEN, room=rid)
        await refused(b, "send", HIDDEN, room=rid, cid="b1", body={"text": "let me in"})
        await refused(b, "react", HIDDEN, room=rid, target=1, cid="b2", emoji="+1")
        await refused(b, "receipt", HIDDEN, room=rid, read=1)
        await refused(b, "typing", HIDDEN, room=rid)
        await refused(b, "room.leave", HIDDEN, room=rid)
        await refused(b, "room.add", HIDDEN, room=rid, users=[bob.id])
        await refused(b, "search", HIDDEN, query="classified", room=rid)
        assert (await b.ok("search", query="classified"))["hits"] == []
        assert rid not in await room_ids(b)
        # Nothing Bob tried changed the room.
        assert (await a.ok("rooms"))["rooms"][0]["head"] == 1


async def test_open_room_of_another_instance_cannot_be_joined(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    stranger = node.create_tenant().user("stranger")
    async with peer_factory(alice.token) as a, peer_factory(stranger.token) as s:
        room = (await a.ok("room.create", name="lobby", kind="chat", members=[], open=True))["room"]
        await refused(s, "room.join", HIDDEN, room=room["id"])
        await refused(s, "subscribe", HIDDEN, room=room["id"], after=0)
        assert await room_ids(s) == set()


# --- room.add / room.remove / room.leave ---------------------------------------------------


async def test_plain_member_cannot_add_or_remove(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    async with (
        peer_factory(alice.token) as a,
        peer_factory(bob.token) as b,
        peer_factory(carol.token) as c,
    ):
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]
        await refused(b, "room.add", ("forbidden",), room=room["id"], users=[carol.id])
        await refused(b, "room.remove", ("forbidden",), room=room["id"], users=[alice.id])
        assert room["id"] not in await room_ids(c)
        assert room["id"] in await room_ids(a)
        # Not even for an open room that anyone may join.
        lobby = (await a.ok("room.create", name="l", kind="chat", members=[bob.id], open=True))[
            "room"
        ]
        await refused(b, "room.add", ("forbidden",), room=lobby["id"], users=[carol.id])
        await refused(b, "room.remove", ("forbidden",), room=lobby["id"], users=[alice.id])
        assert lobby["id"] not in await room_ids(c)


async def test_creator_adds_and_removes(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    async with (
        peer_factory(alice.token) as a,
        peer_factory(bob.token) as b,
        peer_factory(carol.token) as c,
    ):
        room = (await a.ok("room.create", name="r", kind="meeting", members=[]))["room"]
        added = await a.ok("room.add", room=room["id"], users=[bob.id, carol.id])
        assert added["room"]["id"] == room["id"] and added["room"]["kind"] == "meeting"
        assert room["id"] in await room_ids(b)
        assert room["id"] in await room_ids(c)
        removed = await a.ok("room.remove", room=room["id"], users=[carol.id])
        assert removed["room"]["id"] == room["id"]
        assert room["id"] not in await room_ids(c)
        assert room["id"] in await room_ids(b)
        await refused(c, "history", HIDDEN, room=room["id"])


@pytest.mark.parametrize("role", ["owner", "admin"])
async def test_instance_owner_and_admin_add_and_remove(
    tenant: Tenant, peer_factory: Any, role: str
) -> None:
    alice, boss = tenant.user("alice"), tenant.user("boss", role=role)
    bob, carol = tenant.user("bob"), tenant.user("carol")
    async with (
        peer_factory(alice.token) as a,
        peer_factory(boss.token) as m,
        peer_factory(bob.token) as b,
    ):
        room = (await a.ok("room.create", name="r", kind="chat", members=[boss.id, bob.id]))["room"]
        await m.ok("room.add", room=room["id"], users=[carol.id])
        await m.ok("room.remove", room=room["id"], users=[bob.id])
        assert room["id"] not in await room_ids(b)
        async with peer_factory(carol.token) as c:
            assert room["id"] in await room_ids(c)
        # Even the creator can be removed by an owner or admin.
        await m.ok("room.remove", room=room["id"], users=[alice.id])
        assert room["id"] not in await room_ids(a)


async def test_add_rejects_users_of_another_instance(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    stranger = node.create_tenant().user("stranger")
    async with peer_factory(alice.token) as a, peer_factory(stranger.token) as s:
        room = (await a.ok("room.create", name="r", kind="chat", members=[]))["room"]
        await refused(a, "room.add", HIDDEN, room=room["id"], users=[stranger.id])
        assert await room_ids(s) == set()
        await refused(s, "subscribe", HIDDEN, room=room["id"], after=0)


async def test_leave(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]
        left = await b.ok("room.leave", room=room["id"])
        assert left["room"]["id"] == room["id"]
        assert room["id"] not in await room_ids(b)
        # A private room, once left, is gone for Bob: he cannot come back on his own.
        await refused(b, "room.join", HIDDEN, room=room["id"])
        await refused(b, "subscribe", HIDDEN, room=room["id"], after=0)
        await refused(b, "room.leave", HIDDEN, room=room["id"])
        assert room["id"] in await room_ids(a)

        lobby = (await a.ok("room.create", name="l", kind="chat", members=[], open=True))["room"]
        await b.ok("room.join", room=lobby["id"])
        await b.ok("room.leave", room=lobby["id"])
        assert lobby["id"] not in await room_ids(b)
        await refused(b, "subscribe", HIDDEN, room=lobby["id"], after=0)
        await b.ok("room.join", room=lobby["id"])
        assert lobby["id"] in await room_ids(b)


# --- the room list: head and read ----------------------------------------------------------


async def test_rooms_listing_head_and_read(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = (await a.ok("room.create", name="news", kind="live", members=[bob.id]))["room"]
        for i in range(3):
            await a.ok("send", room=room["id"], cid=f"c{i}", body={"text": f"m{i}"})

        async def entry(peer: Peer) -> dict[str, Any]:
            rooms = (await peer.ok("rooms"))["rooms"]
            (found,) = [r for r in rooms if r["id"] == room["id"]]
            return found

        keys = ("id", "name", "kind", "head", "read")
        first = await entry(b)
        assert {k: first[k] for k in keys} == {
            "id": room["id"],
            "name": "news",
            "kind": "live",
            "head": 3,
            "read": 0,
        }
        await b.ok("receipt", room=room["id"], read=2)
        assert (await entry(b))["read"] == 2
        assert (await entry(a))["read"] == 0  # reads are per user
        # Beyond the head is invalid and changes nothing.
        await refused(b, "receipt", ("invalid",), room=room["id"], read=4)
        assert (await entry(b))["read"] == 2
        await b.ok("receipt", room=room["id"], read=3)
        third = await entry(b)
        assert third["head"] == 3 and third["read"] == 3
        await a.ok("send", room=room["id"], cid="c4", body={"text": "m4"})
        later = await entry(b)
        assert later["head"] == 4 and later["read"] == 3


async def test_receipt_invalid_values(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = (await a.ok("room.create", name="r", kind="chat", members=[]))["room"]
        await refused(a, "receipt", ("invalid",), room=room["id"], read=1)  # head is 0
        await refused(a, "receipt", ("invalid",), room=room["id"], read=-1)
        await refused(a, "receipt", ("invalid",), room=room["id"], read="1")
        await a.ok("send", room=room["id"], cid="c", body={"text": "x"})
        await a.ok("receipt", room=room["id"], read=1)


# --- membership changes reach subscriptions -------------------------------------------------


async def test_removed_user_subscription_stops(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]
        other = (await a.ok("room.create", name="o", kind="chat", members=[bob.id]))["room"]
        await b.ok("subscribe", room=room["id"], after=0)
        await b.ok("subscribe", room=other["id"], after=0)
        await a.ok("send", room=room["id"], cid="before", body={"text": "before"})
        ev = await b.event("message")
        assert ev["room"] == room["id"] and ev["seq"] == 1

        await a.ok("room.remove", room=room["id"], users=[bob.id])
        await a.ok("send", room=room["id"], cid="after", body={"text": "after"})
        # The marker in the other room is published after the message above, so once Bob has
        # it, anything of the first room would have reached him before it.
        await a.ok("send", room=other["id"], cid="marker", body={"text": "marker"})
        with trio.fail_after(5):
            while True:
                ev = await b.event("message")
                assert ev["room"] != room["id"], f"removed user got {ev}"
                if ev["room"] == other["id"] and ev["body"] == {"text": "marker"}:
                    break
        await barrier(b)
        assert not [e for e in b.events if e.get("room") == room["id"] and "seq" in e]
        await refused(b, "subscribe", HIDDEN, room=room["id"], after=0)
        await refused(b, "history", HIDDEN, room=room["id"])


async def test_leaving_user_subscription_stops(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id], open=True))[
            "room"
        ]
        other = (await a.ok("room.create", name="o", kind="chat", members=[bob.id]))["room"]
        await b.ok("subscribe", room=room["id"], after=0)
        await b.ok("subscribe", room=other["id"], after=0)
        await b.ok("room.leave", room=room["id"])
        await a.ok("send", room=room["id"], cid="after", body={"text": "after"})
        await a.ok("send", room=other["id"], cid="marker", body={"text": "marker"})
        with trio.fail_after(5):
            while True:
                ev = await b.event("message")
                assert ev["room"] != room["id"], f"a user who left got {ev}"
                if ev["room"] == other["id"]:
                    break


async def test_members_event_reaches_subscribers(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    async with peer_factory(alice.token) as a:
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]
        await a.ok("subscribe", room=room["id"], after=0)
        await a.ok("room.add", room=room["id"], users=[carol.id])
        ev = await a.event("members")
        assert ev["room"] == room["id"] and ev["added"] == [carol.id] and ev["removed"] == []
        await a.ok("room.remove", room=room["id"], users=[bob.id])
        ev = await a.event("members")
        assert ev["room"] == room["id"] and ev["added"] == [] and ev["removed"] == [bob.id]


async def test_concurrent_adds_and_joins_never_overfill_a_room(tmp_path: Path) -> None:
    """`limits.members_per_room` holds when adds and joins race: of two adds that each fit
    alone, one is refused; a join of a full open room is refused."""
    with running_node(tmp_path, "[limits]\nmembers_per_room = 3\n") as n:
        tenant = n.create_tenant()
        owner, u1, u2, u3 = (tenant.user(f"m{i}") for i in range(4))
        async with _connect(n, owner.token) as a, _connect(n, owner.token) as b:
            room = (await a.ok("room.create", name="r", kind="chat", members=[u1.id]))["room"]
            replies: list[dict[str, Any]] = []

            async def add(peer: Peer, user: str) -> None:
                replies.append(await peer.request("room.add", room=room["id"], users=[user]))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(add, a, u2.id)
                nursery.start_soon(add, b, u3.id)
            assert sorted(r["op"] for r in replies) == ["error", "ok"], replies
            assert [r["code"] for r in replies if r["op"] == "error"] == ["quota_exceeded"]
            listed = await a.ok(
                "room.create", name="open", kind="chat", members=[u1.id, u2.id], open=True
            )
            async with _connect(n, u3.token) as c:
                await refused(c, "room.join", ("quota_exceeded",), room=listed["room"]["id"])
