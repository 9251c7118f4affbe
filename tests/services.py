"""Where the cluster services are, whether they answer, and `require(service)` for tests.

The services are started by `scripts/services up` (PostgreSQL, Redis, Kafka on loopback); its
`export` lines set the variables read here, whose defaults match what it starts:

    GB6_PG_DSN=postgresql://gb6:gb6@127.0.0.1:55432/gb6
    GB6_REDIS_URL=redis://127.0.0.1:56379/0
    GB6_KAFKA_BOOTSTRAP=127.0.0.1:59092

Each probe opens a TCP connection and speaks the service's own protocol (stdlib only, so the
script can use it too): PostgreSQL logs in (SCRAM or trust) and runs `SELECT 1`, Redis answers
PING, Kafka answers ApiVersions and a Metadata request that lists at least one broker.

A test calls `require("postgres")` (or "redis", "kafka"): it returns the connection setting, or
skips the test saying which service is missing, or fails it instead when GB6_REQUIRE_SERVICES=1.

TiKV is the exception: no TiKV server can be installed on these machines, so scripts/services
starts none and `require("tikv")` has no default. It returns GB6_TIKV_PD (`host:port` of a
placement driver of a running TiKV cluster) when that answers; when GB6_TIKV_PD is unset it skips,
even under GB6_REQUIRE_SERVICES=1 (which only makes a set but unreachable GB6_TIKV_PD fail).
Call it from a sync test or a sync fixture: inside a trio test the skip reaches pytest wrapped in an
exception group and loses its reason.

Command line (used by scripts/services): `python3 tests/services.py probe postgres redis kafka`
exits 0 when all answer, 1 otherwise, with one line per service.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import shutil
import socket
import struct
import sys
from pathlib import Path
from typing import NoReturn
from urllib.parse import unquote, urlsplit

SERVICES = ("postgres", "redis", "kafka")  # what scripts/services starts
OPTIONAL = ("tikv",)  # never started here; tested only when its variable names one

DEFAULTS = {
    "GB6_PG_DSN": "postgresql://gb6:gb6@127.0.0.1:55432/gb6",
    "GB6_REDIS_URL": "redis://127.0.0.1:56379/0",
    "GB6_KAFKA_BOOTSTRAP": "127.0.0.1:59092",
}
ENV_OF = {
    "postgres": "GB6_PG_DSN",
    "redis": "GB6_REDIS_URL",
    "kafka": "GB6_KAFKA_BOOTSTRAP",
    "tikv": "GB6_TIKV_PD",
}
NAMES = {"postgres": "PostgreSQL", "redis": "Redis", "kafka": "Kafka", "tikv": "TiKV"}
ALIASES = {"pg": "postgres", "postgresql": "postgres"}

TIMEOUT = 3.0


class Unavailable(Exception):
    """The service did not answer as it should; the message says how."""


def setting(service: str) -> str:
    """The connection setting of `service`: its env var, or the default of scripts/services."""
    var = ENV_OF[_canon(service)]
    return os.environ.get(var) or DEFAULTS.get(var, "")


def pg_dsn() -> str:
    return setting("postgres")


def redis_url() -> str:
    return setting("redis")


def kafka_bootstrap() -> str:
    return setting("kafka")


def _canon(service: str) -> str:
    service = ALIASES.get(service, service)
    if service not in ENV_OF:
        raise ValueError(f"unknown service {service!r}; one of {', '.join(ENV_OF)}")
    return service


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise Unavailable(f"no TCP connection to {host}:{port} ({e.strerror or e})") from None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except TimeoutError:
            raise Unavailable("timed out waiting for a reply") from None
        except OSError as e:
            raise Unavailable(f"connection failed: {e}") from None
        if not chunk:
            raise Unavailable("connection closed by the server")
        buf += chunk
    return bytes(buf)


# --- PostgreSQL: startup, SCRAM-SHA-256 (or trust/cleartext), SELECT 1 ----------------------


def _pg_msg(sock: socket.socket) -> tuple[bytes, bytes]:
    head = _recv_exact(sock, 5)
    kind, length = head[:1], struct.unpack("!i", head[1:])[0]
    return kind, _recv_exact(sock, length - 4)


def _pg_error(body: bytes) -> str:
    fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
    return fields.get(b"M", "error")


def _pg_send(sock: socket.socket, kind: bytes, body: bytes) -> None:
    sock.sendall(kind + struct.pack("!i", len(body) + 4) + body)


def probe_postgres(dsn: str | None = None, timeout: float = TIMEOUT) -> str:
    """Log in with the DSN's credentials and run SELECT 1; return the server version."""
    u = urlsplit(dsn or pg_dsn())
    host, port = u.hostname or "127.0.0.1", u.port or 5432
    user, password = unquote(u.username or "postgres"), unquote(u.password or "")
    database = unquote(u.path.lstrip("/")) or user
    with _connect(host, port, timeout) as sock:
        params = b"".join(
            k.encode() + b"\0" + v.encode() + b"\0"
            for k, v in (("user", user), ("database", database), ("application_name", "gb6-probe"))
        )
        body = struct.pack("!i", 196608) + params + b"\0"
        sock.sendall(struct.pack("!i", len(body) + 4) + body)
        version = "?"
        scram: dict[str, bytes] = {}
        while True:
            kind, body = _pg_msg(sock)
            if kind == b"E":
                raise Unavailable(_pg_error(body))
            if kind == b"R":
                code = struct.unpack("!i", body[:4])[0]
                if code == 0:  # AuthenticationOk
                    continue
                if code == 3:  # cleartext
                    _pg_send(sock, b"p", password.encode() + b"\0")
                elif code == 5:  # md5
                    salt = body[4:8]
                    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                    digest = b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
                    _pg_send(sock, b"p", digest + b"\0")
                elif code == 10:  # SASL: mechanisms
                    if b"SCRAM-SHA-256" not in body[4:].split(b"\0"):
                        raise Unavailable("server offers no SCRAM-SHA-256")
                    nonce = base64.b64encode(secrets.token_bytes(18))
                    scram["first_bare"] = b"n=,r=" + nonce
                    scram["nonce"] = nonce
                    first = b"n,," + scram["first_bare"]
                    _pg_send(
                        sock,
                        b"p",
                        b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first,
                    )
                elif code == 11:  # SASLContinue: server-first
                    server_first = body[4:]
                    attrs = dict(a.split(b"=", 1) for a in server_first.split(b","))
                    if not attrs[b"r"].startswith(scram["nonce"]):
                        raise Unavailable("SCRAM nonce mismatch")
                    salted = hashlib.pbkdf2_hmac(
                        "sha256", password.encode(), base64.b64decode(attrs[b"s"]), int(attrs[b"i"])
                    )
                    client_key = hmac.digest(salted, b"Client Key", "sha256")
                    stored_key = hashlib.sha256(client_key).digest()
                    without_proof = b"c=biws,r=" + attrs[b"r"]
                    auth_msg = scram["first_bare"] + b"," + server_first + b"," + without_proof
                    signature = hmac.digest(stored_key, auth_msg, "sha256")
                    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
                    _pg_send(sock, b"p", without_proof + b",p=" + base64.b64encode(proof))
                elif code == 12:  # SASLFinal
                    continue
                else:
                    raise Unavailable(f"unsupported authentication request {code}")
            elif kind == b"S":
                name, _, rest = body.partition(b"\0")
                if name == b"server_version":
                    version = rest.rstrip(b"\0").decode()
            elif kind == b"Z":
                break
        _pg_send(sock, b"Q", b"SELECT 1\0")
        rows = []
        while True:
            kind, body = _pg_msg(sock)
            if kind == b"E":
                raise Unavailable(_pg_error(body))
            if kind == b"D":
                rows.append(body)
            if kind == b"Z":
                break
        _pg_send(sock, b"X", b"")
        if len(rows) != 1:
            raise Unavailable("SELECT 1 returned no row")
        return f"PostgreSQL {version}"


