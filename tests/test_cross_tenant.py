"""Cross-tenant isolation: every admin endpoint and every WebSocket op, tried by each actor of
tenant 1 on tenant 2's ids, tokens, rooms and files, is refused and answers none of tenant 2's
data.

The admin endpoints are enumerated from the node's /openapi.json, which is generated from the
route table that serves them: a new endpoint is in the matrix by construction, and one whose
path parameter this test does not know fails it. The WebSocket ops are enumerated from the
protocol core's parser table (edge/protocol.py), with the same rule.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from edge.protocol import _PARSERS
from tests.conftest import Node, connect, running_node

session = asynccontextmanager(connect)  # `async with session(node, token) as peer:`
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)
REFUSED = {401, 403, 404}
HIDDEN = ("forbidden", "not_found")
MEDIA_SESSION_OPS = frozenset(
    {
        "media.leave",
        "media.publish",
        "media.unpublish",
        "media.mute",
        "media.offer",
        "media.answer",
        "media.subscribe",
        "media.unsubscribe",
        "media.renegotiate",
        "media.ice",
        "media.record",
    }
)
SESSION_CODES = ("invalid", "unavailable")


@attrs.define
class World:
    node: Node
    t1: dict[str, str]  # tenant 1: ids and credentials of its actors
    t2: dict[str, str]  # tenant 2: ids, tokens and token ids
    secrets: set[str]  # every id, name and secret of tenant 2
    names: set[str]  # tenant 2's names and secrets (never echoed, even in errors)


def _ok(r: httpx.Response, status: int = 201) -> Any:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    return r.json()


def _tenant(node: Node, tag: str) -> dict[str, str]:
    """An org (with a child), an instance, an owner and a member user with tokens, an org
    owner member with a token, an org-wide and an instance-scoped API key with every admin
    permission."""
    admin = node.admin
    org = _ok(admin("POST", "/v1/orgs", {"name": f"{tag}-org"}))["id"]
    child = _ok(admin("POST", "/v1/orgs", {"name": f"{tag}-child", "parent": org}))["id"]
    inst = _ok(admin("POST", f"/v1/orgs/{org}/instances", {"name": f"{tag}-inst"}))["id"]
    t: dict[str, str] = {"org": org, "child": child, "inst": inst}
    for role in ("owner", "member"):
        user = _ok(
            admin("POST", f"/v1/instances/{inst}/users", {"name": f"{tag}-{role}", "role": role})
        )
        tok = _ok(admin("POST", f"/v1/instances/{inst}/users/{user['id']}/tokens", {}))
        t[f"user_{role}"], t[f"user_{role}_token"] = user["id"], tok["token"]
        t[f"user_{role}_token_id"] = tok["id"]
    member = _ok(
        admin("POST", f"/v1/orgs/{org}/members", {"name": f"{tag}-member", "role": "owner"})
    )
    tok = _ok(admin("POST", f"/v1/orgs/{org}/members/{member['id']}/tokens", {}))
    t["member"], t["member_token"], t["member_token_id"] = member["id"], tok["token"], tok["id"]
    perms = _ok(admin("GET", "/openapi.json"), 200)["paths"]["/v1/orgs/{org}/api_keys"]["post"]
    every = perms["requestBody"]["content"]["application/json"]["schema"]["properties"]
    all_perms = every["permissions"]["items"]["enum"]
    key = _ok(
        admin("POST", f"/v1/orgs/{org}/api_keys", {"name": f"{tag}-key", "permissions": all_perms})
    )
    t["key"], t["key_secret"] = key["id"], key["secret"]
    ikey = _ok(
        admin(
            "POST",
            f"/v1/orgs/{org}/api_keys",
            {"name": f"{tag}-ikey", "permissions": all_perms, "instance": inst},
        )
    )
    t["ikey"], t["ikey_secret"] = ikey["id"], ikey["secret"]
    return t


async def _rooms_and_files(node: Node, t: dict[str, str], tag: str) -> None:
    """A private room with a message and a file, and an open room, made by the owner user."""
    async with session(node, t["user_owner_token"]) as peer:
        room = await peer.ok(
            "room.create", name=f"{tag}-room", kind="chat", members=[t["user_member"]]
        )
        t["room"] = room["room"]["id"]
        opened = await peer.ok("room.create", name=f"{tag}-lobby", kind="chat", open=True)
        t["lobby"] = opened["room"]["id"]
        meet = await peer.ok(
            "room.create", name=f"{tag}-meet", kind="meeting", members=[t["user_member"]]
        )
        t["meet"] = meet["room"]["id"]
        await peer.ok("send", room=t["room"], cid="c1", body={"text": f"{tag} secret words"})
    r = await trio.to_thread.run_sync(
        functools.partial(
            httpx.post,
            f"{node.http_url}/v1/rooms/{t['room']}/files",
            content=PNG,
            headers={
                "Authorization": f"Bearer {t['user_owner_token']}",
                "Content-Type": "image/png",
            },
            timeout=10,
        )
    )
    t["file"] = _ok(r)["id"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with running_node(Path(tmp_path_factory.mktemp("cross_tenant"))) as node:
        t1, t2 = _tenant(node, "alpha"), _tenant(node, "bravo")
        trio.run(_rooms_and_files, node, t1, "alpha")
        trio.run(_rooms_and_files, node, t2, "bravo")
        names = {t2[k] for k in t2 if k.endswith(("token", "secret"))}
        names |= {"bravo-org", "bravo-child", "bravo-inst", "bravo-member", "bravo-key"}
        names |= {"bravo-owner", "bravo-room", "bravo-lobby", "bravo-meet", "bravo secret words"}
        yield World(node, t1, t2, set(t2.values()) | names, names)


# --- the admin API ---------------------------------------------------------------------------


def _actors(w: World) -> dict[str, str]:
    """Tenant 1's admin credentials (and a user token, which is none)."""
    return {
        "org owner": w.t1["member_token"],
        "org api key": w.t1["key_secret"],
        "instance api key": w.t1["ikey_secret"],
        "user token": w.t1["user_owner_token"],
    }


