"""The pure cores, tested with bytes and values: no sockets, no Trio."""

from __future__ import annotations

import base64
from contextlib import ExitStack
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from edge import protocol as p
from edge import wsframe
from edge.handshake import Accepted, Rejected, ServerHandshake
from edge.wsread import FrameReader
from node.config import Limits
from node.errors import GB6Error
from node.ratelimit import Gcra

UPGRADE = (
    b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_handshake_accepts_and_keeps_bytes_sent_behind_the_request() -> None:
    hs = ServerHandshake()
    assert hs.feed(UPGRADE[:20]) is None
    answer = hs.feed(UPGRADE[20:] + b"\x81\x85frame")
    assert isinstance(answer, Accepted)
    # RFC 6455 §1.3's worked example.
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer.response
    assert answer.trailing == b"\x81\x85frame"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (UPGRADE.replace(b"/v1/ws", b"/other"), b"404"),
        (UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: h2c"), b"400"),
        (UPGRADE.replace(b"Version: 13", b"Version: 8"), b"400"),
        (b"NONSENSE\r\n\r\n", b"400"),
    ],
)
def test_handshake_rejects_what_is_not_a_websocket_upgrade(
    request_bytes: bytes, status: bytes
) -> None:
    answer = ServerHandshake().feed(request_bytes)
    assert isinstance(answer, Rejected)
    assert answer.response.startswith(b"HTTP/1.1 " + status)


def test_server_frames_are_unmasked_with_the_right_length_encoding() -> None:
    assert wsframe.text(b"hi") == b"\x81\x02hi"
    mid = wsframe.text(b"x" * 300)
    assert mid[:4] == b"\x81\x7e\x01\x2c" and len(mid) == 304
    big = wsframe.text(b"x" * 70_000)
    assert big[:2] == b"\x81\x7f" and int.from_bytes(big[2:10], "big") == 70_000
    assert wsframe.close(4008, "slow") == b"\x88\x06\x0f\xa8slow"


def _client_frame(
    op: int, payload: bytes, fin: bool = True, mask: bytes = b"\x01\x02\x03\x04"
) -> bytes:
    n = len(payload)
    head = bytes((0x80 * fin | op,))
    if n < 126:
        head += bytes((0x80 | n,))
    elif n < 65536:
        head += bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_frame_reader_unmasks_and_reassembles_across_any_split() -> None:
    data = (
        _client_frame(0x1, "héllo".encode())
        + _client_frame(0x1, b"frag", fin=False)
        + _client_frame(0x9, b"p")  # a ping between fragments is allowed
        + _client_frame(0x0, b"ment")
        + _client_frame(0x1, b"x" * 300)
    )
    expected = [("text", "héllo"), ("ping", b"p"), ("text", "fragment"), ("text", "x" * 300)]
    for step in (1, 3, 7, len(data)):
        reader = FrameReader(limit=1000, transport_limit=2000)
        events = []
        for i in range(0, len(data), step):
            events += reader.feed(data[i : i + step])
        assert events == expected


