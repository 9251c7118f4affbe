"""The bytes of one event in the Kafka log of record, and back (what the persister writes).

Rules:
- A record's key is its room and its `seq` header its seq (origin/kafka_log.py); the payload
  holds the rest of the event plus the room's instance, so the persister can place the event
  in its partition (events are partitioned by instance and month) without a lookup.
- The body travels as the JSON bytes PostgreSQL stores (`orjson.dumps(body)`), so a persisted
  event reads back equal to what the sender was acknowledged with.
- A payload that does not decode is not ours: `internal`, naming the record.
- Usage records (the meter's, on the shard's usage topic `<topic>.usage`): each log transaction
  carries, beside its events, what they count for billing, folded per instance, type and sender
  (every event of a transaction has its ts): `{"ts": ts, "u": [[instance, type, sender, n],
  …]}`, split into several records when one would pass `MAX_PAYLOAD_BYTES`. The key is `usage`
  and the `seq` header 1: the shape every consumer of the log reads (kafka_consumer.py).
"""

from __future__ import annotations

from typing import Any, Final

import attrs
import orjson

from node.errors import INTERNAL, GB6Error
from node.events import Event
from origin.log_port import MAX_PAYLOAD_BYTES, LogEntry, LogRecord

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


USAGE_KEY: Final = "usage"


def usage_topic(topic: str) -> str:
    """The usage topic beside a shard's log of record (Kafka names allow `.`)."""
    return f"{topic}.usage"


def encode_usage(ts: int, counts: dict[tuple[str, str, str], int]) -> list[bytes]:
    """The usage records of one transaction whose events all have `ts`: `counts` is
    (instance, type, sender) → how many. None (`[]`) when it has no event."""
    rows = [[instance, type_, sender, n] for (instance, type_, sender), n in counts.items()]
    return _usage_payloads(ts, rows) if rows else []


def _usage_payloads(ts: int, rows: list[list[Any]]) -> list[bytes]:
    payload = orjson.dumps({"ts": ts, "u": rows})
    if len(payload) <= MAX_PAYLOAD_BYTES or len(rows) == 1:
        return [payload]  # one row is far below the limit: ids are bounded
    half = len(rows) // 2
    return _usage_payloads(ts, rows[:half]) + _usage_payloads(ts, rows[half:])


def decode_usage_record(entry: LogEntry) -> list[tuple[str, int, str, str, int]]:
    """(instance, ts, type, sender, n) of each row of a usage record; `internal` if the payload
    is not one of ours."""
    try:
        fields = orjson.loads(entry.payload)
        ts = int(fields["ts"])
        return [(str(i), ts, str(t), str(s), int(n)) for i, t, s, n in fields["u"]]
    except _NOT_OURS as exc:
        raise _not_ours(entry, exc, "a usage record") from None


def _not_ours(entry: LogEntry, exc: Exception, what: str = "an event") -> GB6Error:
    """A payload that does not decode is not ours: `internal`, naming the record."""
    return GB6Error(
        INTERNAL,
        f"log record [{entry.partition}] @{entry.offset} (room {entry.room!r}) is not"
        f" {what}: {exc!r}",
    )
