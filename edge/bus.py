"""Ports that let edges share what a user does across them, and the in-process adapters.

Three ports, each a `typing.Protocol`, each with an in-process adapter here (what `gb6 run`
uses: one process, so "shared" means shared objects) and a Redis adapter in `edge.redis_bus`
(what a cluster of edges uses). The contract tests run the same suite against both.

- `RateLimiter` (defined in `node.ratelimit`): GCRA per key, `check(key)` → 0.0 if allowed,
  else the seconds to wait. Every limiter built on the same store shares each key's budget.
- `SessionRegistry`: which edge holds which sessions of a user. Each registry belongs to one
  edge and, while its `run()` serves, heartbeats that edge. A session is live while its edge
  heartbeats: when an edge stops (killed, partitioned, or `run()` cancelled) its sessions
  vanish for everyone within `ttl` seconds without anybody removing them. Each `run()` is a
  new incarnation of its edge, so a restarted edge never revives the sessions of its
  predecessor. Graceful shutdown removes sessions as their connections close. It also holds
  which edges have a user away, so any edge answers `presence.get` with `away`.
  It also decides each user's presence across the edges (`Presence`): every call that adds or
  removes a session or sets away computes, in the same atomic step, the user's status over
  every live edge, compares it with the status last announced for the user, and if they
  differ records the new one with a newer version and says so (`changed`: its caller announces
  it). So two edges racing (a reconnect on one while the other times out the old socket) can
  never both decide "offline". A status whose sessions lapsed with their edge is corrected by
  `settle`, and every recorded change also goes into its instance's change feed (`changes`),
  kept `FEED_KEEP_S`, from which an edge repairs the announcements it missed. A reader that
  did not read for longer than that is told it may have missed changes (`FeedRead.missed`).
- `PubSub`: ephemeral signals (presence, typing) on named channels (`room_channel`,
  `user_channel`) between edges, never persisted. `publish` never blocks: it hands the signal
  on or drops it. Each subscriber has one bounded inbox; when the inbox is full, signals for it
  are dropped and counted (`statistics().dropped`): a slow subscriber loses ephemeral signals
  rather than growing memory or holding up the publisher. Delivery goes to every subscriber of
  the channel, the publisher's own included. Once `subscribe` returns, signals published after
  it are delivered; once `unsubscribe` returns, `receive` yields nothing more of that channel.

Limits: ids and channel names are 1..200 characters without control characters; a signal is at
most `MAX_SIGNAL_BYTES`; a subscriber follows at most `max_channels` channels; a user has at
most `max_sessions_per_user` live sessions. Bad input raises `GB6Error` (`invalid`,
`too_large`, `quota_exceeded`); using a component before its `run()` serves raises
`unavailable`.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Collection, Iterable, Mapping
from typing import Protocol

import attrs
import trio

from node.errors import QUOTA_EXCEEDED, TOO_LARGE, UNAVAILABLE, GB6Error, invalid
from node.ratelimit import Gcra, RateLimiter

__all__ = [
    "MAX_NAME_LEN",
    "MAX_SIGNAL_BYTES",
    "FeedRead",
    "Inbox",
    "LocalBroker",
    "LocalPubSub",
    "LocalRateLimiter",
    "LocalSessions",
    "Presence",
    "PubSub",
    "PubSubStatistics",
    "RateLimiter",
    "SessionRegistry",
    "SessionTable",
    "Signal",
    "check_name",
    "room_channel",
    "user_channel",
]

MAX_NAME_LEN = 200
MAX_SIGNAL_BYTES = 64 * 1024
MAX_LOCATE_USERS = 1_000
FEED_KEEP_S = 60.0  # an instance's presence changes are kept this long for edges to catch up
MAX_FEED_READ = 1_000  # changes per instance per `changes` call
STATUSES = ("offline", "online", "away")  # a `Presence.status`, by its code in the stores

_CONTROL = {chr(c) for c in range(32)} | {"\x7f"}


def check_name(kind: str, value: object, max_len: int = MAX_NAME_LEN) -> str:
    """`value` if it is a usable id or channel name, else GB6Error(invalid) naming `kind`."""
    if not isinstance(value, str) or not value:
        raise invalid(f"{kind} must be a non-empty string")
    if len(value) > max_len:
        raise invalid(f"{kind} is longer than {max_len} characters")
    if not _CONTROL.isdisjoint(value):
        raise invalid(f"{kind} contains control characters")
    return value


def check_edge(edge: object) -> str:
    name = check_name("edge", edge, 64)
    if "~" in name:  # separates the edge's name from its incarnation
        raise invalid("edge must not contain '~'")
    return name


def new_incarnation(edge: str) -> str:
    return f"{edge}~{secrets.token_hex(6)}"


def edge_of(incarnation: str) -> str:
    return incarnation.rpartition("~")[0]


def room_channel(room: str) -> str:
    return "room:" + room


def user_channel(user: str) -> str:
    return "user:" + user


# --- rate limits -----------------------------------------------------------------------------


class LocalRateLimiter:
    """`RateLimiter` over an in-process `Gcra`, on Trio's clock.

    Limiters built on the same `Gcra` share each key's budget (one process: every "edge" in it
    holds the same object). Needs no `run()`.
    """

    def __init__(self, gcra: Gcra) -> None:
        self.gcra = gcra

    @classmethod
    def new(cls, rate: float, burst: int) -> LocalRateLimiter:
        return cls(Gcra(rate, burst))

    async def check(self, key: str) -> float:
        check_name("rate limit key", key)
        return self.gcra.check(key, trio.current_time())


# --- sessions --------------------------------------------------------------------------------


@attrs.frozen
class Presence:
    """A user's presence across the edges, as the registry last decided it.

    `version` orders one user's statuses: a larger one is newer, whichever edge decided it (0:
    never decided, offline). `changed`: the call that returned it decided it, so its caller
    announces it."""

    user: str
    status: str  # "online" | "away" | "offline"
    version: int
    changed: bool = False


@attrs.frozen
class FeedRead:
    """One read of an instance's change feed (`SessionRegistry.changes`).

    `position`: where to read from next; every change decided after the read has a version at
    or above it. `missed`: the position read from was older than what the feed keeps, so
    changes may be gone from it; `changed` is then empty, and the reader learns its users'
    presence otherwise (their statuses as of the read are no older than `position`)."""

    position: int
    changed: tuple[Presence, ...] = ()
    missed: bool = False


class SessionRegistry(Protocol):
    """Which edge holds which sessions of a user; one registry per edge (see module doc)."""

    edge: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Heartbeat this edge until cancelled; `started()` once its sessions can be added."""
        ...

    async def add(self, user: str, session: str, instance: str, *, away: bool = False) -> Presence:
        """Record that this edge holds `session` of `user`, a user of `instance` (idempotent),
        and whether this edge has the user away (its own word, as of the call: the close of
        their last other session here may still be on its way). Returns the user's presence
        after it. Raises GB6Error: `quota_exceeded` past the per-user limit, `invalid`,
        `unavailable`. A session whose add failed otherwise, or was cancelled, is held all the
        same: the registry writes it once its store answers, until removed."""
        ...

    async def remove(self, user: str, session: str) -> Presence:
        """Forget `session` if this edge holds it (idempotent); the user's presence after it."""
        ...

    async def locate(self, users: Collection[str]) -> dict[str, dict[str, str]]:
        """For each online user among `users` (at most 1,000): session → edge name."""
        ...

    async def edges_of(self, user: str) -> frozenset[str]:
        """The edges holding at least one live session of `user`."""
        ...

    async def set_away(self, user: str, away: bool) -> Presence:
        """Record whether `user` is away on this edge (said by `presence.set`); forgotten once
        their last session here is removed, or this edge's sessions lapse. The user's presence
        after it."""
        ...

    async def settle(self, users: Mapping[str, str]) -> list[Presence]:
        """The presence of each of `users` (user → their instance; at most 1,000), corrected
        first where it no longer matches their live sessions (`changed`: their sessions lapsed
        with their edge, say). A user with no status recorded gets one (`offline` if no live
        session): the caller shows them with some status, which it may have from before the
        store lost it. Never `offline` for a user this edge holds a session of: the store lost
        it, and this edge's heartbeat writes it again."""
        ...

    async def changes(self, since: Mapping[str, int | None]) -> dict[str, FeedRead]:
        """For each instance in `since` (at most 1,000): the users whose presence changed at or
        after that position of its change feed, at most `MAX_FEED_READ`, with their presence
        now, and the position to ask from next time (the last change's when the page is full:
        it is read again, since another may share it). `None`: only the position."""
        ...

    async def presence(self, users: Collection[str]) -> dict[str, str]:
        """For each online user among `users` (at most 1,000): `away` if every edge holding a
        live session of theirs has them away, else `online`."""
        ...