def test_frame_reader_limits_message_size() -> None:
    reader = FrameReader(limit=10, transport_limit=20)
    assert reader.feed(_client_frame(0x1, b"12345", fin=False)) == []
    assert reader.feed(_client_frame(0x0, b"678901")) == [("too_large", None)]
    assert reader.feed(_client_frame(0x1, b"ok")) == [("text", "ok")]  # still usable
    assert reader.feed(_client_frame(0x2, b"bin")) == [("binary", None)]
    # Refused from the header alone: the 21-byte payload is never waited for.
    assert reader.feed(_client_frame(0x1, b"y" * 21)[:8]) == [("error", (1009, "message too big"))]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (bytes((0x81, 0x02)) + b"hi", 1002),  # unmasked
        (bytes((0xC1,)) + _client_frame(0x1, b"hi")[1:], 1002),  # RSV1 without an extension
        (_client_frame(0x3, b"hi"), 1002),  # reserved opcode
        (_client_frame(0x9, b"p", fin=False), 1002),  # fragmented control frame
        (_client_frame(0x0, b"orphan"), 1002),  # continuation without a message
        (_client_frame(0x1, b"\xff\xfe"), 1007),  # not UTF-8
        (_client_frame(0xB, (1000).to_bytes(2, "big")), 1002),  # reserved control opcode
        (_client_frame(0x8, (1005).to_bytes(2, "big")), 1002),  # a code never sent
        (_client_frame(0x8, (999).to_bytes(2, "big")), 1002),
        (_client_frame(0x8, (1015).to_bytes(2, "big")), 1002),
        (_client_frame(0x8, (1000).to_bytes(2, "big") + b"\xff"), 1007),  # reason not UTF-8
    ],
)
def test_frame_reader_protocol_errors(frame: bytes, code: int) -> None:
    reader = FrameReader(limit=100, transport_limit=200)
    events = reader.feed(frame)
    assert events[-1][0] == "error" and events[-1][1][0] == code
    assert reader.feed(_client_frame(0x1, b"later")) == []  # nothing after an error


def test_frame_reader_close() -> None:
    reader = FrameReader(limit=100, transport_limit=200)
    assert reader.feed(_client_frame(0x8, (1000).to_bytes(2, "big") + b"bye")) == [
        ("close", (1000, "bye"))
    ]
    assert FrameReader(100, 200).feed(_client_frame(0x8, b"")) == [("close", (1005, ""))]


