"""Typing, presence and rate limits shared by the edges of a cluster (the ports of `edge.bus`).

One edge delivers a signal to its own clients directly and publishes it once; every other
edge that follows the channel delivers it to its clients. Channels: a room's (typing, followed
once a client of this edge subscribes to the room) and an instance's (presence, followed once a
user of the instance says hello here). Signals carry the publishing edge's id, so an edge skips
its own. Presence across edges: a user goes offline only when their last session on ANY edge
ends (the session registry answers), and comes online only when their first one starts.
Every `SWEEP_S` an edge stops following the channels of rooms none of its clients subscribes to
and of instances none of its users is connected to, but for those followed again since the
sweep before (a subscribe between its follow and its hub): at most `_MAX_FOLLOWED` are followed
at once, and unused ones would crowd out new ones. A hello or subscribe that takes longer than
`SWEEP_S` between its follow and its connection or hub may find the channel unfollowed: the
next subscribe to the room, or hello of the instance, follows it again.

Ephemeral by design (DESIGN §3): a signal the bus drops is lost; nothing here is persisted.
Presence is state, though: an edge killed with kill -9 (or a dropped "offline") says nothing,
so every `SWEEP_S` each edge asks the session registry about the users other edges said were
online, and delivers "offline" for those without a live session left (their sessions lapse
within the registry's ttl). At most `_MAX_SHOWN` such users per edge are swept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson
import trio

from edge.bus import MAX_LOCATE_USERS, PubSub, SessionRegistry, room_channel
from node.errors import GB6Error
from node.log import log
from node.ratelimit import RateLimiter

_MAX_FOLLOWED: Final = 10_000  # channels per edge; past it, signals of new ones stay local
SWEEP_S: Final = 10.0
_MAX_SHOWN: Final = 100_000
_UNFOLLOW_CHUNK: Final = 1000  # channels per unsubscribe command


def instance_channel(instance: str) -> str:
    return "instance:" + instance


class SharedSignals:
    """A component: `await nursery.start(shared.run)`. The gateway sets `on_typing` and
    `on_presence`, which are called (synchronously) for other edges' signals."""

    def __init__(
        self,
        pubsub: PubSub,
        sessions: SessionRegistry,
        edge_id: str,
        limiters: dict[str, RateLimiter] | None = None,
    ) -> None:
        self.pubsub = pubsub
        self.sessions = sessions
        self.edge_id = edge_id
        self.limiters = limiters  # per plan, shared by every edge (None: each edge its own)
        self.on_typing: Callable[[str, str], None] = lambda room, user: None
        self.on_presence: Callable[[str, str], None] = lambda user, status: None
        # The rooms and instances this edge's clients need signals of (set by the gateway).
        self.rooms_in_use: Callable[[], Iterable[str]] = tuple
        self.instances_in_use: Callable[[], Iterable[str]] = tuple
        self._followed: set[str] = set()
        self._touched: set[str] = set()  # followed channels asked for since the last sweep
        self._changing = trio.Lock()  # one follow or unfollow at a time: they keep their order
        # Users other edges said were online or away, as this edge's clients were told, each
        # with the number of the signal that said it last (a sweep's answer predating a newer
        # signal is not used).
        self._shown: dict[str, int] = {}
        self._signals = 0

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
                        self._on_presence(str(msg["user"]), str(msg["status"]))
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    log("shared_signal_bad", channel=signal.channel, error=repr(exc))

    def _on_presence(self, user: str, status: str) -> None:
        if status == "offline":
            self._shown.pop(user, None)
        else:
            self.recheck(user)
        self.on_presence(user, status)

    def recheck(self, user: str) -> None:
        """Have the sweeps deliver "offline" for `user` once no live session of theirs is left
        (shown online by another edge, or their last session here closed while the registry
        did not answer)."""
        self._signals += 1
        if user in self._shown or len(self._shown) < _MAX_SHOWN:
            self._shown[user] = self._signals

    async def _sweep_forever(self) -> None:
        while True:
            await trio.sleep(SWEEP_S)
            try:
                await self.sweep()
            except GB6Error as exc:  # the next sweep asks again
                log("presence_sweep_failed", error=exc.message)
            try:
                await self.unfollow_unused()
            except GB6Error as exc:  # a later follow subscribes again
                log("shared_unfollow_failed", error=exc.message)

    async def sweep(self) -> None:
        """Deliver "offline" for the users shown online whose sessions are all gone."""
        users = list(self._shown.items())
        for i in range(0, len(users), MAX_LOCATE_USERS):
            chunk = users[i : i + MAX_LOCATE_USERS]
            live = await self.sessions.locate([user for user, _ in chunk])
            for user, said in chunk:
                if user not in live and self._shown.get(user) == said:
                    self._on_presence(user, "offline")

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
            for i in range(0, len(gone), _UNFOLLOW_CHUNK):
                try:
                    await self.pubsub.unsubscribe(gone[i : i + _UNFOLLOW_CHUNK])
                except BaseException:
                    # Those after this chunk are still followed: the next sweep tries them.
                    self._followed.update(gone[i + _UNFOLLOW_CHUNK :])
                    raise

    async def _follow(self, channel: str) -> None:
        if channel in self._followed:
            self._touched.add(channel)
            return
        async with self._changing:  # after an unfollow of it under way, not before
            if channel in self._followed or len(self._followed) >= _MAX_FOLLOWED:
                return
            self._followed.add(channel)
            try:
                await self.pubsub.subscribe([channel])
            except GB6Error as exc:  # signals of this channel stay on this edge until it works
                self._followed.discard(channel)
                log("shared_follow_failed", channel=channel, error=exc.message)
                return
            except BaseException:  # cancelled (the caller's bound): tried again next time
                self._followed.discard(channel)
                raise
            self._touched.add(channel)

    async def follow_room(self, room: str) -> None:
        await self._follow(room_channel(room))

    async def follow_instance(self, instance: str) -> None:
        await self._follow(instance_channel(instance))

    def typing(self, room: str, user: str) -> None:
        data = {"edge": self.edge_id, "kind": "typing", "room": room, "user": user}
        self.pubsub.publish(room_channel(room), orjson.dumps(data))

    def presence(self, instance: str, user: str, status: str) -> None:
        if status == "offline":  # said here: the sweep must not say it again
            self._shown.pop(user, None)
        data = {"edge": self.edge_id, "kind": "presence", "user": user, "status": status}
        self.pubsub.publish(instance_channel(instance), orjson.dumps(data))

    async def session_opened(self, user: str, session: str) -> str | None:
        """Record the session; the user's presence across the edges before it (`online`,
        `away`, or None: no live session)."""
        before = (await self.sessions.presence([user])).get(user)
        await self.sessions.add(user, session)
        return before

    async def session_closed(self, user: str, session: str) -> str | None:
        """Forget the session; the user's presence across the edges after it."""
        await self.sessions.remove(user, session)
        return (await self.sessions.presence([user])).get(user)

    async def status(self, user: str) -> str | None:
        """The user's presence across the edges (None: no live session)."""
        return (await self.sessions.presence([user])).get(user)