def check_users(users: Collection[str]) -> list[str]:
    if isinstance(users, str):
        raise invalid("users must be a collection of user ids, not one string")
    if len(users) > MAX_LOCATE_USERS:
        raise invalid(f"at most {MAX_LOCATE_USERS} users per lookup")
    return list(dict.fromkeys(check_name("user", u) for u in users))


def check_instances(since: Mapping[str, int | None]) -> list[str]:
    if len(since) > MAX_LOCATE_USERS:
        raise invalid(f"at most {MAX_LOCATE_USERS} instances per call")
    for instance, start in since.items():
        check_name("instance", instance)
        if start is not None and (not isinstance(start, int) or start < 0):
            raise invalid("a feed position is an integer >= 0")
    return list(since)


@attrs.define(eq=False)
class SessionTable:
    """The in-process session directory that every `LocalSessions` of a process shares.

    `edges` maps an edge incarnation to the Trio time its heartbeat lapses; `users` maps a user
    to session → incarnation. Entries of lapsed incarnations are dropped as they are met.
    """

    edges: dict[str, float] = attrs.Factory(dict)
    users: dict[str, dict[str, str]] = attrs.Factory(dict)
    away: dict[str, set[str]] = attrs.Factory(dict)  # user → incarnations that have them away
    # user → (status, version, instance) last decided; instance → user → (version, time) of
    # the changes of the last `FEED_KEEP_S`, oldest first.
    said: dict[str, tuple[str, int, str]] = attrs.Factory(dict)
    feed: dict[str, dict[str, tuple[int, float]]] = attrs.Factory(dict)
    cut: dict[str, int] = attrs.Factory(dict)  # instance → newest version dropped from its feed
    versions: int = 0

    def alive(self, incarnation: str, now: float) -> bool:
        if self.edges.get(incarnation, -math.inf) > now:
            return True
        self.edges.pop(incarnation, None)
        return False

    def live_sessions(self, user: str, now: float) -> dict[str, str]:
        """session → incarnation for `user`, without (and dropping) the lapsed ones."""
        sessions = self.users.get(user)
        if not sessions:
            return {}
        dead = [s for s, inc in sessions.items() if not self.alive(inc, now)]
        for s in dead:
            del sessions[s]
        if not sessions:
            del self.users[user]
        return sessions

    def status_of(self, user: str, now: float) -> str:
        incarnations = set(self.live_sessions(user, now).values())
        if not incarnations:
            return "offline"
        return "away" if incarnations <= self.away.get(user, set()) else "online"

    def decide(
        self, user: str, now: float, instance: str = "", *, force: bool = False, here: bool = False
    ) -> Presence:
        """The user's presence now, recorded (with a newer version, and in the instance's
        feed) if it differs from the one last decided, or if none was and `force`; never
        "offline" for a user `here` (see `SessionRegistry.settle`)."""
        status = self.status_of(user, now)
        said = self.said.get(user)
        if here and status == "offline":
            return self.presence_of(user)
        instance = instance or (said[2] if said is not None else "")
        if said is not None and said[0] == status:
            self.said[user] = (status, said[1], instance)
            return Presence(user, status, said[1])
        if said is None and status == "offline" and not force:
            return Presence(user, status, 0)
        self.versions += 1
        self.said[user] = (status, self.versions, instance)
        if instance:
            feed = self.feed.setdefault(instance, {})
            feed.pop(user, None)  # to the end: the feed stays in order of time
            feed[user] = (self.versions, now)
            while feed and next(iter(feed.values()))[1] < now - FEED_KEEP_S:
                self.cut[instance] = feed.pop(next(iter(feed)))[0]
        return Presence(user, status, self.versions, changed=True)

    def presence_of(self, user: str) -> Presence:
        said = self.said.get(user)
        return Presence(user, "offline", 0) if said is None else Presence(user, said[0], said[1])


