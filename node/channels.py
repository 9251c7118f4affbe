"""Helpers for Trio memory channels, the project's queues (bounded, DESIGN.md §2).

`take_waiting` is the one way a consumer drains what is already queued into a batch: writers
that group commit, publishers that pipeline, recorders that mux in bursts.
"""

from __future__ import annotations

from typing import TypeVar

import trio

_T = TypeVar("_T")


def take_waiting(recv: trio.MemoryReceiveChannel[_T], n: int) -> list[_T]:
    """Up to `n` items already waiting on `recv`, oldest first, without blocking (an empty
    list if none waits). The items are taken: the caller owns them from here on."""
    batch: list[_T] = []
    while len(batch) < n:
        try:
            batch.append(recv.receive_nowait())
        except trio.WouldBlock:
            break
    return batch


def take_all_waiting(recv: trio.MemoryReceiveChannel[_T]) -> list[_T]:
    """Everything already waiting on `recv` (at most its buffer), without blocking."""
    return take_waiting(recv, recv.statistics().current_buffer_used)
