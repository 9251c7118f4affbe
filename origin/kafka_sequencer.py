"""The sequencer of a shard whose log of record is Kafka: seqs, dedup and checks (no I/O here).

The shard is the only writer of its rooms (DESIGN §3.1), so what its rooms hold is what
PostgreSQL holds plus what this sequencer appended that the persister has not written yet. The
sequencer keeps that second part in memory (`Unpersisted`) and asks PostgreSQL, once per batch,
only for what it does not know (`Needs` → `Lookup`):

- Per-room heads are cached for good once known (nobody else appends to the shard's rooms);
  a room first seen is read from PostgreSQL, which holds all of it (recovery ran before).
- (room, sender, cid) of every event appended and not yet persisted, with its event: a repeat
  answers the original; older keys are looked up in PostgreSQL, unless the room's filter says
  the room certainly lacks them (key_filter.py: nearly every new cid).
- Every message not yet persisted (type, sender) and every delete not yet persisted (its
  target is dead), so edit/delete/react/thread checks see them; the rest is in PostgreSQL.
- An entry is dropped once the persister has written the event that made it (`prune`, run by
  the sequencer's own task before its lookups, so a lookup never misses an entry dropped
  while it ran).

A batch is planned on a `Plan`, which shadows the state; the store appends the plan's records
as one transaction and then `commit`s the plan, or drops it (the transaction aborted: its seqs
are taken again by the next batch, no gap and no duplicate). The checks are the other stores'
(origin/store_port.py), with the same errors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Iterable, Mapping
from typing import Final

import attrs

from node.errors import CONFLICT, GB6Error, forbidden, invalid, not_found
from node.events import Event
from origin.kafka_records import encode
from origin.key_filter import KeyFilters
from origin.log_port import MAX_BATCH_BYTES, MAX_BATCH_RECORDS, LogRecord
from origin.pg_append import has_nul
from origin.sqlite_store import Appended, AppendItem

Key = tuple[str, str, str]  # (room, sender, cid)
Pos = tuple[str, int]  # (room, seq)

# Leave room under the log's batch limit for the keys and headers.
_BATCH_BYTES: Final = MAX_BATCH_BYTES - (1 << 20)


@attrs.frozen
class Target:
    """What the checks need of a message: its type, sender, and whether it was deleted."""

    type: str
    sender: str
    deleted: bool


@attrs.frozen
class Needs:
    """What PostgreSQL must tell the sequencer before it can plan a batch."""

    rooms: frozenset[str]  # instance unknown
    heads: frozenset[str]  # head unknown (instance known or asked)
    keys: frozenset[Key]  # not in memory
    targets: frozenset[Pos]  # targets and thread roots not in memory

    def __bool__(self) -> bool:
        return bool(self.rooms or self.heads or self.keys or self.targets)


@attrs.frozen
class Lookup:
    """PostgreSQL's answers to `Needs` (what it does not hold is absent)."""

    instances: dict[str, str] = attrs.Factory(dict)
    heads: dict[str, int] = attrs.Factory(dict)
    priors: dict[Key, Event] = attrs.Factory(dict)
    targets: dict[Pos, Target] = attrs.Factory(dict)


