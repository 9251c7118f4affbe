"""The process skeleton every `gb6` command shares: one trio-asyncio loop around one nursery
holding every component, the HTTP listener, the ready line, the drain on SIGTERM, the data
directory's lock and the admin token.

What each command starts is its own module's (node/standalone.py, node/origin_process.py,
node/edge_process.py). This one imports neither half, so that an origin process does not load
the edge's media libraries (aiortc, PyAV: half a second of every start).
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import resource
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import IO, Final, TextIO

import attrs
import trio
import trio_asyncio
from quart import Blueprint

from node.config import Config
from node.errors import invalid
from node.http import build_app, serve_http
from node.http_starting import answer_while_starting
from node.ids import new_secret
from node.listen import bind
from node.log import log

# SIGTERM: how long the drain may take (clients told to move, every accepted write made durable
# and answered) before the process stops all the same.
DRAIN_S: Final = 30.0


def _say(out: TextIO, **fields: object) -> None:
    # json.dumps's default separators: the exact shape PROTOCOL.md shows.
    out.write(json.dumps(fields) + "\n")
    out.flush()


def admin_token(data_dir: Path) -> tuple[str, bool]:
    """The admin token and whether it came from the data directory (so is printed)."""
    env = os.environ.get("GB6_ADMIN_TOKEN")
    if env:
        return env, False
    path = data_dir / "admin_token"
    if path.exists():
        return path.read_text().strip(), True
    token = "gb6a_" + new_secret()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return token, True


def _tune_gc() -> None:
    """Start-up objects never become garbage: freeze them out of every collection, and collect
    the young generation less often. With a thousand clients, the default thresholds cost
    pauses of tens to hundreds of milliseconds under load (see bench/RESULTS.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 1_000)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def announced_host(config: Config) -> str:
    """The host as it appears in a URL."""
    return f"[{config.host}]" if ":" in config.host else config.host


@attrs.frozen
class Served:
    """What a process's components hand to `serve`, once they serve."""

    blueprints: list[Blueprint]
    max_body: int
    ready: dict[str, str]  # the ready line's fields before `http`
    drain: Callable[[], Awaitable[None]]  # SIGTERM: what must finish before the process stops
    # The drain cut short (its time ran out, or a second signal): what is shielded stops now.
    stop_now: Callable[[], None] = lambda: None


async def serve(
    config: Config,
    start: Callable[[trio.Nursery], Awaitable[Served]],
    out: TextIO,
    admin: tuple[str, bool] | None = None,
) -> None:
    """The skeleton every `gb6` process shares: one trio-asyncio loop around one nursery;
    `start` starts the components in it, while the HTTP port says `starting`; then the HTTP
    app, the ready line (and the admin token line when it came from the data directory); on
    SIGTERM/SIGINT `drain`, then stop. A signal before the ready line stops it at once."""
    _raise_fd_limit()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # Bound first: a port in use stops the process before anything else starts.
        http_sock = bind(config.host, config.http_port, "HTTP")
        stopped_starting = trio.Event()
        try:
            await _serve(config, start, out, admin, signals, http_sock, stopped_starting)
        except Exception as exc:
            if not stopped_starting.is_set():
                raise
            # Its components were cancelled mid-start: what they leave (a PostgreSQL
            # connection aborted mid-handshake, say) may raise as the asyncio loop closes.
            log("stopped_while_starting_error", error=repr(exc))
    log("stopped")


async def _serve(
    config: Config,
    start: Callable[[trio.Nursery], Awaitable[Served]],
    out: TextIO,
    admin: tuple[str, bool] | None,
    signals: AsyncIterator[int],
    http_sock: socket.socket,
    stopped_starting: trio.Event,
) -> None:
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        served = await _start_answering_http(nursery, start, http_sock, signals, stopped_starting)
        stop_http = trio.Event()
        app = build_app(served.blueprints, max_body=served.max_body)
        await nursery.start(serve_http, app, http_sock, stop_http)
        _tune_gc()
        if admin is not None and admin[1]:
            _say(out, event="admin_token", token=admin[0])
        http = f"http://{announced_host(config)}:{http_sock.getsockname()[1]}"
        _say(out, event="ready", **served.ready, http=http)
        async for signum in signals:
            log("draining", signal=signal.Signals(signum).name)
            break
        with trio.move_on_after(DRAIN_S) as draining:
            async with trio.open_nursery() as watching:
                watching.start_soon(_cancel_on_a_signal, signals, draining, "drain_cut_short")
                await served.drain()
                watching.cancel_scope.cancel()
        if draining.cancelled_caught:
            log("drain_cut_short")
            served.stop_now()
        stop_http.set()
        nursery.cancel_scope.deadline = trio.current_time() + 5.0
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()


async def _start_answering_http(
    nursery: trio.Nursery,
    start: Callable[[trio.Nursery], Awaitable[Served]],
    sock: socket.socket,
    signals: AsyncIterator[int],
    stopped: trio.Event,
) -> Served:
    """`start(nursery)`, while the HTTP port says that the process is starting. A signal
    meanwhile stops the process (nothing served yet: nothing to drain) and sets `stopped`."""
    started = trio.Event()
    async with trio.open_nursery() as answering:
        await answering.start(answer_while_starting, sock, started)
        answering.start_soon(
            _stop_on_a_signal_until, started, signals, nursery.cancel_scope, stopped
        )
        try:
            return await start(nursery)
        finally:
            started.set()


async def _stop_on_a_signal_until(
    started: trio.Event,
    signals: AsyncIterator[int],
    process: trio.CancelScope,
    stopped: trio.Event,
) -> None:
    async with trio.open_nursery() as watching:
        watching.start_soon(
            partial(_cancel_on_a_signal, signals, process, "stopped_while_starting", stopped)
        )
        await started.wait()
        watching.cancel_scope.cancel()


async def _cancel_on_a_signal(
    signals: AsyncIterator[int],
    scope: trio.CancelScope,
    event: str,
    told: trio.Event | None = None,
) -> None:
    """The operator asked to stop (while starting, or Ctrl-C again while draining): `scope`
    is cancelled, whatever it still waits for; logged as `event`, and `told` set."""
    async for signum in signals:
        log(event, signal=signal.Signals(signum).name)
        if told is not None:
            told.set()
        scope.cancel()
        return


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold `data_dir` for this process until it exits (the returned file is the lock): two
    processes on one data directory would both write its stores, each with its own idea of
    every room's next seq."""
    data_dir.mkdir(parents=True, exist_ok=True)
    held = (data_dir / ".gb6.lock").open("ab")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        raise invalid(
            f"data directory {data_dir} is in use by another gb6 process (one stopping may"
            " take up to 35 s: start this one once it has exited)"
        ) from None
    except OSError as exc:  # a filesystem without locks (some NFS or FUSE mounts)
        log("data_dir_not_locked", path=str(data_dir), error=exc.strerror)
    return held
