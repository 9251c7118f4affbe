"""The one check every store's migrations make before they run (PostgreSQL and SQLite alike),
and the one way the SQLite stores run theirs."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

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


def migrate_sqlite(conn: sqlite3.Connection, what: str, migrations: Sequence[str]) -> None:
    """Bring a SQLite database to the last of `migrations` (its `user_version` counts those it
    has), each in a transaction of its own; refused if a newer release migrated it.

    The version is read under the write lock (BEGIN IMMEDIATE): processes that open one file
    at once (origins sharing a kv file) then migrate it in turn, each step once."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            version = check_known(what, found, len(migrations))
            if version == len(migrations):
                conn.execute("COMMIT")
                return
            for statement in sqlite_statements(migrations[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def sqlite_statements(script: str) -> list[str]:
    """A migration's statements; triggers hold ';' inside BEGIN…END, so split by hand."""
    out: list[str] = []
    current = ""
    for part in script.split(";"):
        current += part + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                out.append(current.strip())
            current = ""
    return out
