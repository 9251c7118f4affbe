"""Media on a cluster: one `gb6 origin` (SQLite) and two `gb6 edge` processes with their SFUs.

- `media_participants` is counted by the instance's origin shard across both edges (the same
  `acquire_slot` as `connections`): the plan's limit holds for the whole cluster.
- An edge records: the files and the manifest land in the origin's blob store (uploaded over
  the link in bounded chunks), minutes are charged at the origin, and the recordings are
  listed and downloaded through any edge with the room's authorization.
"""

from __future__ import annotations

import random
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_asyncio
from aiortc import VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack

from tests.conftest import Node, Peer, Tenant, User, close_code, refused
from tests.media_client import MediaClient, loopback_ice, media_event, ws_of
from tests.services import require_tool
from tests.tcp_proxy import TcpProxy, tcp_proxy
from tests.test_cluster import Cluster, _config, _metrics
from tests.test_media_recording import probe

RECORD_S = 4.0


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


def _two_participants_at_most(origin: Node) -> tuple[Tenant, tuple[User, User, User]]:
    """A tenant whose instance takes two media participants at once, and three of its users."""
    tenant = origin.create_tenant()
    path = f"/v1/instances/{tenant.instance}/quotas/media_participants"
    assert origin.admin("PUT", path, {"limit": 2}).status_code == 200
    return tenant, (tenant.user("alice"), tenant.user("bob"), tenant.user("carol"))


async def test_media_participants_are_counted_across_edges(cluster: Cluster) -> None:
    origin = cluster.origins[0]
    tenant, (alice, bob, carol) = _two_participants_at_most(origin)
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


async def test_an_edge_records_into_the_origin(cluster: Cluster, tmp_path: Any) -> None:
    """Recorded on e0, listed and downloaded through e1 (which never saw the media): the
    files and manifest are the origin's; minutes are charged there; non-members get nothing."""
    ffprobe = require_tool("ffprobe")
    origin = cluster.origins[0]
    tenant = origin.create_tenant()
    alice, bob, eve = tenant.user("alice"), tenant.user("bob"), tenant.user("eve")
    e0, e1 = cluster.edges
    with trio.fail_after(50):
        async with trio_asyncio.open_loop(), ws_of(e0, alice.token) as wa:
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[bob.id])
            room = ok["room"]["id"]
            a = MediaClient(wa, room)
            await a.join()
            await a.publish(VideoStreamTrack(), AudioStreamTrack())
            rec = (await wa.ok("media.record", room=room, on=True))["recording"]
            ev = await media_event(wa, "media.recording")
            assert ev == {**ev, "recording": rec, "state": "started"}
            await trio.sleep(RECORD_S)  # the recording's length is the point: real time
            manifest = (await wa.ok("media.record", room=room, on=False))["manifest"]
            await wa.ok("media.leave", room=room)
            await a.close()
    assert manifest["id"] == rec and len(manifest["tracks"]) == 2
    # The first minute was charged at the origin, before anything was recorded.
    assert await trio.to_thread.run_sync(_used, origin, tenant.instance, "recording_minutes") == 1
    files = {}
    async with httpx.AsyncClient(base_url=e1.http_url, timeout=20) as http:
        auth = {"Authorization": f"Bearer {bob.token}"}
        listed = (await http.get(f"/v1/rooms/{room}/recordings", headers=auth)).json()
        assert [r["id"] for r in listed["recordings"]] == [rec]
        for track in manifest["tracks"]:
            url = f"/v1/rooms/{room}/recordings/{rec}/files/{track['file']}"
            r = await http.get(url, headers=auth)
            assert r.status_code == 200, r.text
            assert r.headers["content-type"] == track["content_type"]
            assert len(r.content) == track["bytes"] > 0
            files[track["kind"]] = (track, r.content)
            # Not a member of the room (same instance), another tenant: refused, nothing sent.
            for who in (eve, cluster.origins[0].create_tenant().user("x")):
                r = await http.get(url, headers={"Authorization": f"Bearer {who.token}"})
                assert r.status_code in (403, 404), r.text
                assert r.json()["error"]["code"] in ("forbidden", "not_found"), r.text
        # A recording id that is not the room's: not found.
        r = await http.get(f"/v1/rooms/{room}/recordings/rec_nope", headers=auth)
        assert r.status_code == 404
    for kind, codec in (("video", "vp8"), ("audio", "opus")):
        track, data = files[kind]
        info = await probe(ffprobe, data, tmp_path)
        assert [s["codec_name"] for s in info["streams"]] == [codec]
        assert abs(float(info["format"]["duration"]) - RECORD_S) < 1.0, info["format"]


