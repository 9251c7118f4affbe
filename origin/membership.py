"""Tenancy and membership as memory holds it: instances, users, rooms, who is in which room.

The origin shard holds the authoritative copy and changes it only after the store committed the
change; an edge in a cluster holds a replica that the edge↔origin link keeps current, so the
gateway answers `rooms`, typing and subscribe checks without a round trip. The lookups here are
the one place that decides what a principal may see: the same code answers on both sides.

No I/O and no Trio: plain data and synchronous methods.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from node.errors import forbidden, not_found
from origin import rbac
from origin.records import Instance, RoomRecord, User


@attrs.frozen
class Principal:
    """Who is calling: an authenticated user of an instance."""

    user: User
    instance: Instance

    @property
    def id(self) -> str:
        return self.user.id

    @property
    def moderator(self) -> bool:
        """Manages every room of the instance (the role's `room.moderate`, origin/rbac.py)."""
        return rbac.instance_role_allows(self.user.role, rbac.ROOM_MODERATE)

    @property
    def actor(self) -> rbac.Actor:
        return rbac.user_actor(self.user.id, self.instance.id, self.user.role)


@attrs.define
class RoomState:
    record: RoomRecord
    head: int  # the newest durable seq
    members: dict[str, int]  # user → read seq

    def summary(self) -> dict[str, Any]:
        r = self.record
        return {"id": r.id, "name": r.name, "kind": r.kind, "open": r.open}


@attrs.frozen
class MembershipChange:
    room: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    created: bool = False  # the room is new: `added` is every member


@attrs.define
class Membership:
    instances: dict[str, Instance] = attrs.Factory(dict)
    users: dict[str, User] = attrs.Factory(dict)
    rooms: dict[str, RoomState] = attrs.Factory(dict)
    user_rooms: dict[str, set[str]] = attrs.Factory(dict)

    # --- lookups -------------------------------------------------------------------------

    def room_visible(self, who: Principal, room_id: str) -> RoomState:
        """The room if `who` may see its metadata: a member, or any user for an open room."""
        room = self.rooms.get(room_id)
        if room is None or room.record.instance != who.instance.id:
            raise not_found(f"room {room_id} not found")
        if who.id not in room.members and not room.record.open:
            raise not_found(f"room {room_id} not found")
        return room

    def room_for_member(self, who: Principal, room_id: str) -> RoomState:
        room = self.room_visible(who, room_id)
        if who.id not in room.members:
            raise forbidden(f"not a member of room {room_id}")
        return room

    def manageable(self, who: Principal, room_id: str) -> RoomState:
        # Owners and admins manage every room of their instance, member or not.
        room = self.rooms.get(room_id) if who.moderator else None
        if room is None or room.record.instance != who.instance.id:
            room = self.room_visible(who, room_id)
        if room.record.creator != who.id and not who.moderator:
            raise forbidden("only the room's creator or an instance owner or admin may do this")
        return room

    def same_instance_users(self, who: Principal, users: Iterable[str]) -> list[str]:
        found = []
        for uid in users:
            user = self.users.get(uid)
            if user is None or user.instance != who.instance.id or user.status != "active":
                raise not_found(f"user {uid} not found")
            found.append(uid)
        return found

    def active(self, users: Iterable[str]) -> list[str]:
        """Those of `users` not deleted (a deletion may have come while they were added)."""
        return [u for u in users if (user := self.users.get(u)) and user.status == "active"]

    def rooms_of(self, who: Principal) -> list[dict[str, Any]]:
        out = []
        for rid in sorted(self.user_rooms.get(who.id, ())):
            room = self.rooms[rid]
            out.append({**room.summary(), "head": room.head, "read": room.members[who.id]})
        return out

    def principal(self, user_id: str) -> Principal | None:
        user = self.users.get(user_id)
        if user is None or user.status != "active":  # a deleted user (an edge's tombstone)
            return None
        inst = self.instances.get(user.instance)
        return Principal(user, inst) if inst is not None else None

    # --- changes (applied after they are durable) ----------------------------------------

    def add_room(self, state: RoomState) -> None:
        self.rooms[state.record.id] = state
        for u in state.members:
            self.user_rooms.setdefault(u, set()).add(state.record.id)

    def add_members(self, room_id: str, users: Iterable[str]) -> None:
        room = self.rooms[room_id]
        for u in users:
            room.members.setdefault(u, 0)
            self.user_rooms.setdefault(u, set()).add(room_id)

    def remove_members(self, room_id: str, users: Iterable[str]) -> None:
        room = self.rooms[room_id]
        for u in users:
            room.members.pop(u, None)
            self.user_rooms.get(u, set()).discard(room_id)

    def set_read(self, room_id: str, user: str, seq: int) -> None:
        room = self.rooms.get(room_id)
        if room is not None and user in room.members:
            room.members[user] = max(room.members[user], seq)
