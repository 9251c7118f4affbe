"""The bytes of one event in the Kafka log of record, and back (what the persister writes).

Rules:
- A record's key is its room and its `seq` header its seq (origin/kafka_log.py); the payload
  holds the rest of the event plus the room's instance, so the persister can place the event
  in its partition (events are partitioned by instance and month) without a lookup.
- The body travels as the JSON bytes PostgreSQL stores (`orjson.dumps(body)`), so a persisted
  event reads back equal to what the sender was acknowledged with.
- A payload that does not decode is not ours: `internal`, naming the record.
"""

from __future__ import annotations

from typing import Any, Final

import attrs
import orjson

from node.errors import INTERNAL, GB6Error
from node.events import Event
from origin.log_port import LogEntry, LogRecord

# What a payload that is not one of ours raises while it is decoded.
_NOT_OURS: Final = (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError)


@attrs.define(eq=False)
class LoggedEvent:
    """An event as the persister writes it: its fields, its room's instance, and its body also
    as the JSON bytes PostgreSQL stores.

    Flat and not frozen: the persister builds one per record on the origin's busy thread, and
    an `Event` inside a frozen class took 6 µs per record to decode, this 2 µs."""

    instance: str
    room: str
    seq: int
    ts: int
    type: str
    sender: str
    cid: str
    body: dict[str, Any] | None
    body_json: bytes | None
    thread: int | None
    target: int | None
    emoji: str | None


def encode(instance: str, event: Event) -> LogRecord:
    """The log record of `event` (raises `invalid`/`too_large` as LogRecord does)."""
    fields: dict[str, Any] = {
        "i": instance,
        "ts": event.ts,
        "type": event.type,
        "sender": event.sender,
        "cid": event.cid,
    }
    if event.body is not None:
        fields["body"] = event.body
    for name in ("thread", "target", "emoji"):
        value = getattr(event, name)
        if value is not None:
            fields[name] = value
    return LogRecord(event.room, event.seq, orjson.dumps(fields))


def decode(entry: LogEntry) -> LoggedEvent:
    """The event of a committed record; `internal` if the payload is not one of ours."""
    try:
        fields = orjson.loads(entry.payload)
        body = fields.get("body")
        return LoggedEvent(
            instance=str(fields["i"]),
            room=entry.room,
            seq=entry.seq,
            ts=int(fields["ts"]),
            type=str(fields["type"]),
            sender=str(fields["sender"]),
            cid=str(fields["cid"]),
            body=body,
            body_json=orjson.dumps(body) if body is not None else None,
            thread=fields.get("thread"),
            target=fields.get("target"),
            emoji=fields.get("emoji"),
        )
    except _NOT_OURS as exc:
        raise _not_ours(entry, exc) from None


def decode_usage(entry: LogEntry) -> tuple[str, int, str, str]:
    """(instance, ts, type, sender) of a committed record, all the meter counts: `decode`
    without building the event or encoding its body again."""
    try:
        fields = orjson.loads(entry.payload)
        return str(fields["i"]), int(fields["ts"]), str(fields["type"]), str(fields["sender"])
    except _NOT_OURS as exc:
        raise _not_ours(entry, exc) from None


def _not_ours(entry: LogEntry, exc: Exception) -> GB6Error:
    """A payload that does not decode is not ours: `internal`, naming the record."""
    return GB6Error(
        INTERNAL,
        f"log record [{entry.partition}] @{entry.offset} (room {entry.room!r}) is not an"
        f" event: {exc!r}",
    )
