"""Room events over a real socket: edits, deletes, reactions, threads, history, subscribe/resume,
cid idempotency, receipts, typing, presence and search."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from tests.conftest import HIDDEN, Node, Peer, Tenant, make_room, module_node, refused

node = module_node("events")


async def say(peer: Peer, room: str, text: str, cid: str | None = None, **extra: Any) -> int:
    reply = await peer.ok("send", room=room, cid=cid or text, body={"text": text}, **extra)
    assert reply["room"] == room
    return int(reply["seq"])


async def pipeline(peer: Peer, frames: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Send every frame (each with its own string `id`) without waiting; return the replies by
    id. Events that arrive meanwhile go to `peer.events`."""
    for frame in frames:
        await peer.send(frame)
    replies: dict[str, dict[str, Any]] = {}
    with trio.fail_after(20):
        while len(replies) < len(frames):
            frame = await peer.recv()
            if frame.get("op") == "event":
                peer.events.append(frame)
            else:
                replies[frame["re"]] = frame
    return replies


async def send_many(peer: Peer, room: str, n: int, tag: str) -> list[int]:
    frames = [
        {"op": "send", "id": f"{tag}{i}", "room": room, "cid": f"{tag}{i}", "body": {"text": tag}}
        for i in range(n)
    ]
    replies = await pipeline(peer, frames)
    assert all(r["op"] == "ok" for r in replies.values()), replies
    return sorted(r["seq"] for r in replies.values())


async def seq_events(peer: Peer, room: str, count: int) -> list[dict[str, Any]]:
    """The next `count` seq-carrying events of `room` (messages, edits, deletes, reactions)."""
    out: list[dict[str, Any]] = []
    with trio.fail_after(10):
        while len(out) < count:
            ev = await peer.event()
            if ev.get("room") == room and "seq" in ev:
                out.append(ev)
    return out


async def no_more_seq_events(peer: Peer, room: str) -> None:
    """After a ping round trip, nothing of `room` is pending: nothing was written twice."""
    await peer.ok("ping")
    extra = [e for e in peer.events if e.get("room") == room and "seq" in e]
    assert extra == [], extra


async def history(peer: Peer, room: str, **fields: Any) -> list[dict[str, Any]]:
    return list((await peer.ok("history", room=room, **fields))["messages"])


# --- edit ----------------------------------------------------------------------------------


