"""Keys a room certainly does not hold: one Bloom filter per room, so that a batch of new cids is
planned without asking PostgreSQL whether any is a resend (kafka_sequencer.py). No I/O here.

Until this filter, every Kafka transaction carried a PostgreSQL lookup of its batch's (room,
sender, cid) keys, though nearly every key is new: at 100 sends/s, ~9% of a core on the origin's
busy thread and ~5% in PostgreSQL (bench/RESULTS.md, 2026-11-27). A filter answers "not held"
for ~99% of new keys; "maybe" (a resend, or a false positive) still asks PostgreSQL. A wrong
"not held" would admit a duplicate, so a room's filter answers only once it holds every key the
room has (`ready`):

- tracking starts when the sequencer first commits to the room, seeded with the room's keys not
  yet persisted, and every key committed to the room later is added;
- a loader then reads the room's keys from PostgreSQL in pages by seq. Every page is read after
  tracking began, so a key persisted before then is in some page, and one persisted later was
  either not yet persisted then (seeded) or committed since (added);
- once the last page is in, the filter is ready. A page that fails is read again later, the
  room offered after the rooms newly tracked meanwhile, so one room's bad rows hold up no other.

Memory: a first layer for twice the room's seqs (at least 256 keys), ~10 bits per key (7 hashes,
~0.8% false positives); a full layer gets a successor of twice its capacity with one hash more
(and ~1.45 bits per key more), so all layers together stay under ~1.6%. All rooms' layers
together take at most `max_bytes`; a room that would pass it is dropped, and its keys are asked
of PostgreSQL as before (for good: tracking starts only at a room's first commit since start).
The hashes are Python's own, randomized per process: a filter lives and dies with its process.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from typing import Final

_HASHES: Final = 7  # of a room's first layer; each later layer has one more
_FIRST_CAPACITY: Final = 256
_MASK64: Final = (1 << 64) - 1


def _hash(sender: str, cid: str) -> int:
    return hash((sender, cid)) & _MASK64


class _Layer:
    """One Bloom filter of `capacity` keys with `k` probes (double hashing over one 64-bit
    hash) and ~1.45 * k bits per key: about 2 ** -k false positives once full."""

    __slots__ = ("bits", "capacity", "count", "k", "m")

    def __init__(self, capacity: int, k: int) -> None:
        self.capacity = capacity
        self.count = 0
        self.k = k
        self.m = (capacity * 145 * k + 99) // 100
        self.bits = bytearray((self.m + 7) // 8)

    def add(self, h: int) -> None:
        h1, h2, m, bits = h & 0xFFFFFFFF, (h >> 32) | 1, self.m, self.bits
        for i in range(self.k):
            p = (h1 + i * h2) % m
            bits[p >> 3] |= 1 << (p & 7)
        self.count += 1

    def may_hold(self, h: int) -> bool:
        h1, h2, m, bits = h & 0xFFFFFFFF, (h >> 32) | 1, self.m, self.bits
        for i in range(self.k):
            p = (h1 + i * h2) % m
            if not bits[p >> 3] & (1 << (p & 7)):
                return False
        return True


class RoomKeys:
    """One room's filter: its layers, whether it holds every key of the room yet, the seq up
    to which PostgreSQL's keys are in, and how many of its loads in a row failed."""

    __slots__ = ("failures", "layers", "loaded_upto", "ready")

    def __init__(self, capacity: int) -> None:
        self.layers = [_Layer(capacity, _HASHES)]
        self.ready = False
        self.loaded_upto = 0
        self.failures = 0

    def nbytes(self) -> int:
        return sum(len(layer.bits) for layer in self.layers)

    def may_hold(self, h: int) -> bool:
        return any(layer.may_hold(h) for layer in self.layers)


class KeyFilters:
    """The shard's room filters (see the module doc). Driven by the sequencer's task: `track`
    and `add` from its commits, `rules_out` from its `needs`; `next_to_load`, `loaded` and
    `retry_later` from the store's key loader."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.rooms: dict[str, RoomKeys] = {}
        self.nbytes = 0  # all rooms' layers together
        self.dropped = 0  # rooms left without a filter for the budget
        self._to_load: deque[str] = deque()
        self._retries: list[tuple[float, int, str]] = []  # (when, tie-break, room), a heap
        self._retries_made = 0

    def track(self, room: str, head: int, keys: Iterable[tuple[str, str]]) -> None:
        """Start on `room`, first committed to now (its seqs go up to `head`), with its `keys`
        not yet persisted, and ask for its load. A room already tracked is left as it is."""
        if room in self.rooms:
            return
        keys_of_room = RoomKeys(max(_FIRST_CAPACITY, 2 * head))
        size = keys_of_room.nbytes()
        if self.nbytes + size > self.max_bytes:
            self.dropped += 1
            return
        self.rooms[room] = keys_of_room
        self.nbytes += size
        for sender, cid in keys:
            self.add(room, sender, cid)
        if room in self.rooms:
            self._to_load.append(room)

    def add(self, room: str, sender: str, cid: str) -> None:
        """A key `room` now holds (committed, or read from PostgreSQL)."""
        keys = self.rooms.get(room)
        if keys is None:
            return
        last = keys.layers[-1]
        if last.count >= last.capacity:
            grown = _Layer(2 * last.capacity, last.k + 1)
            if self.nbytes + len(grown.bits) > self.max_bytes:
                self.drop(room)
                self.dropped += 1
                return
            keys.layers.append(grown)
            self.nbytes += len(grown.bits)
            last = grown
        last.add(_hash(sender, cid))

    def rules_out(self, room: str, sender: str, cid: str) -> bool:
        """True if `room` certainly holds no event with this key (its filter is ready)."""
        keys = self.rooms.get(room)
        return keys is not None and keys.ready and not keys.may_hold(_hash(sender, cid))

    def wants_load(self) -> bool:
        return bool(self._to_load)

    def next_to_load(self, now: float) -> str | None:
        """The next tracked room whose keys PostgreSQL must fill in, if any: a newly tracked
        room first, then one whose load failed and whose retry is due at `now`."""
        while self._to_load:
            room = self._to_load.popleft()
            if room in self.rooms:
                return room
        while self._retries and self._retries[0][0] <= now:
            room = heapq.heappop(self._retries)[2]
            if room in self.rooms:
                return room
        return None

    def next_retry_at(self) -> float | None:
        """When the earliest failed load is due again, if any is waiting."""
        return self._retries[0][0] if self._retries else None

    def retry_later(self, room: str, at: float) -> None:
        """`room`'s load failed: offer it again at `at`, after the rooms newly tracked meanwhile
        (it goes on from the seq its last page ended at)."""
        keys = self.rooms.get(room)
        if keys is not None:
            keys.failures += 1
            self._retries_made += 1
            heapq.heappush(self._retries, (at, self._retries_made, room))

    def loaded(self, room: str, keys: Iterable[tuple[str, str]], *, upto: int, last: bool) -> None:
        """A page of `room`'s keys read from PostgreSQL, up to seq `upto`; `last`: no more
        pages."""
        for sender, cid in keys:
            self.add(room, sender, cid)
        found = self.rooms.get(room)
        if found is not None:
            found.failures = 0
            found.loaded_upto = max(found.loaded_upto, upto)
            found.ready = found.ready or last

    def drop(self, room: str) -> None:
        keys = self.rooms.pop(room, None)
        if keys is not None:
            self.nbytes -= keys.nbytes()

    def ready_rooms(self) -> int:
        return sum(1 for keys in self.rooms.values() if keys.ready)
