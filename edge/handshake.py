"""The WebSocket opening handshake (RFC 6455 §4.2) as a pure core over h11.

wsproto's server handshake drops bytes that arrive in the same packet as the upgrade request
(a client that sends its `hello` right behind the request would never be answered), so the
gateway does the handshake here and hands the leftover bytes to its frame reader (`edge.wsread`).
"""

from __future__ import annotations

import attrs
import h11
from wsproto.utilities import generate_accept_token

PATH = "/v1/ws"


@attrs.frozen
class Accepted:
    response: bytes
    trailing: bytes


@attrs.frozen
class Rejected:
    response: bytes


def _reject(status: int, reason: str) -> Rejected:
    body = reason.encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode()
    return Rejected(head + body)


class ServerHandshake:
    def __init__(self, max_bytes: int = 16384) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_bytes)

    def feed(self, data: bytes, *, draining: bool = False) -> Accepted | Rejected | None:
        """None while the request is incomplete; then the answer to send."""
        self._h11.receive_data(data)
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError:
            return _reject(400, "Bad Request")
        if event is h11.NEED_DATA:
            return None
        if not isinstance(event, h11.Request):
            return _reject(400, "Bad Request")
        headers = {k.lower(): v for k, v in event.headers}
        target = event.target.split(b"?", 1)[0].decode("latin-1")
        if target != PATH:
            return _reject(404, "Not Found")
        if draining:
            return _reject(503, "Service Unavailable")
        tokens = {t.strip().lower() for t in headers.get(b"connection", b"").split(b",")}
        key = headers.get(b"sec-websocket-key")
        if (
            event.method != b"GET"
            or headers.get(b"upgrade", b"").lower() != b"websocket"
            or b"upgrade" not in tokens
            or headers.get(b"sec-websocket-version") != b"13"
            or not key
        ):
            return _reject(400, "Bad Request")
        accept = generate_accept_token(key)
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        return Accepted(response, self._h11.trailing_data[0])
