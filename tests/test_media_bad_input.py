"""Bad media input on a real `gb6 run`: malformed SDP and candidates, unknown track ids,
publishing without permission, too many tracks, over the WebSocket and over WHIP/WHEP. Each
gets a clear error, the connection stays open, and the room's media goes on unharmed."""

from __future__ import annotations

import random
from collections.abc import Iterator

import httpx
import pytest
import trio
import trio_asyncio
from aiortc import VideoStreamTrack
from aiortc.mediastreams import AudioStreamTrack

from tests.conftest import ERROR_KEYS, Node, Peer, module_node
from tests.media_client import HttpMediaClient, MediaClient, loopback_ice, ws_of

TRACKS = 3  # [media] tracks_per_participant
_PORTS = random.randrange(20_000, 60_000, 1_000)
node = module_node(
    "media_bad_input",
    f"""
[media]
udp_port_min = {_PORTS}
udp_port_max = {_PORTS + 999}
tracks_per_participant = {TRACKS}
""",
)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_ice(monkeypatch)
    yield


async def bad(peer: Peer, op: str, code: str, **fields: object) -> str:
    """A request that must fail with `code`, with a message and nothing else."""
    reply = await peer.request(op, **fields)
    assert reply["op"] == "error" and reply["code"] == code, (op, fields, reply)
    assert set(reply) <= ERROR_KEYS and reply["message"], reply
    return str(reply["message"])


