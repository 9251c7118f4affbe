"""A user learns of rooms they were added to or removed from without polling (`room.added`,
`room.removed` on each of their live connections), and members read each other's read
positions (`room.reads`). Over real sockets: an embedded `gb6 run`, and a cluster (two
`gb6 origin`, two `gb6 edge`) where the change is made through one edge and seen on the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.browser_harness import BrowserTools, browser_tools, run_scenario
from tests.conftest import Node, Peer, Tenant, connect
from tests.test_cluster import Cluster

_connect = asynccontextmanager(connect)


async def _quiet(peer: Peer) -> list[dict[str, Any]]:
    """The room.* events this peer holds once a ping round-trip has flushed what was sent."""
    await peer.ok("ping")
    return [e for e in peer.events if str(e.get("type", "")).startswith("room.")]


async def test_added_and_removed_reach_every_live_connection(node: Node, tenant: Tenant) -> None:
    alice, bob, carol, eve = (tenant.user(n) for n in ("alice", "bob", "carol", "eve"))
    async with (
        _connect(node, alice.token) as a1,
        _connect(node, alice.token) as a2,
        _connect(node, bob.token) as b1,
        _connect(node, bob.token) as b2,
        _connect(node, carol.token) as c,
        _connect(node, eve.token) as e,
    ):
        created = await a1.ok("room.create", name="plans", kind="chat", members=[bob.id])
        room = created["room"]
        want = {**room, "head": 0, "read": 0}
        for peer in (b1, b2, a2):  # the creator's other connection too
            ev = await peer.event("room.added")
            assert ev["room"] == want, ev
        # The socket that made the change has its `ok`; uninvolved users hear nothing.
        assert await _quiet(a1) == [] and await _quiet(c) == [] and await _quiet(e) == []

        await a1.ok("send", room=room["id"], cid="m1", body={"text": "hi"})
        await a1.ok("room.add", room=room["id"], users=[carol.id])
        ev = await c.event("room.added")
        assert ev["room"] == {**room, "head": 1, "read": 0}  # as `rooms` would list it
        assert [r["id"] for r in (await c.ok("rooms"))["rooms"]] == [room["id"]]

        await a1.ok("room.remove", room=room["id"], users=[bob.id])
        for peer in (b1, b2):
            ev = await peer.event("room.removed")
            assert ev["room"] == room, ev
            assert (await peer.ok("rooms"))["rooms"] == []
        assert await _quiet(e) == []  # never a word about rooms eve is not in

        # Joining and leaving an open room tell the user's other connections.
        lobby = (await a1.ok("room.create", name="lobby", kind="chat", open=True))["room"]
        async with _connect(node, eve.token) as e2:
            await e.ok("room.join", room=lobby["id"])
            assert (await e2.event("room.added"))["room"]["id"] == lobby["id"]
            await e.ok("room.leave", room=lobby["id"])
            assert (await e2.event("room.removed"))["room"]["id"] == lobby["id"]
            assert await _quiet(e) == []


async def test_room_reads_for_members_only(node: Node, tenant: Tenant) -> None:
    alice, bob, eve = (tenant.user(n) for n in ("alice", "bob", "eve"))
    other = node.create_tenant().user("mallory")
    async with (
        _connect(node, alice.token) as a,
        _connect(node, bob.token) as b,
        _connect(node, eve.token) as e,
        _connect(node, other.token) as m,
    ):
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]["id"]
        lobby = (await a.ok("room.create", name="l", kind="chat", open=True))["room"]["id"]
        for i in range(3):
            await a.ok("send", room=room, cid=f"c{i}", body={"text": str(i)})
        await b.ok("receipt", room=room, read=2)
        await a.ok("receipt", room=room, read=3)
        reply = await b.ok("room.reads", room=room)
        assert reply["room"] == room and reply["reads"] == {alice.id: 3, bob.id: 2}
        # Non-members learn nothing: a private room is not_found, an open one forbidden, and
        # another instance's room not_found.
        for peer, target, code in (
            (e, room, "not_found"),
            (e, lobby, "forbidden"),
            (m, room, "not_found"),
            (e, "room_nope", "not_found"),
        ):
            reply = await peer.request("room.reads", room=target)
            assert reply["op"] == "error" and reply["code"] == code, reply
            assert "reads" not in reply
        for bad in ({}, {"room": 7}, {"room": ""}):
            reply = await a.request("room.reads", **bad)
            assert reply["code"] == "invalid", reply
        await a.ok("ping")  # still serving


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.add_edges(2)
        yield c
    finally:
        c.stop()


async def test_cluster_edges_tell_added_removed_and_serve_reads(cluster: Cluster) -> None:
    tenant = cluster.origins[1].create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    e0, e1 = cluster.edges
    async with _connect(e0, alice.token) as a, _connect(e1, bob.token) as b:
        room = (await a.ok("room.create", name="x", kind="chat", members=[bob.id]))["room"]
        assert (await b.event("room.added"))["room"] == {**room, "head": 0, "read": 0}
        await a.ok("subscribe", room=room["id"], after=0)
        await a.ok("send", room=room["id"], cid="k1", body={"text": "one"})
        await b.ok("receipt", room=room["id"], read=1)
        assert (await a.event("receipt"))["user"] == bob.id  # e0's replica has it now
        reads = await a.ok("room.reads", room=room["id"])
        assert reads["reads"] == {alice.id: 0, bob.id: 1}
        await a.ok("room.remove", room=room["id"], users=[bob.id])
        assert (await b.event("room.removed"))["room"] == room
        reply = await b.request("room.reads", room=room["id"])
        assert reply["code"] == "not_found", reply


@pytest.fixture
def tools() -> BrowserTools:
    return browser_tools()  # skips, naming the tool, where Chromium or Playwright is missing


async def test_web_app_follows_membership_and_reads(
    node: Node, tools: BrowserTools, request: pytest.FixtureRequest
) -> None:
    """The web app (edge/web) in headless Chromium: room lists follow room.added/room.removed
    with no polling, and "Read by" is seeded from room.reads (tests/browser/web_room_events.mjs)."""
    tenant = node.create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    with trio.fail_after(50):
        out = await run_scenario(
            tools,
            "web_room_events.mjs",
            {
                "http": node.http_url,
                "alice": {"id": alice.id, "token": alice.token},
                "bob": {"id": bob.id, "token": bob.token},
            },
            request.node.name,
        )
    assert out == {
        "bobListed": True,
        "readByAfterReload": True,
        "removedInOtherTab": True,
        "pageErrors": [],
    }
