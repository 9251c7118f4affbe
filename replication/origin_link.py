"""The origin's end of the edge↔origin link: serves the edges of a cluster (see link.py).

Each edge connection gets a reader task (requests, in order) and a writer task draining a
bounded buffer. Pushes are written from the shard's listeners synchronously, in the order the
shard makes its changes; an edge that lets its buffer pass `limits.link_buffer_bytes` is cut
off (it reconnects, reloads the snapshot, and its clients resume: nothing acknowledged is lost).
Answers are not pushes: the edge asked for them, and one may be large (a page of history), so an
answer waits until the buffer has room for it and does not count toward cutting the edge off (one
user's reads must not cut off every client of the shard on that edge). A catch-up page
(`events_after`) holds at most `_PAGE_BYTES` of events, at least one: a large frame delays
every push queued behind it, and the edge's catch-up reads on from where a page ends.

Appends are handled inline by the reader (the shard only queues them, so this keeps one edge's
appends in the order the edge sent them); every other request runs in a task of its own, at
most `_CONCURRENT` per edge, with up to `_QUEUED` more waiting (past that, `unavailable` at
once: the reader never waits for them), so a slow history read does not hold up sends.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import attrs
import orjson
import trio

from node.config import Config
from node.errors import INTERNAL, UNAUTHORIZED, UNAVAILABLE, GB6Error, invalid, not_found
from node.events import Event
from node.listen import bind
from node.log import log
from origin.membership import MembershipChange, Principal, RoomState
from origin.plans import KINDS
from origin.recording_store import RecordingStore
from origin.records import Instance, User
from origin.shard import OriginShard
from origin.sqlite_store import AppendResult
from replication import link

_CONCURRENT: Final = 64  # an edge's requests answered at once (tasks of its connection)
_QUEUED: Final = 10_000  # and waiting for one of them; more are `unavailable`
_PAGE_BYTES: Final = 1 << 20
_HELLO_BYTES: Final = 64 << 10  # the frames an edge sends before the welcome: hello, pings
_RECORDING_OPS: Final = frozenset(
    {"usage.charge", "rec.write", "rec.read", "rec.index", "rec.indexed"}
)


class EdgePeer:
    """One connected edge: what it watches, and its outgoing buffer."""

    def __init__(self, name: str, stream: trio.SocketStream, limit: int) -> None:
        self.name = name
        self.stream = stream
        self.limit = limit
        self.watched: set[str] = set()
        self._out: list[bytes] = []
        self._size = 0
        self._answers = 0  # bytes of `_size` that are answers (not counted against `limit`)
        self._drained = trio.lowlevel.ParkingLot()  # answers waiting for room
        self._wake = trio.Event()
        self.broken = False
        self.deltas = True  # takes `members` pushes (link.VERSION 2 on)
        self.cancel = trio.CancelScope()
        # Events and heads of the committed batch being published, flushed as one frame.
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.heads: dict[str, int] = {}
        self.acks: list[tuple[int, int, int]] = []  # (request id, seq, ts) of new events
        # Concurrent quota slots this edge holds, per (instance, resource): freed when the
        # link ends.
        self.slots: dict[tuple[str, str], int] = {}

    def send(self, msg: dict[str, Any], *, asked: bool = False) -> None:
        """Queue `msg` after what was queued before. `asked`: the edge asked for it (the
        snapshot), so it does not count toward cutting the edge off."""
        if self.broken:
            return
        if self.events or self.heads or self.acks:
            self.flush_batch()
        self._queue(link.encode(msg), answer=asked)

    def flush_batch(self) -> None:
        if not (self.events or self.heads or self.acks):
            return
        msg: dict[str, Any] = {"t": "batch", "events": self.events, "heads": self.heads}
        if self.acks:
            msg["acks"] = self.acks
        try:
            frames = [link.encode(msg)]
        except ValueError:  # over link.MAX_FRAME: a large commit of bodies near their limit
            frames = _split_batch(self.events, self.heads, self.acks)
        self.events, self.heads, self.acks = {}, {}, []
        for frame in frames:
            self._queue(frame)

    async def send_answer(self, msg: dict[str, Any]) -> None:
        """Queue an answer once the buffer has room for it (or holds nothing)."""
        frame = link.encode(msg)
        while not self.broken and self._size and self._size + len(frame) > self.limit:
            await self._drained.park()
        if self.broken:
            return
        if self.events or self.heads or self.acks:
            self.flush_batch()
        self._queue(frame, answer=True)

    def _queue(self, frame: bytes, *, answer: bool = False) -> None:
        self._out.append(frame)
        self._size += len(frame)
        if answer:
            self._answers += len(frame)
        self._wake.set()
        if self._size - self._answers > self.limit:
            log("link_edge_too_slow", edge=self.name, buffered=self._size)
            self.broken = True
            self.cancel.cancel()

    async def run_writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            blob = b"".join(self._out)
            self._out.clear()
            self._size = self._answers = 0
            self._drained.unpark_all()
            await self.stream.send_all(blob)


class LinkServer:
    """A component: `port = await nursery.start(server.run)`."""

    def __init__(self, config: Config, shard: OriginShard, secret: str) -> None:
        self.config = config
        self.shard = shard
        self.secret = secret
        self.peers: set[EdgePeer] = set()
        self.recordings = RecordingStore(shard.blobs, config.limits.recording_track_bytes)
        self._publishing = False
        shard.event_listeners.append(self._on_events)
        shard.member_listeners.append(self._on_members)
        shard.read_listeners.append(self._on_read)
        shard.tenancy_listeners.append(self._on_tenancy)
        shard.publish_context = self._batch

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        sock = bind(self.config.host, self.config.link_port, "the origin link")
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
        port = sock.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started(port)

    # --- pushes, from the shard's listeners ----------------------------------------------

    @contextmanager
    def _batch(self) -> Iterator[None]:
        self._publishing = True
        try:
            yield
        finally:
            self._publishing = False
            for peer in self.peers:
                peer.flush_batch()

    def _on_events(self, room: str, events: list[Event]) -> None:
        wire: list[dict[str, Any]] | None = None
        for peer in self.peers:
            if room in peer.watched:
                if wire is None:
                    wire = [link.event_to_wire(ev) for ev in events]
                peer.events.setdefault(room, []).extend(wire)
            else:
                peer.heads[room] = events[-1].seq
            if not self._publishing:
                peer.flush_batch()

    def _on_members(self, change: MembershipChange) -> None:
        state = self.shard.rooms.get(change.room)
        if state is None:
            return
        whole: dict[str, Any] | None = None
        delta: dict[str, Any] | None = None
        for peer in self.peers:
            if change.created or not peer.deltas:
                if whole is None:
                    whole = {"t": "room", "room": link.room_to_wire(state)}
                peer.send(whole)
            else:  # what changed only: a room's whole member map is up to megabytes
                if delta is None:
                    added = {u: state.members[u] for u in change.added if u in state.members}
                    delta = {"t": "members", "room": change.room, "added": added}
                    delta["removed"] = list(change.removed)
                peer.send(delta)

    def _on_read(self, room: str, user: str, seq: int) -> None:
        for peer in self.peers:
            peer.send({"t": "read", "room": room, "user": user, "seq": seq})

    def _on_tenancy(self, record: Instance | User) -> None:
        kind = "instance" if isinstance(record, Instance) else "user"
        for peer in self.peers:
            peer.send({"t": kind, kind: attrs.asdict(record)})

    def _snapshot(self, peer: EdgePeer) -> None:
        """Everything the edge's replica needs, queued in one synchronous step: every later
        change is pushed after it. In frames of about `_PAGE_BYTES` (a room's members make its
        size), and not counted toward cutting the edge off, whatever the shard's size."""
        shard = self.shard
        peer.send({"t": "welcome", "shard": self.config.shard}, asked=True)
        parts: list[tuple[str, list[dict[str, Any]]]] = [
            ("instances", [attrs.asdict(i) for i in shard.instances.values()]),
            ("users", [attrs.asdict(u) for u in shard.users.values()]),
            ("rooms", [link.room_to_wire(r) for r in shard.rooms.values()]),
        ]
        for kind, items in parts:
            for chunk in _chunks(items):
                snap: dict[str, Any] = {"t": "snap", "instances": [], "users": [], "rooms": []}
                snap[kind] = chunk
                peer.send(snap, asked=True)
        peer.send({"t": "snap_end"}, asked=True)

    # --- one edge ------------------------------------------------------------------------

    async def _serve(self, stream: trio.SocketStream) -> None:
        # Until the edge has shown the secret, it may make the origin hold only a hello's worth.
        decoder = link.FrameDecoder(_HELLO_BYTES)
        peer: EdgePeer | None = None
        try:
            with trio.move_on_after(10):
                while peer is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    frames = decoder.feed(data)
                    if frames:
                        peer = self._welcome(frames[0], stream)
                        if peer is None:
                            return
                        pending = frames[1:]
            if peer is None:
                return
            decoder.max_frame = link.MAX_FRAME
            self.peers.add(peer)
            self._snapshot(peer)
            log("link_edge_connected", edge=peer.name)
            with peer.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(peer.run_writer)
                    reads, queued = trio.open_memory_channel[tuple[int, dict[str, Any]]](_QUEUED)
                    for _ in range(_CONCURRENT):
                        nursery.start_soon(self._answer_queued, peer, queued)
                    for msg in pending:
                        await self._request(peer, msg, reads)
                    while True:
                        with trio.move_on_after(link.SILENT_S) as waited:
                            data = await stream.receive_some(65536)
                        if waited.cancelled_caught:  # the edge pings every PING_S
                            raise link.LinkBroken(f"the edge said nothing for {link.SILENT_S:g} s")
                        if not data:
                            break
                        for msg in decoder.feed(data):
                            await self._request(peer, msg, reads)
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError, link.LinkBroken) as group:
            log("link_edge_failed", error=repr(group.exceptions))
        except* Exception as group:  # a bug must not take the origin (and its other edges) down
            log("link_edge_crashed", error=repr(group.exceptions))
        finally:
            if peer is not None:
                self.peers.discard(peer)
                self._release_all(peer)
                log("link_edge_gone", edge=peer.name)
            await stream.aclose()

    def _welcome(self, msg: dict[str, Any], stream: trio.SocketStream) -> EdgePeer | None:
        secret = msg.get("secret")
        if msg.get("t") != "hello" or not isinstance(secret, str):
            return None
        if not hmac.compare_digest(secret.encode(), self.secret.encode()):
            log("link_edge_refused", reason="wrong secret")
            return None
        name = str(msg.get("edge", "?"))[:100]
        version = msg.get("v")
        peer = EdgePeer(name, stream, self.config.limits.link_buffer_bytes)
        peer.deltas = isinstance(version, int) and version >= 2
        return peer

    async def _request(
        self,
        peer: EdgePeer,
        msg: dict[str, Any],
        reads: trio.MemorySendChannel[tuple[int, dict[str, Any]]],
    ) -> None:
        req_id = msg.get("id")
        if msg.get("t") != "req" or not isinstance(req_id, int):
            raise link.LinkBroken("expected a request")
        op = msg.get("op")
        if op == "append":
            try:
                await self._append(peer, req_id, msg)
            except GB6Error as exc:
                peer.send({"t": "res", "id": req_id, "err": link.error_to_wire(exc)})
            return
        if op == "watch":
            room = str(msg.get("room"))
            state = self.shard.rooms.get(room)
            if state is None:
                err = link.error_to_wire(GB6Error("not_found", f"room {room} not found"))
                peer.send({"t": "res", "id": req_id, "err": err})
                return
            # Same step: the answer and the start of the room's events, in this order.
            peer.send({"t": "res", "id": req_id, "ok": {"room": room, "head": state.head}})
            peer.watched.add(room)
            return
        if op == "ping":
            peer.send({"t": "res", "id": req_id, "ok": {}})
            return
        if op == "unwatch":
            peer.watched.discard(str(msg.get("room")))
            peer.send({"t": "res", "id": req_id, "ok": {}})
            return
        if op in ("slot.acquire", "slot.release"):
            # Inline, in the order the edge sent them: a release never overtakes its acquire.
            try:
                self._slots(peer, op, msg)
                peer.send({"t": "res", "id": req_id, "ok": {}})
            except GB6Error as exc:
                peer.send({"t": "res", "id": req_id, "err": link.error_to_wire(exc)})
            return
        try:
            reads.send_nowait((req_id, msg))
        except trio.WouldBlock:
            # Never wait here: the reader would stop reading this edge's appends and pings.
            busy = GB6Error(UNAVAILABLE, f"the origin is busy ({_QUEUED} requests wait); retry")
            peer.send({"t": "res", "id": req_id, "err": link.error_to_wire(busy)})

    async def _answer_queued(
        self, peer: EdgePeer, queued: trio.MemoryReceiveChannel[tuple[int, dict[str, Any]]]
    ) -> None:
        async for req_id, msg in queued:
            await self._answer(peer, req_id, msg)

    async def _answer(self, peer: EdgePeer, req_id: int, msg: dict[str, Any]) -> None:
        try:
            ok = await self._handle(msg)
        except GB6Error as exc:
            peer.send({"t": "res", "id": req_id, "err": link.error_to_wire(exc)})
        except Exception as exc:  # a bug: answer, log, keep serving the edge
            log("link_request_failed", op=msg.get("op"), error=repr(exc))
            peer.send(
                {"t": "res", "id": req_id, "err": {"code": INTERNAL, "message": "internal error"}}
            )
        else:
            await peer.send_answer({"t": "res", "id": req_id, "ok": ok})

    def _slots(self, peer: EdgePeer, op: str, msg: dict[str, Any]) -> None:
        """Concurrent quotas of this shard's instances, counted across every edge:
        `slot.acquire` {instance, resource} takes one (quota_exceeded past the limit),
        `slot.release` {counts: [[instance, resource, n]]} gives back what this edge holds
        (never more; anything else in it is ignored)."""
        if op == "slot.acquire":
            instance, resource = msg.get("instance"), msg.get("resource")
            if not isinstance(instance, str) or instance not in self.shard.instances:
                raise not_found(f"instance {instance!r} is not on this shard")
            if KINDS.get(str(resource)) != "concurrent":
                raise invalid(f"{resource!r} is not a concurrent resource")
            key = (instance, str(resource))
            self.shard.quotas.acquire(*key)
            peer.slots[key] = peer.slots.get(key, 0) + 1
            return
        counts = msg.get("counts")
        if not isinstance(counts, list):
            raise invalid("slot.release needs counts")
        for item in counts:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[2], int)):
                continue
            key = (str(item[0]), str(item[1]))
            held = peer.slots.get(key, 0)
            n = min(item[2], held)  # never more than this edge holds
            if n <= 0:
                continue
            self.shard.quotas.release(*key, n)
            if held > n:
                peer.slots[key] = held - n
            else:
                del peer.slots[key]

    def _release_all(self, peer: EdgePeer) -> None:
        """The edge's link ended (closed, broken, or the edge killed): its slots are free."""
        for (instance, resource), n in peer.slots.items():
            self.shard.quotas.release(instance, resource, n)
        peer.slots.clear()

    def _who(self, msg: dict[str, Any]) -> Principal:
        who = self.shard.state.principal(str(msg.get("who")))
        if who is None or who.instance.status != "active":
            raise GB6Error(UNAUTHORIZED, "unknown user")
        return who

    async def _append(self, peer: EdgePeer, req_id: int, msg: dict[str, Any]) -> None:
        def reply(result: AppendResult) -> None:
            if isinstance(result, GB6Error):
                peer.send({"t": "res", "id": req_id, "err": link.error_to_wire(result)})
            elif not result.duplicate and peer.deltas:
                ev = result.event
                # In the batch frame (link.py). An edge older than link version 2 may not read
                # acks: it gets the answer as a repeat's, the event in a `res` of its own.
                peer.acks.append((req_id, ev.seq, ev.ts))
                if not self._publishing:
                    peer.flush_batch()
            else:
                ok = {"event": link.event_to_wire(result.event), "duplicate": result.duplicate}
                peer.send({"t": "res", "id": req_id, "ok": ok})

        await self.shard.append(
            self._who(msg),
            str(msg.get("room")),
            str(msg.get("type")),
            str(msg.get("cid")),
            reply,
            body=msg.get("body"),
            thread=msg.get("thread"),
            target=msg.get("target"),
            emoji=msg.get("emoji"),
        )

    async def _recording(self, op: str, msg: dict[str, Any]) -> dict[str, Any]:
        """An edge's recorder and recordings API (edge/media_recording.py): blobs of the
        instance's recordings (origin/recording_store.py) and its minutes. The instance must
        be on this shard, the room (if any) one of its rooms."""
        instance = msg.get("instance")
        if not isinstance(instance, str) or instance not in self.shard.instances:
            raise not_found(f"instance {instance!r} is not on this shard")
        store = self.recordings
        if op == "usage.charge":
            resource, n, key = msg.get("resource"), msg.get("n"), msg.get("key")
            if resource != "recording_minutes" or not isinstance(n, int) or n < 1:
                raise invalid("usage.charge takes recording_minutes, n >= 1")
            await self.shard.charge_usage(instance, resource, n, str(key)[:200])
            return {}
        if op == "rec.write":
            try:
                data = base64.b64decode(str(msg.get("data")), validate=True)
            except ValueError:
                raise invalid("rec.write data is not base64") from None
            offset = msg.get("offset")
            if not isinstance(offset, int):
                raise invalid("rec.write needs an offset")
            await store.write(str(msg.get("blob")), offset, data, bool(msg.get("last")))
            return {}
        if op == "rec.read":
            offset = msg.get("offset")
            if not isinstance(offset, int):
                raise invalid("rec.read needs an offset")
            chunk, size = await store.read(str(msg.get("blob")), offset)
            return {"data": base64.b64encode(chunk).decode(), "size": size}
        room = str(msg.get("room"))
        state = self.shard.rooms.get(room)
        if state is None or state.record.instance != instance:
            raise not_found(f"room {room} not found")
        if op == "rec.index":
            return {"recordings": await store.index(room)}
        await store.add_to_index(room, str(msg.get("recording")))
        return {}

    async def _handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        shard = self.shard
        op = msg.get("op")
        if op == "auth":
            who = await shard.authenticate(str(msg.get("token")))
            return {"user": who.id}
        if op in _RECORDING_OPS:
            return await self._recording(op, msg)
        if op == "events_after":
            events = await shard.events_after(
                str(msg.get("room")), int(msg["after"]), int(msg["limit"])
            )
            return {"events": _page(events)}
        who = self._who(msg)
        room = str(msg.get("room"))
        if op == "history":
            events = await shard.history(who, room, msg.get("before"), int(msg["limit"]))
            return {"events": [link.event_to_wire(e) for e in events]}
        if op == "search":
            hits = await shard.search(who, str(msg.get("query")), msg.get("room"))
            return {"events": [link.event_to_wire(e) for e in hits]}
        if op == "create_room":
            state = await shard.create_room(
                who,
                str(msg.get("name")),
                str(msg.get("kind")),
                list(msg.get("members") or ()),
                bool(msg.get("open")),
            )
            return _room_answer(state)
        if op in ("join", "leave"):
            fn = shard.join if op == "join" else shard.leave
            state = await fn(who, room)
            return _room_answer(state)
        if op in ("add_members", "remove_members"):
            fn2 = shard.add_members if op == "add_members" else shard.remove_members
            state = await fn2(who, room, list(msg.get("users") or ()))
            return _room_answer(state)
        if op == "set_read":
            await shard.set_read(who, room, int(msg["seq"]))
            return {}
        raise invalid(f"unknown link op {op!r}")


