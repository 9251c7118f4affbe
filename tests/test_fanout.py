"""Fan-out: catch-up racing live sends, many subscribers, and slow clients cut off with 4008."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import open_websocket_url

from tests.conftest import Node, Tenant


async def _pipeline_sends(node: Node, token: str, room: str, n: int, tag: str) -> None:
    async with open_websocket_url(node.ws_url) as ws:
        await ws.send_message(json.dumps({"op": "hello", "id": 0, "token": token}))
        acks = 0
        for i in range(n):
            await ws.send_message(
                json.dumps(
                    {
                        "op": "send",
                        "id": i + 1,
                        "room": room,
                        "cid": f"{tag}{i}",
                        "body": {"text": f"{tag} {i}"},
                    }
                )
            )
        with trio.fail_after(30):
            while acks < n:
                frame = json.loads(await ws.get_message())
                if frame.get("op") == "ok" and frame.get("re") != 0:
                    acks += 1


async def _collect(node: Node, token: str, room: str, after: int, until: int) -> list[int]:
    seqs: list[int] = []
    async with open_websocket_url(node.ws_url, max_message_size=8 << 20) as ws:
        await ws.send_message(json.dumps({"op": "hello", "id": 0, "token": token}))
        await ws.send_message(
            json.dumps({"op": "subscribe", "id": 1, "room": room, "after": after})
        )
        with trio.fail_after(30):
            while not seqs or seqs[-1] < until:
                frame = json.loads(await ws.get_message())
                if frame.get("op") == "event" and frame.get("type") == "message":
                    seqs.append(frame["seq"])
    return seqs


async def test_subscribers_joining_mid_stream_get_every_event_once_in_order(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a:
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]["id"]
    # 1,200 events before (more than the edge's recent-events cache, so catch-up reads the
    # store), then 1,200 more while subscribers join at different points.
    await _pipeline_sends(node, alice.token, room, 1200, "a")
    results: dict[int, list[int]] = {}

    async def join(after: int) -> None:
        results[after] = await _collect(node, bob.token, room, after, 2400)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pipeline_sends, node, alice.token, room, 1200, "b")
        for after in (0, 17, 700, 1199, 1200):
            nursery.start_soon(join, after)
    for after, seqs in results.items():
        assert seqs == list(range(after + 1, 2401)), f"subscriber after={after} saw a gap or repeat"


def _raw_ws(port: int) -> socket.socket:
    """A WebSocket client that reads nothing until asked: the slow consumer."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(
        b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    return sock


def _close_code(sock: socket.socket) -> int | None:
    """Read the whole stream; return the close frame's code."""
    buf = b""
    sock.settimeout(10)
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    buf = buf[buf.index(b"\r\n\r\n") + 4 :]
    while buf:
        op, n = buf[0] & 0x0F, buf[1] & 0x7F
        off = 2
        if n == 126:
            n, off = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            n, off = struct.unpack("!Q", buf[2:10])[0], 10
        if op == 0x8:
            return int(struct.unpack("!H", buf[off : off + 2])[0])
        buf = buf[off + n :]
    return None


async def test_a_client_that_cannot_keep_up_is_closed_with_4008(
    tmp_path: Path, peer_factory: Any
) -> None:
    config = tmp_path / "small.toml"
    config.write_text("[limits]\noutbox_bytes = 65536\nclose_grace_s = 60.0\n")
    node = Node(tmp_path / "d", extra_args=["--config", str(config)])
    node.start()
    try:
        tenant = node.create_tenant()
        alice, slow = tenant.user("alice"), tenant.user("slow")
        port = int(node.ws_url.rsplit(":", 1)[1].split("/")[0])
        sock = _raw_ws(port)
        sock.sendall(_masked({"op": "hello", "id": 1, "token": slow.token}))
        async with open_websocket_url(node.ws_url) as ws:
            await ws.send_message(json.dumps({"op": "hello", "id": 0, "token": alice.token}))
            await ws.get_message()
            await ws.send_message(
                json.dumps(
                    {
                        "op": "room.create",
                        "id": 1,
                        "name": "r",
                        "kind": "chat",
                        "members": [slow.id],
                    }
                )
            )
            room = json.loads(await ws.get_message())["room"]["id"]
            sock.sendall(_masked({"op": "subscribe", "id": 2, "room": room, "after": 0}))
            await trio.sleep(0.2)
            big = "x" * 60_000
            for i in range(200):  # 12 MB: more than the kernel buffers plus the outbox
                await ws.send_message(
                    json.dumps(
                        {
                            "op": "send",
                            "id": i + 2,
                            "room": room,
                            "cid": str(i),
                            "body": {"text": big},
                        }
                    )
                )
            # The fast sender is unaffected and gets every ack.
            acks = 0
            with trio.fail_after(30):
                while acks < 200:
                    if json.loads(await ws.get_message()).get("op") == "ok":
                        acks += 1
        code = await trio.to_thread.run_sync(_close_code, sock)
        sock.close()
        assert code == 4008
    finally:
        node.kill()


