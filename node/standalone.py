"""`gb6 run`: the origin shard and the edge in one process, on the embedded stores.

Start order: origin shard (store loaded) → edge gateway (WS listener) → media → the HTTP app
(the port answered `starting` until then: node/http_starting.py) → the ready line.
SIGTERM/SIGINT drain in the reverse direction: the gateway tells clients to resume elsewhere
(4009) while the recordings finish, the shard waits until every accepted write is durable and
answered, then the HTTP server stops and the nursery is cancelled.
"""

from __future__ import annotations

import sys
from typing import TextIO

import trio

from edge.drain import drain_edge
from edge.files_api import files_blueprint
from edge.gateway import Gateway
from edge.media_http import media_blueprint
from edge.media_signaling import start_media
from edge.web_api import web_blueprint
from node.config import Config
from node.health import health_blueprint
from node.supervisor import Served, admin_token, announced_host, lock_data_dir, serve
from origin.admin_api import admin_blueprint
from origin.admin_console import console_blueprint
from origin.shard import OriginShard


async def run_node(config: Config, out: TextIO = sys.stdout) -> None:
    held = lock_data_dir(config.data_dir)
    token, printed = admin_token(config.data_dir)

    async def start(nursery: trio.Nursery) -> Served:
        shard = OriginShard(config)
        await nursery.start(shard.run)
        gateway = Gateway(config, shard)
        ws_port = await nursery.start(gateway.run)
        media = await start_media(nursery, config, gateway, shard.blobs, shard.charge_usage)

        async def drain() -> None:
            await drain_edge(gateway, media)
            await shard.drain()

        return Served(
            [
                admin_blueprint(shard, token),
                console_blueprint(),
                files_blueprint(shard, gateway.authenticate_user),
                health_blueprint(shard, gateway),
                web_blueprint(ws_port, files=True),
                media_blueprint(media, gateway.authenticate_user),
            ],
            config.limits.file_bytes,
            {"ws": f"ws://{announced_host(config)}:{ws_port}/v1/ws"},
            drain,
            media.abandon,
        )

    try:
        await serve(config, start, out, (token, printed))
    finally:
        held.close()