class LocalSessions:
    """`SessionRegistry` on a shared in-process `SessionTable`, heartbeating on Trio's clock."""

    def __init__(
        self,
        table: SessionTable,
        edge: str,
        *,
        ttl: float = 15.0,
        max_sessions_per_user: int = 64,
    ) -> None:
        if not ttl > 0 or max_sessions_per_user < 1:
            raise ValueError("ttl must be > 0 and max_sessions_per_user >= 1")
        self.table = table
        self.edge = check_edge(edge)
        self.ttl = ttl
        self.max_sessions_per_user = max_sessions_per_user
        self._incarnation: str | None = None
        # As the Redis adapter counts them: the sessions this edge holds, the users it has away.
        self._held: dict[str, set[str]] = {}
        self._away: set[str] = set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        incarnation = new_incarnation(self.edge)
        self._held, self._away = {}, set()
        self.table.edges[incarnation] = trio.current_time() + self.ttl
        self._incarnation = incarnation
        try:
            task_status.started()
            while True:
                await trio.sleep(self.ttl / 3)
                self.table.edges[incarnation] = trio.current_time() + self.ttl
        finally:
            # Stop heartbeating, keep the entries: they lapse after `ttl`, as a killed edge's do.
            self._incarnation = None

    def _serving(self) -> str:
        if self._incarnation is None:
            raise GB6Error(UNAVAILABLE, "session registry is not running")
        return self._incarnation

    async def add(self, user: str, session: str, instance: str, *, away: bool = False) -> Presence:
        check_name("user", user)
        check_name("session", session)
        check_name("instance", instance)
        incarnation = self._serving()
        now = trio.current_time()
        sessions = self.table.live_sessions(user, now)
        if session not in sessions and len(sessions) >= self.max_sessions_per_user:
            raise GB6Error(
                QUOTA_EXCEEDED,
                f"too many sessions for one user (limit {self.max_sessions_per_user})",
            )
        self.table.users.setdefault(user, sessions)[session] = incarnation
        self._held.setdefault(user, set()).add(session)
        if away:
            self._away.add(user)
        else:
            self._away.discard(user)
        self._set_away(user, incarnation, away)
        decided = self.table.decide(user, now, instance)
        await trio.lowlevel.checkpoint()  # recorded, even if cancelled here
        return decided

    async def remove(self, user: str, session: str) -> Presence:
        check_name("user", user)
        check_name("session", session)
        incarnation = self._serving()
        await trio.lowlevel.checkpoint()
        held = self._held.get(user, set())
        held.discard(session)
        if not held:
            self._held.pop(user, None)
            self._away.discard(user)
        sessions = self.table.users.get(user)
        if sessions is not None and sessions.get(session) == incarnation:
            del sessions[session]
            if not sessions:
                del self.table.users[user]
        if not held or sessions is None or incarnation not in sessions.values():  # none here
            self._set_away(user, incarnation, False)
        return self.table.decide(user, trio.current_time())

    def _set_away(self, user: str, incarnation: str, away: bool) -> None:
        edges = self.table.away.setdefault(user, set())
        if away:
            edges.add(incarnation)
        else:
            edges.discard(incarnation)
            if not edges:
                del self.table.away[user]

    async def set_away(self, user: str, away: bool) -> Presence:
        check_name("user", user)
        incarnation = self._serving()
        if away:
            self._away.add(user)
        else:
            self._away.discard(user)
        await trio.lowlevel.checkpoint()
        self._set_away(user, incarnation, away)
        return self.table.decide(user, trio.current_time())

    async def settle(self, users: Mapping[str, str]) -> list[Presence]:
        wanted = check_users(users)
        for instance in users.values():
            check_name("instance", instance)
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        return [
            self.table.decide(u, now, users[u], force=True, here=u in self._held) for u in wanted
        ]

    async def changes(self, since: Mapping[str, int | None]) -> dict[str, FeedRead]:
        wanted = check_instances(since)
        await trio.lowlevel.checkpoint()
        out: dict[str, FeedRead] = {}
        following = self.table.versions + 1  # the next change's version
        for instance in wanted:
            start = since[instance]
            if start is None:
                out[instance] = FeedRead(following)
                continue
            if start <= self.table.cut.get(instance, 0):
                out[instance] = FeedRead(following, missed=True)
                continue
            feed = self.table.feed.get(instance, {})
            page = sorted((v, u) for u, (v, _) in feed.items() if v >= start)[:MAX_FEED_READ]
            got = tuple(self.table.presence_of(u) for _, u in page)
            position = page[-1][0] if len(page) >= MAX_FEED_READ else following
            out[instance] = FeedRead(position, got)
        return out

    async def presence(self, users: Collection[str]) -> dict[str, str]:
        wanted = check_users(users)
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        found: dict[str, str] = {}
        for user in wanted:
            status = self.table.status_of(user, now)
            if status != "offline":
                found[user] = status
        return found

    async def locate(self, users: Collection[str]) -> dict[str, dict[str, str]]:
        wanted = check_users(users)
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        found: dict[str, dict[str, str]] = {}
        for user in wanted:
            sessions = self.table.live_sessions(user, now)
            if sessions:
                found[user] = {s: edge_of(inc) for s, inc in sessions.items()}
        return found

    async def edges_of(self, user: str) -> frozenset[str]:
        return frozenset((await self.locate([user])).get(user, {}).values())


