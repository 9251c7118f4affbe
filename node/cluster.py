"""`gb6 origin` and `gb6 edge`: the two halves of `gb6 run`, in processes of their own.

An origin process holds one shard (its store, the admin HTTP API) and serves edges on its link
port; an edge process holds the WebSocket gateway and a link to every origin shard of
`cluster.origins`. Both print a ready line like `gb6 run`'s (with `link` for an origin) and
drain on SIGTERM: an edge tells its clients to resume elsewhere and waits for the answers to
what it forwarded; an origin waits until every accepted write is durable and answered.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import TextIO

import attrs
import trio

from edge.files_api import files_blueprint
from edge.gateway import Gateway
from edge.media_http import media_blueprint
from edge.media_signaling import start_media
from edge.shared_signals import SharedSignals
from edge.web_api import web_blueprint
from node.auth_failures import positive_limit, user_auth, user_auth_failures
from node.config import Config
from node.errors import invalid
from node.health import health_blueprint
from node.ids import new_id
from node.listen import is_loopback
from node.ratelimit import RateLimiter
from node.supervisor import (
    Served,
    admin_token,
    announced_host,
    drain_edge,
    lock_data_dir,
    serve,
)
from origin.admin_api import admin_blueprint
from origin.admin_console import console_blueprint
from origin.shard import OriginShard
from replication.edge_link import RemoteOrigin
from replication.origin_link import LinkServer
from replication.shard_map import ShardMap, open_kv

# configs/cluster.toml's, for a cluster on one machine: anywhere else it is no secret.
SAMPLE_SECRET = "change-me-to-a-long-random-string"


def link_secret(config: Config, *, listening: bool = False) -> str:
    """The cluster's link secret. `listening` (an origin, whose link port takes it): the sample
    secret of configs/cluster.toml only on loopback (an edge only shows it)."""
    secret = os.environ.get("GB6_LINK_SECRET") or config.link_secret
    if len(secret) < 16:
        raise invalid(
            "a cluster needs a link secret of 16 characters or more: set "
            "[cluster] link_secret or GB6_LINK_SECRET, the same on every process"
        )
    if listening and secret == SAMPLE_SECRET and not is_loopback(config.host):
        raise invalid(
            f"the link secret is the sample of configs/cluster.toml, and {config.host} is not"
            " loopback: set a secret of your own ([cluster] link_secret or GB6_LINK_SECRET)"
        )
    return secret


async def run_origin(config: Config, out: TextIO = sys.stdout) -> None:
    secret = link_secret(config, listening=True)
    held = lock_data_dir(config.data_dir)
    token, printed = admin_token(config.data_dir)

    async def start(nursery: trio.Nursery) -> Served:
        shard = OriginShard(config)
        await nursery.start(shard.run)
        link_port = await nursery.start(LinkServer(config, shard, secret).run)
        if config.kv:
            kv = open_kv(config.kv)
            await nursery.start(kv.run)
            shard_map = ShardMap(kv)
            for instance in list(shard.instances):
                await shard_map.place(instance, config.shard)
            shard.placement = lambda instance, region: shard_map.place(
                instance, config.shard, region=region, region_shards=config.region_shards(region)
            )
            await shard_map.register_shard(config.shard, f"{config.host}:{link_port}")
        return Served(
            [
                admin_blueprint(shard, token),
                console_blueprint(),
                files_blueprint(
                    shard, user_auth(user_auth_failures(config.limits), shard.authenticate)
                ),
                health_blueprint(shard, None),
            ],
            config.limits.file_bytes,
            {"link": f"{announced_host(config)}:{link_port}", "shard": config.shard},
            shard.drain,
        )

    try:
        await serve(config, start, out, (token, printed))
    finally:
        held.close()


async def run_edge(config: Config, out: TextIO = sys.stdout) -> None:
    config = attrs.evolve(config, link_secret=link_secret(config))  # what its links show
    if not config.origins and not config.kv:
        raise invalid(
            "an edge needs [cluster] origins (the origin shards' link addresses) or kv (the"
            " shard map, where the origins register)"
        )

    async def start(nursery: trio.Nursery) -> Served:
        origin = RemoteOrigin(config)
        await nursery.start(origin.run)
        shared = await nursery.start(_shared_signals, config) if config.redis_url else None
        gateway = Gateway(config, origin, shared)
        ws_port = await nursery.start(gateway.run)
        media = await start_media(nursery, config, gateway, recording=origin)

        return Served(
            [
                health_blueprint(None, gateway),
                web_blueprint(ws_port, files=False),
                media_blueprint(media, gateway.authenticate_user),
            ],
            1 << 20,
            {"ws": f"ws://{announced_host(config)}:{ws_port}/v1/ws"},
            # Recordings finish over the links, which stop with the process.
            partial(drain_edge, gateway, media),
        )

    await serve(config, start, out)


async def _shared_signals(
    config: Config, *, task_status: trio.TaskStatus[SharedSignals] = trio.TASK_STATUS_IGNORED
) -> None:
    """Redis for what the edges share: one client, the pub/sub and the session registry."""
    from edge.redis_bus import RedisPubSub, RedisRateLimiter, RedisSessions, open_redis

    edge_id = new_id("edge")
    async with open_redis(config.redis_url) as client, trio.open_nursery() as nursery:
        pubsub = RedisPubSub(client, prefix="gb6:")
        sessions = RedisSessions(client, edge_id, prefix="gb6:")
        await nursery.start(pubsub.run)
        await nursery.start(sessions.run)
        limiters: dict[str, RateLimiter] = {}
        for plan, rp in config.rate_plans.items():
            limiter = RedisRateLimiter(
                client, prefix=f"gb6:rl:{plan}:", rate=rp.rate, burst=rp.burst
            )
            await nursery.start(limiter.run)
            limiters[plan] = limiter
        auth_failures = RedisRateLimiter(
            client,
            prefix="gb6:wsauth:",
            rate=positive_limit(config.limits, "ws_auth_failures_rate", float),
            burst=positive_limit(config.limits, "ws_auth_failures_burst", int),
        )
        await nursery.start(auth_failures.run)
        shared = SharedSignals(
            pubsub, sessions, edge_id, limiters, auth_failures, config.presence_sweep_s
        )
        await nursery.start(shared.run)
        task_status.started(shared)
