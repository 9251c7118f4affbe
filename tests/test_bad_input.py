"""Bad input, over real sockets: malformed frames, sizes, handshakes, tokens, rate limits,
cross-tenant ids and bad admin calls. Every refusal is an error (or a close) and changes nothing."""

from __future__ import annotations

import datetime
import json
import sqlite3
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.conftest import (
    ERROR_KEYS,
    HIDDEN,
    Node,
    Peer,
    Tenant,
    User,
    close_code,
    connect,
    connect_from,
    module_node,
    refused,
    running_node,
)

MIB = 1 << 20
HELLO_TIMEOUT_S = 1.0
node = module_node("bad_input", f"[limits]\nhello_timeout_s = {HELLO_TIMEOUT_S}\n")


@pytest.fixture(scope="module")
def shared_user(node: Node) -> User:
    """A user for the tests that change nothing (so they need no tenant of their own)."""
    return node.create_tenant().user("shared")


async def next_reply(peer: Peer, wait_s: float = 5.0) -> dict[str, Any]:
    """The next frame that is not an event."""
    with trio.fail_after(wait_s):
        while True:
            frame = await peer.recv()
            if frame.get("op") != "event":
                return frame
            peer.events.append(frame)


def assert_error(reply: dict[str, Any], code: str, re: Any = None) -> None:
    """An error frame with `code`, answering `re` (None: an error without `re`)."""
    assert reply["op"] == "error", reply
    assert reply["code"] == code, reply
    assert isinstance(reply["message"], str), reply
    if re is None:
        assert "re" not in reply, reply
    else:
        assert reply["re"] == re and type(reply["re"]) is type(re), reply
    assert set(reply) <= ERROR_KEYS, reply


# --- malformed frames after hello ----------------------------------------------------------

# (raw frame, the `re` the error must carry: None when no id can be read)
MALFORMED: list[tuple[str, Any]] = [
    ("this is not json", None),
    ('{"op": "ping", "id": "x"', None),
    ("", None),
    ("[]", None),
    ('[{"op": "ping", "id": "x"}]', None),
    ('"ping"', None),
    ("42", None),
    ("null", None),
    ("true", None),
    ('{"op": "ping"}', None),
    ('{"op": "ping", "id": null}', None),
    ('{"op": "ping", "id": true}', None),
    ('{"op": "ping", "id": 1.5}', None),
    ('{"op": "ping", "id": {"a": 1}}', None),
    ('{"op": "ping", "id": ["a"]}', None),
    ('{"id": "m1"}', "m1"),
    ('{"id": 7, "op": null}', 7),
    ('{"id": "m2", "op": 5}', "m2"),
    ('{"id": "m3", "op": ["ping"]}', "m3"),
    ('{"id": "m4", "op": "frobnicate"}', "m4"),
    ('{"id": 42, "op": "PING"}', 42),
    ('{"id": "m5", "op": ""}', "m5"),
]

WRONG_FIELDS: list[dict[str, Any]] = [
    {"op": "room.create", "kind": "chat", "members": []},
    {"op": "room.create", "name": "r", "members": []},
    {"op": "room.create", "name": ["r"], "kind": "chat", "members": []},
    {"op": "room.create", "name": "r", "kind": "chat", "members": {"a": 1}},
    {"op": "room.create", "name": "r", "kind": "chat", "members": [], "open": "true"},
    {"op": "room.join"},
    {"op": "room.join", "room": 1},
    {"op": "room.leave", "room": None},
    {"op": "room.add", "room": "room_x"},
    {"op": "room.add", "room": "room_x", "users": "usr_x"},
    {"op": "room.remove", "users": ["usr_x"]},
    {"op": "subscribe", "room": "room_x"},
    {"op": "subscribe", "after": 0},
    {"op": "subscribe", "room": "room_x", "after": "0"},
    {"op": "subscribe", "room": "room_x", "after": 0.5},
    {"op": "subscribe", "room": "room_x", "after": True},
    {"op": "unsubscribe"},
    {"op": "send", "cid": "c", "body": {"text": "x"}},
    {"op": "send", "room": "room_x", "body": {"text": "x"}},
    {"op": "send", "room": "room_x", "cid": "c"},
    {"op": "send", "room": "room_x", "cid": "c", "body": "x"},
    {"op": "send", "room": "room_x", "cid": "c", "body": None},
    {"op": "send", "room": "room_x", "cid": "c", "body": ["x"]},
    {"op": "send", "room": "room_x", "cid": "c", "body": {"text": 5}},
    {"op": "send", "room": "room_x", "cid": 5, "body": {"text": "x"}},
    {"op": "send", "room": "room_x", "cid": "c", "body": {"text": "x"}, "thread": "1"},
    {"op": "edit", "room": "room_x", "cid": "c", "body": {"text": "x"}},
    {"op": "edit", "room": "room_x", "target": 1, "cid": "c"},
    {"op": "edit", "room": "room_x", "target": "1", "cid": "c", "body": {}},
    {"op": "delete", "room": "room_x", "cid": "c"},
    {"op": "delete", "room": "room_x", "target": 1},
    {"op": "react", "room": "room_x", "target": 1, "cid": "c"},
    {"op": "react", "room": "room_x", "target": 1, "cid": "c", "emoji": 1},
    {"op": "history"},
    {"op": "history", "room": "room_x", "limit": "10"},
    {"op": "history", "room": "room_x", "before": "10"},
    {"op": "receipt", "room": "room_x"},
    {"op": "receipt", "room": "room_x", "read": "1"},
    {"op": "typing"},
    {"op": "search"},
    {"op": "search", "query": ["a"]},
    {"op": "search", "query": "a", "room": 5},
]


