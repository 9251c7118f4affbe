"""The edge's end of the edge↔origin link, and `RemoteOrigin`: the origin as a gateway in
another process sees it.

`RemoteOrigin` offers the gateway what `OriginShard` offers it in one process: synchronous
membership lookups (answered from a replica the links keep current), and async operations
(sent over the link of the shard that owns the instance). The shard map (instance → shard) is
learned from each origin's snapshot and pushes: an origin announces the instances it holds.

Per shard, one `ShardLink` connects, authenticates with the cluster's link secret, loads the
snapshot into the replica, then applies pushes in order. When a link breaks, every pending
request of it fails with `LinkLost` (an `unavailable`: the gateway closes the sockets that
waited on one, so their clients resume and resend under the same cids; nothing acknowledged is
lost, the origin has it), and the link reconnects with backoff. A request made while the link
is down fails with `LinkDown` (a `LinkLost` whose outcome is known: nothing was sent). The
shard's other clients stay:
once the link is back (`restored_listeners`), the new snapshot's differences from the replica
reach the listeners as changes (members, users, instances), and the gateway takes its sockets'
slots again and watches its rooms again, reading what they missed from the store.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Final

import attrs
import outcome
import trio

from node.config import Config
from node.errors import INTERNAL, UNAUTHORIZED, UNAVAILABLE, UNKNOWN_TOKEN, GB6Error
from node.events import Event
from node.log import log
from origin.membership import Membership, MembershipChange, Principal, RoomState
from origin.records import Instance, User
from origin.sqlite_store import Appended, AppendResult
from replication import link
from replication.shard_map import ShardMap, open_kv

_RETRY_FIRST_S: Final = 0.05
_RETRY_MAX_S: Final = 2.0
_FIRST_CONNECT_S: Final = 10.0
_CONNECT_S: Final = 5.0  # for a TCP connection to an origin
_TOKEN_INSTANCE: Final = re.compile(r"gb6u_(ins_[a-z0-9]+)\.")
_DISCOVERY_S: Final = 2.0  # how often an edge looks for new shards in the shard map
_UNPLACED_S: Final = 5.0  # an instance the shard map does not place is not asked again so soon
_MAX_UNPLACED: Final = 10_000

Reply = Callable[[outcome.Outcome[Any]], None]


def _tell(listener: Callable[..., None], *change: Any) -> None:
    try:
        listener(*change)
    except Exception as exc:  # a bug in a listener: logged, the link and the others go on
        log("link_listener_failed", listener=repr(listener), error=repr(exc))


class LinkLost(GB6Error):
    """The request's shard link broke before its answer: the outcome is unknown (an append
    may have been made durable). `LinkDown`, a subclass, when it never left."""

    def __init__(self) -> None:
        super().__init__(UNAVAILABLE, "the origin shard is unreachable; retry")


class LinkDown(LinkLost):
    """The request's shard link was down when it was made: nothing was sent, nothing done."""


