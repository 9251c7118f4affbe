"""The bytes of an event in the Kafka log (origin/kafka_records.py): what the persister and the
meter read back is what the sequencer wrote, and a payload that is not ours says where it is."""

from __future__ import annotations

import orjson
import pytest

from node.errors import INTERNAL, GB6Error
from node.events import Event
from origin.kafka_records import decode, decode_usage, encode
from origin.log_port import LogEntry


def entry_of(room: str, seq: int, payload: bytes) -> LogEntry:
    return LogEntry(room=room, seq=seq, payload=payload, partition=2, offset=41)


def test_an_event_reads_back_as_it_was_written() -> None:
    edit = Event("r1", 7, 1_795_700_000_000, "edit", "u1", "c7", body={"text": "é"}, target=3)
    react = Event("r1", 8, 1_795_700_000_001, "react", "u2", "c8", target=3, emoji="👍")
    for event in (edit, react):
        record = encode("inst-1", event)
        got = decode(entry_of(record.room, record.seq, record.payload))
        assert (got.instance, got.room, got.seq, got.ts, got.type) == (
            "inst-1",
            event.room,
            event.seq,
            event.ts,
            event.type,
        )
        assert (got.sender, got.cid, got.thread, got.target, got.emoji) == (
            event.sender,
            event.cid,
            event.thread,
            event.target,
            event.emoji,
        )
        assert got.body == event.body
        assert got.body_json == (orjson.dumps(event.body) if event.body is not None else None)
        usage = decode_usage(entry_of(record.room, record.seq, record.payload))
        assert usage == ("inst-1", event.ts, event.type, event.sender)


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1, 2]", orjson.dumps({"i": "x", "ts": "soon", "type": "m", "sender": "u"})],
)
def test_a_payload_that_is_not_ours_names_the_record(payload: bytes) -> None:
    for read in (decode, decode_usage):
        with pytest.raises(GB6Error) as info:
            read(entry_of("r9", 1, payload))
        assert info.value.code == INTERNAL
        assert "[2] @41" in info.value.message and "'r9'" in info.value.message
