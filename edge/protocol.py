"""The client protocol's pure core: JSON text → validated request objects, and replies → bytes.

Nothing here does I/O or imports trio. `parse_request` raises `BadFrame` (with the request id when
one could be read) for anything that does not follow PROTOCOL.md; the gateway answers it with
`invalid` and keeps the connection open.
"""

from __future__ import annotations

from typing import Any, Final

import attrs
import orjson

from node.config import Limits
from node.errors import INVALID, GB6Error
from node.json_depth import MAX_JSON_DEPTH, deeper_than

ROOM_KINDS: Final = frozenset({"chat", "meeting", "live"})
PRESENCE_SET: Final = frozenset({"online", "away"})
ReqId = str | int


class BadFrame(GB6Error):
    def __init__(self, message: str, req_id: ReqId | None, code: str = INVALID) -> None:
        super().__init__(code, message)
        self.req_id = req_id


@attrs.frozen
class Hello:
    id: ReqId
    token: str


@attrs.frozen
class Ping:
    id: ReqId


@attrs.frozen
class RoomCreate:
    id: ReqId
    name: str
    kind: str
    members: tuple[str, ...]
    open: bool


@attrs.frozen
class RoomOp:
    """room.join / room.leave."""

    id: ReqId
    op: str
    room: str


@attrs.frozen
class RoomMembers:
    """room.add / room.remove."""

    id: ReqId
    op: str
    room: str
    users: tuple[str, ...]


@attrs.frozen
class ListRooms:
    id: ReqId


@attrs.frozen
class RoomReads:
    """room.reads: the read positions of a room's members (members only)."""

    id: ReqId
    room: str


@attrs.frozen
class Subscribe:
    id: ReqId
    room: str
    after: int


@attrs.frozen
class Unsubscribe:
    id: ReqId
    room: str


@attrs.frozen
class Append:
    """send, edit, delete, react: every op that takes a seq. `type` is the event type."""

    id: ReqId
    type: str
    room: str
    cid: str
    body: dict[str, Any] | None = None
    thread: int | None = None
    target: int | None = None
    emoji: str | None = None


@attrs.frozen
class History:
    id: ReqId
    room: str
    before: int | None
    limit: int


@attrs.frozen
class Receipt:
    id: ReqId
    room: str
    read: int


@attrs.frozen
class Typing:
    id: ReqId
    room: str


@attrs.frozen
class Search:
    id: ReqId
    query: str
    room: str | None


@attrs.frozen
class PresenceSet:
    id: ReqId
    status: str


@attrs.frozen
class PresenceGet:
    id: ReqId
    users: tuple[str, ...]


@attrs.frozen
class MediaRequest:
    """Every `media.*` op (edge/media_signaling.py handles them; docs/protocol.md "Media").
    Fields an op does not take keep their defaults."""

    id: ReqId
    op: str
    room: str
    kind: str = ""
    source: str = ""
    track: str = ""
    tracks: tuple[str, ...] = ()
    sdp: str = ""
    candidate: str | None = None
    muted: bool = False
    user: str = ""
    on: bool = False


Request = (
    Hello
    | Ping
    | RoomCreate
    | RoomOp
    | RoomMembers
    | ListRooms
    | RoomReads
    | Subscribe
    | Unsubscribe
    | Append
    | History
    | Receipt
    | Typing
    | Search
    | PresenceSet
    | PresenceGet
    | MediaRequest
)


class _Fields:
    """Typed access to one frame's fields; every failure names the field."""

    def __init__(self, frame: dict[str, Any], req_id: ReqId | None, limits: Limits) -> None:
        self.frame = frame
        self.req_id = req_id
        self.limits = limits

    def fail(self, message: str) -> BadFrame:
        return BadFrame(message, self.req_id)

    def id(self) -> ReqId:
        if self.req_id is None:
            raise self.fail("field 'id' (string or integer) is required")
        return self.req_id

    def text(self, name: str, *, max_chars: int = 256, min_chars: int = 1) -> str:
        value = self.frame.get(name)
        if not isinstance(value, str):
            raise self.fail(f"field '{name}' must be a string")
        if not min_chars <= len(value) <= max_chars:
            raise self.fail(f"field '{name}' must have {min_chars} to {max_chars} characters")
        return value

    def opt_text(self, name: str, *, max_chars: int = 256) -> str | None:
        if self.frame.get(name) is None:
            return None
        return self.text(name, max_chars=max_chars)

    def integer(self, name: str, *, minimum: int = 0, maximum: int = 2**53) -> int:
        value = self.frame.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(f"field '{name}' must be an integer")
        if not minimum <= value <= maximum:
            raise self.fail(f"field '{name}' must be between {minimum} and {maximum}")
        return value

    def opt_integer(self, name: str, *, minimum: int = 0, maximum: int = 2**53) -> int | None:
        if self.frame.get(name) is None:
            return None
        return self.integer(name, minimum=minimum, maximum=maximum)

    def flag(self, name: str, default: bool) -> bool:
        value = self.frame.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(f"field '{name}' must be true or false")
        return value

    def ids(self, name: str, *, required: bool = True) -> tuple[str, ...]:
        value = self.frame.get(name)
        if value is None and not required:
            return ()
        if not isinstance(value, list) or not all(
            isinstance(v, str) and 0 < len(v) <= _ID_CHARS for v in value
        ):
            raise self.fail(f"field '{name}' must be a list of ids of 1 to {_ID_CHARS} characters")
        if len(value) > self.limits.members_per_request:
            raise self.fail(f"field '{name}' has more than {self.limits.members_per_request} ids")
        return tuple(dict.fromkeys(value))

    def cid(self) -> str:
        return self.text("cid", max_chars=64)

    def body(self) -> dict[str, Any]:
        value = self.frame.get("body")
        if not isinstance(value, dict):
            raise self.fail("field 'body' must be an object")
        text = value.get("text")
        if text is not None and not isinstance(text, str):
            raise self.fail("field 'body.text' must be a string")
        if len(orjson.dumps(value)) > self.limits.body_bytes:
            raise BadFrame(
                f"field 'body' is larger than {self.limits.body_bytes} bytes",
                self.req_id,
                code="too_large",
            )
        return value

    def seq(self, name: str) -> int:
        return self.integer(name, minimum=1)


