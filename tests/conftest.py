"""Fixtures that run the real node: `gb6 run` as a subprocess, spoken to over sockets."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from services import missing, require, require_netns
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
    wrap_client_stream,
)

ROOT = Path(__file__).resolve().parent.parent
GB6 = Path(sys.executable).parent / "gb6"


@attrs.define
class Node:
    """A `gb6 run` (or `gb6 origin`, `gb6 edge`) subprocess on its own data directory."""

    data_dir: Path
    extra_args: list[str] = attrs.Factory(list)
    command: str = "run"
    link: str = ""  # an origin's link address; kept on restart, so edges find it again
    env: dict[str, str] = attrs.Factory(dict)
    proc: subprocess.Popen[bytes] | None = None
    ws_url: str = ""
    http_url: str = ""
    admin_token: str = ""
    lines: list[dict[str, Any]] = attrs.Factory(list)
    stderr_path: Path | None = None
    _reader: threading.Thread | None = attrs.field(default=None, init=False)
    _ready: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)

    def start(self, timeout: float = 20.0) -> None:
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting: several nodes then start side by side, and
        `wait_ready` waits for each (a start is mostly the interpreter's imports)."""
        env = {**os.environ, **self.env}
        env.pop("GB6_ADMIN_TOKEN", None) if "GB6_ADMIN_TOKEN" not in self.env else None
        self.stderr_path = self.data_dir.parent / f"{self.data_dir.name}.stderr.log"
        stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - the child owns it
        if self.command == "run":
            args = ["--data", str(self.data_dir), "--ws-port", "0", "--http-port", "0"]
        elif self.command == "origin":
            port = self.link.rpartition(":")[2] or "0"
            args = ["--data", str(self.data_dir), "--link-port", port, "--http-port", "0"]
        else:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            args = ["--ws-port", "0", "--http-port", "0"]
        self.proc = subprocess.Popen(
            [str(GB6), self.command, *args, *self.extra_args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
        stderr.close()
        self.lines = []
        self._ready = {}
        self._reader = threading.Thread(target=self._read_until_ready, daemon=True)
        self._reader.start()

    def _read_until_ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = json.loads(raw)
            self.lines.append(line)
            if line.get("event") == "ready":
                self._ready["ready"] = line
                return

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self._reader is not None
        self._reader.join(timeout)
        if "ready" not in self._ready:
            self.kill()
            raise RuntimeError(f"gb6 did not get ready; stderr: {self.stderr()}")
        ready = self._ready["ready"]
        self.ws_url = ready.get("ws", "")
        self.link = ready.get("link", "")
        self.http_url = ready["http"]
        for line in self.lines:
            if line.get("event") == "admin_token":
                self.admin_token = line["token"]
        if "GB6_ADMIN_TOKEN" in self.env:
            self.admin_token = self.env["GB6_ADMIN_TOKEN"]

    def stderr(self) -> str:
        return self.stderr_path.read_text()[-4000:] if self.stderr_path else ""

    def kill(self) -> None:
        """SIGKILL: nothing flushed, nothing drained."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM: drain; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def restart(self) -> None:
        self.kill()
        self.start()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # --- admin bootstrap over HTTP --------------------------------------------------------

    def admin(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token if token is not None else self.admin_token}"}
        return httpx.request(method, self.http_url + path, json=body, headers=headers, timeout=10)

    def create_tenant(self, plan: str = "unlimited") -> Tenant:
        org = self.admin("POST", "/v1/orgs", {"name": "org"})
        assert org.status_code == 201, org.text
        inst = self.admin(
            "POST", f"/v1/orgs/{org.json()['id']}/instances", {"name": "i", "plan": plan}
        )
        assert inst.status_code == 201, inst.text
        return Tenant(self, org.json()["id"], inst.json()["id"])


@attrs.define
class User:
    id: str
    name: str
    token: str


@attrs.define
class Tenant:
    node: Node
    org: str
    instance: str

    def user(self, name: str = "u", role: str = "member", ttl_seconds: int | None = None) -> User:
        r = self.node.admin(
            "POST", f"/v1/instances/{self.instance}/users", {"name": name, "role": role}
        )
        assert r.status_code == 201, r.text
        uid = r.json()["id"]
        body = {} if ttl_seconds is None else {"ttl_seconds": ttl_seconds}
        t = self.node.admin("POST", f"/v1/instances/{self.instance}/users/{uid}/tokens", body)
        assert t.status_code == 201, t.text
        return User(uid, name, t.json()["token"])


ERROR_KEYS = {"op", "re", "code", "message", "retry_after_ms"}
HIDDEN = ("forbidden", "not_found")


def start_side_by_side(nodes: list[Node], timeout: float = 20.0) -> None:
    """Start nodes that do not need each other's addresses at once; each waited for."""
    for n in nodes:
        n.spawn()
    try:
        for n in nodes:
            n.wait_ready(timeout)
    except BaseException:
        for n in nodes:
            n.kill()
        raise


@contextmanager
def running_node(base: Path, config: str | None = None) -> Iterator[Node]:
    """A node on `base/data`, with `config` (TOML text) if given; killed on exit."""
    args = []
    if config is not None:
        path = base / "gb6.toml"
        path.write_text(config)
        args = ["--config", str(path)]
    n = Node(base / "data", extra_args=args)
    n.start()
    try:
        yield n
    finally:
        n.kill()


def module_node(name: str, config: str | None = None) -> Any:
    """A module-scoped `node` fixture: one node per test module (tests make their own tenants)."""

    @pytest.fixture(scope="module")
    def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
        with running_node(Path(tmp_path_factory.mktemp(name)), config) as n:
            yield n

    return node


async def refused(peer: Peer, op: str, codes: tuple[str, ...], **fields: Any) -> dict[str, Any]:
    """Send a request that must fail with one of `codes` and carry no data."""
    reply = await peer.request(op, **fields)
    assert reply["op"] == "error", reply
    assert reply["code"] in codes, reply
    assert set(reply) <= ERROR_KEYS, reply
    return reply


async def make_room(peer: Peer, members: list[str], **extra: Any) -> str:
    reply = await peer.ok("room.create", name="r", kind="chat", members=members, **extra)
    return str(reply["room"]["id"])


# The longest test that counts "today's" or "this month's" usage takes well under this.
_DAY_END_MARGIN_S = 90.0


@pytest.fixture
def within_one_utc_day() -> None:
    """Waits out a UTC day's last `_DAY_END_MARGIN_S`: a test that sends, then reads the usage of
    "today" or "this month", must do both in one day (and so one month) to assert anything."""
    left = 86_400 - time.time() % 86_400
    if left < _DAY_END_MARGIN_S:
        time.sleep(left + 0.5)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "data")
    n.start()
    try:
        yield n
    finally:
        n.kill()
        if os.environ.get("GB6_KEEP_DATA") is None:
            shutil.rmtree(tmp_path / "data", ignore_errors=True)


@pytest.fixture
def tenant(node: Node) -> Tenant:
    return node.create_tenant()


class Peer:
    """A raw protocol client for tests: JSON frames in, JSON frames out, nothing hidden."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._next = 0
        self.events: list[dict[str, Any]] = []
        self.timeout = 5.0  # how long any one wait for a frame may take

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(self.timeout):
            return json.loads(await self.ws.get_message())  # type: ignore[no-any-return]

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a request; return its reply. Events that arrive meanwhile go to `events`."""
        self._next += 1
        rid = f"r{self._next}"
        await self.send({"op": op, "id": rid, **fields})
        while True:
            frame = await self.recv()
            if frame.get("op") == "event":
                self.events.append(frame)
            elif frame.get("re") == rid:
                return frame

    async def ok(self, op: str, **fields: Any) -> dict[str, Any]:
        reply = await self.request(op, **fields)
        assert reply["op"] == "ok", reply
        return reply

    async def event(self, type_: str | None = None) -> dict[str, Any]:
        """The next event (of `type_`), from those already received first."""
        for i, ev in enumerate(self.events):
            if type_ is None or ev.get("type") == type_:
                return self.events.pop(i)
        while True:
            frame = await self.recv()
            if frame.get("op") == "event" and (type_ is None or frame.get("type") == type_):
                return frame
            if frame.get("op") == "event":
                self.events.append(frame)


async def connect(node: Node, token: str | None = None) -> AsyncIterator[Peer]:
    async with open_websocket_url(node.ws_url, max_message_size=8 << 20) as ws:
        peer = Peer(ws)
        if token is not None:
            await peer.ok("hello", token=token)
        yield peer


async def close_code(peer: Peer, wait_s: float = 5.0) -> tuple[int, list[dict[str, Any]]]:
    """Read until the server closes; the close code and the frames that came before it."""
    frames: list[dict[str, Any]] = []
    with trio.fail_after(wait_s):
        try:
            while True:
                frames.append(json.loads(await peer.ws.get_message()))
        except ConnectionClosed as exc:
            return exc.reason.code, frames


@asynccontextmanager
async def connect_from(node: Node, address: str) -> AsyncIterator[Peer]:
    """A raw client whose connection comes from `address` (any of 127.0.0.0/8 is this host:
    a per-address limit of the server's sees another client)."""
    port = int(node.ws_url.rsplit(":", 1)[1].split("/")[0])
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=address)
    async with trio.open_nursery() as nursery:
        ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/v1/ws")
        try:
            yield Peer(ws)
        finally:
            await ws.aclose()


