"""`gb6 edge`: the WebSocket gateway, media and a link to every origin shard of
`cluster.origins` (or of the shard map in kv). It prints a ready line like `gb6 run`'s and
drains on SIGTERM: it tells its clients to resume elsewhere and waits for the answers to what
it forwarded, while its recordings finish.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import TextIO

import attrs
import trio

from edge.drain import drain_edge
from edge.gateway import Gateway
from edge.media_http import media_blueprint
from edge.media_signaling import start_media
from edge.shared_signals import SharedSignals
from edge.web_api import web_blueprint
from node.auth_failures import positive_limit
from node.cluster import link_secret
from node.config import Config
from node.errors import invalid
from node.health import health_blueprint
from node.ids import new_id
from node.ratelimit import RateLimiter
from node.supervisor import Served, announced_host, serve
from replication.edge_link import RemoteOrigin


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
            media.abandon,
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