def _path_values(path: str, own: dict[str, str], other: dict[str, str]) -> dict[str, str]:
    """Path parameters: scope ones (org, inst) from `own`, the rest from `other`."""
    token_of = "user_owner_token_id" if "/users/" in path else "member_token_id"
    fixed = {"plan": "free", "resource": "rooms", "period": "2020-01"}
    out = {}
    for name in re.findall(r"{(\w+)}", path):
        if name in fixed:
            out[name] = fixed[name]
        elif name in ("org", "inst"):
            out[name] = own[name]
        elif name in ("user", "member", "key"):
            out[name] = other["user_owner" if name == "user" else name]
        elif name == "token_id":
            out[name] = other[token_of]
        else:
            pytest.fail(f"{path}: no cross-tenant value for path parameter {{{name}}}")
    return out


def _example(schema: dict[str, Any], t2: dict[str, str]) -> Any:
    """A valid value for `schema`; ids that may name a tenant are tenant 2's."""
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        props = schema.get("properties", {})
        body = {k: _example(props[k], t2) for k in schema.get("required", ())}
        for k, v in {"parent": t2["org"], "instance": t2["inst"]}.items():
            if k in props:
                body[k] = v
        return body
    if kind == "array":
        return [_example(schema["items"], t2)]
    if kind == "integer":
        return max(schema.get("minimum", 1), 1)
    if kind == "boolean":
        return True
    if schema.get("pattern", "").startswith("^[0-9]{4}"):
        return "2020-01"
    return "x"


def _cases(w: World) -> list[tuple[str, str, dict[str, Any] | None, dict[str, str]]]:
    """(method, url path, body, query) for every admin operation: all of tenant 2's ids, and
    tenant 1's org/instance with tenant 2's sub-resource where the path has one; operations
    without path parameters get tenant 2's ids as filters and in the body."""
    doc = _ok(w.node.admin("GET", "/openapi.json"), 200)
    assert len(doc["paths"]) >= 20
    cases = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            body = None
            if "requestBody" in op:
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                body = _example(schema, w.t2)
            query = {
                p["name"]: {"org": w.t2["org"], "parent": w.t2["org"]}.get(p["name"], w.t2["inst"])
                for p in op["parameters"]
                if p["in"] == "query" and p["name"] in ("org", "parent", "instance")
            }
            variants = [_path_values(path, w.t2, w.t2)]
            names = set(re.findall(r"{(\w+)}", path))
            if names & {"org", "inst"} and names - {"org", "inst", "plan", "resource", "period"}:
                variants.append(_path_values(path, w.t1, w.t2))
            for values in variants:
                url = path.format(**values)
                cases.append((method.upper(), url, body, query))
    return cases


