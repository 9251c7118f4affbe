"""Typing, presence and rate limits shared by the edges of a cluster (the ports of `edge.bus`).

One edge delivers a signal to its own clients directly and publishes it once; every other
edge that follows the channel delivers it to its clients. Channels: a room's (typing, followed
once a client of this edge subscribes to the room) and an instance's (presence, followed once a
user of the instance says hello here). Signals carry the publishing edge's id, so an edge skips
its own. Presence across edges: a user goes offline only when their last session on ANY edge
ends (the session registry answers), and comes online only when their first one starts.

Ephemeral by design (DESIGN §3): a signal the bus drops is lost; nothing here is persisted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import orjson
import trio

from edge.bus import PubSub, SessionRegistry, room_channel
from node.errors import GB6Error
from node.log import log
from node.ratelimit import RateLimiter

_MAX_FOLLOWED: Final = 10_000  # channels per edge; past it, signals of new ones stay local


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
        self._followed: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
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
                    self.on_presence(str(msg["user"]), str(msg["status"]))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                log("shared_signal_bad", channel=signal.channel, error=repr(exc))

    async def _follow(self, channel: str) -> None:
        if channel in self._followed or len(self._followed) >= _MAX_FOLLOWED:
            return
        self._followed.add(channel)
        try:
            await self.pubsub.subscribe([channel])
        except GB6Error as exc:  # signals of this channel stay on this edge until it works
            self._followed.discard(channel)
            log("shared_follow_failed", channel=channel, error=exc.message)

    async def follow_room(self, room: str) -> None:
        await self._follow(room_channel(room))

    async def follow_instance(self, instance: str) -> None:
        await self._follow(instance_channel(instance))

    def typing(self, room: str, user: str) -> None:
        data = {"edge": self.edge_id, "kind": "typing", "room": room, "user": user}
        self.pubsub.publish(room_channel(room), orjson.dumps(data))

    def presence(self, instance: str, user: str, status: str) -> None:
        data = {"edge": self.edge_id, "kind": "presence", "user": user, "status": status}
        self.pubsub.publish(instance_channel(instance), orjson.dumps(data))

    async def session_opened(self, user: str, session: str) -> bool:
        """Record the session; True if it is the user's first live one on any edge."""
        first = not await self.sessions.online(user)
        await self.sessions.add(user, session)
        return first

    async def session_closed(self, user: str, session: str) -> bool:
        """Forget the session; True if the user has no live session left on any edge."""
        await self.sessions.remove(user, session)
        return not await self.sessions.online(user)
