"""A headless media participant for tests: the raw protocol client (conftest.Peer) for the
`media.*` signaling ops and an aiortc RTCPeerConnection for the media, on 127.0.0.1 only.

The test side encodes (aiortc's encoders behind its MediaStreamTracks) and decodes (reading a
received track decodes it); the node in between only forwards packets. Call `loopback_ice()`
from a sync fixture so that aioice gathers 127.0.0.1 alone (DESIGN.md §2b); no ICE servers.

    async with trio_asyncio.open_loop():
        async with peer_factory(user.token) as ws:
            m = MediaClient(ws, room)
            await m.join()
            await m.publish(VideoStreamTrack(), AudioStreamTrack())
            await m.subscribe([...track ids...])
            frames = await m.frames(track_id, 5)
            await m.close()
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from trio_asyncio import aio_as_trio

from tests.conftest import Node, Peer, connect

HOST = "127.0.0.1"


def loopback_ice(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test peers' host candidates: loopback only (aioice leaves it out by default)."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: [HOST])


def ws_of(node: Node, token: str) -> Any:
    """`async with ws_of(node, token) as ws:` a hello'd raw protocol client."""
    return asynccontextmanager(connect)(node, token)


class MediaClient:
    """One participant: `ws` is a hello'd conftest.Peer; `room` a meeting or live room."""

    def __init__(self, ws: Peer, room: str) -> None:
        self.ws = ws
        self.room = room
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.joined: dict[str, Any] = {}
        self.tracks: dict[str, MediaStreamTrack] = {}  # received, by the SFU's track id

    async def join(self) -> dict[str, Any]:
        self.joined = await self.ws.ok("media.join", room=self.room)
        return self.joined

    async def publish(self, *tracks: MediaStreamTrack, source: str | None = None) -> list[str]:
        """Declare, add and offer `tracks`; returns their track ids, in order."""
        ids = []
        for t in tracks:
            src = source or ("camera" if t.kind == "video" else "microphone")
            ok = await self.ws.ok("media.publish", room=self.room, kind=t.kind, source=src)
            ids.append(ok["track"])
            self.pc.addTrack(t)
        await self.offer()
        return ids

    async def offer(self) -> dict[str, Any]:
        await aio_as_trio(self._local_offer)()
        ok = await self.ws.ok("media.offer", room=self.room, sdp=self.pc.localDescription.sdp)
        await aio_as_trio(self.pc.setRemoteDescription)(RTCSessionDescription(ok["sdp"], "answer"))
        return ok

    async def _local_offer(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())

    async def _local_answer(self, offer: str) -> str:
        await self.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return str(self.pc.localDescription.sdp)

    async def answer(self, offer: str | None) -> None:
        if offer is None:
            return
        sdp = await aio_as_trio(self._local_answer)(offer)
        await self.ws.ok("media.answer", room=self.room, sdp=sdp)
        self.tracks = self._tracks_by_msid()

    async def subscribe(self, track_ids: list[str]) -> None:
        ok = await self.ws.ok("media.subscribe", room=self.room, tracks=track_ids)
        await self.answer(ok["sdp"])

    async def renegotiate(self) -> None:
        ok = await self.ws.ok("media.renegotiate", room=self.room)
        await self.answer(ok["sdp"])

    def _tracks_by_msid(self) -> dict[str, MediaStreamTrack]:
        out: dict[str, MediaStreamTrack] = {}
        mids: dict[str, str] = {}
        mid = ""
        for line in self.pc.remoteDescription.sdp.splitlines():
            if line.startswith("a=mid:"):
                mid = line[6:]
            elif line.startswith("a=msid:"):
                mids[mid] = line.split()[-1]
        for t in self.pc.getTransceivers():
            if t.mid in mids and t.receiver.track is not None:
                out[mids[t.mid]] = t.receiver.track
        return out

    async def frames(self, track_id: str, n: int, within: float = 15) -> list[Any]:
        """`n` decoded frames of a received track."""
        track = self.tracks[track_id]
        got = []
        with trio.fail_after(within):
            for _ in range(n):
                got.append(await aio_as_trio(track.recv)())
        return got

    async def close(self) -> None:
        """Close the peer connection (leave the media first: aiortc's close can wait long for
        a transport whose other end still serves)."""
        with trio.move_on_after(5):
            await aio_as_trio(self.pc.close)()


async def media_event(ws: Peer, type_: str, pred: Any = lambda e: True) -> dict[str, Any]:
    """The next event of `type_` matching `pred` (others of that type are skipped)."""
    while True:
        ev = await ws.event(type_)
        if pred(ev):
            return ev


class HttpMediaClient:
    """WHIP (publish `tracks`) or WHEP (receive `kinds`) from a non-browser client (aiortc),
    over the node's HTTP API with a member's bearer token."""

    def __init__(self, http_url: str, room: str, token: str) -> None:
        self.http_url = http_url
        self.room = room
        self.token = token
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.location = ""

    def headers(self, content_type: str = "application/sdp") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": content_type}

    async def post(self, path: str, sdp: str) -> httpx.Response:
        async with httpx.AsyncClient(timeout=20) as http:
            return await http.post(
                f"{self.http_url}/v1/rooms/{self.room}/{path}", content=sdp, headers=self.headers()
            )

    async def whip(self, *tracks: MediaStreamTrack) -> httpx.Response:
        for t in tracks:
            self.pc.addTransceiver(t, direction="sendonly")
        return await self._start("whip")

    async def whep(self, *kinds: str) -> httpx.Response:
        for k in kinds:
            self.pc.addTransceiver(k, direction="recvonly")
        return await self._start("whep")

    async def _start(self, path: str) -> httpx.Response:
        await aio_as_trio(self._local_offer)()
        resp = await self.post(path, self.pc.localDescription.sdp)
        if resp.status_code == 201:
            self.location = resp.headers["location"]
            answer = RTCSessionDescription(resp.text, "answer")
            await aio_as_trio(self.pc.setRemoteDescription)(answer)
        return resp

    async def _local_offer(self) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())

    def received(self, kind: str) -> MediaStreamTrack:
        return next(t.receiver.track for t in self.pc.getTransceivers() if t.kind == kind)

    async def frames(self, kind: str, n: int, within: float = 15) -> list[Any]:
        track = self.received(kind)
        got = []
        with trio.fail_after(within):
            for _ in range(n):
                got.append(await aio_as_trio(track.recv)())
        return got

    async def delete(self) -> httpx.Response:
        async with httpx.AsyncClient(timeout=20) as http:
            return await http.delete(self.http_url + self.location, headers=self.headers())

    async def close(self) -> None:
        """Close the peer connection (leave the media first: aiortc's close can wait long for
        a transport whose other end still serves)."""
        with trio.move_on_after(5):
            await aio_as_trio(self.pc.close)()
