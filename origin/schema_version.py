"""The one check every store's migrations make before they run (PostgreSQL and SQLite alike)."""

from __future__ import annotations

from node.errors import INTERNAL, GB6Error


def check_known(what: str, version: int, known: int) -> int:
    """`version`, the schema version `what` is at, unless a newer release made it (this one
    was rolled back to): it would read and write tables whose changes it does not know."""
    if version > known:
        raise GB6Error(
            INTERNAL,
            f"{what} is at schema version {version}, newer than this release knows ({known}):"
            " start a release that knows it",
        )
    return version
