"""The audit log component: appends records in batches, anchors the chain, answers listings.

How to record (the API other code calls):

- `await audit.record(actor=..., action=..., org=..., instance=..., target=..., outcome=...,
  details=...)` returns the sealed `AuditRecord` once it is durable AND anchored. Admin actions
  await it after their change is made, so an acknowledged admin action is always audited; if
  recording fails the caller raises `unavailable` (the change itself may have happened: the
  client is told to look). Bad input is `invalid` before anything is queued. Cancelling the
  caller does not unqueue the record.
- `audit.record_soon(...)` (same arguments) is for synchronous callers that must not wait (quota
  listeners, the hello path): it queues without blocking. The queue is bounded
  (`AuditLimits.pending`); past it a record is dropped and counted, and the count itself is
  recorded (`audit.dropped`) as soon as there is room.
- `audit.hello_refused(reason, instance)`: a user token refused (at `hello`, or on a file call),
  recorded as `auth.token_refused`, aggregated by `RefusalCounter`, so a flood of bad tokens
  costs a bounded number of records per window.
- `await audit.admin_refused(actor=..., action=..., code=..., target=...)`: an admin request
  refused (403 on a change, 429, 401), aggregated like refused hellos per (actor, action, code):
  the first of its kind in a window is recorded (and awaited: on record once answered), later
  ones only counted, one `aggregated` record per kind when the window closes. So no credential,
  nor anyone without one, grows the log faster than the window allows, whatever it sends.
- `await audit.page(query)` lists records newest first, `(records, next cursor)`; the cursor is
  the text of a seq, turned back into `AuditQuery.before` by `cursor_before`.

Batches. One writer task takes every record queued (at most `AuditLimits.batch`), seals them
(seq, ts that never goes back, prev, hash), appends them in one transaction, then writes the
anchor, and only then wakes the callers. An anchor that fails to be written is logged, not
reported: the records are durable, the next batch's anchor covers them, and at start the log
re-anchors its tail. A failed append fails every caller of the batch with the store's error and
reloads the head from the store (a taken seq means another writer got there first; the chain
continues from what is stored, never forks).

Where the anchor lives (see origin/audit.py for what it proves):
- Embedded (SQLite audit, audit.db): the file `audit.anchor` next to it in the data directory,
  replaced atomically (write, fsync, rename, fsync the directory). Not the kv port: an embedded
  node has no kv unless a cluster kv is configured, and a file outside audit.db is already out
  of reach of whoever edits the database through SQL.
- PostgreSQL audit (store backends postgres and kafka): the cluster kv (`[cluster] kv`) under
  `audit/anchor/<shard>/<schema>` when one is configured, written with compare-and-set so it
  only moves forward; otherwise the same file in the data directory. Either way the anchor is
  not in the table it anchors.

At start the component checks that the stored records continue the anchored chain (the anchored
record is there, unchanged, and the records after it chain to it). If not, it refuses to start
(`unavailable`, naming `gb6 audit verify`): writing on would re-anchor over the evidence. With
no anchor but records (a crash before the first anchor, or a deleted anchor) it verifies the
whole chain, anchors it and records `audit.anchor_missing`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import trio

from node.channels import take_waiting
from node.errors import UNAVAILABLE, GB6Error, invalid, leaves
from node.log import log
from origin.audit import (
    Anchor,
    AuditEntry,
    AuditLimits,
    AuditRecord,
    Finding,
    Problem,
    RefusalCounter,
    Report,
    Verifier,
    entry,
    seal,
    tail_follows,
)
from origin.audit_store import AuditQuery, AuditStore
from origin.sqlite_store import now_ms

if TYPE_CHECKING:
    from node.config import Config
    from origin.kv import KV

KEY_ENV: Final = "GB6_AUDIT_KEY"
_SCAN: Final = 1_000  # records per read while verifying
_DRAIN_S: Final = 10.0  # on shutdown, how long the writer may take to commit what is queued


def audit_key() -> bytes | None:
    """The anchor's HMAC key from GB6_AUDIT_KEY (16+ characters), or None when unset."""
    raw = os.environ.get(KEY_ENV, "")
    if not raw:
        return None
    if len(raw) < 16:
        raise invalid(f"{KEY_ENV} must be 16 characters or more")
    return raw.encode()


# --- where the anchor lives ------------------------------------------------------------


