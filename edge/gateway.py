"""The client WebSocket gateway: a thin Trio layer over the handshake, frame and protocol cores.

Per connection there are two tasks in one nursery: the reader (owns the frame reader, parses
frames, handles requests in order) and the writer (drains the connection's `Outbox`). Replies
and fan-out frames are written through the outbox, so frames leave in the order they were
produced. Timeouts are the reader's cancel scope deadline: 10 s for the hello, then twice the
heartbeat.

Connection states (data, as h11 does it):
    AWAIT_HELLO --hello ok--> READY --close/overflow/drain/timeout--> CLOSING
    AWAIT_HELLO --bad hello / timeout--> CLOSING
A CLOSING connection accepts no new frames from the server's side except the final close.
"""

from __future__ import annotations

import enum
import math
import socket
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import attrs
import trio

from edge import protocol as p
from edge import wsframe
from edge.bus import LocalRateLimiter, Presence
from edge.handshake import Accepted, Rejected, ServerHandshake
from edge.hub import Hubs, Subscription
from edge.media_signaling import ConnectionMedia, MediaRooms
from edge.outbox import Cork, Outbox
from edge.shared_signals import SharedSignals
from edge.wsread import FrameReader
from node.auth_failures import rate_limited, user_auth, user_auth_failures
from node.config import Config
from node.errors import (
    INTERNAL,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    TOO_LARGE,
    UNAUTHORIZED,
    UNAVAILABLE,
    GB6Error,
    invalid,
)
from node.ids import new_id
from node.listen import bind, is_loopback
from node.log import log
from node.ratelimit import RateLimiter
from origin.membership import MembershipChange, Principal, RoomState
from origin.quotas import Quotas
from origin.records import Instance, User
from origin.shard import OriginShard
from origin.sqlite_store import AppendResult, now_ms
from replication.edge_link import LinkDown, LinkLost, RemoteOrigin

CLOSE_BAD_HANDSHAKE = 4001
CLOSE_UNAUTHORIZED = 4003
CLOSE_TOO_SLOW = 4008
CLOSE_DRAINING = 4009
CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_INTERNAL = 1011
CLOSE_PROTOCOL_ERROR = 1002
# A client resuming on this edge with a seq that another edge delivered: how long this edge's
# pushes of the room may take to catch up before `after` is refused as beyond the head.
AHEAD_WAIT_S = 2.0
# A shared rate-limit check slower than this lets its request through, and so do all checks
# for the pause after it: a Redis that is down or frozen must not hold up every request.
LIMIT_WAIT_S = 0.5
FOLLOW_WAIT_S = 1.0
LIMIT_PAUSE_S = 5.0
HELLOS_PER_SOCKET = 5  # a socket refused this often (quota_exceeded, unavailable) is closed
# A request made while its shard's link is down, on a socket in a live media session: when to
# ask again (the link reconnects with a backoff of 0.05 s doubling up to 2 s).
LINK_DOWN_RETRY_MS = 1000
# Requests that change nothing at the shard: one lost with its link may be asked again. The
# reads, and `subscribe`: its watch (if it sent one) was of the lost link, and the hub it may
# have made settles idle (`_subscribe`), so a refused one leaves nothing behind.
_HARMLESS_IF_LOST = (p.History, p.Search, p.ListRooms, p.RoomReads, p.PresenceGet, p.Subscribe)


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    READY = "ready"
    CLOSING = "closing"


async def _recv_when_readable(sock: socket.socket, limit: int) -> bytes:
    """Wait until `sock` is readable, then read what is there (b"" at EOF).

    Why not trio's `recv`: it tries first and adds a checkpoint before and after, two scheduler
    round trips per call; a connection's reader almost always finds nothing waiting (it has just
    read everything), so it failed once and waited anyway. Waiting first is one round trip per
    read; `wait_readable` is the cancellation point."""
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(limit)
        except BlockingIOError:
            continue  # readiness without data (it happens): wait again


@attrs.define(eq=False)
class Connection:
    sock: socket.socket
    outbox: Outbox
    ip: str  # the client's address, as its per-address limits count it
    peer: str
    hellos: int = 0  # said on this socket
    state: State = State.AWAIT_HELLO
    principal: Principal | None = None
    session: str = ""
    subs: dict[str, Subscription] = attrs.Factory(dict)
    read_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    nursery: trio.Nursery | None = None
    status: str = "online"
    last_typing: dict[str, float] = attrs.Factory(dict)
    media: ConnectionMedia | None = None  # the rooms whose media it joined (media.join)
    # Gives back this socket's slot of its instance's `connections` quota (held until closed).
    quota_release: Callable[[], None] | None = None
    # The instance its hello authenticated, set before the hello's awaits: a link to that
    # instance's shard lost meanwhile closes this socket too (its slot went with the link).
    instance: str = ""
    # The room op this socket is waiting for (its room; "" for room.create): it gets the `ok`,
    # so it is left out of that change's room.added / room.removed.
    acting: str | None = None

    @property
    def user(self) -> str:
        assert self.principal is not None
        return self.principal.id


