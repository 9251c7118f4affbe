"""Recording a room (`media.record`, docs/protocol.md "Media" and "Recording manifest") on a
real `gb6 run`: an aiortc participant publishes VP8 and Opus for 10 s of real time; the files
come back over HTTP with the room's authorization, ffprobe reads them with the right codecs
and durations, and their frames are byte for byte what the publisher's encoders produced (so
nothing in the edge decoded or encoded them)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
import trio_asyncio
from aiortc import VideoStreamTrack
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.mediastreams import AudioStreamTrack

from tests.conftest import Node, module_node, refused
from tests.media_client import MediaClient, loopback_ice, media_event, ws_of
from tests.services import require_tool

RECORD_S = 10.0
_PORTS = random.randrange(20_000, 60_000, 1_000)
node = module_node(
    "media_recording",
    f"""
[media]
udp_port_min = {_PORTS}
udp_port_max = {_PORTS + 999}
[plans.norec]
[plans.norec.quotas]
recording_minutes = 0
""",
)


@pytest.fixture(autouse=True)
def _loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    loopback_ice(monkeypatch)
    yield


@pytest.fixture
def ffprobe() -> str:
    return require_tool("ffprobe")


def capture_encoded(client: MediaClient) -> dict[str, list[bytes]]:
    """Every frame the publisher's encoders produced, per kind (VP8 frames without their
    payload descriptors, Opus packets as they are)."""
    made: dict[str, list[bytes]] = {"video": [], "audio": []}
    for sender in client.pc.getSenders():
        kind = sender.track.kind
        original = sender._next_encoded_frame

        async def spy(codec: Any, _o: Any = original, _k: str = kind) -> Any:
            frame = await _o(codec)
            if frame is not None:
                if _k == "video":
                    made[_k].append(
                        b"".join(VpxPayloadDescriptor.parse(p)[1] for p in frame.payloads)
                    )
                else:
                    made[_k].extend(frame.payloads)
            return frame

        sender._next_encoded_frame = spy  # type: ignore[method-assign]
    return made


async def probe(ffprobe: str, data: bytes, tmp: Any) -> dict[str, Any]:
    path = tmp / f"f{random.getrandbits(32)}"
    path.write_bytes(data)
    result = await trio.run_process(
        [
            ffprobe,
            *("-v", "error", "-of", "json", "-show_data"),
            *("-show_entries", "stream=codec_name:format=duration,format_name:packet=data"),
            str(path),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stderr, result.stderr.decode()
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def packet_bytes(info: dict[str, Any]) -> list[bytes]:
    """ffprobe's hex dump of each packet ("00000000: 9d01 2a...  text") back to bytes."""
    out = []
    for p in info["packets"]:
        hexes = "".join(
            "".join(line.split(":", 1)[1].strip().split("  ")[0].split())
            for line in p["data"].strip().splitlines()
        )
        out.append(bytes.fromhex(hexes))
    return out


def contiguous_in(part: list[bytes], whole: list[bytes]) -> bool:
    if not part:
        return False
    starts = [i for i, b in enumerate(whole) if b == part[0]]
    return any(whole[i : i + len(part)] == part for i in starts)


