"""The process contract: `gb6 run`'s stdout lines, the admin token, SIGTERM draining, restarts,
health, heartbeats and the admin bootstrap calls."""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.conftest import (
    GB6,
    Node,
    Peer,
    Tenant,
    connect,
    module_node,
)

READY = re.compile(
    r'\{"event": "ready", "ws": "ws://127\.0\.0\.1:(\d+)/v1/ws", '
    r'"http": "http://127\.0\.0\.1:(\d+)"\}\n'
)
ADMIN_TOKEN = re.compile(r'\{"event": "admin_token", "token": "([^"\\]+)"\}\n')
HEARTBEAT_MS = 400
node = module_node("process", f"[limits]\nheartbeat_ms = {HEARTBEAT_MS}\n")


# --- starting `gb6 run` by hand, to see its stdout exactly ----------------------------------


def launch(
    data: Path, log: Path, *args: str, admin_token: str | None = None
) -> tuple[subprocess.Popen[bytes], list[str]]:
    """Start `gb6 run` (stderr to `log`); return the process and the raw stdout lines up to the
    ready line."""
    env = {k: v for k, v in os.environ.items() if k != "GB6_ADMIN_TOKEN"}
    if admin_token is not None:
        env["GB6_ADMIN_TOKEN"] = admin_token
    with open(log, "ab") as stderr:
        proc = subprocess.Popen(
            [str(GB6), "run", "--data", str(data), *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode())
            if '"ready"' in lines[-1]:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)  # the ready line must come while the process runs: it flushed
    if not lines or '"ready"' not in lines[-1]:
        proc.kill()
        raise AssertionError(f"no ready line; stdout so far: {lines}")
    return proc, lines


def as_node(data: Path, proc: subprocess.Popen[bytes], ready: str, token: str) -> Node:
    line = json.loads(ready)
    return Node(data, proc=proc, ws_url=line["ws"], http_url=line["http"], admin_token=token)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    finally:
        if proc.poll() is None:
            proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peers(node: Node) -> Any:
    return asynccontextmanager(lambda token=None: connect(node, token))


async def closed_with(peer: Peer) -> tuple[int, list[dict[str, Any]]]:
    frames: list[dict[str, Any]] = []
    try:
        while True:
            frames.append(json.loads(await peer.ws.get_message()))
    except ConnectionClosed as exc:
        return exc.reason.code, frames


def test_ready_line_and_generated_admin_token(tmp_path: Path) -> None:
    data = tmp_path / "state" / "nested"  # created if missing
    log = tmp_path / "gb6.stderr.log"
    proc, lines = launch(data, log, "--ws-port", "0", "--http-port", "0")
    try:
        assert len(lines) == 2, lines
        token_line, ready = lines
        m = ADMIN_TOKEN.fullmatch(token_line)
        assert m, token_line
        token = m.group(1)
        r = READY.fullmatch(ready)
        assert r, ready
        ws_port, http_port = int(r.group(1)), int(r.group(2))
        assert ws_port > 0 and http_port > 0 and ws_port != http_port
        # Both listeners accept connections once the line is out.
        for port in (ws_port, http_port):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        node = as_node(data, proc, ready, token)
        assert node.admin("POST", "/v1/orgs", {"name": "o"}).status_code == 201
        assert node.admin("POST", "/v1/orgs", {"name": "o"}, token="nope").status_code == 401
        assert data.is_dir()
    finally:
        assert stop(proc) == 0

    # Every start prints the same token again, before the ready line; fixed ports are used.
    ws_port, http_port = free_port(), free_port()
    proc, lines = launch(data, log, "--ws-port", str(ws_port), "--http-port", str(http_port))
    try:
        assert lines == [
            token_line,
            f'{{"event": "ready", "ws": "ws://127.0.0.1:{ws_port}/v1/ws", '
            f'"http": "http://127.0.0.1:{http_port}"}}\n',
        ]
        node = as_node(data, proc, lines[1], token)
        assert node.admin("POST", "/v1/orgs", {"name": "o"}).status_code == 201
    finally:
        assert stop(proc) == 0

    # With GB6_ADMIN_TOKEN set, that token is the admin token and nothing is printed for it.
    env_token = "gb6-test-admin-token-from-the-environment"
    proc, lines = launch(data, log, "--ws-port", "0", "--http-port", "0", admin_token=env_token)
    try:
        assert len(lines) == 1 and READY.fullmatch(lines[0]), lines
        assert "admin_token" not in lines[0] and env_token not in lines[0]
        node = as_node(data, proc, lines[0], env_token)
        assert node.admin("POST", "/v1/orgs", {"name": "o"}).status_code == 201
        assert node.admin("POST", "/v1/orgs", {"name": "o"}, token=token).status_code == 401
    finally:
        assert stop(proc) == 0