def _frames_text(sock: socket.socket, seconds: float) -> list[dict[str, Any]]:
    """Every text frame the server sends within `seconds` (after the 101 response)."""
    sock.settimeout(0.2)
    buf = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            continue
        if not chunk:
            break
        buf += chunk
    buf = buf[buf.index(b"\r\n\r\n") + 4 :]
    frames = []
    while len(buf) >= 2:
        n, off = buf[1] & 0x7F, 2
        if n == 126:
            n, off = struct.unpack("!H", buf[2:4])[0], 4
        elif n == 127:
            n, off = struct.unpack("!Q", buf[2:10])[0], 10
        if buf[0] & 0x0F == 0x1:
            frames.append(json.loads(buf[off : off + n]))
        buf = buf[off + n :]
    return frames


def _masked(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload).encode()
    assert len(data) < 126
    return bytes((0x81, 0x80 | len(data))) + b"\0\0\0\0" + data


async def test_subscribe_twice_or_unsubscribe_in_one_read_delivers_each_event_once(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a:
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]["id"]
        for i in range(3):
            await a.ok("send", room=room, cid=f"old{i}", body={"text": "old"})
        port = int(node.ws_url.rsplit(":", 1)[1].split("/")[0])
        twice, gone = _raw_ws(port), _raw_ws(port)
        # Each client's frames arrive in one TCP write, so the server handles them in one read.
        twice.sendall(
            _masked({"op": "hello", "id": 1, "token": bob.token})
            + _masked({"op": "subscribe", "id": 2, "room": room, "after": 0})
            + _masked({"op": "subscribe", "id": 3, "room": room, "after": 0})
        )
        gone.sendall(
            _masked({"op": "hello", "id": 1, "token": bob.token})
            + _masked({"op": "subscribe", "id": 2, "room": room, "after": 0})
            + _masked({"op": "unsubscribe", "id": 3, "room": room})
        )
        await trio.sleep(0.3)
        await a.ok("send", room=room, cid="new", body={"text": "new"})
        got_twice = await trio.to_thread.run_sync(_frames_text, twice, 1.0)
        got_gone = await trio.to_thread.run_sync(_frames_text, gone, 0.5)
        twice.close()
        gone.close()
    seqs = [f["seq"] for f in got_twice if f.get("type") == "message"]
    # The second subscribe restarts the stream: what came before it may repeat once, but from
    # its ok on, every event comes exactly once, and no stale subscription doubles live events.
    ok3 = next(i for i, f in enumerate(got_twice) if f.get("re") == 3)
    after_ok = [f["seq"] for f in got_twice[ok3:] if f.get("type") == "message"]
    assert after_ok == [1, 2, 3, 4], seqs
    ok_unsub = next(i for i, f in enumerate(got_gone) if f.get("re") == 3)
    assert not [f for f in got_gone[ok_unsub:] if f.get("type") == "message"], got_gone


