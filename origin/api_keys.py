"""Scoped API keys for machines: minted, checked and turned into an `Actor`.

Rules:
- A key is scoped to an org's subtree, or to one instance of it, and holds an explicit,
  non-empty set of admin permissions (origin/rbac.py `ADMIN_PERMISSIONS`), never one its creator
  lacks (`forbidden`, naming them).
- It may expire (`ttl_s`, at most `limits.token_ttl_max_s`); it is revocable. A revoked or
  expired key is `unauthorized`.
- The secret (`gb6k_…`) is returned once, at creation; stores keep only its digest
  (node/ids.py `secret_digest`).

Pure: no I/O; the caller passes the clock and stores the record (origin/tenancy.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from node.errors import UNAUTHORIZED, GB6Error, forbidden, invalid
from node.ids import new_id, new_secret
from origin import rbac
from origin.rbac import Actor
from origin.records import ApiKey

PREFIX: Final = "gb6k_"
NAME_CHARS: Final = 200


def mint(
    creator: Actor,
    org: str,
    instance: str | None,
    name: str,
    permissions: Iterable[str],
    ttl_s: int | None,
    now: int,
    ttl_max_s: int,
) -> tuple[str, ApiKey]:
    """A new key and its secret; the caller has authorized `creator` on the scope already."""
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_CHARS:
        raise invalid(f"an API key's name is 1 to {NAME_CHARS} characters")
    perms = frozenset(permissions)
    unknown = perms - rbac.ADMIN_PERMISSIONS
    if unknown or not perms:
        raise invalid(
            "permissions must be a non-empty list of: " + ", ".join(sorted(rbac.ADMIN_PERMISSIONS))
        )
    beyond = rbac.grantable(creator, perms)
    if beyond:
        raise forbidden(f"cannot give permissions you do not hold: {', '.join(sorted(beyond))}")
    if ttl_s is not None and (isinstance(ttl_s, bool) or not 1 <= ttl_s <= ttl_max_s):
        raise invalid(f"ttl_seconds must be between 1 and {ttl_max_s}")
    key = ApiKey(
        id=new_id("key"),
        org=org,
        instance=instance,
        name=name,
        permissions=tuple(sorted(perms)),
        created_by=creator.id,
        expires_at=now + ttl_s * 1000 if ttl_s is not None else None,
        revoked=False,
        created_at=now,
    )
    return PREFIX + new_secret(), key


def actor_of(key: ApiKey, now: int) -> Actor:
    """The actor a usable key stands for; `unauthorized` if revoked or expired."""
    if key.revoked:
        raise GB6Error(UNAUTHORIZED, "API key revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise GB6Error(UNAUTHORIZED, "API key expired")
    return rbac.api_key_actor(key.id, key.org, key.instance, frozenset(key.permissions))
