"""The HTTP port's answers while the process starts (its store loading, a Kafka log
recovering, migrations waiting on another process): before, the port was bound and nothing
answered, so an HTTP liveness check timed out and an orchestrator restarted a start that only
needed time.

While starting: `GET /healthz` is `200 {"status": "starting"}` (alive), `GET /readyz` is
`503 {"status": "starting"}`, anything else `503` `unavailable` with `Retry-After`. Each
connection gets one answer and is closed. Once the components serve, the full HTTP app takes
the same listening socket (`answer_while_starting` returns; answers under way get a second).

A small h11 server of our own rather than the app: Quart's app starts with the process's
blueprints, which need the started components.
"""

from __future__ import annotations

import socket
from typing import Final

import h11
import orjson
import trio

from node.errors import UNAVAILABLE, GB6Error
from node.log import log

_MAX_CONNECTIONS: Final = 64  # answered at once; more are closed unanswered
_ANSWER_S: Final = 5.0  # a client that has not sent its request by then is closed
_MAX_REQUEST_BYTES: Final = 16 << 10
_RETRY_AFTER_MS: Final = 1000
_HANDOVER_S: Final = 0.25
_ACCEPT_PAUSE_S: Final = 0.1
_LINGER_S: Final = 1.0  # after the answer: what the client still sends is read this long
_LINGER_BYTES: Final = 1 << 20  # and this much (a larger body's sender gets a reset)


async def answer_while_starting(
    sock: socket.socket, started: trio.Event, *, task_status: trio.TaskStatus[None]
) -> None:
    """Answer on `sock` (listening; left open) until `started` is set."""
    # A listener of trio's: it passes over the errors `accept` reports for a connection
    # already gone (ECONNABORTED, EPROTO, ...).
    async with (
        trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup())) as listener,
        trio.open_nursery() as answering,
    ):
        task_status.started()
        with trio.CancelScope() as accepting:
            answering.start_soon(_cancel_when_set, started, accepting)
            failing = False
            while True:
                try:
                    conn = await listener.accept()
                except OSError as exc:  # out of descriptors: the process's limit, for now
                    if not failing:  # once a spell, not ten times a second
                        log("starting_http_accept_failed", error=exc.strerror)
                    failing = True
                    await trio.sleep(_ACCEPT_PAUSE_S)
                    continue
                failing = False
                if len(answering.child_tasks) > _MAX_CONNECTIONS:
                    await conn.aclose()
                    continue
                answering.start_soon(_answer, conn)
        # Answers under way get a moment, not `_ANSWER_S`: the process is ready.
        answering.cancel_scope.deadline = trio.current_time() + _HANDOVER_S


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def _answer(conn: trio.SocketStream) -> None:
    async with conn:
        try:
            with trio.move_on_after(_ANSWER_S):
                await _answer_once(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left
        except Exception as exc:  # a bug of ours: this connection only, never the start
            log("starting_http_answer_failed", error=repr(exc))


async def _answer_once(conn: trio.SocketStream) -> None:
    proto = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
    request = await _request(conn, proto)
    if request is None:
        return
    status, fields, retry = _reply(request.method, request.target.partition(b"?")[0])
    body = orjson.dumps(fields)
    headers = [("content-type", "application/json"), ("connection", "close")]
    if retry:
        headers.append(("retry-after", str(_RETRY_AFTER_MS // 1000)))
    headers.append(("content-length", str(len(body))))
    out = proto.send(h11.Response(status_code=status, headers=headers)) or b""
    if request.method != b"HEAD":  # a HEAD answer has no body (h11 refuses one)
        out += proto.send(h11.Data(data=body)) or b""
    out += proto.send(h11.EndOfMessage()) or b""
    await conn.send_all(out)
    # What the client sent beyond the request's head (a body, a pipelined request) is read
    # and dropped before closing: unread, the close would be a reset, which can lose the answer.
    await conn.send_eof()
    with trio.move_on_after(_LINGER_S):
        left = _LINGER_BYTES
        while left > 0 and (data := await conn.receive_some(4096)):
            left -= len(data)


async def _request(conn: trio.SocketStream, proto: h11.Connection) -> h11.Request | None:
    """The request's head; None if the client left or sent something that is not HTTP."""
    while True:
        try:
            event = proto.next_event()
        except h11.RemoteProtocolError:
            return None
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            try:
                data = await conn.receive_some(4096)
            except trio.BrokenResourceError:
                return None
            proto.receive_data(data)
            if not data:
                return None
        else:
            return None


def _reply(method: bytes, path: bytes) -> tuple[int, dict[str, object], bool]:
    """Status, JSON body, and whether to say when to retry."""
    if method in (b"GET", b"HEAD") and path == b"/healthz":
        return 200, {"status": "starting"}, False
    if method in (b"GET", b"HEAD") and path == b"/readyz":
        return 503, {"status": "starting"}, False
    return 503, GB6Error(UNAVAILABLE, "the process is starting; retry").to_json(), True
