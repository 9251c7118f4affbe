"""The edge↔origin link: its framing (pure, with bytes), its door (a real origin's port), and the
edge's end of it (an edge and an origin in this process)."""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio
import trio_asyncio

from edge.bus import (
    LocalBroker,
    LocalPubSub,
    LocalSessions,
    Presence,
    PubSub,
    SessionRegistry,
    SessionTable,
)
from edge.gateway import Gateway
from edge.redis_bus import RedisPubSub, RedisSessions, open_redis
from edge.shared_signals import SharedSignals
from node.config import Config, Limits
from node.errors import GB6Error
from origin.rbac import OPERATOR
from origin.shard import OriginShard
from replication import link
from replication.edge_link import RemoteOrigin
from replication.origin_link import LinkServer
from tests.conftest import Node, OwnRedis, Peer, connect, make_room, refused
from tests.test_cluster import SECRET, Cluster
from tests.test_tenancy import CLOSE_UNAUTHORIZED, closed_with


def test_frames_round_trip_whatever_the_split() -> None:
    msgs = [{"t": "req", "id": i, "op": "append", "body": {"text": "é" * i}} for i in range(50)]
    data = b"".join(link.encode(m) for m in msgs)
    for step in (1, 3, 7, 64, len(data)):
        decoder = link.FrameDecoder()
        out = []
        for i in range(0, len(data), step):
            out += decoder.feed(data[i : i + step])
        assert out == msgs


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("!I", 1 << 30),  # longer than the limit: refused before it is buffered
        struct.pack("!I", 3) + b"{x}",  # not JSON
        struct.pack("!I", 2) + b"[]",  # not an object
        struct.pack("!I", 8) + b'{"t": 1}',  # no kind
    ],
)
def test_bad_frames_break_the_link(raw: bytes) -> None:
    with pytest.raises(link.LinkBroken):
        link.FrameDecoder(max_frame=1 << 20).feed(raw)


@pytest.fixture
def origin_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("door"))
    yield c
    c.stop()


async def test_a_wrong_secret_gets_nothing(origin_only: Cluster) -> None:
    host, _, port = origin_only.origins[0].link.rpartition(":")
    for hello in (
        {"t": "hello", "secret": "not-the-secret", "edge": "x"},
        {"t": "req", "id": 1, "op": "auth", "token": "t"},
    ):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(link.encode(hello))
            with trio.fail_after(5):
                assert await stream.receive_some(1024) == b""  # closed, no welcome, no data


async def test_a_connection_that_has_not_shown_the_secret_may_not_send_a_large_frame(
    origin_only: Cluster,
) -> None:
    """Before the hello, the origin holds only a hello's worth of bytes: a frame announced
    larger closes the connection at once instead of being buffered (up to 64 MiB each, on as
    many connections as anyone who reaches the port opens)."""
    host, _, port = origin_only.origins[0].link.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(struct.pack("!I", 1 << 20) + b"x" * 1000)
        with trio.fail_after(5):  # the origin's deadline for a hello is 10 s
            assert await stream.receive_some(1024) == b""


