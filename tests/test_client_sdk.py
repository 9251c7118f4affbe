"""The Python client SDK (`node.client`): its pure core with strings, then the Trio client against
a real `gb6 run` subprocess: hello, requests, events, heartbeat, backpressure, and reconnect with
resume across SIGKILL and SIGTERM restarts."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from node._client_core import (
    RESUME_ATTEMPTS,
    SUBSCRIPTION_LOST,
    ClientCore,
    CloseAction,
    Deliver,
    Drain,
    Failure,
    HelloDone,
    HelloFailed,
    Phase,
    Reply,
    close_action,
)
from node.client import (
    Ack,
    Client,
    ClientError,
    ConnectionLost,
    Unauthorized,
    gb6_connect,
)
from tests.conftest import Node, Tenant

# --- the pure core, with strings ---------------------------------------------------------


def _frame(text: str | None) -> dict[str, Any]:
    assert text is not None
    frame: dict[str, Any] = json.loads(text)
    return frame


def _ok(req_id: int, **fields: Any) -> str:
    return json.dumps({"op": "ok", "re": req_id, **fields})


def _event(type_: str, room: str, seq: int, **fields: Any) -> str:
    return json.dumps({"op": "event", "type": type_, "room": room, "seq": seq, **fields})


def _ready(core: ClientCore) -> HelloDone:
    hello = _frame(core.connection_made())
    assert hello["op"] == "hello" and hello["token"] == "tok"
    out = core.receive(
        _ok(hello["id"], user={"id": "u1", "name": "ann"}, session="s1", heartbeat_ms=500)
    )
    assert isinstance(out, HelloDone)
    return out


def _drain_outgoing(core: ClientCore) -> list[dict[str, Any]]:
    frames = []
    while (text := core.next_outgoing()) is not None:
        frames.append(_frame(text))
    return frames


def _deliver(core: ClientCore, text: str) -> Deliver | None:
    out = core.receive(text)
    if isinstance(out, Deliver):
        core.delivered(out)
        return out
    assert out is None, out
    return None


def test_core_hello_and_reply_correlation() -> None:
    core = ClientCore("tok")
    assert core.next_outgoing() is None  # nothing is written before hello
    done = _ready(core)
    assert done.user.id == "u1" and done.session == "s1" and done.heartbeat_ms == 500
    first = core.request("rooms", {})
    second = core.request("history", {"room": "r"})
    frames = _drain_outgoing(core)
    assert [f["id"] for f in frames] == [first, second]
    assert core.receive(_ok(second, messages=[])) == Reply(second, {"messages": []})
    error = json.dumps(
        {"op": "error", "re": first, "code": "rate_limited", "message": "slow", "retry_after_ms": 7}
    )
    out = core.receive(error)
    assert isinstance(out, Failure) and out.req_id == first
    error_fields = (out.error.code, out.error.message, out.error.retry_after_ms)
    assert error_fields == ("rate_limited", "slow", 7)
    assert core.receive(_ok(999)) is None  # unknown or cancelled ids are ignored


def test_core_hello_refused() -> None:
    core = ClientCore("tok")
    hello = _frame(core.connection_made())
    error = {"op": "error", "re": hello["id"], "code": "unauthorized", "message": "no"}
    out = core.receive(json.dumps(error))
    assert isinstance(out, HelloFailed) and isinstance(out.error, Unauthorized)


def test_core_resume_resubscribes_after_last_delivered_and_resends_same_cid() -> None:
    core = ClientCore("tok")
    _ready(core)
    sub = core.request("subscribe", {"room": "r", "after": 0})
    assert _drain_outgoing(core)[0]["after"] == 0
    # Events of the old stream before the ok are not delivered: no subscription yet.
    assert core.receive(_event("message", "r", 1)) is None
    assert core.receive(_ok(sub, room="r", head=0)) == Reply(sub, {"room": "r", "head": 0})
    assert _deliver(core, _event("message", "r", 1)) is not None
    assert _deliver(core, _event("edit", "r", 2, target=1)) is not None
    undelivered = core.receive(_event("message", "r", 3))  # the app never took it
    assert isinstance(undelivered, Deliver)
    send = core.request("send", {"room": "r", "body": {"text": "x"}})
    once = core.request("room.create", {"name": "n", "kind": "chat"})
    written = _drain_outgoing(core)
    cid = written[0]["cid"]
    assert len(cid) == 32 and written[1]["op"] == "room.create"
    history = core.request("history", {"room": "r"})  # queued, never written

    lost = core.connection_lost()
    assert core.phase is Phase.DISCONNECTED
    assert len(lost) == 1 and isinstance(lost[0], Failure) and lost[0].req_id == once
    assert lost[0].error.code == "unavailable"
    assert core.next_outgoing() is None

    _ready(core)
    frames = _drain_outgoing(core)
    assert frames[0]["op"] == "subscribe" and frames[0]["room"] == "r" and frames[0]["after"] == 2
    assert frames[1] == {"op": "send", "id": send, "room": "r", "body": {"text": "x"}, "cid": cid}
    assert frames[2]["id"] == history
    assert core.receive(_ok(frames[0]["id"], room="r", head=3)) is None  # internal
    assert _deliver(core, _event("edit", "r", 2, target=1)) is None  # a repeat: dropped
    assert _deliver(core, _event("message", "r", 3)) is not None
    assert core.subscriptions == {"r": 3}


def test_core_resubscribe_failure_is_reported_as_a_local_event() -> None:
    core = ClientCore("tok")
    _ready(core)
    sub = core.request("subscribe", {"room": "r", "after": 5})
    _drain_outgoing(core)
    core.receive(_ok(sub, room="r", head=5))
    core.connection_lost()
    _ready(core)
    resub = _drain_outgoing(core)[0]
    gone = {"op": "error", "re": resub["id"], "code": "forbidden", "message": "removed"}
    out = core.receive(json.dumps(gone))
    assert isinstance(out, Deliver)
    assert out.event["type"] == SUBSCRIPTION_LOST and out.event["room"] == "r"
    assert out.event["code"] == "forbidden" and core.subscriptions == {}


def test_core_resubscribe_refused_unavailable_is_asked_again_a_few_times() -> None:
    """A resume subscribe refused `unavailable` (the edge's pushes of the room lag behind the
    seq the client had from another edge; its origin is busy) is asked again from the same
    seq, up to RESUME_ATTEMPTS in all, before the room is reported lost."""
    core = ClientCore("tok")
    _ready(core)
    sub = core.request("subscribe", {"room": "r", "after": 5})
    _drain_outgoing(core)
    core.receive(_ok(sub, room="r", head=5))
    core.connection_lost()
    _ready(core)
    for _ in range(RESUME_ATTEMPTS - 1):
        (resub,) = _drain_outgoing(core)
        assert (resub["op"], resub["room"], resub["after"]) == ("subscribe", "r", 5)
        busy = {"op": "error", "re": resub["id"], "code": "unavailable", "message": "lags"}
        assert core.receive(json.dumps(busy)) is None
    (resub,) = _drain_outgoing(core)
    assert core.receive(_ok(resub["id"], room="r", head=6)) is None  # restored
    assert _deliver(core, _event("message", "r", 6)) is not None
    core.connection_lost()
    _ready(core)
    for _ in range(RESUME_ATTEMPTS):
        (resub,) = _drain_outgoing(core)
        busy = {"op": "error", "re": resub["id"], "code": "unavailable", "message": "lags"}
        out = core.receive(json.dumps(busy))
    assert isinstance(out, Deliver) and out.event["type"] == SUBSCRIPTION_LOST
    assert out.event["code"] == "unavailable" and core.subscriptions == {}


def test_core_unsubscribe_stops_events_and_is_answered_locally_after_a_loss() -> None:
    core = ClientCore("tok")
    _ready(core)
    sub = core.request("subscribe", {"room": "r", "after": 0})
    _drain_outgoing(core)
    core.receive(_ok(sub, room="r", head=0))
    unsub = core.request("unsubscribe", {"room": "r"})
    assert core.receive(_event("message", "r", 1)) is None  # dropped at once
    _drain_outgoing(core)
    assert core.connection_lost() == [Reply(unsub, {})]
    _ready(core)
    assert _drain_outgoing(core) == []  # no resume subscribe for r


def test_core_drain_stops_writing_and_counts_owed_replies() -> None:
    core = ClientCore("tok")
    _ready(core)
    sent = core.request("send", {"room": "r", "cid": "c", "body": {}})
    _drain_outgoing(core)
    assert core.receive(json.dumps({"op": "event", "type": "reconnect"})) == Drain()
    assert core.phase is Phase.DRAINING
    later = core.request("rooms", {})
    core.ping()
    assert core.next_outgoing() is None and core.owed == 1
    core.receive(_ok(sent, room="r", seq=1, ts=1))
    assert core.owed == 0
    core.connection_lost()
    _ready(core)
    assert [f["id"] for f in _drain_outgoing(core)] == [later]


def test_core_local_errors_and_close() -> None:
    core = ClientCore("tok", max_frame_bytes=200)
    _ready(core)
    with pytest.raises(ClientError) as too_large:
        core.request("send", {"room": "r", "body": {"text": "x" * 300}})
    assert too_large.value.code == "too_large"
    with pytest.raises(ClientError):
        core.request("hello", {"token": "t"})
    pending = core.request("rooms", {})
    failures = core.close(ConnectionLost(message="closed"))
    assert [(f.req_id, f.error.code) for f in failures if isinstance(f, Failure)] == [
        (pending, "unavailable")
    ]
    with pytest.raises(ConnectionLost):
        core.request("rooms", {})


def test_close_codes() -> None:
    assert close_action(4003) is CloseAction.UNAUTHORIZED
    assert close_action(4001) is CloseAction.BAD_HANDSHAKE
    for code in (4008, 4009, 1001, 1006, 1000, None):
        assert close_action(code) is CloseAction.RECONNECT


# --- against a real node -----------------------------------------------------------------


def _client(node: Node, token: str, **options: Any) -> Client:
    """A client that follows the node across restarts (its port changes)."""
    options.setdefault("backoff_initial", 0.05)
    options.setdefault("backoff_max", 0.3)
    options.setdefault("seed", 1)
    return gb6_connect(lambda: node.ws_url, token, **options)


async def _messages(client: Client, room: str, count: int) -> list[dict[str, Any]]:
    """The next `count` message events of `room` (other events are skipped)."""
    got: list[dict[str, Any]] = []
    async for event in client.events():
        if event.get("type") == "message" and event.get("room") == room:
            got.append(event)
            if len(got) == count:
                break
    return got


async def test_hello_requests_and_errors(tenant: Tenant) -> None:
    alice = tenant.user("alice")
    async with _client(tenant.node, alice.token) as client:
        assert client.user is not None and client.user.id == alice.id
        assert client.user.name == "alice"
        assert client.session and client.heartbeat_ms > 0 and client.connected
        await client.ping()
        room = await client.create_room("general")
        assert room["kind"] == "chat" and room["open"] is False
        assert [r["id"] for r in await client.rooms()] == [room["id"]]
        ack = await client.send(room["id"], "hello world", cid="c-1")
        assert ack == Ack(room["id"], 1, ack.ts, "c-1")
        again = await client.send(room["id"], "ignored", cid="c-1")  # idempotent on cid
        assert again == ack
        raw = await client.request("send", room=room["id"], body={"text": "raw"})
        assert raw["seq"] == 2
        assert (await client.search("world"))[0]["seq"] == 1
        history = await client.history(room["id"], limit=10)
        assert [m["seq"] for m in history] == [1, 2]
        with pytest.raises(ClientError) as missing:
            await client.subscribe("room_does_not_exist")
        assert missing.value.code in ("not_found", "forbidden")
        with pytest.raises(ClientError) as bad:
            await client.history(room["id"], limit=1000)
        assert bad.value.code == "invalid"
        await client.ping()  # the connection stayed open
        assert client.reconnects == 0


async def test_subscribe_and_receive_every_event_type(tenant: Tenant) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with _client(tenant.node, alice.token) as a, _client(tenant.node, bob.token) as b:
        room = (await a.create_room("r", members=[bob.id]))["id"]
        first = await a.send(room, "one")
        assert await b.subscribe(room, after=0) == 1
        await a.edit(room, first.seq, "one!")
        await a.react(room, first.seq, "👍")
        await a.delete(room, first.seq)
        await a.send(room, {"text": "reply"}, thread=first.seq)
        events = b.events()
        seq_events: list[dict[str, Any]] = []
        with trio.fail_after(5):
            while len(seq_events) < 5:
                event = await events.receive()
                if "seq" in event:
                    seq_events.append(event)
        assert [(e["type"], e["seq"]) for e in seq_events] == [
            ("message", 1),
            ("edit", 2),
            ("react", 3),
            ("delete", 4),
            ("message", 5),
        ]
        assert seq_events[2]["emoji"] == "👍" and seq_events[4]["thread"] == 1
        assert b.subscriptions == {room: 5}
        await b.receipt(room, 5)
        await b.typing(room)
        with trio.fail_after(5):
            receipt = await events.receive()
            while receipt.get("type") != "receipt":
                receipt = await events.receive()
        assert receipt["user"] == bob.id and receipt["read"] == 5
        await b.unsubscribe(room)
        await a.send(room, "after unsubscribe")
        await b.ping()
        with pytest.raises(trio.WouldBlock):
            while True:
                assert "seq" not in events.receive_nowait()


async def test_refused_token_and_unreachable_node(node: Node) -> None:
    with pytest.raises(Unauthorized):
        async with gb6_connect(node.ws_url, "not-a-token"):
            pytest.fail("entered with a bad token")
    free = trio.socket.socket()
    await free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    with pytest.raises(ConnectionLost):
        async with gb6_connect(f"ws://127.0.0.1:{port}/v1/ws", "tok", connect_timeout=2):
            pytest.fail("entered without a server")


async def test_body_exception_propagates_unwrapped(tenant: Tenant) -> None:
    alice = tenant.user("alice")
    with pytest.raises(KeyError):
        async with _client(tenant.node, alice.token) as client:
            await client.ping()
            raise KeyError("mine")
    with pytest.raises(ConnectionLost):
        await client.ping()  # a closed client refuses requests


@attrs.define
class _Acks:
    """Acks of concurrent senders; `reached` is set once `threshold` of them are in."""

    threshold: int
    acks: list[Ack] = attrs.Factory(list)
    reached: trio.Event = attrs.Factory(trio.Event)

    def add(self, ack: Ack) -> None:
        self.acks.append(ack)
        if len(self.acks) >= self.threshold:
            self.reached.set()


async def _sender(client: Client, room: str, prefix: str, count: int, acks: _Acks) -> None:
    for i in range(count):
        acks.add(await client.send(room, f"{prefix} {i}", cid=f"{prefix}-{i}"))


async def _check_resume(
    tenant: Tenant, restart: Any, senders: int = 4, per_sender: int = 40
) -> None:
    """Senders write while `restart` kills and restarts the node; a subscriber must see every
    message exactly once and in order, and every send must complete once."""
    node = tenant.node
    alice, bob = tenant.user("alice"), tenant.user("bob")
    total = senders * per_sender
    progress = _Acks(threshold=total // 4)
    async with _client(node, alice.token) as a, _client(node, bob.token) as b:
        room = (await a.create_room("r", members=[bob.id]))["id"]
        await b.subscribe(room)
        seen: list[dict[str, Any]] = []

        async def watch() -> None:
            with trio.fail_after(30):
                seen.extend(await _messages(b, room, total))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            async with trio.open_nursery() as writers:
                for s in range(senders):
                    writers.start_soon(_sender, a, room, f"s{s}", per_sender, progress)
                with trio.fail_after(10):
                    await progress.reached.wait()
                await restart()
        acks = progress.acks
        assert a.reconnects >= 1 and b.reconnects >= 1
        # Every send completed once, with distinct seqs: no duplicate was appended.
        assert len(acks) == total
        assert sorted(ack.seq for ack in acks) == list(range(1, total + 1))
        # The subscriber saw seqs 1..total exactly once, in order, with the acknowledged cids.
        assert [e["seq"] for e in seen] == list(range(1, total + 1))
        by_seq = {ack.seq: ack.cid for ack in acks}
        assert all(e["cid"] == by_seq[e["seq"]] for e in seen)
        history = await a.history(room, limit=200)
        assert [m["seq"] for m in history] == list(range(1, total + 1))


async def test_resume_after_sigkill_and_restart(tenant: Tenant) -> None:
    node = tenant.node

    async def restart() -> None:
        node.kill()
        await trio.sleep(0.3)  # clients notice and retry against a dead port meanwhile
        await trio.to_thread.run_sync(node.start)

    await _check_resume(tenant, restart)


async def test_resume_after_sigterm_drain_and_restart(
    tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gb6.client")
    node = tenant.node

    async def restart() -> None:
        code = await trio.to_thread.run_sync(node.terminate)
        assert code == 0
        await trio.to_thread.run_sync(node.start)

    await _check_resume(tenant, restart, senders=2, per_sender=30)
    ended = [r.getMessage() for r in caplog.records if "connection ended" in r.getMessage()]
    assert any("(4009 " in message for message in ended), ended


async def test_leaving_is_prompt_when_cancelled_or_not_drained(tenant: Tenant) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    start = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        async with _client(tenant.node, alice.token):
            await trio.sleep_forever()
    assert scope.cancelled_caught and trio.current_time() - start < 1.5
    async with _client(tenant.node, alice.token) as a:
        room = (await a.create_room("r", members=[bob.id]))["id"]
        async with _client(tenant.node, bob.token, event_buffer=1) as b:
            await b.subscribe(room)
            for i in range(5):
                await a.send(room, f"m{i}")
            with trio.fail_after(5):
                while b.events().statistics().current_buffer_used < 1:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            await trio.sleep(0.1)  # the reader now waits for room in the buffer
            start = trio.current_time()
        assert trio.current_time() - start < 1.0
        assert b.error is not None and b.error.code == "unavailable"


async def test_requests_made_while_disconnected_wait_for_the_node(tenant: Tenant) -> None:
    """Requests made while the node is down are written once it is back (none was written
    before, so even `room.create` is safe to send); the subscription resumes."""
    node = tenant.node
    alice = tenant.user("alice")
    async with _client(node, alice.token) as client:
        room = (await client.create_room("r"))["id"]
        await client.subscribe(room)
        await client.send(room, "before")
        node.kill()
        with trio.fail_after(5):
            while client.connected:  # noqa: ASYNC110 - the client has no disconnect signal
                await trio.sleep(0.01)
        results: dict[str, Any] = {}

        async def create() -> None:
            results["room"] = await client.create_room("made while down")

        async def send() -> None:
            results["ack"] = await client.send(room, "while down")

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(create)
                nursery.start_soon(send)
                await trio.sleep(0.2)
                assert results == {}
                await trio.to_thread.run_sync(node.start)
        assert results["ack"].seq == 2 and results["room"]["name"] == "made while down"
        with trio.fail_after(5):
            seen = await _messages(client, room, 2)
        assert [e["seq"] for e in seen] == [1, 2]


async def test_expired_token_stops_the_client_with_unauthorized(tenant: Tenant) -> None:
    node = tenant.node
    short = tenant.user("short", ttl_seconds=1)
    async with _client(node, short.token) as client:
        room = (await client.create_room("r"))["id"]
        await client.subscribe(room)
        await trio.sleep(1.2)
        await trio.to_thread.run_sync(node.restart)
        with trio.fail_after(10), pytest.raises(Unauthorized):
            await client.history(room)
        assert isinstance(client.error, Unauthorized)
        with pytest.raises(Unauthorized):
            await client.events().receive()


# --- heartbeat and backpressure, with a node configured for them ---------------------------


@pytest.fixture
def tuned_node(tmp_path: Path) -> Iterator[Node]:
    config = tmp_path / "gb6.toml"
    config.write_text("[limits]\nheartbeat_ms = 300\noutbox_bytes = 65536\n")
    node = Node(tmp_path / "data", extra_args=["--config", str(config)])
    node.start()
    try:
        yield node
    finally:
        node.kill()


async def test_heartbeat_keeps_an_idle_connection(tuned_node: Node) -> None:
    tenant = tuned_node.create_tenant()
    alice = tenant.user("alice")
    async with _client(tuned_node, alice.token) as client:
        assert client.heartbeat_ms == 300
        await trio.sleep(1.5)  # five heartbeats of silence from the application
        assert client.connected and client.reconnects == 0
        await client.ping()


async def test_slow_consumer_is_resumed_without_loss(tuned_node: Node) -> None:
    """The app does not drain events: the reader blocks, the node closes the socket (4008),
    and the client resumes; the app still gets every event once, in order."""
    tenant = tuned_node.create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    count = 240  # 7 MB: more than the kernel's socket buffers hold on loopback
    body = "x" * 30_000
    async with (
        _client(tuned_node, alice.token) as a,
        _client(tuned_node, bob.token, event_buffer=1) as b,
    ):
        room = (await a.create_room("r", members=[bob.id]))["id"]
        await b.subscribe(room)

        async def send_big(first: int) -> None:
            for i in range(first, count, 4):
                await a.send(room, {"text": body, "i": i})

        async with trio.open_nursery() as nursery:
            for first in range(4):
                nursery.start_soon(send_big, first)
        await trio.sleep(0.5)  # the node gives up on bob meanwhile
        with trio.fail_after(20):
            seen = await _messages(b, room, count)
        assert [e["seq"] for e in seen] == list(range(1, count + 1))
        assert b.reconnects >= 1


async def test_a_silent_node_is_detected_and_left(tuned_node: Node) -> None:
    """SIGSTOP: the socket stays open but nothing answers. The client gives up on it after
    2.5 heartbeats, keeps trying, and resumes once the node runs again."""
    tenant = tuned_node.create_tenant()
    alice = tenant.user("alice")
    async with _client(tuned_node, alice.token, connect_timeout=0.5) as client:
        room = (await client.create_room("r"))["id"]
        await client.subscribe(room)
        await client.send(room, "before")
        os.kill(tuned_node.pid, signal.SIGSTOP)
        try:
            with trio.fail_after(5):
                while client.connected:  # noqa: ASYNC110 - the client has no disconnect signal
                    await trio.sleep(0.02)
        finally:
            os.kill(tuned_node.pid, signal.SIGCONT)
        ack = await client.send(room, "after")
        with trio.fail_after(5):
            seen = await _messages(client, room, 2)
        assert [e["seq"] for e in seen] == [1, ack.seq] == [1, 2]
        assert client.reconnects >= 1


async def test_a_resume_subscribe_refused_unavailable_is_asked_again_at_once() -> None:
    """Against a server of the test's own: the resume subscribe after a reconnect is refused
    `unavailable` once (the new edge has not seen the seq yet); the client asks again at once,
    not at its next heartbeat (15 s), and the room's events come."""
    from trio_websocket import WebSocketRequest, serve_websocket

    subscribes: list[dict[str, Any]] = []
    connections = 0

    async def handler(request: WebSocketRequest) -> None:
        nonlocal connections
        ws = await request.accept()
        connections += 1
        this = connections
        while True:
            frame = json.loads(await ws.get_message())
            if frame["op"] == "hello":
                user = {"id": "usr_a", "name": "a"}
                ok = {"user": user, "session": f"ses_{this}", "heartbeat_ms": 30_000}
                await ws.send_message(json.dumps({"op": "ok", "re": frame["id"], **ok}))
            elif frame["op"] == "subscribe":
                subscribes.append(frame)
                if len(subscribes) == 2:  # the resume's first: this edge lags
                    error = {"code": "unavailable", "message": "not seen yet"}
                    await ws.send_message(json.dumps({"op": "error", "re": frame["id"], **error}))
                    continue
                await ws.send_message(json.dumps({"op": "ok", "re": frame["id"], "head": 1}))
                if this == 1:
                    await ws.aclose(1011, "resume")  # the first connection ends
                    return
                event = {"op": "event", "type": "message", "room": "r", "seq": 2, "ts": 1}
                await ws.send_message(json.dumps({**event, "sender": "u", "cid": "c"}))

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        url = f"ws://127.0.0.1:{server.port}/v1/ws"
        async with gb6_connect(url, "tok", backoff_initial=0.01, seed=1) as client:
            await client.subscribe("r", after=1)
            with trio.fail_after(3):  # well before the heartbeat
                event = await client.events().__anext__()
            assert (event["room"], event["seq"]) == ("r", 2)
        assert [s["after"] for s in subscribes] == [1, 1, 1]
        nursery.cancel_scope.cancel()
