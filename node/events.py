"""Room events: the records of the log, as the origin stores them and clients receive them."""

from __future__ import annotations

from typing import Any, Final

import attrs

SEQ_TYPES: Final = frozenset({"message", "edit", "delete", "react"})


@attrs.frozen(slots=True)
class Event:
    """One entry of a room's seq stream. `deleted` messages have lost their body."""

    room: str
    seq: int
    ts: int
    type: str
    sender: str
    cid: str
    body: dict[str, Any] | None = None
    thread: int | None = None
    target: int | None = None
    emoji: str | None = None
    deleted: bool = False
    edited: int | None = None  # seq of the newest edit; set on search hits, which show it

    def to_wire(self) -> dict[str, Any]:
        """The fields of the `event` push (without `op` and `type`)."""
        out: dict[str, Any] = {
            "room": self.room,
            "seq": self.seq,
            "ts": self.ts,
            "sender": self.sender,
            "cid": self.cid,
        }
        if self.body is not None:
            out["body"] = self.body
        if self.thread is not None:
            out["thread"] = self.thread
        if self.target is not None:
            out["target"] = self.target
        if self.emoji is not None:
            out["emoji"] = self.emoji
        if self.deleted:
            out["deleted"] = True
        if self.edited is not None:
            out["edited"] = self.edited
        return out

    def redacted(self) -> Event:
        return attrs.evolve(self, body=None, deleted=True)