async def test_recording_minutes_quota_holds_on_an_edge(cluster: Cluster) -> None:
    origin = cluster.origins[0]
    tenant = origin.create_tenant()
    path = f"/v1/instances/{tenant.instance}/quotas/recording_minutes"
    assert origin.admin("PUT", path, {"limit": 0}).status_code == 200
    alice = tenant.user("alice")
    with trio.fail_after(20):
        async with ws_of(cluster.edges[1], alice.token) as wa:
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[])
            room = ok["room"]["id"]
            await refused(wa, "media.record", ("quota_exceeded",), room=room, on=True)
            await refused(wa, "media.record", ("not_found",), room=room, on=False)


async def test_recording_store_takes_only_ordered_chunks_of_recording_blobs(tmp_path: Any) -> None:
    """What an edge may send over the link (rec.write/rec.read): recording blob ids only, each
    chunk where the previous ended, bounded; a refused call changes nothing."""
    from node.errors import GB6Error
    from origin.blobs import LocalBlobStore
    from origin.recording_store import CHUNK, RecordingStore

    store = RecordingStore(LocalBlobStore(tmp_path), max_bytes=CHUNK + 10)
    for bad in ("file_abc", "../x", "rec_", "REC_A"):
        with pytest.raises(GB6Error) as exc:
            await store.write(bad, 0, b"x", True)
        assert exc.value.code == "invalid"
    await store.write("recf_a", 0, b"a" * CHUNK, False)
    with pytest.raises(GB6Error) as exc:  # not where the upload is
        await store.write("recf_a", 5, b"b", True)
    assert exc.value.code == "invalid"
    with pytest.raises(GB6Error) as exc:  # past the file limit
        await store.write("recf_a", CHUNK, b"b" * 11, True)
    assert exc.value.code == "too_large"
    with pytest.raises(GB6Error) as exc:  # not readable before its last chunk
        await store.read("recf_a", 0)
    assert exc.value.code == "not_found"
    await store.write("recf_a", CHUNK, b"b" * 10, True)
    assert await store.read("recf_a", CHUNK - 1) == (b"a" + b"b" * 10, CHUNK + 10)
    await store.add_to_index("room_1", "rec_1")
    await store.add_to_index("room_1", "rec_2")
    await store.add_to_index("room_1", "rec_1")  # asked again (its answer lost): listed once
    assert await store.index("room_1") == ["rec_1", "rec_2"] and await store.index("r2") == []


@contextmanager
def edge_behind_a_proxy(cluster: Cluster, base: Path) -> Iterator[tuple[Node, TcpProxy]]:
    """A media edge whose link to the first shard runs through a proxy the test cuts."""
    origin, other = cluster.origins
    with tcp_proxy(origin.link) as proxy:
        low = random.randrange(20_000, 58_000, 1_000)
        config = _config(base, [proxy.address, other.link], name="cut")
        config.write_text(
            config.read_text() + f"[media]\nudp_port_min = {low}\nudp_port_max = {low + 999}\n"
        )
        edge = Node(base / "cut", extra_args=["--config", str(config)], command="edge")
        edge.start()
        try:
            yield edge, proxy
        finally:
            edge.kill()


