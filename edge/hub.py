"""Fan-out on the edge: one hub per room with live subscribers and a window of recent frames.

Rules:
- A hub sees every event of its room, in seq order, from the moment it is created; `head` is the
  last seq it saw and `frames` holds the newest frames as contiguous seqs ending at `head`.
- A subscription is either *live* (it has everything up to `head`; new frames are written to it
  as they are published) or *catching up* (a task of its connection writes older frames, from
  the cache or the store, and joins `live` when it reaches `head`). The check and the join
  happen with no await between them, so no frame is missed or written twice.
- Each event is encoded once; a batch of events published together is joined into one blob, and
  each live subscriber gets that blob with a single write.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from edge import protocol, wsframe
from node.errors import UNAVAILABLE, GB6Error
from node.events import Event

if TYPE_CHECKING:
    from edge.outbox import Outbox


def encode_event(ev: Event) -> bytes:
    return wsframe.text(protocol.event(ev.type, ev.to_wire()))


@attrs.define(eq=False)
class Subscription:
    room: str
    user: str
    outbox: Outbox
    scope: trio.CancelScope | None = None  # the catch-up task's, while it runs
    live: bool = False


class RoomHub:
    def __init__(self, room: str, head: int, cache_size: int, cache_bytes: int) -> None:
        self.room = room
        self.head = head
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        # The frames of seqs head-len+1..head, and for each the seq it edits (0: not an edit).
        # Bytes and ints only: nothing here is tracked by the garbage collector, whose young
        # collections walked tens of thousands of cached event objects (50 ms pauses).
        self.frames: deque[bytes] = deque()
        self.edit_targets: deque[int] = deque()
        self.cache_used = 0  # frame bytes held
        self.live: dict[Subscription, None] = {}  # insertion-ordered set
        self.catching: set[Subscription] = set()
        self._advanced = trio.lowlevel.ParkingLot()  # tasks waiting for `head` to move

    @property
    def idle(self) -> bool:
        return not self.live and not self.catching

    def publish(self, events: list[Event]) -> bool:
        """Write new events (consecutive seqs after `head`) to every live subscriber. False if
        they skipped seqs: nothing is written to the live subscribers, which must catch up
        from the store (they would miss the skipped events), and the cache starts over."""
        frames = []
        contiguous = True
        for ev in events:
            if ev.seq <= self.head:
                continue  # already seen (a replayed batch)
            frame = encode_event(ev)
            frames.append(frame)
            if ev.seq != self.head + 1:  # the cache must stay contiguous
                contiguous = False
                self.skip_to(ev.seq - 1)
            self.frames.append(frame)
            self.edit_targets.append((ev.target or 0) if ev.type == "edit" else 0)
            self.cache_used += len(frame)
            self.head = ev.seq
            if ev.type == "delete" and ev.target is not None:
                self._redact_cached(ev.target)
        while self.frames and (
            len(self.frames) > self.cache_size or self.cache_used > self.cache_bytes
        ):
            self.cache_used -= len(self.frames.popleft())
            self.edit_targets.popleft()
        if self._advanced and frames:
            self._advanced.unpark_all()
        if not frames or not contiguous:
            return contiguous
        blob = frames[0] if len(frames) == 1 else b"".join(frames)
        for sub in self.live:
            sub.outbox.write(blob)
        return True

    def skip_to(self, head: int) -> None:
        """The room's head is `head`, and the seqs after this hub's are not here: the cache,
        which must stay contiguous, starts over at it."""
        self.frames.clear()
        self.edit_targets.clear()
        self.cache_used = 0
        self.head = head
        if self._advanced:
            self._advanced.unpark_all()

    async def wait_head(self, seq: int) -> None:
        """Return once this hub has seen `seq` (its owner bounds the wait)."""
        while self.head < seq:
            await self._advanced.park()

    def write_ephemeral(self, frame: bytes, skip_user: str | None = None) -> None:
        """Write an unsequenced frame (typing, receipt, membership) to every subscriber, those
        still catching up included: they subscribed, and such a frame has no later replay."""
        for sub in (*self.live, *self.catching):
            if sub.user != skip_user:
                sub.outbox.write(frame)

    def _redact_cached(self, target: int) -> None:
        first = self.head - len(self.frames) + 1
        for i, edit_target in enumerate(self.edit_targets):
            if first + i == target or edit_target == target:
                old = self.frames[i]
                frame = wsframe.text(protocol.redacted_event(wsframe.payload(old)))
                self.cache_used += len(frame) - len(old)
                self.frames[i] = frame

    def cached_after(self, after: int, max_bytes: int) -> tuple[bytes, int] | None:
        """Frames from seq `after+1` on, as many as fit in `max_bytes` (at least one), and the
        last seq they hold; None if the cache does not reach back to `after+1`."""
        if after >= self.head:
            return b"", self.head
        first = self.head - len(self.frames) + 1
        if not self.frames or first > after + 1:
            return None
        frames: list[bytes] = []
        size = 0
        last = after
        for i in range(after + 1 - first, len(self.frames)):
            frame = self.frames[i]
            if frames and size + len(frame) > max_bytes:
                break
            frames.append(frame)
            size += len(frame)
            last = first + i
        return b"".join(frames), last

    def remove(self, sub: Subscription) -> None:
        self.live.pop(sub, None)
        self.catching.discard(sub)
        if sub.scope is not None:
            sub.scope.cancel()


CATCH_UP_RETRY_S = 10.0  # a catch-up asks a store answering `unavailable` again, this long in a row
_RETRY_PAUSE_S = 0.1
_RETRY_PAUSE_MAX_S = 2.0

EventsAfter = Callable[[str, int, int], Any]  # async (room, after, limit) -> list[Event]


@attrs.define(eq=False)
class _SharedRead:
    """A store read that subscribers catching up from the same seq wait on together."""

    done: trio.Event = attrs.Factory(trio.Event)
    events: list[Event] | None = None
    error: GB6Error | None = None


class Hubs:
    """The edge's hubs, by room. Idle hubs stay (with their cache) up to `idle_max`, LRU."""

    def __init__(self, cache_size: int, cache_bytes: int, idle_max: int) -> None:
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.idle_max = idle_max
        self.hubs: dict[str, RoomHub] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        self.on_evict: Callable[[str], None] = lambda room: None  # a hub was forgotten
        self.gaps = 0  # times a room's events skipped seqs here (for metrics)
        # A hub's events skipped seqs: (room, the seq its live subscribers have everything up
        # to, those subscribers), now catching up again; their owner starts each one's task.
        self.on_gap: Callable[[str, int, list[Subscription]], None] = lambda room, head, subs: None
        self._reads: dict[tuple[str, int, int], _SharedRead] = {}  # (room, after, limit)
        # Room → its watches under way: its idle hub is not evicted meanwhile (the unwatch
        # would reach the origin before the watch's answer reaches us, and that answer would
        # leave a hub no watch is behind).
        self._watches: dict[str, int] = {}

    @contextmanager
    def watching(self, room: str) -> Iterator[None]:
        """A watch of `room` under way (its owner settles the hub after, see `settle`)."""
        self._watches[room] = self._watches.get(room, 0) + 1
        try:
            yield
        finally:
            left = self._watches[room] - 1
            if left:
                self._watches[room] = left
            else:
                del self._watches[room]

    async def _read(self, room: str, after: int, limit: int, events_after: EventsAfter) -> Any:
        """`events_after(room, after, limit)`, once for every catch-up that asks it while it
        runs: after a gap every live subscriber of the room asks the same."""
        key = (room, after, limit)
        while True:
            read = self._reads.get(key)
            if read is None:
                read = self._reads[key] = _SharedRead()
                try:
                    read.events = await events_after(room, after, limit)
                    return read.events
                except GB6Error as exc:
                    read.error = exc
                    raise
                finally:
                    del self._reads[key]
                    read.done.set()
            await read.done.wait()
            if read.events is not None:
                return read.events
            if read.error is not None:
                raise GB6Error(read.error.code, read.error.message)
            # The task that read was cancelled (its subscriber gone): read again.

    def get(self, room: str) -> RoomHub | None:
        return self.hubs.get(room)

    def ensure(self, room: str, head: int) -> RoomHub:
        hub = self.hubs.get(room)
        if hub is None:
            hub = self.hubs[room] = RoomHub(room, head, self.cache_size, self.cache_bytes)
        self._idle.pop(room, None)
        return hub

    def watched(self, room: str, head: int) -> None:
        """The origin pushes `room`'s events from `head` on (a watch's answer). A new hub
        starts idle: the subscribe that asked takes it (`ensure`), and if that subscribe went
        meanwhile (its client closed), the hub is evicted in time, and unwatched. A hub kept
        through a lost link and watched again may be behind `head`: that is a gap."""
        hub = self.hubs.get(room)
        if hub is None:
            self.hubs[room] = RoomHub(room, head, self.cache_size, self.cache_bytes)
            self._idle[room] = None
        elif head > hub.head:
            had = hub.head
            hub.skip_to(head)
            self._gap(room, hub, had)

    def drop(self, room: str) -> None:
        """Forget a room's hub (its origin link broke: the cache may miss events)."""
        hub = self.hubs.pop(room, None)
        self._idle.pop(room, None)
        if hub is not None:
            for sub in [*hub.live, *hub.catching]:
                hub.remove(sub)

    def publish(self, room: str, events: list[Event]) -> None:
        hub = self.hubs.get(room)
        if hub is None:
            return
        had = hub.head
        if not hub.publish(events):
            self._gap(room, hub, had)

    def _gap(self, room: str, hub: RoomHub, had: int) -> None:
        """The hub's seqs skipped from `had`. The skipped ones are in the store (a commit whose
        answer was lost, a lost push, a lost link): the live subscribers, who have everything
        up to `had`, read them there and join again, instead of their clients reconnecting to
        do the same."""
        self.gaps += 1
        behind = list(hub.live)
        hub.live.clear()
        for sub in behind:
            sub.live = False
            sub.scope = trio.CancelScope()  # `remove` cancels the new catch-up
            hub.catching.add(sub)
        self.on_gap(room, had, behind)

    def release(self, sub: Subscription) -> None:
        hub = self.hubs.get(sub.room)
        if hub is None:
            return
        hub.remove(sub)
        if hub.idle:
            self._idle[sub.room] = None
            self._evict()

    def settle(self, room: str) -> None:
        """A hub no subscription took (its subscribe failed) joins the idle ones."""
        hub = self.hubs.get(room)
        if hub is not None and hub.idle:
            self._idle[room] = None
            self._evict()

    def _evict(self) -> None:
        while len(self._idle) > self.idle_max:
            gone = next(iter(self._idle))  # the least recent
            if gone in self._watches:
                return  # its watch's owner settles it once answered (`settle`)
            del self._idle[gone]
            self.hubs.pop(gone, None)
            self.on_evict(gone)

    async def catch_up(
        self,
        sub: Subscription,
        after: int,
        events_after: EventsAfter,
        chunk: int,
        high_water: int,
        keep_asking: Callable[[], bool] = lambda: False,
    ) -> None:
        """Bring `sub` from `after` to the hub's head, then make it live. Runs as a task of the
        subscriber's connection; cancelled by `release` or a new subscribe. A store answering
        `unavailable` is asked again for `CATCH_UP_RETRY_S`, and for as long as `keep_asking()`
        says (a connection whose meeting the close would end)."""
        hub = self.hubs.get(sub.room)
        delivered = after
        give_up: float | None = None  # while the store answers `unavailable` in a row
        pause = _RETRY_PAUSE_S

        def released() -> bool:
            # `release` cancels this task, but a task already woken from an await goes on to
            # its next checkpoint: asked after each await, before any write or join.
            return hub is None or sub not in hub.catching

        while not released():
            assert hub is not None
            # A connection resuming many rooms runs a catch-up per room on one outbox: each
            # waits for room below `high_water` and writes at most what fits under it, so that
            # together they never pass the outbox's bound (which closes the client with 4008).
            await sub.outbox.wait_below(high_water)
            if released():
                return
            space = max(1, high_water - sub.outbox.queued_bytes)
            cached = hub.cached_after(delivered, space)
            if cached is not None:
                blob, last = cached
                if blob:
                    sub.outbox.write(blob)
                if last == hub.head:
                    # No await since `cached_after`: nothing was published in between.
                    hub.catching.discard(sub)
                    hub.live[sub] = None
                    sub.live = True
                    return
                delivered = last
                continue
            try:
                events: list[Event] = await self._read(sub.room, delivered, chunk, events_after)
            except GB6Error as exc:
                # Busy or briefly cut off (`unavailable` says: retry): asked again a while,
                # rather than closing the connection for its client to resume into the same.
                if give_up is None:
                    give_up = trio.current_time() + CATCH_UP_RETRY_S
                if exc.code != UNAVAILABLE or (
                    trio.current_time() >= give_up and not keep_asking()
                ):
                    raise
                await trio.sleep(pause)
                pause = min(2 * pause, _RETRY_PAUSE_MAX_S)
                continue
            give_up, pause = None, _RETRY_PAUSE_S
            if released():
                return
            # The store may already hold commits the hub has not been handed yet; those reach
            # this subscriber live, so stop at the hub's head.
            events = [ev for ev in events if ev.seq <= hub.head]
            if not events:
                # The store is behind the hub: cannot happen, since the hub only sees durable
                # events. Wait a moment rather than spin.
                await trio.sleep(0.01)
                continue
            for ev in events:  # one frame at a time: large events never overflow the outbox
                await sub.outbox.wait_below(high_water)
                if released():
                    return
                sub.outbox.write(encode_event(ev))
                delivered = ev.seq
