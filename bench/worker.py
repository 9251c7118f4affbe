"""One load-generator process: many raw WebSocket connections on one epoll loop.

Why not trio here: a trio task wake-up costs several microseconds more than a bare `epoll` event,
and this process must count tens of thousands of frames per second on a machine whose other core
runs the server. The loop below does one `recv` per readable socket, walks frame headers only,
and counts or extracts what it needs with C-speed byte searches over all complete frames of the
chunk at once: nothing is JSON-decoded after the `hello`/`subscribe` replies.

Latency: each `send` carries its own send time (`time.time_ns()`) as its request id, its `cid`
and its body's `t`. The sender's `ok` echoes the id (`re`) → send→ack; every delivered `message`
event carries `"t":<ns>` in its body → send→deliver, extracted on the sampled connections only.
Both clocks are the same machine's wall clock. The sampled connections also read the kernel's
receive time (`SO_TIMESTAMPNS`) → send→socket: when the delivery reached the client's socket,
which this process's own wait for a CPU does not move (for TCP the kernel gives the newest
segment's time of those a read returns: frames that came earlier are stamped late, never early).

The parent talks to the worker over a `multiprocessing` pipe (registered in the same epoll):
  worker → ("connecting", ready, failed) …, ("ready", summary)
  parent → ("go", t0_ns, duration_s, warmup_s)    worker → ("progress", counters) …, ("result", r)
  parent → ("stop",)
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import resource
import select
import socket
import struct
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.ws import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    check_handshake,
    close_frame,
    frame,
    handshake_request,
    next_frame,
    parse_ws_url,
)

RE_ACK = re.compile(rb'"op":"ok","re":(\d{15,})')
RE_ERR_SEND = re.compile(rb'"op":"error","re":(\d{15,})')
RE_T = re.compile(rb'"t":(\d+)[,}]')
MSG_EVENT = b'"type":"message"'
ERR_OP = b'"op":"error"'

# connection states
CONNECTING, HANDSHAKE, HELLO, SUBSCRIBE, READY, CLOSED = range(6)

# Not more: CPython allocates the full size for each recv(), and above glibc's mmap threshold
# (128 KiB) every call maps and unmaps fresh pages: a 256 KiB recv costs ~4x a 64 KiB one.
RECV_BYTES = 1 << 16
IN = select.EPOLLIN | select.EPOLLRDHUP
# Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS), which Python's socket module does not name.
SO_TIMESTAMPNS = 35
_STAMP = struct.Struct("@qq")  # struct timespec
_ANC_BYTES = socket.CMSG_SPACE(_STAMP.size)
OUT = select.EPOLLOUT


@dataclass
class ClientSpec:
    token: str
    room: str | None  # subscribe to this room (None: hello only)
    sender: bool = False  # sends messages during the run
    sampled: bool = False  # extracts send→deliver latency from its deliveries
    ws_url: str = ""  # connect here instead of the worker's ws_url (cluster: one of the edges)


@dataclass
class WorkerConfig:
    index: int
    ws_url: str
    clients: list[ClientSpec]
    rate: float = 0.0  # sends/s for this worker's senders together; 0 = closed loop (window)
    window: int = 8  # closed loop: unacknowledged sends per sender
    text: str = "bench"
    connect_concurrency: int = 200
    connect_timeout_s: float = 120.0
    drain_s: float = 5.0  # after the run, wait at most this long for acks and deliveries
    progress_s: float = 2.0
    ping_fraction: float = 0.5  # ping every connection each heartbeat_ms * this
    read_interval_s: float = 0.0  # poll at most this often: fewer, larger reads (adds latency)
    nofile: int = 0


@dataclass
class Conn:
    index: int
    spec: ClientSpec
    sock: socket.socket
    fd: int
    state: int = CONNECTING
    rbuf: bytes = b""
    wbuf: bytearray = field(default_factory=bytearray)
    accept: bytes = b""
    fmt: bytes = b""
    last_id: int = 0
    outstanding: int = 0
    heartbeat_ms: int = 30_000
    writing: bool = False
    stamped: bool = False  # reads carry the kernel's receive time


class Stats:
    def __init__(self) -> None:
        self.t0 = 0  # ns; 0 until "go"
        self.sent = 0
        self.acked = 0
        self.send_errors = 0
        self.errors = 0
        self.delivered = 0
        self.delivered_before = 0  # before t0 (catch-up, stray)
        self.sent_by_room: Counter[str] = Counter()
        self.per_sec_deliveries = array("q")
        self.per_sec_acks = array("q")
        self.per_sec_sends = array("q")
        self.ack_lat = array("q")  # µs
        self.ack_at = array("q")  # send time, ms after t0
        self.dl_lat = array("q")  # µs
        self.dl_at = array("q")  # send time, ms after t0
        self.dl_rx_lat = array("q")  # µs to the kernel's receive time, aligned with dl_at
        self.send_lag = array("q")  # µs behind schedule (open loop)
        self.send_lag_at = array("q")  # scheduled send time, ms after t0
        self.error_samples: list[str] = []
        self.close_codes: Counter[str] = Counter()
        self.closed = 0
        self.recvs = 0
        self.frames = 0

    def bump(self, arr: array[int], now: int, n: int) -> None:
        sec = (now - self.t0) // 1_000_000_000
        if sec < 0:
            return
        while len(arr) <= sec:
            arr.append(0)
        arr[sec] += n


class Worker:
    def __init__(self, cfg: WorkerConfig, pipe: Connection) -> None:
        self.cfg = cfg
        self.pipe = pipe
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.all: list[Conn] = []
        self.pending = list(range(len(cfg.clients)))[::-1]  # not yet started, popped from end
        self.in_flight = 0
        self.ready = 0
        self.failed = 0
        self.connect_errors: list[str] = []
        self.stats = Stats()
        self.running = False
        self.senders: list[Conn] = []
        self.rr = 0
        host, port, path = parse_ws_url(cfg.ws_url)
        self.addr = (host, port)
        self.path = path
        self.hreq: tuple[str, int, str] = (host, port, path)
        self.targets: dict[str, tuple[str, int, str]] = {"": self.hreq}
        self.text = json.dumps(cfg.text)[1:-1].encode()
        self.ping_frame = frame(b'{"op":"ping","id":"p"}')
        self.pings = 0
        self.sched_t0 = self.sched_end = self.scheduled = 0
        self.interval = 0.0
        self.last_poll = 0.0

    # --- plumbing -----------------------------------------------------------------------------

    def write(self, c: Conn, data: bytes) -> None:
        if c.state == CLOSED:
            return
        if c.wbuf:
            c.wbuf += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.close(c, f"send: {exc}")
            return
        if n < len(data):
            c.wbuf += data[n:]
            if not c.writing:
                c.writing = True
                self.ep.modify(c.fd, IN | OUT)

    def flush(self, c: Conn) -> None:
        if c.state == CONNECTING:
            self.on_connected(c)
            return
        try:
            n = c.sock.send(c.wbuf)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(c, f"send: {exc}")
            return
        del c.wbuf[:n]
        if not c.wbuf and c.writing:
            c.writing = False
            self.ep.modify(c.fd, IN)

    def close(self, c: Conn, reason: str) -> None:
        if c.state == CLOSED:
            return
        was = c.state
        c.state = CLOSED
        with contextlib.suppress(OSError):
            self.ep.unregister(c.fd)
        c.sock.close()
        self.conns.pop(c.fd, None)
        if was < READY:
            self.in_flight -= 1
            self.failed += 1
            if len(self.connect_errors) < 10:
                self.connect_errors.append(reason)
        else:
            self.ready -= 1
            self.stats.closed += 1
            self.stats.close_codes[reason] += 1

    # --- connecting ---------------------------------------------------------------------------

    def start_connects(self) -> None:
        while self.pending and self.in_flight < self.cfg.connect_concurrency:
            i = self.pending.pop()
            spec = self.cfg.clients[i]
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(i, spec, sock, sock.fileno())
            self.all.append(c)
            self.in_flight += 1
            err = sock.connect_ex(self.target(spec)[:2])
            self.conns[c.fd] = c
            self.ep.register(c.fd, OUT)
            c.writing = True
            if err not in (0, errno.EINPROGRESS):
                self.close(c, f"connect: {errno.errorcode.get(err, err)}")

    def target(self, spec: ClientSpec) -> tuple[str, int, str]:
        """(host, port, path) of the client's endpoint, parsed once per URL."""
        t = self.targets.get(spec.ws_url)
        if t is None:
            t = self.targets[spec.ws_url] = parse_ws_url(spec.ws_url)
        return t

    def on_connected(self, c: Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.close(c, f"connect: {errno.errorcode.get(err, err)}")
            return
        c.writing = False
        self.ep.modify(c.fd, IN)
        c.state = HANDSHAKE
        req, c.accept = handshake_request(*self.target(c.spec))
        self.write(c, req)

    def on_setup_data(self, c: Conn, buf: bytes) -> bytes:
        """Handshake and the hello/subscribe replies; returns what follows them."""
        if c.state == HANDSHAKE:
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if not sep:
                return buf
            try:
                check_handshake(head, c.accept)
            except ConnectionError as exc:
                self.close(c, str(exc))
                return b""
            c.state = HELLO
            hello = b'{"op":"hello","id":1,"token":%s}' % json.dumps(c.spec.token).encode()
            self.write(c, frame(hello))
            buf = rest
        pos = 0
        while c.state in (HELLO, SUBSCRIBE):
            got = next_frame(buf, pos)
            if got is None:
                return buf[pos:]
            opcode, start, end, _fin = got
            pos = end
            if opcode != 1:
                self.on_control(c, opcode, buf[start:end])
                if c.state == CLOSED:
                    return b""
                continue
            msg = json.loads(buf[start:end])
            if msg.get("op") == "error" and msg.get("re") in (1, 2):
                self.close(c, f"{msg.get('code')}: {msg.get('message')}")
                return b""
            if msg.get("op") != "ok":
                continue
            if c.state == HELLO and msg.get("re") == 1:
                c.heartbeat_ms = int(msg.get("heartbeat_ms") or 30_000)
                if c.spec.room is None:
                    self.on_ready(c)
                else:
                    c.state = SUBSCRIBE
                    sub = (
                        b'{"op":"subscribe","id":2,"room":%s,"after":0}'
                        % json.dumps(c.spec.room).encode()
                    )
                    self.write(c, frame(sub))
            elif c.state == SUBSCRIBE and msg.get("re") == 2:
                self.on_ready(c)
        return buf[pos:]

    def on_ready(self, c: Conn) -> None:
        c.state = READY
        self.in_flight -= 1
        self.ready += 1
        if c.spec.room is not None:
            c.fmt = (
                b'{"op":"send","id":%d,"room":'
                + json.dumps(c.spec.room).encode()
                + b',"cid":"%d","body":{"text":"'
                + self.text
                + b'","t":%d}}'
            )
        if c.spec.sender:
            self.senders.append(c)
        if c.spec.sampled:
            with contextlib.suppress(OSError):
                c.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                c.stamped = True

    # --- receiving ----------------------------------------------------------------------------

    def on_control(self, c: Conn, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.write(c, frame(payload, OP_PONG))
        elif opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            with contextlib.suppress(OSError):
                c.sock.send(close_frame(code if code < 5000 else 1000))
            self.close(c, f"close {code}")

    def on_readable(self, c: Conn, now: int) -> None:
        rx_at = now
        try:
            if c.stamped:
                data, anc, _flags, _addr = c.sock.recvmsg(RECV_BYTES, _ANC_BYTES)
                for level, kind, cdata in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = _STAMP.unpack_from(cdata)
                        rx_at = min(now, sec * 1_000_000_000 + nsec)
            else:
                data = c.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(c, f"recv: {exc}")
            return
        if not data:
            self.close(c, "eof")
            return
        st = self.stats
        st.recvs += 1
        buf = c.rbuf + data if c.rbuf else data
        if c.state < READY:
            buf = self.on_setup_data(c, buf)
            if c.state != READY:
                c.rbuf = buf
                return
        # Walk frame headers to the end of the last complete frame.
        n = len(buf)
        pos = 0
        frames = 0
        control: list[tuple[int, int, int]] | None = None
        while n - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            if b1 < 126:
                end = pos + 2 + b1
            elif b1 == 126:
                if n - pos < 4:
                    break
                end = pos + 4 + ((buf[pos + 2] << 8) | buf[pos + 3])
            else:
                if n - pos < 10:
                    break
                end = pos + 10 + int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if end > n:
                break
            if buf[pos] & 0x0F >= 8:
                if control is None:
                    control = []
                control.append((buf[pos] & 0x0F, end - (buf[pos + 1] & 0x7F), end))
            frames += 1
            pos = end
        c.rbuf = buf[pos:] if pos < n else b""
        if not pos:
            return
        st.frames += frames
        k = buf.count(MSG_EVENT, 0, pos)
        if k:
            if st.t0 and now >= st.t0:
                st.delivered += k
                st.bump(st.per_sec_deliveries, now, k)
            else:
                st.delivered_before += k
            if c.spec.sampled and st.t0:
                t0 = st.t0
                lat = st.dl_lat
                at = st.dl_at
                rx_lat = st.dl_rx_lat
                for m in RE_T.findall(buf, 0, pos):
                    t = int(m)
                    if t >= t0:
                        lat.append((now - t) // 1000)
                        rx_lat.append((rx_at - t) // 1000)
                        at.append((t - t0) // 1_000_000)
        if c.spec.sender:
            acks = RE_ACK.findall(buf, 0, pos)
            if acks:
                t0 = st.t0
                lat = st.ack_lat
                at = st.ack_at
                for m in acks:
                    t = int(m)
                    lat.append((now - t) // 1000)
                    at.append((t - t0) // 1_000_000)
                st.acked += len(acks)
                st.bump(st.per_sec_acks, now, len(acks))
                c.outstanding -= len(acks)
            if buf.count(ERR_OP, 0, pos):
                errs = RE_ERR_SEND.findall(buf, 0, pos)
                st.send_errors += len(errs)
                c.outstanding -= len(errs)
                self.note_errors(buf, pos)
            if self.running and self.cfg.rate <= 0:
                while c.outstanding < self.cfg.window:
                    self.send(c, time.time_ns())
        elif buf.count(ERR_OP, 0, pos):
            self.note_errors(buf, pos)
        if control is not None:
            for opcode, start, end in control:
                self.on_control(c, opcode, buf[start:end])

    def note_errors(self, buf: bytes, end: int) -> None:
        st = self.stats
        i = buf.find(ERR_OP, 0, end)
        while i >= 0:
            st.errors += 1
            if len(st.error_samples) < 10:
                j = buf.find(b"}", i, end)
                st.error_samples.append(buf[max(0, i - 1) : j + 1].decode(errors="replace"))
            i = buf.find(ERR_OP, i + 1, end)

    # --- sending ------------------------------------------------------------------------------

    def send(self, c: Conn, now: int) -> None:
        sid = now if now > c.last_id else c.last_id + 1
        c.last_id = sid
        c.outstanding += 1
        self.write(c, frame(c.fmt % (sid, sid, sid)))
        st = self.stats
        st.sent += 1
        st.sent_by_room[c.spec.room or ""] += 1
        st.bump(st.per_sec_sends, now, 1)

    def send_due(self, now: int) -> None:
        """Open loop: every send whose scheduled time has come, round-robin over the senders."""
        st = self.stats
        t0, interval, senders = self.sched_t0, self.interval, self.senders
        due = int((min(now, self.sched_end - 1) - t0) / interval) + 1
        while self.scheduled < due:
            c = senders[self.rr % len(senders)]
            self.rr += 1
            sched = int(self.scheduled * interval)
            self.scheduled += 1
            if c.state != READY:
                continue
            st.send_lag.append((now - t0 - sched) // 1000)
            st.send_lag_at.append(sched // 1_000_000)
            self.send(c, time.time_ns())
            now = time.time_ns()

    # --- the loop -----------------------------------------------------------------------------

    def poll(self, timeout: float) -> list[tuple[Any, ...]]:
        """One epoll round. Returns the pipe messages that arrived."""
        msgs: list[tuple[Any, ...]] = []
        if self.cfg.read_interval_s > 0:
            wait = self.last_poll + self.cfg.read_interval_s - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, timeout))
                timeout = 0.0
            self.last_poll = time.monotonic()
        events = self.ep.poll(timeout, 512)
        now = time.time_ns()
        interleave = self.running and self.interval > 0 and bool(self.senders)
        for k, (fd, ev) in enumerate(events):
            if interleave and k & 31 == 31:
                # a busy round must not hold back scheduled sends
                self.send_due(time.time_ns())
            if fd == self.pipe_fd:
                while self.pipe.poll():
                    msgs.append(self.pipe.recv())
                continue
            c = self.conns.get(fd)
            if c is None or c.state == CLOSED:
                continue
            if ev & OUT:
                self.flush(c)
            if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP):
                if c.state == CONNECTING:
                    self.flush(c)
                elif c.state != CLOSED:
                    self.on_readable(c, now)
        return msgs

    def keepalive(self, now: int, state: dict[str, int]) -> None:
        """Ping every ready connection once per heartbeat * ping_fraction, spread evenly."""
        if not self.all:
            return
        hb = self.all[-1].heartbeat_ms
        period_ns = max(1_000_000, int(hb * self.cfg.ping_fraction * 1_000_000))
        due = (now - state["start"]) * len(self.all) // period_ns
        while state["done"] < due:
            c = self.all[state["done"] % len(self.all)]
            state["done"] += 1
            if c.state == READY:
                self.write(c, self.ping_frame)
                self.pings += 1

    def run(self) -> None:
        self.pipe_fd = self.pipe.fileno()
        self.ep.register(self.pipe_fd, select.EPOLLIN)
        deadline = time.monotonic() + self.cfg.connect_timeout_s
        last_report = 0.0
        ka = {"start": time.time_ns(), "done": 0}
        # 1. connect everything
        while self.pending or self.in_flight:
            self.start_connects()
            for msg in self.poll(0.05):
                if msg[0] == "stop":
                    return
            self.keepalive(time.time_ns(), ka)
            mono = time.monotonic()
            if mono - last_report > 0.5:
                last_report = mono
                self.pipe.send(("connecting", self.ready, self.failed))
            if mono > deadline:
                for c in list(self.conns.values()):
                    if c.state < READY:
                        self.close(c, "connect timeout")
                self.pending.clear()
        self.pipe.send(
            (
                "ready",
                {
                    "ready": self.ready,
                    "failed": self.failed,
                    "connect_errors": self.connect_errors,
                    "heartbeat_ms": next(
                        (c.heartbeat_ms for c in self.all if c.state == READY), 30_000
                    ),
                },
            )
        )
        # 2. wait for "go" (or "stop"), keeping connections alive
        go: tuple[Any, ...] | None = None
        while go is None:
            for msg in self.poll(0.2):
                if msg[0] == "stop":
                    self.shutdown()
                    return
                if msg[0] == "go":
                    go = msg
            self.keepalive(time.time_ns(), ka)
        _, t0, duration_s, _warmup = go
        self.run_load(t0, duration_s)
        # 4. wait for "stop"
        while True:
            for msg in self.poll(0.2):
                if msg[0] == "stop":
                    self.shutdown()
                    return
            self.keepalive(time.time_ns(), ka)

    def run_load(self, t0: int, duration_s: float) -> None:
        st = self.stats
        st.t0 = t0
        end = t0 + int(duration_s * 1e9)
        rate = self.cfg.rate
        interval = 1e9 / rate if rate > 0 else 0.0
        progress_ns = int(self.cfg.progress_s * 1e9)
        next_progress = t0 + progress_ns
        ka = {"start": time.time_ns(), "done": 0}
        while time.time_ns() < t0:
            self.poll(min(0.05, max(0.0, (t0 - time.time_ns()) / 1e9)))
        self.running = True
        if rate <= 0:
            now = time.time_ns()
            for c in self.senders:
                while c.outstanding < self.cfg.window:
                    self.send(c, now)
        self.sched_t0, self.sched_end = t0, end
        self.interval, self.scheduled = interval, 0
        while True:
            now = time.time_ns()
            if now >= end:
                break
            if rate > 0 and self.senders:
                self.send_due(now)
                next_send = t0 + int(self.scheduled * interval)
                timeout = max(0.0, min(next_send, next_progress, end) - time.time_ns()) / 1e9
            else:
                timeout = max(0.0, min(next_progress, end) - now) / 1e9
            self.poll(min(timeout, 0.05))
            now = time.time_ns()
            self.keepalive(now, ka)
            if now >= next_progress:
                next_progress += progress_ns
                self.pipe.send(("progress", self.counters()))
        # 3. drain: acks and deliveries of what was sent
        self.running = False
        drain_end = time.monotonic() + self.cfg.drain_s
        last = (-1, -1)
        quiet_since = time.monotonic()
        while time.monotonic() < drain_end:
            self.poll(0.05)
            cur = (st.acked + st.send_errors, st.delivered)
            mono = time.monotonic()
            if cur != last:
                last = cur
                quiet_since = mono
            elif cur[0] >= st.sent and mono - quiet_since > 0.5:
                break
            if self.ready == 0:
                break
        self.pipe.send(("result", self.result()))

    def counters(self) -> dict[str, int]:
        st = self.stats
        return {
            "sent": st.sent,
            "acked": st.acked,
            "delivered": st.delivered,
            "errors": st.errors,
            "closed": st.closed,
            "ready": self.ready,
        }

    def result(self) -> dict[str, Any]:
        st = self.stats
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "worker": self.cfg.index,
            "ready": self.ready,
            "sent": st.sent,
            "acked": st.acked,
            "send_errors": st.send_errors,
            "errors": st.errors,
            "error_samples": st.error_samples,
            "delivered": st.delivered,
            "delivered_before_t0": st.delivered_before,
            "sent_by_room": dict(st.sent_by_room),
            "per_sec_deliveries": st.per_sec_deliveries.tolist(),
            "per_sec_acks": st.per_sec_acks.tolist(),
            "per_sec_sends": st.per_sec_sends.tolist(),
            "ack_lat_us": st.ack_lat,
            "ack_at_ms": st.ack_at,
            "dl_lat_us": st.dl_lat,
            "dl_at_ms": st.dl_at,
            "dl_rx_lat_us": st.dl_rx_lat,
            "send_lag_us": st.send_lag,
            "send_lag_at_ms": st.send_lag_at,
            "closed": st.closed,
            "close_codes": dict(st.close_codes),
            "recvs": st.recvs,
            "frames": st.frames,
            "pings": self.pings,
            "rusage_cpu_s": ru.ru_utime + ru.ru_stime,
        }

    def shutdown(self) -> None:
        cf = close_frame()
        for c in list(self.conns.values()):
            with contextlib.suppress(OSError):
                c.sock.send(cf)
            self.close(c, "shutdown")


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want <= soft:
        return soft
    if want > hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            want = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


def main(cfg: WorkerConfig, pipe: Connection) -> None:
    raise_nofile(max(cfg.nofile, len(cfg.clients) + 64))
    worker = Worker(cfg, pipe)
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # report, then die
        with contextlib.suppress(Exception):
            pipe.send(("crash", repr(exc)))
        raise