class AnchorStore(Protocol):
    """Keeps the anchor outside the log. A component (`run`), like the stores."""

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def load(self) -> Anchor | None: ...

    async def save(self, anchor: Anchor) -> None:
        """Durable on return; never moves the anchor back to a lower seq."""
        ...


class FileAnchor:
    """The anchor in a file of its own, replaced atomically and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def load(self) -> Anchor | None:
        try:
            raw = await trio.to_thread.run_sync(self.path.read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise GB6Error(UNAVAILABLE, f"audit anchor {self.path}: {exc}") from None
        return Anchor.decode(raw)

    async def save(self, anchor: Anchor) -> None:
        try:
            await trio.to_thread.run_sync(self._write, anchor.encode())
        except OSError as exc:
            raise GB6Error(UNAVAILABLE, f"audit anchor {self.path}: {exc}") from None

    def _write(self, raw: bytes) -> None:
        # One writer (the log's writer task), so "only forward" needs no re-read here.
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)


class KvAnchor:
    """The anchor under one key of the kv port, moved only forward (compare-and-set)."""

    def __init__(self, kv: KV, key: bytes) -> None:
        self.kv = kv
        self.key = key

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.kv.run)
            task_status.started()

    async def load(self) -> Anchor | None:
        raw = await self.kv.get(self.key)
        return None if raw is None else Anchor.decode(raw)

    async def save(self, anchor: Anchor) -> None:
        for _ in range(8):
            current = await self.kv.get(self.key)
            if current is not None and Anchor.decode(current).seq >= anchor.seq:
                return  # another writer of this log anchored further already
            if await self.kv.compare_and_set(self.key, current, anchor.encode()):
                return
        raise GB6Error(UNAVAILABLE, "the audit anchor keeps changing under us")


# --- the component -----------------------------------------------------------------------


@attrs.define
class _Pending:
    entry: AuditEntry
    done: trio.Event | None  # None: nobody waits (record_soon)
    record: AuditRecord | None = None
    error: GB6Error | None = None


def cursor_before(cursor: str) -> int:
    """A page cursor (the `next` of the previous page) as `AuditQuery.before`."""
    if not isinstance(cursor, str) or not re.fullmatch(r"[0-9]{1,18}", cursor):
        raise invalid("bad audit cursor: the `next` of the previous page")
    return int(cursor)


class AuditLog:
    """The audit log. A component: `await nursery.start(audit.run)` (inside the process's
    trio-asyncio loop when the store is PostgreSQL); it serves once the chain is checked."""

    def __init__(
        self,
        store: AuditStore,
        anchors: AnchorStore,
        limits: AuditLimits | None = None,
        *,
        key: bytes | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self.anchors = anchors
        self.limits = limits or AuditLimits()
        self.key = key
        self._clock = clock
        self._send, self._recv = trio.open_memory_channel[_Pending](self.limits.pending)
        self._head_seq = 0
        self._head_hash = b""
        self._last_ts = 0
        self._refusals = RefusalCounter(
            int(self.limits.refusal_window_s * 1000), self.limits.refusal_kinds
        )
        # Refused admin requests, kind (f"{action} {code}", actor); same window and bound.
        self._admin_refusals = RefusalCounter(
            int(self.limits.refusal_window_s * 1000), self.limits.refusal_kinds
        )
        self._serving = False
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._statuses: dict[str, str] = {}  # instance → status last seen (instance_seen)
        self.dropped = 0  # records refused by a full queue, not yet recorded as a count
        self.commits = 0  # batches appended; for tests and metrics
        # The org an instance belongs to (the shard sets it), for records that name only one.
        self.org_of: Callable[[str], str | None] = lambda _instance: None

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._run(task_status)
        except BaseExceptionGroup as group:
            # A refusal at start (a tampered tail, an unreachable store) is one GB6Error:
            # raise it as itself, so the process can say what is wrong in one line.
            found = leaves(group)
            if len(found) == 1 and isinstance(found[0], GB6Error):
                raise found[0] from None
            raise

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        # The store and the anchor outlive the writer: cancelling `run` stops the writer
        # first, commits what was queued, and only then closes them (their own scopes, shielded
        # from the caller's cancellation, are cancelled here, last).
        store_scope, anchor_scope = trio.CancelScope(shield=True), trio.CancelScope(shield=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(_keep, self.store.run, store_scope)
            await nursery.start(_keep, self.anchors.run, anchor_scope)
            try:
                if await self._recover():
                    self.record_soon(
                        actor="system",
                        action="audit.anchor_missing",
                        outcome="failed",
                        details={"head": self._head_seq},
                    )
                async with trio.open_nursery() as workers:
                    workers.start_soon(self._writer)
                    workers.start_soon(self._ticker)
                    self._serving = True
                    task_status.started()
            finally:
                self._serving = False
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(_DRAIN_S):
                        while batch := take_waiting(self._recv, self.limits.batch):
                            await self._commit(batch)
                    store_scope.cancel()
                    anchor_scope.cancel()

    async def wait_idle(self) -> None:
        """Return once every queued record is durable and anchored."""
        await self._idle.wait()

    async def _recover(self) -> bool:
        """Check the stored chain against the anchor and anchor its head; whether the anchor
        was missing. Raises `unavailable` when they disagree (see the module docstring)."""
        anchor = await self.anchors.load()
        head = await self.store.head()
        if anchor is None:
            if head is None:
                return False
            report = await verify_store(self.store, None, None)
            if report.finding is not None and report.finding.problem is not Problem.ANCHOR:
                raise _refuse(report.finding)
            assert head is not None
            self._set_head(head)
            await self.anchors.save(Anchor.head(head.seq, head.hash, self.key))
            log("audit_anchor_missing", head=head.seq)
            return True
        if self.key is not None and not anchor.authentic(self.key):
            raise GB6Error(
                UNAVAILABLE,
                "the audit anchor's MAC does not match GB6_AUDIT_KEY; run `gb6 audit verify`",
            )
        tail: list[AuditRecord] = []
        after = max(anchor.seq - 1, 0)
        while page := await self.store.scan(after, _SCAN):
            tail += page
            after = page[-1].seq
        for finding in tail_follows(tail, anchor):
            raise _refuse(finding)
        if head is not None and head.seq > anchor.seq:
            await self.anchors.save(Anchor.head(head.seq, head.hash, self.key))
        if head is not None:
            self._set_head(head)
        return False

    def _set_head(self, head: AuditRecord) -> None:
        self._head_seq, self._head_hash = head.seq, head.hash
        self._last_ts = max(self._last_ts, head.ts)

    # --- recording -----------------------------------------------------------------------

    def _entry(
        self,
        *,
        actor: str,
        action: str,
        org: str | None,
        instance: str | None,
        target: str | None,
        outcome: str,
        details: Mapping[str, Any] | None,
    ) -> AuditEntry:
        """The checked entry of `record` and `record_soon` (their one builder): `org` defaults
        to the org of `instance`. Raises `invalid` for bad input."""
        if org is None and instance is not None:
            org = self.org_of(instance)
        return entry(
            actor=actor,
            action=action,
            org=org,
            instance=instance,
            target=target,
            outcome=outcome,
            details=details,
            limits=self.limits,
        )

    async def record(
        self,
        *,
        actor: str,
        action: str,
        org: str | None = None,
        instance: str | None = None,
        target: str | None = None,
        outcome: str = "ok",
        details: Mapping[str, Any] | None = None,
    ) -> AuditRecord:
        """Record one entry; returns it once durable and anchored (see the module docstring).
        `org` defaults to the org of `instance`. Raises `invalid` for bad input, `unavailable`
        when the log cannot write."""
        e = self._entry(
            actor=actor,
            action=action,
            org=org,
            instance=instance,
            target=target,
            outcome=outcome,
            details=details,
        )
        if not self._serving:
            raise GB6Error(UNAVAILABLE, "the audit log is not serving")
        pending = _Pending(e, trio.Event())
        self._enter()
        try:
            await self._send.send(pending)
        except BaseException:
            self._leave(1)
            raise
        assert pending.done is not None
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.record is not None
        return pending.record

    def record_soon(
        self,
        *,
        actor: str,
        action: str,
        org: str | None = None,
        instance: str | None = None,
        target: str | None = None,
        outcome: str = "ok",
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Queue one entry without waiting; dropped (and counted) when the queue is full.
        Raises `invalid` for bad input."""
        e = self._entry(
            actor=actor,
            action=action,
            org=org,
            instance=instance,
            target=target,
            outcome=outcome,
            details=details,
        )
        self._enter()
        try:
            self._send.send_nowait(_Pending(e, None))
        except (trio.WouldBlock, trio.ClosedResourceError):
            self._leave(1)
            self.dropped += 1

    def hello_refused(self, reason: str, instance: str | None) -> None:
        """A hello refused for its token: recorded at once if it is the first of its kind in
        the window, counted otherwise (see `RefusalCounter`)."""
        (reason, instance), now = self._refusals.note(reason[:100], instance, self._clock())
        if now:
            self.record_soon(
                actor="anonymous",
                action="auth.token_refused",
                instance=instance,
                outcome="denied",
                details={"reason": reason, "count": 1},
            )

    async def admin_refused(
        self, *, actor: str, action: str, code: str, target: str | None = None
    ) -> None:
        """An admin request refused with `code`: recorded (and awaited) if it is the first of
        its (actor, action, code) in the window, counted otherwise (see `RefusalCounter`)."""
        actor, action = actor[: self.limits.text_chars], action[: self.limits.action_chars]
        (kind, who), now = self._admin_refusals.note(f"{action} {code}", actor, self._clock())
        if now:
            act, _, why = kind.partition(" ")
            await self.record(
                actor=who or "anonymous",
                action=act if why else "admin.refused",
                target=target,
                outcome="denied",
                details={"code": why or "other", "count": 1},
            )

    def instance_seen(self, instance: str, status: str) -> None:
        """An instance as the shard now holds it: a change of status (suspend, resume,
        delete) since it was last seen is recorded (`instance.status`); the first sight is
        not (creating an instance is the admin API's record)."""
        before = self._statuses.get(instance)
        self._statuses[instance] = status
        if before is not None and before != status:
            self.record_soon(
                actor="system",
                action="instance.status",
                instance=instance,
                target=instance,
                details={"from": before, "to": status},
            )

    def quota_event(self, event: Any) -> None:
        """A quota listener (origin/quotas.py `QuotaEvent`): usage reached 80 % or 100 %."""
        self.record_soon(
            actor="system",
            action="quota.reached",
            instance=event.instance,
            target=event.resource,
            details={
                "resource": event.resource,
                "level": event.level,
                "used": event.used,
                "limit": event.limit,
                "period": event.period,
            },
        )

    def _enter(self) -> None:
        if self._inflight == 0:
            self._idle = trio.Event()
        self._inflight += 1

    def _leave(self, n: int) -> None:
        self._inflight -= n
        if self._inflight == 0:
            self._idle.set()

    # --- the writer ----------------------------------------------------------------------

    async def _writer(self) -> None:
        while True:
            first = await self._recv.receive()
            # No checkpoint before it is sent.
            await self._commit([first, *take_waiting(self._recv, self.limits.batch)])

    async def _commit(self, batch: list[_Pending]) -> None:
        ts = max(self._clock(), self._last_ts)  # ts never goes back along the chain
        seq, prev = self._head_seq, self._head_hash or bytes(32)
        records: list[AuditRecord] = []
        for p in batch:
            seq += 1
            record = seal(p.entry, seq, ts, prev)
            records.append(record)
            prev = record.hash
        try:
            with trio.CancelScope(shield=True):  # sent means: learn the outcome
                await self.store.append(records)
        except GB6Error as exc:
            log("audit_append_failed", error=exc.message, records=len(batch))
            await self._reload_head()
            self._finish(batch, [None] * len(batch), exc)
            return
        self.commits += 1
        self._head_seq, self._head_hash, self._last_ts = seq, prev, ts
        try:
            with trio.CancelScope(shield=True):
                await self.anchors.save(Anchor.head(seq, prev, self.key))
        except GB6Error as exc:  # durable already; the next anchor covers these records
            log("audit_anchor_failed", error=exc.message, seq=seq)
        self._finish(batch, records, None)

    def _finish(
        self,
        batch: list[_Pending],
        records: Sequence[AuditRecord | None],
        error: GB6Error | None,
    ) -> None:
        for p, r in zip(batch, records, strict=True):
            p.record, p.error = r, error
            if p.done is not None:
                p.done.set()
        self._leave(len(batch))

    async def _reload_head(self) -> None:
        try:
            with trio.CancelScope(shield=True):
                head = await self.store.head()
        except GB6Error:
            return  # still unreachable: the next batch fails the same way, or reloads then
        if head is not None:
            self._set_head(head)

    async def _ticker(self) -> None:
        """Records what was only counted: refused hellos of closed windows, dropped records."""
        period = max(0.05, min(self.limits.refusal_window_s / 4, 5.0))
        while True:
            await trio.sleep(period)
            for (reason, instance), count, start, end in self._refusals.due(self._clock()):
                self.record_soon(
                    actor="anonymous",
                    action="auth.token_refused",
                    instance=instance,
                    outcome="denied",
                    details={
                        "reason": reason,
                        "count": count,
                        "aggregated": True,
                        "window_start": start,
                        "window_end": end,
                    },
                )
            for (kind, who), count, start, end in self._admin_refusals.due(self._clock()):
                act, _, why = kind.partition(" ")
                self.record_soon(
                    actor=who or "anonymous",
                    action=act if why else "admin.refused",
                    outcome="denied",
                    details={
                        "code": why or "other",
                        "count": count,
                        "aggregated": True,
                        "window_start": start,
                        "window_end": end,
                    },
                )
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                self.record_soon(
                    actor="system",
                    action="audit.dropped",
                    outcome="failed",
                    details={"count": dropped},
                )

    # --- reading -------------------------------------------------------------------------

    async def page(self, q: AuditQuery) -> tuple[list[AuditRecord], str | None]:
        """One page of `q`, newest first, and the cursor of the next page (None at the end).
        Scope the query (`orgs`, `instances`) to what the caller may see."""
        q = q.checked(self.limits)
        if q.limit > self.limits.page:
            raise invalid(f"audit page limit must be 1..{self.limits.page}")
        rows = await self.store.query(attrs.evolve(q, limit=q.limit + 1))
        if len(rows) > q.limit:
            return rows[: q.limit], str(rows[q.limit - 1].seq)
        return rows, None

    async def verify(self) -> Report:
        """Verify the whole log against its anchor (reads every record)."""
        return await verify_store(self.store, await self.anchors.load(), self.key)