class Unpersisted:
    """What was appended (committed to the log) and may not be in PostgreSQL yet."""

    def __init__(self) -> None:
        self.keys: dict[Key, Event] = {}
        self.targets: dict[Pos, tuple[Target, int]] = {}  # → (target, seq that made the entry)
        # Per room, what each commit made there, oldest first: (the room's head after it, its
        # keys, its targets with the seq that made each). Pruning pops whole commits, once the
        # persister has written the last of them: per entry, ~7% of the busy thread at full
        # load; per commit, a loop of deletes.
        self._made: dict[str, deque[tuple[int, list[Key], list[tuple[Pos, int]]]]] = {}
        # Per room, the highest seq committed to the log, and the highest the persister wrote;
        # both dropped once the persister has caught up (absent, both read 0), so they hold
        # the rooms of the last moments, not every room since the start.
        self.acked: dict[str, int] = {}
        self.persisted: dict[str, int] = {}
        self._reported: set[str] = set()  # rooms the persister reported since the last prune

    def __len__(self) -> int:
        return len(self.keys) + len(self.targets)

    def add(
        self,
        heads: Mapping[str, int],
        keys: Mapping[Key, Event],
        targets: Mapping[Pos, tuple[Target, int]],
    ) -> None:
        """A transaction committed: `keys` and `targets` are its entries, in rooms whose seqs
        now go up to `heads` (every room of an entry is there)."""
        made: dict[str, tuple[list[Key], list[tuple[Pos, int]]]] = {r: ([], []) for r in heads}
        for key, event in keys.items():
            self.keys[key] = event
            made[key[0]][0].append(key)
        for pos, entry in targets.items():
            self.targets[pos] = entry  # a later delete's entry replaces the message's
            made[pos[0]][1].append((pos, entry[1]))
        for room, head in heads.items():
            room_keys, room_targets = made[room]
            self._made.setdefault(room, deque()).append((head, room_keys, room_targets))
            self.acked[room] = head

    def keys_of(self, room: str) -> list[tuple[str, str]]:
        """(sender, cid) of `room`'s entries."""
        return [(key[1], key[2]) for _, keys, _ in self._made.get(room, ()) for key in keys]

    def persisted_upto(self, room: str, seq: int) -> None:
        if seq > self.persisted.get(room, 0):
            self.persisted[room] = seq
            self._reported.add(room)

    def caught_up(self, rooms: Iterable[str]) -> bool:
        """True once the persister wrote every event of `rooms` committed to the log."""
        return all(self.persisted.get(r, 0) >= self.acked.get(r, 0) for r in rooms)

    def behind(self) -> list[str]:
        return [r for r, seq in self.acked.items() if self.persisted.get(r, 0) < seq]

    def prune(self, committing: Container[str] = ()) -> None:
        """Drop the entries of commits PostgreSQL holds all of now, and the marks of the rooms
        it has caught up with but those in `committing` (the transaction in flight may have
        committed already, and the persister reported it, before `acked` says so). Only rooms
        reported since the last prune can have either: those in `committing` stay reported, for
        the entries their commit adds. Run by the sequencer's task only."""
        kept: set[str] = set()
        for room in self._reported:
            done = self.persisted.get(room, 0)
            made = self._made.get(room)
            if made is not None:
                while made and made[0][0] <= done:
                    _, keys, targets = made.popleft()
                    for key in keys:
                        del self.keys[key]  # a key is made once: its entry is this one
                    for pos, made_by in targets:
                        found = self.targets.get(pos)
                        # A later delete replaced the entry: it stays until that one is written.
                        if found is not None and found[1] == made_by:
                            del self.targets[pos]
                if not made:
                    del self._made[room]
            if room in committing:
                kept.add(room)
            elif done >= self.acked.get(room, 0):
                self.persisted.pop(room, None)
                self.acked.pop(room, None)
        self._reported = kept


class Plan:
    """One batch being planned: the state as it will be if the batch commits."""

    def __init__(self, seq: Sequencer, lookup: Lookup, ts: int) -> None:
        self._seq = seq
        self._lookup = lookup
        self.ts = ts
        self.heads: dict[str, int] = {}
        self.keys: dict[Key, Event] = {}
        self.targets: dict[Pos, tuple[Target, int]] = {}
        self.records: list[LogRecord] = []
        # (instance, type, sender) → events: the batch's usage, written in its transaction
        # (kafka_records.encode_usage), so the meter need not read every event again.
        self.usage: dict[tuple[str, str, str], int] = {}
        self.results: list[tuple[AppendItem, Appended | GB6Error]] = []
        self.size = 0

    def full(self) -> bool:
        return len(self.records) >= MAX_BATCH_RECORDS or self.size >= _BATCH_BYTES

    def add(self, item: AppendItem) -> None:
        try:
            self.results.append((item, self._one(item)))
        except GB6Error as exc:
            self.results.append((item, exc))

    def _one(self, item: AppendItem) -> Appended:
        key = (item.room, item.sender, item.cid)
        prior = self.keys.get(key) or self._seq.prior(key, self._lookup)
        if prior is not None:
            return Appended(prior, duplicate=True)
        if has_nul(item):
            raise invalid("ids, cids and emoji must not contain NUL characters")
        instance = self._seq.instance(item.room, self._lookup)
        if instance is None:
            raise not_found(f"room {item.room} not found")
        if item.target is not None:
            self._check_target(item)
        if item.thread is not None:
            root = self._target((item.room, item.thread))
            if root is None or root.type != "message":
                raise not_found(f"thread root {item.thread} is not a message of this room")
        head = self.heads.get(item.room)
        if head is None:
            head = self._seq.head(item.room, self._lookup)
        event = item.event(head + 1, self.ts)
        record = encode(instance, event)  # may refuse the op (too large); nothing changed yet
        self.heads[item.room] = event.seq
        self.keys[key] = event
        self.records.append(record)
        self.size += len(record.payload)
        used = (instance, item.type, item.sender)
        self.usage[used] = self.usage.get(used, 0) + 1
        if item.type == "message":
            self.targets[(item.room, event.seq)] = (
                Target("message", item.sender, False),
                event.seq,
            )
        elif item.type == "delete":
            assert item.target is not None
            target = self._target((item.room, item.target))
            assert target is not None  # checked above
            self.targets[(item.room, item.target)] = (attrs.evolve(target, deleted=True), event.seq)
        return Appended(event, duplicate=False)

    def _target(self, pos: Pos) -> Target | None:
        held = self.targets.get(pos)
        return held[0] if held is not None else self._seq.target(pos, self._lookup)

    def _check_target(self, item: AppendItem) -> None:
        assert item.target is not None
        target = self._target((item.room, item.target))
        if target is None or target.type != "message":
            raise not_found(f"target {item.target} is not a message of this room")
        if target.deleted:
            raise GB6Error(CONFLICT, f"message {item.target} was deleted")
        if item.type == "edit" and target.sender != item.sender:
            raise forbidden("only the sender can edit a message")
        if item.type == "delete" and target.sender != item.sender and not item.may_moderate:
            raise forbidden("only the sender, the room's creator or an admin can delete")