async def test_media_outlasts_a_lost_link_and_its_sessions_take_their_slots_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    """An edge loses its link to the instance's shard (a partition; the origin serves the
    other edge): its meeting goes on (media flows through the edge alone), the origin frees
    the edge's slots, and once the link is back each session takes its slot again; the one
    refused then (the limit reached meanwhile on the other edge) is told `closed` and ends."""
    origin = cluster.origins[0]
    tenant, (alice, bob, carol) = _two_participants_at_most(origin)
    with edge_behind_a_proxy(cluster, tmp_path) as (cut_off, proxy), trio.fail_after(60):
        async with (
            trio_asyncio.open_loop(),
            ws_of(cut_off, alice.token) as wa,
            ws_of(cut_off, bob.token) as wb,
            ws_of(cluster.edges[1], carol.token) as wc,
        ):
            members = [bob.id, carol.id]
            ok = await wa.ok("room.create", name="m", kind="meeting", members=members)
            room = ok["room"]["id"]
            a, b = MediaClient(wa, room), MediaClient(wb, room)
            await a.join()
            await b.join()
            (video,) = await a.publish(VideoStreamTrack())
            await b.subscribe([video])
            await b.frames(video, 5)  # flowing (and what was queued read)
            await _until_used(origin, tenant.instance, "media_participants", 2)
            proxy.cut()
            await _until_used(origin, tenant.instance, "media_participants", 0)
            await b.frames(video, 30)  # a second's worth, sent while the link is down
            await wc.ok("media.join", room=room)  # the origin counts it: 1 of 2
            proxy.heal()
            closed: list[Peer] = []
            async with trio.open_nursery() as nursery:

                async def told(w: Peer) -> None:
                    w.timeout = 20  # the edge reconnects first
                    await media_event(w, "media.state", lambda e: e["state"] == "closed")
                    closed.append(w)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(told, wa)
                nursery.start_soon(told, wb)
            (gone,) = closed
            kept = wb if gone is wa else wa
            await _until_used(origin, tenant.instance, "media_participants", 2)
            await refused(gone, "media.leave", ("invalid",), room=room)
            await kept.ok("media.leave", room=room)  # its new slot goes back
            await _until_used(origin, tenant.instance, "media_participants", 1)
            await a.close()
            await b.close()


@asynccontextmanager
async def _a_meeting_behind_a_proxy(
    cluster: Cluster, base: Path
) -> AsyncIterator[tuple[Node, TcpProxy, Peer, Peer, str]]:
    """Alice's meeting room with carol, both connected to an edge whose link to the shard goes
    through a proxy: the edge, the proxy, their sockets, the room."""
    tenant = cluster.origins[0].create_tenant()
    alice, carol = tenant.user("alice"), tenant.user("carol")
    with edge_behind_a_proxy(cluster, base) as (cut_off, proxy), trio.fail_after(60):
        async with (
            trio_asyncio.open_loop(),
            ws_of(cut_off, alice.token) as wa,
            ws_of(cut_off, carol.token) as wc,
        ):
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[carol.id])
            yield cut_off, proxy, wa, wc, ok["room"]["id"]


async def _alice_shows_carol(wa: Peer, wc: Peer, room: str) -> tuple[Any, Any, str]:
    """Both join `room`'s media, alice publishes video, carol receives it: their clients and
    the track."""
    a, c = MediaClient(wa, room), MediaClient(wc, room)
    await a.join()
    await c.join()
    (video,) = await a.publish(VideoStreamTrack())
    await c.subscribe([video])
    await c.frames(video, 5)
    return a, c, video


async def _cut_and_seen(edge: Node, proxy: TcpProxy) -> float:
    """Cut `edge`'s proxied link, once the edge has seen it go down; its link count."""
    links = _metrics(edge)["gb6_origin_links"]
    proxy.cut()
    while _metrics(edge)["gb6_origin_links_up"] == links:  # noqa: ASYNC110
        await trio.sleep(0.05)
    return links