async def test_malformed_frames_get_invalid_and_the_connection_stays(
    tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        for raw, re in MALFORMED:
            await a.send(raw)
            assert_error(await next_reply(a), "invalid", re)
            pong = await a.ok("ping")
            assert set(pong) == {"op", "re"}


@pytest.mark.parametrize("frame", WRONG_FIELDS, ids=lambda f: json.dumps(f)[:60])
async def test_wrong_or_missing_fields_get_invalid(
    shared_user: User, peer_factory: Any, frame: dict[str, Any]
) -> None:
    async with peer_factory(shared_user.token) as a:
        await a.send({**frame, "id": "bad"})
        assert_error(await next_reply(a), "invalid", "bad")
        await a.send({**frame, "id": 99})
        assert_error(await next_reply(a), "invalid", 99)
        await a.ok("ping")


async def test_request_ids_may_be_strings_or_integers(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        for rid in ("s", 0, 123456789, -5, "x" * 100):
            await a.send({"op": "ping", "id": rid})
            reply = await next_reply(a)
            assert reply == {"op": "ok", "re": rid}


async def test_body_over_its_limit_is_refused(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = (await a.ok("room.create", name="r", kind="chat", members=[]))["room"]["id"]
        big = {"text": "x" * (70 << 10)}
        await refused(a, "send", ("too_large",), room=room, cid="big", body=big)
        assert (await a.ok("history", room=room))["messages"] == []
        await a.ok("send", room=room, cid="small", body={"text": "ok"})


@pytest.mark.parametrize("op", ["send", "edit"])
async def test_a_body_nested_too_deep_is_refused(
    tenant: Tenant, peer_factory: Any, op: str
) -> None:
    """A body nested deeper than 128 levels is `invalid` and changes nothing. Stored (just under
    orjson's 254 levels), no history page or push holding it could be encoded again: the
    room's history, its subscribers' catch-up and a whole batch of other tenants' sends
    failed."""
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = (await a.ok("room.create", name="r", kind="chat", members=[]))["room"]["id"]
        first = (await a.ok("send", room=room, cid="m1", body={"text": "one"}))["seq"]
        deep: dict[str, Any] = {"text": "deep"}
        cur = deep
        for _ in range(250):
            cur["a"] = {}
            cur = cur["a"]
        target = {"target": first} if op == "edit" else {}
        await refused(a, op, ("invalid",), room=room, cid="deep", body=deep, **target)
        await a.ok("subscribe", room=room, after=0)
        assert (await a.event("message"))["seq"] == first
        history = (await a.ok("history", room=room))["messages"]
        assert [(m["seq"], m["body"]) for m in history] == [(first, {"text": "one"})]
        await a.ok("send", room=room, cid="m2", body={"text": "two"})


# --- sizes and frame types ------------------------------------------------------------------


async def test_frame_over_the_message_limit_is_too_large(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = (await a.ok("room.create", name="r", kind="chat", members=[]))["room"]["id"]
        frame = {"op": "send", "id": "huge", "room": room, "cid": "huge", "body": {"text": ""}}
        pad = MIB + 1 - len(json.dumps(frame))
        frame["body"] = {"text": "x" * pad}
        raw = json.dumps(frame)
        assert len(raw) == MIB + 1
        await a.send(raw)
        reply = await next_reply(a, wait_s=10)
        assert reply["op"] == "error" and reply["code"] == "too_large", reply
        assert reply.get("re") in (None, "huge")
        await a.ok("ping")
        assert (await a.ok("history", room=room))["messages"] == []


async def test_size_counts_utf8_bytes(tenant: Tenant, peer_factory: Any) -> None:
    """Sizes are of the message as sent: 600,000 two-byte characters are over 1 MiB."""
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        await a.send(
            json.dumps({"op": "ping", "id": "p", "pad": "é" * 600_000}, ensure_ascii=False)
        )
        reply = await next_reply(a, wait_s=10)
        assert reply["op"] == "error" and reply["code"] == "too_large", reply
        await a.ok("ping")


async def test_frame_at_the_message_limit_is_not_too_large(
    tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        frame = {"op": "ping", "id": "edge", "pad": ""}
        frame["pad"] = "x" * (MIB - len(json.dumps(frame)))
        raw = json.dumps(frame)
        assert len(raw) == MIB
        await a.send(raw)
        reply = await next_reply(a, wait_s=10)
        assert reply.get("code") != "too_large", reply
        assert reply.get("re") == "edge", reply
        await a.ok("ping")


async def test_frame_beyond_the_transport_limit_closes_1009(
    tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        raw = json.dumps({"op": "ping", "id": "p", "pad": "x" * (2 * MIB + 64 * 1024)})

        async def push() -> None:
            try:
                await a.send(raw)
            except (ConnectionClosed, trio.BrokenResourceError, OSError):
                pass  # the server may close before it has read everything

        async with trio.open_nursery() as nursery:
            nursery.start_soon(push)
            code, frames = await close_code(a, wait_s=10)
        assert code == 1009, (code, frames)


async def test_binary_frame_is_invalid(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        await a.ws.send_message(b'{"op": "ping", "id": "bin"}')
        reply = await next_reply(a)
        assert reply["op"] == "error" and reply["code"] == "invalid", reply
        assert reply.get("re") in (None, "bin")
        await a.ok("ping")


# --- the handshake -------------------------------------------------------------------------


async def test_no_hello_in_time_closes_4001(peer_factory: Any) -> None:
    async with peer_factory() as raw:
        with trio.fail_after(HELLO_TIMEOUT_S + 4):
            code, frames = await close_code(raw)
        assert code == 4001, (code, frames)


async def test_hello_timeout_counts_from_connect_not_from_last_frame(
    peer_factory: Any,
) -> None:
    """A client that keeps sending WebSocket pings but never says hello is still closed."""
    async with peer_factory() as raw:
        with trio.fail_after(HELLO_TIMEOUT_S + 4):
            async with trio.open_nursery() as nursery:

                async def keep_pinging() -> None:
                    try:
                        while True:
                            await raw.ws.ping()
                            await trio.sleep(HELLO_TIMEOUT_S / 4)
                    except ConnectionClosed:
                        pass

                nursery.start_soon(keep_pinging)
                code, _ = await close_code(raw)
                nursery.cancel_scope.cancel()
        assert code == 4001


@pytest.mark.parametrize(
    "first",
    [
        {"op": "ping", "id": 1},
        {"op": "rooms", "id": "r"},
        {"op": "hello", "token": "gb6u_x"},  # no id: not a well-formed request
        {"op": "hello", "id": "h", "token": 5},
        {"op": "hello", "id": "h"},
        "not json",
        "[]",
    ],
    ids=lambda f: json.dumps(f)[:40],
)
async def test_first_frame_not_a_well_formed_hello_closes_4001(
    peer_factory: Any, first: dict[str, Any] | str
) -> None:
    async with peer_factory() as raw:
        await raw.send(first)
        code, frames = await close_code(raw)
        assert code == 4001, (code, frames)
        assert [f["code"] for f in frames if f.get("op") == "error"] == ["invalid"], frames
        assert not [f for f in frames if f.get("op") == "ok"], frames


async def test_binary_first_frame_closes_4001(peer_factory: Any) -> None:
    async with peer_factory() as raw:
        await raw.ws.send_message(b'{"op": "hello", "id": 1, "token": "x"}')
        code, frames = await close_code(raw)
        assert code == 4001, (code, frames)
        assert [f["code"] for f in frames if f.get("op") == "error"] == ["invalid"], frames


async def test_requests_pipelined_behind_hello_are_answered_in_order(
    shared_user: User, peer_factory: Any
) -> None:
    async with peer_factory() as raw:
        await raw.send({"op": "hello", "id": "h", "token": shared_user.token})
        for i in range(5):
            await raw.send({"op": "ping", "id": i})
        replies = [await next_reply(raw) for _ in range(6)]
        assert [(r["op"], r["re"]) for r in replies] == [("ok", "h")] + [
            ("ok", i) for i in range(5)
        ]


async def expect_unauthorized(peer_factory: Any, token: str) -> None:
    async with peer_factory() as raw:
        await raw.send({"op": "hello", "id": "h", "token": token})
        code, frames = await close_code(raw)
        assert [(f["op"], f.get("re"), f.get("code")) for f in frames] == [
            ("error", "h", "unauthorized")
        ], frames
        assert code == 4003, (code, frames)


async def test_hello_with_unknown_token(peer_factory: Any) -> None:
    await expect_unauthorized(peer_factory, "gb6u_not_a_token")
    await expect_unauthorized(peer_factory, "x")


async def test_hello_with_expired_token(node: Node, tenant: Tenant, peer_factory: Any) -> None:
    user = tenant.user("short")
    r = node.admin(
        "POST", f"/v1/instances/{tenant.instance}/users/{user.id}/tokens", {"ttl_seconds": 1}
    )
    assert r.status_code == 201, r.text
    token, expires = r.json()["token"], r.json()["expires_at"]
    expires_at = datetime.datetime.fromisoformat(expires.replace("Z", "+00:00"))
    async with peer_factory(token) as early:  # valid until it expires
        await early.ok("ping")
    # Nothing to await but the clock: the token lives one second.
    left = (expires_at - datetime.datetime.now(datetime.UTC)).total_seconds()
    await trio.sleep(max(0.0, left) + 0.05)
    await expect_unauthorized(peer_factory, token)
    async with peer_factory(user.token) as other:  # the user's other token still works
        await other.ok("ping")


@pytest.fixture
def own_node(tmp_path: Path) -> Iterator[Node]:
    """A node of the test's own, for tests that might take their node down."""
    with running_node(tmp_path) as n:
        yield n


async def test_hello_with_revoked_token(own_node: Node) -> None:
    node = own_node
    peer_factory = asynccontextmanager(lambda token=None: connect(node, token))
    tenant = node.create_tenant()
    user = tenant.user("revoked")
    base = f"/v1/instances/{tenant.instance}/users/{user.id}/tokens"
    r = node.admin("POST", base, {})
    assert r.status_code == 201, r.text
    token, token_id = r.json()["token"], r.json()["id"]
    async with peer_factory(token) as before:
        await before.ok("ping")
    revoked_at = trio.current_time()
    gone = node.admin("DELETE", f"{base}/{token_id}")
    assert gone.status_code == 204, gone.text
    await expect_unauthorized(peer_factory, token)
    async with peer_factory(user.token) as other:  # revocation is per token
        await other.ok("ping")
    assert node.admin("DELETE", f"{base}/tok_nope").status_code == 404
    # Revoking must not hurt the node: it keeps serving (a second and a half of requests).
    while trio.current_time() < revoked_at + 1.5:
        health = await trio.to_thread.run_sync(node.admin, "GET", "/healthz")
        assert health.status_code == 200
        assert node.proc is not None and node.proc.poll() is None, node.stderr()


# --- rate limits ---------------------------------------------------------------------------


async def test_flood_on_free_plan_is_rate_limited(node: Node, peer_factory: Any) -> None:
    free = node.create_tenant(plan="free")
    alice = free.user("alice")
    async with peer_factory(alice.token) as a:
        room = (await a.ok("room.create", name="r", kind="chat", members=[]))["room"]["id"]
        n = 300
        for i in range(n):
            await a.send(
                {"op": "send", "id": i, "room": room, "cid": f"c{i}", "body": {"text": f"{i}"}}
            )
        replies: dict[int, dict[str, Any]] = {}
        with trio.fail_after(20):
            while len(replies) < n:
                reply = await next_reply(a)
                assert reply["re"] not in replies, f"answered twice: {reply}"
                replies[reply["re"]] = reply
        limited = [r for r in replies.values() if r["op"] == "error"]
        accepted = [r for r in replies.values() if r["op"] == "ok"]
        assert limited, "300 requests at once on the free plan were all accepted"
        assert accepted
        for r in limited:
            assert r["code"] == "rate_limited", r
            assert isinstance(r["retry_after_ms"], int) and r["retry_after_ms"] > 0, r
        # A refused request changes nothing: the accepted sends alone took seqs, gaplessly.
        assert sorted(r["seq"] for r in accepted) == list(range(1, len(accepted) + 1))
        wait_ms = max(r["retry_after_ms"] for r in limited)
        # Waiting as told is the protocol: nothing else to await.
        await trio.sleep(min(wait_ms, 5000) / 1000 + 0.05)
        await a.ok("ping")
        history = (await a.ok("history", room=room, limit=200))["messages"]
        assert {m["cid"] for m in history} >= {f"c{r['re']}" for r in accepted[-100:]}


async def test_unlimited_plan_has_no_rate_limit(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        n = 400
        for i in range(n):
            await a.send({"op": "ping", "id": i})
        with trio.fail_after(20):
            replies = [await next_reply(a) for _ in range(n)]
        assert [r["op"] for r in replies] == ["ok"] * n
        assert sorted(r["re"] for r in replies) == list(range(n))


async def test_malformed_frames_count_against_the_rate_limit(node: Node, peer_factory: Any) -> None:
    """A malformed frame costs what a request does: a flood of them is refused `rate_limited`
    (with `re` when an id could be read), and the connection stays."""
    alice = node.create_tenant(plan="free").user("alice")
    async with peer_factory(alice.token) as a:
        n = 300
        for i in range(n):
            await a.send({"op": "no.such.op", "id": i})
        # A binary frame over the budget is refused the same way (no id to answer).
        await a.ws.send_message(b"\x00")
        with trio.fail_after(20):
            replies = [await next_reply(a) for _ in range(n + 1)]
        assert_error(replies.pop(), "rate_limited")
        assert sorted(r["re"] for r in replies) == list(range(n))
        codes = {r["code"] for r in replies}
        assert codes == {"invalid", "rate_limited"}, codes
        wait_ms = max(r.get("retry_after_ms", 0) for r in replies)
        assert 0 < wait_ms <= 5000
        await trio.sleep(wait_ms / 1000 + 0.05)  # waiting as told is the protocol
        await a.ok("ping")


open_peer = asynccontextmanager(connect)


@pytest.mark.parametrize(
    ("rate", "accepted"),
    [
        # Each hello counts against its user's rate: 3 at once, then one per 10 s (the first
        # socket's hello was one of them).
        ("rate = 0.1\nburst = 3\n", 2),
        # Whatever the rate allows, a socket says hello at most 5 times.
        ("rate = 1000.0\nburst = 1000\n", 5),
    ],
)
async def test_a_socket_refused_quota_exceeded_may_say_hello_again_but_not_without_limit(
    tmp_path: Path, rate: str, accepted: int
) -> None:
    """A hello refused `quota_exceeded` leaves its socket open for another; past the user's
    rate, or 5 hellos on the socket, `rate_limited` and close 1013 (try again later)."""
    config = f"[plans.one]\n{rate}[plans.one.quotas]\nconnections = 1\n"
    with running_node(tmp_path, config) as n:
        alice = n.create_tenant(plan="one").user("alice")
        async with open_peer(n, alice.token), open_peer(n) as second:  # the first takes the slot
            for i in range(accepted):
                await second.send({"op": "hello", "id": i, "token": alice.token})
                assert_error(await next_reply(second), "quota_exceeded", i)
            await second.send({"op": "hello", "id": accepted, "token": alice.token})
            code, frames = await close_code(second)
            assert len(frames) == 1, frames
            assert_error(frames[0], "rate_limited", accepted)
            assert 0 < frames[0]["retry_after_ms"] <= 10_000
            assert code == 1013, code


async def hello_refused(peer: Peer, token: str) -> tuple[int, dict[str, Any]]:
    """Say hello with `token`; the one frame the server answers with, and its close code."""
    await peer.send({"op": "hello", "id": "h", "token": token})
    code, frames = await close_code(peer)
    assert len(frames) == 1, frames
    return code, frames[0]


async def test_failed_hellos_from_one_address_are_limited(tmp_path: Path) -> None:
    """Past `ws_auth_failures_rate`/`_burst` failed hellos, an address's hellos are refused
    `rate_limited` (close 1013) without their token being looked at, until its wait is over;
    other addresses are served meanwhile. Loopback counts here (`per_ip_loopback`)."""
    config = (
        "[limits]\nper_ip_loopback = true\n"
        "ws_auth_failures_rate = 0.5\nws_auth_failures_burst = 2\n"
    )
    with running_node(tmp_path, config) as n:
        alice = n.create_tenant().user("alice")
        for _ in range(3):  # within the budget, then the failure that goes over it
            async with open_peer(n) as guesser:
                code, reply = await hello_refused(guesser, "gb6u_guess")
            assert_error(reply, "unauthorized", "h")
            assert code == 4003
        async with open_peer(n) as refused_peer:  # the right token is not even looked at
            code, reply = await hello_refused(refused_peer, alice.token)
        assert_error(reply, "rate_limited", "h")
        assert code == 1013
        wait_ms = reply["retry_after_ms"]
        assert 0 < wait_ms <= 4000, reply
        async with connect_from(n, "127.0.0.2") as elsewhere:
            await elsewhere.ok("hello", token=alice.token)
        await trio.sleep(wait_ms / 1000 + 0.05)  # waiting as told is the protocol
        async with open_peer(n, alice.token) as again:
            await again.ok("ping")


async def test_revoked_tokens_are_no_guesses(tmp_path: Path) -> None:
    """Only tokens nobody issued count against an address: a client that keeps trying a token
    it had (revoked, expired) is refused `unauthorized` each time, never blocked for it."""
    config = (
        "[limits]\nper_ip_loopback = true\n"
        "ws_auth_failures_rate = 0.5\nws_auth_failures_burst = 2\n"
    )
    with running_node(tmp_path, config) as n:
        tenant = n.create_tenant()
        alice = tenant.user("alice")
        base = f"/v1/instances/{tenant.instance}/users/{alice.id}/tokens"
        r = n.admin("POST", base, {})
        assert r.status_code == 201, r.text
        assert n.admin("DELETE", f"{base}/{r.json()['id']}").status_code == 204
        for _ in range(5):
            async with open_peer(n) as peer:
                code, reply = await hello_refused(peer, r.json()["token"])
            assert (code, reply["code"]) == (4003, "unauthorized"), reply
        async with open_peer(n, alice.token) as peer:
            await peer.ok("ping")


async def test_failed_user_tokens_over_http_count_with_the_hellos(tmp_path: Path) -> None:
    """The files API and WHIP/WHEP take the same user tokens as `hello`: their failures count
    against the same budget of the address, and a blocked address is refused there too (429,
    `Retry-After`) without its token being looked at."""
    config = (
        "[limits]\nper_ip_loopback = true\n"
        "ws_auth_failures_rate = 0.5\nws_auth_failures_burst = 2\n"
    )
    with running_node(tmp_path, config) as n:
        alice = n.create_tenant().user("alice")
        for _ in range(3):
            r = await trio.to_thread.run_sync(n.admin, "GET", "/v1/files/fil_x", None, "gb6u_x")
            assert_http_error(r, 401, "unauthorized")
        async with open_peer(n) as peer:
            code, reply = await hello_refused(peer, alice.token)
        assert_error(reply, "rate_limited", "h")
        assert code == 1013
        r = await trio.to_thread.run_sync(n.admin, "GET", "/v1/files/fil_x", None, alice.token)
        assert_http_error(r, 429, "rate_limited")
        assert 1 <= int(r.headers["Retry-After"]) <= 4


async def test_failed_hellos_from_loopback_are_not_limited_by_default(
    peer_factory: Any, shared_user: User
) -> None:
    """PROTOCOL.md: limits per IP address do not apply to loopback unless configured."""
    for _ in range(25):  # more than the default burst of 20
        await expect_unauthorized(peer_factory, "gb6u_guess")
    async with peer_factory(shared_user.token) as peer:
        await peer.ok("ping")


# --- other tenants' ids ---------------------------------------------------------------------


async def test_ids_of_another_instance_give_no_data(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    admin = tenant.user("admin", role="admin")
    mallory_tenant = node.create_tenant()
    mallory = mallory_tenant.user("mallory", role="owner")
    async with (
        peer_factory(alice.token) as a,
        peer_factory(admin.token) as ad,
        peer_factory(mallory.token) as m,
    ):
        private = (await a.ok("room.create", name="p", kind="chat", members=[admin.id]))["room"]
        lobby = (await a.ok("room.create", name="l", kind="chat", members=[], open=True))["room"]
        for rid in (private["id"], lobby["id"]):
            await a.ok("send", room=rid, cid="c1", body={"text": "tenant secret"})
        own = (await m.ok("room.create", name="m", kind="chat", members=[]))["room"]["id"]
        await a.ok("subscribe", room=private["id"], after=1)

        for rid in (private["id"], lobby["id"]):
            await refused(m, "room.join", HIDDEN, room=rid)
            await refused(m, "room.leave", HIDDEN, room=rid)
            await refused(m, "room.add", HIDDEN, room=rid, users=[mallory.id])
            await refused(m, "room.remove", HIDDEN, room=rid, users=[alice.id])
            await refused(m, "subscribe", HIDDEN, room=rid, after=0)
            await refused(m, "unsubscribe", HIDDEN, room=rid)
            await refused(m, "history", HIDDEN, room=rid)
            await refused(m, "send", HIDDEN, room=rid, cid="x", body={"text": "spam"})
            await refused(m, "edit", HIDDEN, room=rid, target=1, cid="e", body={"text": "x"})
            await refused(m, "delete", HIDDEN, room=rid, target=1, cid="d")
            await refused(m, "react", HIDDEN, room=rid, target=1, cid="r", emoji="x")
            await refused(m, "receipt", HIDDEN, room=rid, read=1)
            await refused(m, "typing", HIDDEN, room=rid)
            await refused(m, "search", HIDDEN, query="secret", room=rid)
        assert (await m.ok("search", query="tenant secret"))["hits"] == []
        assert [r["id"] for r in (await m.ok("rooms"))["rooms"]] == [own]
        # Users of the other instance cannot be pulled in either way.
        await refused(m, "room.add", HIDDEN, room=own, users=[alice.id])
        await refused(m, "room.create", HIDDEN, name="x", kind="chat", members=[alice.id])
        await refused(ad, "room.add", HIDDEN, room=private["id"], users=[mallory.id])

        # Nothing reached Alice's subscription, and nothing changed in her rooms.
        await a.ok("ping")
        assert [e for e in a.events if e.get("room") == private["id"]] == []
        heads = {r["id"]: r["head"] for r in (await a.ok("rooms"))["rooms"]}
        assert heads == {private["id"]: 1, lobby["id"]: 1}
        assert [r["id"] for r in (await m.ok("rooms"))["rooms"]] == [own]


# --- the admin HTTP API ---------------------------------------------------------------------


def counts(node: Node) -> dict[str, int]:
    db = sqlite3.connect(f"file:{node.data_dir / 'gb6.db'}?mode=ro", uri=True)
    try:
        return {
            t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in ("orgs", "instances", "users", "tokens")
        }
    finally:
        db.close()


def post(node: Node, path: str, content: bytes, token: str | None = None) -> httpx.Response:
    headers = {
        "Authorization": f"Bearer {node.admin_token if token is None else token}",
        "Content-Type": "application/json",
    }
    return httpx.post(node.http_url + path, content=content, headers=headers, timeout=10)


def assert_http_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code and isinstance(body["error"]["message"], str), body


def test_admin_bad_input_creates_nothing(node: Node, tenant: Tenant) -> None:
    user = tenant.user("u")
    other = node.create_tenant().user("other")
    before = counts(node)
    org, inst = tenant.org, tenant.instance
    bad_bodies = [b"{not json", b"[]", b'"name"', b"null", b"{}"]
    for body in bad_bodies:
        assert_http_error(post(node, "/v1/orgs", body), 400, "invalid")
        assert_http_error(post(node, f"/v1/orgs/{org}/instances", body), 400, "invalid")
        assert_http_error(post(node, f"/v1/instances/{inst}/users", body), 400, "invalid")
    for body in ({"name": ""}, {"name": 5}, {"name": None}, {"name": "x" * 201}):
        assert_http_error(node.admin("POST", "/v1/orgs", body), 400, "invalid")
        assert_http_error(node.admin("POST", f"/v1/orgs/{org}/instances", body), 400, "invalid")
        assert_http_error(node.admin("POST", f"/v1/instances/{inst}/users", body), 400, "invalid")
    for plan in ("gold", "", "FREE", 1):
        r = node.admin("POST", f"/v1/orgs/{org}/instances", {"name": "i", "plan": plan})
        assert_http_error(r, 400, "invalid")
    r = node.admin("POST", f"/v1/orgs/{org}/instances", {"name": "i", "region": "mars"})
    assert_http_error(r, 400, "invalid")
    for role in ("god", "", "Owner", 3):
        r = node.admin("POST", f"/v1/instances/{inst}/users", {"name": "u", "role": role})
        assert_http_error(r, 400, "invalid")
    tokens = f"/v1/instances/{inst}/users/{user.id}/tokens"
    for ttl in (0, -1, "60", 1.5, 10**9):
        assert_http_error(node.admin("POST", tokens, {"ttl_seconds": ttl}), 400, "invalid")
    assert_http_error(post(node, tokens, b"{bad"), 400, "invalid")

    # Unknown parents: 404.
    assert_http_error(
        node.admin("POST", "/v1/orgs", {"name": "o", "parent": "org_x"}), 404, "not_found"
    )
    assert_http_error(
        node.admin("POST", "/v1/orgs/org_x/instances", {"name": "i"}), 404, "not_found"
    )
    assert_http_error(
        node.admin("POST", "/v1/instances/ins_x/users", {"name": "u"}), 404, "not_found"
    )
    assert_http_error(
        node.admin("POST", f"/v1/instances/{inst}/users/usr_x/tokens", {}), 404, "not_found"
    )
    # A user of another instance is not a user of this one.
    r = node.admin("POST", f"/v1/instances/{inst}/users/{other.id}/tokens", {})
    assert_http_error(r, 404, "not_found")

    # Bad credentials: 401, whatever the call.
    calls = [
        ("POST", "/v1/orgs", {"name": "o"}),
        ("POST", f"/v1/orgs/{org}/instances", {"name": "i"}),
        ("POST", f"/v1/instances/{inst}/users", {"name": "u"}),
        ("POST", tokens, {}),
        ("DELETE", f"{tokens}/tok_x", None),
    ]
    for method, path, body in calls:
        for token in ("wrong", user.token, node.admin_token + "x", node.admin_token[:-1]):
            assert_http_error(node.admin(method, path, body, token=token), 401, "unauthorized")
        r = httpx.request(method, node.http_url + path, json=body, timeout=10)
        assert_http_error(r, 401, "unauthorized")
        r = httpx.request(
            method,
            node.http_url + path,
            json=body,
            headers={"Authorization": f"Basic {node.admin_token}"},
            timeout=10,
        )
        assert_http_error(r, 401, "unauthorized")

    assert counts(node) == before


@pytest.mark.parametrize("loopback_limited", [True, False])
async def test_connections_per_address_are_limited(tmp_path: Path, loopback_limited: bool) -> None:
    """Past `limits.max_connections_per_ip` from one address, new connections are closed at
    once; when one of them ends, there is room again. PROTOCOL.md: limits per address do not
    apply to loopback clients unless configured (`per_ip_loopback`)."""
    config = (
        f"[limits]\nmax_connections_per_ip = 2\nper_ip_loopback = {str(loopback_limited).lower()}\n"
    )
    with running_node(tmp_path, config) as n:
        port = int(n.ws_url.rsplit(":", 1)[1].split("/")[0])

        async def upgrade() -> tuple[trio.SocketStream, bytes]:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                await stream.send_all(
                    b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n"
                )
                with trio.fail_after(5):
                    return stream, await stream.receive_some(4096)
            except trio.BrokenResourceError:  # closed (or reset) before it could answer
                return stream, b""

        first, answer = await upgrade()
        assert answer.startswith(b"HTTP/1.1 101")
        second, answer = await upgrade()
        assert answer.startswith(b"HTTP/1.1 101")
        third, answer = await upgrade()
        await third.aclose()
        if not loopback_limited:
            assert answer.startswith(b"HTTP/1.1 101")  # loopback: no limit per address
            await first.aclose()
            await second.aclose()
            return
        assert answer == b""  # closed without an answer
        await first.aclose()
        with trio.fail_after(5):
            while True:  # the node notices the close a moment later
                again, answer = await upgrade()
                await again.aclose()
                if answer:
                    break
                await trio.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 101")
        await second.aclose()
