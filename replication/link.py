"""The edge↔origin link: framing and the wire shapes of what crosses it. Pure: no I/O, no Trio.

Frames are a 4-byte big-endian length followed by that many bytes of JSON (an object with a
`t` field naming its kind). One TCP connection per (edge, origin shard); frames in each
direction keep their order, which is what makes the rules below hold.

Conversation:
- edge → origin `hello` {secret, edge, v} (before it, the origin reads at most 64 KiB of frames:
  the hello and pings); origin → edge `welcome` {shard}, then the shard's
  tenancy and rooms in `snap` frames (bounded in size), then `snap_end`. From `welcome` on the
  origin pushes every change, so the edge's replica (origin/membership.py) is current once it
  has applied `snap_end`.
- edge → origin `req` {id, op, who?, ...}; origin → edge `res` {id, ok} or {id, err}.
  `who` is the user id the edge authenticated; the origin resolves it against its own state.
  `slot.acquire` {instance, resource} / `slot.release` {counts: [[instance, resource, n]]}:
  concurrent quotas (`connections`, `media_participants`), counted by the origin across edges
  (handled in order); what an edge holds is freed when its link ends.
- Recordings made on an edge (edge/media_recording.py) live at the instance's origin
  (origin/recording_store.py): `rec.write` {instance, blob, offset, data (base64, ≤ 256 KiB),
  last} uploads a file in order, `rec.read` {instance, blob, offset} → {data, size} reads a
  range, `rec.index` {instance, room} → {recordings}, `rec.indexed` {instance, room,
  recording} lists a finished one; `usage.charge` {instance, resource: recording_minutes, n,
  key} is the shard's `charge_usage`.
- origin → edge pushes: `batch` {events: {room: [event]}, heads: {room: seq}, acks?:
  [[id, seq, ts]]} once per committed batch (events for rooms this edge watches, heads for the
  others). `acks` answers this edge's `append` requests that made a new event: the event is
  the request's fields at that seq and ts, so the origin neither encodes it a second time nor
  the edge decodes it (a frame per answer and an event per answer cost ~10 % of an origin's
  CPU). The edge handles `acks` after the frame's events, as it would `res` frames after the
  batch. A repeat (`duplicate`) or a refusal is answered with `res` as before, and so is every
  append of an edge of `v` 1 or none (which may not read `acks`). A batch larger than a frame
  may be (`MAX_FRAME`: many bodies near their limit) comes in several `batch` frames: each
  room's events in order, the heads and the acks in the last. `room` {room}
  (a new room's whole state); `members` {room, added: {user: read seq}, removed: [user]} (a
  membership change of a room pushed before: never the whole member map, which is up to
  `members_per_room` entries; an edge of `v` 1, or none, is pushed the whole `room` instead,
  so edges and origins upgrade in either order); `read` {room, user, seq}; `instance`, `user`
  (tenancy records created on the shard). Answers of room ops carry the room without its
  members: the pushes before them gave the edge those.
- Liveness: the edge sends a `ping` request every `PING_S`, which the origin answers; each end
  drops a link on which it received nothing for `SILENT_S` (a peer frozen, or whose host went
  away without closing the connection), which frees what the other end held for it.
- `watch` is a request whose answer {room, head} is written, in the same step as the origin
  starts sending that room's events, before any of them: the edge creates its hub at `head`
  while it handles the answer, so it sees every later event exactly once (the hub is idle until
  the subscribe that asked takes it: one whose client went meanwhile is evicted in time, and
  unwatched; a subscribe that finds the hub gone when it goes on, its link lost or the hub
  evicted, is `unavailable` rather than make a hub no watch is behind). `unwatch` (when the
  edge forgets an idle room's hub) puts the room back to heads only; a later `watch` starts over.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import attrs
import orjson

from node.errors import GB6Error
from node.events import Event
from origin.membership import RoomState
from origin.records import Instance, RoomRecord, User

MAX_FRAME: Final = 64 << 20  # a catch-up page: 500 events of up to 64 KiB of body each
VERSION: Final = 2  # of the edge's end: 2 takes `members` pushes (1 took the whole `room`)
PING_S: Final = 5.0
SILENT_S: Final = 15.0
_LEN = struct.Struct("!I")


class LinkBroken(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode(msg: dict[str, Any]) -> bytes:
    body = orjson.dumps(msg)
    if len(body) > MAX_FRAME:
        raise ValueError(f"link frame of {len(body)} bytes is over {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Feed bytes as they arrive; get whole frames back, in order."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame  # a longer frame breaks the link

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        buf = self._buf
        buf += data
        out: list[dict[str, Any]] = []
        # Walk the frames with a position and drop what was read once at the end: deleting
        # each frame from the front moved the rest of a 64 KiB read per frame (~6 % of an
        # origin's CPU under load, hundreds of small appends per read).
        pos, end = 0, len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= 4:
                (n,) = _LEN.unpack_from(buf, pos)
                if n > self.max_frame:
                    raise LinkBroken(f"frame of {n} bytes is over {self.max_frame}")
                if end - pos - 4 < n:
                    break
                try:
                    msg = orjson.loads(view[pos + 4 : pos + 4 + n])
                except orjson.JSONDecodeError as exc:
                    raise LinkBroken(f"frame is not JSON: {exc}") from exc
                pos += 4 + n
                if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
                    raise LinkBroken("frame is not an object with a kind")
                out.append(msg)
        finally:
            view.release()  # a bytearray with an export cannot be resized
            del buf[:pos]
        return out


# --- wire shapes ---------------------------------------------------------------------------


def event_to_wire(ev: Event) -> dict[str, Any]:
    # The client push's fields plus `type` (defaults left out); attrs.asdict was ~15 % of an
    # origin's CPU under load.
    out = ev.to_wire()
    out["type"] = ev.type
    return out


def event_from_wire(d: dict[str, Any]) -> Event:
    return Event(**d)


def room_to_wire(state: RoomState) -> dict[str, Any]:
    return {"record": attrs.asdict(state.record), "head": state.head, "members": state.members}


def room_from_wire(d: dict[str, Any]) -> RoomState:
    return RoomState(RoomRecord(**d["record"]), d["head"], dict(d["members"]))


def instance_from_wire(d: dict[str, Any]) -> Instance:
    return Instance(**d)


def user_from_wire(d: dict[str, Any]) -> User:
    return User(**d)


def error_to_wire(err: GB6Error) -> dict[str, Any]:
    out: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.retry_after_ms is not None:
        out["retry_after_ms"] = err.retry_after_ms
    return out


def error_from_wire(d: dict[str, Any]) -> GB6Error:
    retry = d.get("retry_after_ms")
    return GB6Error(
        str(d.get("code")),
        str(d.get("message")),
        retry_after_ms=retry if isinstance(retry, int) else None,
    )
