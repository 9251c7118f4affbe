"""asyncpg's exceptions, translated once into the project's errors (`node.errors`).

Who is at fault decides the code: a write that breaks a constraint (a duplicate id, a row that
refers to a missing one) is the caller's `conflict`; a value PostgreSQL cannot store (a NUL
character in text, a number out of range) is the caller's `invalid`; anything else (the server
is down, the connection broke, a statement timed out, the server refused) is `unavailable`, and
the caller may retry.
"""

from __future__ import annotations

from typing import Final

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from node.errors import CONFLICT, INVALID, UNAVAILABLE, GB6Error

# What a database call can raise that is not a bug of ours.
DB_ERRORS: Final[tuple[type[BaseException], ...]] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


def translate(exc: BaseException, doing: str) -> GB6Error:
    """The GB6Error for a failure of `doing` (e.g. "storage write")."""
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return GB6Error(CONFLICT, f"{doing} refused: {_message(exc)}")
    if isinstance(exc, asyncpg.DataError):
        return GB6Error(INVALID, f"{doing} refused: {_message(exc)}")
    return GB6Error(UNAVAILABLE, f"{doing} failed: {_message(exc)}")


# SQLSTATE classes a retry may get past: connection exceptions, transaction rollbacks
# (serialization failures, deadlocks), insufficient resources, operator intervention (a
# statement cancelled or timed out, a server shutting down), system errors.
_TRANSIENT_CLASSES: Final = frozenset({"08", "40", "53", "57", "58"})


def transient(exc: BaseException) -> bool:
    """Whether `exc` (one of `DB_ERRORS`) may pass on a retry, as opposed to a fault of ours or
    of the server's setup (a missing table, a refused password, bad SQL)."""
    if not isinstance(exc, asyncpg.PostgresError):
        return True  # the network, a timeout, a connection closed under us
    if isinstance(exc, asyncpg.InvalidCachedStatementError):
        return True  # the schema changed under a prepared statement: prepared again
    state = getattr(exc, "sqlstate", None) or ""
    # 55P03 lock_not_available; 25006 read_only_sql_transaction (a standby, mid-failover).
    return state[:2] in _TRANSIENT_CLASSES or state in ("55P03", "25006")


def _message(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None)
    text = str(exc) or type(exc).__name__
    return f"{text} ({detail})" if detail else text
