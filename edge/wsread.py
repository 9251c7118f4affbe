"""Client-to-server WebSocket frames (RFC 6455 §5) → messages: a pure, allocation-light core.

wsproto parses each frame through several generator and object layers and unmasks in pure
Python byte by byte; on the gateway's hot path that was a tenth of the event loop's time. This
parser handles exactly what a GB6 server needs: masked frames only, no extensions (RSV bits must
be zero), fragmentation (each fragment counting at least `FRAGMENT_WEIGHT` bytes against the
transport limit), control frames (at most 125 bytes, never fragmented; a close's code one a
peer may send, its reason UTF-8), UTF-8 checked text, and the message size limits: a message
above `limit` is dropped whole and reported once it ends (the connection stays usable); one
growing past `transport_limit` is an error at once (the gateway closes with 1009), so no more
than that is ever buffered.

`feed(data)` returns the events completed by `data`, in order:
    ("text", str) | ("binary", None) | ("too_large", None) | ("ping", bytes) | ("pong", None)
    | ("close", (code, reason)) | ("error", (close_code, why))
After an "error" or "close" the parser accepts nothing more.
"""

from __future__ import annotations

import codecs
import struct
from typing import Any, Final

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

FRAGMENT_WEIGHT: Final = 64  # the bytes a fragment counts for at least (see `_data`)

Event = tuple[str, Any]


def _sendable_close_code(code: int) -> bool:
    """RFC 6455 §7.4: the codes an endpoint may put in a close frame."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask, as one big-integer operation."""
    n = len(payload)
    if n == 0:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class FrameReader:
    def __init__(self, limit: int, transport_limit: int) -> None:
        self.limit = limit
        self.transport_limit = max(transport_limit, 2 * limit)
        self._buf = bytearray()
        self._msg_op: int | None = None  # opcode of the fragmented message in progress
        self._parts: list[bytes] = []
        self._size = 0
        self._weight = 0  # the message in progress's fragments, each at least the floor
        # FRAGMENT_WEIGHT, or less under a small limit (a message of it in 1,024 fragments).
        self._fragment_floor = max(1, min(FRAGMENT_WEIGHT, limit // 1024))
        self._dead = False

    def feed(self, data: bytes) -> list[Event]:
        if self._dead:
            return []
        self._buf += data
        out: list[Event] = []
        buf = self._buf
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            fin, op, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            if b0 & 0x70:
                return self._fail(out, 1002, "reserved bits set")
            if not b1 & 0x80:
                return self._fail(out, 1002, "client frames must be masked")
            if op >= 0x8:
                if not fin or n > 125:
                    return self._fail(out, 1002, "bad control frame")
            elif op not in (OP_CONT, OP_TEXT, OP_BINARY):
                return self._fail(out, 1002, f"unknown opcode {op:#x}")
            # Refuse before buffering: a frame that would pass the transport limit ends here.
            if op < 0x8 and self._size + n > self.transport_limit:
                return self._fail(out, 1009, "message too big")
            if end - pos < head + 4 + n:
                break
            mask = bytes(buf[pos + head : pos + head + 4])
            start = pos + head + 4
            payload = unmask(bytes(buf[start : start + n]), mask)
            pos = start + n
            if op >= 0x8:
                if not self._control(op, payload, out):
                    return out
                continue
            if not self._data(fin, op, payload, out):
                return out
        del buf[:pos]
        return out

    def _control(self, op: int, payload: bytes, out: list[Event]) -> bool:
        if op == OP_PING:
            out.append(("ping", payload))
        elif op == OP_PONG:
            out.append(("pong", None))
        elif op != OP_CLOSE:
            self._fail(out, 1002, f"unknown opcode {op:#x}")
            return False
        else:
            if len(payload) == 1:
                self._fail(out, 1002, "bad close frame")
                return False
            code = struct.unpack("!H", payload[:2])[0] if payload else 1005
            if payload and not _sendable_close_code(code):
                self._fail(out, 1002, f"close code {code} may not be sent")
                return False
            try:
                reason = codecs.decode(payload[2:], "utf-8")
            except UnicodeDecodeError:
                self._fail(out, 1007, "close reason is not UTF-8")
                return False
            out.append(("close", (code, reason)))
            self._dead = True
            return False
        return True

    def _data(self, fin: int, op: int, payload: bytes, out: list[Event]) -> bool:
        if op == OP_CONT:
            if self._msg_op is None:
                self._fail(out, 1002, "continuation without a message")
                return False
        elif self._msg_op is not None:
            self._fail(out, 1002, "new message inside a fragmented one")
            return False
        else:
            self._msg_op = op
        # Each fragment counts at least `FRAGMENT_WEIGHT` bytes against the transport limit:
        # a flood of tiny (or empty) ones cannot hold memory or time without bound.
        self._weight += max(len(payload), self._fragment_floor)
        if self._weight > self.transport_limit:
            self._fail(out, 1009, "message in too many fragments")
            return False
        self._size += len(payload)
        if self._size > self.limit:
            self._parts.clear()
        elif payload:
            self._parts.append(payload)
        if not fin:
            return True
        msg_op, size = self._msg_op, self._size
        parts, self._parts = self._parts, []
        self._msg_op, self._size, self._weight = None, 0, 0
        if size > self.limit:
            out.append(("too_large", None))
        elif msg_op == OP_BINARY:
            out.append(("binary", None))
        else:
            raw = parts[0] if len(parts) == 1 else b"".join(parts)  # b"": no parts
            try:
                out.append(("text", codecs.decode(raw, "utf-8")))
            except UnicodeDecodeError:
                self._fail(out, 1007, "text is not UTF-8")
                return False
        return True

    def _fail(self, out: list[Event], code: int, why: str) -> list[Event]:
        self._dead = True
        self._buf.clear()
        out.append(("error", (code, why)))
        return out