# --- ephemeral pub/sub -----------------------------------------------------------------------


@attrs.frozen
class Signal:
    """One ephemeral message: opaque bytes on a named channel."""

    channel: str
    data: bytes


@attrs.frozen
class PubSubStatistics:
    channels: int  # channels this subscriber follows
    buffered: int  # signals waiting in the inbox
    max_buffer: int
    accepted: int  # signals put into the inbox
    dropped: int  # signals lost because the inbox was full
    published: int  # signals this publisher handed on
    publish_dropped: int  # signals lost because the publisher's own queue was full


class PubSub(Protocol):
    """Ephemeral signals between edges (see module doc): one publisher and one subscriber."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `started()` once publish and subscribe work."""
        ...

    def publish(self, channel: str, data: bytes) -> bool:
        """Hand `data` on to every subscriber of `channel`; never blocks. False if dropped."""
        ...

    async def subscribe(self, channels: Iterable[str]) -> None:
        """Follow `channels` too; returns once signals published from now on are delivered."""
        ...

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        """Stop following `channels`; `receive` yields none of theirs from now on."""
        ...

    async def receive(self) -> Signal:
        """The next signal of a followed channel, in publication order per publisher."""
        ...

    def statistics(self) -> PubSubStatistics: ...


def check_signal(channel: str, data: bytes) -> None:
    check_name("channel", channel)
    if not isinstance(data, bytes):
        raise invalid("signal data must be bytes")
    if len(data) > MAX_SIGNAL_BYTES:
        raise GB6Error(TOO_LARGE, f"signal larger than {MAX_SIGNAL_BYTES} bytes")