def test_every_admin_endpoint_refuses_tenant_1_on_tenant_2(world: World) -> None:
    w = world
    before = _snapshot(w)
    cases = _cases(w)
    ops = {(m, u) for m, u, _, _ in cases}
    assert len(ops) >= 40, len(ops)
    with httpx.Client(base_url=w.node.http_url, timeout=10) as http:
        for actor, cred in _actors(w).items():
            for method, url, body, query in cases:
                r = http.request(
                    method,
                    url,
                    json=body,
                    params=query,
                    headers={"Authorization": f"Bearer {cred}"},
                )
                where = f"{actor}: {method} {url} {query} {body} -> {r.status_code} {r.text}"
                if method == "GET" and r.status_code == 200 and url.count("/") <= 2:
                    # A listing without a tenant in its path (orgs, instances, audit, plans):
                    # it may answer, with nothing of tenant 2 in it.
                    assert not any(s in r.text for s in w.secrets), where
                    continue
                if url.startswith("/v1/plans"):
                    assert r.status_code == (401 if actor == "user token" else 200), where
                    continue
                assert r.status_code in REFUSED, where
                if actor == "user token":
                    assert r.status_code == 401, where
                err = r.json()
                assert set(err) == {"error"} and set(err["error"]) == {"code", "message"}, where
                assert not any(s in r.text for s in w.names), where
                # An error may repeat an id the caller sent, never another of tenant 2's.
                sent = f"{url} {query} {body}"
                assert not any(s in r.text for s in w.secrets if s not in sent), where
    assert _snapshot(w) == before


def _snapshot(w: World) -> list[Any]:
    """Tenant 2 as the operator sees it."""
    t2, admin = w.t2, w.node.admin
    paths = [
        f"/v1/orgs/{t2['org']}",
        f"/v1/orgs/{t2['org']}/children",
        f"/v1/orgs/{t2['org']}/members",
        f"/v1/orgs/{t2['org']}/api_keys",
        f"/v1/orgs/{t2['org']}/instances",
        f"/v1/instances/{t2['inst']}/users",
        f"/v1/instances/{t2['inst']}/quotas",
        f"/v1/instances/{t2['inst']}/invoices",
    ]
    return [_ok(admin("GET", p), 200) for p in paths]


def test_tenant_2_still_works_after_the_matrix(world: World) -> None:
    """Nothing tenant 1 tried revoked, suspended or deleted anything of tenant 2's."""
    w = world
    for cred in (w.t2["member_token"], w.t2["key_secret"]):
        r = w.node.admin("GET", f"/v1/instances/{w.t2['inst']}", token=cred)
        assert r.status_code == 200 and r.json()["status"] == "active", r.text

    async def hello() -> None:
        async with session(w.node, w.t2["user_owner_token"]) as peer:
            history = await peer.ok("history", room=w.t2["room"])
            assert [m["body"]["text"] for m in history["messages"]] == ["bravo secret words"]

    trio.run(hello)


# --- the WebSocket --------------------------------------------------------------------------


def _frames(t2: dict[str, str]) -> dict[str, list[dict[str, Any]]]:
    """For every op, frames aimed at tenant 2 (its rooms, users and messages)."""
    rooms = (t2["room"], t2["lobby"])
    per_room: dict[str, list[dict[str, Any]]] = {
        "room.join": [{"room": r} for r in rooms],
        "room.leave": [{"room": r} for r in rooms],
        "room.add": [{"room": r, "users": [t2["user_member"]]} for r in rooms],
        "room.remove": [{"room": r, "users": [t2["user_owner"]]} for r in rooms],
        "subscribe": [{"room": r, "after": 0} for r in rooms],
        "unsubscribe": [{"room": r} for r in rooms],
        "send": [{"room": r, "cid": "x1", "body": {"text": "spam"}} for r in rooms],
        "edit": [{"room": r, "target": 1, "cid": "x2", "body": {"text": "x"}} for r in rooms],
        "delete": [{"room": r, "target": 1, "cid": "x3"} for r in rooms],
        "react": [{"room": r, "target": 1, "cid": "x4", "emoji": "x"} for r in rooms],
        "history": [{"room": r} for r in rooms],
        "receipt": [{"room": r, "read": 1} for r in rooms],
        "typing": [{"room": r} for r in rooms],
        "search": [{"query": "secret", "room": r} for r in rooms],
        "room.reads": [{"room": r} for r in rooms],
        # Tenant 2's users pulled into a room of tenant 1's.
        "room.create": [{"name": "x", "kind": "chat", "members": [t2["user_member"]]}],
    }
    # Media: tenant 2's meeting room (and its chat rooms).
    media: dict[str, dict[str, Any]] = {
        "media.join": {},
        "media.leave": {},
        "media.publish": {"kind": "audio", "source": "microphone"},
        "media.unpublish": {"track": "t1"},
        "media.mute": {"track": "t1", "muted": True},
        "media.offer": {"sdp": "v=0\r\n"},
        "media.answer": {"sdp": "v=0\r\n"},
        "media.subscribe": {"tracks": ["t1"]},
        "media.unsubscribe": {"tracks": ["t1"]},
        "media.renegotiate": {},
        "media.ice": {"candidate": None},
        "media.cohost": {"user": t2["user_member"], "on": True},
        "media.record": {"on": True},
    }
    for op, fields in media.items():
        per_room[op] = [{"room": r, **fields} for r in (t2["meet"], *rooms)]
    return per_room


