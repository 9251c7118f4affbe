"""Media signaling over the client WebSocket (`media.*`, docs/protocol.md "Media"), with
headless aiortc participants against a real `gb6 run` on loopback."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from aiortc import VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack

from edge.media_http import parse_sdpfrag
from edge.media_signaling import sending_sections, wire_event
from edge.sfu import ParticipantJoined, TrackInfo, TrackMuted, TrackPublished
from node.errors import GB6Error
from tests.conftest import Node, Peer, Tenant, module_node, refused
from tests.media_client import HttpMediaClient, MediaClient, loopback_ice, media_event, ws_of

_PORTS = random.randrange(20_000, 60_000, 1_000)
node = module_node(
    "media_signaling",
    f"""
[media]
udp_port_min = {_PORTS}
udp_port_max = {_PORTS + 999}
[plans.tiny]
[plans.tiny.quotas]
media_participants = 2
""",
)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_ice(monkeypatch)
    yield


async def room_of(peer: Peer, kind: str, members: list[str]) -> str:
    ok = await peer.ok("room.create", name=kind, kind=kind, members=members)
    return str(ok["room"]["id"])


async def test_meeting_publish_subscribe_mute_unpublish_and_close_is_leave(node: Node) -> None:
    t = node.create_tenant()
    alice, bob = t.user("alice"), t.user("bob")
    with trio.fail_after(45):
        async with trio_asyncio.open_loop(), ws_of(node, alice.token) as wa:
            room = await room_of(wa, "meeting", [bob.id])
            a = MediaClient(wa, room)
            joined = await a.join()
            assert joined["role"] == "host" and joined["tracks"] == []
            video, audio = await a.publish(VideoStreamTrack(), AudioStreamTrack())
            published = await media_event(wa, "media.track_published")
            assert published["track"]["user"] == alice.id
            async with ws_of(node, bob.token) as wb:
                b = MediaClient(wb, room)
                seen = await b.join()
                # The join's ok lists who is there and what they publish.
                assert [p["user"] for p in seen["participants"]] == [alice.id]
                by_id = {tr["id"]: tr for tr in seen["tracks"]}
                assert by_id[video]["kind"] == "video" and by_id[video]["codec"] == "vp8"
                assert by_id[audio]["source"] == "microphone"
                joined_ev = await media_event(wa, "media.participant_joined")
                assert joined_ev["user"] == bob.id
                await b.subscribe([video, audio])
                frames = await b.frames(video, 5)
                assert frames[-1].width == 640
                assert (await b.frames(audio, 3))[-1].sample_rate == 48_000
                # Mute, unpublish: both told to the room.
                await wa.ok("media.mute", room=room, track=video, muted=True)
                muted = await media_event(wb, "media.track_muted")
                assert muted == {**muted, "track": video, "muted": True}
                await wa.ok("media.unpublish", room=room, track=audio)
                gone = await media_event(wb, "media.track_unpublished")
                assert gone["track"] == audio
                ok = await wb.ok("media.renegotiate", room=room)
                assert ok["sdp"] is not None and "a=inactive" in ok["sdp"]
                await b.answer(ok["sdp"])
                # Unknown tracks: not_found, and nothing changed.
                await refused(wb, "media.subscribe", ("not_found",), room=room, tracks=["x"])
                await refused(wb, "media.unsubscribe", ("not_found",), room=room, tracks=["x"])
                # Alice's socket closes: she leaves, her tracks go.
                await wa.ws.aclose()
                left = await media_event(wb, "media.participant_left")
                assert left["user"] == alice.id
                await wb.ok("media.leave", room=room)
                await b.close()
            await a.close()


async def test_live_room_viewers_do_not_publish_and_are_counted(node: Node) -> None:
    t = node.create_tenant()
    host, viewer, cohost = t.user("host"), t.user("viewer"), t.user("cohost")
    with trio.fail_after(40):
        async with trio_asyncio.open_loop(), ws_of(node, host.token) as wh:
            room = await room_of(wh, "live", [viewer.id, cohost.id])
            h = MediaClient(wh, room)
            assert (await h.join())["role"] == "host"
            (video,) = await h.publish(VideoStreamTrack())
            async with ws_of(node, viewer.token) as wv:
                v = MediaClient(wv, room)
                joined = await v.join()
                assert joined["role"] == "viewer" and joined["viewers"] == 1
                # Publishing as a viewer: forbidden, by declaration or by offer.
                await refused(
                    wv,
                    "media.publish",
                    ("forbidden",),
                    room=room,
                    kind="audio",
                    source="microphone",
                )
                v.pc.addTrack(AudioStreamTrack())
                await trio_asyncio.aio_as_trio(v._local_offer)()
                await refused(
                    wv,
                    "media.offer",
                    ("forbidden",),
                    room=room,
                    sdp=v.pc.localDescription.sdp,
                )
                # Only the host names co-hosts.
                await refused(
                    wv, "media.cohost", ("forbidden",), room=room, user=viewer.id, on=True
                )
                count = await media_event(wh, "media.viewers")
                assert count["count"] == 1
                await wh.ok("media.cohost", room=room, user=cohost.id, on=True)
                async with ws_of(node, cohost.token) as wc:
                    assert (await wc.ok("media.join", room=room))["role"] == "host"
                await v.close()
            # The viewer is not announced as a participant; it was only counted.
            assert not [
                e
                for e in wh.events
                if e["type"] == "media.participant_joined" and e["user"] == viewer.id
            ]
            await h.close()
    assert video


async def test_who_may_join_and_the_participants_quota(node: Node) -> None:
    t: Tenant = node.create_tenant(plan="tiny")
    alice, bob, carol = t.user("alice"), t.user("bob"), t.user("carol")
    other = node.create_tenant().user("mallory")
    with trio.fail_after(30):
        async with trio_asyncio.open_loop(), ws_of(node, alice.token) as wa:
            chat = await room_of(wa, "chat", [bob.id])
            room = await room_of(wa, "meeting", [bob.id, carol.id])
            await refused(wa, "media.join", ("invalid",), room=chat)
            await refused(wa, "media.offer", ("invalid",), room=room, sdp="v=0")
            async with ws_of(node, other.token) as wm:
                await refused(wm, "media.join", ("not_found",), room=room)
            await wa.ok("media.join", room=room)
            await refused(wa, "media.join", ("conflict",), room=room)
            await refused(wa, "media.offer", ("invalid",), room=room, sdp="not sdp")
            async with ws_of(node, bob.token) as wb:
                await wb.ok("media.join", room=room)
                async with ws_of(node, carol.token) as wc:
                    # The plan allows two media participants at once.
                    await refused(wc, "media.join", ("quota_exceeded",), room=room)
                    await wb.ok("media.leave", room=room)
                    await wc.ok("media.join", room=room)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One origin shard (SQLite) and one `gb6 edge` with its SFU."""
    from tests.test_cluster import Cluster

    c = Cluster(Path(tmp_path_factory.mktemp("media_cluster")))
    try:
        ports = random.randrange(20_000, 60_000, 1_000)
        c.edge(f"[media]\nudp_port_min = {ports}\nudp_port_max = {ports + 999}\n")
        yield c
    finally:
        c.stop()