async def test_ten_second_recording_is_the_publishers_bytes(
    node: Node, ffprobe: str, tmp_path: Any
) -> None:
    t = node.create_tenant()
    alice, bob = t.user("alice"), t.user("bob")
    with trio.fail_after(60):
        async with trio_asyncio.open_loop(), ws_of(node, alice.token) as wa:
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[bob.id])
            room = ok["room"]["id"]
            a = MediaClient(wa, room)
            await a.join()
            await a.publish(VideoStreamTrack(), AudioStreamTrack())
            made = capture_encoded(a)
            async with ws_of(node, bob.token) as wb:
                await wb.ok("media.join", room=room)
                # Only the room's creator (or an owner/admin) records.
                await refused(wb, "media.record", ("forbidden",), room=room, on=True)
                started = await wa.ok("media.record", room=room, on=True)
                rec = started["recording"]
                ev = await media_event(wb, "media.recording")
                assert ev == {**ev, "recording": rec, "state": "started"}
                await refused(wa, "media.record", ("conflict",), room=room, on=True)
                await trio.sleep(RECORD_S)  # the recording's length is the point: real time
                stopped = await wa.ok("media.record", room=room, on=False)
                await refused(wa, "media.record", ("not_found",), room=room, on=False)
                manifest = stopped["manifest"]
                assert manifest["id"] == rec and manifest["stop_reason"] == "stopped"
                # Listed and downloaded with the room's authorization.
                async with httpx.AsyncClient(base_url=node.http_url, timeout=20) as http:
                    auth = {"Authorization": f"Bearer {bob.token}"}
                    listed = (await http.get(f"/v1/rooms/{room}/recordings", headers=auth)).json()
                    assert [r["id"] for r in listed["recordings"]] == [rec]
                    files = {}
                    for track in manifest["tracks"]:
                        url = f"/v1/rooms/{room}/recordings/{rec}/files/{track['file']}"
                        r = await http.get(url, headers=auth)
                        assert r.status_code == 200
                        assert r.headers["content-type"] == track["content_type"]
                        files[track["kind"]] = (track, r.content)
                    stranger = node.create_tenant().user("x")
                    r = await http.get(
                        f"/v1/rooms/{room}/recordings",
                        headers={"Authorization": f"Bearer {stranger.token}"},
                    )
                    assert r.status_code == 404
            await wa.ok("media.leave", room=room)
            await a.close()
    assert set(files) == {"video", "audio"}
    for kind, codec, container in (("video", "vp8", "webm"), ("audio", "opus", "ogg")):
        track, data = files[kind]
        assert (track["codec"], track["container"]) == (codec, container)
        info = await probe(ffprobe, data, tmp_path)
        assert [s["codec_name"] for s in info["streams"]] == [codec]
        assert abs(float(info["format"]["duration"]) - RECORD_S) < 1.0, info["format"]
        assert abs(track["duration_ms"] / 1000 - RECORD_S) < 1.0, track
        recorded = packet_bytes(info)
        # What the file holds is a run of exactly the frames the publisher encoded.
        assert len(recorded) > (250 if kind == "video" else 400), len(recorded)
        assert contiguous_in(recorded[1:-1], made[kind]), kind


async def test_recording_minutes_quota_refuses_to_start(node: Node) -> None:
    t = node.create_tenant(plan="norec")
    alice = t.user("alice")
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), ws_of(node, alice.token) as wa:
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[])
            room = ok["room"]["id"]
            await refused(wa, "media.record", ("quota_exceeded",), room=room, on=True)
            await refused(wa, "media.record", ("not_found",), room=room, on=False)


async def test_a_participant_who_joins_is_told_of_the_recording_under_way(node: Node) -> None:
    """`media.join` says whether the room is being recorded on this edge: a participant who
    joins late, or who moved from a draining edge (whose recording's `stopped` it may never
    get), shows the right state, not only one learnt from the events sent since it joined."""
    t = node.create_tenant()
    alice, bob = t.user("alice"), t.user("bob")
    with trio.fail_after(30):
        async with (
            trio_asyncio.open_loop(),
            ws_of(node, alice.token) as wa,
            ws_of(node, bob.token) as wb,
        ):
            ok = await wa.ok("room.create", name="m", kind="meeting", members=[bob.id])
            room = ok["room"]["id"]
            assert (await wa.ok("media.join", room=room))["recording"] is None
            rec = (await wa.ok("media.record", room=room, on=True))["recording"]
            assert (await wb.ok("media.join", room=room))["recording"] == rec
            await wb.ok("media.leave", room=room)
            assert (await wa.ok("media.record", room=room, on=False))["recording"] == rec
            assert (await wb.ok("media.join", room=room))["recording"] is None