class Sequencer:
    """Heads, room instances and the unpersisted state; plans batches (see the module doc)."""

    def __init__(self, key_filter_bytes: int = 0) -> None:
        self.heads: dict[str, int] = {}
        self.instances: dict[str, str] = {}  # room → instance (a room never moves)
        self.unpersisted = Unpersisted()
        # Keys a room certainly lacks need no lookup (key_filter.py); 0 bytes: every key is asked.
        self.key_filters = KeyFilters(key_filter_bytes)
        self.last_ts = 0  # of the last plan

    def needs(self, items: Iterable[AppendItem]) -> Needs:
        rooms: set[str] = set()
        heads: set[str] = set()
        keys: set[Key] = set()
        targets: set[Pos] = set()
        for item in items:
            if item.room not in self.instances:
                rooms.add(item.room)
            if item.room not in self.heads:
                heads.add(item.room)
            key = (item.room, item.sender, item.cid)
            if (
                key not in self.unpersisted.keys
                and not has_nul(item)
                and not self.key_filters.rules_out(*key)
            ):
                keys.add(key)
            for seq in (item.target, item.thread):
                if seq is not None and (item.room, seq) not in self.unpersisted.targets:
                    targets.add((item.room, seq))
        return Needs(frozenset(rooms), frozenset(heads), frozenset(keys), frozenset(targets))

    def plan(self, lookup: Lookup, ts: int) -> Plan:
        """A plan whose events get `ts`, or 1 ms after the last plan's if that is later: with
        several partitions the persister writes events (and so numbers them) in log order only
        per partition, and search's newest-first order is by ts first."""
        self.last_ts = max(ts, self.last_ts + 1)
        return Plan(self, lookup, self.last_ts)

    def prior(self, key: Key, lookup: Lookup) -> Event | None:
        held = self.unpersisted.keys.get(key)
        return held if held is not None else lookup.priors.get(key)

    def instance(self, room: str, lookup: Lookup) -> str | None:
        found = self.instances.get(room) or lookup.instances.get(room)
        if found is not None:
            self.instances[room] = found  # true whether or not the batch commits
        return found

    def head(self, room: str, lookup: Lookup) -> int:
        cached = self.heads.get(room)
        return cached if cached is not None else lookup.heads.get(room, 0)

    def target(self, pos: Pos, lookup: Lookup) -> Target | None:
        held = self.unpersisted.targets.get(pos)
        return held[0] if held is not None else lookup.targets.get(pos)

    def commit(self, plan: Plan) -> None:
        """The plan's transaction committed: its events are the log's now."""
        self.heads.update(plan.heads)
        state = self.unpersisted
        state.add(plan.heads, plan.keys, plan.targets)
        # A room's keys are in `state` now, this plan's included.
        self.key_filters.committed(plan.heads, plan.keys, state.keys_of)
