"""`links` mode: durable appends/s of ONE origin shard, loaded over the edge↔origin link.

What it measures: `gb6 origin` (one shard, on `--store`) and its store's services, nothing
else. No edges and no WebSocket clients run: `--links` load processes (default 2, as two edges)
each open one link connection and speak replication/link.py as an edge does — `hello` with
the cluster's secret, the snapshot, `watch` of every room (so the origin pushes each committed
event to every link, as it does to two edges whose clients sit in every room), then `append`
requests kept `--window` in flight per link, many frames per write, answers read in bulk.
An append is answered (an `acks` entry of a `batch` frame, or a `res`) once the store made it
durable, so answers/s is durable appends/s. The
`appends --cluster` mode measures the whole path (clients → 2 edges → origin → edges →
clients); on a 2-core machine most of its CPU goes to the edges and the clients, so it
understates what the shard does. Compare the two: this mode is the shard's ceiling.

Rules: one origin, started like cluster mode's (bench/cluster.py: fresh schema/topic, dropped
afterwards); tenancy over the origin's admin API (bench/bootstrap.py); rooms created over the
link by their first member (`create_room` with `who`); each link process gets every room and
sends as every member round-robin, with cids unique per link. Workers are plain blocking
sockets with `select`: no Trio, so the generator costs little CPU. Latency (send → res) is
queueing by construction (Little's law: links x window in flight / throughput). Everything is
sent to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import select
import socket
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench import jvm, profile, report, speed
from bench.bootstrap import bootstrap
from bench.cluster import Cluster
from bench.server import ProcWatch
from bench.speed import SpeedProbe
from replication import link

OUT = Path(__file__).resolve().parent / "out"
_LEN = struct.Struct("!I")
_READ = 1 << 16


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--store", choices=["sqlite", "postgres", "kafka"], default="sqlite")
    sp.add_argument("--rooms", type=int, default=100)
    sp.add_argument("--room-size", type=int, default=2, help="members (senders) per room")
    sp.add_argument("--links", type=int, default=2, help="link connections (load processes)")
    sp.add_argument(
        "--window",
        type=int,
        default=1600,
        help="appends in flight per link (2 x 1600 = the 3,200 of `appends`: 200 clients x 16)",
    )
    sp.add_argument("--duration", type=float, default=15.0)
    sp.add_argument("--warmup", type=float, default=3.0)
    sp.add_argument("--drain", type=float, default=10.0)
    sp.add_argument("--text", type=int, default=24, help="message text bytes")
    sp.add_argument(
        "--no-watch", action="store_true", help="links watch no room (heads only are pushed)"
    )
    sp.add_argument("--quiet-wait", type=float, default=60.0)
    sp.add_argument("--keep-data", action="store_true")
    sp.add_argument(
        "--server-prelude",
        default="",
        help="Python the origin runs first, e.g. \"import sys; sys.path.insert(0, '/tmp/old')\" "
        "to measure another checkout's code (A/B) with this harness",
    )
    sp.add_argument("--profile", action="store_true", help="py-spy the origin in the window")
    sp.add_argument("--profile-rate", type=int, default=200)


# --- one link connection (blocking, for setup and for the workers) -------------------------


class Link:
    def __init__(self, address: str, secret: str, name: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.next_id = 0
        self.send([{"t": "hello", "secret": secret, "edge": name, "v": link.VERSION}])
        while not any(f.get("t") == "snap_end" for f in self.read()):
            pass

    def send(self, frames: list[dict[str, Any]]) -> None:
        out = bytearray()
        for f in frames:
            body = orjson.dumps(f)
            out += _LEN.pack(len(body)) + body
        self.sock.sendall(out)

    def read(self) -> list[dict[str, Any]]:
        """Blocks for at least one read; the whole frames it completed."""
        data = self.sock.recv(_READ)
        if not data:
            raise ConnectionError("the origin closed the link")
        self.buf += data
        out: list[dict[str, Any]] = []
        pos = 0
        while len(self.buf) - pos >= 4:
            (n,) = _LEN.unpack_from(self.buf, pos)
            if len(self.buf) - pos - 4 < n:
                break
            out.append(orjson.loads(bytes(self.buf[pos + 4 : pos + 4 + n])))
            pos += 4 + n
        del self.buf[:pos]
        return out

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        self.send([{"t": "req", "id": rid, "op": op, **fields}])
        while True:
            for f in self.read():
                if f.get("t") == "res" and f.get("id") == rid:
                    if "err" in f:
                        raise RuntimeError(f"link {op}: {f['err']}")
                    ok: dict[str, Any] = f["ok"]
                    return ok

    def close(self) -> None:
        self.sock.close()


def _worker(
    k: int,
    address: str,
    secret: str,
    pairs: list[tuple[str, str]],
    cfg: dict[str, Any],
    go: Any,
    conn: Any,
) -> None:
    """One link: watch, then keep `window` appends in flight until `t_end`; send back arrays."""
    link = Link(address, secret, f"bench-link-{k}")
    if cfg["watch"]:
        for room in sorted({r for r, _ in pairs}):
            link.request("watch", room=room)
    link.sock.settimeout(None)
    text = "x" * cfg["text"]
    sent_at: dict[int, int] = {}
    acks_at: list[int] = []
    lat_ns: list[int] = []
    errors: list[str] = []
    delivered: list[tuple[int, int]] = []  # (arrival, events) of each pushed batch
    conn.send("ready")
    t0 = go.get()  # monotonic seconds, shared by every process on Linux
    t_end = t0 + cfg["duration"]
    t_stop = t_end + cfg["drain"]
    i = 0
    rid = link.next_id
    sock = link.sock

    def frames(n: int) -> bytes:
        nonlocal i, rid
        out = bytearray()
        now = time.monotonic_ns()
        for _ in range(n):
            room, who = pairs[i % len(pairs)]
            i += 1
            rid += 1
            sent_at[rid] = now
            body = orjson.dumps(
                {
                    "t": "req",
                    "id": rid,
                    "op": "append",
                    "who": who,
                    "room": room,
                    "type": "message",
                    "cid": f"l{k}-{rid}",
                    "body": {"text": text, "t": now},
                }
            )
            out += _LEN.pack(len(body)) + body
        return bytes(out)

    while time.monotonic() < t0:
        time.sleep(0.001)
    sock.sendall(frames(cfg["window"]))
    buf = bytearray()
    while True:
        now_s = time.monotonic()
        if now_s >= t_stop or (now_s >= t_end and not sent_at):
            break
        ready, _, _ = select.select([sock], [], [], 0.2)
        if not ready:
            continue
        data = sock.recv(_READ)
        if not data:
            errors.append("link closed")
            break
        arrived = time.monotonic_ns()
        buf += data
        pos = 0
        answered = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            frame = bytes(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
            msg = orjson.loads(frame)
            if msg.get("t") == "batch":
                delivered.append((arrived, sum(len(v) for v in msg["events"].values())))
                for ack in msg.get("acks", ()):  # new events of our appends (link.py)
                    start = sent_at.pop(ack[0], None)
                    if start is not None:
                        answered += 1
                        acks_at.append(arrived)
                        lat_ns.append(arrived - start)
                continue
            if msg.get("t") != "res":
                continue
            start = sent_at.pop(msg["id"], None)
            if start is None:
                continue
            answered += 1
            if "err" in msg:
                errors.append(str(msg["err"].get("code")))
                continue
            acks_at.append(arrived)
            lat_ns.append(arrived - start)
        del buf[:pos]
        if answered and time.monotonic() < t_end:
            sock.sendall(frames(answered))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    conn.send(
        {
            "acks_at": np.array(acks_at, dtype=np.int64),
            "lat_ns": np.array(lat_ns, dtype=np.int64),
            "delivered": np.array(delivered, dtype=np.int64).reshape(-1, 2),
            "errors": errors[:20],
            "n_errors": len(errors),
            "sent": rid - link.next_id,
            "unanswered": len(sent_at),
            "cpu_s": ru.ru_utime + ru.ru_stime,
        }
    )
    link.close()


# --- orchestration -------------------------------------------------------------------------


def run_links(args: argparse.Namespace, m: dict[str, Any], meta: dict[str, Any]) -> None:
    from bench.run import log, wait_quiet

    if args.quiet_wait > 0:
        wait_quiet(args.quiet_wait)
    cluster = Cluster.start(
        OUT,
        origins=1,
        edges=0,
        store=args.store,
        extra={"keep_data": args.keep_data, "prelude": args.server_prelude},
    )
    origin = cluster.origins[0]
    log(f"origin s1 pid {origin.pid} link {origin.link}; log {origin.log_path}")
    try:
        _run(args, m, meta, cluster)
    finally:
        cluster.stop()
        log("origin stopped")


def _run(args: argparse.Namespace, m: dict[str, Any], meta: dict[str, Any], c: Cluster) -> None:
    from bench.run import log, top_others

    origin = c.origins[0]
    n = args.rooms * args.room_size
    t = time.monotonic()
    tenant = bootstrap(origin.http, origin.admin_token, n, label="links")
    setup = Link(origin.link, c.secret, "bench-setup")
    rooms: list[tuple[str, list[str]]] = []
    for j in range(args.rooms):
        members = [u.id for u in tenant.users[j * args.room_size : (j + 1) * args.room_size]]
        ok = setup.request(
            "create_room",
            who=members[0],
            name=f"links-{j}",
            kind="chat",
            members=members[1:],
            open=False,
        )
        rooms.append((str(ok["room"]["record"]["id"]), members))
    setup.close()
    log(f"bootstrap: {n} users, {args.rooms} rooms in {time.monotonic() - t:.1f} s")
    pairs = [(room, who) for room, members in rooms for who in members]
    cfg = {
        "window": args.window,
        "duration": args.duration,
        "drain": args.drain,
        "text": args.text,
        "watch": not args.no_watch,
    }
    ctx = mp.get_context("spawn")
    go = ctx.Queue()
    procs = []
    pipes = []
    for k in range(args.links):
        parent, child = ctx.Pipe()
        rotated = pairs[k:] + pairs[:k]  # links send as different members at a time
        p = ctx.Process(
            target=_worker, args=(k, origin.link, c.secret, rotated, cfg, go, child), daemon=True
        )
        p.start()
        procs.append(p)
        pipes.append(parent)
    for pipe in pipes:
        if pipe.recv() != "ready":
            raise RuntimeError("a link worker failed to start")
    watch = ProcWatch([origin.pid] if origin.pid else [])
    service_pids = c.service_pids()
    services = [(name, ProcWatch([pid])) for name, pid in service_pids]
    broker = next((pid for name, pid in service_pids if name.startswith("kafka broker")), None)
    ours = {origin.pid or -1, *(p.pid or -1 for p in procs)}
    with SpeedProbe(OUT / f"links-{meta['stamp']}-speed.txt") as probe:
        t0 = time.monotonic() + 0.5
        for _ in procs:
            go.put(t0)
        log(
            f"links: {args.links} x window {args.window}, {args.rooms} rooms of {args.room_size}, "
            f"{args.duration:g} s ({args.warmup:g} s warm-up), store {args.store}"
        )
        w0 = t0 + args.warmup
        w1 = t0 + args.duration
        time.sleep(max(0.0, w0 - time.monotonic()))
        cpu0 = watch.cpu_s()
        th0 = watch.thread_cpu()
        svc0 = [w.cpu_s() for _, w in services]
        jit0 = jvm.jit_cpu_s(broker) if broker is not None else 0.0
        top_others(ours)  # primes per-process counters
        busy0 = _busy()
        persisted0, p0_at = c.events_persisted(), time.monotonic()
        prof_path = OUT / f"links-{meta['stamp']}-pyspy.txt"
        prof = (
            profile.start(origin.pid, args.duration - args.warmup, prof_path, args.profile_rate)
            if args.profile and origin.pid
            else None
        )
        time.sleep(max(0.0, w1 - time.monotonic()))
        window = w1 - w0
        cpu = (watch.cpu_s() - cpu0) / window
        persisted1, p1_at = c.events_persisted(), time.monotonic()
        th1 = watch.thread_cpu()
        svc = [
            (name, (w.cpu_s() - s0) / window) for (name, w), s0 in zip(services, svc0, strict=True)
        ]
        jit = max(0.0, jvm.jit_cpu_s(broker) - jit0) / window if broker is not None else None
        busy, stolen = _busy_since(busy0)
        others = top_others(ours)
        host_speed = speed.summarize(probe.between(w0, w1))
    results = [pipe.recv() for pipe in pipes]
    for p in procs:
        p.join(10)
    if prof is not None:
        profile.finish(prof)
    lo, hi = int(w0 * 1e9), int(w1 * 1e9)
    acks = 0
    lats: list[np.ndarray[Any, Any]] = []
    delivered = 0
    for r in results:
        sel = (r["acks_at"] >= lo) & (r["acks_at"] < hi)
        acks += int(sel.sum())
        lats.append(r["lat_ns"][sel] // 1000)
        d = r["delivered"]
        if d.size:
            delivered += int(d[(d[:, 0] >= lo) & (d[:, 0] < hi), 1].sum())
    rate = acks / window
    lat = report.summarize_us(np.concatenate(lats) if lats else np.array([]))
    threads = {
        k: round(100 * (v - th0.get(k, 0.0)) / window, 1)
        for k, v in th1.items()
        if v - th0.get(k, 0.0) > 0.01 * window
    }
    gen_cpu = sum(r["cpu_s"] for r in results) / (args.duration + args.drain)
    result = {
        "mode": "links",
        "machine": m,
        "command": meta["command"],
        "params": {
            "store": args.store,
            "links": args.links,
            "window": args.window,
            "rooms": args.rooms,
            "room_size": args.room_size,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "watch": not args.no_watch,
            "text_bytes": args.text,
        },
        "appends_per_s": round(rate, 1),
        # Rows PostgreSQL was given in the window (the event_ids sequence): with Kafka, what
        # the persister kept up with; None on the embedded store.
        "persisted_per_s": (
            # Over the samples' own interval: the first one (an import, a connect) starts late.
            round((persisted1 - persisted0) / (p1_at - p0_at), 1)
            if persisted0 is not None and persisted1 is not None
            else None
        ),
        "send_to_res_ms": lat,
        "delivered_events_per_s": round(delivered / window, 1),
        "errors": sum(r["n_errors"] for r in results),
        "error_samples": [e for r in results for e in r["errors"]][:10],
        "sent": sum(r["sent"] for r in results),
        "unanswered": sum(r["unanswered"] for r in results),
        "origin_cpu_pct": round(100 * cpu, 1),
        "origin_cpu_us_per_append": round(1e6 * cpu / rate, 1) if rate else None,
        "origin_threads_cpu_pct": threads,
        "services_cpu_pct": {name: round(100 * v, 1) for name, v in svc},
        # CPU of the broker's JIT compiler in the window (% of one core): high while it is cold.
        "broker_jit_cpu_pct": round(100 * jit, 1) if jit is not None else None,
        "generator_cpu_pct": round(100 * gen_cpu, 1),
        "machine_busy_pct": round(busy, 1),
        "machine_steal_pct": round(stolen, 1),
        "others": others,
        "host_speed_probe_ms": host_speed,
        "origin": cluster_info(c),
        "profile": (
            profile.summarize(prof_path, args.duration - args.warmup, args.profile_rate)
            if prof is not None
            else None
        ),
    }
    path = OUT / f"links-{meta['stamp']}.json"
    report.write_json(path, result)
    p_ = result["params"]
    print(f"\n== links: {result['command']}\n   {report.machine_line(m)}")
    print("   " + "  ".join(f"{k}={v}" for k, v in p_.items()))
    print(
        f"durable appends/s (one origin shard, over the link): {rate:,.0f}   "
        f"events pushed to links/s {result['delivered_events_per_s']:,.0f}   "
        f"errors {result['errors']}  unanswered {result['unanswered']}"
    )
    if result["persisted_per_s"] is not None:
        print(f"events written to PostgreSQL/s in the window: {result['persisted_per_s']:,.0f}")
    print(report.fmt_lat("send→res", lat))
    us = result["origin_cpu_us_per_append"]
    print(f"origin s1: CPU {100 * cpu:.1f}% of one core, {us} µs CPU per append")
    print(
        "origin s1 threads (CPU % of one core): "
        + ", ".join(f"{k} {v}%" for k, v in threads.items())
    )
    for name, v in svc:
        print(f"  {name}: CPU {100 * v:.1f}% of one core")
    print(f"generator: CPU {100 * gen_cpu:.1f}% of one core ({args.links} processes)")
    print(
        f"machine: {busy:.1f}% of all cores busy, {stolen:.1f}% stolen by the host; "
        f"busiest others: {'; '.join(others) or '-'}"
    )
    print(speed.fmt(host_speed))
    if cold := jvm.cold_warning(result["broker_jit_cpu_pct"]):
        print(cold)
    if result["profile"]:
        profile.print_summary(result["profile"])
    print(f"results: {path}", flush=True)


def cluster_info(c: Cluster) -> dict[str, Any]:
    info = c.info()
    info.pop("processes", None)
    return {**info, "pid": c.origins[0].pid, "command": c.origins[0].command}


def _busy() -> tuple[float, float, float]:
    """(busy s, stolen s, total s) of all cores so far."""
    import psutil

    t = psutil.cpu_times()
    return (t.user + t.system + t.nice + t.irq + t.softirq, speed.stolen_s(t), sum(t))


def _busy_since(start: tuple[float, float, float]) -> tuple[float, float]:
    """% of all cores busy, and % stolen by the host, since `start`."""
    busy, stolen, total = _busy()
    span = max(1e-9, total - start[2])
    return 100.0 * (busy - start[0]) / span, 100.0 * (stolen - start[1]) / span
