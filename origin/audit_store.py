"""The audit store port: append-only storage for the audit log's records.

Adapters: `origin.audit_sqlite.SqliteAuditStore` (embedded: its own file, audit.db, and a thread
it owns) and `origin.audit_pg.PgAuditStore` (PostgreSQL: its own table, `audit_log`, in the
shard's schema). `tests/test_audit_store_contract.py` runs one suite against both.

The contract, for every adapter:

- A component: `await nursery.start(store.run)` serves once its table exists; cancelling `run`
  closes it (after finishing the call in progress).
- `append(records)` writes the records in one transaction and returns once they are durable.
  Seqs are the primary key: a record whose seq is already stored fails the whole call with
  `conflict` and writes nothing. The adapter does not check the chain: the log (audit_log.py)
  seals records, the store keeps them byte for byte (details as the exact text given).
- There is no path in code that updates or deletes a record, and the storage refuses both
  (SQLite: triggers; PostgreSQL: a trigger, and the privileges revoked from the owning role).
- `head()` is the record with the highest seq (None when empty); `scan(after, limit)` the
  records with seq > after in seq order; `query(q)` one page of a filtered listing, newest
  first (see `AuditQuery`).
- Storage failures are GB6Error `unavailable`; bad queries are `invalid` (checked before any
  I/O, by `AuditQuery.checked`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio

from node.errors import invalid
from origin.audit import AuditLimits, AuditRecord

COLUMNS: Final = "seq, ts, actor, action, org, instance, target, outcome, details, prev, hash"
MAX_SCOPE: Final = 10_000  # org or instance ids in one query's scope


@attrs.frozen
class AuditQuery:
    """A listing's filters, tenancy scope and page.

    - `actor`, `action`, `org`, `instance`: equality filters (None: any).
    - `since`, `until`: ts in ms, since ≤ ts < until (None: unbounded).
    - `before`: the cursor: only records with seq < before (the `next` of the previous page).
    - `orgs`, `instances`: the caller's scope. None for both is the operator's: every record.
      Otherwise a record is visible if its org is in `orgs` or its instance in `instances`;
      records of no tenant (node-wide events) are the operator's only.
    """

    limit: int = 50
    actor: str | None = None
    action: str | None = None
    org: str | None = None
    instance: str | None = None
    since: int | None = None
    until: int | None = None
    before: int | None = None
    orgs: frozenset[str] | None = None
    instances: frozenset[str] | None = None

    def checked(self, limits: AuditLimits) -> AuditQuery:
        # One more than a page: the log asks for it to tell whether another page follows.
        if not isinstance(self.limit, int) or not 1 <= self.limit <= limits.page + 1:
            raise invalid(f"audit page limit must be 1..{limits.page}")
        for name in ("actor", "action", "org", "instance"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not 1 <= len(value) <= 200):
                raise invalid(f"audit filter '{name}' must be a string of 1 to 200 characters")
        for name in ("since", "until", "before"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62
            ):
                raise invalid(f"audit filter '{name}' must be a non-negative integer")
        for name in ("orgs", "instances"):
            value = getattr(self, name)
            if value is not None and len(value) > MAX_SCOPE:
                raise invalid(f"an audit scope names at most {MAX_SCOPE} {name}")
        return self

    @property
    def scoped(self) -> bool:
        return self.orgs is not None or self.instances is not None


def where(q: AuditQuery, mark: Callable[[Any], str], mark_set: Callable[[list[str]], str]) -> str:
    """The WHERE clause of `q` (never empty: "TRUE" at least), so both adapters share one
    translation of the filters: `mark(value)` adds a parameter and returns its placeholder,
    `mark_set(ids)` adds a list parameter and returns a subquery selecting its elements."""
    parts: list[str] = []
    for column in ("actor", "action", "org", "instance"):
        value = getattr(q, column)
        if value is not None:
            parts.append(f"{column} = {mark(value)}")
    if q.since is not None:
        parts.append(f"ts >= {mark(q.since)}")
    if q.until is not None:
        parts.append(f"ts < {mark(q.until)}")
    if q.before is not None:
        parts.append(f"seq < {mark(q.before)}")
    if q.scoped:
        visible = [
            f"{column} IN ({mark_set(sorted(ids))})"
            for column, ids in (("org", q.orgs), ("instance", q.instances))
            if ids
        ]
        parts.append("(" + " OR ".join(visible) + ")" if visible else "FALSE")
    return " AND ".join(parts) or "TRUE"


def record_from_row(row: Sequence[Any]) -> AuditRecord:
    return AuditRecord(
        seq=int(row[0]),
        ts=int(row[1]),
        actor=row[2],
        action=row[3],
        org=row[4],
        instance=row[5],
        target=row[6],
        outcome=row[7],
        details=row[8],
        prev=bytes(row[9]),
        hash=bytes(row[10]),
    )


def record_row(r: AuditRecord) -> tuple[Any, ...]:
    return (
        r.seq,
        r.ts,
        r.actor,
        r.action,
        r.org,
        r.instance,
        r.target,
        r.outcome,
        r.details,
        r.prev,
        r.hash,
    )


class AuditStore(Protocol):
    """Append-only storage of audit records (see the module docstring)."""

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def append(self, records: Sequence[AuditRecord]) -> None:
        """Write the records in one transaction; durable on return (`conflict` on a taken
        seq, and then nothing is written)."""
        ...

    async def head(self) -> AuditRecord | None: ...

    async def scan(self, after: int, limit: int) -> list[AuditRecord]:
        """Records with seq > `after`, in seq order, at most `limit`."""
        ...

    async def query(self, q: AuditQuery) -> list[AuditRecord]:
        """One page of `q`: at most `q.limit` records, newest first."""
        ...


if TYPE_CHECKING:  # both adapters fit the port (checked by mypy)
    from origin.audit_pg import PgAuditStore
    from origin.audit_sqlite import SqliteAuditStore

    def _fits(a: SqliteAuditStore, b: PgAuditStore) -> tuple[AuditStore, AuditStore]:
        return a, b
