"""The edge↔origin link's framing (pure, with bytes) and its door (a real origin's port)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
import trio

from replication import link
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