async def test_bad_signaling_is_refused_and_the_meeting_goes_on(node: Node) -> None:
    t = node.create_tenant()
    alice, bob, carol = t.user("alice"), t.user("bob"), t.user("carol")
    with trio.fail_after(50):
        async with trio_asyncio.open_loop(), ws_of(node, alice.token) as wa:
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[bob.id, carol.id])
            room = ok["room"]["id"]
            await bad(wa, "media.offer", "invalid", room=room, sdp="v=0")  # not joined yet
            a = MediaClient(wa, room)
            await a.join()
            video, audio = await a.publish(VideoStreamTrack(), AudioStreamTrack())
            async with ws_of(node, bob.token) as wb:
                b = MediaClient(wb, room)
                await b.join()
                await b.subscribe([video, audio])
                await b.frames(video, 3)
                good = b.pc.localDescription.sdp

                # Malformed SDP: garbage, cut short, no codec the SFU forwards, too large.
                await bad(wb, "media.offer", "invalid", room=room, sdp="hello")
                await bad(wb, "media.offer", "invalid", room=room, sdp=good[: len(good) // 3])
                await bad(wb, "media.answer", "conflict", room=room, sdp=good)  # no offer pending
                await bad(
                    wb, "media.offer", "invalid", room=room, sdp="v=0\r\n" + "a=x\r\n" * 20000
                )
                # Bad candidates: malformed, and mDNS names (only IP addresses are used).
                await bad(wb, "media.ice", "invalid", room=room, candidate="candidate:garbage")
                mdns = "candidate:1 1 udp 2122260223 abc.local 50000 typ host"
                await bad(wb, "media.ice", "invalid", room=room, candidate=mdns)
                # Unknown track ids.
                for op, fields in (
                    ("media.subscribe", {"tracks": ["tr_nope"]}),
                    ("media.unsubscribe", {"tracks": ["tr_nope"]}),
                    ("media.mute", {"track": "tr_nope", "muted": True}),
                    ("media.unpublish", {"track": "tr_nope"}),
                ):
                    await bad(wb, op, "not_found", room=room, **fields)
                # Someone else's track is not yours to mute or unpublish.
                await bad(wb, "media.mute", "not_found", room=room, track=video, muted=True)
                await bad(wb, "media.unpublish", "not_found", room=room, track=video)
                # Malformed frames.
                await bad(wb, "media.subscribe", "invalid", room=room, tracks="x")
                await bad(wb, "media.subscribe", "invalid", room=room, tracks=["x"] * 101)
                await bad(wb, "media.publish", "invalid", room=room, kind="smell", source="camera")
                await bad(wb, "media.publish", "invalid", room=room, kind="video", source="eye")

                # Too many tracks: by declaration and by offer ([media] tracks_per_participant).
                for _ in range(TRACKS):
                    await wb.ok("media.publish", room=room, kind="audio", source="microphone")
                message = await bad(
                    wb,
                    "media.publish",
                    "quota_exceeded",
                    room=room,
                    kind="audio",
                    source="microphone",
                )
                assert str(TRACKS) in message
                async with ws_of(node, carol.token) as wc:
                    c = MediaClient(wc, room)
                    await c.join()
                    other = MediaClient(wc, room)  # only for its offer's SDP
                    other.pc.addTrack(VideoStreamTrack())
                    await trio_asyncio.aio_as_trio(other._local_offer)()
                    offer = other.pc.localDescription.sdp
                    await other.close()
                    # No codec the SFU forwards (VP8, H.264 / Opus): refused, naming them.
                    no_codec = offer.replace("VP8/90000", "VP9/90000").replace("H264/", "X/")
                    message = await bad(wc, "media.offer", "invalid", room=room, sdp=no_codec)
                    assert "codec" in message
                    many = MediaClient(wc, room)  # only for its offer's SDP
                    for _ in range(TRACKS + 1):
                        many.pc.addTrack(AudioStreamTrack())
                    await trio_asyncio.aio_as_trio(many._local_offer)()
                    sdp = many.pc.localDescription.sdp
                    await bad(wc, "media.offer", "quota_exceeded", room=room, sdp=sdp)
                    await many.close()
                    # Nothing of Carol's was published; she can still receive.
                    await c.subscribe([video])
                    assert (await c.frames(video, 3))[-1].width == 640
                    await wc.ok("media.leave", room=room)
                    await c.close()

                # The meeting is unharmed: Bob still decodes Alice, mute still works.
                assert (await b.frames(video, 5))[-1].width == 640
                assert (await b.frames(audio, 3))[-1].sample_rate == 48_000
                await wa.ok("media.mute", room=room, track=video, muted=True)
                await wa.ok("media.mute", room=room, track=video, muted=False)
                assert (await b.frames(video, 3))[-1].width == 640
                await wb.ok("media.leave", room=room)
                await b.close()
            await wa.ok("media.leave", room=room)
            await a.close()


async def test_publishing_without_permission(node: Node) -> None:
    t = node.create_tenant()
    host, viewer, member = t.user("host"), t.user("viewer"), t.user("member")
    stranger = node.create_tenant().user("stranger")
    with trio.fail_after(40):
        async with trio_asyncio.open_loop(), ws_of(node, host.token) as wh:
            ok = await wh.ok("room.create", name="live", kind="live", members=[viewer.id])
            live = ok["room"]["id"]
            ok = await wh.ok("room.create", name="chat", kind="chat", members=[member.id])
            chat = ok["room"]["id"]
            h = MediaClient(wh, live)
            await h.join()
            (video,) = await h.publish(VideoStreamTrack())
            async with ws_of(node, viewer.token) as wv:
                v = MediaClient(wv, live)
                assert (await v.join())["role"] == "viewer"
                await bad(
                    wv, "media.publish", "forbidden", room=live, kind="video", source="camera"
                )
                sender = MediaClient(wv, live)  # only for its offer's SDP
                sender.pc.addTrack(VideoStreamTrack())
                await trio_asyncio.aio_as_trio(sender._local_offer)()
                sdp = sender.pc.localDescription.sdp
                await bad(wv, "media.offer", "forbidden", room=live, sdp=sdp)
                await sender.close()
                await bad(wv, "media.cohost", "forbidden", room=live, user=viewer.id, on=True)
                await bad(wv, "media.record", "forbidden", room=live, on=True)
                whip = HttpMediaClient(node.http_url, live, viewer.token)
                r = await whip.whip(VideoStreamTrack())
                assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
                await whip.close()
                # The viewer still watches, as a viewer.
                await v.subscribe([video])
                assert (await v.frames(video, 3))[-1].width == 640
                await wv.ok("media.leave", room=live)
                await v.close()
            # Strangers (another instance) and non-members see no room at all.
            async with ws_of(node, stranger.token) as ws:
                await bad(ws, "media.join", "not_found", room=live)
            async with ws_of(node, member.token) as wm:
                await bad(wm, "media.join", "not_found", room=live)
                await bad(wm, "media.join", "invalid", room=chat)  # a chat room takes no media
            for token, path in ((stranger.token, "whip"), (member.token, "whep")):
                c = HttpMediaClient(node.http_url, live, token)
                r = await (c.whip(VideoStreamTrack()) if path == "whip" else c.whep("video"))
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
                await c.close()
            # WHIP's own bad input: content type, size, a body that is no SDP.
            async with httpx.AsyncClient(base_url=node.http_url) as http:
                auth = {"Authorization": f"Bearer {host.token}"}
                r = await http.post(f"/v1/rooms/{live}/whip", content="v=0", headers=auth)
                assert r.status_code == 400
                big = {**auth, "Content-Type": "application/sdp"}
                r = await http.post(f"/v1/rooms/{live}/whip", content="a" * 70_000, headers=big)
                assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
                r = await http.post(f"/v1/rooms/{live}/whip", content="nonsense", headers=big)
                assert r.status_code == 400 and r.json()["error"]["code"] == "invalid"
                r = await http.delete(f"/v1/rooms/{live}/whip/pa_nope", headers=auth)
                assert r.status_code == 404
            # The host's stream was never disturbed: the viewer plays it over WHEP.
            play = HttpMediaClient(node.http_url, live, viewer.token)
            assert (await play.whep("video")).status_code == 201
            assert (await play.frames("video", 3))[-1].width == 640
            assert (await play.delete()).status_code == 200
            await play.close()
            await wh.ok("media.leave", room=live)
            await h.close()
