"""The relational store port: what an origin shard needs of its store, whatever holds the data.

Adapters: `origin.sqlite_store.SqliteStore` (embedded, the default) and `origin.pg_store.PgStore`
(PostgreSQL). `tests/test_store_contract.py` runs one suite against both.

The contract, for every adapter:

- A component: `await nursery.start(store.run)`; it serves once its schema is migrated, and on
  exit it commits what was queued before the cancellation, then closes what it opened.
- The constructor takes an `AppendCallback`. `submit_append` queues one seq-taking op and waits
  only for a free slot (backpressure). Appends are group-committed; once a batch is durable the
  callback is called once, in the store's own task, with every op of the batch in submission
  order and batches in commit order. Each op's outcome is an `Appended` or a `GB6Error`.
- Seqs are per room, start at 1 and are gapless: a failed commit skips and reuses none. A repeat
  of (room, sender, cid) answers with the original event (`duplicate=True`) and writes nothing,
  even when its checks would fail now. Edits and deletes target a message of the same room that
  is not deleted (`not_found`, `conflict`), an edit only by its sender and a delete by its sender
  or a moderator (`forbidden`); reactions target a live message; a thread root is a message of
  the room (`not_found`). One op's failure never fails the others of its batch; a failure of the
  storage itself fails the whole batch with `unavailable`.
- Tenancy writes return once durable and are not undone by cancelling the caller. Duplicate ids
  and missing referenced rows are `conflict` (an unknown parent organization is `not_found`).
- Reads translate storage failures into `unavailable`. `search` matches messages holding every
  word of the query (case and Latin diacritics folded), newest first, never a deleted one, and
  shows a hit with its current (edited) text and `edited` set to the newest edit's seq.

SqliteStore also has a generic `write(fn)` and `read(fn)` that take a `sqlite3.Connection`;
they are SQLite's own and stay out of this port (only SqliteStore's own methods call them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import trio

from node.errors import GB6Error
from node.events import Event
from origin.records import ApiKey, FileRecord, Instance, Org, OrgMember, RoomRecord, Token, User
from origin.sqlite_store import AppendCallback, Appended, AppendItem, AppendResult

__all__ = ["AppendCallback", "AppendItem", "AppendResult", "Appended", "RelationalStore"]


class RelationalStore(Protocol):
    """Tenancy, rooms, membership, files and the events of every room (see the module doc)."""

    @property
    def commits(self) -> int:
        """Batches committed so far (for metrics and tests)."""
        ...

    @property
    def stopped(self) -> GB6Error | None:
        """Why the store refuses appends, else None: for good once its log was fenced by a
        newer writer of the shard (this process must not write again), or until it recovered
        in place from a write whose outcome was unknown."""
        ...

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...

    async def wait_idle(self) -> None:
        """Return once every submitted append and write has been committed and answered."""
        ...

    # --- the message path ----------------------------------------------------------------

    async def submit_append(self, item: AppendItem) -> None:
        """Queue an append; its outcome reaches the `AppendCallback` once durable."""
        ...

    # --- tenancy writes (durable on return) ----------------------------------------------

    async def create_org(self, org: Org) -> None: ...

    async def create_instance(self, inst: Instance) -> None: ...

    async def create_user(self, user: User) -> None: ...

    async def create_token(self, token: Token, digest: str) -> None: ...

    async def revoke_token(self, user: str, token_id: str) -> bool:
        """True if `user` had that token (revoking twice is still True)."""
        ...

    async def create_room(self, room: RoomRecord, members: Iterable[str]) -> None: ...

    async def add_members(self, room: str, users: Iterable[str]) -> None:
        """Users already members are left as they are (their read seq kept); users not active
        (deleted while the caller checked them) are not added, here or by `create_room`."""
        ...

    async def remove_members(self, room: str, users: Iterable[str]) -> None: ...

    async def set_read(self, room: str, user: str, seq: int) -> None:
        """Move a member's read seq forward (never back); no-op for a non-member."""
        ...

    async def create_file(self, rec: FileRecord) -> None: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    # --- reads ---------------------------------------------------------------------------

    async def events_after(self, room: str, after: int, limit: int) -> list[Event]:
        """Up to `limit` events with seq > `after`, oldest first."""
        ...

    async def history(self, room: str, before: int | None, limit: int) -> list[Event]:
        """The `limit` newest events with seq < `before` (all if None), oldest first."""
        ...

    async def search(self, rooms: Sequence[str], query: str, limit: int) -> list[Event]: ...

    async def token(self, digest: str) -> Token | None: ...

    async def load_tenancy(self) -> tuple[list[Org], list[Instance], list[User]]: ...

    async def load_rooms(self) -> list[tuple[RoomRecord, int, dict[str, int]]]:
        """Every room with its head seq and members (user → read seq)."""
        ...

    async def file(self, file_id: str) -> FileRecord | None: ...

    async def meta(self, key: str) -> str | None: ...

    # --- quota counts at start (origin/quotas.py) ----------------------------------------

    async def messages_since(self, since_ms: int) -> dict[str, int]:
        """Per instance, how many `message` events (sends) have `ts >= since_ms`; instances
        without any are left out."""
        ...

    async def stored_bytes(self) -> dict[str, int]:
        """Per instance, the total size of its files; instances without any are left out."""
        ...

    async def event_by_cid(self, room: str, sender: str, cid: str) -> Event | None:
        """The committed event of (room, sender, cid), if any: how the shard answers a repeat
        that arrives once the instance is at its daily `messages` quota."""
        ...

    # --- the org tree, lifecycles, org members and API keys (origin/tenancy.py) -----------
    # Writes are durable on return; a missing target is `not_found`, a duplicate `conflict`.

    async def update_org(self, org: Org) -> None:
        """Store the org's new name (the parent never changes)."""
        ...

    async def delete_org(self, org_id: str) -> None:
        """Soft delete: the row stays (deleted instances still name it) but `load_tenancy` no
        longer returns it; its members, their tokens and its API keys are removed with it."""
        ...

    async def update_instance(self, inst: Instance) -> None:
        """Store the instance's name, plan and status."""
        ...

    async def update_user(self, user: User) -> None:
        """Store the user's name and role."""
        ...

    async def delete_user(self, user_id: str) -> None:
        """In one transaction: the user's status becomes `deleted`, every token of theirs is
        revoked and they leave every room. `load_tenancy` no longer returns them."""
        ...

    async def create_org_member(self, member: OrgMember) -> None: ...

    async def update_org_member(self, member: OrgMember) -> None:
        """Store the member's name and role."""
        ...

    async def delete_org_member(self, member_id: str) -> None:
        """The member and every token of theirs."""
        ...

    async def create_member_token(self, token: Token, digest: str) -> None:
        """An org member's admin-API token (`token.user` is the member's id)."""
        ...

    async def revoke_member_token(self, member: str, token_id: str) -> bool:
        """True if `member` had that token (revoking twice is still True)."""
        ...

    async def member_token(self, digest: str) -> Token | None: ...

    async def create_api_key(self, key: ApiKey, digest: str) -> None: ...

    async def revoke_api_key(self, key_id: str) -> bool:
        """True if the key exists (revoking twice is still True)."""
        ...

    async def api_key(self, digest: str) -> ApiKey | None: ...

    async def load_access(self) -> tuple[list[OrgMember], list[ApiKey]]:
        """Every org member and every API key (revoked ones included) of live orgs."""
        ...


if TYPE_CHECKING:  # the embedded adapter fits the port as it is (checked by mypy)
    from origin.sqlite_store import SqliteStore

    def _sqlite_fits(store: SqliteStore) -> RelationalStore:
        return store
