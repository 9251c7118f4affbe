"""Shielded work that one call still ends: clean-up that outlives its task's cancellation (a
recording's files and manifest stored as the process stops) but not the operator's "stop now"
(a second SIGTERM) or the end of the drain's budget for it.

A shield keeps out the cancellation of the scopes around it; a scope inside it can still be
cancelled directly. `Shields` keeps those scopes, so that `drop_all` cancels each one under
way, and makes every later one cancelled from the start.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Shields:
    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.dropped = False

    @contextmanager
    def shielded(self, seconds: float) -> Iterator[trio.CancelScope]:
        """A shielded scope that ends after `seconds` (its `cancelled_caught` says whether it
        ended so, or by `drop_all`)."""
        scope = trio.CancelScope(shield=True, deadline=trio.current_time() + seconds)
        if self.dropped:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def drop_all(self) -> None:
        self.dropped = True
        for scope in list(self._scopes):
            scope.cancel()
