"""The Python client SDK: a Trio client of the GB6 protocol (PROTOCOL.md) on trio-websocket.

    async with gb6_connect(url, token) as client:
        room = await client.create_room("general")
        await client.subscribe(room["id"])
        ack = await client.send(room["id"], "hello")
        async for event in client.events():
            ...

Ownership and tasks. `gb6_connect` returns a `Client`, an async context manager that owns one
nursery. In it runs one connection manager; per connection it runs a reader (drives the pure
`ClientCore` in `node._client_core`), a writer (the only task that writes frames, in request
order) and a heartbeat. Entering connects and completes `hello` (raising `Unauthorized` or
`ConnectionLost` if that fails); leaving closes the socket (close code 1000, at most
`close_timeout` seconds) and cancels what is left. Exceptions from the body propagate unchanged.

Events and backpressure. `client.events()` yields event dicts as the server sent them
(`{"op": "event", "type": ..., ...}`) from one bounded memory channel of `event_buffer`
entries. When the application does not drain it, the reader blocks: replies to requests stop
arriving too, the server's queue for this connection grows, and the server eventually closes
it with 4008; the client then reconnects and resumes, so nothing is lost, only delayed. An
application that subscribes must therefore keep reading `events()`.

Reconnect and resume (`reconnect=True`). A connection that ends for any reason other than
close 4003 (unauthorized: terminal, `Unauthorized`) or 4001 (bad handshake: terminal) is
replaced after a bounded, jittered exponential backoff (`backoff_initial` doubling up to
`backoff_max`, each sleep drawn from [d/2, d]; a server's `retry_after_ms` is honoured). A
`reconnect` event (the edge is draining) makes the client stop writing, wait up to
`drain_timeout` seconds for the replies it is owed, and move to a new connection at once.
After each new `hello` the client subscribes again to every subscribed room with `after` = the
last seq it delivered from that room, and drops any seq event at or below it: the application
sees each event of a subscribed room exactly once, in seq order. Such a subscribe refused
`unavailable` (the new edge has not yet seen that seq, or its origin is busy) is asked again,
up to 3 times in all; a room it cannot restore is reported by a `client.subscription_lost`
event (with the error's `code` and `message`). `url` may be a callable
returning the URL to use for each attempt (service discovery, or a test's restarted node).

Requests across reconnects. `send`, `edit`, `delete` and `react` whose `ok` has not arrived are
written again on the next connection with the same `cid` (a uuid4 hex when the caller gives
none), so the caller gets the `ok` of the first write (same seq) and no duplicate exists.
Reads and idempotent writes (`ping`, `rooms`, `history`, `search`, `subscribe`, `unsubscribe`,
`receipt`, `presence.set`) are retried transparently. Any other request that had been written
when its connection was lost (`room.create`, `room.join`, `room.leave`, `room.add`,
`room.remove`, `typing`) fails with `ConnectionLost` (code `unavailable`): it may or may not
have happened.
Requests made while disconnected wait for the next connection; bound them with
`trio.move_on_after` / `trio.fail_after` (cancelling a request only stops waiting for it).

When the client stops for good (closed, `Unauthorized`, or a connection lost with
`reconnect=False`), pending and later requests raise that error, and `events()` ends after
the events already buffered (raising the error unless the application closed the client).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Final

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from node._client_core import (
    CLOSE_DRAINING,
    SUBSCRIPTION_LOST,
    ClientCore,
    ClientError,
    CloseAction,
    ConnectionLost,
    Deliver,
    Drain,
    Failure,
    HelloDone,
    HelloFailed,
    Output,
    Phase,
    Reply,
    Unauthorized,
    User,
    close_action,
    new_cid,
)

__all__ = [
    "SUBSCRIPTION_LOST",
    "Ack",
    "Client",
    "ClientError",
    "ConnectionLost",
    "EventStream",
    "Unauthorized",
    "User",
    "gb6_connect",
]

logger = logging.getLogger("gb6.client")

_FATAL_HELLO_CODES: Final = frozenset({"unauthorized", "invalid", "forbidden"})
_CLOSE_NORMAL: Final = 1000


@attrs.frozen(slots=True)
class Ack:
    """The `ok` of `send`, `edit`, `delete` or `react`: where the event landed."""

    room: str
    seq: int
    ts: int
    cid: str


@attrs.define(slots=True)
class _Waiter:
    done: trio.Event = attrs.Factory(trio.Event)
    reply: dict[str, Any] | None = None
    error: ClientError | None = None


@attrs.define(slots=True)
class _Ended:
    """How one connection ended (the first reason recorded wins)."""

    close_code: int | None = None
    reason: str = ""
    ready: bool = False  # it completed hello
    retry_after: float = 0.0
    error: ClientError | None = None  # terminal
    recorded: bool = False

    def record(self, close_code: int | None, reason: str) -> None:
        if not self.recorded:
            self.close_code, self.reason, self.recorded = close_code, reason, True


@attrs.define(eq=False)
class _Conn:
    """Per-connection state shared by its reader, writer and heartbeat."""

    ws: WebSocketConnection
    tasks: trio.CancelScope  # the reader's, writer's and heartbeat's nursery
    socket: trio.CancelScope  # around the whole socket, its closing handshake included
    ended: _Ended
    last_rx: float
    reader_blocked: bool = False

    def end(self, close_code: int | None, reason: str, *, abort: bool = False) -> None:
        """Stop the connection's tasks; then the socket is closed with 1000, or, with
        `abort`, dropped at once (a silent peer would not answer the closing handshake)."""
        self.ended.record(close_code, reason)
        self.tasks.cancel()
        if abort:
            self.socket.cancel()


class EventStream:
    """Async iterator over the client's events (the one receive channel; see the module doc)."""

    def __init__(self, client: Client, channel: trio.MemoryReceiveChannel[dict[str, Any]]) -> None:
        self._client = client
        self._channel = channel

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        try:
            return await self._channel.receive()
        except trio.EndOfChannel:
            error = self._client.error
            if error is not None and not self._client.closed_by_app:
                raise error.copy() from None
            raise StopAsyncIteration from None

    async def receive(self) -> dict[str, Any]:
        """The next event (bound the wait with `trio.fail_after`). Raises `StopAsyncIteration`
        or the client's terminal error once the stream has ended."""
        return await self.__anext__()

    def receive_nowait(self) -> dict[str, Any]:
        """The next buffered event; raises `trio.WouldBlock` when there is none."""
        return self._channel.receive_nowait()

    def statistics(self) -> trio.MemoryChannelStatistics:
        """The buffer's fill (`current_buffer_used` of `max_buffer_size`) and waiters."""
        return self._channel.statistics()