async def test_replay_larger_than_the_outbox_bound_arrives_whole(tmp_path: Path) -> None:
    """A resuming client that reads normally is never cut off for being behind: replay is
    written in pieces under the bound (from the cache and from the store), and a history page
    larger than the bound is written outside it."""
    config = tmp_path / "small.toml"
    config.write_text("[limits]\noutbox_bytes = 200000\nroom_cache_events = 8\n")
    node = Node(tmp_path / "d", extra_args=["--config", str(config)])
    node.start()
    try:
        tenant = node.create_tenant()
        alice, bob = tenant.user("alice"), tenant.user("bob")
        big = "y" * 60_000
        async with open_websocket_url(node.ws_url) as ws:
            await ws.send_message(json.dumps({"op": "hello", "id": 0, "token": alice.token}))
            await ws.get_message()
            await ws.send_message(
                json.dumps(
                    {"op": "room.create", "id": 1, "name": "r", "kind": "chat", "members": [bob.id]}
                )
            )
            room = json.loads(await ws.get_message())["room"]["id"]
        # 300 messages of 60 KB: 18 MB, more than kernel buffers and the bound together; the
        # last 8 come from the cache.
        await _pipeline_big(node, alice.token, room, 300, big)
        async with open_websocket_url(node.ws_url, max_message_size=8 << 20) as ws:
            await ws.send_message(json.dumps({"op": "hello", "id": 0, "token": bob.token}))
            await ws.send_message(
                json.dumps({"op": "subscribe", "id": 1, "room": room, "after": 0})
            )
            seqs = []
            with trio.fail_after(20):
                while len(seqs) < 300:
                    frame = json.loads(await ws.get_message())
                    if frame.get("type") == "message":
                        assert frame["body"]["text"] == big
                        seqs.append(frame["seq"])
            assert seqs == list(range(1, 301))
        # A history page of 12 MB, 60 times the bound, to a client that does not read for a
        # second: the page waits in the outbox and arrives whole, no 4008.
        port = int(node.ws_url.rsplit(":", 1)[1].split("/")[0])
        sock = _raw_ws(port)
        sock.sendall(_masked({"op": "hello", "id": 1, "token": bob.token}))
        sock.sendall(_masked({"op": "history", "id": 2, "room": room, "limit": 200}))
        await trio.sleep(1.0)
        sock.sendall(_masked({"op": "ping", "id": 3}))
        frames = await trio.to_thread.run_sync(_frames_text, sock, 5.0)
        sock.close()
        page = [f for f in frames if f.get("re") == 2]
        assert page, "no history page"
        assert [m["seq"] for m in page[0]["messages"]] == list(range(101, 301))
        assert [f["op"] for f in frames if f.get("re") == 3] == ["ok"], "the reader was cut off"
    finally:
        node.kill()


async def _pipeline_big(node: Node, token: str, room: str, n: int, text: str) -> None:
    async with open_websocket_url(node.ws_url) as ws:
        await ws.send_message(json.dumps({"op": "hello", "id": 0, "token": token}))
        await ws.get_message()
        for i in range(n):
            await ws.send_message(
                json.dumps(
                    {"op": "send", "id": i + 1, "room": room, "cid": str(i), "body": {"text": text}}
                )
            )
        acks = 0
        with trio.fail_after(20):
            while acks < n:
                if json.loads(await ws.get_message()).get("op") == "ok":
                    acks += 1


async def test_catch_ups_of_many_rooms_share_one_outbox_within_its_bound() -> None:
    """A connection that resumes many rooms at once runs a catch-up per room, all writing to
    its one outbox while the client reads slowly: together they stay under the outbox's bound
    (past it the client is closed with 4008, and would be again at every resume), and each
    room's events arrive whole and in order."""
    from edge.hub import Hubs, Subscription
    from edge.outbox import Outbox
    from node.events import Event

    server, client = socket.socketpair()
    for sock, opt in ((server, socket.SO_SNDBUF), (client, socket.SO_RCVBUF)):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4096)
        sock.setblocking(False)
    overflowed: list[bool] = []
    outbox = Outbox(server, limit=96 << 10)
    outbox.on_overflow = lambda: overflowed.append(True)
    hubs = Hubs(cache_size=512, cache_bytes=256 << 10, idle_max=100)
    rooms = [f"r{i}" for i in range(10)]
    for room in rooms:  # 5 events of ~10 KB each in every room's cache
        body = {"text": "x" * 10_000}
        hubs.ensure(room, 0).publish(
            [Event(room, seq, 0, "message", "u", f"c{seq}", body) for seq in range(1, 6)]
        )

    async def no_store(room: str, after: int, limit: int) -> list[Event]:
        raise AssertionError("the cache holds every event")

    received = bytearray()

    async def read_slowly() -> None:
        while True:
            await trio.lowlevel.wait_readable(client)
            received.extend(client.recv(4096))
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run_writer)
        nursery.start_soon(read_slowly)
        async with trio.open_nursery() as catch_ups:
            for room in rooms:
                sub = Subscription(room, "u", outbox, scope=trio.CancelScope())
                hubs.hubs[room].catching.add(sub)
                catch_ups.start_soon(hubs.catch_up, sub, 0, no_store, 500, 48 << 10)
        with trio.fail_after(10):
            while outbox.queued_bytes:  # noqa: ASYNC110 - the client reads at its pace
                await trio.sleep(0.01)
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    server.close()
    client.close()
    assert not overflowed
    seqs: dict[str, list[int]] = {}
    pos = 0
    while pos < len(received):
        n, pos = received[pos + 1] & 0x7F, pos + 2
        if n == 126:
            n, pos = struct.unpack_from("!H", received, pos)[0], pos + 2
        event = json.loads(received[pos : pos + n])
        seqs.setdefault(event["room"], []).append(event["seq"])
        pos += n
    assert seqs == {room: [1, 2, 3, 4, 5] for room in rooms}


