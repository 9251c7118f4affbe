"""Asking again while the other end says `unavailable` (busy, or its link reconnecting)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from node.errors import UNAVAILABLE, GB6Error

T = TypeVar("T")

_FIRST_PAUSE_S = 0.1
_MAX_PAUSE_S = 2.0


async def while_unavailable(call: Callable[[], Awaitable[T]], within: float) -> T:
    """`await call()`, made again (pauses doubling from 0.1 s to 2 s) while it raises
    `unavailable`, for up to `within` seconds; then that error. Any other error at once.
    `call` must be safe to make again: its earlier attempt may have taken effect."""
    give_up = trio.current_time() + within
    pause = _FIRST_PAUSE_S
    while True:
        try:
            return await call()
        except GB6Error as exc:
            if exc.code != UNAVAILABLE or trio.current_time() + pause > give_up:
                raise
        await trio.sleep(pause)
        pause = min(2 * pause, _MAX_PAUSE_S)