def test_env_admin_token_on_a_fresh_data_dir(tmp_path: Path) -> None:
    env_token = "another-admin-token"
    node = Node(tmp_path / "data", env={"GB6_ADMIN_TOKEN": env_token})
    node.start()
    try:
        assert [line["event"] for line in node.lines] == ["ready"]
        assert node.admin("POST", "/v1/orgs", {"name": "o"}).status_code == 201
        assert node.admin("POST", "/v1/orgs", {"name": "o"}, token="x").status_code == 401
        tenant = node.create_tenant()
        assert tenant.user("u").token
    finally:
        assert node.terminate() == 0


# --- SIGTERM and restart --------------------------------------------------------------------


async def test_sigterm_drains_clients_and_restart_keeps_messages(tmp_path: Path) -> None:
    node = Node(tmp_path / "data")
    node.start()
    try:
        tenant = node.create_tenant()
        alice, bob = tenant.user("alice"), tenant.user("bob")
        open_peer = peers(node)
        async with open_peer(alice.token) as a, open_peer(bob.token) as b:
            room = (await a.ok("room.create", name="r", kind="chat", members=[bob.id]))["room"]
            rid = room["id"]
            await b.ok("subscribe", room=rid, after=0)
            await a.ok("send", room=rid, cid="first", body={"text": "before the storm"})
            await b.event("message")
            # Pipelined sends racing the drain: every one acknowledged must survive.
            for i in range(50):
                await a.send(
                    {"op": "send", "id": i, "room": rid, "cid": f"s{i}", "body": {"text": "s"}}
                )
            assert node.proc is not None
            node.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                code_a, frames_a = await closed_with(a)
                code_b, frames_b = await closed_with(b)
        for code, frames in ((code_a, frames_a), (code_b, frames_b)):
            assert code == 4009, (code, frames[-3:])
            events = [f for f in frames if f.get("op") == "event"]
            assert any(e["type"] == "reconnect" for e in events), frames[-3:]
        # Draining answers what was in flight: every pipelined send got exactly one reply,
        # an ok (durable) or `unavailable` (refused after the reconnect event, not stored).
        replies = [f for f in frames_a if f.get("op") in ("ok", "error")]
        assert sorted(f["re"] for f in replies) == list(range(50))
        assert all(f["op"] == "ok" or f["code"] == "unavailable" for f in replies), replies
        acked = {f"s{f['re']}": f["seq"] for f in frames_a if f.get("op") == "ok"}
        exit_code = await trio.to_thread.run_sync(node.proc.wait, 20)
        assert exit_code == 0, node.stderr()

        node.start()  # the same --data
        async with open_peer(alice.token) as a:  # tokens survive too
            history = (await a.ok("history", room=rid, limit=200))["messages"]
            by_cid = {m["cid"]: m for m in history}
            assert by_cid["first"]["body"] == {"text": "before the storm"}
            for cid, seq in acked.items():
                assert by_cid[cid]["seq"] == seq
            seqs = [m["seq"] for m in history]
            assert seqs == list(range(1, len(seqs) + 1))
            rooms = (await a.ok("rooms"))["rooms"]
            assert [(r["id"], r["head"]) for r in rooms] == [(rid, len(seqs))]
            ack = await a.ok("send", room=rid, cid="after", body={"text": "after restart"})
            assert ack["seq"] == len(seqs) + 1
    finally:
        node.kill()