async def _keep(
    serve: Callable[..., Any],
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the component `serve` inside `scope`, which only its owner cancels."""
    with scope:
        await serve(task_status=task_status)


def _refuse(finding: Finding) -> GB6Error:
    return GB6Error(
        UNAVAILABLE,
        f"the audit log does not match its anchor ({finding.problem.value} at seq"
        f" {finding.seq}: {finding.message}); run `gb6 audit verify` and keep the files as"
        " evidence",
    )


async def verify_store(store: AuditStore, anchor: Anchor | None, key: bytes | None) -> Report:
    """Stream the store's records through a `Verifier`. Read the anchor BEFORE calling this:
    records appended meanwhile are then past the anchor, never a false alarm."""
    v = Verifier(anchor, key)
    after = 0
    while page := await store.scan(after, _SCAN):
        if not v.feed(page):
            break
        after = page[-1].seq
    return v.finish()


# --- wiring --------------------------------------------------------------------------------


def open_audit(config: Config, *, readonly: bool = False) -> AuditLog:
    """The audit log of an origin with this configuration: SQLite next to the embedded store,
    PostgreSQL (the shard's schema) for the postgres and kafka backends; the anchor as the
    module docstring says. `readonly` opens the SQLite file read-only (the verifier)."""
    limits = config.audit  # `[audit]` in the config
    anchors: AnchorStore = FileAnchor(config.data_dir / "audit.anchor")
    store: AuditStore
    if config.store_backend == "sqlite":
        from origin.audit_sqlite import SqliteAuditStore

        store = SqliteAuditStore(config.data_dir / "audit.db", limits, readonly=readonly)
    else:
        from origin.audit_pg import PgAuditStore

        store = PgAuditStore(config.pg_dsn, limits, schema=config.pg_schema)
        if config.kv:
            from replication.shard_map import open_kv

            key = f"audit/anchor/{config.shard}/{config.pg_schema}".encode()
            anchors = KvAnchor(open_kv(config.kv), key)
    return AuditLog(store, anchors, limits, key=audit_key())


async def verify_config(config: Config) -> Report:
    """`gb6 audit verify`: the anchor first, then every record (read-only on SQLite)."""
    audit = open_audit(config, readonly=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.store.run)
        await nursery.start(audit.anchors.run)
        anchor = await audit.anchors.load()
        report = await verify_store(audit.store, anchor, audit.key)
        nursery.cancel_scope.cancel()
    return report