class ShardLink:
    """The link to one origin shard. A component: `await nursery.start(link.run)` returns once
    the first snapshot is loaded (or after a while without one: the edge serves the others)."""

    def __init__(self, remote: RemoteOrigin, address: str) -> None:
        self.remote = remote
        self.address = address
        self.retired = False  # `retire` ended it: its sockets cannot wait for it to come back
        host, _, port = address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.shard: str | None = None
        self.connected = False
        self._scope = trio.CancelScope()  # `retire` ends the link for good
        self._writer: _StreamWriter | None = None
        self._next_id = 0
        self._pending: dict[int, Reply] = {}
        self._appends = trio.Semaphore(remote.config.limits.link_inflight_appends)
        self._instances: set[str] = set()  # of this shard, for the shard map
        self._rooms: set[str] = set()
        # Slots of concurrent quotas (connections, media participants), counted by the origin:
        # a slot is taken under one link generation; when that link breaks the origin frees
        # all of it, so a later release of an older generation is dropped. Releases are
        # batched per wake-up.
        self.generation = 0
        self._releases: dict[tuple[str, str], int] = {}
        self._release_wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ready = trio.Event()
        started = False

        async def first_connect_deadline() -> None:
            nonlocal started
            with trio.move_on_after(_FIRST_CONNECT_S):
                await ready.wait()
            if not started:
                started = True
                task_status.started()

        with self._scope:  # cancelled by `retire`
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_connect_deadline)
                delay = _RETRY_FIRST_S
                while True:
                    try:
                        await self._connect_and_serve(ready)
                    except* (OSError, trio.BrokenResourceError, link.LinkBroken) as group:
                        log("link_origin_failed", origin=self.address, error=repr(group.exceptions))
                    except* Exception as group:
                        # A frame this edge cannot apply (an origin of another version) or a
                        # bug in a listener: this shard's clients resume, the other shards' stay.
                        log("link_origin_error", origin=self.address, error=repr(group.exceptions))
                    finally:
                        if self.connected:  # it served: a new failure starts the backoff again
                            delay = _RETRY_FIRST_S
                        self._lost()
                    await trio.sleep(delay)
                    delay = min(_RETRY_MAX_S, delay * 2)

    def retire(self) -> None:
        """No shard is at this address any more (the shard map says it moved): stop for good,
        as if the link broke (the clients of its rooms resume), and connect no more. Its
        instances are routed to the link that holds them now, if any (else the shard map says
        they are placed: `unavailable` until one does)."""
        self.retired = True
        self._scope.cancel()
        shard_of = self.remote.shard_of
        # Told now (its link may have been lost already, its sockets kept for a return), of
        # the instances it still serves: those another link holds now are that link's.
        mine = {inst for inst in self._instances if shard_of.get(inst) is self}
        known = self.remote.state.rooms
        rooms = {r for r in self._rooms if r in known and known[r].record.instance in mine}
        for listener in self.remote.lost_listeners:
            _tell(listener, rooms, mine, True)
        for inst in self._instances:
            if shard_of.get(inst) is self:
                heirs = [x for x in self.remote.links if x is not self and inst in x._instances]
                if heirs:
                    shard_of[inst] = heirs[0]
                else:
                    del shard_of[inst]

    async def _connect_and_serve(self, ready: trio.Event) -> None:
        # Bounded: a host gone from the network drops the SYNs, and the kernel tries for
        # about two minutes; the retry loop tries again sooner, which matters once it is back.
        with trio.move_on_after(_CONNECT_S) as connecting:
            stream = await trio.open_tcp_stream(self.host, self.port)
        if connecting.cancelled_caught:
            raise OSError(f"no connection to {self.address} within {_CONNECT_S:g} s")
        async with stream, trio.open_nursery() as nursery:
            writer = _StreamWriter(stream)
            nursery.start_soon(writer.run)
            nursery.start_soon(self._flush_releases)
            hello = {
                "t": "hello",
                "secret": self.remote.config.link_secret,
                "edge": "edge",
                "v": link.VERSION,
            }
            writer.write(link.encode(hello))
            nursery.start_soon(self._ping, writer)
            try:
                await self._read(stream, writer, ready)
            except BaseException:
                # From here on a request never leaves (`LinkDown`, not `LinkLost`), also while
                # the nursery and the stream are torn down, before `_lost` runs.
                self._writer = None
                raise

    async def _read(
        self, stream: trio.SocketStream, writer: _StreamWriter, ready: trio.Event
    ) -> None:
        decoder = link.FrameDecoder()
        snap = Membership()
        loaded = False
        while True:
            with trio.move_on_after(link.SILENT_S) as waited:
                data = await stream.receive_some(1 << 20)
            if waited.cancelled_caught:
                raise link.LinkBroken(f"the origin said nothing for {link.SILENT_S:g} s")
            if not data:
                raise trio.BrokenResourceError("the origin closed the link")
            frames = decoder.feed(data)
            with self.remote.publish_context():
                for msg in frames:
                    if loaded:
                        self._on_push(msg)
                    elif self._on_snapshot(msg, snap):
                        loaded = True
                        again = self._install(snap)
                        self._writer = writer
                        self.connected = True
                        ready.set()
                        log("link_origin_connected", origin=self.address, shard=self.shard)
                        if again:
                            for listener in self.remote.restored_listeners:
                                _tell(listener, set(self._instances))

    async def _ping(self, writer: _StreamWriter) -> None:
        """A request every `PING_S`, so that the origin answers something even when nothing
        happens: each end can then tell a silent peer from a quiet one (link.py)."""
        while True:
            await trio.sleep(link.PING_S)
            self._next_id += 1  # its answer finds no pending reply: dropped
            writer.write(link.encode({"t": "req", "id": self._next_id, "op": "ping"}))

    # --- snapshot and pushes -------------------------------------------------------------

    def _on_snapshot(self, msg: dict[str, Any], snap: Membership) -> bool:
        kind = msg["t"]
        if kind == "welcome":
            self.shard = str(msg.get("shard"))
        elif kind == "snap":
            for d in msg.get("instances", ()):
                inst = link.instance_from_wire(d)
                snap.instances[inst.id] = inst
            for d in msg.get("users", ()):
                user = link.user_from_wire(d)
                snap.users[user.id] = user
            for d in msg.get("rooms", ()):
                snap.add_room(link.room_from_wire(d))
        elif kind == "snap_end":
            return True
        else:
            raise link.LinkBroken(f"unexpected {kind!r} before the snapshot ended")
        return False

    def _install(self, snap: Membership) -> bool:
        """Load a snapshot into the replica. On a reconnect (True), what changed since the
        replica's state reaches the listeners as the pushes would have told it."""
        state = self.remote.state
        again = self.generation > 0
        changed: list[Instance | User] = []
        if again:
            changed += [i for i in snap.instances.values() if state.instances.get(i.id) != i]
            changed += [u for u in snap.users.values() if state.users.get(u.id) != u]
            changed += [  # deleted meanwhile: the origin keeps deleted users out of snapshots
                attrs.evolve(u, status="deleted")
                for u in state.users.values()
                if u.instance in snap.instances and u.id not in snap.users and u.status != "deleted"
            ]
        reads: list[tuple[str, str, int]] = []  # read positions that moved meanwhile
        for room in snap.rooms.values() if again else ():
            old = state.rooms.get(room.record.id)
            if old is not None:
                reads += [
                    (room.record.id, user, seq)
                    for user, seq in room.members.items()
                    if seq > old.members.get(user, seq)
                ]
        state.instances.update(snap.instances)
        state.users.update(snap.users)
        for record in changed:
            if isinstance(record, User):
                state.users[record.id] = record
        room_changes = [self._set_room(room) for room in snap.rooms.values()]
        shard_of = self.remote.shard_of
        # Held by a link that is down (a link up to the same shard under another address
        # string is not a move).
        moved = {
            i
            for i in snap.instances
            if (o := shard_of.get(i, self)) is not self and not o.connected
        }
        self._instances = set(snap.instances)
        for inst in snap.instances:
            shard_of[inst] = self
        if moved:
            self._taken_over(moved)
        self.generation += 1  # slots of the previous link were freed by the origin
        self._releases.clear()
        if again:  # in the origin's order: a deleted user leaves its rooms, then is deleted
            # The replica already holds the changes: a failing listener must not keep the
            # others from them (a reconnect would find nothing left to tell).
            for change in room_changes:
                if change.added or change.removed:
                    for member_listener in self.remote.member_listeners:
                        _tell(member_listener, change)
            for record in changed:
                for tenancy_listener in self.remote.tenancy_listeners:
                    _tell(tenancy_listener, record)
            for room_id, user, seq in reads:
                for read_listener in self.remote.read_listeners:
                    _tell(read_listener, room_id, user, seq)
        return again

    def _taken_over(self, moved: set[str]) -> None:
        """This link holds instances that another link held: their shard moved here from an
        address the edge keeps (listed in `[cluster] origins`, so never retired). That link's
        sockets and hubs of them wait for a return that will not come, and this link's first
        snapshot restores nothing: they are given up as `retire` gives up its own (the clients
        resume, through this link)."""
        known = self.remote.state.rooms
        rooms = {r for r, room in known.items() if room.record.instance in moved}
        for other in self.remote.links:
            if other is not self:
                other._instances -= moved
                other._rooms -= rooms
        log("link_shard_moved", origin=self.address, shard=self.shard, instances=len(moved))
        for listener in self.remote.lost_listeners:
            _tell(listener, rooms, moved, True)

    def _set_room(self, room: RoomState) -> MembershipChange:
        """Replace a room's state in the replica; returns what changed in its membership."""
        state = self.remote.state
        rid = room.record.id
        old = state.rooms.get(rid)
        before = set(old.members) if old is not None else set()
        if old is not None:
            state.remove_members(rid, list(old.members))
        state.add_room(room)
        self._rooms.add(rid)
        after = set(room.members)
        return MembershipChange(rid, tuple(sorted(after - before)), tuple(sorted(before - after)))

    def _change_members(
        self, rid: str, added: dict[str, int], removed: list[str]
    ) -> MembershipChange:
        """Apply a membership change of a room the replica holds (the origin pushed the room
        before its changes: a change of another is a broken link, which loads a snapshot)."""
        room = self.remote.state.rooms.get(rid)
        if room is None or rid not in self._rooms:
            raise link.LinkBroken(f"a membership change of room {rid!r}, which is not loaded")
        new = [u for u in added if u not in room.members]
        gone = [u for u in removed if u in room.members]
        self.remote.state.remove_members(rid, gone)
        self.remote.state.add_members(rid, new)
        for u in new:
            room.members[u] = added[u]
        return MembershipChange(rid, tuple(new), tuple(gone))

    def _on_push(self, msg: dict[str, Any]) -> None:
        remote = self.remote
        kind = msg["t"]
        if kind == "res":
            reply = self._pending.pop(msg["id"], None)
            if reply is None:
                return
            if "err" in msg:
                reply(outcome.Error(link.error_from_wire(msg["err"])))
            else:
                reply(outcome.Value(msg["ok"]))
        elif kind == "batch":
            for room_id, wire in msg["events"].items():
                events = [link.event_from_wire(d) for d in wire]
                self._advance(room_id, events[-1].seq)
                for listener in remote.event_listeners:
                    listener(room_id, events)
            for room_id, head in msg["heads"].items():
                self._advance(room_id, head)
            for req_id, seq, ts in msg.get("acks", ()):  # new events of our appends (link.py)
                ack = self._pending.pop(req_id, None)
                if ack is not None:
                    ack(outcome.Value({"seq": seq, "ts": ts}))
        elif kind == "room":
            change = self._set_room(link.room_from_wire(msg["room"]))
            if change.added or change.removed:
                for member_listener in remote.member_listeners:
                    member_listener(change)
        elif kind == "members":
            change = self._change_members(msg["room"], msg["added"], msg["removed"])
            if change.added or change.removed:
                for member_listener in remote.member_listeners:
                    member_listener(change)
        elif kind == "read":
            remote.state.set_read(msg["room"], msg["user"], msg["seq"])
            for read_listener in remote.read_listeners:
                read_listener(msg["room"], msg["user"], msg["seq"])
        elif kind == "instance":
            inst = link.instance_from_wire(msg["instance"])
            remote.state.instances[inst.id] = inst
            self._instances.add(inst.id)
            remote.shard_of[inst.id] = self
            for tenancy_listener in remote.tenancy_listeners:
                tenancy_listener(inst)
        elif kind == "user":
            user = link.user_from_wire(msg["user"])
            remote.state.users[user.id] = user
            for tenancy_listener in remote.tenancy_listeners:
                tenancy_listener(user)
        else:
            raise link.LinkBroken(f"unknown push {kind!r}")

    def _advance(self, room_id: str, head: int) -> None:
        room = self.remote.state.rooms.get(room_id)
        if room is not None and head > room.head:
            room.head = head

    def _lost(self) -> None:
        """The link is down: fail what waits on it and make the clients of its rooms resume."""
        was = self.connected
        self.connected = False
        self._writer = None
        if was and not self.retired:  # `retire` told them
            for listener in self.remote.lost_listeners:
                _tell(listener, set(self._rooms), set(self._instances), False)
        pending, self._pending = self._pending, {}
        for reply in pending.values():
            reply(outcome.Error(LinkLost()))
        self._rooms.clear()

    # --- requests ------------------------------------------------------------------------

    def send(self, msg: dict[str, Any], reply: Reply) -> None:
        """Send a request now (no await: frames leave in call order); `reply` gets the answer."""
        writer = self._writer
        if writer is None or not self.connected:
            reply(outcome.Error(LinkDown()))
            return
        self._next_id += 1
        msg["t"] = "req"
        msg["id"] = self._next_id
        self._pending[self._next_id] = reply
        writer.write(link.encode(msg))

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        done = trio.Event()
        box: list[outcome.Outcome[Any]] = []

        def reply(result: outcome.Outcome[Any]) -> None:
            box.append(result)
            done.set()

        self.send({"op": op, **fields}, reply)
        await done.wait()
        value: dict[str, Any] = box[0].unwrap()
        return value

    def release_slot(self, instance: str, resource: str, generation: int) -> None:
        """Give back a slot taken under `generation` (no await: batched by `_flush_releases`).
        A slot of an earlier link is already free at the origin."""
        if generation != self.generation or not self.connected:
            return
        key = (instance, resource)
        self._releases[key] = self._releases.get(key, 0) + 1
        self._release_wake.set()

    async def _flush_releases(self) -> None:
        """One `slot.release` frame for every release made since the last one."""
        while True:
            await self._release_wake.wait()
            self._release_wake = trio.Event()
            if self._releases and self.connected:
                counts = [[i, r, n] for (i, r), n in self._releases.items()]
                self._releases = {}
                self.send({"op": "slot.release", "counts": counts}, lambda result: None)

    async def append(
        self, fields: dict[str, Any], reply: Callable[[outcome.Outcome[Any]], None]
    ) -> None:
        await self._appends.acquire()

        def answered(result: outcome.Outcome[Any]) -> None:
            self._appends.release()
            reply(result)

        self.send({"op": "append", **fields}, answered)