@attrs.define
class RawEdge:
    """A hand-driven edge end of a link: frames out, frames in."""

    stream: trio.SocketStream
    decoder: link.FrameDecoder = attrs.Factory(link.FrameDecoder)
    backlog: list[dict[str, Any]] = attrs.Factory(list)

    async def send(self, msg: dict[str, Any]) -> None:
        await self.stream.send_all(link.encode(msg))

    async def until(self, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first frame from the origin for which `done` is true (those before it read)."""
        with trio.fail_after(10):
            while True:
                while self.backlog:
                    if done(frame := self.backlog.pop(0)):
                        return frame
                if not (data := await self.stream.receive_some(1 << 16)):
                    raise AssertionError("the origin closed the link")
                self.backlog += self.decoder.feed(data)


async def test_an_edge_of_link_version_1_gets_its_appends_answered(origin_only: Cluster) -> None:
    """An edge of an older release (its hello has no `v`) reads no acks in batch frames: the
    origin answers its appends in a `res` each, so the two may be upgraded in either order."""
    user = origin_only.origins[0].create_tenant().user("ann")
    host, _, port = origin_only.origins[0].link.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        edge = RawEdge(stream)
        await edge.send({"t": "hello", "secret": SECRET, "edge": "old"})
        await edge.until(lambda f: f["t"] == "snap_end")
        create = {"members": [], "name": "r", "kind": "chat", "open": False}
        await edge.send({"t": "req", "id": 1, "op": "create_room", "who": user.id, **create})
        room = (await edge.until(lambda f: f.get("id") == 1))["ok"]["room"]["record"]["id"]
        for i, cid in ((2, "c1"), (3, "c1")):  # the second is a repeat
            append = {"room": room, "type": "message", "cid": cid, "body": {"text": "hi"}}
            await edge.send({"t": "req", "id": i, "op": "append", "who": user.id, **append})
            ok = (await edge.until(lambda f, i=i: f.get("id") == i))["ok"]  # type: ignore[misc]
            assert (ok["event"]["seq"], ok["event"]["cid"], ok["duplicate"]) == (1, cid, i == 3)


async def test_an_edge_takes_the_link_secret_from_its_environment(
    origin_only: Cluster, tmp_path: Path
) -> None:
    """`GB6_LINK_SECRET` stands for `[cluster] link_secret` on an edge as on an origin: the
    edge shows it to the origins, whose users it then serves."""
    conf = tmp_path / "edge.toml"
    listed = ", ".join(f'"{o.link}"' for o in origin_only.origins)
    conf.write_text(f"[cluster]\norigins = [{listed}]\n")
    edge = Node(
        tmp_path / "e",
        extra_args=["--config", str(conf)],
        command="edge",
        env={"GB6_LINK_SECRET": SECRET},
    )
    edge.start()
    try:
        user = origin_only.origins[0].create_tenant().user("ann")
        a: Peer
        async with peer_of(edge, user.token) as a:
            assert await make_room(a, [])
    finally:
        edge.kill()


async def test_an_edge_survives_a_push_it_cannot_apply(tmp_path: Path) -> None:
    """A push the edge cannot apply (from an origin of another version, say) drops that link,
    whose clients resume, and the link connects again: the edge process goes on serving."""
    connections = 0
    again = trio.Event()

    async def origin(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await stream.receive_some(1 << 16)  # the edge's hello
        await stream.send_all(link.encode({"t": "welcome", "shard": "s1"}))
        await stream.send_all(link.encode({"t": "snap_end"}))
        if connections == 1:  # an event without its fields
            await stream.send_all(link.encode({"t": "batch", "events": {"r": [{}]}, "heads": {}}))
        else:
            again.set()
        while await stream.receive_some(1 << 16):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, origin, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        config = Config(data_dir=tmp_path, origins=(f"127.0.0.1:{port}",), link_secret="secret")
        remote = RemoteOrigin(config)
        await nursery.start(remote.run)
        with trio.fail_after(10):
            await again.wait()
        assert remote.links[0].connected
        nursery.cancel_scope.cancel()


async def test_a_link_to_an_origin_whose_host_does_not_answer_gives_up_its_connect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An origin's host gone from the network drops the edge's SYNs (here: a port whose accept
    queue is full), and the kernel would go on trying for about two minutes: the edge gives up
    each connect after `_CONNECT_S` and tries again, so it reconnects soon once the host is
    back."""
    from replication import edge_link

    monkeypatch.setattr(edge_link, "_CONNECT_S", 0.5)
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    queued = [socket.create_connection(full.getsockname(), timeout=5)]  # fills the queue (of 1)
    try:
        config = Config(data_dir=tmp_path, origins=(), link_secret="secret")
        host, port = full.getsockname()
        shard_link = edge_link.ShardLink(RemoteOrigin(config), f"{host}:{port}")
        with trio.fail_after(5), pytest.raises(OSError, match="no connection"):
            await shard_link._connect_and_serve(trio.Event())
    finally:
        for s in (*queued, full):
            s.close()


@asynccontextmanager
async def edge_and_origin(
    tmp_path: Path,
    limits: Limits,
    users: int = 0,
    extra_origins: tuple[str, ...] = (),
    messages_per_day: int | None = None,
    shared: bool | str = False,
) -> AsyncIterator[tuple[Gateway, Node, str, OriginShard]]:
    """An origin and an edge in this process over a real link: the edge's gateway, a node to
    connect to it, a token of a user of the origin (with `users` more made before the edge
    connects), and the origin. `shared`: the edge shares typing and presence through an
    in-process bus (True) or through the Redis at this URL."""
    origin_cfg = Config(data_dir=tmp_path / "o", link_port=0, link_secret=SECRET, limits=limits)
    async with (
        trio_asyncio.open_loop(),
        AsyncExitStack() as stack,
        trio.open_nursery() as nursery,
    ):
        shard = OriginShard(origin_cfg)
        await nursery.start(shard.run)
        link_port = await nursery.start(LinkServer(origin_cfg, shard, SECRET).run)
        t = shard.tenancy
        org = await t.create_org(OPERATOR, "o", None)
        inst = await t.create_instance(OPERATOR, org.id, "i", None, "unlimited")
        for i in range(users):
            await t.create_user(OPERATOR, inst.id, f"user {i} " + "n" * 100, "member")
        if messages_per_day is not None:
            await t.set_quota_override(OPERATOR, inst.id, "messages", messages_per_day)
        edge_cfg = attrs.evolve(
            origin_cfg,
            data_dir=tmp_path / "e",
            ws_port=0,
            origins=(f"127.0.0.1:{link_port}", *extra_origins),
        )
        remote = RemoteOrigin(edge_cfg)
        signals = None
        if shared:
            pubsub: PubSub
            sessions: SessionRegistry
            if isinstance(shared, str):
                client = await stack.enter_async_context(open_redis(shared))
                pubsub = RedisPubSub(client, prefix="gb6:")
                sessions = RedisSessions(client, "edge", prefix="gb6:")
            else:
                pubsub = LocalPubSub(LocalBroker())
                sessions = LocalSessions(SessionTable(), "edge")
            for component in (pubsub, sessions):
                await nursery.start(component.run)
            signals = SharedSignals(pubsub, sessions, "edge")
            await nursery.start(signals.run)
        gateway = Gateway(edge_cfg, remote, signals)
        await nursery.start(remote.run)
        assert remote.links[0].connected, "the edge did not load the shard's snapshot"
        ws_port = await nursery.start(gateway.run)
        pushed = trio.Event()
        remote.tenancy_listeners.append(lambda rec: pushed.set() if rec.name == "ann" else None)
        ann = await t.create_user(OPERATOR, inst.id, "ann", "member")
        token, _ = await t.issue_token(OPERATOR, inst.id, ann.id)
        with trio.fail_after(5):
            await pushed.wait()  # the user reached the edge's replica
        yield gateway, Node(tmp_path, ws_url=f"ws://127.0.0.1:{ws_port}/v1/ws"), token, shard
        nursery.cancel_scope.cancel()


peer_of = asynccontextmanager(connect)  # `async with peer_of(node, token) as peer:`


async def test_a_subscribe_refused_after_its_watch_leaves_no_hub_behind(tmp_path: Path) -> None:
    """A cluster edge watches a room (the origin pushes it the room's events) before it checks
    the rest of a subscribe. One refused after the watch leaves the room's hub idle, to be
    forgotten and unwatched in time, not held and pushed to for good."""
    limits = Limits(idle_room_cache_rooms=0, max_subscriptions=1)
    async with edge_and_origin(tmp_path, limits) as (gateway, node, token, _):
        a: Peer
        async with peer_of(node, token) as a:
            first = await make_room(a, [])
            second = await make_room(a, [])
            await a.ok("subscribe", room=first, after=0)
            await refused(a, "subscribe", ("quota_exceeded",), room=second, after=0)
            assert gateway.hubs.get(first) is not None
            assert gateway.hubs.get(second) is None  # idle, and past the idle ones kept (0)


async def test_a_subscribe_again_with_no_idle_cache_keeps_the_rooms_events_coming(
    tmp_path: Path,
) -> None:
    """A client subscribes again to a room only it subscribes to on this edge (to resume from
    another seq). With no idle hubs kept, releasing its old subscription first left the hub
    idle, evicted and unwatched under the new one: that subscribe was `ok` and then got no
    more events."""
    async with edge_and_origin(tmp_path, Limits(idle_room_cache_rooms=0)) as (_, node, token, _):
        a: Peer
        async with peer_of(node, token) as a:
            room = await make_room(a, [])
            await a.ok("subscribe", room=room, after=0)
            await a.ok("send", room=room, cid="c1", body={"text": "one"})
            assert (await a.event("message"))["seq"] == 1
            await a.ok("subscribe", room=room, after=0)  # again, from the start
            assert (await a.event("message"))["seq"] == 1
            await a.ok("send", room=room, cid="c2", body={"text": "two"})
            with trio.fail_after(5):
                assert (await a.event("message"))["seq"] == 2


async def test_a_resume_further_ahead_than_this_edges_pushes_is_told_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client saw a seq on another edge that this edge's pushes have not brought even after
    the subscribe's wait (the origin let a backlog build up for this edge). `unavailable`, to
    retry: `invalid` says never to, and the client would lose the room. An `after` beyond
    what the origin itself has is `invalid`."""
    from edge import gateway as gateway_module

    held: list[tuple[LinkServer, str, list[Any]]] = []
    holding = False
    push = LinkServer._on_events

    def on_events(self: LinkServer, room: str, events: list[Any]) -> None:
        if holding:
            held.append((self, room, events))
        else:
            push(self, room, events)

    monkeypatch.setattr(LinkServer, "_on_events", on_events)
    monkeypatch.setattr(gateway_module, "AHEAD_WAIT_S", 0.2)
    async with edge_and_origin(tmp_path, Limits()) as (_, node, token, _):
        a: Peer
        async with peer_of(node, token) as a:
            room = await make_room(a, [])
            await a.ok("subscribe", room=room, after=0)
            await a.ok("send", room=room, cid="c1", body={"text": "one"})
            holding = True  # the edge's pushes lag from here
            await a.ok("send", room=room, cid="c2", body={"text": "two"})
            await refused(a, "subscribe", ("unavailable",), room=room, after=2)
            await refused(a, "subscribe", ("invalid",), room=room, after=3)
            holding = False
            for server, r, events in held:
                push(server, r, events)
            assert (await a.ok("subscribe", room=room, after=2))["head"] == 2


async def test_a_subscribe_gone_before_its_watch_answer_leaves_the_room_to_be_unwatched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client closed while its subscribe waits for the origin's answer to the watch (here its
    user was deleted) leaves a hub no subscription takes: it is idle, so it is forgotten in
    time and the origin stops pushing the room to this edge, as for any room clients left."""
    servers: list[LinkServer] = []
    asked, answer = trio.Event(), trio.Event()
    original = LinkServer._request

    async def request(self: LinkServer, peer: Any, msg: dict[str, Any], reads: Any) -> None:
        servers.append(self)
        if msg.get("op") == "watch" and not answer.is_set():
            asked.set()
            await answer.wait()  # the origin reads nothing more from this edge meanwhile
        await original(self, peer, msg, reads)

    monkeypatch.setattr(LinkServer, "_request", request)
    async with edge_and_origin(tmp_path, Limits(idle_room_cache_rooms=0)) as (
        gateway,
        node,
        token,
        shard,
    ):
        (inst,) = shard.instances
        bob = await shard.tenancy.create_user(OPERATOR, inst, "bob", "member")
        bob_token, _ = await shard.tenancy.issue_token(OPERATOR, inst, bob.id)
        a: Peer
        b: Peer
        async with peer_of(node, token) as a, peer_of(node, bob_token) as b:
            room = await make_room(a, [bob.id])
            other = await make_room(a, [])
            await b.send({"op": "subscribe", "id": "s", "room": room, "after": 0})
            with trio.fail_after(5):
                await asked.wait()
            await shard.tenancy.delete_user(OPERATOR, inst, bob.id)
            assert await closed_with(b) == CLOSE_UNAUTHORIZED
            answer.set()
            # Answered after the first: the room's hub exists by then, idle.
            await a.ok("subscribe", room=other, after=0)
            await a.ok("unsubscribe", room=other)  # a release: the idle hubs past 0 go
            assert gateway.hubs.get(room) is None
            with trio.fail_after(5):
                while any(room in p.watched for p in servers[0].peers):  # noqa: ASYNC110
                    await trio.sleep(0.01)


async def test_a_link_lost_right_after_a_watch_answer_leaves_no_hub_without_its_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link breaks in the same read as the answer to a subscribe's watch, before that
    subscribe goes on: the subscribe must not make the room's hub again (no watch would be
    behind it after the reconnect, and no event would reach its subscribers). After the
    reconnect, a subscriber of the room gets its new events."""
    from replication.edge_link import ShardLink

    armed: list[str] = []  # the room whose watch's answer breaks the link
    original = ShardLink._on_push

    def on_push(self: ShardLink, msg: dict[str, Any]) -> None:
        original(self, msg)
        ok = msg.get("ok")
        if armed and msg["t"] == "res" and isinstance(ok, dict) and ok.get("room") == armed[0]:
            armed.clear()
            self._lost()  # what the reader's end does, before any other task runs
            raise link.LinkBroken("broken by the test after a watch's answer")

    monkeypatch.setattr(ShardLink, "_on_push", on_push)
    async with edge_and_origin(tmp_path, Limits()) as (gateway, node, token, _):
        shard_link = gateway.origin.links[0]
        a: Peer
        b: Peer
        async with peer_of(node, token) as a:
            room = await make_room(a, [])
        armed.append(room)
        async with peer_of(node, token) as b:
            await b.send({"op": "subscribe", "id": "s", "room": room, "after": 0})
            with trio.fail_after(10):
                while armed or not shard_link.connected:  # noqa: ASYNC110 (it reconnects)
                    await trio.sleep(0.02)
        async with peer_of(node, token) as a, peer_of(node, token) as b:
            await b.ok("subscribe", room=room, after=0)
            seq = (await a.ok("send", room=room, cid="c1", body={"text": "hi"}))["seq"]
            with trio.fail_after(5):
                assert (await b.event("message"))["seq"] == seq


def test_a_batch_larger_than_a_frame_reaches_the_edge_in_several(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A commit's push to an edge is one frame, unless it is larger than a frame may be (many
    bodies near their limit): then it goes in several, each room's events in order, the heads
    and the acks last, instead of failing the origin's publishing."""
    from replication import origin_link

    monkeypatch.setattr(link, "MAX_FRAME", 100_000)
    monkeypatch.setattr(origin_link, "_PAGE_BYTES", 30_000)
    peer = origin_link.EdgePeer("e", None, 1 << 30)  # type: ignore[arg-type]  # never written
    text = "x" * 9_000
    peer.events = {
        r: [{"room": r, "seq": s, "body": {"text": text}} for s in range(1, n + 1)]
        for r, n in (("r1", 20), ("r2", 3))
    }
    peer.heads = {"r3": 7}
    peer.acks = [(i, i, 0) for i in range(1, 24)]
    peer.flush_batch()
    frames = link.FrameDecoder().feed(b"".join(peer._out))
    assert len(frames) > 2 and all(len(f) <= link.MAX_FRAME for f in peer._out)
    assert all(f["t"] == "batch" for f in frames)
    for room, n in (("r1", 20), ("r2", 3)):
        seqs = [e["seq"] for f in frames for e in f["events"].get(room, ())]
        assert seqs == list(range(1, n + 1))
    assert (frames[-1]["heads"], frames[-1]["acks"]) == (
        {"r3": 7},
        [[i, i, 0] for i in range(1, 24)],
    )
    assert not any(f["heads"] or f.get("acks") for f in frames[:-1])