async def test_sigterm_with_no_clients_exits_0(tmp_path: Path) -> None:
    node = Node(tmp_path / "data")
    node.start()
    start = time.monotonic()
    assert await trio.to_thread.run_sync(node.terminate) == 0
    assert time.monotonic() - start < 10


# --- one shared node: health, hello, heartbeats, admin bootstrap ----------------------------


def test_healthz(node: Node) -> None:
    r = httpx.get(node.http_url + "/healthz", timeout=10)  # no credentials needed
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_hello_reply(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory() as raw:
        await raw.send({"op": "hello", "id": 1, "token": alice.token})
        reply = await raw.recv()
        assert reply["op"] == "ok" and reply["re"] == 1
        assert reply["user"] == {"id": alice.id, "name": "alice"}
        assert isinstance(reply["session"], str) and reply["session"]
        assert reply["heartbeat_ms"] == HEARTBEAT_MS
    async with peer_factory() as raw:
        await raw.send({"op": "hello", "id": 1, "token": alice.token})
        assert (await raw.recv())["session"] != reply["session"]


async def test_heartbeat_keeps_alive_and_silence_closes(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        # Pinging at the advertised interval keeps the connection for several heartbeats.
        for _ in range(5):
            await trio.sleep(HEARTBEAT_MS / 2000)
            await a.ok("ping")
        silent_since = trio.current_time()
        with trio.fail_after(HEARTBEAT_MS * 2 / 1000 + 3):
            code, _ = await closed_with(a)
        waited = trio.current_time() - silent_since
        assert waited >= HEARTBEAT_MS * 2 / 1000 * 0.9, waited
        assert code == 1001


async def test_websocket_pings_count_as_heartbeats(tenant: Tenant, peer_factory: Any) -> None:
    alice = tenant.user("alice")
    async with peer_factory(alice.token) as a:
        for _ in range(5):
            await trio.sleep(HEARTBEAT_MS / 2000)
            await a.ws.ping()
        await a.ok("ping")


def test_admin_bootstrap(node: Node) -> None:
    org = node.admin("POST", "/v1/orgs", {"name": "acme"})
    assert org.status_code == 201, org.text
    org_id = org.json()["id"]
    assert isinstance(org_id, str) and org_id
    child = node.admin("POST", "/v1/orgs", {"name": "acme eu", "parent": org_id})
    assert child.status_code == 201, child.text
    assert isinstance(child.json()["id"], str) and child.json()["id"] != org_id

    inst = node.admin("POST", f"/v1/orgs/{org_id}/instances", {"name": "prod"})
    assert inst.status_code == 201, inst.text
    assert isinstance(inst.json()["id"], str)
    assert inst.json()["plan"] == "free"  # the default plan
    assert inst.json()["region"] == "local"  # the node's region
    for plan in ("free", "unlimited"):
        r = node.admin("POST", f"/v1/orgs/{org_id}/instances", {"name": plan, "plan": plan})
        assert r.status_code == 201 and r.json()["plan"] == plan, r.text
    r = node.admin("POST", f"/v1/orgs/{org_id}/instances", {"name": "x", "region": "local"})
    assert r.status_code == 201, r.text

    inst_id = inst.json()["id"]
    for role in ("owner", "admin", "member", "guest"):
        user = node.admin("POST", f"/v1/instances/{inst_id}/users", {"name": role, "role": role})
        assert user.status_code == 201, user.text
        assert isinstance(user.json()["id"], str)
    user_id = user.json()["id"]
    before = datetime.datetime.now(datetime.UTC)
    tok = node.admin("POST", f"/v1/instances/{inst_id}/users/{user_id}/tokens", {})
    assert tok.status_code == 201, tok.text
    assert isinstance(tok.json()["token"], str) and tok.json()["token"]
    expires = datetime.datetime.fromisoformat(tok.json()["expires_at"].replace("Z", "+00:00"))
    assert expires.tzinfo is not None and expires > before
    # An empty body counts as {}.
    empty = node.admin("POST", f"/v1/instances/{inst_id}/users/{user_id}/tokens")
    assert empty.status_code == 201, empty.text


def _refused_start(tmp_path: Path, *args: str) -> str:
    """Run `gb6 run` that must fail to start: exit 2, one `gb6: ...` line on stderr, no
    traceback, no ready line. Returns that line."""
    done = subprocess.run(
        [str(GB6), "run", "--data", str(tmp_path / "data"), "--ws-port", "0", *args],
        capture_output=True,
        timeout=60,
    )
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert "Traceback" not in err and b'"ready"' not in done.stdout, err
    return err.strip().splitlines()[-1]


def test_a_port_in_use_stops_the_start_with_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _refused_start(tmp_path, "--http-port", str(port))
        assert line == f"gb6: cannot listen for HTTP on 127.0.0.1:{port}: Address already in use"
        line = _refused_start(tmp_path, "--http-port", "0", "--ws-port", str(port))
        assert line == (
            f"gb6: cannot listen for WebSocket on 127.0.0.1:{port}: Address already in use"
        )


def test_a_dependency_down_at_start_stops_it_with_one_line(tmp_path: Path) -> None:
    """PostgreSQL not there (port 1 on loopback: refused at once)."""
    config = tmp_path / "gb6.toml"
    config.write_text('[store]\nbackend = "postgres"\npg_dsn = "postgresql://gb6@127.0.0.1:1/x"\n')
    line = _refused_start(tmp_path, "--http-port", "0", "--config", str(config))
    assert line.startswith("gb6: connecting to PostgreSQL failed"), line


def test_a_mistyped_config_key_stops_the_start_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "gb6.toml"
    config.write_text("[node]\nws_prot = 9000\n")
    line = _refused_start(tmp_path, "--http-port", "0", "--config", str(config))
    assert line == "gb6: config [node]: unknown key 'ws_prot'"


def test_a_data_directory_in_use_is_refused(tmp_path: Path) -> None:
    """Two processes on one `--data` would both write its stores, each with its own idea of
    every room's next seq: the second refuses to start."""
    node = Node(tmp_path / "data")
    node.start()
    try:
        line = _refused_start(tmp_path, "--http-port", "0")
        in_use = f"gb6: data directory {tmp_path / 'data'} is in use by another gb6 process"
        assert line.startswith(in_use), line
    finally:
        node.kill()
    node.start()  # killed outright, it held the directory no longer
    node.kill()


@pytest.mark.parametrize("stop", ["second signal", "drain bound"])
async def test_a_drain_that_does_not_end_is_cut_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: str
) -> None:
    """A drain that waits for good (an origin whose edges keep sending, a client that never
    takes its close) does not keep the process up: it is cut short after `DRAIN_S`, or at
    once when the operator asks again (a second SIGTERM, Ctrl-C twice)."""
    import io

    from node import supervisor
    from node.config import Config

    monkeypatch.setattr(supervisor, "DRAIN_S", 1.0 if stop == "drain bound" else 60.0)
    began = trio.Event()

    async def start(nursery: trio.Nursery) -> supervisor.Served:
        async def drain() -> None:
            began.set()
            await trio.sleep_forever()

        return supervisor.Served([], 1024, {"ws": "ws://127.0.0.1:1/v1/ws"}, drain)

    out = io.StringIO()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.serve, Config(data_dir=tmp_path, http_port=0), start, out)
        with trio.fail_after(10):
            while '"ready"' not in out.getvalue():  # noqa: ASYNC110
                await trio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(10):
            await began.wait()
        if stop == "second signal":
            await trio.sleep(0.2)
            os.kill(os.getpid(), signal.SIGTERM)
        with trio.fail_after(5):  # the drain bound is 1 s, the second signal at once
            while nursery.child_tasks:  # noqa: ASYNC110 - serve returns
                await trio.sleep(0.01)


