"""The Python client's protocol core: requests in, frames out; frames in, replies and events out.

Nothing here does I/O or imports trio (STYLE §1): `node.client` drives one `ClientCore` per
client, across all of its connections, and tests drive it with plain strings.

Phases (data, as h11 does it):

    DISCONNECTED --connection_made--> HELLO --hello ok--> READY --`reconnect` event--> DRAINING
    HELLO | READY | DRAINING --connection_lost--> DISCONNECTED
    any --close--> CLOSED (terminal)

Rules:
- Only READY writes requests (`next_outgoing`). HELLO writes only the hello; DRAINING writes
  nothing and waits for the replies it is owed; DISCONNECTED queues.
- Every request gets an integer `id`, unique for the client's lifetime. A request is *pending*
  until its reply arrives, the caller gives up (`cancel`), or the connection that carried it is
  lost and the request is not one that may be repeated.
- On `connection_lost` the pending requests are sorted by `Kind`: APPEND ops (send, edit,
  delete, react) are written again on the next connection with the same `cid`, so the origin
  deduplicates them and the caller gets the first `ok`'s seq; RETRY ops (reads and idempotent
  writes) are written again as they are; ONCE ops that had been written fail with
  `unavailable` (they may or may not have taken effect), ONCE ops never written wait.
  An `unsubscribe` is answered locally: the new connection has no subscription to drop.
- Subscriptions: `_subs[room]` is the last seq handed to the application. It is set from the
  `subscribe` ok (to that request's `after`: the server's ok comes before the restarted stream,
  so everything after the ok belongs to the new stream) and advanced by `delivered`. Seq events
  of rooms not in `_subs`, or with a seq not above it, are dropped: a stream restarted by a
  resume may repeat what the application already has.
- After each hello ok, every subscribed room is subscribed again with `after` = its last seq
  (internal requests), before any other queued request is written. One refused `unavailable`
  is asked again, up to `RESUME_ATTEMPTS` in all; then, or on another error, the application
  gets a `client.subscription_lost` event.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import attrs
import orjson

from node.errors import GB6Error
from node.events import SEQ_TYPES

logger = logging.getLogger("gb6.client")

DEFAULT_HEARTBEAT_MS: Final = 30_000
DEFAULT_MAX_FRAME_BYTES: Final = 1 << 20  # PROTOCOL.md: the default message limit

APPEND_OPS: Final = frozenset({"send", "edit", "delete", "react"})
RETRY_OPS: Final = frozenset(
    {"ping", "rooms", "history", "search", "subscribe", "unsubscribe", "receipt", "presence.set"}
)
RESUME_ATTEMPTS: Final = 3  # a resume subscribe refused `unavailable` is asked again, so often
# Local event types (never sent by a server): a subscription that a resume could not restore.
SUBSCRIPTION_LOST: Final = "client.subscription_lost"

# Close codes (PROTOCOL.md). Any other close, or none at all, is worth a reconnect.
CLOSE_BAD_HANDSHAKE: Final = 4001
CLOSE_UNAUTHORIZED: Final = 4003
CLOSE_TOO_SLOW: Final = 4008
CLOSE_DRAINING: Final = 4009


class ClientError(GB6Error):
    """A request failed: `code` is a protocol error code (PROTOCOL.md), from the server's
    `error` reply, or `unavailable` / `too_large` / `invalid` decided by the client itself."""

    def __init__(self, code: str, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(code, message, retry_after_ms=retry_after_ms)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"

    def copy(self) -> ClientError:
        """A fresh exception with the same fields (one instance per task that raises it)."""
        return type(self)(self.code, self.message, self.retry_after_ms)


class Unauthorized(ClientError):
    """The token was refused (hello `unauthorized`, close 4003). Terminal: the client stops."""

    def __init__(
        self,
        code: str = "unauthorized",
        message: str = "unauthorized",
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(code, message, retry_after_ms)


class ConnectionLost(ClientError):
    """No connection carried the request to an answer: the client is closed, gave up
    reconnecting, or lost the connection after writing a request that must not be repeated."""

    def __init__(
        self,
        code: str = "unavailable",
        message: str = "connection lost",
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(code, message, retry_after_ms)


class Phase(enum.Enum):
    DISCONNECTED = "disconnected"
    HELLO = "hello"
    READY = "ready"
    DRAINING = "draining"
    CLOSED = "closed"


class Kind(enum.Enum):
    APPEND = "append"  # written again after a reconnect, same cid
    RETRY = "retry"  # written again after a reconnect
    ONCE = "once"  # fails with `unavailable` if its connection is lost after it was written
    INTERNAL = "internal"  # heartbeat pings and resume subscribes: nobody waits for them


class CloseAction(enum.Enum):
    RECONNECT = "reconnect"
    UNAUTHORIZED = "unauthorized"
    BAD_HANDSHAKE = "bad_handshake"


def close_action(code: int | None) -> CloseAction:
    """What a connection that ended with close `code` (None: no close frame) calls for."""
    if code == CLOSE_UNAUTHORIZED:
        return CloseAction.UNAUTHORIZED
    if code == CLOSE_BAD_HANDSHAKE:
        return CloseAction.BAD_HANDSHAKE
    return CloseAction.RECONNECT


def kind_of(op: str) -> Kind:
    if op in APPEND_OPS:
        return Kind.APPEND
    if op in RETRY_OPS:
        return Kind.RETRY
    return Kind.ONCE


def new_cid() -> str:
    return uuid.uuid4().hex


def error_from_frame(frame: Mapping[str, Any]) -> ClientError:
    code = frame.get("code")
    message = frame.get("message")
    retry = frame.get("retry_after_ms")
    code = code if isinstance(code, str) else "internal"
    message = message if isinstance(message, str) else code
    retry = retry if isinstance(retry, int) and not isinstance(retry, bool) else None
    cls = Unauthorized if code == "unauthorized" else ClientError
    return cls(code, message, retry)


# --- outputs of `receive` and of the connection transitions ---------------------------------


@attrs.frozen(slots=True)
class User:
    id: str
    name: str


@attrs.frozen(slots=True)
class HelloDone:
    user: User
    session: str
    heartbeat_ms: int
    # Requests the client answers itself now that a connection is ready (unsubscribes queued
    # while disconnected: the new connection has no subscription to drop).
    answers: tuple[Reply, ...] = ()


@attrs.frozen(slots=True)
class HelloFailed:
    error: ClientError


@attrs.frozen(slots=True)
class Reply:
    """The `ok` for the application's request `req_id` (the frame without `op` and `re`)."""

    req_id: int
    fields: dict[str, Any]