# --- Redis: PING ------------------------------------------------------------------------------


def probe_redis(url: str | None = None, timeout: float = TIMEOUT) -> str:
    """PING (after AUTH when the URL has a password); return the server's reply."""
    u = urlsplit(url or redis_url())
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    with _connect(host, port, timeout) as sock:
        f = sock.makefile("rb")

        def call(*args: str) -> bytes:
            out = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
            sock.sendall(out.encode())
            try:
                line = f.readline()
            except OSError as e:
                raise Unavailable(f"connection failed: {e}") from None
            if not line:
                raise Unavailable("connection closed by the server")
            if line.startswith(b"-"):
                raise Unavailable(line[1:].strip().decode(errors="replace"))
            return line.strip()

        if u.password:
            call("AUTH", *([unquote(u.username)] if u.username else []), unquote(u.password))
        reply = call("PING")
        if reply != b"+PONG":
            raise Unavailable(f"PING answered {reply!r}")
        return "Redis PONG"


# --- Kafka: ApiVersions, then Metadata (v4..v8, non-flexible) ---------------------------------


def _kafka_call(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    client = b"gb6-probe"
    header = struct.pack("!hhih", api_key, version, corr, len(client)) + client
    msg = header + body
    sock.sendall(struct.pack("!i", len(msg)) + msg)
    size = struct.unpack("!i", _recv_exact(sock, 4))[0]
    resp = _recv_exact(sock, size)
    if struct.unpack("!i", resp[:4])[0] != corr:
        raise Unavailable("Kafka reply with the wrong correlation id")
    return resp[4:]


def probe_kafka(bootstrap: str | None = None, timeout: float = TIMEOUT) -> str:
    """ApiVersions, then a Metadata request; return the brokers it lists."""
    first = (bootstrap or kafka_bootstrap()).split(",")[0].strip()
    host, _, port = first.rpartition(":")
    with _connect(host.strip("[]") or "127.0.0.1", int(port or 9092), timeout) as sock:
        resp = _kafka_call(sock, 18, 0, 1, b"")  # ApiVersions v0
        err, n = struct.unpack("!hi", resp[:6])
        if err:
            raise Unavailable(f"ApiVersions error {err}")
        ranges = {}
        for i in range(n):
            key, lo, hi = struct.unpack("!hhh", resp[6 + 6 * i : 12 + 6 * i])
            ranges[key] = (lo, hi)
        if 3 not in ranges:
            raise Unavailable("broker offers no Metadata API")
        lo, hi = ranges[3]
        version = max(lo, 4)
        if version > min(hi, 8):
            raise Unavailable(f"no Metadata version in 4..8 (broker: {lo}..{hi})")
        body = struct.pack("!i?", 0, False)  # no topics, no auto-creation
        if version >= 8:
            body += b"\0\0"  # include cluster/topic authorized operations: false
        resp = _kafka_call(sock, 3, version, 2, body)
        pos = 4  # throttle_time_ms
        (n,) = struct.unpack_from("!i", resp, pos)
        pos += 4
        brokers = []
        for _ in range(n):
            node, hlen = struct.unpack_from("!ih", resp, pos)
            pos += 6
            bhost = resp[pos : pos + hlen].decode()
            pos += hlen
            (bport, rlen) = struct.unpack_from("!ih", resp, pos)
            pos += 6 + max(rlen, 0)
            brokers.append(f"{node}@{bhost}:{bport}")
        if not brokers:
            raise Unavailable("Metadata lists no broker yet")
        return f"Kafka brokers {','.join(brokers)}"


# --- TiKV: the placement driver's HTTP API (it shares the gRPC port) -------------------------


def probe_tikv(pd: str | None = None, timeout: float = TIMEOUT) -> str:
    """GET /pd/api/v1/version from the placement driver; return the version it reports."""
    first = (pd if pd is not None else setting("tikv")).split(",")[0].strip()
    if not first:
        raise Unavailable("GB6_TIKV_PD is not set")
    host, _, port = first.removeprefix("http://").rpartition(":")
    with _connect(host.strip("[]") or "127.0.0.1", int(port or 2379), timeout) as sock:
        sock.sendall(
            b"GET /pd/api/v1/version HTTP/1.1\r\nHost: "
            + first.encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        while len(reply) < 65536:
            try:
                chunk = sock.recv(4096)
            except OSError as e:
                raise Unavailable(f"connection failed: {e}") from None
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise Unavailable(f"placement driver answered {status.decode(errors='replace')!r}")
    return f"TiKV PD {body.strip().decode(errors='replace')[:80]}"


PROBES = {
    "postgres": probe_postgres,
    "redis": probe_redis,
    "kafka": probe_kafka,
    "tikv": probe_tikv,
}


def check(service: str, timeout: float = TIMEOUT) -> tuple[bool, str]:
    """(True, what answered) or (False, why not) for `service` at its configured address."""
    service = _canon(service)
    try:
        return True, PROBES[service](setting(service), timeout)
    except Unavailable as e:
        return False, str(e)
    except (OSError, ValueError, struct.error, KeyError) as e:
        return False, f"unexpected reply: {type(e).__name__}: {e}"


_checked: dict[str, tuple[bool, str]] = {}


def require(service: str) -> str:
    """Skip the calling test unless `service` answers (fail instead under GB6_REQUIRE_SERVICES=1).

    Returns the service's connection setting (DSN, URL or bootstrap servers). A service that
    answered once in this process is not probed again; one that did not is probed each time.
    """
    service = _canon(service)
    if service == "tikv" and not setting(service):
        # Not even GB6_REQUIRE_SERVICES=1 makes this a failure: there is nothing to start.
        import pytest

        pytest.skip(
            "TiKV: GB6_TIKV_PD is not set; no TiKV server can be installed on these machines, "
            "so the TiKV tests run only when GB6_TIKV_PD=host:port names a placement driver"
        )
    ok, why = _checked.get(service) or check(service)
    if ok:
        _checked[service] = (ok, why)
        return setting(service)
    hint = (
        "check GB6_TIKV_PD"
        if service in OPTIONAL
        else "run scripts/services up (and export the settings it prints)"
    )
    missing(f"{NAMES[service]} not reachable at {setting(service)} ({why}); {hint}")


def missing(reason: str) -> NoReturn:
    """Skip the calling test for `reason`, or fail it under GB6_REQUIRE_SERVICES=1."""
    import pytest

    if os.environ.get("GB6_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} [GB6_REQUIRE_SERVICES=1]", pytrace=False)
    pytest.skip(reason)


# Local tools (installed by scripts/tools up): name -> (environment variable, default path).
TOOLS = {
    "chromium": ("GB6_CHROMIUM", "/usr/bin/chromium"),
    "ffprobe": ("GB6_FFPROBE", "/usr/bin/ffprobe"),
    "playwright": (
        "GB6_PLAYWRIGHT_DIR",
        str(Path(__file__).resolve().parent / "browser"),
    ),
}


def require_tool(tool: str) -> str:
    """Skip the calling test unless `tool` is installed (fail under GB6_REQUIRE_SERVICES=1).

    Returns its path: the executable for chromium and ffprobe; for playwright, the directory
    whose node_modules holds playwright-core (run node scripts there).
    """
    env, default = TOOLS[tool]
    path = os.environ.get(env) or default
    found = (
        (Path(path) / "node_modules" / "playwright-core").is_dir()
        if tool == "playwright"
        else os.access(path, os.X_OK)
    )
    if not found:
        missing(f"{tool} not found at {path}; run scripts/tools up (and export what it prints)")
    if tool == "playwright" and shutil.which("node") is None:
        missing("node not found; Node.js 20 runs the Playwright scripts")
    return path


def require_netns() -> str:
    """Skip the calling test unless it may make network namespaces (root, iproute2's `ip`), or
    fail under GB6_REQUIRE_SERVICES=1. Returns the path of `ip`."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    if not os.access(ip, os.X_OK):
        missing("iproute2's ip not found; a network namespace needs it")
    if os.geteuid() != 0:
        missing("making a network namespace needs root")
    return ip


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] != "probe":
        print("usage: services.py probe [postgres|redis|kafka ...]", file=sys.stderr)
        return 2
    bad = 0
    for name in argv[1:] or SERVICES:
        ok, why = check(name)
        print(f"{_canon(name)}: {'up' if ok else 'down'} {setting(name)} ({why})")
        bad += not ok
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
