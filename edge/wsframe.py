"""Server-to-client WebSocket frames, built once and written as bytes to many sockets.

Frames a server sends are never masked (RFC 6455 §5.1), so one encoded frame is valid for every
recipient: the fan-out path encodes an event once and writes the same bytes everywhere.
"""

from __future__ import annotations

import struct

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PONG = 0xA


def frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def payload(data: bytes) -> bytes:
    """The payload of one whole unmasked frame built by `frame`."""
    n = data[1] & 0x7F
    return data[2 + (2 if n == 126 else 8 if n == 127 else 0) :]


def text(payload: bytes) -> bytes:
    """A final text frame carrying `payload` (UTF-8 JSON)."""
    return frame(OP_TEXT, payload)


def close(code: int, reason: str = "") -> bytes:
    data = reason.encode("utf-8")[:120]
    return frame(OP_CLOSE, struct.pack("!H", code) + data)
