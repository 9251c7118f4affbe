"""Keys a room certainly does not hold: one Bloom filter per room, so that a batch of new cids is
planned without asking PostgreSQL whether any is a resend (kafka_sequencer.py). No I/O here.

Until this filter, every Kafka transaction carried a PostgreSQL lookup of its batch's (room,
sender, cid) keys, though nearly every key is new: at 100 sends/s, ~9% of a core on the origin's
busy thread and ~5% in PostgreSQL (bench/RESULTS.md, 2026-11-27). A filter answers "not held"
for ~99% of new keys; "maybe" (a resend, or a false positive) still asks PostgreSQL. A wrong
"not held" would admit a duplicate, so a room's filter answers only once it holds every key the
room has (`ready`):

- tracking starts when the sequencer commits to a room without a filter (its first commit since
  start, or its first since its filter made way for others), seeded with the room's keys not
  yet persisted, and every key committed to the room later is added;
- a loader then reads the room's keys from PostgreSQL in pages by seq. Every page is read after
  tracking began, so a key persisted before then is in some page, and one persisted later was
  either not yet persisted then (seeded) or committed since (added). A page read for a filter
  that was given up meanwhile is thrown away, never given to the room's next filter;
- once the last page is in, the filter is ready. A page that fails is read again later, the
  room offered after the rooms newly tracked meanwhile, so one room's bad rows hold up no other.

Memory: a first layer for twice the room's seqs (at least 256 keys), ~10 bits per key (7 hashes,
~0.8% false positives); a full layer gets a successor of twice its capacity with one hash more
(and ~1.45 bits per key more), so all layers together stay under ~1.6%. All rooms' layers
together take at most `max_bytes`. When a filter would pass it, the filters of rooms no commit
touched for `idle_commits` commits make way, least recent first; if that is not enough, the room
goes without one (its keys are asked of PostgreSQL, as before any filter) and tries again at its
next commit. So the budget holds the active rooms' filters, not the first rooms seen since start.
The layers are rbloom's Bloom filters (Rust): probing in Python was ~14% of the sequencer's
thread at full load. Their hashes are Python's own, randomized per process: a filter lives and
dies with its process.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Final

from rbloom import Bloom

_HASHES: Final = 7  # of a room's first layer; each later layer has one more
_FIRST_CAPACITY: Final = 256
# A room's filter may make way for another's once no commit touched its room for this many: at
# ~100 transactions/s, 100 s. Fewer would reload rooms that are merely quiet.
_IDLE_COMMITS: Final = 10_000


class _Layer:
    """One Bloom filter of `capacity` keys, (sender, cid) tuples, with about 2 ** -k false
    positives once full (~1.44 * k bits per key, k probes from Python's hash)."""

    __slots__ = ("bloom", "capacity", "count", "k", "nbytes")

    def __init__(self, capacity: int, k: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.k = k
        # A hair under 2 ** -k: rbloom truncates its probe count, which for 2 ** -k itself
        # comes out as k - 1 for about half the capacities (a rate ~5% higher).
        self.bloom = Bloom(capacity, 0.99 * 2.0**-k)
        self.nbytes = (self.bloom.size_in_bits + 7) // 8

    def add(self, key: tuple[str, str]) -> None:
        self.bloom.add(key)
        self.count += 1

    @staticmethod
    def nbytes_for(capacity: int, k: int) -> int:
        """At least the `nbytes` of such a layer (its bits are k / ln 2 per key), known before
        it is made."""
        return (capacity * 145 * k + 799) // 800


class RoomKeys:
    """One room's filter: its layers, whether it holds every key of the room yet, the seq up
    to which PostgreSQL's keys are in, and how many of its loads in a row failed."""

    __slots__ = ("failures", "last_commit", "layers", "loaded_upto", "ready")

    def __init__(self, capacity: int, last_commit: int) -> None:
        self.layers = [_Layer(capacity, _HASHES)]
        self.ready = False
        self.loaded_upto = 0
        self.failures = 0
        self.last_commit = last_commit

    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def may_hold(self, key: tuple[str, str]) -> bool:
        # A loop, not any(): a generator per key was ~5% of the sequencer's thread.
        for layer in self.layers:  # noqa: SIM110
            if key in layer.bloom:
                return True
        return False


class KeyFilters:
    """The shard's room filters (see the module doc). Driven by the sequencer's task: `committed`
    from its commits, `rules_out` from its `needs`; `next_to_load`, `loaded` and `retry_later`
    from the store's key loader."""

    def __init__(self, max_bytes: int, idle_commits: int = _IDLE_COMMITS) -> None:
        self.max_bytes = max_bytes
        self.idle_commits = idle_commits
        # By recency: the room least recently committed to first (`committed` moves a room last).
        self.rooms: dict[str, RoomKeys] = {}
        self.nbytes = 0  # all rooms' layers together
        self.evicted = 0  # filters given up for the budget
        self.commits = 0  # the sequencer's commits so far: the clock of rooms' recency
        self._ready = 0  # rooms whose filter is ready
        self._to_load: deque[str] = deque()
        self._retries: list[tuple[float, int, str, RoomKeys]] = []  # (when, tie-break, …): a heap
        self._retries_made = 0

    def committed(
        self,
        heads: Mapping[str, int],
        keys: Iterable[tuple[str, str, str]],
        unpersisted: Callable[[str], Iterable[tuple[str, str]]],
    ) -> None:
        """A transaction committed `keys` (room, sender, cid) to rooms whose seqs now go up to
        `heads`. A room without a filter starts one, seeded with its keys not yet persisted
        (`unpersisted`, this transaction's included), and asks for its load."""
        self.commits += 1
        untracked = []
        for room in heads:
            found = self.rooms.pop(room, None)
            if found is None:
                untracked.append(room)
            else:
                found.last_commit = self.commits
                self.rooms[room] = found
        rooms = self.rooms
        for room, sender, cid in keys:
            # `add`, less a call and its checks, while the room's last layer has space.
            found = rooms.get(room)
            if found is None:
                continue
            last = found.layers[-1]
            if last.count < last.capacity:
                last.add((sender, cid))
            else:
                self.add(room, sender, cid)
        for room in untracked:
            self._track(room, heads[room], unpersisted)

    def _track(
        self, room: str, head: int, unpersisted: Callable[[str], Iterable[tuple[str, str]]]
    ) -> None:
        capacity = max(_FIRST_CAPACITY, 2 * head)
        if not self._fit(_Layer.nbytes_for(capacity, _HASHES)):
            return  # tried again at the room's next commit
        keys_of_room = RoomKeys(capacity, self.commits)
        self.rooms[room] = keys_of_room
        self.nbytes += keys_of_room.nbytes()
        for sender, cid in unpersisted(room):
            self.add(room, sender, cid)
        if room in self.rooms:
            self._to_load.append(room)

    def _fit(self, size: int) -> bool:
        """Make room for `size` more bytes by giving up the filters of rooms idle for
        `idle_commits` commits, least recent first; False, and none given up, if that is not
        enough."""
        need = self.nbytes + size - self.max_bytes
        if need <= 0:
            return True
        victims: list[str] = []
        for room, keys in self.rooms.items():
            if self.commits - keys.last_commit < self.idle_commits:
                return False  # the rest are more recent still
            victims.append(room)
            need -= keys.nbytes()
            if need <= 0:
                break
        if need > 0:
            return False
        for room in victims:
            self.drop(room)
            self.evicted += 1
        return True

    def add(self, room: str, sender: str, cid: str) -> None:
        """A key `room` now holds (committed, or read from PostgreSQL)."""
        keys = self.rooms.get(room)
        if keys is None:
            return
        last = keys.layers[-1]
        if last.count >= last.capacity:
            if not self._fit(_Layer.nbytes_for(2 * last.capacity, last.k + 1)):
                self.drop(room)
                self.evicted += 1
                return
            if self.rooms.get(room) is not keys:
                return  # an idle room's own filter made way (a page read for it)
            grown = _Layer(2 * last.capacity, last.k + 1)
            keys.layers.append(grown)
            self.nbytes += grown.nbytes
            last = grown
        last.add((sender, cid))

    def rules_out(self, room: str, sender: str, cid: str) -> bool:
        """True if `room` certainly holds no event with this key (its filter is ready)."""
        keys = self.rooms.get(room)
        return keys is not None and keys.ready and not keys.may_hold((sender, cid))

    def wants_load(self) -> bool:
        return bool(self._to_load)

    def next_to_load(self, now: float) -> tuple[str, RoomKeys] | None:
        """The next room whose filter PostgreSQL must fill in, with that filter, if any: a
        newly tracked room first, then one whose load failed and whose retry is due at `now`."""
        while self._to_load:
            room = self._to_load.popleft()
            keys = self.rooms.get(room)
            if keys is not None and not keys.ready:
                return room, keys
        while self._retries and self._retries[0][0] <= now:
            _, _, room, keys = heapq.heappop(self._retries)
            if self.rooms.get(room) is keys and not keys.ready:
                return room, keys
        return None

    def next_retry_at(self) -> float | None:
        """When the earliest failed load is due again, if any is waiting."""
        return self._retries[0][0] if self._retries else None

    def retry_later(
        self, room: str, keys: RoomKeys, now: float, waits: tuple[float, float]
    ) -> float | None:
        """The load of `room`'s filter `keys` failed at `now`: offer it again after the first of
        `waits` (first, most), doubled for each failure in a row before, and after the rooms
        newly tracked meanwhile (it goes on from the seq its last page ended at). When, or
        None if that filter was given up meanwhile."""
        if self.rooms.get(room) is not keys:
            return None
        first, most = waits
        # The doubling is capped: 2.0 ** (a thousand failures) is no float.
        at = now + min(first * (1 << min(keys.failures, 32)), most)
        keys.failures += 1
        self._retries_made += 1
        heapq.heappush(self._retries, (at, self._retries_made, room, keys))
        return at

    def loaded(
        self, room: str, keys: RoomKeys, rows: Iterable[tuple[str, str]], *, upto: int, last: bool
    ) -> bool:
        """A page of `room`'s keys, read from PostgreSQL for its filter `keys`, up to seq `upto`;
        `last`: no more pages. False, and nothing done, if that filter was given up meanwhile:
        a filter tracked since must not take a page read before it began."""
        if self.rooms.get(room) is not keys:
            return False
        for sender, cid in rows:
            self.add(room, sender, cid)
        keys.failures = 0
        keys.loaded_upto = max(keys.loaded_upto, upto)
        kept = self.rooms.get(room) is keys  # not given up by its own growth
        if last and not keys.ready and kept:
            self._ready += 1
        keys.ready = keys.ready or last
        return kept

    def drop(self, room: str) -> None:
        keys = self.rooms.pop(room, None)
        if keys is not None:
            self.nbytes -= keys.nbytes()
            self._ready -= keys.ready

    def ready_rooms(self) -> int:
        """How many rooms have a ready filter (a metric: counted, not summed per scrape)."""
        return self._ready