async def test_a_subscriber_still_catching_up_gets_typing_and_receipts() -> None:
    """Typing and receipts have no replay: a subscriber whose catch-up is still reading the
    store when they happen gets them all the same (a client that saw the subscribe reply, and
    tells another to type, must see the typing)."""
    from edge.hub import Hubs, Subscription
    from edge.outbox import Outbox
    from node.events import Event

    server, client = socket.socketpair()
    server.setblocking(False)
    outbox = Outbox(server, limit=1 << 20)
    hubs = Hubs(cache_size=2, cache_bytes=1 << 20, idle_max=100)
    hub = hubs.ensure("r", 0)
    hub.publish([Event("r", seq, 0, "message", "u", f"c{seq}", {"t": "x"}) for seq in (1, 2, 3)])
    store_read = trio.Event()
    answer = trio.Event()

    async def slow_store(room: str, after: int, limit: int) -> list[Event]:
        store_read.set()
        await answer.wait()
        return [Event("r", 1, 0, "message", "u", "c1", {"t": "x"})]

    sub = Subscription("r", "bob", outbox, scope=trio.CancelScope())
    hub.catching.add(sub)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run_writer)
        nursery.start_soon(hubs.catch_up, sub, 0, slow_store, 500, 48 << 10)
        with trio.fail_after(5):
            await store_read.wait()  # seq 1 left the cache: the catch-up reads the store
        hub.write_ephemeral(b"typing-of-alice", skip_user="alice")
        hub.write_ephemeral(b"typing-of-bob", skip_user="bob")
        answer.set()
        with trio.fail_after(5):
            while not sub.live:  # noqa: ASYNC110 - the catch-up task makes it live
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    server.close()
    received = client.recv(1 << 16)
    client.close()
    assert received.startswith(b"typing-of-alice")
    assert b"typing-of-bob" not in received
    assert received.count(b'"seq":') == 3  # and the catch-up after it, whole


@pytest.mark.parametrize("waiting_on", ["outbox", "store"])
async def test_a_catch_up_released_as_it_wakes_writes_nothing_more(waiting_on: str) -> None:
    """A subscription released (the user removed from the room, an unsubscribe, a subscribe
    again) while its catch-up task has been woken but has not run yet: cancelling that task no
    longer stops it before its next checkpoint. It must write nothing more and never join the
    live subscribers (which would go on getting the room's events, or get each twice)."""
    from edge.hub import Hubs, Subscription
    from edge.outbox import Outbox
    from node.events import Event

    server, client = socket.socketpair()
    server.setblocking(False)
    client.setblocking(False)
    outbox = Outbox(server, limit=1 << 20)
    hubs = Hubs(cache_size=2 if waiting_on == "store" else 512, cache_bytes=1 << 20, idle_max=100)
    hub = hubs.ensure("r", 0)
    hub.publish([Event("r", seq, 0, "message", "u", f"c{seq}", {"t": "x"}) for seq in (1, 2, 3)])
    asked = trio.Event()
    answer = trio.Event()

    async def store(room: str, after: int, limit: int) -> list[Event]:
        asked.set()
        await answer.wait()
        return [Event("r", 1, 0, "message", "u", "c1", {"t": "x"})]

    sub = Subscription("r", "bob", outbox, scope=trio.CancelScope())
    hub.catching.add(sub)

    async def catch_up() -> None:
        assert sub.scope is not None
        with sub.scope:
            await hubs.catch_up(sub, 0, store, 500, 1000)

    if waiting_on == "outbox":
        outbox.queued_bytes = 2000  # as if the client read slowly: the task waits for room
    async with trio.open_nursery() as nursery:
        nursery.start_soon(catch_up)
        await trio.testing.wait_all_tasks_blocked()
        if waiting_on == "store":
            assert asked.is_set()
            answer.set()
        else:
            outbox.queued_bytes = 0
            outbox._drained.unpark_all()
        hubs.release(sub)  # in the same step as the wake-up: the task has not run yet
        await trio.testing.wait_all_tasks_blocked()
        assert sub not in hub.live and not sub.live
        hub.publish([Event("r", 4, 0, "message", "u", "c4", {"t": "x"})])
    with pytest.raises(BlockingIOError):
        client.recv(1 << 16)  # nothing was written after the release
    server.close()
    client.close()