async def test_a_failing_listener_of_the_shard_leaves_it_answering_and_serving(
    tmp_path: Path,
) -> None:
    """A listener of the shard's new events fails (a bug): the ops of that commit are answered
    all the same, and the shard goes on appending and serving."""
    failures: list[int] = []

    def failing(room: str, events: list[Any]) -> None:
        if not failures:
            failures.append(events[-1].seq)
            raise RuntimeError("a listener's bug, made by the test")

    async with edge_and_origin(tmp_path, Limits()) as (_, node, token, shard):
        shard.event_listeners.append(failing)
        a: Peer
        async with peer_of(node, token) as a:
            room = await make_room(a, [])
            await a.ok("subscribe", room=room, after=0)
            assert (await a.ok("send", room=room, cid="c1", body={"text": "1"}))["seq"] == 1
            assert failures == [1]
            assert (await a.ok("send", room=room, cid="c2", body={"text": "2"}))["seq"] == 2
            assert [(await a.event("message"))["seq"] for _ in range(2)] == [1, 2]


async def test_a_hello_under_way_when_its_shards_link_is_lost_does_not_end_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A link lost while a hello waits (here on the shared session registry) frees what the
    origin counted for this edge, its connection slot included: the socket is closed to
    resume like the shard's others, not made ready with a slot the origin no longer counts."""
    from trio_websocket import open_websocket_url

    peers: list[Any] = []
    welcome = LinkServer._welcome

    def welcoming(self: LinkServer, msg: dict[str, Any], stream: Any) -> Any:
        peer = welcome(self, msg, stream)
        peers.append(peer)
        return peer

    monkeypatch.setattr(LinkServer, "_welcome", welcoming)
    async with edge_and_origin(tmp_path, Limits(), shared=True) as (gateway, node, token, _):
        assert gateway.shared is not None
        shared, shard_link = gateway.shared, gateway.origin.links[0]
        add = shared.sessions.add
        entered, go_on = trio.Event(), trio.Event()

        async def adding(user: str, session: str, instance: str, *, away: bool) -> Presence:
            entered.set()
            await go_on.wait()
            return await add(user, session, instance, away=away)

        monkeypatch.setattr(shared.sessions, "add", adding)
        generation = shard_link.generation
        async with open_websocket_url(node.ws_url) as ws:
            a = Peer(ws)
            await a.send({"op": "hello", "id": "h", "token": token})
            with trio.fail_after(5):
                await entered.wait()
            peers[-1].cancel.cancel()  # the origin drops the link
            with trio.fail_after(10):
                while shard_link.generation == generation or not shard_link.connected:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            go_on.set()
            assert await closed_with(a) == 1011