def _room_answer(state: RoomState) -> dict[str, Any]:
    """A room op's answer: the room without its members, which the pushes before the answer
    gave the edge (a large room's are megabytes)."""
    return {"room": link.room_to_wire(attrs.evolve(state, members={}))}


def _page(events: list[Event]) -> list[dict[str, Any]]:
    """The wire shapes of `events` from the first on, up to `_PAGE_BYTES` (at least one)."""
    return next(_chunks([link.event_to_wire(ev) for ev in events]), [])


def _split_batch(
    events: dict[str, list[dict[str, Any]]], heads: dict[str, int], acks: list[tuple[int, int, int]]
) -> list[bytes]:
    """A batch too large for one frame, as several the edge applies in turn: each room's events
    in runs of up to `_PAGE_BYTES`, then the heads and the acks (an ack after its event)."""
    frames = [
        link.encode({"t": "batch", "events": {room: chunk}, "heads": {}})
        for room, wire in events.items()
        for chunk in _chunks(wire)
    ]
    last: dict[str, Any] = {"t": "batch", "events": {}, "heads": heads}
    if acks:
        last["acks"] = acks
    frames.append(link.encode(last))
    return frames


def _chunks(items: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """`items` in order, in runs of up to `_PAGE_BYTES` encoded (at least one item each)."""
    chunk: list[dict[str, Any]] = []
    size = 0
    for item in items:
        n = len(orjson.dumps(item))
        if chunk and size + n > _PAGE_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += n
    if chunk:
        yield chunk