def test_frame_reader_bounds_the_fragments_of_a_message() -> None:
    """A message may come in many small fragments (64 KiB in 1,024 here), but each counts at
    least FRAGMENT_WEIGHT bytes against the transport limit: a flood of empty ones (which add
    no bytes) closes the connection with 1009 instead of holding it for good, before any
    hello too."""
    from edge.wsread import FRAGMENT_WEIGHT

    reader = FrameReader(limit=1 << 16, transport_limit=1 << 17)
    chunk = b"x" * FRAGMENT_WEIGHT
    frames = [_client_frame(0x1, chunk, fin=False)]
    frames += [_client_frame(0x0, chunk, fin=False)] * 1022 + [_client_frame(0x0, chunk)]
    assert reader.feed(b"".join(frames)) == [("text", "x" * (1 << 16))]
    assert reader.feed(_client_frame(0x1, b"a", fin=False)) == []
    empty = _client_frame(0x0, b"", fin=False)
    events = reader.feed(empty * ((1 << 17) // FRAGMENT_WEIGHT))
    assert events == [("error", (1009, "message in too many fragments"))]


def test_decode_frame_refuses_deep_nesting() -> None:
    """orjson encodes at most 254 levels: a body stored deeper than every later reply wraps it
    in could never be sent again (history, search, the live push). Refused on the way in."""
    deep: dict[str, object] = {}
    cur = deep
    for _ in range(130):
        cur["a"] = {}
        cur = cur["a"]  # type: ignore[assignment]
    frame = orjson.dumps({"op": "send", "id": 9, "room": "r", "cid": "c", "body": deep})
    with pytest.raises(p.BadFrame) as info:
        p.decode_frame(frame)
    assert info.value.code == "invalid" and info.value.req_id == 9
    assert "deeper than 128 levels" in info.value.message
    shallow = orjson.dumps({"op": "send", "id": 9, "room": "r", "cid": "c", "body": {"a": [[1]]}})
    assert p.decode_frame(shallow)["body"] == {"a": [[1]]}


def test_parse_request_accepts_the_core_ops() -> None:
    limits = Limits()
    req = p.parse_request(
        {"op": "send", "id": 7, "room": "r", "cid": "c", "body": {"text": "hi"}, "thread": 3},
        limits,
    )
    assert req == p.Append(7, "message", "r", "c", body={"text": "hi"}, thread=3)
    hist = p.parse_request({"op": "history", "id": "h", "room": "r"}, limits)
    assert hist == p.History("h", "r", None, 50)


@pytest.mark.parametrize(
    ("frame", "req_id", "fragment"),
    [
        ({"id": 1}, 1, "'op'"),
        ({"op": "nope", "id": 1}, 1, "unknown op"),
        ({"op": "send", "id": 2, "room": "r", "cid": "", "body": {}}, 2, "'cid'"),
        ({"op": "send", "id": 2, "room": "r", "cid": "x" * 65, "body": {}}, 2, "'cid'"),
        ({"op": "send", "id": 3, "room": "r", "cid": "c", "body": "text"}, 3, "'body'"),
        ({"op": "send", "id": 3, "room": "r", "cid": "c", "body": {"text": 5}}, 3, "body.text"),
        ({"op": "subscribe", "id": 4, "room": "r", "after": -1}, 4, "'after'"),
        ({"op": "subscribe", "id": 4, "room": "r", "after": True}, 4, "'after'"),
        ({"op": "history", "id": 5, "room": "r", "limit": 201}, 5, "'limit'"),
        ({"op": "room.create", "id": 6, "name": "n", "kind": "voice"}, 6, "'kind'"),
        ({"op": "ping", "id": [1]}, None, "'id'"),
        ({"op": "room.add", "id": 7, "room": "r", "users": ["u" * 257]}, 7, "'users'"),
        ({"op": "presence.get", "id": 8, "users": [""]}, 8, "'users'"),
    ],
)
def test_parse_request_names_the_bad_field(
    frame: dict[str, object], req_id: object, fragment: str
) -> None:
    with pytest.raises(p.BadFrame) as info:
        p.parse_request(frame, Limits())
    assert info.value.code == "invalid"
    assert info.value.req_id == req_id
    assert fragment in info.value.message


def test_decode_frame_rejects_non_objects() -> None:
    for text in ("[1]", "nope", '"s"'):
        with pytest.raises(p.BadFrame):
            p.decode_frame(text)


def test_gcra_allows_the_burst_then_the_rate() -> None:
    limiter = Gcra(rate=10, burst=3)
    assert [limiter.check("u", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.check("u", 0.0)
    assert wait == pytest.approx(0.1)
    assert limiter.check("u", 0.1) == 0.0
    assert limiter.check("other", 0.0) == 0.0  # keys are independent


async def test_authentications_at_once_from_one_address_are_bounded() -> None:
    """A burst of guesses at once would each pass `blocked` before the first failure is
    counted: past `max_pending` under way from one address (an IPv6 /64), `rate_limited`."""
    from node.auth_failures import AuthFailures, address_key

    failures = AuthFailures(_Allowing(), max_pending=2)
    with failures.attempt("10.0.0.1"), failures.attempt("10.0.0.1"):
        with pytest.raises(GB6Error) as info, failures.attempt("10.0.0.1"):
            pass
        assert info.value.code == "rate_limited" and info.value.retry_after_ms
        with failures.attempt("10.0.0.2"):  # another address
            pass
        # Loopback: not limited unless configured.
        with (
            failures.attempt("127.0.0.1"),
            failures.attempt("127.0.0.1"),
            failures.attempt("127.0.0.1"),
        ):
            pass
    with failures.attempt("10.0.0.1"):  # the two ended: room again
        pass
    with failures.attempt("2001:db8::1"), failures.attempt("2001:db8::2"):
        with pytest.raises(GB6Error), failures.attempt("2001:db8::ffff:1"):  # the same /64
            pass
        with failures.attempt("2001:db8:0:1::1"):  # another /64
            pass
    # An address that failed in the last minute: 4 at once, however many `max_pending` says.
    roomy = AuthFailures(_Allowing(), max_pending=64)
    with ExitStack() as stack:
        for _ in range(6):
            stack.enter_context(roomy.attempt("10.0.0.9"))
    await roomy.failed("10.0.0.9")
    with ExitStack() as stack:
        for _ in range(4):
            stack.enter_context(roomy.attempt("10.0.0.9"))
        with pytest.raises(GB6Error), roomy.attempt("10.0.0.9"):
            pass
    assert address_key("2001:db8::1") == "2001:db8::/64"
    assert address_key("::ffff:10.0.0.1") == "::ffff:10.0.0.1"
    assert address_key("10.0.0.1") == "10.0.0.1"


class _Allowing:
    async def check(self, key: str) -> float:
        return 0.0


class _Refusing:
    """A shared limiter that refuses as Redis does when out of memory (a refusal, not a
    timeout)."""

    async def check(self, key: str) -> float:
        raise GB6Error("internal", "OOM command not allowed when used memory > 'maxmemory'")


async def test_a_shared_limiter_that_refuses_falls_back_to_the_local_one() -> None:
    from edge.bus import LocalRateLimiter
    from node.ratelimit import FallbackLimiter

    limiter = FallbackLimiter(_Refusing(), LocalRateLimiter.new(1.0, 2), 0.5, "test_fallback")
    assert [await limiter.check("k") for _ in range(2)] == [0.0, 0.0]
    assert await limiter.check("k") > 0  # the local limit holds


def test_token_digests_are_not_reversible_ids() -> None:
    from node.ids import new_id, secret_digest

    ident = new_id("usr")
    assert ident.startswith("usr_") and len(ident) > 20
    assert secret_digest("a") != secret_digest("b")
    assert base64.b16decode(secret_digest("a").upper())  # hex, 32 bytes


def test_each_kafka_batch_is_later_than_the_one_before() -> None:
    """Search orders by ts first: with several partitions, event ids follow the log only per
    partition, so batches planned within one millisecond, or while the clock steps back, still
    get increasing ts."""
    from origin.kafka_sequencer import Lookup, Sequencer

    seq = Sequencer()
    stamps = [seq.plan(Lookup(), now).ts for now in (1_000, 1_000, 999, 1_005, 1_004)]
    assert stamps == [1_000, 1_001, 1_002, 1_005, 1_006]


def test_metrics_render_every_digit_of_a_count() -> None:
    """A counter past a million keeps its last digits (Prometheus sums and rates need them)."""
    from node.metrics import Metric, render

    text = render(
        [Metric("gb6_x_total", "counter", "things", 1_234_567), Metric("g", "gauge", "h", 0.5)]
    )
    assert text.splitlines() == [
        "# HELP gb6_x_total things",
        "# TYPE gb6_x_total counter",
        "gb6_x_total 1234567",
        "# HELP g h",
        "# TYPE g gauge",
        "g 0.5",
    ]


def test_room_key_filter_rules_out_only_what_the_room_cannot_hold() -> None:
    """A room's resend filter answers only once PostgreSQL's pages are in; then it never rules
    out a key the room holds (seeded, committed or read), and rules out nearly every new one."""
    from origin.key_filter import KeyFilters

    filters = KeyFilters(max_bytes=1 << 20)
    unpersisted = {"r1": [("alice", "seeded"), ("alice", "committed")], "r2": []}
    filters.committed({"r1": 2}, [("r1", "alice", "committed")], unpersisted.__getitem__)
    assert not filters.rules_out("r1", "alice", "new")  # not ready: PostgreSQL is asked
    found = filters.next_to_load(0.0)
    assert found is not None and found[0] == "r1" and filters.next_to_load(0.0) is None
    r1 = found[1]
    page = [("bob", f"old{i}") for i in range(5_000)]
    assert filters.loaded("r1", r1, page, upto=5_000, last=False)
    assert not filters.rules_out("r1", "alice", "new")
    # A failed page: offered again when its retry is due, after rooms tracked meanwhile, to go
    # on from where the last page ended.
    assert filters.retry_later("r1", r1, now=9.0, waits=(1.0, 30.0)) == 10.0
    assert r1.failures == 1 and filters.next_retry_at() == 10.0
    filters.committed({"r2": 1}, [], unpersisted.__getitem__)
    assert filters.next_to_load(9.9) == ("r2", filters.rooms["r2"])
    assert filters.next_to_load(9.9) is None
    assert filters.next_to_load(10.0) == ("r1", r1) and r1.loaded_upto == 5_000
    assert filters.next_retry_at() is None
    page = [("bob", f"old{i}") for i in range(5_000, 9_000)]
    assert filters.loaded("r1", r1, page, upto=9_000, last=True)
    assert r1.ready and r1.failures == 0  # a page read: the next failure waits the least
    # Failures in a row wait twice as long each time, up to the most (however many there are).
    r2 = filters.rooms["r2"]
    waits = [filters.retry_later("r2", r2, 0.0, (1.0, 30.0)) for _ in range(2_000)]
    assert waits[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0] and waits[-1] == 30.0
    held = [("alice", "seeded"), ("alice", "committed")] + [
        ("bob", f"old{i}") for i in range(9_000)
    ]
    for i in range(3_000):  # committed after the load: layers grow
        filters.committed({"r1": 3 + i}, [("r1", "carol", f"late{i}")], unpersisted.__getitem__)
        held.append(("carol", f"late{i}"))
    assert not any(filters.rules_out("r1", sender, cid) for sender, cid in held)
    # Another sender's cids, or the same cid from another sender, are new keys.
    new = [("bob", f"late{i}") for i in range(5_000)] + [("dave", f"old{i}") for i in range(5_000)]
    passed = sum(not filters.rules_out("r1", sender, cid) for sender, cid in new)
    assert passed < 0.03 * len(new)
    assert not filters.rules_out("r3", "alice", "new")  # an untracked room is always asked


def test_a_filter_layer_holds_its_keys_within_its_false_positive_rate() -> None:
    """A full layer never rules out a key it was given, passes about 2 ** -k of other keys
    (what the filter's total rate assumes), and is no bigger than the budget reckoned for it
    before it was made."""
    from origin.key_filter import _Layer

    for capacity, k in ((5_000, 7), (20_000, 9), (2_000, 4)):
        layer = _Layer(capacity, k)
        held = [(f"u{i % 37}", f"cid-{i}") for i in range(capacity)]
        for key in held:
            layer.add(key)
        assert all(key in layer.bloom for key in held)
        others = [(f"u{i % 37}", f"other-{i}") for i in range(100_000)]
        rate = sum(key in layer.bloom for key in others) / len(others)
        # Python's hash is salted per process: 1.5 x the rate is > 5 standard deviations away.
        assert rate < 1.5 * 2.0**-k, (capacity, k, rate)
        assert 0 < layer.nbytes <= _Layer.nbytes_for(capacity, k)


def test_room_key_filters_stay_within_their_memory() -> None:
    """Past `max_bytes` the filters of rooms idle longest make way for an active room's; a room
    that finds none idle goes without (its keys are asked) and tries again at its next commit.
    A page read for a filter given up meanwhile is never applied to the room's next one."""
    from origin.key_filter import KeyFilters

    # A first layer (256 keys, ~11 bits each) is 357 bytes: the budget holds two.
    filters = KeyFilters(max_bytes=800, idle_commits=3)

    def commit(room: str, head: int, *cids: str) -> None:
        filters.committed({room: head}, [(room, "alice", c) for c in cids], lambda _: ())

    commit("r1", 0)
    commit("r2", 0)
    found = filters.next_to_load(0.0)
    assert found is not None and found[0] == "r1"
    assert filters.loaded("r1", found[1], [], upto=0, last=True)
    assert filters.rules_out("r1", "alice", "new") and filters.ready_rooms() == 1
    commit("r3", 0)  # r1 and r2 were committed to 1 and 2 commits ago: none idle
    assert set(filters.rooms) == {"r1", "r2"} and not filters.rules_out("r3", "alice", "new")
    commit("r2", 1)
    # r1 is idle now, but its 357 bytes would not make room for a first layer of 508 (200
    # seqs): it keeps its filter rather than give it up for nothing.
    commit("big", 200)
    assert set(filters.rooms) == {"r1", "r2"} and filters.evicted == 0
    commit("r3", 0)  # 357 bytes are enough for r3: r1 makes way
    assert set(filters.rooms) == {"r2", "r3"} and filters.evicted == 1
    assert filters.ready_rooms() == 0  # r1's was the ready one
    assert not filters.rules_out("r1", "alice", "new")  # asked again
    # r2's load reads a page, and meanwhile r2 loses its filter and starts a new one: that page
    # was read before the new filter began, so it may lack keys persisted since.
    loading = filters.next_to_load(0.0)
    assert loading is not None and loading[0] == "r2"
    for i in range(3):
        commit("r3", 1 + i)
    commit("r1", 1)  # r2 idle: it makes way for r1
    assert set(filters.rooms) == {"r3", "r1"}
    commit("r2", 2, "m2")  # r2 again: r3 and r1 are active, so r2 goes without
    assert "r2" not in filters.rooms
    for i in range(3):
        commit("r3", 5 + i)
    commit("r2", 3, "m3")  # now r1 is idle: a new filter for r2
    assert set(filters.rooms) == {"r3", "r2"} and filters.rooms["r2"] is not loading[1]
    assert not filters.loaded("r2", loading[1], [("alice", "m1")], upto=1, last=True)
    assert not filters.rooms["r2"].ready  # the stale page changed nothing
    # A room that grows past what idle rooms can free loses its filter, and starts one sized for
    # its seqs at its next commit, to be loaded again; until its seqs alone pass the budget.
    evicted = filters.evicted
    for i in range(300):
        commit("r3", 9 + i, f"c{i}")
        assert filters.nbytes <= 800
    assert filters.evicted >= evicted + 2  # r2 made way, then r3 itself
    assert not filters.rooms["r3"].ready and filters.next_to_load(0.0) == (
        "r3",
        filters.rooms["r3"],
    )
    for i in range(300, 1_000):
        commit("r3", 9 + i, f"c{i}")
    assert "r3" not in filters.rooms and filters.nbytes == 0
    assert filters.ready_rooms() == sum(keys.ready for keys in filters.rooms.values()) == 0


def test_kafka_rooms_the_persister_caught_up_with_are_forgotten() -> None:
    """The sequencer's per-room marks (committed to the log, written to PostgreSQL) go once the
    persister has caught up, so they hold the rooms of the last moments, not every room since
    the start; a room whose transaction is in flight keeps them until it is settled, since the
    persister may report its commit first."""
    from origin.kafka_sequencer import Unpersisted

    state = Unpersisted()
    state.acked.update({"r1": 3, "r2": 4})
    state.persisted_upto("r1", 3)
    state.persisted_upto("r2", 2)
    state.prune()
    assert (state.acked, state.persisted) == ({"r2": 4}, {"r2": 2})
    assert state.behind() == ["r2"] and state.caught_up(["r1"]) and not state.caught_up(["r2"])
    # r1's next transaction committed; the persister says so before the sequencer settles it.
    state.persisted_upto("r1", 5)
    state.prune(committing={"r1": 5})
    state.acked["r1"] = 5  # settled
    assert state.caught_up(["r1"]) and state.behind() == ["r2"]
    state.persisted_upto("r2", 4)
    state.prune()
    assert (state.acked, state.persisted) == ({}, {})
    assert state.caught_up(["r1", "r2"]) and state.behind() == []


def test_kafka_entries_go_once_the_persister_wrote_their_whole_commit() -> None:
    """The sequencer's unpersisted entries (keys, and the targets edits and deletes check)
    answer until PostgreSQL holds every event of the commit that made them, in each room; a
    message's entry replaced by a later delete's stays until that delete is written; a commit
    the persister reported before the sequencer settled it goes at the next prune."""
    from node.events import Event
    from origin.kafka_sequencer import Target, Unpersisted

    def event(room: str, seq: int, cid: str) -> Event:
        return Event(room=room, seq=seq, type="message", sender="ann", ts=seq, cid=cid)

    def message(room: str, seq: int) -> tuple[Target, int]:
        return Target("message", "ann", False), seq

    state = Unpersisted()
    state.add(
        {"r1": 2, "r2": 1},
        {
            ("r1", "ann", "a"): event("r1", 1, "a"),
            ("r1", "ann", "b"): event("r1", 2, "b"),
            ("r2", "ann", "c"): event("r2", 1, "c"),
        },
        {("r1", 1): message("r1", 1), ("r1", 2): message("r1", 2), ("r2", 1): message("r2", 1)},
    )
    # r1's seq 3 deletes its seq 1: the entry for seq 1 is the delete's now.
    state.add(
        {"r1": 3},
        {("r1", "ann", "d"): event("r1", 3, "d")},
        {("r1", 1): (Target("message", "ann", True), 3)},
    )
    assert state.keys_of("r1") == [("ann", "a"), ("ann", "b"), ("ann", "d")]
    state.persisted_upto("r1", 1)  # half of r1's first commit
    state.prune()
    assert ("r1", "ann", "a") in state.keys and len(state) == 7
    state.persisted_upto("r1", 2)
    state.prune()
    assert set(state.keys) == {("r2", "ann", "c"), ("r1", "ann", "d")}
    assert state.targets[("r1", 1)] == (Target("message", "ann", True), 3)  # the delete's
    assert ("r1", 2) not in state.targets and state.keys_of("r1") == [("ann", "d")]
    state.persisted_upto("r1", 3)
    state.persisted_upto("r2", 1)
    state.prune()
    assert len(state) == 0 and state.keys_of("r1") == []
    # r2's next commit, reported while in flight: pruned once settled, by the next prune.
    state.persisted_upto("r2", 2)
    state.prune(committing={"r2": 2})
    state.add({"r2": 2}, {("r2", "ann", "e"): event("r2", 2, "e")}, {})
    assert len(state) == 1
    state.prune()
    assert len(state) == 0 and state.behind() == [] and (state.acked, state.persisted) == ({}, {})


async def test_a_kafka_log_is_shielded_once_it_serves_unless_its_start_was_cancelled() -> None:
    """The shard's log is shielded from the store's cancellation from the moment it serves
    (queued ops are committed through it at shutdown). A log whose start was cancelled in the
    same tick as it finished must not be: trio leaves such a task in its starter's nursery, and
    a shield would keep it, and the store's shutdown waiting on it, for good."""
    from origin.kafka_store import _ShieldWhenStarted

    said: list[None] = []

    class Status:
        def started(self, value: None = None) -> None:
            said.append(value)

    for cancelled in (False, True):
        # No checkpoint inside, on purpose: the start is cancelled, not yet interrupted.
        with trio.CancelScope() as outer:  # noqa: ASYNC100
            if cancelled:
                outer.cancel()
            with trio.CancelScope() as scope:  # noqa: ASYNC100
                _ShieldWhenStarted(Status(), scope).started()
                assert scope.shield is not cancelled
    assert said == [None, None]


async def test_while_unavailable_asks_again_only_while_unavailable_and_only_so_long(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from node.retry import while_unavailable

    calls: list[float] = []

    def answering(after: int, error: GB6Error) -> Any:
        async def call() -> str:
            calls.append(trio.current_time())
            if len(calls) <= after:
                raise error
            return "done"

        return call

    unavailable = GB6Error("unavailable", "the link is reconnecting")
    start = trio.current_time()
    assert await while_unavailable(answering(3, unavailable), within=5) == "done"
    assert len(calls) == 4 and 0.7 - 1e-6 <= calls[-1] - start < 1  # 0.1 + 0.2 + 0.4
    calls.clear()
    with pytest.raises(GB6Error) as exc:  # for good: given up once `within` would pass
        await while_unavailable(answering(1_000, unavailable), within=5)
    assert exc.value is unavailable and trio.current_time() - calls[0] <= 5 and len(calls) == 6
    calls.clear()
    with pytest.raises(GB6Error) as exc:  # any other error: at once
        await while_unavailable(answering(1, GB6Error("invalid", "no")), within=5)
    assert exc.value.code == "invalid" and len(calls) == 1
