"""The edge↔origin link's framing (pure, with bytes) and its door (a real origin's port)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio

from node.config import Config
from replication import link
from replication.edge_link import RemoteOrigin
from tests.test_cluster import Cluster


def test_frames_round_trip_whatever_the_split() -> None:
    msgs = [{"t": "req", "id": i, "op": "append", "body": {"text": "é" * i}} for i in range(50)]
    data = b"".join(link.encode(m) for m in msgs)
    for step in (1, 3, 7, 64, len(data)):
        decoder = link.FrameDecoder()
        out = []
        for i in range(0, len(data), step):
            out += decoder.feed(data[i : i + step])
        assert out == msgs


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("!I", 1 << 30),  # longer than the limit: refused before it is buffered
        struct.pack("!I", 3) + b"{x}",  # not JSON
        struct.pack("!I", 2) + b"[]",  # not an object
        struct.pack("!I", 8) + b'{"t": 1}',  # no kind
    ],
)
def test_bad_frames_break_the_link(raw: bytes) -> None:
    with pytest.raises(link.LinkBroken):
        link.FrameDecoder(max_frame=1 << 20).feed(raw)


@pytest.fixture
def origin_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("door"))
    yield c
    c.stop()


async def test_a_wrong_secret_gets_nothing(origin_only: Cluster) -> None:
    host, _, port = origin_only.origins[0].link.rpartition(":")
    for hello in (
        {"t": "hello", "secret": "not-the-secret", "edge": "x"},
        {"t": "req", "id": 1, "op": "auth", "token": "t"},
    ):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(link.encode(hello))
            with trio.fail_after(5):
                assert await stream.receive_some(1024) == b""  # closed, no welcome, no data


async def test_an_edge_survives_a_push_it_cannot_apply(tmp_path: Path) -> None:
    """A push the edge cannot apply (from an origin of another version, say) drops that link,
    whose clients resume, and the link connects again: the edge process goes on serving."""
    connections = 0
    again = trio.Event()

    async def origin(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        await stream.receive_some(1 << 16)  # the edge's hello
        await stream.send_all(link.encode({"t": "welcome", "shard": "s1"}))
        await stream.send_all(link.encode({"t": "snap_end"}))
        if connections == 1:  # an event without its fields
            await stream.send_all(link.encode({"t": "batch", "events": {"r": [{}]}, "heads": {}}))
        else:
            again.set()
        while await stream.receive_some(1 << 16):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, origin, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        config = Config(data_dir=tmp_path, origins=(f"127.0.0.1:{port}",), link_secret="secret")
        remote = RemoteOrigin(config)
        await nursery.start(remote.run)
        with trio.fail_after(10):
            await again.wait()
        assert remote.links[0].connected
        nursery.cancel_scope.cancel()
