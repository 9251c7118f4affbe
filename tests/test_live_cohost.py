"""Live co-hosts on a real `gb6 run`: naming a joined viewer co-host lets it publish without
joining again; un-naming it unpublishes its tracks and makes it a viewer again."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import trio
import trio_asyncio
from aiortc import VideoStreamTrack

from tests.conftest import Node, module_node, refused
from tests.media_client import MediaClient, loopback_ice, media_event, ws_of

_PORTS = random.randrange(20_000, 60_000, 1_000)
node = module_node(
    "live_cohost", f"[media]\nudp_port_min = {_PORTS}\nudp_port_max = {_PORTS + 999}\n"
)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_ice(monkeypatch)
    yield


async def test_a_joined_viewer_is_promoted_and_demoted_live(node: Node) -> None:
    t = node.create_tenant()
    host, guest, fan = t.user("host"), t.user("guest"), t.user("fan")
    with trio.fail_after(45):
        async with (
            trio_asyncio.open_loop(),
            ws_of(node, host.token) as wh,
            ws_of(node, guest.token) as wg,
            ws_of(node, fan.token) as wf,
        ):
            ok = await wh.ok("room.create", name="live", kind="live", members=[guest.id, fan.id])
            room = ok["room"]["id"]
            h = MediaClient(wh, room)
            await h.join()
            g = MediaClient(wg, room)
            assert (await g.join())["role"] == "viewer"
            assert (await wf.ok("media.join", room=room))["role"] == "viewer"
            await refused(
                wg, "media.publish", ("forbidden",), room=room, kind="video", source="camera"
            )
            # Only the creator (or an owner/admin) names co-hosts.
            await refused(wf, "media.cohost", ("forbidden",), room=room, user=guest.id, on=True)

            await wh.ok("media.cohost", room=room, user=guest.id, on=True)
            role = await media_event(wg, "media.role")
            assert role == {**role, "participant": g.joined["participant"], "role": "host"}
            for ws in (wh, wf):  # the others now see the guest as a participant
                joined = await media_event(ws, "media.participant_joined")
                assert joined["user"] == guest.id
            # Same session, no rejoin: the guest publishes, the host receives and decodes it.
            (video,) = await g.publish(VideoStreamTrack())
            published = await media_event(wh, "media.track_published")
            assert published["track"] == {**published["track"], "id": video, "user": guest.id}
            await h.subscribe([video])
            assert (await h.frames(video, 3))[-1].width == 640

            await wh.ok("media.cohost", room=room, user=guest.id, on=False)
            role = await media_event(wg, "media.role")
            assert role["role"] == "viewer"
            gone = await media_event(wh, "media.track_unpublished")
            assert gone["track"] == video
            left = await media_event(wf, "media.participant_left")
            assert left["user"] == guest.id
            await refused(
                wg, "media.publish", ("forbidden",), room=room, kind="video", source="camera"
            )
            # Still in the room's media, as a viewer.
            await wg.ok("media.leave", room=room)
            await wh.ok("media.leave", room=room)
            await g.close()
            await h.close()