async def test_a_request_made_while_the_link_is_down_leaves_a_meeting_going(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Alice, in a meeting on an edge whose link to the shard is down, sends a message: it never
    left the edge, so she is told `unavailable` with a time to retry, and her socket stays with
    its media, which goes on; once the link is back her resend is taken. Bob, on that edge
    without media, is closed to resume (his client finds an edge with the link)."""
    origin = cluster.origins[0]
    tenant = origin.create_tenant()
    alice, bob, carol = tenant.user("alice"), tenant.user("bob"), tenant.user("carol")
    with edge_behind_a_proxy(cluster, tmp_path) as (cut_off, proxy), trio.fail_after(60):
        async with (
            trio_asyncio.open_loop(),
            ws_of(cut_off, alice.token) as wa,
            ws_of(cut_off, carol.token) as wc,
            ws_of(cut_off, bob.token) as wb,
        ):
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[bob.id, carol.id])
            room = ok["room"]["id"]
            a, c, video = await _alice_shows_carol(wa, wc, room)
            links = await _cut_and_seen(cut_off, proxy)
            body = {"text": "still here?"}
            answer = await wa.request("send", room=room, cid="m1", body=body)
            assert (answer["op"], answer["code"]) == ("error", "unavailable"), answer
            assert answer["retry_after_ms"] > 0
            await c.frames(video, 10)  # the meeting goes on
            await wa.ok("ping")
            await wb.send({"op": "send", "id": 1, "room": room, "cid": "b1", "body": body})
            code, _ = await close_code(wb)
            assert code == 1011
            proxy.heal()
            while _metrics(cut_off)["gb6_origin_links_up"] < links:  # noqa: ASYNC110
                await trio.sleep(0.05)
            assert (await wa.ok("send", room=room, cid="m1", body=body))["seq"] == 1
            await c.frames(video, 5)
            await a.close()
            await c.close()


async def _lost_with_the_link_while_the_meeting_goes_on(
    edge: Node, proxy: TcpProxy, wa: Peer, request: dict[str, Any], c: MediaClient, video: str
) -> None:
    """Send `request` as `edge`'s link to the shard fails with it on its way (held by the
    proxy, then cut): it is refused `unavailable` with a time to retry, the meeting (`c`
    receiving `video`) goes on, and the socket still answers. Returns once the link is back."""
    links = _metrics(edge)["gb6_origin_links"]
    proxy.hold()  # what the edge sends from now on never reaches the shard
    await wa.send({**request, "id": "lost"})
    await trio.sleep(0.5)  # the request has left the edge
    proxy.cut()
    while True:
        answer = await wa.recv()
        if answer.get("re") == "lost":
            break
    assert (answer["op"], answer["code"]) == ("error", "unavailable"), answer
    assert answer["retry_after_ms"] > 0
    await c.frames(video, 10)  # the meeting goes on
    await wa.ok("ping")
    proxy.heal()
    while _metrics(edge)["gb6_origin_links_up"] < links:  # noqa: ASYNC110
        await trio.sleep(0.05)


async def test_a_read_lost_with_the_link_leaves_a_meeting_going(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Alice, in a meeting, searches the room as the edge's link to the shard fails: her search
    was on its way, so its answer is lost with the link. A read changes nothing, so she is told
    `unavailable` with a time to retry, and her socket stays with its media; before, it was
    closed to resume (an unanswered request's outcome unknown), ending her meeting."""
    async with _a_meeting_behind_a_proxy(cluster, tmp_path) as (cut_off, proxy, wa, wc, room):
        a, c, video = await _alice_shows_carol(wa, wc, room)
        search = {"op": "search", "query": "anything", "room": room}
        await _lost_with_the_link_while_the_meeting_goes_on(cut_off, proxy, wa, search, c, video)
        assert (await wa.ok("search", query="anything", room=room))["hits"] == []
        await a.close()
        await c.close()


