"""A minimal WebSocket client (RFC 6455) for the load generator: just what GB6's protocol needs.

Client frames are masked text frames; server frames are read by header only. No extensions are
offered, so the server never compresses. `BlockingClient` is for bootstrap steps (room creation)
where speed does not matter; the load workers drive the same framing from their own event loop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import socket
import time
from typing import Any
from urllib.parse import urlsplit

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_TEXT = 0x1
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_rand = random.Random()


def parse_ws_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError(f"only ws:// URLs are supported, not {url!r}")
    host = parts.hostname or "127.0.0.1"
    return host, parts.port or 80, parts.path or "/"


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The upgrade request and the `Sec-WebSocket-Accept` value the server must answer."""
    key = base64.b64encode(_rand.getrandbits(128).to_bytes(16, "big"))
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    req = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return req, accept


def check_handshake(head: bytes, accept: bytes) -> None:
    """Raise unless `head` (the response up to the blank line) is a valid 101 for `accept`."""
    status, _, rest = head.partition(b"\r\n")
    if b" 101 " not in status + b" ":
        raise ConnectionError(f"websocket upgrade refused: {status.decode(errors='replace')}")
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept" and value.strip() == accept:
            return
    raise ConnectionError("websocket upgrade: bad or missing Sec-WebSocket-Accept")


def frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = _rand.getrandbits(32).to_bytes(4, "big")
    if n == 0:
        return head + mask
    # XOR as one big integer: C speed, no per-byte Python loop.
    reps = (n + 3) // 4
    key = int.from_bytes((mask * reps)[:n], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")
    return head + mask + masked


def close_frame(code: int = 1000) -> bytes:
    return frame(code.to_bytes(2, "big"), OP_CLOSE)


def next_frame(buf: bytes | bytearray, pos: int) -> tuple[int, int, int, int] | None:
    """(opcode, payload start, payload end, fin) of the server frame at `pos`, or None if the
    buffer does not hold all of it yet. Server frames are never masked."""
    end = len(buf)
    if end - pos < 2:
        return None
    b0 = buf[pos]
    ln = buf[pos + 1] & 0x7F
    start = pos + 2
    if ln == 126:
        if end - pos < 4:
            return None
        ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
        start = pos + 4
    elif ln == 127:
        if end - pos < 10:
            return None
        ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
        start = pos + 10
    if start + ln > end:
        return None
    return b0 & 0x0F, start, start + ln, b0 >> 7


class BlockingClient:
    """A blocking client for setup steps: connect, request, read replies."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        host, port, path = parse_ws_url(url)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, accept = handshake_request(host, port, path)
        self.sock.sendall(req)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during websocket handshake")
            buf += chunk
        head, _, self.buf = buf.partition(b"\r\n\r\n")
        check_handshake(head, accept)
        self.next_id = 1

    def send(self, obj: dict[str, Any]) -> None:
        self.sock.sendall(frame(json.dumps(obj, separators=(",", ":")).encode()))

    def recv(self) -> dict[str, Any]:
        while True:
            got = next_frame(self.buf, 0)
            if got is not None:
                opcode, start, end, _fin = got
                payload, self.buf = self.buf[start:end], self.buf[end:]
                if opcode == OP_TEXT:
                    out: dict[str, Any] = json.loads(payload)
                    return out
                if opcode == OP_PING:
                    self.sock.sendall(frame(payload, OP_PONG))
                elif opcode == OP_CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    raise ConnectionError(f"server closed the websocket: {code} {payload[2:]!r}")
                continue
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its `ok` (skipping pushes); raise on `error`."""
        req_id = self.next_id
        self.next_id += 1
        self.send({"op": op, "id": req_id, **fields})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = self.recv()
            if msg.get("re") != req_id:
                continue
            if msg.get("op") == "ok":
                return msg
            raise RuntimeError(f"{op} failed: {msg}")
        raise TimeoutError(f"{op}: no reply")

    def close(self) -> None:
        try:
            self.sock.sendall(close_frame())
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
