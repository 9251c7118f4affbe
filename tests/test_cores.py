"""The pure cores, tested with bytes and values: no sockets, no Trio."""

from __future__ import annotations

import base64

import pytest

from edge import protocol as p
from edge import wsframe
from edge.handshake import Accepted, Rejected, ServerHandshake
from edge.inbound import MessageAssembler, Verdict
from node.config import Limits
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


def test_assembler_limits_message_size_without_buffering_past_the_transport_limit() -> None:
    a = MessageAssembler(limit=10, transport_limit=20)
    assert a.feed("12345", False) == (Verdict.PARTIAL, "")
    assert a.feed("67890", True) == (Verdict.COMPLETE, "1234567890")
    assert a.feed("x" * 8, False)[0] is Verdict.PARTIAL
    assert a.feed("x" * 8, True) == (Verdict.TOO_LARGE, "")
    assert a.feed("ok", True) == (Verdict.COMPLETE, "ok")  # usable after a too-large one
    assert a.feed("é" * 11, False)[0] is Verdict.TRANSPORT_LIMIT  # 22 bytes in UTF-8


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


def test_token_digests_are_not_reversible_ids() -> None:
    from node.ids import new_id, secret_digest

    ident = new_id("usr")
    assert ident.startswith("usr_") and len(ident) > 20
    assert secret_digest("a") != secret_digest("b")
    assert base64.b16decode(secret_digest("a").upper())  # hex, 32 bytes
