"""Media on a cluster: one `gb6 origin` (SQLite) and two `gb6 edge` processes with their SFUs.

- `media_participants` is counted by the instance's origin shard across both edges (the same
  `acquire_slot` as `connections`): the plan's limit holds for the whole cluster.
- An edge records: the files and the manifest land in the origin's blob store (uploaded over
  the link in bounded chunks), minutes are charged at the origin, and the recordings are
  listed and downloaded through any edge with the room's authorization.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_asyncio
from aiortc import VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack
from services import require_tool

from tests.conftest import Node, refused
from tests.media_client import MediaClient, loopback_ice, media_event, ws_of
from tests.test_cluster import Cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(Path(tmp_path_factory.mktemp("media_cluster")))
    try:
        ports = random.randrange(20_000, 58_000, 2_000)
        for i in range(2):
            low = ports + 1_000 * i
            c.edge(f"[media]\nudp_port_min = {low}\nudp_port_max = {low + 999}\n")
        yield c
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_ice(monkeypatch)
    yield


def _used(origin: Node, instance: str, resource: str) -> int:
    r = origin.admin("GET", f"/v1/instances/{instance}/quotas")
    assert r.status_code == 200, r.text
    (usage,) = [u for u in r.json()["usage"] if u["resource"] == resource]
    return int(usage["used"])


async def _until_used(origin: Node, instance: str, resource: str, n: int) -> None:
    with trio.fail_after(10):
        while await trio.to_thread.run_sync(_used, origin, instance, resource) != n:  # noqa: ASYNC110 - the count lives in another process
            await trio.sleep(0.05)


async def test_media_participants_are_counted_across_edges(cluster: Cluster) -> None:
    origin = cluster.origins[0]
    tenant = origin.create_tenant()
    path = f"/v1/instances/{tenant.instance}/quotas/media_participants"
    assert origin.admin("PUT", path, {"limit": 2}).status_code == 200
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    e0, e1 = cluster.edges
    with trio.fail_after(40):
        async with (
            ws_of(e0, alice.token) as wa,
            ws_of(e1, bob.token) as wb,
            ws_of(e0, carol.token) as wc0,
            ws_of(e1, carol.token) as wc1,
        ):
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[bob.id, carol.id])
            room = ok["room"]["id"]
            await wa.ok("media.join", room=room)  # on e0
            await wb.ok("media.join", room=room)  # on e1
            await _until_used(origin, tenant.instance, "media_participants", 2)
            # A third on either edge is refused: the limit is the cluster's, not an edge's.
            await refused(wc1, "media.join", ("quota_exceeded",), room=room)
            await refused(wc0, "media.join", ("quota_exceeded",), room=room)
            # Bob leaves on e1: the slot goes back to the origin and carol takes it on e0.
            await wb.ok("media.leave", room=room)
            await _until_used(origin, tenant.instance, "media_participants", 1)
            joined = await wc0.ok("media.join", room=room)
            assert [p["user"] for p in joined["participants"]] == [alice.id]
            # A socket that closes gives its slot back too.
            await wa.ws.aclose()
            await _until_used(origin, tenant.instance, "media_participants", 1)
            await wb.ok("media.join", room=room)
            await _until_used(origin, tenant.instance, "media_participants", 2)
