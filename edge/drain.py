"""An edge's part of a process drain (SIGTERM), for `gb6 run` and `gb6 edge` alike."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio

from node.log import log

if TYPE_CHECKING:
    from edge.gateway import Gateway
    from edge.media_signaling import MediaRooms

# Of the process's drain (node/supervisor.py's `DRAIN_S`), how long an edge's recordings may
# take to finish (beside the gateway's drain).
RECORDINGS_DRAIN_S: Final = 20.0


async def drain_edge(gateway: Gateway, media: MediaRooms) -> None:
    """An edge's part of a drain: the gateway's (clients told to move, what is in flight
    answered, sockets closed) and, beside it, its recordings finishing (stopped `shutdown`,
    files and manifest stored while the origins still answer), for at most
    `RECORDINGS_DRAIN_S`: a recording not finished by then is abandoned (what it had not
    stored is lost), so that the process stops within its drain."""

    async def finish_recordings() -> None:
        with trio.move_on_after(RECORDINGS_DRAIN_S) as waited:
            await media.drain()
        if waited.cancelled_caught:
            log("recordings_drain_cut_short")
            media.abandon()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(finish_recordings)
        await gateway.drain()
