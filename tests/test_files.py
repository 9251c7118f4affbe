"""Files over HTTP against a real node: upload by members, download by members of that room only."""

from __future__ import annotations

import functools
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Node, Tenant, make_room, module_node

FILE_BYTES = 4096  # the node's configured limit, small so that "too large" is cheap
node = module_node("files", f"[limits]\nfile_bytes = {FILE_BYTES}\n")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


async def http(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """A blocking httpx call, off the event loop."""
    call = functools.partial(httpx.request, method, url, timeout=10, **kwargs)
    return await trio.to_thread.run_sync(call)


async def upload(
    node: Node, room: str, data: bytes, ctype: str, token: str | None
) -> httpx.Response:
    headers = {"Content-Type": ctype}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return await http(
        "POST", f"{node.http_url}/v1/rooms/{room}/files", content=data, headers=headers
    )


async def download(node: Node, file_id: str, token: str | None) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return await http("GET", f"{node.http_url}/v1/files/{file_id}", headers=headers)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    if code is not None:
        assert body["error"]["code"] == code, body


async def test_member_uploads_and_members_download(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [bob.id])
        r = await upload(node, room, PNG, "image/png", alice.token)
        assert r.status_code == 201, r.text
        meta = r.json()
        assert isinstance(meta["id"], str) and meta["id"]
        assert meta["size"] == len(PNG) and meta["type"] == "image/png"
        for user in (alice, bob):
            got = await download(node, meta["id"], user.token)
            assert got.status_code == 200, got.text
            assert got.content == PNG
            assert got.headers["content-type"].split(";")[0] == "image/png"
            assert got.headers["x-content-type-options"] == "nosniff"
            assert got.headers["content-disposition"].startswith("attachment")


async def test_content_type_parameters_and_case(
    node: Node, tenant: Tenant, peer_factory: Any
) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        r = await upload(node, room, b"hello, text", "text/plain; charset=utf-8", alice.token)
        assert r.status_code == 201, r.text
        assert r.json()["size"] == 11 and r.json()["type"] == "text/plain"
        got = await download(node, r.json()["id"], alice.token)
        assert got.content == b"hello, text"
        assert got.headers["content-type"].split(";")[0] == "text/plain"


async def test_outsiders_get_nothing(node: Node, tenant: Tenant, peer_factory: Any) -> None:
    alice, carol = tenant.user("alice"), tenant.user("carol")
    admin = tenant.user("admin", role="admin")
    stranger = node.create_tenant().user("stranger", role="owner")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        lobby = await make_room(a, [], open=True)
        ids = []
        for rid in (room, lobby):
            r = await upload(node, rid, PNG, "image/png", alice.token)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        missing = await download(node, "file_does_not_exist", alice.token)
        assert_error(missing, 404, "not_found")
        for user in (carol, admin, stranger):  # not members of either room
            for file_id in ids:
                got = await download(node, file_id, user.token)
                assert got.status_code in (403, 404), (user.name, got.status_code)
                assert PNG not in got.content
                # Indistinguishable from a file that does not exist.
                assert got.status_code == missing.status_code
                assert got.json()["error"]["code"] == missing.json()["error"]["code"]


async def test_removed_member_loses_access(node: Node, tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [bob.id])
        file_id = (await upload(node, room, PNG, "image/png", alice.token)).json()["id"]
        assert (await download(node, file_id, bob.token)).status_code == 200
        await a.ok("room.remove", room=room, users=[bob.id])
        got = await download(node, file_id, bob.token)
        assert got.status_code in (403, 404) and PNG not in got.content


async def test_upload_needs_membership(node: Node, tenant: Tenant, peer_factory: Any) -> None:
    alice, carol = tenant.user("alice"), tenant.user("carol")
    stranger = node.create_tenant().user("stranger")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        lobby = await make_room(a, [], open=True)
        for rid in (room, lobby, "room_does_not_exist"):
            for user in (carol, stranger):
                r = await upload(node, rid, PNG, "image/png", user.token)
                assert r.status_code in (403, 404), (rid, user.name, r.text)
                assert_error(r, r.status_code)


async def test_no_or_bad_token_is_401(node: Node, tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        file_id = (await upload(node, room, PNG, "image/png", alice.token)).json()["id"]
        assert_error(await upload(node, room, PNG, "image/png", None), 401, "unauthorized")
        assert_error(await upload(node, room, PNG, "image/png", "gb6u_nope"), 401, "unauthorized")
        assert_error(await upload(node, room, PNG, "image/png", node.admin_token), 401)
        assert_error(await download(node, file_id, None), 401, "unauthorized")
        assert_error(await download(node, file_id, "gb6u_nope"), 401, "unauthorized")
        basic = await http(
            "GET",
            f"{node.http_url}/v1/files/{file_id}",
            headers={"Authorization": f"Basic {alice.token}"},
        )
        assert_error(basic, 401, "unauthorized")


async def test_size_limit(node: Node, tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        at_limit = bytes(i % 251 for i in range(FILE_BYTES))
        r = await upload(node, room, at_limit, "application/octet-stream", alice.token)
        assert r.status_code == 201, r.text
        assert r.json()["size"] == FILE_BYTES
        assert (await download(node, r.json()["id"], alice.token)).content == at_limit
        over = await upload(node, room, at_limit + b"!", "application/octet-stream", alice.token)
        assert_error(over, 413, "too_large")
        big = await upload(node, room, b"x" * (FILE_BYTES * 4), "image/png", alice.token)
        assert_error(big, 413, "too_large")


@pytest.mark.parametrize(
    "ctype",
    [
        "text/html",
        "text/html; charset=utf-8",
        "TEXT/HTML",
        "application/xhtml+xml",
        "image/svg+xml",
        "application/javascript",
        "text/javascript",
    ],
)
async def test_denied_types(node: Node, tenant: Tenant, peer_factory: Any, ctype: str) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        r = await upload(node, room, b"<html><script>alert(1)</script></html>", ctype, alice.token)
        assert_error(r, 400, "invalid")


async def test_empty_file_is_invalid(node: Node, tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        room = await make_room(a, [])
        assert_error(await upload(node, room, b"", "image/png", alice.token), 400, "invalid")


async def test_message_refers_to_a_file(node: Node, tenant: Tenant, peer_factory: Any) -> None:
    alice, bob = tenant.user("alice"), tenant.user("bob")
    async with peer_factory(alice.token) as a, peer_factory(bob.token) as b:
        room = await make_room(a, [bob.id])
        await b.ok("subscribe", room=room, after=0)
        meta = (await upload(node, room, PNG, "image/png", alice.token)).json()
        body = {"text": "the chart", "files": [{"id": meta["id"], "type": meta["type"]}]}
        await a.ok("send", room=room, cid="f1", body=body)
        ev = await b.event("message")
        assert ev["body"] == body
        got = await download(node, ev["body"]["files"][0]["id"], bob.token)
        assert got.status_code == 200 and got.content == PNG
        (msg,) = (await b.ok("history", room=room))["messages"]
        assert msg["body"]["files"][0]["id"] == meta["id"]