class Gateway:
    """A component: `port = await nursery.start(gateway.run)`."""

    def __init__(
        self,
        config: Config,
        origin: OriginShard | RemoteOrigin,
        shared: SharedSignals | None = None,
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.origin = origin
        self.hubs = Hubs(
            config.limits.room_cache_events,
            config.limits.room_cache_bytes,
            config.limits.idle_room_cache_rooms,
        )
        self.conns: set[Connection] = set()
        self.per_ip: dict[str, int] = {}  # connections open per client address
        self.by_user: dict[str, set[Connection]] = {}
        self.away: set[str] = set()
        # Other edges of a cluster: typing and presence go through them too (None: one process).
        self.shared = shared
        if shared is not None:
            shared.on_typing = self._typing_from_elsewhere
            shared.on_presence = self._deliver_presence
            shared.rooms_in_use = self._rooms_in_use
            shared.instances_in_use = self._instances_in_use
            shared.users_here = self._users_here
            shared.users_seen = self._users_seen
        self._nursery: trio.Nursery | None = None
        self.cork = Cork()
        origin.publish_context = lambda: self.cork
        # Per plan. The edges of a cluster share each user's budget (through Redis).
        self._limits_paused_until = -math.inf  # see LIMIT_PAUSE_S
        self.limiters: dict[str, RateLimiter] = (
            shared.limiters
            if shared is not None and shared.limiters is not None
            else {n: LocalRateLimiter.new(rp.rate, rp.burst) for n, rp in config.rate_plans.items()}
        )
        # Failed hellos (and HTTP user-token authentications: `authenticate_user`) per client
        # address, shared by the edges of a cluster when Redis answers, else per edge.
        self.auth_failures = user_auth_failures(
            self.limits, shared.auth_failures if shared is not None else None, LIMIT_WAIT_S
        )
        # For HTTP clients (files, WHIP/WHEP): counted with the hellos of their address.
        self.authenticate_user = user_auth(self.auth_failures, origin.authenticate)
        # Concurrent connections are counted by the instance's origin shard across every edge
        # (`origin.acquire_slot`). These quotas are the shard's own in one process; on a
        # cluster edge a local copy of the plans, for what is still counted per edge.
        self.quotas = (
            origin.quotas
            if isinstance(origin, OriginShard)
            else Quotas(config.plans, self._plan_of, now_ms)
        )
        self._accept_scope = trio.CancelScope()
        self.draining = False
        self._all_closed = trio.Event()
        self.media: MediaRooms | None = None  # set by whoever starts the SFU (media.* ops)
        origin.event_listeners.append(self.hubs.publish)
        origin.member_listeners.append(self._on_members)
        origin.read_listeners.append(self._on_read)
        origin.watch_listeners.append(self.hubs.watched)
        origin.tenancy_listeners.append(self._on_tenancy)
        self.hubs.on_evict = origin.unwatch
        self.hubs.on_gap = self._on_hub_gap
        if isinstance(origin, RemoteOrigin):
            origin.lost_listeners.append(self._on_origin_lost)
            origin.restored_listeners.append(self._on_origin_restored)

    def _rooms_in_use(self) -> list[str]:
        return [room for room, hub in self.hubs.hubs.items() if not hub.idle]

    def _instances_in_use(self) -> set[str]:
        out = set()
        for conns in self.by_user.values():
            for conn in conns:
                assert conn.principal is not None  # set before the connection joins by_user
                out.add(conn.principal.instance.id)
                break
        return out

    # --- serving -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        lsock = bind(self.config.host, self.config.ws_port, "WebSocket", backlog=4096)
        lsock.setblocking(False)
        port = lsock.getsockname()[1]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(port)
                with self._accept_scope:
                    await self._accept(lsock, nursery)
                lsock.close()
        finally:
            self._nursery = None  # a link restored after this finds nothing to start tasks in
            lsock.close()

    async def _accept(self, lsock: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(lsock)
            while True:
                try:
                    sock, addr = lsock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # EMFILE and friends: back off instead of spinning
                    log("accept_failed", error=str(exc))
                    await trio.sleep(0.1)
                    break
                ip = addr[0]
                from_ip = self.per_ip.get(ip, 0)
                # PROTOCOL.md: limits per address do not apply to loopback unless configured.
                per_ip = self.limits.per_ip_loopback or not is_loopback(ip)
                if len(self.conns) >= self.limits.max_connections or (
                    per_ip and from_ip >= self.limits.max_connections_per_ip
                ):
                    sock.close()
                    continue
                self.per_ip[ip] = from_ip + 1
                nursery.start_soon(self._serve, sock, ip, f"{ip}:{addr[1]}")

    async def drain(self, grace: float = 5.0) -> None:
        """Stop accepting; tell every client to resume elsewhere; answer what is in flight
        (every accepted append becomes durable and gets its ok); then close them all with
        4009 and wait for the frames to leave. At most about `grace` seconds for each step.

        Requests that arrive after the `reconnect` event get `unavailable`."""
        self.draining = True
        self._accept_scope.cancel()
        frame = wsframe.text(p.event("reconnect", {"reason": "draining"}))
        for conn in list(self.conns):
            conn.outbox.write(frame)
        with trio.move_on_after(grace):
            await self.origin.drain()
        if not self.conns:
            self._all_closed.set()
        for conn in list(self.conns):
            self._close(conn, CLOSE_DRAINING, "draining")
        with trio.move_on_after(grace):
            await self._all_closed.wait()

    async def _serve(self, sock: socket.socket, ip: str, peer: str) -> None:
        """One connection, start to end. Nothing that goes wrong in it may reach the server's
        nursery (that would end every other connection): it is logged and the socket closed."""
        try:
            await self._serve_connection(sock, ip, peer)
        except Exception as exc:
            log("connection_failed", peer=peer, error=repr(exc))
            sock.close()
        finally:
            left = self.per_ip[ip] - 1
            if left:
                self.per_ip[ip] = left
            else:
                del self.per_ip[ip]

    async def _serve_connection(self, sock: socket.socket, ip: str, peer: str) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(sock, Outbox(sock, self.limits.outbox_bytes, self.cork), ip, peer)
        conn.outbox.on_overflow = lambda: self._too_slow(conn)
        tsock = trio.socket.from_stdlib_socket(sock)
        self.conns.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                conn.nursery = nursery
                nursery.start_soon(self._writer, conn)
                await self._read(conn, tsock)
                # Give the final frames a moment to leave, then stop the writer.
                if conn.state is not State.CLOSING:
                    self._close(conn, CLOSE_GOING_AWAY, "")
                nursery.cancel_scope.deadline = trio.current_time() + self.limits.close_grace_s
        finally:
            self._forget(conn)
            tsock.close()

    async def _writer(self, conn: Connection) -> None:
        await conn.outbox.run_writer()
        conn.read_scope.cancel()  # the close frame is out, or the socket broke

    def _close(self, conn: Connection, code: int, reason: str) -> None:
        if conn.state is State.CLOSING:
            return
        conn.state = State.CLOSING
        if conn.media is not None:  # its sessions end now, not when the socket is gone
            conn.media.close()
        conn.outbox.write_last(wsframe.close(code, reason))
        conn.read_scope.deadline = min(
            conn.read_scope.deadline, trio.current_time() + self.limits.close_grace_s
        )

    def _too_slow(self, conn: Connection) -> None:
        conn.outbox.drop_queued()
        log("client_too_slow", peer=conn.peer, session=conn.session)
        self._close(conn, CLOSE_TOO_SLOW, "too slow to keep up; resume")

    def _plan_of(self, instance: str) -> str | None:
        inst = self.origin.state.instances.get(instance)
        return inst.plan if inst is not None else None

    def _forget(self, conn: Connection) -> None:
        self.conns.discard(conn)
        if conn.quota_release is not None:
            conn.quota_release()
            conn.quota_release = None
        if not self.conns and self.draining:
            self._all_closed.set()
        for sub in conn.subs.values():
            self.hubs.release(sub)
        conn.subs.clear()
        if conn.media is not None:
            conn.media.close()  # socket close = leave
        if conn.principal is not None:
            peers = self.by_user.get(conn.user)
            if peers is not None:
                peers.discard(conn)
                last_here = not peers
                if last_here:
                    del self.by_user[conn.user]
                    self.away.discard(conn.user)
                if self.shared is not None and self._nursery is not None:
                    self._nursery.start_soon(self._session_closed, conn.principal, conn.session)
                elif last_here:
                    self._presence_changed(conn.principal, "offline")

    # --- reading -------------------------------------------------------------------------

    async def _read(self, conn: Connection, tsock: trio.socket.SocketType) -> None:
        conn.read_scope.deadline = trio.current_time() + self.limits.hello_timeout_s
        trailing: bytes | None = None
        with conn.read_scope:
            trailing = await self._handshake(conn, tsock)
            if trailing is not None:
                await self._read_frames(conn, trailing)
        if (
            conn.read_scope.cancelled_caught
            and conn.state is State.AWAIT_HELLO
            and trailing is None
        ):
            return  # no complete upgrade request in time: just drop the TCP connection
        if conn.read_scope.cancelled_caught and conn.state is not State.CLOSING:
            if conn.principal is None:
                self._close(conn, CLOSE_BAD_HANDSHAKE, "no hello in time")
            else:
                self._close(conn, CLOSE_GOING_AWAY, "no heartbeat")
            with trio.move_on_after(self.limits.close_grace_s):
                await conn.outbox.wait_below(0)

    async def _handshake(self, conn: Connection, tsock: trio.socket.SocketType) -> bytes | None:
        handshake = ServerHandshake()
        while True:
            try:
                data = await tsock.recv(16384)
            except OSError:
                return None
            if not data:
                return None
            answer = handshake.feed(data, draining=self.draining)
            if isinstance(answer, Rejected):
                conn.state = State.CLOSING
                conn.outbox.write_last(answer.response)
                await trio.sleep_forever()  # the writer cancels us once the answer is out
            if isinstance(answer, Accepted):
                conn.outbox.write(answer.response)
                return answer.trailing

    async def _read_frames(self, conn: Connection, trailing: bytes) -> None:
        reader = FrameReader(
            self.limits.message_bytes, self.limits.message_bytes * self.limits.transport_factor
        )
        silence_s = 2 * self.limits.heartbeat_ms / 1000
        step_s = min(1.0, silence_s / 8)
        data = trailing
        while True:
            for kind, value in reader.feed(data):
                await self._on_ws_event(conn, kind, value)
            if conn.state is State.READY:
                # Moving a deadline is bookkeeping in trio's deadline heap: only do it when it
                # moves by a noticeable step (and always on the first frame after hello).
                deadline = trio.current_time() + silence_s
                if abs(deadline - conn.read_scope.deadline) > step_s:
                    conn.read_scope.deadline = deadline
            try:
                data = await _recv_when_readable(conn.sock, 65536)
            except OSError:
                return
            if not data:
                return

    async def _on_ws_event(self, conn: Connection, kind: str, value: Any) -> None:
        if conn.state is State.CLOSING:
            return
        if kind == "text":
            await self._on_text(conn, value)
        elif kind in ("too_large", "binary"):
            err = (
                GB6Error(TOO_LARGE, f"message over {self.limits.message_bytes} bytes")
                if kind == "too_large"
                else invalid("binary frames are not used")
            )
            if conn.principal is not None:  # it costs what a request does
                try:
                    await self._rate_limit(conn.principal)
                except GB6Error as exc:
                    err = exc
            self._reply_error(conn, None, err)
            if conn.state is State.AWAIT_HELLO:
                self._close(conn, CLOSE_BAD_HANDSHAKE, "expected hello")
        elif kind == "ping":
            conn.outbox.write(wsframe.frame(wsframe.OP_PONG, value))
        elif kind == "close":
            conn.state = State.CLOSING
            code = value[0] if value[0] not in (1005, 1006) else 1000
            conn.outbox.write_last(wsframe.close(code))
        elif kind == "error":
            code, why = value
            self._close(conn, code, why)

    # --- requests ------------------------------------------------------------------------

    def _reply_error(self, conn: Connection, req_id: p.ReqId | None, err: GB6Error) -> None:
        conn.outbox.write(wsframe.text(p.error(req_id, err)))

    def _reply(
        self, conn: Connection, req_id: p.ReqId, fields: dict[str, Any] | None = None
    ) -> None:
        conn.outbox.write(wsframe.text(p.ok(req_id, fields)))

    async def _on_text(self, conn: Connection, text: str) -> None:
        req_id: p.ReqId | None = None
        request: p.Request | None = None
        try:
            try:
                request = p.parse_request(p.decode_frame(text), self.limits)
            except p.BadFrame as exc:
                if conn.principal is not None:  # it costs what a request does
                    req_id = exc.req_id
                    await self._rate_limit(conn.principal)
                raise
            req_id = request.id
            if conn.state is State.AWAIT_HELLO:
                if not isinstance(request, p.Hello):
                    raise p.BadFrame("the first frame must be hello", req_id)
                await self._hello(conn, request)
                return
            if self.draining:
                raise GB6Error(UNAVAILABLE, "this edge is draining; resume on another")
            await self._rate_limit(conn.principal)
            if isinstance(request, p.Hello):
                raise invalid("already authenticated")
            await self._dispatch(conn, request)
        except p.BadFrame as exc:
            self._reply_error(conn, exc.req_id, exc)
            if conn.state is State.AWAIT_HELLO:
                self._close(conn, CLOSE_BAD_HANDSHAKE, "expected hello")
        except GB6Error as exc:
            if isinstance(exc, LinkLost) and conn.principal is not None:
                self._link_lost(conn, req_id, exc, isinstance(request, _HARMLESS_IF_LOST))
                return
            self._reply_error(conn, req_id, exc)
            if conn.principal is None and exc.code == UNAUTHORIZED:
                self._close(conn, CLOSE_UNAUTHORIZED, "unauthorized")
            elif conn.principal is None and exc.code == RATE_LIMITED:
                self._close(conn, CLOSE_TRY_AGAIN_LATER, "too many hellos; try again later")
        except Exception as exc:  # a bug: tell the client, log it, keep serving
            log("request_failed", peer=conn.peer, error=repr(exc))
            self._reply_error(conn, req_id, GB6Error(INTERNAL, "internal error"))

    async def _rate_limit(self, who: Principal | None) -> None:
        """Count one request of `who` against its plan's rate limit; `rate_limited` past it."""
        assert who is not None
        limiter = self.limiters.get(who.instance.plan)
        if limiter is None or trio.current_time() < self._limits_paused_until:
            return
        failure: str | None = f"no answer within {LIMIT_WAIT_S} s"
        wait = 0.0
        with trio.move_on_after(LIMIT_WAIT_S):
            try:
                wait = await limiter.check(who.id)
                failure = None
            except GB6Error as exc:
                failure = exc.message
        if failure is not None:
            # The shared store is down, frozen or refusing (out of memory, read-only after a
            # failover): serve rather than refuse or hold up everyone, and ask again later.
            self._limits_paused_until = trio.current_time() + LIMIT_PAUSE_S
            log("rate_limit_unavailable", error=failure, pause_s=LIMIT_PAUSE_S)
            return
        if wait > 0:
            raise GB6Error(
                RATE_LIMITED, "too many requests", retry_after_ms=max(1, int(wait * 1000))
            )

    async def _hello(self, conn: Connection, hello: p.Hello) -> None:
        conn.hellos += 1
        if conn.hellos > HELLOS_PER_SOCKET:  # whatever their answers (`unavailable`, say)
            raise rate_limited(1.0, "hellos on this connection")
        principal = await self.auth_failures.authenticate(
            conn.ip, partial(self.origin.authenticate, hello.token), "failed hellos"
        )
        # A hello is a request of its user's (a client looping on `quota_exceeded`, say).
        await self._rate_limit(principal)
        conn.instance = principal.instance.id
        session = new_id("ses")
        first = principal.id not in self.by_user
        # Refused here (quota_exceeded) the socket stays open for another hello; taken here,
        # `_forget` gives it back when the connection ends, however it ends.
        if conn.quota_release is not None:  # an earlier hello on this socket got this far
            conn.quota_release()
            conn.quota_release = None
        # At the instance's shard, which counts the connections of every edge.
        conn.quota_release = await self.origin.acquire_slot(principal.instance.id, "connections")
        if self.shared is not None:
            with trio.move_on_after(FOLLOW_WAIT_S):  # as a room's (see `_validate_subscribe`)
                await self.shared.follow_instance(principal.instance.id)
            try:
                now = await self._session_opened(principal, session)
            except GB6Error:  # over the user's sessions: not recorded
                raise
            except BaseException:  # cancelled (its socket closing): not left behind
                if self._nursery is not None:
                    self._nursery.start_soon(self._discard_session, principal, session)
                raise
        # Meanwhile the instance may have been suspended or the user deleted or changed: the
        # pushes that said so closed the live connections, not this one.
        current = self.origin.state.principal(principal.id)
        closed = conn.state is State.CLOSING  # meanwhile: its shard's link was lost, say
        if closed or current is None or current.instance.status != "active":
            if self.shared is not None and self._nursery is not None:
                self._nursery.start_soon(self._discard_session, principal, session)
            if closed:  # its close frame is out: no answer follows it
                return
            raise GB6Error(UNAUTHORIZED, "the user or instance is no longer active")
        principal = current
        # No await from here on: `_forget` sees a principal only with its session recorded.
        conn.principal = principal
        conn.session = session
        conn.state = State.READY
        self.by_user.setdefault(principal.id, set()).add(conn)
        self._reply(
            conn,
            hello.id,
            {
                "user": {"id": principal.id, "name": principal.user.name},
                "session": conn.session,
                "heartbeat_ms": self.limits.heartbeat_ms,
            },
        )
        if self.shared is not None:
            if now is not None:
                self.shared.announce(principal.instance.id, now)
        elif first:
            self._presence_changed(principal, "online")

    async def _dispatch(self, conn: Connection, req: p.Request) -> None:
        who = conn.principal
        assert who is not None
        origin = self.origin
        match req:
            case p.Append():
                await origin.append(
                    who,
                    req.room,
                    req.type,
                    req.cid,
                    self._append_reply(conn, req.id),
                    body=req.body,
                    thread=req.thread,
                    target=req.target,
                    emoji=req.emoji,
                )
            case p.Ping():
                self._reply(conn, req.id)
            case p.Subscribe():
                await self._subscribe(conn, req)
            case p.Unsubscribe():
                origin.room_visible(who, req.room)
                sub = conn.subs.pop(req.room, None)
                if sub is not None:
                    self.hubs.release(sub)
                self._reply(conn, req.id)
            case p.History():
                events = await origin.history(who, req.room, req.before, req.limit)
                messages = [{"type": ev.type, **ev.to_wire()} for ev in events]
                await self._reply_page(conn, req.id, {"messages": messages})
            case p.RoomCreate():
                conn.acting = ""
                try:
                    room = await origin.create_room(who, req.name, req.kind, req.members, req.open)
                finally:
                    conn.acting = None
                self._reply(conn, req.id, {"room": room.summary()})
            case p.RoomOp():
                fn = origin.join if req.op == "room.join" else origin.leave
                conn.acting = req.room
                try:
                    room = await fn(who, req.room)
                finally:
                    conn.acting = None
                self._reply(conn, req.id, {"room": room.summary()})
            case p.RoomMembers():
                fn2 = origin.add_members if req.op == "room.add" else origin.remove_members
                conn.acting = req.room
                try:
                    room = await fn2(who, req.room, req.users)
                finally:
                    conn.acting = None
                self._reply(conn, req.id, {"room": room.summary()})
            case p.ListRooms():
                self._reply(conn, req.id, {"rooms": origin.rooms_of(who)})
            case p.RoomReads():
                # Members only; from memory (the shard's, or this edge's replica, which the
                # origin's `read` pushes keep current). Up to members_per_room entries.
                room = origin.room_for_member(who, req.room)
                reads = {"room": req.room, "reads": dict(room.members)}
                await self._reply_page(conn, req.id, reads)
            case p.Receipt():
                await origin.set_read(who, req.room, req.read)
                self._reply(conn, req.id)
            case p.Typing():
                self._typing(conn, req)
            case p.Search():
                hits = await origin.search(who, req.query, req.room)
                page = {"hits": [{"type": ev.type, **ev.to_wire()} for ev in hits]}
                await self._reply_page(conn, req.id, page)
            case p.PresenceSet():
                await self._set_status(conn, req)
            case p.PresenceGet():
                self._reply(conn, req.id, {"presence": await self._presence_of(who, req.users)})
            case p.MediaRequest():
                if self.media is None:
                    raise GB6Error(UNAVAILABLE, "media is not running on this edge")
                if conn.media is None:
                    out = conn.outbox
                    conn.media = self.media.connection(
                        lambda type_, fields: out.write(wsframe.text(p.event(type_, fields)))
                    )
                self._reply(conn, req.id, await conn.media.handle(who, req))
            case _:
                raise invalid("unsupported op")

    async def _reply_page(self, conn: Connection, req_id: p.ReqId, fields: dict[str, Any]) -> None:
        """A reply that may be larger than the outbox bound (200 events of up to 64 KiB):
        written once the client has taken most of what was queued, outside the bound."""
        await conn.outbox.wait_below(self.limits.outbox_bytes // 2)
        conn.outbox.write_reply(wsframe.text(p.ok(req_id, fields)))

    def _append_reply(self, conn: Connection, req_id: p.ReqId) -> Any:
        def done(result: AppendResult) -> None:
            if isinstance(result, LinkLost):
                self._link_lost(conn, req_id, result)
            elif isinstance(result, GB6Error):
                self._reply_error(conn, req_id, result)
            else:
                ev = result.event
                self._reply(conn, req_id, {"room": ev.room, "seq": ev.seq, "ts": ev.ts})

        return done

    async def _subscribe(self, conn: Connection, req: p.Subscribe) -> None:
        who = conn.principal
        assert who is not None and conn.nursery is not None
        try:
            room = await self._validate_subscribe(conn, req)
        except BaseException:
            # A hub the watch in there created for this subscribe joins the idle ones (evicted
            # in time, and unwatched) instead of being pushed the room's events for good.
            self.hubs.settle(req.room)
            raise
        # Validated: from here on nothing fails, so a refused subscribe changes nothing.
        hub = self.hubs.ensure(req.room, room.head)
        # The scope exists before the task starts, so a release that comes first (an
        # unsubscribe or a new subscribe in the same read) still cancels it. The subscription
        # is the hub's before the reply goes out (`write` may send it at once): a typing signal
        # sent by a client that saw the reply reaches this one.
        sub = Subscription(req.room, who.id, conn.outbox, scope=trio.CancelScope())
        hub.catching.add(sub)
        # Released once the new one holds the hub: the hub never goes idle in between, where
        # it could be evicted and unwatched (with no idle cache, at once) under the new one.
        old = conn.subs.pop(req.room, None)
        if old is not None:
            self.hubs.release(old)
        conn.subs[req.room] = sub
        self._reply(conn, req.id, {"room": req.room, "head": hub.head})
        conn.nursery.start_soon(self._catch_up, conn, sub, req.after)

    async def _validate_subscribe(self, conn: Connection, req: p.Subscribe) -> RoomState:
        """The room, once this edge follows it and `req` may subscribe to it."""
        who = conn.principal
        assert who is not None
        self.origin.room_for_member(who, req.room)  # before this edge follows the room
        if self.shared is not None:
            # At every subscribe, not only the hub's first: a follow that failed (Redis down)
            # is tried again; one that holds costs a set lookup. Bounded: typing from other
            # edges is not worth holding up a subscribe while Redis does not answer.
            with trio.move_on_after(FOLLOW_WAIT_S):
                await self.shared.follow_room(req.room)
        if self.hubs.get(req.room) is None:
            # A remote origin starts pushing the room's events to this edge (and creates the
            # hub at the head it answers with, before any of them arrives).
            with self.hubs.watching(req.room):
                await self.origin.watch(req.room)
        hub = self.hubs.get(req.room)
        if hub is not None and req.after > hub.head and self.origin.pushes_lag:
            # The client saw `after` on another edge: this edge's pushes of the room may be a
            # little behind that one's. Refused at once, the resume would lose the room.
            with trio.move_on_after(AHEAD_WAIT_S):
                await hub.wait_head(req.after)
        hub = self.hubs.get(req.room)
        if hub is None and self.origin.pushes_need_watch:
            # The hub the watch made, or the idle one found, is gone since (its link broke, or
            # it was evicted): one made now would have no watch behind it, and get no events.
            raise GB6Error(UNAVAILABLE, "the room's origin link was lost meanwhile; retry")
        # Checked again after the waits: a removal that came meanwhile found no subscription.
        room = self.origin.room_for_member(who, req.room)
        head = hub.head if hub is not None else room.head
        if req.after > head:
            if self.origin.pushes_lag and await self._origin_has(req.room, req.after):
                # Seen on another edge; this one's pushes are further behind than the wait.
                raise GB6Error(
                    UNAVAILABLE, f"this edge has not received seq {req.after} of the room yet"
                )
            raise invalid(f"after {req.after} is beyond the room's head {head}")
        if req.room not in conn.subs and len(conn.subs) >= self.limits.max_subscriptions:
            raise GB6Error(
                "quota_exceeded", f"at most {self.limits.max_subscriptions} subscriptions"
            )
        return room

    async def _origin_has(self, room: str, seq: int) -> bool:
        """Whether the room's origin has committed `seq` (asked when this edge has not)."""
        return any(ev.seq == seq for ev in await self.origin.events_after(room, seq - 1, 1))

    async def _catch_up(self, conn: Connection, sub: Subscription, after: int) -> None:
        assert sub.scope is not None
        with sub.scope:
            try:
                await self.hubs.catch_up(
                    sub,
                    after,
                    self.origin.events_after,
                    self.limits.catchup_chunk,
                    self.limits.outbox_bytes // 2,
                    # Its media flows through this edge alone: it waits out an outage too.
                    lambda: conn.media is not None and conn.media.live,
                )
            except GB6Error as exc:  # the store could not be read: the client resumes later
                if sub.scope.cancel_called:  # released meanwhile: nothing is owed
                    return
                log("catch_up_failed", session=conn.session, room=sub.room, error=exc.message)
                self._close(conn, CLOSE_INTERNAL, "could not replay; resume")

    # --- ephemeral signals: typing, receipts, presence, membership -----------------------

    def _typing(self, conn: Connection, req: p.Typing) -> None:
        who = conn.principal
        assert who is not None
        self.origin.room_for_member(who, req.room)
        self._reply(conn, req.id)
        now = trio.current_time()
        if now - conn.last_typing.get(req.room, -1e9) < self.config.typing_interval_ms / 1000:
            return  # a typing indicator lasts a few seconds; more signals add nothing
        if len(conn.last_typing) > self.limits.max_subscriptions:
            conn.last_typing.clear()
        conn.last_typing[req.room] = now
        self._typing_from_elsewhere(req.room, who.id)
        if self.shared is not None:
            self.shared.typing(req.room, who.id)

    def _typing_from_elsewhere(self, room: str, user: str) -> None:
        hub = self.hubs.get(room)
        if hub is not None:
            frame = wsframe.text(p.event("typing", {"room": room, "user": user}))
            hub.write_ephemeral(frame, skip_user=user)

    def _on_hub_gap(self, room: str, head: int, behind: list[Subscription]) -> None:
        """A room's pushed events skipped seqs (a commit whose answer was lost: the store has
        them; or a push lost on the way): its live subscribers, who have everything up to
        `head`, catch up from there, on their connections as a subscribe's catch-up does."""
        log("hub_seq_gap", room=room, head=head, subscribers=len(behind))
        waiting = set(behind)
        for conn in self.conns:
            sub = conn.subs.get(room)
            if sub is not None and sub in waiting and conn.state is not State.CLOSING:
                assert conn.nursery is not None  # set before the connection reads a frame
                conn.nursery.start_soon(self._catch_up, conn, sub, head)

    def _on_origin_lost(self, rooms: set[str], instances: set[str], for_good: bool) -> None:
        """An origin shard's link broke. The sockets of its instances stay, and so do the
        hubs their subscriptions hold (`_on_origin_restored` repairs both), except:
        - a socket whose request was unanswered (`LinkLost`, see `_link_lost`);
        - a socket still in its hello (its slot, if taken, went with the link; the slots of
          media sessions are taken again: `MediaRooms.on_origin_restored`);
        - idle hubs of the shard's rooms, which nothing would watch again;
        - all of them if the link ended for good (the shard moved: nothing restores them)."""
        for conn in list(self.conns):
            if conn.instance in instances and (for_good or conn.state is State.AWAIT_HELLO):
                self._link_lost(conn)
        if for_good:
            known = self.origin.state.rooms
            rooms = {
                r for r in self.hubs.hubs if r in known and known[r].record.instance in instances
            }
        for room in rooms:
            hub = self.hubs.get(room)
            if hub is not None and (hub.idle or for_good):
                self.hubs.drop(room)

    def _link_lost(
        self,
        conn: Connection,
        req_id: p.ReqId | None = None,
        exc: LinkLost | None = None,
        harmless: bool = False,
    ) -> None:
        """The socket's clients must resume (on any edge): what it asked of a lost link is
        unanswered, and its client resends it under the same cids. Except, on a socket in a
        live media session, a request whose outcome does not matter: one that never left
        (`LinkDown`), or a `harmless` one (`_HARMLESS_IF_LOST`: it changed nothing, whether or
        not it arrived).
        It is refused `unavailable` (retry), and the socket stays with its media, which flows
        through this edge alone."""
        in_meeting = conn.media is not None and conn.media.live
        if exc is not None and (harmless or isinstance(exc, LinkDown)) and in_meeting:
            retry = GB6Error(UNAVAILABLE, exc.message, retry_after_ms=LINK_DOWN_RETRY_MS)
            self._reply_error(conn, req_id, retry)
            return
        self._close(conn, CLOSE_INTERNAL, "origin unreachable; resume")

    def _on_origin_restored(self, instances: set[str]) -> None:
        """The link to the shard of `instances` is back after a loss: its sockets take their
        connection slots again, and the hubs of its rooms are watched again (a hub behind the
        room's head then reads what it missed from the store: `Hubs.watched`). An idle hub
        left is dropped: no watch is behind it."""
        if self._nursery is None or not isinstance(self.origin, RemoteOrigin):
            return  # not serving yet: no socket, no hub
        for conn in self.conns:
            if conn.state is State.READY and conn.instance in instances:
                assert conn.nursery is not None
                conn.nursery.start_soon(self._take_slot_again, conn)
        rooms = self.origin.state.rooms
        for room_id, hub in list(self.hubs.hubs.items()):
            room = rooms.get(room_id)
            if room is None or room.record.instance not in instances:
                continue
            if hub.idle:
                self.hubs.drop(room_id)
            else:
                self._nursery.start_soon(self._watch_again, room_id)

    async def _take_slot_again(self, conn: Connection) -> None:
        try:
            release = await self.origin.acquire_slot(conn.instance, "connections")
        except LinkLost:
            return  # lost again: asked again when it is back
        except GB6Error as exc:  # taken meanwhile by sockets elsewhere, say
            self._close(conn, CLOSE_INTERNAL, f"{exc.message}; resume")
            return
        if conn.state is State.CLOSING:
            release()
            return
        conn.quota_release = release  # the one it replaces was of the lost link: moot

    async def _watch_again(self, room: str) -> None:
        try:
            with self.hubs.watching(room):
                await self.origin.watch(room)
        except LinkLost:
            return  # lost again: watched again when it is back
        except GB6Error as exc:
            # Its subscribers would get nothing more: they resume (and subscribe again).
            log("watch_again_failed", room=room, error=exc.message)
            for conn in list(self.conns):
                if room in conn.subs:
                    self._link_lost(conn)
            self.hubs.drop(room)
        finally:
            self.hubs.settle(room)  # gone idle meanwhile: evicted now, after the answer

    def _on_tenancy(self, record: Instance | User) -> None:
        """An instance or user changed on its shard. Live connections take the new record (a
        role or plan change applies at once); those of an instance no longer active, or of a
        deleted user, close with 4003 (their tokens are refused at `hello` from now on)."""
        if isinstance(record, Instance):
            conns = [c for c in self.conns if c.principal and c.principal.instance.id == record.id]
        else:
            conns = list(self.by_user.get(record.id, ()))
        for conn in conns:
            who = conn.principal
            if who is None or conn.state is not State.READY:
                continue
            if record.status != "active":
                what = "instance" if isinstance(record, Instance) else "user"
                self._close(conn, CLOSE_UNAUTHORIZED, f"{what} {record.status}")
            elif isinstance(record, Instance):
                conn.principal = attrs.evolve(who, instance=record)
            else:
                conn.principal = attrs.evolve(who, user=record)

    def _on_read(self, room: str, user: str, seq: int) -> None:
        hub = self.hubs.get(room)
        if hub is not None:
            frame = wsframe.text(p.event("receipt", {"room": room, "user": user, "read": seq}))
            hub.write_ephemeral(frame)

    def _on_members(self, change: MembershipChange) -> None:
        hub = self.hubs.get(change.room)
        if hub is not None:
            frame = wsframe.text(
                p.event(
                    "members",
                    {
                        "room": change.room,
                        "added": list(change.added),
                        "removed": list(change.removed),
                    },
                )
            )
            hub.write_ephemeral(frame)
        for user in change.removed:
            for conn in self.by_user.get(user, ()):
                sub = conn.subs.pop(change.room, None)
                if sub is not None:
                    self.hubs.release(sub)
        self._tell_members(change)

    def _tell_members(self, change: MembershipChange) -> None:
        """`room.added` / `room.removed` to the live connections of each user added to or
        removed from the room, so a client's room list follows without polling; the socket
        whose request made the change gets its `ok` instead. `room.added` carries the room as
        `rooms` lists it."""
        state = self.origin.rooms.get(change.room)
        if state is None:
            return
        summary = state.summary()
        creator = state.record.creator

        def others(user: str) -> list[Connection]:
            return [
                c
                for c in self.by_user.get(user, ())
                if not (c.acting == change.room or (c.acting == "" and user == creator))
            ]

        for user in change.added:
            peers = others(user)
            if peers:
                room = {**summary, "head": state.head, "read": state.members.get(user, 0)}
                frame = wsframe.text(p.event("room.added", {"room": room}))
                for conn in peers:
                    conn.outbox.write(frame)
        if change.removed:
            gone = wsframe.text(p.event("room.removed", {"room": summary}))
            for user in change.removed:
                for conn in others(user):
                    conn.outbox.write(gone)

    async def _presence_of(self, who: Principal, users: tuple[str, ...]) -> dict[str, str]:
        """`online`, `away` or `offline` for each user of the caller's instance who shares a
        room with the caller; other ids are left out (never a hint that they exist)."""
        state = self.origin.state
        mine = state.user_rooms.get(who.id, set())
        visible = [
            u
            for u in users
            if (user := state.users.get(u)) is not None
            and user.instance == who.instance.id
            and (u == who.id or not mine.isdisjoint(state.user_rooms.get(u, ())))
        ]
        # Users away here may be online on another edge: asked too.
        ask = [u for u in visible if u not in self.by_user or u in self.away]
        elsewhere: dict[str, str] = {}
        if self.shared is not None and ask:
            try:
                elsewhere = await self.shared.sessions.presence(ask)
            except GB6Error as exc:
                log("presence_lookup_failed", error=exc.message)
                if any(u not in self.by_user for u in ask):  # not "offline": they may be
                    raise GB6Error(UNAVAILABLE, "presence on other edges is unavailable") from exc
        out = {}
        for u in visible:
            if u not in self.by_user:
                out[u] = elsewhere.get(u, "offline")
            elif u in self.away:  # online if another edge has them online
                out[u] = elsewhere.get(u, "away")
            else:
                out[u] = "online"
        return out

    async def _set_status(self, conn: Connection, req: p.PresenceSet) -> None:
        who = conn.principal
        assert who is not None
        away = req.status == "away"
        if away != (who.id in self.away):
            if away:
                self.away.add(who.id)
            else:
                self.away.discard(who.id)
            if self.shared is None:
                self._presence_changed(who, req.status)
            else:
                # The registry decides: away once every edge of the user's has them away.
                # Bounded as a follow is: once queued the write keeps its order, answered or
                # not (without an answer, the sweeps tell its change from the instance's feed).
                with trio.move_on_after(FOLLOW_WAIT_S):
                    try:
                        now = await self.shared.sessions.set_away(who.id, away)
                    except GB6Error as exc:
                        log("presence_share_failed", user=who.id, error=exc.message)
                    else:
                        self.shared.announce(who.instance.id, now)
        self._reply(conn, req.id)

    def _presence_changed(self, who: Principal, status: str) -> None:
        """Without other edges: this edge's word is the user's presence."""
        self._deliver_presence(who.id, status)

    def _deliver_presence(self, user: str, status: str) -> None:
        """Tell every connected user who shares a room with `user` (each connection once)."""
        frame = wsframe.text(p.event("presence", {"user": user, "status": status}))
        seen: set[str] = set()
        for room_id in self.origin.user_rooms.get(user, ()):
            room = self.origin.rooms.get(room_id)
            if room is None:
                continue
            for member in room.members:
                if member in seen:
                    continue
                seen.add(member)
                for peer in self.by_user.get(member, ()):
                    peer.outbox.write(frame)

    async def _session_opened(self, who: Principal, session: str) -> Presence | None:
        """Record the session in the shared registry; the user's presence after it, or None if
        the registry did not answer in time: the connection goes on without it (messaging does
        not need Redis), and the registry writes the session once Redis answers, the sweeps
        telling the user's presence then."""
        assert self.shared is not None
        with trio.move_on_after(FOLLOW_WAIT_S):
            try:
                # Away here as this edge has it now: the registry's word may still include a
                # last session whose close has not reached it yet.
                away = who.id in self.away
                now = await self.shared.sessions.add(who.id, session, who.instance.id, away=away)
                # That last session may have closed meanwhile, the edge forgetting the away
                # with it (the new one is not among the user's here before the answer).
                while (who.id in self.away) != away:
                    away = who.id in self.away
                    now = await self.shared.sessions.set_away(who.id, away)
                return now
            except GB6Error as exc:
                if exc.code == QUOTA_EXCEEDED:
                    raise
                log("session_add_failed", user=who.id, error=exc.message)
                return None
        log("session_add_failed", user=who.id, error="no answer in time")
        return None

    def _users_here(self) -> dict[str, str]:
        """user → instance of the users connected to this edge (for the presence sweep)."""
        return {user: next(iter(conns)).instance for user, conns in self.by_user.items()}

    def _users_seen(self, instance: str) -> Iterator[str]:
        """The users this edge's clients of `instance` may be shown the presence of: those
        sharing a room with one of them (see `_deliver_presence`), repeats included. Its
        caller may wait between two: each room's members are copied as it comes to them."""
        rooms: set[str] = set()  # each once, however many users here share it
        for user, conns in list(self.by_user.items()):
            if next(iter(conns)).instance == instance:
                rooms.update(self.origin.user_rooms.get(user, ()))
        for room_id in rooms:
            room = self.origin.rooms.get(room_id)
            if room is not None:
                yield from list(room.members)

    async def _discard_session(self, who: Principal, session: str) -> None:
        """Remove a session recorded for a hello refused after all."""
        assert self.shared is not None
        try:
            now = await self.shared.sessions.remove(who.id, session)
        except GB6Error as exc:  # the registry's heartbeats remove it later
            log("session_discard_failed", user=who.id, error=exc.message)
        else:  # its add may have decided "online", which nobody was told
            self.shared.announce(who.instance.id, now)

    async def _session_closed(self, who: Principal, session: str | None) -> None:
        assert self.shared is not None
        try:
            now = await self.shared.sessions.remove(who.id, session or "")
        except GB6Error as exc:  # the heartbeats remove it, the sweeps settle the user
            log("session_close_failed", user=who.id, error=exc.message)
        else:
            self.shared.announce(who.instance.id, now)