class Client:
    """A GB6 client session that survives reconnects: `async with gb6_connect(url, token)`.

    `url` is `ws://HOST:PORT/v1/ws` or a callable returning it; `token` a user token. Entering
    connects and says hello: it raises `Unauthorized` for a refused token and `ConnectionLost`
    when the node cannot be reached or answers nothing within `connect_timeout` seconds (the
    first connection is not retried). The other options are described in the module doc;
    `seed` fixes the backoff jitter (tests).

    After entering: `user` (id, name), `session` (of the current connection) and
    `heartbeat_ms` come from the latest `hello` ok; `reconnects` counts new connections.
    """

    def __init__(
        self,
        url: str | Callable[[], str],
        token: str,
        *,
        reconnect: bool = True,
        event_buffer: int = 1024,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        drain_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        max_frame_bytes: int = 1 << 20,
        max_incoming_bytes: int = 64 << 20,
        seed: int | None = None,
    ) -> None:
        if event_buffer < 1:
            raise ValueError("event_buffer must be at least 1")
        self.url = url
        self.reconnect = reconnect
        self.user: User | None = None
        self.session: str | None = None
        self.heartbeat_ms: int = 0
        self.reconnects = 0
        self.error: ClientError | None = None  # why the client stopped, once it has
        self.closed_by_app = False
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._drain_timeout = drain_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._max_incoming_bytes = max_incoming_bytes
        self._random = random.Random(seed)
        self._core = ClientCore(token, max_frame_bytes=max_frame_bytes)
        self._waiters: dict[int, _Waiter] = {}
        self._kick = trio.Event()  # set when there may be something to write
        self._stop = trio.Event()  # set by aclose
        self._events_send, events_receive = trio.open_memory_channel[dict[str, Any]](event_buffer)
        self._events = EventStream(self, events_receive)
        self._nursery_manager: AbstractAsyncContextManager[trio.Nursery] | None = None
        self._nursery: trio.Nursery | None = None

    # --- lifetime ------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        if self._nursery_manager is not None:
            raise RuntimeError("a Client is entered once")
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()
        self._nursery = nursery
        try:
            await nursery.start(self._run)
        except BaseException:
            # Nothing else runs in the nursery: close it and raise the connect error as is.
            nursery.cancel_scope.cancel()
            await self._nursery_manager.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the client; the body's exception, if any, propagates unchanged (the nursery
        is closed as if the body had finished, so the exception is never wrapped in a group)."""
        assert self._nursery_manager is not None
        self._close()  # no checkpoint before the nursery is closed, even when cancelled
        await self._nursery_manager.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Stop: pending and later requests raise `ConnectionLost`, `events()` ends, the socket
        is closed with 1000 (at most `close_timeout` seconds, then everything is cancelled).
        Returns at once; leaving the `async with` waits for the tasks to finish."""
        self._close()
        await trio.lowlevel.checkpoint()

    def _close(self) -> None:
        if self.error is None:
            self.closed_by_app = True
            self._terminate(ConnectionLost(message="the client is closed"))
        self._stop.set()
        if self._nursery is not None:
            scope = self._nursery.cancel_scope
            scope.deadline = min(scope.deadline, trio.current_time() + self._close_timeout)

    @property
    def connected(self) -> bool:
        """A connection is open and past hello (requests are being written)."""
        return self._core.phase is Phase.READY

    @property
    def subscriptions(self) -> Mapping[str, int]:
        """Subscribed rooms → the last seq delivered to the application from each."""
        return self._core.subscriptions

    def events(self) -> EventStream:
        """The event stream (always the same one; one consumer is expected)."""
        return self._events

    def statistics(self) -> dict[str, Any]:
        return {**self._core.statistics(), "events": self._events.statistics()}

    # --- requests ------------------------------------------------------------------------

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send request `op` with `fields`; return its `ok` (without `op` and `re`).

        Raises `ClientError` on an `error` reply (with `code`, `message`, `retry_after_ms`),
        `ConnectionLost` or `Unauthorized` as the module doc describes. Waits through
        reconnects; cancelling the caller only stops the waiting."""
        req_id = self._core.request(op, fields)
        waiter = _Waiter()
        self._waiters[req_id] = waiter
        self._kick.set()
        try:
            await waiter.done.wait()
        finally:
            self._waiters.pop(req_id, None)
            if not waiter.done.is_set():
                self._core.cancel(req_id)
        if waiter.error is not None:
            raise waiter.error
        assert waiter.reply is not None
        return waiter.reply

    async def ping(self) -> None:
        await self.request("ping")

    async def create_room(
        self,
        name: str,
        kind: str = "chat",
        members: Sequence[str] = (),
        *,
        open: bool = False,
    ) -> dict[str, Any]:
        """`room.create`; returns the room (`id`, `name`, `kind`, `open`)."""
        reply = await self.request(
            "room.create", name=name, kind=kind, members=list(members), open=open
        )
        return _dict(reply, "room")

    async def join(self, room: str) -> dict[str, Any]:
        return _dict(await self.request("room.join", room=room), "room")

    async def leave(self, room: str) -> dict[str, Any]:
        return _dict(await self.request("room.leave", room=room), "room")

    async def add(self, room: str, users: Sequence[str]) -> dict[str, Any]:
        return _dict(await self.request("room.add", room=room, users=list(users)), "room")

    async def remove(self, room: str, users: Sequence[str]) -> dict[str, Any]:
        return _dict(await self.request("room.remove", room=room, users=list(users)), "room")

    async def rooms(self) -> list[dict[str, Any]]:
        """The caller's rooms, each with `id`, `name`, `kind`, `head`, `read`."""
        return _list(await self.request("rooms"), "rooms")

    async def subscribe(self, room: str, after: int = 0) -> int:
        """Receive `room`'s events with seq > `after` through `events()`; returns the head.
        Subscribing again restarts the room's stream from the new `after`."""
        reply = await self.request("subscribe", room=room, after=after)
        head = reply.get("head")
        return head if isinstance(head, int) else 0

    async def unsubscribe(self, room: str) -> None:
        """No event of `room` reaches `events()` after this is called."""
        await self.request("unsubscribe", room=room)

    async def send(
        self,
        room: str,
        body: str | Mapping[str, Any],
        *,
        cid: str | None = None,
        thread: int | None = None,
    ) -> Ack:
        """Post a message (`body` str is shorthand for `{"text": body}`); returns its `Ack`
        once it is durable. Survives reconnects (see the module doc). A caller that may give
        up waiting (a timeout) and try again should pass its own `cid`: the retry then cannot
        post the message twice."""
        fields: dict[str, Any] = {"body": _body(body)}
        if thread is not None:
            fields["thread"] = thread
        return await self._append("send", room, cid, fields)

    async def edit(
        self, room: str, target: int, body: str | Mapping[str, Any], *, cid: str | None = None
    ) -> Ack:
        return await self._append("edit", room, cid, {"target": target, "body": _body(body)})

    async def delete(self, room: str, target: int, *, cid: str | None = None) -> Ack:
        return await self._append("delete", room, cid, {"target": target})

    async def react(self, room: str, target: int, emoji: str, *, cid: str | None = None) -> Ack:
        return await self._append("react", room, cid, {"target": target, "emoji": emoji})

    async def history(
        self, room: str, *, before: int | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Events of `room`, oldest first: the newest `limit`, or the `limit` below `before`."""
        fields: dict[str, Any] = {"room": room}
        if before is not None:
            fields["before"] = before
        if limit is not None:
            fields["limit"] = limit
        return _list(await self.request("history", **fields), "messages")

    async def receipt(self, room: str, read: int) -> None:
        await self.request("receipt", room=room, read=read)

    async def typing(self, room: str) -> None:
        await self.request("typing", room=room)

    async def search(self, query: str, room: str | None = None) -> list[dict[str, Any]]:
        """Message events whose text has every word of `query`, newest first."""
        fields: dict[str, Any] = {"query": query}
        if room is not None:
            fields["room"] = room
        return _list(await self.request("search", **fields), "hits")

    async def _append(self, op: str, room: str, cid: str | None, fields: dict[str, Any]) -> Ack:
        cid = new_cid() if cid is None else cid
        reply = await self.request(op, room=room, cid=cid, **fields)
        seq, ts = reply.get("seq"), reply.get("ts")
        if not isinstance(seq, int) or not isinstance(ts, int):
            raise ClientError("internal", f"{op} ok without seq and ts")
        return Ack(str(reply.get("room", room)), seq, ts, cid)

    # --- the connection manager ----------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect, until stopped or a terminal error. Raises only before
        `task_status.started()` (the first connection failed); later errors are recorded."""
        started = False
        attempt = 0
        try:
            while not self._stop.is_set():
                ended = await self._connection(task_status if not started else None)
                if ended.ready:
                    started = True
                    attempt = 0
                if self._stop.is_set():
                    return
                error = ended.error or self._fatal(ended)
                if error is not None:
                    if not started:
                        raise error
                    self._terminate(error)
                    return
                delay = max(self._backoff(attempt), ended.retry_after)
                attempt += 1
                logger.info(
                    "gb6 client: connection ended (%s %s); reconnecting in %.2fs",
                    ended.close_code,
                    ended.reason,
                    delay,
                )
                with trio.move_on_after(delay):
                    await self._stop.wait()
        finally:
            self._events_send.close()

    def _fatal(self, ended: _Ended) -> ClientError | None:
        action = close_action(ended.close_code)
        if action is CloseAction.UNAUTHORIZED:
            return Unauthorized(message=f"closed by the server: {ended.reason or 'unauthorized'}")
        if action is CloseAction.BAD_HANDSHAKE:
            return ClientError("invalid", f"closed by the server: {ended.reason or 'bad hello'}")
        if not self.reconnect or (not ended.ready and self.user is None):
            # Without reconnect, or the very first connection never got ready.
            return ConnectionLost(
                message=f"connection ended ({ended.close_code} {ended.reason})".strip()
            )
        return None

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_max, self._backoff_initial * (2.0 ** min(attempt, 30)))
        return self._random.uniform(ceiling / 2, ceiling)

    def _terminate(self, error: ClientError) -> None:
        if self.error is not None:
            return
        self.error = error
        self._resolve(self._core.close(error))
        self._kick.set()

    async def _connection(self, task_status: trio.TaskStatus[None] | None) -> _Ended:
        """One connection from open to close; calls `task_status.started()` after hello."""
        url = self.url() if callable(self.url) else self.url
        ended = _Ended()
        try:
            with trio.CancelScope() as socket_scope:
                async with open_websocket_url(
                    url,
                    connect_timeout=self._connect_timeout,
                    disconnect_timeout=self._close_timeout,
                    max_message_size=self._max_incoming_bytes,
                ) as ws:
                    with trio.move_on_after(self._connect_timeout) as hello_scope:
                        await self._hello(ws, ended)
                    if hello_scope.cancelled_caught:
                        ended.record(None, "no hello reply in time")
                        socket_scope.cancel()  # silent: no closing handshake
                    elif ended.ready:
                        if task_status is not None:
                            task_status.started()
                        await self._serve(ws, ended, socket_scope)
                    # Leaving closes the socket with 1000 unless it is closed already.
        except HandshakeError as exc:  # refused, timed out, rejected (incl. a closing edge)
            ended.record(None, f"connect to {url} failed: {exc!r}")
        except DisconnectionTimeout:
            ended.record(None, "close timed out")
        except ConnectionClosed as exc:
            if exc.reason is None:
                ended.record(None, "connection closed")
            else:
                ended.record(exc.reason.code, exc.reason.reason or "")
        finally:
            self._resolve(self._core.connection_lost())
            self.session = None
        return ended

    async def _hello(self, ws: WebSocketConnection, ended: _Ended) -> None:
        await ws.send_message(self._core.connection_made())
        while True:
            out = self._core.receive(await ws.get_message())
            if isinstance(out, HelloDone):
                if self.user is not None:
                    self.reconnects += 1
                self.user, self.session = out.user, out.session
                self.heartbeat_ms = out.heartbeat_ms
                self._resolve(out.answers)
                ended.ready = True
                return
            if isinstance(out, HelloFailed):
                err = out.error
                if err.code in _FATAL_HELLO_CODES:
                    ended.error = err
                ended.record(None, f"hello failed: {err.code} {err.message}")
                ended.retry_after = (err.retry_after_ms or 0) / 1000
                return

    async def _serve(
        self, ws: WebSocketConnection, ended: _Ended, socket_scope: trio.CancelScope
    ) -> None:
        """Run reader, writer and heartbeat until one of them ends the connection."""
        async with trio.open_nursery() as nursery:
            conn = _Conn(ws, nursery.cancel_scope, socket_scope, ended, trio.current_time())
            nursery.start_soon(self._reader, conn, nursery)
            nursery.start_soon(self._writer, conn)
            nursery.start_soon(self._heartbeat, conn)
            nursery.start_soon(self._watch_stop, conn)

    async def _reader(self, conn: _Conn, nursery: trio.Nursery) -> None:
        while True:
            try:
                text = await conn.ws.get_message()
            except ConnectionClosed as exc:
                if exc.reason is None:
                    conn.end(None, "connection closed")
                else:
                    conn.end(exc.reason.code, exc.reason.reason or "")
                return
            conn.last_rx = trio.current_time()
            out = self._core.receive(text)
            if self._core.wants_to_write:
                self._kick.set()
            if isinstance(out, Deliver):
                conn.reader_blocked = True
                try:
                    await self._events_send.send(out.event)
                finally:
                    conn.reader_blocked = False
                conn.last_rx = trio.current_time()
                self._core.delivered(out)
            elif isinstance(out, Reply | Failure):
                self._resolve((out,))
            elif isinstance(out, Drain):
                nursery.start_soon(self._drain_timer, conn)
            if self._core.phase is Phase.DRAINING and self._core.owed == 0:
                conn.end(CLOSE_DRAINING, "the server is draining")
                return

    async def _writer(self, conn: _Conn) -> None:
        while True:
            text = self._core.next_outgoing()
            if text is None:
                self._kick = trio.Event()
                await self._kick.wait()
                continue
            try:
                await conn.ws.send_message(text)
            except ConnectionClosed:
                return  # the reader sees the close and ends the connection

    async def _heartbeat(self, conn: _Conn) -> None:
        """Ping every half heartbeat; end a connection silent for 2.5 heartbeats (unless the
        silence is ours: the reader waiting for the application to take an event)."""
        interval = max(self.heartbeat_ms, 10) / 2000
        silent_limit = 5 * interval
        while True:
            await trio.sleep(interval)
            self._core.ping()
            self._kick.set()
            if not conn.reader_blocked and trio.current_time() - conn.last_rx > silent_limit:
                conn.end(None, f"no frame from the server in {silent_limit:.1f}s", abort=True)
                return

    async def _drain_timer(self, conn: _Conn) -> None:
        await trio.sleep(self._drain_timeout)
        conn.end(CLOSE_DRAINING, "the server is draining")

    async def _watch_stop(self, conn: _Conn) -> None:
        await self._stop.wait()
        conn.end(_CLOSE_NORMAL, "closed by the application")

    def _resolve(self, outputs: Sequence[Output]) -> None:
        for out in outputs:
            if not isinstance(out, Reply | Failure):
                continue
            waiter = self._waiters.get(out.req_id)
            if waiter is None or waiter.done.is_set():
                continue
            if isinstance(out, Reply):
                waiter.reply = out.fields
            else:
                waiter.error = out.error
            waiter.done.set()


# `async with gb6_connect(url, token) as client:` — the entry point the docs name; entering
# connects and says hello (see `Client`).
gb6_connect = Client


def _body(body: str | Mapping[str, Any]) -> dict[str, Any]:
    return {"text": body} if isinstance(body, str) else dict(body)


def _dict(reply: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = reply.get(key)
    if not isinstance(value, dict):
        raise ClientError("internal", f"reply without {key!r}")
    return value


def _list(reply: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = reply.get(key)
    if not isinstance(value, list):
        raise ClientError("internal", f"reply without {key!r}")
    return value