@pytest.fixture
def peer_factory(node: Node) -> Any:
    """`async with peer_factory(token) as peer:` — a hello'd raw client."""

    return asynccontextmanager(lambda token=None: connect(node, token))


class Netns:
    """A network namespace of one test's own, joined to this host by a veth pair on a /30 of
    10.251.0.0/16: a server run in it (`command`) is reached at `inner`. The test can cut the
    link (packets dropped: no FIN, no RST, as from a host lost to the network) and tear the
    namespace down with its TCP state, then make it again at the same address."""

    def __init__(self) -> None:
        self.ip = require_netns()
        block = (10 << 24) | (251 << 16) | secrets.randbelow(1 << 14) * 4
        self.outer = str(ipaddress.IPv4Address(block + 1))
        self.inner = str(ipaddress.IPv4Address(block + 2))
        self.name = ""
        self.host_if = ""

    def _ip(self, *args: str) -> None:
        subprocess.run([self.ip, *args], check=True, capture_output=True, timeout=10)

    def create(self) -> None:
        tag = secrets.token_hex(3)  # interface names: at most 15 characters
        self.name, self.host_if, inner_if = f"gb6t-{tag}", f"gb6h{tag}", f"gb6n{tag}"
        try:
            self._ip("netns", "add", self.name)
            self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", inner_if)
            self._ip("link", "set", inner_if, "netns", self.name)
            self._ip("addr", "add", f"{self.outer}/30", "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            inside = ("netns", "exec", self.name, self.ip)
            self._ip(*inside, "addr", "add", f"{self.inner}/30", "dev", inner_if)
            self._ip(*inside, "link", "set", inner_if, "up")
            self._ip(*inside, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            self.delete()
            raise RuntimeError(f"{exc.cmd}: {exc.stderr.decode(errors='replace')}") from exc

    def command(self, args: list[str]) -> list[str]:
        """`args` run inside the namespace."""
        return [self.ip, "netns", "exec", self.name, *args]

    def cut(self) -> None:
        self._ip("link", "set", self.host_if, "down")

    def delete(self) -> None:
        """Remove the link and the namespace (its processes must have exited), so that it can
        be made again at the same address."""
        if not self.name:
            return
        # Both ends at once; the namespace's own teardown would drop them only later.
        subprocess.run([self.ip, "link", "del", self.host_if], capture_output=True, timeout=10)
        gone = subprocess.run([self.ip, "netns", "del", self.name], capture_output=True, timeout=10)
        assert gone.returncode == 0, f"namespace {self.name} not deleted: {gone.stderr!r}"
        self.name = ""


@pytest.fixture
def netns() -> Iterator[Netns]:
    made = Netns()
    try:
        made.create()
        yield made
    finally:
        made.delete()


class OwnRedis:
    """A Redis server of one test's own (real, on loopback), which it may stop, start again
    on the same port, or freeze."""

    def __init__(self, data: Path, netns: Netns | None = None) -> None:
        require("redis")  # the project's services installed it
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.data = data
        self.netns = netns  # run in that namespace, on its address, instead of on loopback
        if netns is not None:
            self.host, self.port = netns.inner, 6379  # the namespace's ports are all free
        else:
            self.host = "127.0.0.1"
            with socket.socket() as probe:
                probe.bind((self.host, 0))
                self.port = probe.getsockname()[1]
        self.url = f"redis://{self.host}:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no"]
        command = [self.binary, *args]
        if self.netns is not None:  # reached from this host, not loopback: no protected mode
            command = self.netns.command([*command, "--protected-mode", "no"])
        self.proc = subprocess.Popen(command, cwd=self.data, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    redis = OwnRedis(tmp_path)
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


def listening_pid(address: str) -> int | None:
    """The pid of the process on this machine listening on TCP `address` (host:port), if this
    user may see it (root sees all)."""
    import psutil

    port = int(address.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


def broker_pid(bootstrap: str) -> int:
    """The pid of the Kafka broker at `bootstrap`, which runs on this machine."""
    pid = listening_pid(bootstrap)
    assert pid is not None, f"no process of this machine listens on {bootstrap}"
    return pid


def _services_state() -> Path:
    """Where `scripts/services` keeps its servers (its own default)."""
    return Path(os.environ.get("GB6_SERVICES_DIR", "/var/tmp/gb6-services"))


def _restartable(address: str, mark: str, what: str) -> int:
    """The pid listening on `address` if its command line holds `mark` (so `scripts/services`
    runs it here and may start it again); else skip the test (fail under
    GB6_REQUIRE_SERVICES=1)."""
    import psutil

    if os.geteuid() != 0:
        missing(f"restarting {what} needs root, as scripts/services does")
    pid = listening_pid(address)
    if pid is None or mark not in psutil.Process(pid).cmdline():
        missing(f"{what} at {address} is not the one scripts/services runs here ({mark})")
    return pid


def restartable_broker(bootstrap: str) -> int:
    """The pid of the Kafka broker at `bootstrap` if it is the one `scripts/services` runs here,
    which a test may kill and start again (`restart_service("kafka")`); else skip the test (or
    fail it under GB6_REQUIRE_SERVICES=1)."""
    conf = str(_services_state() / "kafka" / "server.properties")
    return _restartable(bootstrap, conf, "the Kafka broker")


def restartable_postgres(dsn: str) -> int:
    """The postmaster's pid of the PostgreSQL server at `dsn` if it is the one `scripts/services`
    runs here, which a test may crash (SIGQUIT: an immediate shutdown, recovered from the WAL at
    the next start) and start again (`restart_service("postgres")`); else skip the test (or
    fail it under GB6_REQUIRE_SERVICES=1)."""
    data = str(_services_state() / "postgres" / "data")
    return _restartable(_pg_address(dsn), data, "PostgreSQL")


def restart_service(name: str) -> None:
    """Start a service of `scripts/services` (`up NAME`: quick when it is up; the broker takes
    ~15 s after a kill, its logs recovered)."""
    subprocess.run(
        [str(ROOT / "scripts" / "services"), "up", name],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=180,
    )


def postgres_pids(dsn: str) -> list[int]:
    """The PostgreSQL server at `dsn` (on this machine): its postmaster and every process it
    started (backends, checkpointer, WAL writer, ...)."""
    import psutil

    address = _pg_address(dsn)
    pid = listening_pid(address)
    assert pid is not None, f"no process of this machine serves {address}"
    return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]


def _pg_address(dsn: str) -> str:
    """host:port of the PostgreSQL server at `dsn`."""
    from urllib.parse import urlsplit

    where = urlsplit(dsn)
    return f"{where.hostname}:{where.port or 5432}"


@contextmanager
def frozen(*pids: int) -> Iterator[None]:
    """The processes `pids` stopped (SIGSTOP: their sockets stay open and answer nothing) for
    the block, and continued after it, whatever happens."""
    stopped: list[int] = []
    try:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:  # a short-lived child (a worker) gone meanwhile
                continue
            stopped.append(pid)
        yield
    finally:
        for pid in stopped:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def wait_uncommitted(bootstrap: str, topic: str, room_id: str, seq: int) -> None:
    """Return once the broker holds `room_id`'s record of `seq`, committed or not (blocking)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from origin.kafka_log import SEQ_HEADER, decode_seq

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "gb6-test-uncommitted",  # assign only: never joined
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        parts = consumer.list_topics(topic, 10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = consumer.poll(0.05)
            if msg is None or msg.error() is not None or msg.key() != room_id.encode():
                continue
            if decode_seq(dict(msg.headers() or [])[SEQ_HEADER]) == seq:
                return
        raise AssertionError(f"seq {seq} of {room_id} did not reach the broker")
    finally:
        consumer.close()