@attrs.frozen(slots=True)
class Failure:
    req_id: int
    error: ClientError


@attrs.frozen(slots=True)
class Deliver:
    """An event for the application; call `delivered` once it has been handed over."""

    event: dict[str, Any]
    room: str | None = None
    seq: int | None = None  # set for seq events (message, edit, delete, react)


@attrs.frozen(slots=True)
class Drain:
    """The server is draining (`reconnect` event): finish what is owed, then reconnect."""


Output = HelloDone | HelloFailed | Reply | Failure | Deliver | Drain


@attrs.define(slots=True)
class _Pending:
    id: int
    op: str
    kind: Kind
    text: str
    room: str | None = None
    after: int = 0  # subscribe
    sent: bool = False
    attempts: int = 1  # a resume subscribe: how many times it was asked


class ClientCore:
    """One client's protocol state across its connections. Not thread-safe; no I/O."""

    def __init__(self, token: str, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._token = token
        self._max_frame_bytes = max_frame_bytes
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._queue: deque[int] = deque()  # ids to write on the current connection, in order
        self._subs: dict[str, int] = {}
        self._hello_id: int | None = None
        self._closed_error: ClientError | None = None
        self.phase = Phase.DISCONNECTED

    # --- observation ---------------------------------------------------------------------

    @property
    def subscriptions(self) -> Mapping[str, int]:
        """Subscribed rooms → the last seq delivered to the application."""
        return dict(self._subs)

    @property
    def owed(self) -> int:
        """Application requests written on this connection whose reply has not arrived."""
        return sum(1 for p in self._pending.values() if p.sent and p.kind is not Kind.INTERNAL)

    @property
    def wants_to_write(self) -> bool:
        """Frames are queued for the current connection (a reply may queue some: a resume
        subscribe asked again)."""
        return self.phase is Phase.READY and bool(self._queue)

    def statistics(self) -> dict[str, int]:
        return {
            "pending": sum(1 for p in self._pending.values() if p.kind is not Kind.INTERNAL),
            "queued": len(self._queue),
            "subscriptions": len(self._subs),
        }

    # --- requests ------------------------------------------------------------------------

    def request(self, op: str, fields: Mapping[str, Any]) -> int:
        """Register an application request; returns its id. Raises ClientError when it can
        never be answered (client closed, frame too large, reserved op or field)."""
        if self._closed_error is not None:
            raise self._closed_error.copy()
        if op == "hello":
            raise ClientError("invalid", "hello is sent by the client itself")
        if "id" in fields or "op" in fields:
            raise ClientError("invalid", "fields 'id' and 'op' are set by the client")
        kind = kind_of(op)
        body = dict(fields)
        if kind is Kind.APPEND and body.get("cid") is None:
            body["cid"] = new_cid()
        pending = self._add(op, kind, body)
        if op == "subscribe":
            after = body.get("after", 0)
            pending.after = after if isinstance(after, int) else 0
        if op == "unsubscribe" and pending.room is not None:
            self._subs.pop(pending.room, None)  # no event of it reaches the application again
        if self.phase is Phase.READY:
            self._queue.append(pending.id)
        return pending.id

    def ping(self) -> None:
        """Queue a heartbeat ping (READY only; nobody waits for its reply)."""
        if self.phase is Phase.READY:
            self._queue.append(self._add("ping", Kind.INTERNAL, {}).id)

    def cancel(self, req_id: int) -> None:
        """The caller stopped waiting: forget the request (a late reply is ignored)."""
        self._pending.pop(req_id, None)

    def next_outgoing(self) -> str | None:
        """The next frame to write on the current connection, or None. Marks it written."""
        if self.phase is not Phase.READY:
            return None
        while self._queue:
            pending = self._pending.get(self._queue.popleft())
            if pending is not None and not pending.sent:
                pending.sent = True
                return pending.text
        return None

    def _add(self, op: str, kind: Kind, fields: dict[str, Any]) -> _Pending:
        self._next_id += 1
        req_id = self._next_id
        text = orjson.dumps({"op": op, "id": req_id, **fields}).decode()
        if len(text.encode()) > self._max_frame_bytes:
            raise ClientError("too_large", f"request over {self._max_frame_bytes} bytes")
        room = fields.get("room")
        pending = _Pending(req_id, op, kind, text, room if isinstance(room, str) else None)
        self._pending[req_id] = pending
        return pending

    # --- connection transitions ----------------------------------------------------------

    def connection_made(self) -> str:
        """A new connection is open: returns the hello frame to write first."""
        if self.phase is not Phase.DISCONNECTED:
            raise RuntimeError(f"connection_made in phase {self.phase.value}")
        self._next_id += 1
        self._hello_id = self._next_id
        self.phase = Phase.HELLO
        return orjson.dumps({"op": "hello", "id": self._hello_id, "token": self._token}).decode()

    def _ready(self) -> tuple[Reply, ...]:
        """Hello ok: queue the resume subscribes, then every request not yet written."""
        self.phase = Phase.READY
        self._queue.clear()
        out: list[Reply] = []
        waiting = list(self._pending.values())
        own_subscribe = {p.room for p in waiting if p.op == "subscribe" and p.kind is Kind.RETRY}
        for room, last in self._subs.items():
            if room not in own_subscribe:  # the application's own subscribe restores it
                sub = self._add("subscribe", Kind.INTERNAL, {"room": room, "after": last})
                sub.after = last
                self._queue.append(sub.id)
        for pending in waiting:
            if pending.op == "unsubscribe":
                out.append(Reply(pending.id, {}))
                del self._pending[pending.id]
            elif not pending.sent:
                self._queue.append(pending.id)
        return tuple(out)

    def connection_lost(self) -> list[Output]:
        """The current connection is gone. Returns the failures and local answers it causes."""
        if self.phase is Phase.CLOSED:
            return []
        self.phase = Phase.DISCONNECTED
        self._hello_id = None
        self._queue.clear()
        out: list[Output] = []
        for pending in list(self._pending.values()):
            if pending.kind is Kind.INTERNAL:
                del self._pending[pending.id]
            elif pending.op == "unsubscribe":
                out.append(Reply(pending.id, {}))
                del self._pending[pending.id]
            elif pending.sent and pending.kind is Kind.ONCE:
                out.append(
                    Failure(
                        pending.id,
                        ConnectionLost(
                            message=f"connection lost during {pending.op}; "
                            "it may or may not have taken effect"
                        ),
                    )
                )
                del self._pending[pending.id]
            else:
                pending.sent = False
        return out

    def close(self, error: ClientError) -> list[Output]:
        """Terminal: every pending and future request fails with (a copy of) `error`."""
        self.phase = Phase.CLOSED
        self._closed_error = error
        self._queue.clear()
        out: list[Output] = [
            Failure(p.id, error.copy())
            for p in self._pending.values()
            if p.kind is not Kind.INTERNAL
        ]
        self._pending.clear()
        return out

    # --- frames in -----------------------------------------------------------------------

    def receive(self, text: str | bytes) -> Output | None:
        """One frame from the server → at most one output."""
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            logger.warning("gb6 client: ignoring a frame that is not JSON")
            return None
        if not isinstance(frame, dict):
            logger.warning("gb6 client: ignoring a frame that is not an object")
            return None
        op = frame.get("op")
        if self.phase is Phase.HELLO:
            return self._receive_hello(frame)
        if op == "ok" or op == "error":
            return self._receive_reply(frame, ok=op == "ok")
        if op == "event":
            return self._receive_event(frame)
        logger.warning("gb6 client: ignoring a frame with op %r", op)
        return None

    def _receive_hello(self, frame: dict[str, Any]) -> Output | None:
        if frame.get("re") != self._hello_id or frame.get("op") not in ("ok", "error"):
            logger.warning("gb6 client: ignoring a frame before the hello reply")
            return None
        if frame["op"] == "error":
            return HelloFailed(error_from_frame(frame))
        user = frame.get("user")
        if not isinstance(user, dict) or not isinstance(user.get("id"), str):
            return HelloFailed(ClientError("internal", "hello ok without a user"))
        heartbeat = frame.get("heartbeat_ms")
        if not isinstance(heartbeat, int) or isinstance(heartbeat, bool) or heartbeat <= 0:
            heartbeat = DEFAULT_HEARTBEAT_MS
        session = frame.get("session")
        return HelloDone(
            User(user["id"], str(user.get("name", ""))),
            session if isinstance(session, str) else "",
            heartbeat,
            self._ready(),
        )

    def _receive_reply(self, frame: dict[str, Any], *, ok: bool) -> Output | None:
        re = frame.get("re")
        if not isinstance(re, int) or isinstance(re, bool):
            if not ok:
                err = error_from_frame(frame)
                logger.warning("gb6 client: error without a request id: %s", err.message)
            return None
        pending = self._pending.get(re)
        if pending is None:
            return None  # cancelled by its caller, or an internal request already forgotten
        if (
            not ok
            and self.phase is Phase.DRAINING
            and frame.get("code") == "unavailable"
            and pending.kind is not Kind.ONCE
        ):
            # A draining edge refused it without acting on it: write it again on the next
            # connection (resume subscribes are redone from `_subs` anyway).
            if pending.kind is Kind.INTERNAL:
                del self._pending[re]
            else:
                pending.sent = False
            return None
        del self._pending[re]
        if pending.kind is Kind.INTERNAL:
            if pending.op == "subscribe" and not ok:
                err = error_from_frame(frame)
                if err.code == "unavailable" and pending.attempts < RESUME_ATTEMPTS:
                    self._resubscribe(pending)  # the edge lags, or its origin is busy
                    return None
                return self._subscription_lost(pending, err)
            return None
        if not ok:
            return Failure(re, error_from_frame(frame))
        if pending.op == "subscribe" and pending.room is not None:
            self._subs[pending.room] = pending.after
        fields = {k: v for k, v in frame.items() if k not in ("op", "re")}
        return Reply(re, fields)

    def _resubscribe(self, pending: _Pending) -> None:
        """Ask again (at once: an edge whose pushes lag waits for them before it answers)."""
        if pending.room is None or pending.room not in self._subs:
            return  # unsubscribed meanwhile
        last = self._subs[pending.room]
        sub = self._add("subscribe", Kind.INTERNAL, {"room": pending.room, "after": last})
        sub.after, sub.attempts = last, pending.attempts + 1
        self._queue.append(sub.id)

    def _subscription_lost(self, pending: _Pending, err: ClientError) -> Output | None:
        if pending.room is None or self._subs.pop(pending.room, None) is None:
            return None
        event = {
            "op": "event",
            "type": SUBSCRIPTION_LOST,
            "room": pending.room,
            "after": pending.after,
            "code": err.code,
            "message": err.message,
        }
        return Deliver(event, pending.room)

    def _receive_event(self, frame: dict[str, Any]) -> Output | None:
        type_ = frame.get("type")
        if type_ == "reconnect":
            if self.phase is Phase.READY:
                self.phase = Phase.DRAINING
            return Drain()
        if type_ in SEQ_TYPES:
            room, seq = frame.get("room"), frame.get("seq")
            if not isinstance(room, str) or not isinstance(seq, int) or isinstance(seq, bool):
                logger.warning("gb6 client: ignoring a %s event without room and seq", type_)
                return None
            last = self._subs.get(room)
            if last is None or seq <= last:
                return None  # not subscribed (any more), or already delivered
            return Deliver(frame, room, seq)
        room = frame.get("room")
        return Deliver(frame, room if isinstance(room, str) else None)

    def delivered(self, output: Deliver) -> None:
        """The application has `output.event`: a resume starts after it."""
        if output.room is None or output.seq is None:
            return
        last = self._subs.get(output.room)
        if last is not None and output.seq > last:
            self._subs[output.room] = output.seq