# Ops that name nothing of another tenant's: they answer, but only with the caller's own things.
ANSWER_OWN = {
    "ping": {},
    "rooms": {},
    "presence.set": {"status": "away"},
    "search": {"query": "bravo secret words"},
}


async def test_every_websocket_op_refuses_tenant_1_on_tenant_2(world: World) -> None:
    w = world
    frames = _frames(w.t2)
    ops = set(_PARSERS)
    missing = ops - set(frames) - set(ANSWER_OWN) - {"hello", "presence.get"}
    assert not missing, f"no cross-tenant case for ops {sorted(missing)}"
    async with session(w.node, w.t1["user_owner_token"]) as peer:
        for op, cases in frames.items():
            for fields in cases:
                reply = await peer.request(op, **fields)
                assert reply["op"] == "error", (op, fields, reply)
                # A node built without the op's handler (media on an edge without the SFU)
                # says so. Media ops after media.join need the caller's own media session in
                # that room, which media.join refused: they fail on that (`invalid`, or
                # `unavailable` where the edge cannot record), whatever the room.
                unsupported = reply["code"] == "invalid" and reply["message"] == "unsupported op"
                codes = HIDDEN + (SESSION_CODES if op in MEDIA_SESSION_OPS else ())
                assert reply["code"] in codes or unsupported, (op, fields, reply)
                assert set(reply) <= {"op", "re", "code", "message"}, reply
                _no_data(w, reply, fields)
        for op, fields in ANSWER_OWN.items():
            reply = await peer.ok(op, **fields)
            _no_data(w, reply, fields)
        reply = await peer.ok("presence.get", users=[w.t2["user_owner"], w.t2["user_member"]])
        assert reply["presence"] == {}, reply
        # A second hello (with tenant 2's token) does not switch tenants.
        reply = await peer.request("hello", token=w.t2["user_owner_token"])
        assert reply["op"] == "error" and reply["code"] == "invalid", reply
        own = {w.t1["room"], w.t1["lobby"], w.t1["meet"]}
        assert {r["id"] for r in (await peer.ok("rooms"))["rooms"]} == own
        await peer.ok("ping")
        # Nothing of tenant 2 was pushed to this connection meanwhile.
        for ev in peer.events:
            _no_data(w, ev, {})
    # Tenant 2's admin credentials are not socket tokens.
    for cred in (w.t2["member_token"], w.t2["key_secret"]):
        async with session(w.node) as fresh:
            reply = await fresh.request("hello", token=cred)
            assert reply["op"] == "error" and reply["code"] == "unauthorized", reply


def _no_data(w: World, frame: dict[str, Any], sent: dict[str, Any]) -> None:
    text = repr(frame)
    assert not any(s in text for s in w.names), frame
    assert not any(s in text for s in w.secrets if s not in repr(sent)), frame


async def test_files_of_tenant_2_are_out_of_reach(world: World) -> None:
    w = world

    def call(method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method,
            w.node.http_url + path,
            headers={"Authorization": f"Bearer {w.t1['user_owner_token']}", **kw.pop("h", {})},
            timeout=10,
            **kw,
        )

    r = await trio.to_thread.run_sync(call, "GET", f"/v1/files/{w.t2['file']}")
    assert r.status_code == 404 and set(r.json()) == {"error"}, r.text
    up = functools.partial(
        call,
        "POST",
        f"/v1/rooms/{w.t2['room']}/files",
        content=PNG,
        h={"Content-Type": "image/png"},
    )
    r = await trio.to_thread.run_sync(up)
    assert r.status_code in REFUSED and set(r.json()) == {"error"}, r.text
    assert not any(s in r.text for s in w.names)