async def test_a_snapshot_larger_than_the_link_buffer_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shard's snapshot is what an edge asked for when it connected: whatever its size
    (here past the link's buffer, in frames of about `_PAGE_BYTES`), it does not get the edge
    cut off, and the edge serves the shard's users."""
    from replication import origin_link

    monkeypatch.setattr(origin_link, "_PAGE_BYTES", 16_000)
    limits = Limits(link_buffer_bytes=64 << 10)
    async with edge_and_origin(tmp_path, limits, users=500) as (gateway, node, token, _):
        a: Peer
        async with peer_of(node, token) as a:
            assert await make_room(a, [])
        names = [u.name for u in gateway.origin.state.users.values()]
        assert sum(1 for n in names if n.startswith("user ")) == 500


async def test_a_membership_change_reaches_the_edge_as_the_change_not_the_room(
    tmp_path: Path,
) -> None:
    """A room's member map is up to `members_per_room` entries. Each change reaches every edge
    as what changed: here the room outgrows the link's buffer while each change fits in it,
    and the edge is never cut off (which would close every client of the shard on it)."""
    limits = Limits(link_buffer_bytes=16 << 10)
    async with edge_and_origin(tmp_path, limits, users=600) as (gateway, node, token, _):
        replica = gateway.origin
        shard_link = replica.links[0]
        generation = shard_link.generation
        others = sorted(u.id for u in replica.state.users.values() if u.name.startswith("user "))
        a: Peer
        async with peer_of(node, token) as a:
            room = await make_room(a, [])
            for i in range(0, 600, 200):
                await a.ok("room.add", room=room, users=others[i : i + 200])
            await a.ok("room.remove", room=room, users=others[:10])
            await a.ok("room.add", room=room, users=others[:2])
            # The link keeps order: each change was applied before its answer arrived.
            members = replica.state.rooms[room].members
            assert len(members) == 1 + 592
            assert set(others[:2]) | set(others[10:]) <= set(members)
            assert all(room in replica.state.user_rooms[u] for u in others[:2])
            assert not any(room in replica.state.user_rooms.get(u, ()) for u in others[2:10])
        assert shard_link.connected and shard_link.generation == generation


async def test_an_edge_follows_the_channels_of_its_clients_rooms_and_instances_only(
    tmp_path: Path,
) -> None:
    """What the gateway tells the shared signals it uses: the rooms its clients subscribe to
    and the instances of its connected users. The rest is unfollowed by the second sweep."""
    async with edge_and_origin(tmp_path, Limits(), shared=True) as (gateway, node, token, _):
        assert gateway.shared is not None
        shared = gateway.shared

        async def sweeps() -> set[str]:
            for _ in range(2):
                await shared.unfollow_unused()
            return set(shared.pubsub.inbox.channels)

        a: Peer
        async with peer_of(node, token) as a:
            (instance,) = gateway.origin.state.instances  # the shard's one
            first, second = await make_room(a, []), await make_room(a, [])
            for room in (first, second):
                await a.ok("subscribe", room=room, after=0)
            await a.ok("unsubscribe", room=first)
            assert await sweeps() == {f"room:{second}", f"instance:{instance}"}
        with trio.fail_after(5):
            while gateway.conns:  # noqa: ASYNC110 (the edge notices the close)
                await trio.sleep(0.01)
        assert await sweeps() == set()


async def test_large_answers_wait_for_the_link_and_do_not_cut_the_edge_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page of large messages is bigger than the link's buffer: the answer waits for room
    instead of cutting the edge off (which would close every client of the shard on it), and
    a catch-up reads on page after page (here of two events each)."""
    from replication import origin_link

    monkeypatch.setattr(origin_link, "_PAGE_BYTES", 50_000)
    text = "x" * 20_000
    limits = Limits(link_buffer_bytes=64 << 10)
    async with edge_and_origin(tmp_path, limits) as (_, node, token, _):
        a: Peer
        b: Peer
        async with peer_of(node, token) as a, peer_of(node, token) as b:
            room = await make_room(a, [])
            for i in range(8):  # 160 KB in all
                await a.ok("send", room=room, cid=f"c{i}", body={"text": text})
            history = (await a.ok("history", room=room, limit=8))["messages"]
            assert [m["seq"] for m in history] == list(range(1, 9))
            await b.ok("subscribe", room=room, after=0)
            got = [(await b.event("message"))["seq"] for _ in range(8)]
            assert got == list(range(1, 9))
            assert (await a.ok("send", room=room, cid="last", body={"text": "hi"}))["seq"] == 9
            assert (await b.event("message"))["seq"] == 9  # the link stayed up


async def test_each_end_drops_a_link_whose_peer_went_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that is frozen, or whose host went away without closing the connection, says
    nothing: each end drops the link after `SILENT_S` (the edge pings, so a quiet link always
    carries something). The edge then connects again; the origin frees what the edge held."""
    monkeypatch.setattr(link, "PING_S", 0.1)
    monkeypatch.setattr(link, "SILENT_S", 0.5)
    connections = 0
    again = trio.Event()

    async def frozen_origin(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await stream.receive_some(1 << 16)
        await stream.send_all(link.encode({"t": "welcome", "shard": "s1"}))
        await stream.send_all(link.encode({"t": "snap_end"}))
        if connections > 1:
            again.set()
        while await stream.receive_some(1 << 16):  # reads the pings, answers none
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, frozen_origin, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        config = Config(data_dir=tmp_path, origins=(f"127.0.0.1:{port}",), link_secret="secret")
        await nursery.start(RemoteOrigin(config).run)
        with trio.fail_after(10):
            await again.wait()
        nursery.cancel_scope.cancel()

    origin_cfg = Config(data_dir=tmp_path / "o", link_port=0, link_secret=SECRET)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        shard = OriginShard(origin_cfg)
        await nursery.start(shard.run)
        link_port = await nursery.start(LinkServer(origin_cfg, shard, SECRET).run)
        stream = await trio.open_tcp_stream("127.0.0.1", link_port)
        async with stream:
            await stream.send_all(link.encode({"t": "hello", "secret": SECRET, "edge": "frozen"}))
            with trio.fail_after(10):
                while await stream.receive_some(1 << 16):  # the snapshot, then the end
                    pass
        nursery.cancel_scope.cancel()


async def test_a_token_of_a_shard_not_reached_yet_is_unavailable_not_unauthorized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a shard map, an edge learns which instances each shard holds from its link. A
    token whose instance it does not know, while a link is down, may be of that shard: it is
    `unavailable` (retry), not `unauthorized` (which tells the client to give up)."""
    from replication import edge_link

    monkeypatch.setattr(edge_link, "_FIRST_CONNECT_S", 0.2)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        down = probe.getsockname()[1]
    limits = Limits()
    async with edge_and_origin(tmp_path, limits, extra_origins=(f"127.0.0.1:{down}",)) as (
        _,
        node,
        token,
        _,
    ):
        a: Peer
        async with peer_of(node) as a:
            reply = await a.request("hello", token="gb6u_ins_elsewhere.secret")
            assert reply["code"] == "unavailable", reply
        async with peer_of(node, token) as a:  # the reachable shard's users are served
            assert await make_room(a, [])


async def test_requests_past_the_origins_queue_are_refused_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The origin answers `_CONCURRENT` of an edge's reads at once and queues `_QUEUED` more
    (here 2 and 1). One past those is answered `unavailable` at once: the origin's reader of
    that edge must not wait, or every send through the edge (and the link's pings) would wait
    behind the slow reads. The queued one is answered in its turn."""
    from replication import origin_link

    monkeypatch.setattr(origin_link, "_CONCURRENT", 2)
    monkeypatch.setattr(origin_link, "_QUEUED", 1)
    release = trio.Event()

    async def slow_search(self: OriginShard, who: Any, query: str, room: str | None) -> list[Any]:
        await release.wait()
        return []

    monkeypatch.setattr(OriginShard, "search", slow_search)
    async with edge_and_origin(tmp_path, Limits()) as (gateway, node, token, _):
        a: Peer
        async with peer_of(node, token) as a:
            room = await make_room(a, [])
            remote = gateway.origin
            assert isinstance(remote, RemoteOrigin)
            ann = next(u for u in remote.state.users.values() if u.name == "ann")
            who = remote.state.principal(ann.id)
            assert who is not None
            outcomes: list[str] = []

            async def search() -> None:
                try:
                    await remote.search(who, "word", None)
                    outcomes.append("ok")
                except GB6Error as exc:
                    outcomes.append(exc.code)

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(search)
                with trio.fail_after(5):
                    while not outcomes:  # noqa: ASYNC110 - the refusal comes over the link
                        await trio.sleep(0.01)
                    assert (await a.ok("send", room=room, cid="c", body={"text": "hi"}))["seq"]
                release.set()
            assert sorted(outcomes) == ["ok", "ok", "ok", "unavailable"]


@pytest.mark.usefixtures("within_one_utc_day")  # a daily quota, sent to and read
async def test_a_send_over_the_quota_does_not_hold_up_the_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the daily quota, a send is looked up in the store (a resend of an acknowledged one
    still gets its seq). The origin appends an edge's ops in order for every tenant on it: the
    lookup must not hold up the ops behind it (here a reaction of the same client)."""
    from origin.sqlite_store import SqliteStore

    lookup = SqliteStore.event_by_cid

    async def slow_lookup(self: SqliteStore, room: str, sender: str, cid: str) -> Any:
        await trio.sleep(3)
        return await lookup(self, room, sender, cid)

    monkeypatch.setattr(SqliteStore, "event_by_cid", slow_lookup)
    async with edge_and_origin(tmp_path, Limits(), messages_per_day=1) as (_, node, token, _):
        a: Peer
        async with peer_of(node, token) as a:
            room = await make_room(a, [])
            seq = (await a.ok("send", room=room, cid="m1", body={"text": "one"}))["seq"]
            over = {"op": "send", "id": "over", "room": room, "cid": "m2", "body": {"text": "2"}}
            await a.send(over)
            with trio.fail_after(1.5):  # the lookup takes 3 s
                assert (await a.ok("react", room=room, cid="r1", target=seq, emoji="👍"))["seq"]
            a.timeout = 10
            while (reply := await a.recv()).get("re") != "over":
                pass
            assert reply["code"] == "quota_exceeded", reply


async def test_a_hello_under_way_as_its_instance_is_suspended_is_refused(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    """The instance is suspended while a hello waits on Redis (frozen a moment): the push that
    said so closed the instance's live sockets, and the hello, once through, is refused as
    well instead of opening one more socket of a suspended instance."""
    async with edge_and_origin(tmp_path, Limits(), shared=own_redis.url) as (
        gateway,
        node,
        token,
        shard,
    ):
        (instance,) = shard.instances
        a: Peer
        b: Peer
        async with peer_of(node, token) as a, peer_of(node) as b, trio.open_nursery() as nursery:
            own_redis.freeze()
            replies: list[dict[str, Any]] = []

            async def say_hello() -> None:
                replies.append(await b.request("hello", token=token))

            nursery.start_soon(say_hello)
            await trio.sleep(0.3)  # through the origin's checks, waiting on Redis
            await shard.tenancy.suspend_instance(OPERATOR, instance)
            assert await closed_with(a) == CLOSE_UNAUTHORIZED
            own_redis.thaw()
        assert replies[0]["code"] == "unauthorized", replies
        assert gateway.shared is not None
        (ann,) = [u.id for u in shard.users.values() if u.name == "ann"]
        with trio.fail_after(5):  # neither socket's session is left in the registry
            while await gateway.shared.sessions.locate([ann]):  # noqa: ASYNC110
                await trio.sleep(0.05)


async def test_a_hello_given_up_while_it_waits_on_redis_leaves_no_session(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    """Redis freezes while a hello waits on it, and the hello runs out of time: its socket is
    closed. The session it was adding is not left in the registry, a ghost that would keep
    the user online (written again at every heartbeat)."""
    limits = Limits(hello_timeout_s=1.5)  # after the follow's 1 s, during the add's
    async with edge_and_origin(tmp_path, limits, shared=own_redis.url) as (
        gateway,
        node,
        token,
        shard,
    ):
        assert gateway.shared is not None
        (ann,) = [u.id for u in shard.users.values() if u.name == "ann"]
        b: Peer
        async with peer_of(node) as b:
            own_redis.freeze()
            try:
                await b.send({"op": "hello", "id": "h", "token": token})
                await closed_with(b)
            finally:
                own_redis.thaw()
        await trio.sleep(1)  # the add, queued while Redis was frozen, is written by now
        with trio.fail_after(10):
            while await gateway.shared.sessions.locate([ann]):  # noqa: ASYNC110
                await trio.sleep(0.05)


async def test_a_hub_whose_events_skip_seqs_has_its_live_subscribers_read_them(
    tmp_path: Path,
) -> None:
    """The events an edge is handed for a room skip seqs (a push lost, or a commit whose
    answer was lost). Its live subscribers stay connected: each reads the skipped events from
    the store and gets every event once, in seq order, live again after them."""
    async with edge_and_origin(tmp_path, Limits()) as (gateway, node, token, _):
        a: Peer
        b: Peer
        async with peer_of(node, token) as a, peer_of(node, token) as b:
            room = await make_room(a, [])
            await a.ok("subscribe", room=room, after=0)
            for i in range(2):
                await b.ok("send", room=room, cid=f"c{i}", body={"text": "hi"})
            assert [(await a.event("message"))["seq"] for _ in range(2)] == [1, 2]
            gateway.origin.event_listeners.remove(gateway.hubs.publish)  # seq 3 goes missing
            await b.ok("send", room=room, cid="c2", body={"text": "hi"})
            gateway.origin.event_listeners.append(gateway.hubs.publish)
            await b.ok("send", room=room, cid="c3", body={"text": "hi"})
            got = [await a.event("message") for _ in range(2)]
            assert [(e["seq"], e["cid"]) for e in got] == [(3, "c2"), (4, "c3")]
            assert gateway.hubs.gaps == 1
            assert (await b.ok("send", room=room, cid="c4", body={"text": "hi"}))["seq"] == 5
            assert (await a.event("message"))["seq"] == 5
            with trio.move_on_after(0.3):
                extra = await a.event("message")
                raise AssertionError(f"pushed twice: {extra}")


async def test_the_subscribers_of_a_hub_with_a_gap_read_the_store_once_together(
    tmp_path: Path,
) -> None:
    """After a gap every live subscriber of the room needs the same events: one store read
    serves them all (a link back after a loss makes every room of its shard such a gap)."""
    async with edge_and_origin(tmp_path, Limits()) as (gateway, node, token, _):
        reads: list[tuple[str, int]] = []
        events_after = gateway.origin.events_after

        async def counted(room: str, after: int, limit: int) -> Any:
            reads.append((room, after))
            return await events_after(room, after, limit)

        gateway.origin.events_after = counted  # type: ignore[method-assign]
        async with AsyncExitStack() as stack:
            b = await stack.enter_async_context(peer_of(node, token))
            room = await make_room(b, [])
            subs = [await stack.enter_async_context(peer_of(node, token)) for _ in range(5)]
            for peer in subs:
                await peer.ok("subscribe", room=room, after=0)
            await b.ok("send", room=room, cid="c0", body={"text": "hi"})
            gateway.origin.event_listeners.remove(gateway.hubs.publish)  # seq 2 goes missing
            await b.ok("send", room=room, cid="c1", body={"text": "hi"})
            gateway.origin.event_listeners.append(gateway.hubs.publish)
            await b.ok("send", room=room, cid="c2", body={"text": "hi"})
            for peer in subs:
                got = [(await peer.event("message"))["seq"] for _ in range(3)]
                assert got == [1, 2, 3]
            assert reads == [(room, 1)]


@pytest.mark.parametrize("version", [None, 1, 2])
async def test_an_edge_of_an_older_version_is_pushed_whole_rooms(
    tmp_path: Path, version: int | None
) -> None:
    """Edges and origins upgrade in either order: an edge whose hello says no `v`, or 1, does
    not know `members` pushes, and is pushed the room's whole state after each change."""
    origin_cfg = Config(data_dir=tmp_path / "o", link_port=0, link_secret=SECRET)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        shard = OriginShard(origin_cfg)
        await nursery.start(shard.run)
        link_port = await nursery.start(LinkServer(origin_cfg, shard, SECRET).run)
        t = shard.tenancy
        org = await t.create_org(OPERATOR, "o", None)
        inst = await t.create_instance(OPERATOR, org.id, "i", None, "unlimited")
        ann = await t.create_user(OPERATOR, inst.id, "ann", "member")
        bob = await t.create_user(OPERATOR, inst.id, "bob", "member")
        who = shard.state.principal(ann.id)
        assert who is not None
        room = await shard.create_room(who, "r", "chat", [], False)
        hello: dict[str, Any] = {"t": "hello", "secret": SECRET, "edge": "e"}
        if version is not None:
            hello["v"] = version
        decoder = link.FrameDecoder()
        async with await trio.open_tcp_stream("127.0.0.1", link_port) as stream:
            await stream.send_all(link.encode(hello))

            async def next_frame(kinds: set[str]) -> dict[str, Any]:
                with trio.fail_after(5):
                    while True:
                        for frame in decoder.feed(await stream.receive_some(1 << 16)):
                            if frame["t"] in kinds:
                                return frame

            await next_frame({"snap_end"})
            await shard.add_members(who, room.record.id, [bob.id])
            pushed = await next_frame({"room", "members"})
        if version == 2:
            assert pushed == {
                "t": "members",
                "room": room.record.id,
                "added": {bob.id: 0},
                "removed": [],
            }
        else:
            assert pushed["t"] == "room"
            assert pushed["room"]["members"] == {ann.id: 0, bob.id: 0}
        nursery.cancel_scope.cancel()


async def test_made_up_tokens_do_not_reach_the_shard_map_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hello's token names its instance, and an edge that has no shard for it asks the shard
    map in the kv whether one holds it, before it knows who sent the token. An instance found
    unplaced is not asked about again for a few seconds: made-up tokens in a loop would each
    cost the kv a read."""
    from replication import edge_link
    from replication.shard_map import ShardMap

    asked: list[str] = []
    shard_of = ShardMap.shard_of

    async def counting(self: ShardMap, instance: str) -> str | None:
        asked.append(instance)
        return await shard_of(self, instance)

    monkeypatch.setattr(ShardMap, "shard_of", counting)
    monkeypatch.setattr(edge_link, "_UNPLACED_S", 1.0)
    config = Config(data_dir=tmp_path / "e", kv=f"sqlite:{tmp_path / 'kv.db'}")
    remote = RemoteOrigin(config)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(remote.run)
        for _ in range(50):
            with pytest.raises(GB6Error) as info:
                await remote.authenticate("gb6u_ins_madeup.secret")
            assert info.value.code == "unauthorized"
        assert asked == ["ins_madeup"]
        await trio.sleep(1.1)  # remembered no longer
        with pytest.raises(GB6Error):
            await remote.authenticate("gb6u_ins_madeup.secret")
        assert asked == ["ins_madeup"] * 2
        nursery.cancel_scope.cancel()


async def test_a_reconnect_where_the_user_was_away_ends_as_the_edge_shows_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice is away on this edge and reconnects to it. Her new session's add goes out saying
    "away" (her old socket is still open), and the old socket closes while it is on its way:
    the edge forgets her away with it. The registry must end where the edge is (online), not
    away with the edge showing her online, which `presence.set online` could not repair."""
    async with edge_and_origin(tmp_path, Limits(), shared=True) as (gateway, node, token, _):
        assert gateway.shared is not None
        sessions = gateway.shared.sessions
        add = sessions.add
        entered, go_on = trio.Event(), trio.Event()
        waiting = False

        async def adding(user: str, session: str, instance: str, *, away: bool) -> Presence:
            now = await add(user, session, instance, away=away)
            if waiting:
                entered.set()
                await go_on.wait()  # answered, not yet seen by the gateway
            return now

        monkeypatch.setattr(sessions, "add", adding)
        old: Peer
        async with peer_of(node, token) as old:
            await old.ok("presence.set", status="away")
            user = next(iter(gateway.by_user))
            assert await sessions.presence([user]) == {user: "away"}
            waiting = True
            done = trio.Event()

            async def reconnect() -> None:
                async with peer_of(node, token):  # its hello waits on the add
                    await done.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reconnect)
                with trio.fail_after(5):
                    await entered.wait()
                await old.ws.aclose()
                with trio.fail_after(5):
                    while user in gateway.away:  # noqa: ASYNC110 - the old socket's close
                        await trio.sleep(0.01)
                go_on.set()
                with trio.fail_after(5):
                    while await sessions.presence([user]) != {user: "online"}:  # noqa: ASYNC110
                        await trio.sleep(0.02)
                done.set()


class LinkCutter:
    """Drops an edge's links from the origin's end (as a crash or a partition would) and keeps
    the edge from connecting again until `heal`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from replication.edge_link import ShardLink

        self.peers: list[Any] = []  # the origin's ends, newest last
        self._healed = trio.Event()
        self._healed.set()
        welcome = LinkServer._welcome
        connect_and_serve = ShardLink._connect_and_serve

        def welcoming(server: LinkServer, msg: dict[str, Any], stream: Any) -> Any:
            peer = welcome(server, msg, stream)
            self.peers.append(peer)
            return peer

        async def held(shard_link: ShardLink, ready: trio.Event) -> None:
            await self._healed.wait()
            await connect_and_serve(shard_link, ready)

        monkeypatch.setattr(LinkServer, "_welcome", welcoming)
        monkeypatch.setattr(ShardLink, "_connect_and_serve", held)

    async def drop(self, shard_link: Any) -> None:
        """Drop the newest link; return once the edge has noticed."""
        self._healed = trio.Event()
        self.peers[-1].cancel.cancel()
        with trio.fail_after(5):
            while shard_link.connected:  # noqa: ASYNC110
                await trio.sleep(0.02)

    def heal(self) -> None:
        self._healed.set()


async def test_a_link_lost_and_back_keeps_the_shards_sockets_and_tells_them_what_they_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While an edge's link to a shard is down and the shard goes on (its other edges', its
    admin API's changes), the edge keeps the shard's sockets. Once the link is back, they get
    what they missed: the room's events in seq order from the store, the membership changes
    (a user added is told `room.added`), read positions (`receipt`), a deleted user's socket
    is closed 4003. The sockets hold their connection slots again at the shard. A socket that
    asked the shard something while the link was down is closed to resume (1011), as its
    answer would be unknown."""
    cut = LinkCutter(monkeypatch)
    async with edge_and_origin(tmp_path, Limits()) as (gateway, node, token, shard):
        t, shard_link = shard.tenancy, gateway.origin.links[0]
        instance = next(iter(shard.instances))
        bob = await t.create_user(OPERATOR, instance, "bob", "member")
        carl = await t.create_user(OPERATOR, instance, "carl", "member")
        bob_token, _ = await t.issue_token(OPERATOR, instance, bob.id)
        carl_token, _ = await t.issue_token(OPERATOR, instance, carl.id)
        a: Peer
        b: Peer
        c: Peer
        d: Peer
        async with (
            peer_of(node, token) as a,
            peer_of(node, bob_token) as b,
            peer_of(node, carl_token) as c,
            peer_of(node, token) as d,
        ):
            with trio.fail_after(5):
                while carl.id not in gateway.origin.state.users:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            room = await make_room(a, [carl.id])
            await a.ok("subscribe", room=room, after=0)
            await c.ok("subscribe", room=room, after=0)
            assert (await a.ok("send", room=room, cid="c0", body={"text": "0"}))["seq"] == 1
            assert (await a.event("message"))["seq"] == 1
            assert shard.quotas.used(instance, "connections") == 4

            generation = shard_link.generation
            await cut.drop(shard_link)
            await a.ok("ping")  # the edge answers it: the socket stays
            # Meanwhile at the shard: two messages, bob added, carl deleted.
            ann = await shard.authenticate(token)
            done: list[Any] = []
            for i in (1, 2):
                await shard.append(ann, room, "message", f"c{i}", done.append, body={"text": "x"})
            await shard.add_members(ann, room, [bob.id])
            await t.delete_user(OPERATOR, instance, carl.id)
            await shard.set_read(ann, room, 1)
            with trio.fail_after(5):
                while len(done) < 2:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            # A request for the shard while its link is down: the socket resumes.
            await d.send({"op": "send", "id": "s", "room": room, "cid": "d1", "body": {}})
            assert await closed_with(d) == 1011

            cut.heal()
            got = [await a.event("message") for _ in range(2)]
            assert [(e["seq"], e["cid"]) for e in got] == [(2, "c1"), (3, "c2")]
            assert shard_link.generation == generation + 1
            added = await b.event("room.added")
            assert added["room"]["id"] == room
            receipt = await a.event("receipt")
            assert (receipt["room"], receipt["user"], receipt["read"]) == (room, ann.id, 1)
            assert await closed_with(c) == CLOSE_UNAUTHORIZED
            with trio.fail_after(5):
                while shard.quotas.used(instance, "connections") != 2:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            # Live again: a new message reaches both a and b (now a member), once.
            await b.ok("subscribe", room=room, after=3)
            assert (await a.ok("send", room=room, cid="c4", body={"text": "4"}))["seq"] == 4
            assert (await a.event("message"))["seq"] == 4
            assert (await b.event("message"))["seq"] == 4
            with trio.move_on_after(0.3):
                extra = await a.event("message")
                raise AssertionError(f"pushed twice: {extra}")


async def test_a_hub_evicted_while_it_is_watched_again_leaves_no_hub_without_a_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a link is back, the edge watches its subscribed rooms again. If a room's last
    subscriber leaves while that watch is under way (no idle cache: its hub is evicted at
    once), the unwatch must follow the watch's answer: sent before it, the origin would stop
    pushing the room while the answer makes its hub again, and a later subscriber would wait
    on that hub for good."""
    cut = LinkCutter(monkeypatch)
    watching, go_on = trio.Event(), trio.Event()
    request = LinkServer._request

    async def slow_watch(server: LinkServer, peer: Any, msg: dict[str, Any], reads: Any) -> None:
        if msg.get("op") == "watch" and not go_on.is_set():
            watching.set()
            await go_on.wait()  # the origin's reader: requests after it wait too
        await request(server, peer, msg, reads)

    limits = Limits(idle_room_cache_rooms=0)
    async with edge_and_origin(tmp_path, limits) as (gateway, node, token, _):
        shard_link = gateway.origin.links[0]
        a: Peer
        b: Peer
        async with peer_of(node, token) as a, peer_of(node, token) as b:
            room = await make_room(a, [])
            await a.ok("subscribe", room=room, after=0)
            await cut.drop(shard_link)
            monkeypatch.setattr(LinkServer, "_request", slow_watch)
            cut.heal()
            with trio.fail_after(5):
                await watching.wait()  # the watch again is under way
            await a.ok("unsubscribe", room=room)  # the hub goes idle: evicted
            go_on.set()
            await b.ok("subscribe", room=room, after=0)
            assert (await a.ok("send", room=room, cid="c1", body={"text": "hi"}))["seq"] == 1
            assert (await b.event("message"))["seq"] == 1


@pytest.mark.usefixtures("within_one_utc_day")  # this month's usage, charged then read
async def test_recording_minutes_not_charged_while_the_link_was_down_are_charged_once_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster edge records through a lost link (media flows through the edge alone): the
    minutes it could not charge at the origin are owed, and charged once the link is back,
    each under its own key (a repeat counts nothing)."""
    from edge.media_recording import Recordings, _Active
    from edge.recording import Recorder
    from origin.billing import month_of
    from origin.sqlite_store import now_ms

    cut = LinkCutter(monkeypatch)
    async with edge_and_origin(tmp_path, Limits()) as (gateway, _, _, shard):
        (instance,) = shard.instances
        shard_link = gateway.origin.links[0]
        recordings = Recordings(gateway.config, cast(Any, None), gateway.origin)
        active = _Active("room_r", instance, Recorder("room_r", cast(Any, None), Limits()))

        async def minutes() -> int:
            usage = await shard.billing.usage(instance, month_of(now_ms()))
            return int(usage.get("recording_minutes", 0))

        await cut.drop(shard_link)
        active.owed += [1, 2]
        assert await recordings._charge_owed(active, retry_s=0.3)  # not over the quota
        assert active.owed == [1, 2] and await minutes() == 0
        cut.heal()
        with trio.fail_after(10):
            while not shard_link.connected:  # noqa: ASYNC110
                await trio.sleep(0.02)
        active.owed.append(3)
        assert await recordings._charge_owed(active, retry_s=5)
        assert active.owed == [] and await minutes() == 3
        active.owed.append(2)  # asked again (its answer lost, say)
        assert await recordings._charge_owed(active, retry_s=5)
        assert await minutes() == 3