async def test_a_catch_up_asks_a_store_that_is_briefly_unavailable_again() -> None:
    """The store answers a catch-up's read with `unavailable` (the origin busy, its link
    reconnecting): the catch-up asks again after a pause, instead of ending (and the
    connection with it, for its client to resume into the same); any other error ends it."""
    from edge.hub import Hubs, Subscription
    from edge.outbox import Outbox
    from node.errors import INTERNAL, UNAVAILABLE, GB6Error
    from node.events import Event

    server, client = socket.socketpair()
    server.setblocking(False)
    outbox = Outbox(server, limit=1 << 20)
    hubs = Hubs(cache_size=1, cache_bytes=1 << 20, idle_max=100)
    hub = hubs.ensure("r", 0)
    events = [Event("r", seq, 0, "message", "u", f"c{seq}", {"t": "x"}) for seq in (1, 2, 3)]
    hub.publish(events)  # the cache holds seq 3 only: 1 and 2 are read from the store
    errors = [GB6Error(UNAVAILABLE, "busy"), GB6Error(UNAVAILABLE, "busy")]

    async def store(room: str, after: int, limit: int) -> list[Event]:
        if errors:
            raise errors.pop(0)
        return [ev for ev in events if ev.seq > after][:limit]

    sub = Subscription("r", "bob", outbox, scope=trio.CancelScope())
    hub.catching.add(sub)
    with trio.fail_after(5):
        await hubs.catch_up(sub, 0, store, 500, 1 << 16)
    assert sub.live
    received = client.recv(1 << 16)
    assert received.count(b'"seq":') == 3
    second = Subscription("r", "carol", outbox, scope=trio.CancelScope())
    hub.catching.add(second)
    errors.append(GB6Error(INTERNAL, "broken"))
    with pytest.raises(GB6Error) as err:
        await hubs.catch_up(second, 0, store, 500, 1 << 16)
    assert err.value.code == INTERNAL
    server.close()
    client.close()


async def test_a_long_catch_up_retries_unavailable_from_its_first_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The retry window counts from the first `unavailable` in a row, not from the catch-up's
    start: one that has read for longer than the window still asks again."""
    from edge import hub as hub_module
    from edge.hub import Hubs, Subscription
    from edge.outbox import Outbox
    from node.errors import UNAVAILABLE, GB6Error
    from node.events import Event

    monkeypatch.setattr(hub_module, "CATCH_UP_RETRY_S", 0.5)
    server, client = socket.socketpair()
    server.setblocking(False)
    outbox = Outbox(server, limit=1 << 20)
    hubs = Hubs(cache_size=1, cache_bytes=1 << 20, idle_max=100)
    hub = hubs.ensure("r", 0)
    events = [Event("r", seq, 0, "message", "u", f"c{seq}", {"t": "x"}) for seq in (1, 2, 3)]
    hub.publish(events)
    calls = 0

    async def store(room: str, after: int, limit: int) -> list[Event]:
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep(0.6)  # a long read, past the window
        elif calls == 2:
            raise GB6Error(UNAVAILABLE, "busy")
        return [ev for ev in events if ev.seq > after][:1]

    sub = Subscription("r", "bob", outbox, scope=trio.CancelScope())
    hub.catching.add(sub)
    with trio.fail_after(5):
        await hubs.catch_up(sub, 0, store, 1, 1 << 16)
    assert sub.live and calls == 3
    assert client.recv(1 << 16).count(b'"seq":') == 3
    server.close()
    client.close()