@attrs.frozen
class _WaitingStart:
    """A `gb6 run` on PostgreSQL whose migrations wait for a lock the test holds."""

    node: Node
    port: int
    release: Callable[[], Awaitable[None]]

    def get(self, path: str, method: str = "GET") -> httpx.Response | None:
        body = b"x" * 100_000 if method == "POST" else None  # unread: it must not reset
        try:
            return httpx.request(
                method, f"http://127.0.0.1:{self.port}{path}", content=body, timeout=5
            )
        except httpx.TransportError:
            return None  # not bound yet

    async def answered(self, path: str, method: str = "GET") -> httpx.Response:
        got = await trio.to_thread.run_sync(self.get, path, method)
        assert got is not None
        return got


@asynccontextmanager
async def _start_waiting_on_migrations(tmp_path: Path) -> AsyncIterator[_WaitingStart]:
    """Spawned, and its HTTP port bound (it answers), inside; killed on exit."""
    import asyncpg  # type: ignore[import-untyped, unused-ignore]
    import trio_asyncio
    from trio_asyncio import aio_as_trio

    from tests.services import require

    dsn = require("postgres")
    schema = f"gb6_start_{os.urandom(6).hex()}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "gb6.toml"
    config.write_text(f'[store]\nbackend = "postgres"\npg_dsn = "{dsn}"\npg_schema = "{schema}"\n')
    n = Node(tmp_path / "data", extra_args=["--config", str(config), "--http-port", str(port)])
    async with trio_asyncio.open_loop():
        lock = await aio_as_trio(asyncpg.connect)(dsn, timeout=10)
        key = f"gb6.migrate.{schema}"
        advisory = "SELECT pg_advisory_{}(hashtextextended($1, 0))"

        async def release() -> None:
            await aio_as_trio(lock.execute)(advisory.format("unlock"), key)

        try:
            await aio_as_trio(lock.execute)(advisory.format("lock"), key)
            n.spawn()
            start = _WaitingStart(n, port, release)
            try:
                with trio.fail_after(20):
                    while await trio.to_thread.run_sync(start.get, "/healthz") is None:  # noqa: ASYNC110
                        await trio.sleep(0.1)
                yield start
            finally:
                n.kill()
                await aio_as_trio(lock.execute)(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await aio_as_trio(lock.close)()


async def test_the_http_port_says_starting_while_the_start_waits(tmp_path: Path) -> None:
    """A start that takes long (here the store's migrations wait for the lock another process
    holds; a Kafka log's recovery does too) answers on its HTTP port meanwhile: `/healthz`
    alive, `/readyz` not ready, the rest `unavailable` with Retry-After. Before, the port
    accepted and said nothing, so a liveness check timed out and the start was restarted."""
    async with _start_waiting_on_migrations(tmp_path) as start:
        alive = await start.answered("/healthz")
        assert (alive.status_code, alive.json()) == (200, {"status": "starting"})
        ready = await start.answered("/readyz")
        assert (ready.status_code, ready.json()) == (503, {"status": "starting"})
        assert (await start.answered("/healthz", "HEAD")).status_code == 200
        other = await start.answered("/v1/orgs", "POST")
        assert other.status_code == 503 and other.json()["error"]["code"] == "unavailable"
        assert int(other.headers["retry-after"]) >= 1
        assert not start.node.lines, "ready before the store was"
        # Not HTTP: closed unanswered, and the port goes on answering.
        with socket.create_connection(("127.0.0.1", start.port), timeout=5) as raw:
            raw.sendall(b"\x16\x03\x01 not http\r\n\r\n")
            assert raw.recv(100) == b""
        assert (await start.answered("/healthz")).status_code == 200
        await start.release()
        await trio.to_thread.run_sync(start.node.wait_ready)
        assert (await start.answered("/readyz")).status_code == 200
        assert (await start.answered("/healthz")).json() == {"status": "ok"}


async def test_a_signal_while_starting_stops_the_process(tmp_path: Path) -> None:
    """SIGTERM while the start waits (an orchestrator giving up on it): the process stops at
    once, exit 0, rather than at the end of a start that may never come."""
    async with _start_waiting_on_migrations(tmp_path) as start:
        proc = start.node.proc
        assert proc is not None
        proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(proc.wait, 10) == 0
        assert '"stopped_while_starting"' in start.node.stderr()