class RemoteOrigin:
    """What the gateway calls the origin, when the origins run in other processes."""

    # Another edge's pushes of a room can be ahead of this one's: a client that resumes here
    # may have seen seqs this edge's hub has not yet (see the gateway's subscribe).
    pushes_lag = True
    # A room's events reach this edge only once the origin answered its `watch`.
    pushes_need_watch = True

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = Membership()
        self.rooms = self.state.rooms
        self.user_rooms = self.state.user_rooms
        self.shard_of: dict[str, ShardLink] = {}  # the shard map: instance → its shard's link
        self.links = [ShardLink(self, address) for address in config.origins]
        self._shard_map: ShardMap | None = None
        self._shards_read = False  # the shard map was read once: this edge knows its shards
        self._unplaced: dict[str, float] = {}  # instance → until when it is known unplaced
        self.event_listeners: list[Callable[[str, list[Event]], None]] = []
        self.member_listeners: list[Callable[[MembershipChange], None]] = []
        self.read_listeners: list[Callable[[str, str, int], None]] = []
        self.watch_listeners: list[Callable[[str, int], object]] = []
        # Instances and users as the shard changed them (a suspended instance, a deleted user).
        self.tenancy_listeners: list[Callable[[Instance | User], None]] = []
        # (rooms, instances) of a shard whose link broke
        # A shard's link broke (its rooms, its instances, and whether for good: `retire`).
        self.lost_listeners: list[Callable[[set[str], set[str], bool], None]] = []
        # A shard's link is back after a loss (its instances): their slots and watches are gone.
        self.restored_listeners: list[Callable[[set[str]], None]] = []
        self.publish_context: Callable[[], AbstractContextManager[object]] = nullcontext
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.config.kv:
                try:
                    self._add_links(await self._shards(nursery))
                except GB6Error as exc:
                    if exc.code != UNAVAILABLE:
                        raise
                    # Served meanwhile, as when no origin answers (/readyz says unreachable);
                    # asked again at each discovery.
                    log("shard_map_unavailable", error=exc.message)
            # Together: each waits up to `_FIRST_CONNECT_S` for an origin that does not answer.
            async with trio.open_nursery() as starting:
                for shard_link in list(self.links):
                    starting.start_soon(nursery.start, shard_link.run)
            task_status.started()
            while self.config.kv:
                # Shards that registered since: a new shard needs no edge reconfigured.
                await trio.sleep(_DISCOVERY_S)
                try:
                    addresses = set(await self._shards(nursery))
                except GB6Error as exc:  # any: a running edge serves on without the map
                    log("shard_map_unavailable", error=exc.message)
                    continue
                for shard_link in self._add_links(addresses):
                    nursery.start_soon(shard_link.run)
                # A shard registered at a new address (restarted elsewhere) has left its old
                # one: that link would try it for good, and keep the edge from ever telling an
                # unknown token from one of an unreachable shard.
                for shard_link in [x for x in self.links if x.address not in addresses]:
                    if shard_link.address not in self.config.origins:
                        log("link_origin_retired", origin=shard_link.address)
                        self.links.remove(shard_link)
                        shard_link.retire()

    async def _shards(self, nursery: trio.Nursery) -> list[str]:
        """The link address of every shard in the shard map, its kv started first if it is
        not yet (`unavailable` while the kv does not answer)."""
        if self._shard_map is None:
            kv = open_kv(self.config.kv)
            await nursery.start(kv.run)
            self._shard_map = ShardMap(kv)
        shards = list((await self._shard_map.shards()).values())
        self._shards_read = True
        return shards

    def _add_links(self, addresses: Iterable[str]) -> list[ShardLink]:
        known = {shard_link.address for shard_link in self.links}
        new = [ShardLink(self, a) for a in dict.fromkeys(addresses) if a not in known]
        self.links.extend(new)
        return new

    @property
    def reachable(self) -> bool:
        """Some origin shard answers (else no client can do anything here: /readyz says so)."""
        return any(shard_link.connected for shard_link in self.links)

    # --- routing -------------------------------------------------------------------------

    def _link_for_instance(self, instance: str) -> ShardLink:
        shard_link = self.shard_of.get(instance)
        if shard_link is None:
            raise GB6Error(UNAVAILABLE, "the origin shard of this instance is unreachable; retry")
        if not shard_link.connected:
            raise LinkDown()
        return shard_link

    def _link_for_room(self, who: Principal, room_id: str) -> ShardLink:
        room = self.state.rooms.get(room_id)
        instance = room.record.instance if room is not None else who.instance.id
        return self._link_for_instance(instance)

    async def _placed(self, instance: str) -> bool:
        """Whether the shard map places `instance` (on a shard this edge has no link to yet).
        An instance found unplaced is not asked again for `_UNPLACED_S`: a hello's token is
        checked before its sender is known, and made-up ones must not reach the kv each."""
        if self._shard_map is None:
            if self.config.kv:  # not started yet: the instance may be on any shard
                raise GB6Error(UNAVAILABLE, "the shard map does not answer yet; retry")
            return False
        now = trio.current_time()
        if self._unplaced.get(instance, -math.inf) > now:
            return False
        if await self._shard_map.shard_of(instance) is not None:
            return True
        self._unplaced.pop(instance, None)  # to the end: the oldest go first
        self._unplaced[instance] = now + _UNPLACED_S
        while len(self._unplaced) > _MAX_UNPLACED:
            del self._unplaced[next(iter(self._unplaced))]
        return False

    # --- what the gateway calls ----------------------------------------------------------

    async def authenticate(self, secret: str) -> Principal:
        """Tokens name their instance (`gb6u_<instance>.<secret>`): ask its shard. A token of
        a shard this edge cannot reach yet is `unavailable` (retry), never `unauthorized`.
        Older tokens without the instance: ask each connected shard in turn."""
        match = _TOKEN_INSTANCE.match(secret)
        if match is not None:
            instance = match.group(1)
            shard_link = self.shard_of.get(instance)
            placed = shard_link is None and await self._placed(instance)
            if placed:
                raise GB6Error(UNAVAILABLE, "this edge does not reach that shard yet; retry")
            if shard_link is None and not all(other.connected for other in self.links):
                # The instance may be on a shard whose link is down or not loaded yet.
                raise GB6Error(UNAVAILABLE, "an origin shard is unreachable; retry")
            if shard_link is None:
                raise GB6Error(UNAUTHORIZED, UNKNOWN_TOKEN)
            return await self._authenticate_on(self._link_for_instance(instance), secret)
        last = GB6Error(UNAUTHORIZED, UNKNOWN_TOKEN)
        if self.config.kv and not self._shards_read:  # shards this edge does not know yet
            last = GB6Error(UNAVAILABLE, "the shard map does not answer yet; retry")
        for shard_link in self.links:
            if not shard_link.connected:
                last = GB6Error(UNAVAILABLE, "an origin shard is unreachable; retry")
                continue
            try:
                return await self._authenticate_on(shard_link, secret)
            except GB6Error as exc:
                if exc.code != UNAUTHORIZED or "unknown" not in exc.message:
                    raise
        raise last

    async def _authenticate_on(self, shard_link: ShardLink, secret: str) -> Principal:
        ok = await shard_link.request("auth", token=secret)
        who = self.state.principal(ok["user"])
        if who is None:
            raise GB6Error(UNAVAILABLE, "the user is not known to this edge yet; retry")
        return who

    def room_visible(self, who: Principal, room_id: str) -> RoomState:
        return self.state.room_visible(who, room_id)

    def room_for_member(self, who: Principal, room_id: str) -> RoomState:
        return self.state.room_for_member(who, room_id)

    def rooms_of(self, who: Principal) -> list[dict[str, Any]]:
        return self.state.rooms_of(who)

    async def watch(self, room_id: str) -> None:
        room = self.state.rooms.get(room_id)
        if room is None:
            return
        shard_link = self._link_for_instance(room.record.instance)
        done = trio.Event()
        box: list[outcome.Outcome[Any]] = []

        def reply(result: outcome.Outcome[Any]) -> None:
            try:
                if isinstance(result, outcome.Value):
                    # In the link's reader, before any of the room's events: see link.py.
                    for listener in self.watch_listeners:
                        listener(room_id, result.value["head"])
            finally:  # a listener that raises breaks the link; the watch is answered still
                box.append(result)
                done.set()

        shard_link.send({"op": "watch", "room": room_id}, reply)
        await done.wait()
        box[0].unwrap()

    def unwatch(self, room_id: str) -> None:
        """This edge forgot the room's hub: the origin sends only its head from now on."""
        room = self.state.rooms.get(room_id)
        shard_link = self.shard_of.get(room.record.instance) if room is not None else None
        if shard_link is not None and shard_link.connected:
            shard_link.send({"op": "unwatch", "room": room_id}, lambda result: None)

    async def append(
        self,
        who: Principal,
        room_id: str,
        type_: str,
        cid: str,
        reply: Callable[[AppendResult], None],
        *,
        body: dict[str, Any] | None = None,
        thread: int | None = None,
        target: int | None = None,
        emoji: str | None = None,
    ) -> None:
        self.state.room_for_member(who, room_id)
        shard_link = self._link_for_room(who, room_id)
        self._inflight += 1
        if self._inflight == 1:
            self._idle = trio.Event()

        def answered(result: outcome.Outcome[Any]) -> None:
            self._answered_one()
            if isinstance(result, outcome.Value):
                ok = result.value
                if "event" in ok:  # a repeat: the original event
                    ev = link.event_from_wire(ok["event"])
                    reply(Appended(ev, ok["duplicate"]))
                    return
                # An ack: the event is this request at the origin's seq and ts (link.py).
                ev = Event(
                    room=room_id,
                    seq=ok["seq"],
                    ts=ok["ts"],
                    type=type_,
                    sender=who.id,
                    cid=cid,
                    body=body,
                    thread=thread,
                    target=target,
                    emoji=emoji,
                )
                reply(Appended(ev, False))
            else:
                assert isinstance(result, outcome.Error)
                err = result.error
                reply(err if isinstance(err, GB6Error) else GB6Error(INTERNAL, "internal error"))

        fields = {
            "who": who.id,
            "room": room_id,
            "type": type_,
            "cid": cid,
            "body": body,
            "thread": thread,
            "target": target,
            "emoji": emoji,
        }
        try:
            await shard_link.append(fields, answered)
        except BaseException:  # cancelled while it waited for a slot: not sent, never answered
            self._answered_one()
            raise

    def _answered_one(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def drain(self) -> None:
        await self._idle.wait()

    async def acquire_slot(self, instance: str, resource: str) -> Callable[[], None]:
        """Take one of the instance's concurrent `resource` (`connections`,
        `media_participants`) at its origin shard, which counts every edge's
        (`quota_exceeded` past the limit, `unavailable` without a link). Returns the release,
        to call once when the session ends (more calls do nothing). If the link breaks, the
        origin frees every slot this edge held; once it is back, the gateway takes its
        sockets' slots again (`restored_listeners`)."""
        shard_link = self._link_for_instance(instance)
        generation = shard_link.generation
        done = trio.Event()
        box: list[outcome.Outcome[Any]] = []
        abandoned = False

        def reply(result: outcome.Outcome[Any]) -> None:
            if abandoned and isinstance(result, outcome.Value):
                shard_link.release_slot(instance, resource, generation)  # nobody holds it
            box.append(result)
            done.set()

        shard_link.send({"op": "slot.acquire", "instance": instance, "resource": resource}, reply)
        try:
            await done.wait()
        except BaseException:  # cancelled (the session ended): the answer's slot goes back
            abandoned = True
            if box and isinstance(box[0], outcome.Value):  # answered before the cancel
                shard_link.release_slot(instance, resource, generation)
            raise
        box[0].unwrap()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                shard_link.release_slot(instance, resource, generation)

        return release

    # --- recordings (edge/media_recording.py's Backend): at the instance's origin ----------

    async def charge_usage(self, instance: str, resource: str, n: int, key: str) -> None:
        """The shard's `charge_usage` (quota_exceeded past the plan's limit)."""
        await self._link_for_instance(instance).request(
            "usage.charge", instance=instance, resource=resource, n=n, key=key
        )

    async def recording_write(
        self, instance: str, blob_id: str, offset: int, data: bytes, last: bool
    ) -> None:
        """One chunk (≤ origin.recording_store.CHUNK bytes) of a recording blob."""
        await self._link_for_instance(instance).request(
            "rec.write",
            instance=instance,
            blob=blob_id,
            offset=offset,
            data=base64.b64encode(data).decode(),
            last=last,
        )

    async def recording_read(self, instance: str, blob_id: str, offset: int) -> tuple[bytes, int]:
        ok = await self._link_for_instance(instance).request(
            "rec.read", instance=instance, blob=blob_id, offset=offset
        )
        return base64.b64decode(ok["data"]), int(ok["size"])

    async def recording_index(self, instance: str, room: str) -> list[str]:
        ok = await self._link_for_instance(instance).request(
            "rec.index", instance=instance, room=room
        )
        return [str(i) for i in ok["recordings"]]

    async def recording_indexed(self, instance: str, room: str, recording: str) -> None:
        await self._link_for_instance(instance).request(
            "rec.indexed", instance=instance, room=room, recording=recording
        )

    async def events_after(self, room_id: str, after: int, limit: int) -> list[Event]:
        room = self.state.rooms.get(room_id)
        if room is None:
            return []
        shard_link = self._link_for_instance(room.record.instance)
        ok = await shard_link.request("events_after", room=room_id, after=after, limit=limit)
        return [link.event_from_wire(d) for d in ok["events"]]

    async def history(
        self, who: Principal, room_id: str, before: int | None, limit: int
    ) -> list[Event]:
        self.state.room_for_member(who, room_id)
        ok = await self._link_for_room(who, room_id).request(
            "history", who=who.id, room=room_id, before=before, limit=limit
        )
        return [link.event_from_wire(d) for d in ok["events"]]

    async def search(self, who: Principal, query: str, room_id: str | None) -> list[Event]:
        if room_id is not None:
            self.state.room_for_member(who, room_id)
        ok = await self._link_for_instance(who.instance.id).request(
            "search", who=who.id, query=query, room=room_id
        )
        return [link.event_from_wire(d) for d in ok["events"]]

    async def _room_op(self, who: Principal, op: str, **fields: Any) -> RoomState:
        ok = await self._link_for_instance(who.instance.id).request(op, who=who.id, **fields)
        state = link.room_from_wire(ok["room"])
        # The origin pushed the same state before this answer; the replica's object is current.
        return self.state.rooms.get(state.record.id, state)

    async def create_room(
        self, who: Principal, name: str, kind: str, members: Iterable[str], open_: bool
    ) -> RoomState:
        return await self._room_op(
            who, "create_room", name=name, kind=kind, members=list(members), open=open_
        )

    async def join(self, who: Principal, room_id: str) -> RoomState:
        return await self._room_op(who, "join", room=room_id)

    async def leave(self, who: Principal, room_id: str) -> RoomState:
        return await self._room_op(who, "leave", room=room_id)

    async def add_members(self, who: Principal, room_id: str, users: Iterable[str]) -> RoomState:
        return await self._room_op(who, "add_members", room=room_id, users=list(users))

    async def remove_members(self, who: Principal, room_id: str, users: Iterable[str]) -> RoomState:
        return await self._room_op(who, "remove_members", room=room_id, users=list(users))

    async def set_read(self, who: Principal, room_id: str, seq: int) -> None:
        # Here first, as every room op: another tenant's room must answer as an unknown one.
        self.state.room_for_member(who, room_id)
        await self._link_for_room(who, room_id).request(
            "set_read", who=who.id, room=room_id, seq=seq
        )


class _StreamWriter:
    """Serializes writes to one link stream without an await at the caller. Unbounded here,
    but what it carries is bounded upstream: appends by `link_inflight_appends`, other
    requests by the clients' own limits."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._out: list[bytes] = []
        self._wake = trio.Event()

    def write(self, frame: bytes) -> None:
        self._out.append(frame)
        self._wake.set()

    async def run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                blob = b"".join(self._out)
                self._out.clear()
                await self.stream.send_all(blob)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # Let the reader's nursery end the link (it then reconnects).
            raise trio.BrokenResourceError("link write failed") from exc
