"""Domain records the stores return. Frozen attrs classes; stores speak in these, not rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import attrs
import orjson

from node.events import Event

INSTANCE_ROLES: Final = ("owner", "admin", "member", "guest")
MODERATOR_ROLES: Final = frozenset({"owner", "admin"})
PLANS: Final = ("free", "unlimited")


@attrs.frozen
class Org:
    id: str
    name: str
    parent: str | None
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "parent": self.parent,
            "created_at": iso(self.created_at),
        }


@attrs.frozen
class Instance:
    id: str
    org: str
    name: str
    region: str
    plan: str
    status: str
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "org": self.org,
            "name": self.name,
            "region": self.region,
            "plan": self.plan,
            "status": self.status,
            "created_at": iso(self.created_at),
        }


@attrs.frozen
class User:
    id: str
    instance: str
    name: str
    role: str
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "instance": self.instance,
            "name": self.name,
            "role": self.role,
            "created_at": iso(self.created_at),
        }


@attrs.frozen
class Token:
    id: str
    user: str
    expires_at: int  # ms
    revoked: bool


@attrs.frozen
class RoomRecord:
    id: str
    instance: str
    name: str
    kind: str
    open: bool
    creator: str
    created_at: int


@attrs.frozen
class FileRecord:
    id: str
    room: str
    uploader: str
    size: int
    type: str
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "type": self.type}


def iso(ms: int) -> str:
    import datetime

    return (
        datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def event_from_row(row: Sequence[Any]) -> Event:
    """An Event from a store's row whose first 11 columns are room, seq, ts, type, sender,
    cid, body (JSON bytes or text), thread, target, emoji, deleted."""
    room, seq, ts, type_, sender, cid, body, thread, target, emoji, deleted = row[:11]
    return Event(
        room=room,
        seq=seq,
        ts=ts,
        type=type_,
        sender=sender,
        cid=cid,
        body=orjson.loads(body) if body is not None else None,
        thread=thread,
        target=target,
        emoji=emoji,
        deleted=bool(deleted),
    )


def hit_from_row(row: Sequence[Any]) -> Event:
    """A search hit: `event_from_row`'s 11 columns, then the current (edited) body and the
    seq of the edit that set it, both NULL when never edited."""
    ev = event_from_row(row)
    if row[11] is not None:
        ev = attrs.evolve(ev, body=orjson.loads(row[11]), edited=row[12])
    return ev
