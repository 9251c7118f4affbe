"""Domain records the stores return. Frozen attrs classes; stores speak in these, not rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import attrs
import orjson

from node.events import Event

INSTANCE_ROLES: Final = ("owner", "admin", "member", "guest", "bot")
PLANS: Final = ("free", "unlimited")
# An instance is served only while `active`; `deleted` is terminal (its data is kept).
INSTANCE_STATUSES: Final = ("active", "suspended", "deleted")
# Org members: accounts of an organization (not instance users), for the admin API.
ORG_ROLES: Final = ("owner", "admin", "member")


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
    # `deleted` users stay in the store (their messages name them) but nothing serves them;
    # the edges' replicas learn of a deletion as a User pushed with this status.
    status: str = "active"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "instance": self.instance,
            "name": self.name,
            "role": self.role,
            "created_at": iso(self.created_at),
        }


@attrs.frozen
class OrgMember:
    """An account of an organization (owner, admin or member): administers the org's subtree
    through the admin API with its own tokens (`gb6o_…`)."""

    id: str
    org: str
    name: str
    role: str
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "org": self.org,
            "name": self.name,
            "role": self.role,
            "created_at": iso(self.created_at),
        }


@attrs.frozen
class ApiKey:
    """A machine's credential (`gb6k_…`): a scope (an org subtree, or one instance of it when
    `instance` is set), explicit permissions, an optional expiry. Stored as a digest only."""

    id: str
    org: str
    instance: str | None
    name: str
    permissions: tuple[str, ...]
    created_by: str  # "operator" or the org member's id
    expires_at: int | None  # ms; None: never
    revoked: bool
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "org": self.org,
            "instance": self.instance,
            "name": self.name,
            "permissions": list(self.permissions),
            "created_by": self.created_by,
            "expires_at": iso(self.expires_at) if self.expires_at is not None else None,
            "revoked": self.revoked,
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


API_KEY_COLS: Final = (
    "id, org, instance, name, permissions, created_by, expires_at, revoked, created_at"
)


def api_key_from_row(row: Sequence[Any]) -> ApiKey:
    """An ApiKey from a store's row of `API_KEY_COLS` (permissions stored space-separated)."""
    id_, org, instance, name, perms, created_by, expires_at, revoked, created_at = row
    return ApiKey(
        id_,
        org,
        instance,
        name,
        tuple(perms.split()),
        created_by,
        expires_at,
        bool(revoked),
        created_at,
    )
