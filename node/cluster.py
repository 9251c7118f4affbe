"""`gb6 origin` and `gb6 edge`: the two halves of `gb6 run`, in processes of their own.

An origin process holds one shard (its store, the admin HTTP API) and serves edges on its link
port; an edge process holds the WebSocket gateway and a link to every origin shard of
`cluster.origins`. Both print a ready line like `gb6 run`'s (with `link` for an origin) and
drain on SIGTERM: an edge tells its clients to resume elsewhere and waits for the answers to
what it forwarded; an origin waits until every accepted write is durable and answered.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import TextIO

import trio
import trio_asyncio

from edge.files_api import files_blueprint
from edge.gateway import Gateway
from node.config import Config
from node.errors import invalid
from node.health import health_blueprint
from node.http import bind, build_app, serve_http
from node.log import log
from node.supervisor import _raise_fd_limit, _say, _tune_gc, admin_token
from origin.admin_api import admin_blueprint
from origin.shard import OriginShard
from replication.edge_link import RemoteOrigin
from replication.origin_link import LinkServer


def link_secret(config: Config) -> str:
    secret = os.environ.get("GB6_LINK_SECRET") or config.link_secret
    if len(secret) < 16:
        raise invalid(
            "a cluster needs a link secret of 16 characters or more: set "
            "[cluster] link_secret or GB6_LINK_SECRET, the same on every process"
        )
    return secret


def _host(config: Config) -> str:
    return f"[{config.host}]" if ":" in config.host else config.host


async def _wait_for_signal(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log("draining", signal=signal.Signals(signum).name)
        return


async def run_origin(config: Config, out: TextIO = sys.stdout) -> None:
    secret = link_secret(config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    _raise_fd_limit()
    token, printed = admin_token(config.data_dir)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            shard = OriginShard(config)
            await nursery.start(shard.run)
            server = LinkServer(config, shard, secret)
            link_port = await nursery.start(server.run)
            http_sock = bind(config.host, config.http_port)
            stop_http = trio.Event()
            app = build_app(
                [
                    admin_blueprint(shard, token),
                    files_blueprint(shard),
                    health_blueprint(shard, None),
                ],
                max_body=config.limits.file_bytes,
            )
            await nursery.start(serve_http, app, http_sock, stop_http)
            _tune_gc()
            if printed:
                _say(out, event="admin_token", token=token)
            host = _host(config)
            _say(
                out,
                event="ready",
                link=f"{host}:{link_port}",
                http=f"http://{host}:{http_sock.getsockname()[1]}",
                shard=config.shard,
            )
            await _wait_for_signal(signals)
            await shard.drain()
            stop_http.set()
            nursery.cancel_scope.deadline = trio.current_time() + 5.0
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    log("stopped")


async def run_edge(config: Config, out: TextIO = sys.stdout) -> None:
    link_secret(config)
    if not config.origins:
        raise invalid("an edge needs [cluster] origins: the link addresses of the origin shards")
    _raise_fd_limit()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            origin = RemoteOrigin(config)
            await nursery.start(origin.run)
            gateway = Gateway(config, origin)
            ws_port = await nursery.start(gateway.run)
            http_sock = bind(config.host, config.http_port)
            stop_http = trio.Event()
            app = build_app([health_blueprint(None, gateway)], max_body=1 << 20)
            await nursery.start(serve_http, app, http_sock, stop_http)
            _tune_gc()
            host = _host(config)
            _say(
                out,
                event="ready",
                ws=f"ws://{host}:{ws_port}/v1/ws",
                http=f"http://{host}:{http_sock.getsockname()[1]}",
            )
            await _wait_for_signal(signals)
            await gateway.drain()
            stop_http.set()
            nursery.cancel_scope.deadline = trio.current_time() + 5.0
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    log("stopped")
