"""`gb6 origin`: one origin shard (its store, the admin HTTP API) serving edges on its link
port. It prints a ready line like `gb6 run`'s (with `link`) and drains on SIGTERM: it waits
until every accepted write is durable and answered.
"""

from __future__ import annotations

import sys
from typing import TextIO

import trio

from edge.files_api import files_blueprint
from node.auth_failures import user_auth, user_auth_failures
from node.cluster import link_secret
from node.config import Config
from node.health import health_blueprint
from node.supervisor import Served, admin_token, announced_host, lock_data_dir, serve
from origin.admin_api import admin_blueprint
from origin.admin_console import console_blueprint
from origin.shard import OriginShard
from replication.origin_link import LinkServer
from replication.shard_map import ShardMap, open_kv


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