def check_channels(channels: Iterable[str]) -> list[str]:
    if isinstance(channels, str):
        raise invalid("channels must be a collection of channel names, not one string")
    return list(dict.fromkeys(check_name("channel", c) for c in channels))


class Inbox:
    """One subscriber's bounded buffer and the set of channels it follows.

    `offer` never blocks: a signal that does not fit is dropped and counted. `receive` skips
    signals of channels unfollowed since they were buffered.
    """

    def __init__(self, size: int, max_channels: int) -> None:
        if size < 1 or max_channels < 1:
            raise ValueError("inbox size and max_channels must be >= 1")
        self.size = size
        self.max_channels = max_channels
        self.channels: set[str] = set()
        self.accepted = 0
        self.dropped = 0
        self._send, self._recv = trio.open_memory_channel[Signal](size)

    def check_room_for(self, new: Collection[str]) -> None:
        if len(self.channels) + len(new) > self.max_channels:
            raise GB6Error(TOO_LARGE, f"a subscriber follows at most {self.max_channels} channels")

    def offer(self, signal: Signal) -> bool:
        if signal.channel not in self.channels:
            return False
        try:
            self._send.send_nowait(signal)
        except trio.WouldBlock:
            self.dropped += 1
            return False
        self.accepted += 1
        return True

    async def receive(self) -> Signal:
        while True:
            signal = await self._recv.receive()
            if signal.channel in self.channels:
                return signal

    def statistics(self, published: int, publish_dropped: int) -> PubSubStatistics:
        return PubSubStatistics(
            channels=len(self.channels),
            buffered=self._recv.statistics().current_buffer_used,
            max_buffer=self.size,
            accepted=self.accepted,
            dropped=self.dropped,
            published=published,
            publish_dropped=publish_dropped,
        )


