"""Tenant bootstrap over the admin HTTP API (PROTOCOL.md), and room creation over the WebSocket."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from bench.ws import BlockingClient

T = TypeVar("T")


@dataclass
class User:
    id: str
    token: str


@dataclass
class Tenant:
    org: str
    instance: str
    users: list[User]


class Admin:
    def __init__(self, http: str, token: str, concurrency: int) -> None:
        self.client = httpx.Client(
            base_url=http,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60.0,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(20):
            try:
                r = self.client.post(path, json=body)
            except httpx.TransportError:
                if attempt >= 5:
                    raise
                time.sleep(0.2 * (attempt + 1))
                continue
            if r.status_code in (429, 503):
                time.sleep(float(r.headers.get("Retry-After") or 0.2))
                continue
            if r.status_code >= 300:
                raise RuntimeError(f"POST {path} → {r.status_code} {r.text[:300]}")
            out: dict[str, Any] = r.json()
            return out
        raise RuntimeError(f"POST {path}: still rate limited after retries")

    def close(self) -> None:
        self.client.close()


def _parallel(fn: Callable[[int], T], n: int, concurrency: int) -> list[T]:
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(fn, range(n)))


def bootstrap(
    http: str, admin_token: str, n_users: int, *, label: str, concurrency: int = 32
) -> Tenant:
    """One organization, one `unlimited` instance, `n_users` members with a token each."""
    admin = Admin(http, admin_token, concurrency)
    try:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        org = admin.post("/v1/orgs", {"name": f"bench-{label}-{stamp}"})["id"]
        inst = admin.post(
            f"/v1/orgs/{org}/instances", {"name": f"bench-{label}", "plan": "unlimited"}
        )["id"]

        def make_user(i: int) -> User:
            uid = admin.post(
                f"/v1/instances/{inst}/users", {"name": f"bench-{i}", "role": "member"}
            )["id"]
            tok = admin.post(f"/v1/instances/{inst}/users/{uid}/tokens", {})["token"]
            return User(str(uid), str(tok))

        users = _parallel(make_user, n_users, concurrency)
        return Tenant(str(org), str(inst), users)
    finally:
        admin.close()


def create_rooms(
    ws_url: str, groups: list[list[User]], *, label: str, concurrency: int = 8
) -> list[str]:
    """One chat room per group, created by the group's first user with the others as members."""

    def make_room(i: int) -> str:
        group = groups[i]
        with BlockingClient(ws_url) as c:
            c.request("hello", token=group[0].token)
            ok = c.request(
                "room.create",
                name=f"{label}-{i}",
                kind="chat",
                members=[u.id for u in group[1:]],
            )
            return str(ok["room"]["id"])

    return _parallel(make_room, len(groups), min(concurrency, max(1, len(groups))))
