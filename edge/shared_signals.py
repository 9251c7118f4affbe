"""Typing, presence and rate limits shared by the edges of a cluster (the ports of `edge.bus`).

One edge delivers a signal to its own clients directly and publishes it once; every other
edge that follows the channel delivers it to its clients. Channels: a room's (typing, followed
once a client of this edge subscribes to the room) and an instance's (presence, followed once a
user of the instance says hello here). Signals carry the publishing edge's id, so an edge skips
its own. Presence across edges: a user goes offline only when their last session on ANY edge
ends (the session registry answers), and comes online only when their first one starts.
At each sweep (every `sweep_s`: `[cluster] presence_sweep_s`, default `SWEEP_S`) an edge
stops following the channels of rooms none of its clients subscribes to and of instances none
of its users is connected to, but for those followed again since the sweep before (a
subscribe between its follow and its hub): at most `_MAX_FOLLOWED` are followed at once, and
unused ones would crowd out new ones. A hello or subscribe that takes longer than `sweep_s`
between its follow and its connection or hub may find the channel unfollowed: the
next subscribe to the room, or hello of the instance, follows it again.

Ephemeral by design (DESIGN §3): a signal the bus drops is lost; nothing here is persisted.
Presence is state, though, and the session registry decides it (see `edge.bus`): each change is
decided once, atomically, by the edge whose call made it, and carries a version, so that an edge
tells its clients a user's statuses in the order they were decided, whatever order the signals
arrive in, and never one older than what it told them last. What a signal fails to say is
repaired by every sweep:
- the registry settles the users this edge shows online or away, and those connected here (an
  edge killed with kill -9 says nothing: its users' sessions lapse within the registry's ttl,
  and the first edge to settle them decides "offline"; a registry that lost its keys is told
  them again by each edge's heartbeat, and it never decides "offline" for a user whose edge
  settles them), and this edge tells its clients what it had missed;
- this edge reads the change feed of each instance it follows since its last read (the
  feed's position when it began to follow the instance), and tells its clients the changes it
  had missed. If it could not read for longer than the feed keeps changes (Redis unreachable
  for over a minute), it asks the presence of every user its clients of that instance share a
  room with (`users_seen`, at most `_MAX_RESYNC`) and tells them what changed.
At most `_MAX_TOLD` users' presence is remembered per edge (the least recently told are
forgotten, and no longer settled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

import attrs
import orjson
import trio

from edge.bus import (
    MAX_FEED_READ,
    MAX_LOCATE_USERS,
    STATUSES,
    Presence,
    PubSub,
    SessionRegistry,
    room_channel,
)
from node.errors import GB6Error
from node.log import log
from node.ratelimit import RateLimiter

_MAX_FOLLOWED: Final = 10_000  # channels per edge; past it, signals of new ones stay local
SWEEP_S: Final = 10.0  # the default of `[cluster] presence_sweep_s`
_MAX_TOLD: Final = 100_000
_MAX_FEED_PAGES: Final = 10  # feed reads per instance per sweep
_UNFOLLOW_CHUNK: Final = 1000  # channels per unsubscribe command
_INSTANCE: Final = "instance:"
_MAX_RESYNC: Final = 100_000  # users asked per instance after a feed read that missed changes


def instance_channel(instance: str) -> str:
    return _INSTANCE + instance


@attrs.frozen
class _Told:
    """What this edge's clients were told last of a user's presence."""

    instance: str
    status: str
    version: int


class SharedSignals:
    """A component: `await nursery.start(shared.run)`. The gateway sets `on_typing` and
    `on_presence`, which are called (synchronously) for the signals its clients are told."""

    def __init__(
        self,
        pubsub: PubSub,
        sessions: SessionRegistry,
        edge_id: str,
        limiters: dict[str, RateLimiter] | None = None,
        auth_failures: RateLimiter | None = None,
        sweep_s: float | None = None,
    ) -> None:
        self.sweep_s = SWEEP_S if sweep_s is None else sweep_s  # config `presence_sweep_s`
        self.pubsub = pubsub
        self.sessions = sessions
        self.edge_id = edge_id
        self.limiters = limiters  # per plan, shared by every edge (None: each edge its own)
        self.auth_failures = auth_failures  # failed hellos per client address, shared
        self.on_typing: Callable[[str, str], None] = lambda room, user: None
        self.on_presence: Callable[[str, str], None] = lambda user, status: None
        # The rooms and instances this edge's clients need signals of (set by the gateway).
        self.rooms_in_use: Callable[[], Iterable[str]] = tuple
        self.instances_in_use: Callable[[], Iterable[str]] = tuple
        # user → instance of those with a session on this edge.
        self.users_here: Callable[[], Mapping[str, str]] = dict
        # The users this edge's clients of an instance may be shown the presence of.
        self.users_seen: Callable[[str], Iterable[str]] = lambda instance: ()
        self._followed: set[str] = set()
        self._touched: set[str] = set()  # followed channels asked for since the last sweep
        self._changing = trio.Lock()  # one follow or unfollow at a time: they keep their order
        self._told: dict[str, _Told] = {}  # user → what they were told, least recent first
        # Followed instance → the position in its change feed to read from next (None: not
        # known yet; the first read learns it).
        self._feeds: dict[str, int | None] = {}
        # Followed instances whose feed read missed changes → the position after that read:
        # their users' presence is asked (`_resync`) at each sweep until it is answered.
        self._resyncs: dict[str, int] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_forever)
            task_status.started()
            while True:
                signal = await self.pubsub.receive()
                try:
                    msg: dict[str, Any] = orjson.loads(signal.data)
                    if msg.get("edge") == self.edge_id:
                        continue
                    if msg.get("kind") == "typing":
                        self.on_typing(str(msg["room"]), str(msg["user"]))
                    elif msg.get("kind") == "presence":
                        self._on_presence_signal(signal.channel, msg)
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    log("shared_signal_bad", channel=signal.channel, error=repr(exc))

    def _on_presence_signal(self, channel: str, msg: dict[str, Any]) -> None:
        user, status, version = str(msg["user"]), str(msg["status"]), msg.get("version")
        if status not in STATUSES:
            raise KeyError(status)
        if version is None:  # from an edge of an older release: told as it comes
            self.on_presence(user, status)
        elif isinstance(version, int) and channel.startswith(_INSTANCE):
            self._tell(channel[len(_INSTANCE) :], Presence(user, status, version))
        else:
            raise TypeError("a presence version is an integer")

    def _tell(self, instance: str, now: Presence) -> None:
        """Tell this edge's clients `now` unless they were told it, or newer, already (a
        status decided again, the same, is newer but not told again)."""
        told = self._told.get(now.user)
        if now.version == 0 or (told is not None and told.version >= now.version):
            return
        self._told.pop(now.user, None)  # to the end: the least recently told go first
        self._told[now.user] = _Told(instance, now.status, now.version)
        if len(self._told) > _MAX_TOLD:
            del self._told[next(iter(self._told))]
        if told is None or told.status != now.status:
            self.on_presence(now.user, now.status)

    def announce(self, instance: str, now: Presence) -> None:
        """A user's presence as a registry call on this edge answered it: told to this edge's
        clients if newer than what they were told, and to the other edges if this call decided
        it."""
        self._tell(instance, now)
        if now.changed:  # even if told already (by a feed read or settle that came first)
            data = {
                "edge": self.edge_id,
                "kind": "presence",
                "user": now.user,
                "status": now.status,
                "version": now.version,
            }
            self.pubsub.publish(instance_channel(instance), orjson.dumps(data))

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(self.sweep_s)
            try:
                await self.sweep()
            except GB6Error as exc:  # the next sweep asks again
                log("presence_sweep_failed", error=exc.message)
            try:
                await self.unfollow_unused()
            except GB6Error as exc:  # a later follow subscribes again
                log("shared_unfollow_failed", error=exc.message)

    async def sweep(self) -> None:
        """Settle the users shown online or away and those connected here, then read the
        feeds of the instances followed: tell this edge's clients what they missed."""
        here = self.users_here()
        shown = {u: t.instance for u, t in self._told.items() if t.status != "offline"}
        shown.update(here)  # those whose session was written late were told nothing yet
        users = list(shown)
        for i in range(0, len(users), MAX_LOCATE_USERS):
            chunk = {u: shown[u] for u in users[i : i + MAX_LOCATE_USERS]}
            for now in await self.sessions.settle(chunk):
                told = self._told.pop(now.user, None)
                if told is not None:  # to the end: those settled are forgotten last
                    self._told[now.user] = told
                self.announce(chunk[now.user], now)
        instances = list(self._feeds)
        for i in range(0, len(instances), MAX_LOCATE_USERS):
            await self.read_feeds(instances[i : i + MAX_LOCATE_USERS])
        await self.resync_missed()

    async def read_feeds(self, instances: list[str]) -> None:
        """Read the change feeds of `instances` (followed ones) from where the last read ended,
        and tell this edge's clients the changes they missed."""
        for _ in range(_MAX_FEED_PAGES):
            since = {i: self._feeds[i] for i in instances if i in self._feeds}
            if not since:
                break
            more = []
            for instance, read in (await self.sessions.changes(since)).items():
                if instance not in self._feeds:  # unfollowed meanwhile
                    continue
                for now in read.changed:
                    self._tell(instance, now)  # said by the edge that decided it, if at all
                self._feeds[instance] = read.position
                if read.missed:
                    self._resyncs[instance] = read.position
                elif len(read.changed) >= MAX_FEED_READ:
                    more.append(instance)
            instances = more

    async def resync_missed(self) -> None:
        """Ask the presence of the users of each instance whose feed read missed changes (see
        `_resync`); one that fails is asked again at the next sweep, the others go on."""
        for instance, position in list(self._resyncs.items()):
            if instance not in self._feeds:  # unfollowed meanwhile
                del self._resyncs[instance]
                continue
            try:
                await self._resync(instance, position)
            except GB6Error as exc:
                log("presence_resync_failed", instance=instance, error=exc.message)
                continue
            if self._resyncs.get(instance) == position:
                del self._resyncs[instance]

    async def _resync(self, instance: str, position: int) -> None:
        """After a feed read that missed changes: tell this edge's clients the presence of the
        users they may be shown, as of after the read (older than any change decided after it,
        which has a version at or above `position`); a user never told here and offline is left
        so."""
        log("presence_feed_missed", instance=instance)
        seen: dict[str, None] = {}
        for n, user in enumerate(self.users_seen(instance)):
            seen[user] = None
            if len(seen) >= _MAX_RESYNC:
                break
            if n % 10_000 == 9_999:  # large rooms: the edge serves its clients meanwhile
                await trio.lowlevel.checkpoint()
        users = list(seen)
        for i in range(0, len(users), MAX_LOCATE_USERS):
            chunk = users[i : i + MAX_LOCATE_USERS]
            statuses = await self.sessions.presence(chunk)
            for user in chunk:
                status = statuses.get(user, "offline")
                if status == "offline" and user not in self._told:
                    continue
                self._tell(instance, Presence(user, status, position - 1))

    async def unfollow_unused(self) -> None:
        """Stop following the channels no client of this edge needs now, but for those asked
        for since the last call."""
        async with self._changing:
            used = {room_channel(r) for r in self.rooms_in_use()}
            used.update(instance_channel(i) for i in self.instances_in_use())
            gone = sorted(self._followed - used - self._touched)
            self._touched.clear()
            # Given up before Redis confirms: a later follow subscribes again.
            self._followed.difference_update(gone)
            feeds = {
                c: self._feeds.pop(c[len(_INSTANCE) :], None)
                for c in gone
                if c.startswith(_INSTANCE)
            }
            for i in range(0, len(gone), _UNFOLLOW_CHUNK):
                try:
                    await self.pubsub.unsubscribe(gone[i : i + _UNFOLLOW_CHUNK])
                except BaseException:
                    # Those after this chunk are still followed: the next sweep tries them.
                    kept = gone[i + _UNFOLLOW_CHUNK :]
                    self._followed.update(kept)
                    for channel in kept:
                        if channel in feeds:
                            self._feeds[channel[len(_INSTANCE) :]] = feeds[channel]
                    raise

    async def _follow(self, channel: str) -> bool:
        """Follow `channel`; False if it was followed already, or cannot be now."""
        if channel in self._followed:
            self._touched.add(channel)
            return False
        async with self._changing:  # after an unfollow of it under way, not before
            if channel in self._followed or len(self._followed) >= _MAX_FOLLOWED:
                return False
            self._followed.add(channel)
            try:
                await self.pubsub.subscribe([channel])
            except GB6Error as exc:  # signals of this channel stay on this edge until it works
                self._followed.discard(channel)
                log("shared_follow_failed", channel=channel, error=exc.message)
                return False
            except BaseException:  # cancelled (the caller's bound): tried again next time
                self._followed.discard(channel)
                raise
            self._touched.add(channel)
            return True

    async def follow_room(self, room: str) -> None:
        await self._follow(room_channel(room))

    async def follow_instance(self, instance: str) -> None:
        """Follow the instance's presence signals; the changes from when it began to that a
        signal fails to tell are repaired from its change feed (where it was just before)."""
        channel = instance_channel(instance)
        if channel in self._followed:
            await self._follow(channel)  # touched
            return
        try:
            position = (await self.sessions.changes({instance: None}))[instance].position
        except GB6Error as exc:  # the first sweep learns it
            log("presence_feed_failed", instance=instance, error=exc.message)
            position = None
        if await self._follow(channel):
            self._feeds[instance] = position

    def typing(self, room: str, user: str) -> None:
        data = {"edge": self.edge_id, "kind": "typing", "room": room, "user": user}
        self.pubsub.publish(room_channel(room), orjson.dumps(data))