def _read_id(frame: dict[str, Any]) -> ReqId | None:
    value = frame.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and len(value) <= 128:
        return value
    if isinstance(value, int) and -(2**63) <= value < 2**63:
        return value
    return None


def decode_frame(text: str | bytes) -> dict[str, Any]:
    """JSON text → the frame object. Raises BadFrame (without id) if it is not a JSON object."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise BadFrame(f"frame is not valid JSON: {exc}", None) from None
    if not isinstance(frame, dict):
        raise BadFrame("frame must be a JSON object", None)
    if deeper_than(frame):
        raise BadFrame(
            f"frame nests objects and arrays deeper than {MAX_JSON_DEPTH} levels", _read_id(frame)
        )
    return frame


def parse_request(frame: dict[str, Any], limits: Limits) -> Request:
    req_id = _read_id(frame)
    f = _Fields(frame, req_id, limits)
    op = frame.get("op")
    if not isinstance(op, str):
        raise f.fail("field 'op' must be a string")
    parser = _PARSERS.get(op)
    if parser is None:
        raise f.fail(f"unknown op {op[:64]!r}")
    return parser(f, op)


def _hello(f: _Fields, op: str) -> Request:
    return Hello(f.id(), f.text("token", max_chars=4096))


def _ping(f: _Fields, op: str) -> Request:
    return Ping(f.id())


def _room_create(f: _Fields, op: str) -> Request:
    kind = f.text("kind", max_chars=16)
    if kind not in ROOM_KINDS:
        raise f.fail("field 'kind' must be one of chat, meeting, live")
    return RoomCreate(
        f.id(),
        f.text("name", max_chars=f.limits.room_name_chars),
        kind,
        f.ids("members", required=False),
        f.flag("open", False),
    )


def _room_op(f: _Fields, op: str) -> Request:
    return RoomOp(f.id(), op, f.text("room"))


def _room_members(f: _Fields, op: str) -> Request:
    return RoomMembers(f.id(), op, f.text("room"), f.ids("users"))


def _rooms(f: _Fields, op: str) -> Request:
    return ListRooms(f.id())


def _room_reads(f: _Fields, op: str) -> Request:
    return RoomReads(f.id(), f.text("room"))


def _subscribe(f: _Fields, op: str) -> Request:
    return Subscribe(f.id(), f.text("room"), f.integer("after"))


def _unsubscribe(f: _Fields, op: str) -> Request:
    return Unsubscribe(f.id(), f.text("room"))


def _send(f: _Fields, op: str) -> Request:
    thread = f.opt_integer("thread", minimum=1)
    return Append(f.id(), "message", f.text("room"), f.cid(), body=f.body(), thread=thread)


def _edit(f: _Fields, op: str) -> Request:
    return Append(f.id(), "edit", f.text("room"), f.cid(), body=f.body(), target=f.seq("target"))


def _delete(f: _Fields, op: str) -> Request:
    return Append(f.id(), "delete", f.text("room"), f.cid(), target=f.seq("target"))


def _react(f: _Fields, op: str) -> Request:
    emoji = f.text("emoji", max_chars=f.limits.emoji_chars)
    return Append(f.id(), "react", f.text("room"), f.cid(), target=f.seq("target"), emoji=emoji)


def _history(f: _Fields, op: str) -> Request:
    limit = f.opt_integer("limit", minimum=1, maximum=200)
    return History(f.id(), f.text("room"), f.opt_integer("before", minimum=1), limit or 50)


def _receipt(f: _Fields, op: str) -> Request:
    return Receipt(f.id(), f.text("room"), f.integer("read"))


def _typing(f: _Fields, op: str) -> Request:
    return Typing(f.id(), f.text("room"))


def _search(f: _Fields, op: str) -> Request:
    query = f.text("query", max_chars=f.limits.search_query_chars)
    if not query.strip():
        raise f.fail("field 'query' must contain a word")
    return Search(f.id(), query, f.opt_text("room"))


def _presence_set(f: _Fields, op: str) -> Request:
    status = f.text("status", max_chars=16)
    if status not in PRESENCE_SET:
        raise f.fail("field 'status' must be online or away")
    return PresenceSet(f.id(), status)


def _presence_get(f: _Fields, op: str) -> Request:
    return PresenceGet(f.id(), f.ids("users"))


_ID_CHARS: Final = 256  # an id in a list of ids (ours are far shorter), as any text field

MEDIA_KINDS: Final = ("audio", "video")
MEDIA_SOURCES: Final = ("camera", "microphone", "screen", "screen_audio")
_TRACK_CHARS = 128
_CANDIDATE_CHARS = 1024


def _media(f: _Fields, op: str) -> Request:
    """The `media.*` ops: each reads only its own fields (see docs/protocol.md, "Media")."""
    room = f.text("room")
    fields: dict[str, Any] = {}
    if op == "media.publish":
        kind = f.text("kind", max_chars=16)
        source = f.text("source", max_chars=16)
        if kind not in MEDIA_KINDS:
            raise f.fail("field 'kind' must be audio or video")
        if source not in MEDIA_SOURCES:
            raise f.fail("field 'source' must be one of " + ", ".join(MEDIA_SOURCES))
        fields = {"kind": kind, "source": source}
        track = f.opt_text("msid_track", max_chars=_TRACK_CHARS)
        if track is not None:
            fields["track"] = track
    elif op in ("media.unpublish", "media.mute"):
        fields = {"track": f.text("track", max_chars=_TRACK_CHARS)}
        if op == "media.mute":
            fields["muted"] = f.flag("muted", True)
    elif op in ("media.subscribe", "media.unsubscribe"):
        value = f.frame.get("tracks")
        if not isinstance(value, list) or not value:
            raise f.fail("field 'tracks' must be a non-empty list of track ids")
        if len(value) > f.limits.media_tracks_per_request:
            raise f.fail(f"field 'tracks' has more than {f.limits.media_tracks_per_request} ids")
        if not all(isinstance(v, str) and 0 < len(v) <= _TRACK_CHARS for v in value):
            raise f.fail(f"field 'tracks' must hold track ids of 1 to {_TRACK_CHARS} characters")
        fields = {"tracks": tuple(dict.fromkeys(value))}
    elif op in ("media.offer", "media.answer"):
        fields = {"sdp": f.text("sdp", max_chars=f.limits.message_bytes)}
    elif op == "media.ice":
        value = f.frame.get("candidate")
        if value is not None and (not isinstance(value, str) or len(value) > _CANDIDATE_CHARS):
            raise f.fail(
                f"field 'candidate' must be a string of at most {_CANDIDATE_CHARS}"
                " characters, or null for the end of candidates"
            )
        fields = {"candidate": value or None}
    elif op == "media.cohost":
        fields = {"user": f.text("user"), "on": f.flag("on", True)}
    elif op == "media.record":
        fields = {"on": f.flag("on", True)}
    return MediaRequest(f.id(), op, room, **fields)


_PARSERS = {
    "hello": _hello,
    "ping": _ping,
    "room.create": _room_create,
    "room.join": _room_op,
    "room.leave": _room_op,
    "room.add": _room_members,
    "room.remove": _room_members,
    "rooms": _rooms,
    "room.reads": _room_reads,
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
    "send": _send,
    "edit": _edit,
    "delete": _delete,
    "react": _react,
    "history": _history,
    "receipt": _receipt,
    "typing": _typing,
    "search": _search,
    "presence.set": _presence_set,
    "presence.get": _presence_get,
    "media.join": _media,
    "media.leave": _media,
    "media.publish": _media,
    "media.unpublish": _media,
    "media.mute": _media,
    "media.offer": _media,
    "media.answer": _media,
    "media.subscribe": _media,
    "media.unsubscribe": _media,
    "media.renegotiate": _media,
    "media.ice": _media,
    "media.cohost": _media,
    "media.record": _media,
}


# --- replies -------------------------------------------------------------------------------


def ok(req_id: ReqId, fields: dict[str, Any] | None = None) -> bytes:
    reply: dict[str, Any] = {"op": "ok", "re": req_id}
    if fields:
        reply.update(fields)
    return orjson.dumps(reply)


def error(req_id: ReqId | None, err: GB6Error) -> bytes:
    reply: dict[str, Any] = {"op": "error"}
    if req_id is not None:
        reply["re"] = req_id
    reply["code"] = err.code
    reply["message"] = err.message
    if err.retry_after_ms is not None:
        reply["retry_after_ms"] = err.retry_after_ms
    return orjson.dumps(reply)


def event(type_: str, fields: dict[str, Any]) -> bytes:
    return orjson.dumps({"op": "event", "type": type_, **fields})


def redacted_event(encoded: bytes) -> bytes:
    """An encoded `event` push as a deleted message shows it: no body, `deleted` set."""
    fields = orjson.loads(encoded)
    fields.pop("body", None)
    fields["deleted"] = True
    return orjson.dumps(fields)