async def test_edit_only_by_sender(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        await b.ok("subscribe", room=room, after=0)
        seq = await say(a, room, "helo")
        await refused(b, "edit", ("forbidden",), room=room, target=seq, cid="e", body={"text": "x"})
        ack = await a.ok("edit", room=room, target=seq, cid="e1", body={"text": "hello"})
        assert ack["seq"] == seq + 1 and ack["room"] == room and isinstance(ack["ts"], int)
        msg, edit = await seq_events(b, room, 2)
        assert msg["type"] == "message" and msg["body"] == {"text": "helo"}
        assert edit["type"] == "edit" and edit["seq"] == seq + 1 and edit["target"] == seq
        assert edit["sender"] == alice.id and edit["cid"] == "e1" and edit["ts"] == ack["ts"]
        assert edit["body"] == {"text": "hello"}
        # Edits are events of their own: the message keeps its body in history.
        msgs = await history(a, room)
        assert [(m["type"], m["seq"]) for m in msgs] == [("message", 1), ("edit", 2)]
        assert msgs[0]["body"] == {"text": "helo"}


async def test_react_by_any_member(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        await a.ok("subscribe", room=room, after=0)
        seq = await say(a, room, "news")
        ack = await b.ok("react", room=room, target=seq, cid="r1", emoji="🎉")
        (msg, react) = await seq_events(a, room, 2)
        assert msg["seq"] == seq
        assert react["type"] == "react" and react["seq"] == ack["seq"] == seq + 1
        assert react["target"] == seq and react["emoji"] == "🎉" and react["sender"] == bob.id
        await refused(b, "react", ("invalid",), room=room, target=seq, cid="r2", emoji="")
        await refused(b, "react", ("invalid",), room=room, target=seq, cid="r3", emoji="x" * 65)


# --- delete --------------------------------------------------------------------------------


async def test_delete_by_sender_creator_or_admin(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    admin, owner = tenant.user("admin", role="admin"), tenant.user("owner", role="owner")
    async with (
        peer_factory(alice.token) as a,
        peer_factory(bob.token) as b,
        peer_factory(carol.token) as c,
        peer_factory(admin.token) as ad,
        peer_factory(owner.token) as ow,
    ):
        room = await make_room(a, [bob.id, carol.id, admin.id, owner.id])
        m = [await say(b, room, f"bob {i}") for i in range(4)]
        mine = await say(a, room, "alice's")
        # A plain member may delete neither someone else's message nor the creator's.
        await refused(c, "delete", ("forbidden",), room=room, target=m[0], cid="d")
        await refused(b, "delete", ("forbidden",), room=room, target=mine, cid="d")
        await b.ok("delete", room=room, target=m[0], cid="d0")  # the sender
        await a.ok("delete", room=room, target=m[1], cid="d1")  # the room's creator
        await ad.ok("delete", room=room, target=m[2], cid="d2")  # an instance admin
        await ow.ok("delete", room=room, target=m[3], cid="d3")  # an instance owner
        msgs = {e["seq"]: e for e in await history(c, room)}
        for seq in m:
            assert msgs[seq].get("deleted") is True and "body" not in msgs[seq], msgs[seq]
        assert msgs[mine]["body"] == {"text": "alice's"} and not msgs[mine].get("deleted")
        deletes = [e for e in msgs.values() if e["type"] == "delete"]
        assert sorted(d["target"] for d in deletes) == m


async def test_targets_must_be_messages_of_the_room(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        other = await make_room(a, [])
        msg = await say(a, room, "m")  # 1
        react = (await a.ok("react", room=room, target=msg, cid="r", emoji="+1"))["seq"]  # 2
        edit = (await a.ok("edit", room=room, target=msg, cid="e", body={"text": "m2"}))["seq"]
        await say(a, other, "o1")
        await say(a, other, "o2")
        await say(a, other, "o3")
        await say(a, other, "o4")
        for target in (react, edit, 99, 4):  # 4 is a message seq of the other room only
            await refused(
                a, "edit", ("not_found",), room=room, target=target, cid=f"e{target}", body={}
            )
            await refused(a, "delete", ("not_found",), room=room, target=target, cid=f"d{target}")
            await refused(
                a, "react", ("not_found",), room=room, target=target, cid=f"r{target}", emoji="x"
            )
        for target in (0, -1, "1", None, 1.5):
            await refused(a, "react", ("invalid",), room=room, target=target, cid="z", emoji="x")
        # Nothing of the above took a seq.
        assert [m["seq"] for m in await history(a, room)] == [1, 2, 3]


async def test_deleted_message_cannot_be_edited_reacted_or_deleted(
    tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        seq = await say(a, room, "oops")
        await a.ok("delete", room=room, target=seq, cid="d")
        await refused(a, "edit", ("conflict",), room=room, target=seq, cid="e", body={"text": "x"})
        await refused(a, "react", ("conflict",), room=room, target=seq, cid="r", emoji="x")
        await refused(a, "delete", ("conflict",), room=room, target=seq, cid="d2")
        assert [m["seq"] for m in await history(a, room)] == [1, 2]


@pytest.mark.parametrize("live_hub", [True, False], ids=["replay-from-edge", "replay-from-store"])
async def test_deleted_message_in_history_and_replay(
    tenant: Tenant, peer_factory: Any, live_hub: bool
) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        if live_hub:  # the edge sees the events as they happen and may replay from memory
            await a.ok("subscribe", room=room, after=0)
        seq = await say(a, room, "secret plan", cid="m1")
        await a.ok("edit", room=room, target=seq, cid="e1", body={"text": "secret plan v2"})
        keep = await say(a, room, "public")
        dele = (await a.ok("delete", room=room, target=seq, cid="d1"))["seq"]
        msgs = await history(b, room)
        assert [m["seq"] for m in msgs] == [1, 2, 3, 4]
        first = msgs[0]
        assert first["type"] == "message" and first["deleted"] is True and "body" not in first
        assert first["sender"] == alice.id and first["cid"] == "m1"
        assert "body" not in msgs[1]  # the edit's text went with the message
        assert msgs[2]["body"] == {"text": "public"} and msgs[2]["seq"] == keep
        assert msgs[3]["type"] == "delete" and msgs[3]["target"] == seq and msgs[3]["seq"] == dele
        await b.ok("subscribe", room=room, after=0)
        replay = await seq_events(b, room, 4)
        assert [e["seq"] for e in replay] == [1, 2, 3, 4]
        assert replay[0]["deleted"] is True and "body" not in replay[0]
        assert "body" not in replay[1]
        assert replay[2]["body"] == {"text": "public"}
        assert replay[3]["type"] == "delete" and replay[3]["target"] == seq


# --- threads -------------------------------------------------------------------------------


async def test_thread_must_be_a_message_of_the_room(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        other = await make_room(a, [])
        root = await say(a, room, "root")  # 1
        react = (await a.ok("react", room=room, target=root, cid="r", emoji="+1"))["seq"]  # 2
        for i in range(5):
            await say(a, other, f"other {i}")
        await b.ok("subscribe", room=room, after=2)
        reply = await say(b, room, "in thread", thread=root)
        (ev,) = await seq_events(b, room, 1)
        assert ev["seq"] == reply and ev["thread"] == root
        assert [m.get("thread") for m in await history(a, room)] == [None, None, root]
        for bad in (react, 99, 5):  # 5 is a message seq in the other room only
            await refused(
                b,
                "send",
                ("invalid", "not_found"),
                room=room,
                cid=f"t{bad}",
                body={"text": "x"},
                thread=bad,
            )
        for bad in (0, -1, "1"):
            await refused(b, "send", ("invalid",), room=room, cid="tz", body={}, thread=bad)
        assert [m["seq"] for m in await history(a, room)] == [1, 2, 3]


# --- history -------------------------------------------------------------------------------


async def test_history_paging(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        assert await history(a, room) == []
        assert await send_many(a, room, 60, "m") == list(range(1, 61))
        newest = await history(a, room)
        assert [m["seq"] for m in newest] == list(range(11, 61))
        assert all(m["type"] == "message" and m["room"] == room for m in newest)
        assert [m["seq"] for m in await history(a, room, before=11)] == list(range(1, 11))
        assert [m["seq"] for m in await history(a, room, before=31, limit=10)] == list(
            range(21, 31)
        )
        assert [m["seq"] for m in await history(a, room, before=3, limit=10)] == [1, 2]
        assert await history(a, room, before=1) == []
        assert [m["seq"] for m in await history(a, room, limit=1)] == [60]
        assert [m["seq"] for m in await history(a, room, limit=200)] == list(range(1, 61))
        assert [m["seq"] for m in await history(a, room, before=1000, limit=2)] == [59, 60]
        for limit in (0, 201, -5, "5", 2.5, True):
            await refused(a, "history", ("invalid",), room=room, limit=limit)
        for before in (0, -1, "9"):
            await refused(a, "history", ("invalid",), room=room, before=before)


async def test_history_of_edits_and_reactions(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        seq = await say(a, room, "one", cid="c1")
        await a.ok("edit", room=room, target=seq, cid="c2", body={"text": "uno"})
        await a.ok("react", room=room, target=seq, cid="c3", emoji="👍")
        msgs = await history(a, room)
        assert [(m["type"], m["seq"], m["cid"]) for m in msgs] == [
            ("message", 1, "c1"),
            ("edit", 2, "c2"),
            ("react", 3, "c3"),
        ]
        assert msgs[1]["target"] == 1 and msgs[1]["body"] == {"text": "uno"}
        assert msgs[2]["target"] == 1 and msgs[2]["emoji"] == "👍"
        assert all(m["sender"] == alice.id and isinstance(m["ts"], int) for m in msgs)


# --- subscribe -----------------------------------------------------------------------------


async def test_subscribe_replays_then_goes_live(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        for i in range(5):
            await say(a, room, f"m{i}")
        sub = await b.ok("subscribe", room=room, after=2)
        assert sub["room"] == room and sub["head"] == 5
        assert [e for e in b.events if e.get("room") == room] == []  # the ok came first
        replay = await seq_events(b, room, 3)
        assert [e["seq"] for e in replay] == [3, 4, 5]
        assert [e["body"]["text"] for e in replay] == ["m2", "m3", "m4"]
        now_ms = time.time() * 1000  # ts: integer milliseconds since the epoch
        assert all(isinstance(e["ts"], int) and abs(e["ts"] - now_ms) < 60_000 for e in replay)
        await say(a, room, "live1")
        await say(a, room, "live2")
        live = await seq_events(b, room, 2)
        assert [e["seq"] for e in live] == [6, 7]
        await no_more_seq_events(b, room)


async def test_subscribe_after_head_is_nothing_then_live(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        await say(a, room, "m1")
        assert (await a.ok("subscribe", room=room, after=1))["head"] == 1
        await say(a, room, "m2")
        (ev,) = await seq_events(a, room, 1)
        assert ev["seq"] == 2
        await no_more_seq_events(a, room)


async def test_subscribe_invalid_after(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [])
        await say(a, room, "m1")
        await refused(a, "subscribe", ("invalid",), room=room, after=2)
        await refused(a, "subscribe", ("invalid",), room=room, after=-1)
        await refused(a, "subscribe", ("invalid",), room=room, after="0")
        await refused(a, "subscribe", ("invalid",), room=room)
        await refused(b, "subscribe", HIDDEN, room=room, after=0)
        await refused(a, "subscribe", HIDDEN, room="room_does_not_exist", after=0)


async def test_invalid_resubscribe_keeps_the_subscription(
    tenant: Tenant, peer_factory: Any
) -> None:
    """A refused request changes nothing: the live subscription stays."""
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        other = await make_room(a, [bob.id])
        await b.ok("subscribe", room=room, after=0)
        await b.ok("subscribe", room=other, after=0)
        await say(a, room, "m1")
        await seq_events(b, room, 1)
        await refused(b, "subscribe", ("invalid",), room=room, after=5)
        await say(a, room, "m2")
        await say(a, other, "marker")  # published after m2: once Bob has it, m2 came before
        got = []
        with trio.fail_after(5):
            while (ev := await b.event("message"))["room"] != other:
                got.append(ev["seq"])
        assert got == [2], f"after a refused re-subscribe, the live stream got {got}"


async def test_resubscribe_restarts_from_new_after(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        for i in range(3):
            await say(a, room, f"m{i}")
        await b.ok("subscribe", room=room, after=0)
        assert [e["seq"] for e in await seq_events(b, room, 3)] == [1, 2, 3]
        assert (await b.ok("subscribe", room=room, after=1))["head"] == 3
        assert [e["seq"] for e in await seq_events(b, room, 2)] == [2, 3]
        await say(a, room, "m3")
        assert [e["seq"] for e in await seq_events(b, room, 1)] == [4]
        await no_more_seq_events(b, room)
        # And forwards: from the head, only what comes next.
        assert (await b.ok("subscribe", room=room, after=4))["head"] == 4
        await say(a, room, "m4")
        assert [e["seq"] for e in await seq_events(b, room, 1)] == [5]
        await no_more_seq_events(b, room)


async def test_unsubscribe_stops_events(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        other = await make_room(a, [bob.id])
        await b.ok("subscribe", room=room, after=0)
        await b.ok("subscribe", room=other, after=0)
        await b.ok("unsubscribe", room=room)
        await say(a, room, "unseen")
        await say(a, other, "marker")
        (ev,) = await seq_events(b, other, 1)
        assert ev["body"] == {"text": "marker"}
        assert [e for e in b.events if e.get("room") == room] == []


async def test_subscribe_during_a_send_storm_is_gapless(tenant: Tenant, peer_factory: Any) -> None:
    """Catch-up racing live appends: every seq after `after`, in order, once."""
    alice, bob = tenant.user("alice"), tenant.user("bob")
    total = 300
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        await say(a, room, "first")
        started = trio.Event()
        seqs: list[int] = []

        async def storm() -> None:
            frames = [
                {"op": "send", "id": f"s{i}", "room": room, "cid": f"s{i}", "body": {"text": "s"}}
                for i in range(total - 1)
            ]
            for i, frame in enumerate(frames):
                await a.send(frame)
                if i == 50:
                    started.set()
            replies = 0
            with trio.fail_after(20):
                while replies < len(frames):
                    frame = await a.recv()
                    if frame.get("op") != "event":
                        assert frame["op"] == "ok", frame
                        replies += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(storm)
            await started.wait()
            sub = await b.ok("subscribe", room=room, after=1)
            assert sub["head"] in range(1, total + 1)
            with trio.fail_after(20):
                while len(seqs) < total - 1:
                    ev = await b.event("message")
                    seqs.append(ev["seq"])
        assert seqs == list(range(2, total + 1))
        await no_more_seq_events(b, room)


# --- cid idempotency -----------------------------------------------------------------------


async def test_repeated_cid_gets_the_same_seq_and_no_event(
    tenant: Tenant, peer_factory: Any
) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        await b.ok("subscribe", room=room, after=0)
        first = await a.ok("send", room=room, cid="c1", body={"text": "original"})
        again = await a.ok("send", room=room, cid="c1", body={"text": "different"})
        assert (again["seq"], again["ts"], again["room"]) == (first["seq"], first["ts"], room)
        assert again["re"] != first["re"]
        # The idempotency key covers every op that carries a cid.
        edit = await a.ok("edit", room=room, target=first["seq"], cid="c1", body={"text": "e"})
        assert (edit["seq"], edit["ts"]) == (first["seq"], first["ts"])
        nxt = await a.ok("send", room=room, cid="c2", body={"text": "next"})
        assert nxt["seq"] == first["seq"] + 1
        events = await seq_events(b, room, 2)
        assert [(e["seq"], e["body"]) for e in events] == [
            (1, {"text": "original"}),
            (2, {"text": "next"}),
        ]
        await no_more_seq_events(b, room)
        assert [m["seq"] for m in await history(a, room)] == [1, 2]
        # The key is (room, sender, cid): another sender or another room is a new op.
        assert (await b.ok("send", room=room, cid="c1", body={"text": "bob"}))["seq"] == 3
        other = await make_room(a, [])
        assert (await a.ok("send", room=other, cid="c1", body={"text": "x"}))["seq"] == 1


async def test_repeated_cid_pipelined_is_one_op(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        await b.ok("subscribe", room=room, after=0)
        frames = [
            {"op": "send", "id": f"p{i}", "room": room, "cid": "same", "body": {"text": f"{i}"}}
            for i in range(10)
        ]
        replies = await pipeline(a, frames)
        assert {r["op"] for r in replies.values()} == {"ok"}
        first = replies["p0"]
        assert {(r["seq"], r["ts"]) for r in replies.values()} == {(first["seq"], first["ts"])}
        (ev,) = await seq_events(b, room, 1)
        assert ev["seq"] == 1 and ev["body"] == {"text": "0"}
        await no_more_seq_events(b, room)


async def test_repeated_cid_wins_over_validation(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        seq = await say(a, room, "m")
        react = await a.ok("react", room=room, target=seq, cid="r1", emoji="+1")
        await a.ok("delete", room=room, target=seq, cid="d1")
        again = await a.ok("react", room=room, target=seq, cid="r1", emoji="+1")
        assert (again["seq"], again["ts"]) == (react["seq"], react["ts"])


async def test_cid_length(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        assert (await a.ok("send", room=room, cid="x", body={"text": "1"}))["seq"] == 1
        assert (await a.ok("send", room=room, cid="y" * 64, body={"text": "64"}))["seq"] == 2
        for cid in ("", "z" * 65, 5, None, ["a"]):
            await refused(a, "send", ("invalid",), room=room, cid=cid, body={"text": "bad"})
        await refused(a, "send", ("invalid",), room=room, body={"text": "no cid"})
        assert [m["seq"] for m in await history(a, room)] == [1, 2]


# --- receipts, typing, presence ------------------------------------------------------------


async def test_receipt_reaches_other_subscribers(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        await say(a, room, "m1")
        await say(a, room, "m2")
        await a.ok("subscribe", room=room, after=2)
        await b.ok("receipt", room=room, read=1)
        ev = await a.event("receipt")
        assert ev == {"op": "event", "type": "receipt", "room": room, "user": bob.id, "read": 1}
        await b.ok("receipt", room=room, read=2)
        ev = await a.event("receipt")
        assert (ev["user"], ev["read"]) == (bob.id, 2)


async def test_typing_reaches_others_not_the_typist(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        await a.ok("subscribe", room=room, after=0)
        await b.ok("subscribe", room=room, after=0)
        reply = await a.ok("typing", room=room)
        assert set(reply) == {"op", "re"}
        ev = await b.event("typing")
        assert ev == {"op": "event", "type": "typing", "room": room, "user": alice.id}
        await a.ok("ping")
        assert [e for e in a.events if e.get("type") == "typing"] == []


async def test_presence_online_and_offline_for_room_mates(
    tenant: Tenant, peer_factory: Any
) -> None:
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    async with peer_factory(bob.token) as b, peer_factory(carol.token) as c:
        await make_room(b, [alice.id])  # Bob shares a room with Alice; Carol shares none

        async def presence_of(peer: Peer, user: str) -> dict[str, Any]:
            with trio.fail_after(5):
                while True:
                    ev = await peer.event("presence")
                    if ev["user"] == user:
                        return ev

        async with peer_factory(alice.token) as a:
            ev = await presence_of(b, alice.id)
            assert ev == {"op": "event", "type": "presence", "user": alice.id, "status": "online"}
            await a.ok("presence.set", status="away")
            assert (await presence_of(b, alice.id))["status"] == "away"
            await a.ok("presence.set", status="online")
            assert (await presence_of(b, alice.id))["status"] == "online"
        ev = await presence_of(b, alice.id)
        assert ev["status"] == "offline"
        # Carol's copy would have been written with Bob's: after a round trip, there is none.
        await c.ok("ping")
        assert [e for e in c.events if e.get("user") == alice.id] == []


async def test_presence_get_answers_for_room_mates_only(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    stranger = node.create_tenant().user("dave")  # another instance
    async with peer_factory(bob.token) as b:
        await make_room(b, [alice.id])  # Bob shares a room with Alice; Carol shares none
        everyone = [alice.id, carol.id, stranger.id, bob.id, "usr_nope"]
        got = (await b.ok("presence.get", users=everyone))["presence"]
        assert got == {alice.id: "offline", bob.id: "online"}
        async with peer_factory(alice.token) as a:
            assert (await b.ok("presence.get", users=[alice.id]))["presence"] == {
                alice.id: "online"
            }
            await a.ok("presence.set", status="away")
            assert (await b.ok("presence.get", users=[alice.id]))["presence"] == {alice.id: "away"}
        await refused(b, "presence.get", ("invalid",), users="alice")
        await refused(b, "presence.get", ("invalid",))


# --- search --------------------------------------------------------------------------------


async def test_search_every_word_newest_first(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        s1 = await say(a, room, "red apple pie")
        s2 = await say(a, room, "green apple")
        await say(a, room, "red car")
        s4 = await say(a, room, "an apple, bright red!")
        hits = (await a.ok("search", query="apple red"))["hits"]
        assert [h["seq"] for h in hits] == [s4, s1]
        assert all(h["type"] == "message" and h["room"] == room for h in hits)
        assert hits[1]["body"] == {"text": "red apple pie"} and hits[1]["sender"] == alice.id
        assert [h["seq"] for h in (await a.ok("search", query="apple"))["hits"]] == [s4, s2, s1]
        assert (await a.ok("search", query="apple blue"))["hits"] == []
        assert (await a.ok("search", query="purple"))["hits"] == []
        await refused(a, "search", ("invalid",))
        await refused(a, "search", ("invalid",), query="")
        await refused(a, "search", ("invalid",), query=5)


async def test_search_skips_deleted_and_matches_edited_text(
    tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        gone = await say(a, room, "walrus tusk")
        kept = await say(a, room, "walrus flipper")
        await a.ok("delete", room=room, target=gone, cid="d")
        hits = (await a.ok("search", query="walrus"))["hits"]
        assert [h["seq"] for h in hits] == [kept]
        assert (await a.ok("search", query="tusk"))["hits"] == []

        whale = await say(a, room, "blue whale")
        edit = (await a.ok("edit", room=room, target=whale, cid="e", body={"text": "grey shark"}))[
            "seq"
        ]
        assert (await a.ok("search", query="whale"))["hits"] == []
        (hit,) = (await a.ok("search", query="shark grey"))["hits"]
        assert hit["seq"] == whale and hit["body"] == {"text": "grey shark"}
        assert hit.get("edited") == edit
        # A deleted message never matches, whatever text it had after edits.
        await a.ok("delete", room=room, target=whale, cid="d2")
        assert (await a.ok("search", query="shark"))["hits"] == []
        assert (await a.ok("search", query="whale"))["hits"] == []


async def test_search_is_scoped_to_the_callers_rooms(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    stranger = node.create_tenant().user("stranger")
    async with (
        peer_factory(alice.token) as a,
        peer_factory(bob.token) as b,
        peer_factory(stranger.token) as s,
    ):
        shared = await make_room(a, [bob.id])
        mine = await make_room(a, [])
        bobs = await make_room(b, [])
        lobby = await make_room(b, [], open=True)  # open, but Alice has not joined
        foreign = await make_room(s, [])
        in_shared = await say(a, shared, "kumquat shared")
        in_mine = await say(a, mine, "kumquat mine")
        await say(b, bobs, "kumquat bob")
        await say(b, lobby, "kumquat lobby")
        await say(s, foreign, "kumquat foreign")
        hits = (await a.ok("search", query="kumquat"))["hits"]
        assert sorted((h["room"], h["seq"]) for h in hits) == sorted(
            [(shared, in_shared), (mine, in_mine)]
        )
        assert [h["room"] for h in hits] == [mine, shared]  # newest first
        only = (await a.ok("search", query="kumquat", room=shared))["hits"]
        assert [(h["room"], h["seq"]) for h in only] == [(shared, in_shared)]
        for room in (bobs, lobby, foreign, "room_nope"):
            await refused(a, "search", HIDDEN, query="kumquat", room=room)
        assert {h["room"] for h in (await s.ok("search", query="kumquat"))["hits"]} == {foreign}