async def test_a_subscribe_lost_with_the_link_leaves_a_meeting_going(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Alice, in a meeting, subscribes to a chat room that nobody on her edge follows yet, as
    the edge's link to the shard fails: the edge's watch of the room was on its way, and its
    answer is lost with the link. The subscribe changed nothing (the watch was of the lost
    link), so she is told `unavailable` with a time to retry, and her socket stays with its
    media; before, it was closed to resume, ending her meeting. Asked again once the link is
    back, the subscribe brings the room's events."""
    async with _a_meeting_behind_a_proxy(cluster, tmp_path) as (cut_off, proxy, wa, wc, room):
        chat = (await wa.ok("room.create", name="chat", kind="chat", members=[]))["room"]["id"]
        a, c, video = await _alice_shows_carol(wa, wc, room)
        subscribe = {"op": "subscribe", "room": chat, "after": 0}
        await _lost_with_the_link_while_the_meeting_goes_on(cut_off, proxy, wa, subscribe, c, video)
        assert (await wa.ok("subscribe", room=chat, after=0))["head"] == 0
        await wa.ok("send", room=chat, cid="c1", body={"text": "back"})
        got = await wa.event("message")
        assert (got["room"], got["seq"], got["cid"]) == (chat, 1, "c1")
        await a.close()
        await c.close()


async def test_a_catch_up_in_a_meeting_waits_out_the_outage(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Alice, in a meeting on an edge whose link to the shard is down, subscribes to the room
    from its start: its hub is there (carol follows it live) but not the events before, which
    only the store has. Her catch-up asks again past its usual 10 s while her meeting goes on,
    and brings the events once the link is back; before, her socket was closed after 10 s,
    ending the meeting."""
    async with _a_meeting_behind_a_proxy(cluster, tmp_path) as (cut_off, proxy, wa, wc, room):
        for cid in ("m1", "m2"):
            await wa.ok("send", room=room, cid=cid, body={"text": cid})
        await wc.ok("subscribe", room=room, after=2)  # the hub starts at the head
        a, c, video = await _alice_shows_carol(wa, wc, room)
        await _cut_and_seen(cut_off, proxy)
        await wa.ok("subscribe", room=room, after=0)
        await trio.sleep(12)  # past the catch-up's 10 s
        await wa.ok("ping")
        await c.frames(video, 10)  # the meeting goes on
        proxy.heal()
        wa.timeout = 20
        got = [await wa.event("message") for _ in range(2)]
        assert [(e["seq"], e["cid"]) for e in got] == [(1, "m1"), (2, "m2")]
        await a.close()
        await c.close()


async def test_a_member_removed_while_the_link_was_down_takes_no_slot_back(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Bob, in a meeting on the cut-off edge, is removed from the room meanwhile (through the
    other edge). Once the link is back his session ends without taking a slot again, and
    alice's takes the last one (bob's, asked first, would have left hers refused)."""
    origin = cluster.origins[0]
    tenant, (alice, bob, carol) = _two_participants_at_most(origin)
    with edge_behind_a_proxy(cluster, tmp_path) as (cut_off, proxy), trio.fail_after(60):
        async with (
            ws_of(cut_off, bob.token) as wb,
            ws_of(cut_off, alice.token) as wa,
            ws_of(cluster.edges[1], alice.token) as wa1,
            ws_of(cluster.edges[1], carol.token) as wc,
        ):
            members = [bob.id, carol.id]
            ok = await wa.ok("room.create", name="m", kind="meeting", members=members)
            room = ok["room"]["id"]
            await wb.ok("media.join", room=room)  # first: its slot is asked again first
            await wa.ok("media.join", room=room)
            proxy.cut()
            await _until_used(origin, tenant.instance, "media_participants", 0)
            await wc.ok("media.join", room=room)
            await wa1.ok("room.remove", room=room, users=[bob.id])
            proxy.heal()
            wb.timeout = 20  # the edge reconnects first
            await media_event(wb, "media.state", lambda e: e["state"] == "closed")
            await _until_used(origin, tenant.instance, "media_participants", 2)
            await wa.ok("media.leave", room=room)  # hers was kept: it leaves
            await _until_used(origin, tenant.instance, "media_participants", 1)
            assert not [
                e for e in wa.events if e.get("type") == "media.state" and e["state"] == "closed"
            ]


async def test_a_recording_outlasts_a_lost_link(cluster: Cluster, tmp_path: Path) -> None:
    """The link to the instance's shard breaks while a room is recorded and a track ends: the
    track's file is uploaded once the link is back (asked again meanwhile), and the recording
    ends whole, listed through the other edge."""
    origin = cluster.origins[0]
    tenant = origin.create_tenant()
    alice = tenant.user("alice")
    with edge_behind_a_proxy(cluster, tmp_path) as (cut_off, proxy), trio.fail_after(60):
        async with trio_asyncio.open_loop(), ws_of(cut_off, alice.token) as wa:
            room = (await wa.ok("room.create", name="m", kind="meeting", members=[]))["room"]["id"]
            a = MediaClient(wa, room)
            await a.join()
            video, audio = await a.publish(VideoStreamTrack(), AudioStreamTrack())
            rec = (await wa.ok("media.record", room=room, on=True))["recording"]
            await trio.sleep(1)  # recorded before the cut
            proxy.cut()
            await wa.ok("media.unpublish", room=room, track=audio)  # its file is written now
            await trio.sleep(1)  # the upload is refused (no link) a while
            proxy.heal()
            await trio.sleep(1)
            manifest = (await wa.ok("media.record", room=room, on=False))["manifest"]
            await wa.ok("media.leave", room=room)
            await a.close()
    tracks = {t["id"]: t for t in manifest["tracks"]}
    assert set(tracks) == {video, audio}
    for t in tracks.values():
        assert t["error"] is None and t["file"] and t["bytes"] > 0, t
    async with httpx.AsyncClient(base_url=cluster.edges[1].http_url, timeout=20) as http:
        auth = {"Authorization": f"Bearer {alice.token}"}
        listed = (await http.get(f"/v1/rooms/{room}/recordings", headers=auth)).json()
        assert [r["id"] for r in listed["recordings"]] == [rec]
        for t in tracks.values():
            url = f"/v1/rooms/{room}/recordings/{rec}/files/{t['file']}"
            r = await http.get(url, headers=auth)
            assert r.status_code == 200 and len(r.content) == t["bytes"]


@asynccontextmanager
async def _recording_alone(edge: Node, user: User) -> AsyncIterator[tuple[str, str, str]]:
    """`user` alone in a new meeting on `edge`, publishing video, recorded for a second:
    (room, video track, recording) inside; the client is closed on exit."""
    async with ws_of(edge, user.token) as ws:
        ok = await ws.ok("room.create", name="m", kind="meeting", members=[])
        room = ok["room"]["id"]
        client = MediaClient(ws, room)
        await client.join()
        (video,) = await client.publish(VideoStreamTrack())
        rec = (await ws.ok("media.record", room=room, on=True))["recording"]
        await trio.sleep(1)
        try:
            yield room, video, rec
        finally:
            await client.close()


async def test_a_draining_edge_finishes_its_recordings_while_its_links_serve(
    cluster: Cluster, tmp_path: Path
) -> None:
    """SIGTERM to an edge recording a room: beside telling its clients to move, it finishes
    the recording (`shutdown`), its files and manifest uploaded over the link before the link
    stops with the process."""
    origin = cluster.origins[0]
    alice = origin.create_tenant().user("alice")
    with edge_behind_a_proxy(cluster, tmp_path) as (edge, _), trio.fail_after(60):
        async with trio_asyncio.open_loop(), _recording_alone(edge, alice) as (room, video, rec):
            assert await trio.to_thread.run_sync(edge.terminate) == 0
    async with httpx.AsyncClient(base_url=cluster.edges[1].http_url, timeout=20) as http:
        auth = {"Authorization": f"Bearer {alice.token}"}
        manifest = (await http.get(f"/v1/rooms/{room}/recordings/{rec}", headers=auth)).json()
        assert manifest["stop_reason"] == "shutdown"
        (track,) = manifest["tracks"]
        assert track["id"] == video and track["file"] and track["error"] is None, track
        r = await http.get(f"/v1/rooms/{room}/recordings/{rec}/files/{track['file']}", headers=auth)
        assert r.status_code == 200 and len(r.content) == track["bytes"] > 0


async def test_a_second_signal_stops_an_edge_whose_recording_cannot_finish(
    cluster: Cluster, tmp_path: Path
) -> None:
    """SIGTERM to an edge recording a room whose shard it cannot reach: the recording's files
    wait for the origin (up to `recording_finish_s`, 60 s). A second SIGTERM (the operator's
    "stop now") stops the process within seconds, the recording abandoned. Before, the files'
    shielded finish kept the process up for as long as that."""
    origin = cluster.origins[0]
    alice = origin.create_tenant().user("alice")
    with edge_behind_a_proxy(cluster, tmp_path) as (edge, proxy), trio.fail_after(60):
        async with trio_asyncio.open_loop(), _recording_alone(edge, alice):
            proxy.cut()
            assert edge.proc is not None
            edge.proc.send_signal(signal.SIGTERM)
            await trio.sleep(2)  # draining: the recording's files wait for the origin
            assert edge.proc.poll() is None
            edge.proc.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(edge.proc.wait, 10)
    assert code == 0
    logged = edge.stderr_path.read_text() if edge.stderr_path else ""
    assert '"recordings_abandoned"' in logged, logged[-2000:]
    assert "its finishing was abandoned" in logged, logged[-2000:]  # recording_not_stored