class LocalBroker:
    """In-process fan-out between the `LocalPubSub`s of a process (one per "edge")."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[Inbox]] = {}

    def publish(self, signal: Signal) -> None:
        for inbox in self.subscribers.get(signal.channel, ()):
            inbox.offer(signal)

    def follow(self, inbox: Inbox, channels: Iterable[str]) -> None:
        for channel in channels:
            self.subscribers.setdefault(channel, set()).add(inbox)

    def unfollow(self, inbox: Inbox, channels: Iterable[str]) -> None:
        for channel in channels:
            inboxes = self.subscribers.get(channel)
            if inboxes is not None:
                inboxes.discard(inbox)
                if not inboxes:
                    del self.subscribers[channel]


class LocalPubSub:
    """`PubSub` over a shared in-process `LocalBroker`; publishing fans out synchronously."""

    def __init__(
        self, broker: LocalBroker, *, inbox_size: int = 1024, max_channels: int = 10_000
    ) -> None:
        self.broker = broker
        self.inbox = Inbox(inbox_size, max_channels)
        self.published = 0
        self._running = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._running = False
            self.broker.unfollow(self.inbox, self.inbox.channels)
            self.inbox.channels.clear()

    def _serving(self) -> None:
        if not self._running:
            raise GB6Error(UNAVAILABLE, "pub/sub is not running")

    def publish(self, channel: str, data: bytes) -> bool:
        check_signal(channel, data)
        self._serving()
        self.broker.publish(Signal(channel, data))
        self.published += 1
        return True

    async def subscribe(self, channels: Iterable[str]) -> None:
        names = check_channels(channels)
        self._serving()
        await trio.lowlevel.checkpoint()
        new = [c for c in names if c not in self.inbox.channels]
        self.inbox.check_room_for(new)
        self.inbox.channels.update(new)
        self.broker.follow(self.inbox, new)

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        names = check_channels(channels)
        self._serving()
        await trio.lowlevel.checkpoint()
        gone = [c for c in names if c in self.inbox.channels]
        self.inbox.channels.difference_update(gone)
        self.broker.unfollow(self.inbox, gone)

    async def receive(self) -> Signal:
        return await self.inbox.receive()

    def statistics(self) -> PubSubStatistics:
        return self.inbox.statistics(self.published, 0)