async def test_media_on_a_cluster_edge(cluster: Any) -> None:
    """The edge decides membership and roles from its replica of the origin's rooms, runs the
    SFU and WHIP (recording on a cluster edge: tests/test_media_cluster.py)."""
    tenant = cluster.origins[0].create_tenant()
    alice, bob = tenant.user("alice"), tenant.user("bob")
    edge = cluster.edges[0]
    with trio.fail_after(40):
        async with trio_asyncio.open_loop(), ws_of(edge, alice.token) as wa:
            room = await room_of(wa, "meeting", [bob.id])
            a = MediaClient(wa, room)
            await a.join()
            (video,) = await a.publish(VideoStreamTrack())
            async with ws_of(edge, bob.token) as wb:
                b = MediaClient(wb, room)
                assert [t["id"] for t in (await b.join())["tracks"]] == [video]
                await b.subscribe([video])
                assert (await b.frames(video, 3))[-1].width == 640
                whip = HttpMediaClient(edge.http_url, room, bob.token)
                assert (await whip.whip(AudioStreamTrack())).status_code == 201
                published = await media_event(
                    wa, "media.track_published", lambda e: e["track"]["kind"] == "audio"
                )
                assert published["track"]["user"] == bob.id
                assert (await whip.delete()).status_code == 200
                await whip.close()
                await wb.ok("media.leave", room=room)
                await b.close()
            await wa.ok("media.leave", room=room)
            await a.close()


# --- the pure parts ------------------------------------------------------------------------


def test_sending_sections_counts_media_lines_that_send() -> None:
    sdp = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendrecv\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\n"
        "m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n"  # rejected: port 0
        "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n"  # no direction: sendrecv
    )
    assert sending_sections(sdp) == 2
    assert sending_sections("m=audio 9 RTP/AVP 0\r\na=inactive\r\n") == 0
    assert sending_sections("garbage") == 0


def test_wire_events_name_users_and_hide_live_viewers() -> None:
    users = {"pa_1": "usr_a", "pa_2": "usr_b"}
    hidden = {"pa_2"}.__contains__
    assert wire_event(ParticipantJoined("r", "pa_1"), users, hidden) == (
        "media.participant_joined",
        {"room": "r", "participant": "pa_1", "user": "usr_a"},
    )
    assert wire_event(ParticipantJoined("r", "pa_2"), users, hidden) is None
    track = TrackInfo("tr_1", "pa_1", "video", "screen", "vp8")
    type_, fields = wire_event(TrackPublished("r", track), users, hidden) or ("", {})
    assert type_ == "media.track_published" and fields["track"]["user"] == "usr_a"
    assert fields["track"]["source"] == "screen"
    muted = wire_event(TrackMuted("r", "pa_1", "tr_1", True), users, hidden)
    assert muted == (
        "media.track_muted",
        {"room": "r", "participant": "pa_1", "track": "tr_1", "muted": True},
    )


def test_trickle_fragments() -> None:
    frag = (
        "a=ice-ufrag:abcd\r\na=ice-pwd:x\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n"
        "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\r\na=end-of-candidates\r\n"
    )
    assert parse_sdpfrag(frag) == ["candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", None]
    with pytest.raises(GB6Error):
        parse_sdpfrag("a=candidate:x\r\n" * 40)
