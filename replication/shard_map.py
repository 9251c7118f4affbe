"""The shard map in kv: which origin shard holds each instance, and where each shard listens.

Keys (values are UTF-8):
- `shardmap/shard/<name>` → the shard's link address (`host:port`), written by the shard at
  start; edges scan this prefix to find every shard, new ones included, without being
  reconfigured.
- `shardmap/instance/<id>` → the shard's name, placed by compare-and-set (absent → shard) before
  the shard creates the instance: an instance is placed once and never silently moves (a move
  is a compare-and-set from the old shard to the new one, after fencing; not built yet).

Regions: an instance's data lives only on origin shards of its region (`[regions]` in the
config maps region → shard names). `check_region` is the one check, made by a shard before it
creates an instance and by `place` when it is told the instance's region: placing an instance on
a shard outside its region is `forbidden`, naming the region.

`open_kv(spec)` builds the adapter a `[cluster] kv` setting names: `sqlite:PATH`,
`postgres:DSN` (table in schema `gb6_kv`) or `tikv:HOST:PORT[,HOST:PORT…]` (placement drivers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from node.errors import GB6Error, forbidden, invalid
from node.log import without_password
from origin.kv import KV

_SHARD: Final = b"shardmap/shard/"
_INSTANCE: Final = b"shardmap/instance/"
_SCAN_LIMIT: Final = 1000  # shards per scan page


def open_kv(spec: str) -> KV:
    kind, _, rest = spec.partition(":")
    if kind == "sqlite" and rest:
        from origin.kv_sqlite import SqliteKv

        return SqliteKv(Path(rest))
    if kind == "postgres" and rest:
        from origin.kv_postgres import PostgresKv

        return PostgresKv(rest)
    if kind == "tikv" and rest:
        from origin.kv_tikv import TikvKv

        return TikvKv(rest.split(","))
    raise invalid(
        "[cluster] kv must be sqlite:PATH, postgres:DSN or tikv:PD[,PD…],"
        f" not {without_password(spec)!r}"
    )


def check_region(region: str, region_shards: tuple[str, ...] | None, shard: str) -> None:
    """Refuse to keep an instance of `region` on `shard`: `invalid` for a region that is not
    configured, `forbidden` for a shard that does not serve it."""
    if region_shards is None:
        raise invalid(f"unknown region {region!r}")
    if shard not in region_shards:
        raise forbidden(
            f"region {region!r} is served by shard(s) {', '.join(region_shards) or 'none'},"
            f" not by {shard!r}: an instance's data stays in its region"
        )


class ShardMap:
    """The map's operations over a running kv adapter (the owner runs the adapter)."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    async def register_shard(self, name: str, address: str) -> None:
        await self.kv.put(_SHARD + name.encode(), address.encode())

    async def shards(self) -> dict[str, str]:
        """Every registered shard: name → link address."""
        out: dict[str, str] = {}
        after: bytes | None = None
        while True:
            page = await self.kv.scan(_SHARD, _SCAN_LIMIT, after=after)
            for entry in page:
                out[entry.key[len(_SHARD) :].decode()] = entry.value.decode()
            if len(page) < _SCAN_LIMIT:
                return out
            after = page[-1].key

    async def place(
        self,
        instance: str,
        shard: str,
        *,
        region: str | None = None,
        region_shards: tuple[str, ...] | None = None,
    ) -> None:
        """Record that `shard` holds `instance`; refused if another shard already does, or
        (when `region` is given) if `shard` is not one of `region_shards` (`check_region`)."""
        if region is not None:
            check_region(region, region_shards, shard)
        key = _INSTANCE + instance.encode()
        if await self.kv.compare_and_set(key, None, shard.encode()):
            return
        owner = await self.kv.get(key)
        if owner is not None and owner.decode() != shard:
            raise GB6Error("conflict", f"instance {instance} is held by shard {owner.decode()}")

    async def shard_of(self, instance: str) -> str | None:
        owner = await self.kv.get(_INSTANCE + instance.encode())
        return owner.decode() if owner is not None else None
