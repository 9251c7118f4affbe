"""The messaging core over a real socket: rooms, send/ack, subscribe/resume, edits, history."""

from __future__ import annotations

from typing import Any

from tests.conftest import Tenant


async def test_hello_send_subscribe_roundtrip(tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]
        assert room["kind"] == "chat" and room["open"] is False
        sub = await b.ok("subscribe", room=room["id"], after=0)
        assert sub["head"] == 0
        ack = await a.ok("send", room=room["id"], cid="c1", body={"text": "hello bob"})
        assert ack["seq"] == 1 and isinstance(ack["ts"], int)
        ev = await b.event("message")
        assert ev["seq"] == 1 and ev["sender"] == alice.id and ev["body"] == {"text": "hello bob"}
        assert ev["cid"] == "c1" and ev["ts"] == ack["ts"]
