"""Relay benchmark: RTP packets the SFU forwards per second, its CPU, and loss, as subscribers grow.

    python -m bench.run relay [--subscribers 1,5,10,20] [--mbps 15] [--payload 1200]
                              [--duration 10] [--profile]

This process runs the SFU (`edge.sfu.Sfu`, the real one: aiortc ICE/DTLS/SRTP, pinned to
127.0.0.1). A second process holds the other side: one publisher and N subscribers, each an
aiortc RTCPeerConnection negotiated with the SFU over a pipe (the SFU's `answer`, `offer`,
`set_answer`). Media never touches an encoder or decoder on either side: the publisher writes
synthetic VP8-shaped RTP (every packet marked as a keyframe start) through its SRTP session
straight to its socket at `--mbps`, 30 frames/s (one burst per frame); each subscriber counts
the SRTP packets it gets by their clear RTP header, in the socket callback (no decryption, no
aiortc receiver: the client process must not be the bottleneck on a 2-core machine; the SFU's
SRTP is real both ways). Loss is per subscriber, from its sequence numbers (expected =
highest - first + 1) over the measured window.

Each case (one per `--subscribers` value) is a fresh room: warm-up 2 s, then `--duration`
seconds measured. Printed: forwarded packets/s (received by subscribers / s), the SFU process's
CPU% (100 = one core) and packets/s per core (forwarded/s ÷ CPU share), loss % (mean and worst
subscriber), the client process's CPU. Results also go to bench/out/relay-<stamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import random
import socket
import struct
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil

from bench import profile, report

OUT = Path(__file__).resolve().parent / "out"
HOST = "127.0.0.1"
FPS = 30
WARMUP_S = 2.0


def log(msg: str) -> None:
    print(msg, flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subscribers", default="1,5,10,20", help="comma list: one case per value")
    p.add_argument("--mbps", type=float, default=15.0, help="the publisher's bitrate (RTP bytes)")
    p.add_argument("--payload", type=int, default=1_200, help="RTP payload bytes per packet")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per case")
    p.add_argument("--port-min", type=int, default=52_000, help="the SFU's UDP port range start")
    p.add_argument("--profile", action="store_true", help="py-spy the SFU in the last case")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each case, wait up to S s for an idle machine",
    )


# --- the client process: publisher and subscribers -------------------------------------------


def _pin_loopback() -> None:
    """aioice leaves 127.0.0.1 out of host candidates; this benchmark stays on loopback."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [HOST]


def _count_in_clear() -> None:
    """Subscribers count SRTP packets by their RTP header, which SRTP leaves in the clear,
    straight from the socket callback: the client process must not be the bottleneck (it shares
    the 2 cores with the SFU). The SFU side is unchanged: real SRTP both ways."""
    import aioice.ice

    original = aioice.ice.StunProtocol.datagram_received

    def datagram_received(self: Any, data: Any, addr: Any) -> None:
        rx = getattr(self.receiver, "bench_rx", None)
        if rx is None:
            original(self, data, addr)
            return
        sock = self.transport._sock
        for _ in range(64):  # as the SFU does: drain the burst in one wake-up
            if data and 127 < data[0] < 192:
                rx(data)
            else:
                original(self, data, addr)
            try:
                data, addr = sock.recvfrom(65_536)
            except OSError:
                return

    aioice.ice.StunProtocol.datagram_received = datagram_received  # type: ignore[method-assign]


def _nominated(dtls: Any) -> Any:
    return dtls.transport._connection._nominated.get(1)


class _Counter:
    """Counts one subscriber's RTP by sequence number (extended over wraps)."""

    def __init__(self) -> None:
        self.received = 0
        self.first = -1
        self.highest = -1
        self.cycles = 0
        self.last = -1

    def add(self, data: bytes) -> None:
        if len(data) < 12 or 192 <= data[1] <= 223:
            return
        seq = (data[2] << 8) | data[3]
        if self.last >= 0 and seq < self.last and self.last - seq > 0x8000:
            self.cycles += 0x10000
        self.last = seq if self.last < 0 or ((seq - self.last) & 0xFFFF) < 0x8000 else self.last
        ext = self.cycles + seq
        if self.first < 0:
            self.first = ext
        self.highest = max(self.highest, ext)
        self.received += 1

    def reset(self) -> None:
        self.received = 0
        self.first = -1
        self.highest = -1


def _client_main(conn: Connection) -> None:
    _pin_loopback()
    _count_in_clear()
    asyncio.run(_client(conn))


class _Publisher:
    """Writes synthetic VP8-shaped RTP through the publisher's SRTP session, frame by frame."""

    def __init__(self, dtls: Any, pt: int, ssrc: int, mbps: float, payload: int) -> None:
        self.dtls = dtls
        self.pt = pt
        self.ssrc = ssrc
        pps = mbps * 1e6 / 8 / (payload + 12)
        self.per_frame = max(1, round(pps / FPS))
        self.seq = random.getrandbits(16)
        self.ts = random.getrandbits(32)
        self.sent = 0
        self.body = bytes([0x10, 0x00]) + os.urandom(payload - 2)  # VP8: S=1, keyframe

    def send_frame(self) -> None:
        pair = _nominated(self.dtls)
        if pair is None:
            return
        protect, sock, addr = self.dtls._tx_srtp.protect, pair.protocol.transport, pair.remote_addr
        seq, ts, n = self.seq, self.ts, self.per_frame
        for k in range(n):
            marker = 0x80 if k == n - 1 else 0
            header = struct.pack("!BBHII", 0x80, marker | self.pt, seq, ts, self.ssrc)
            sock.sendto(protect(header + self.body), addr)
            seq = (seq + 1) & 0xFFFF
        self.seq, self.ts = seq, (ts + 90_000 // FPS) & 0xFFFFFFFF
        self.sent += n

    async def pace(self, seconds: float) -> None:
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < seconds:
            self.send_frame()
            i += 1
            delay = t0 + i / FPS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)


async def _client(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "quit":
            return
        await _client_case(conn, *cmd[1:])


async def _client_case(
    conn: Connection, n_subs: int, mbps: float, payload: int, duration: float
) -> None:
    from aiortc import (
        MediaStreamTrack,
        RTCConfiguration,
        RTCPeerConnection,
        RTCSessionDescription,
    )

    loop = asyncio.get_running_loop()
    me = psutil.Process()

    async def ask(*msg: Any) -> Any:
        conn.send(msg)
        return await loop.run_in_executor(None, conn.recv)

    class Idle(MediaStreamTrack):
        kind = "video"

        async def recv(self) -> Any:  # never yields a frame: we write RTP ourselves
            await asyncio.Future()

    pcs: list[Any] = []
    pub = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pcs.append(pub)
    pub.addTrack(Idle())
    await pub.setLocalDescription(await pub.createOffer())
    answer = await ask("publish", pub.localDescription.sdp)
    await pub.setRemoteDescription(RTCSessionDescription(answer, "answer"))
    counters: list[_Counter] = []
    for i in range(n_subs):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pcs.append(pc)
        offer = await ask("subscribe", f"s{i}")
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        counter = _Counter()
        counters.append(counter)
        dtls = pc.getTransceivers()[0].receiver.transport
        ice = dtls.transport._connection
        ice.bench_rx = counter.add  # type: ignore[attr-defined]  # aiortc's receiver sees none
        for proto in ice._protocols:
            sock = proto.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        await ask("answer", f"s{i}", pc.localDescription.sdp)
    sender = pub.getSenders()[0]
    pdtls = sender.transport
    for _ in range(400):  # connected within 20 s
        if pdtls.state == "connected" and _nominated(pdtls) is not None:
            break
        await asyncio.sleep(0.05)
    pt = next(  # the SFU's answer names the one codec it took
        int(line.split(":")[1].split()[0])
        for line in answer.splitlines()
        if line.startswith("a=rtpmap:") and "VP8/90000" in line
    )
    publisher = _Publisher(pdtls, pt, sender._ssrc, mbps, payload)
    # Warm-up: every subscriber must be receiving before the window opens.
    await publisher.pace(WARMUP_S)
    for _ in range(50):
        if all(c.received for c in counters):
            break
        await publisher.pace(0.2)
    for c in counters:
        c.reset()
    sent0 = publisher.sent
    cpu0 = me.cpu_times()
    conn.send(("window", "open"))
    t0 = time.monotonic()
    await publisher.pace(duration)
    elapsed = time.monotonic() - t0
    conn.send(("window", "closed"))
    cpu1 = me.cpu_times()
    await asyncio.sleep(0.3)  # in flight
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
    subs = [
        {"received": c.received, "expected": c.highest - c.first + 1 if c.first >= 0 else 0}
        for c in counters
    ]
    result = {
        "sent": publisher.sent - sent0,
        "elapsed": elapsed,
        "subs": subs,
        "client_cpu": cpu,
        "per_frame": publisher.per_frame,
    }
    conn.send(("result", result))
    for pc in pcs:
        with contextlib.suppress(Exception):
            await pc.close()


# --- the SFU side (this process) -------------------------------------------------------------


def _sfu_counts(peers: list[Any]) -> tuple[int, int]:
    """Packets the SFU sent to subscribers and received from publishers, so far."""
    down = up = 0
    for p in peers:
        for st in p.stats():
            if st.direction == "down":
                down += st.packets
            else:
                up += st.packets
    return down, up


async def _serve_cases(
    args: argparse.Namespace, conn: Connection, meta: dict[str, Any]
) -> list[dict[str, Any]]:
    import trio
    import trio_asyncio

    from edge.sfu import Sfu
    from node.config import MediaConfig

    cases = [int(x) for x in str(args.subscribers).split(",") if x.strip()]
    results: list[dict[str, Any]] = []
    me = psutil.Process()
    media = MediaConfig(
        host=HOST,
        udp_port_min=args.port_min,
        udp_port_max=args.port_min + 999,
        video_bitrate_cap_bps=max(20_000_000, int(args.mbps * 2e6)),
    )

    async def recv() -> Any:
        return await trio.to_thread.run_sync(conn.recv)

    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        sfu = Sfu(media)
        await nursery.start(sfu.run)
        for idx, n in enumerate(cases):
            room = f"relay-{idx}"
            if args.quiet_wait > 0:
                from bench.run import wait_quiet

                await trio.to_thread.run_sync(wait_quiet, args.quiet_wait)
            conn.send(("case", n, args.mbps, args.payload, args.duration))
            peers = []
            track_id = ""
            cpu0: Any = None
            t0 = 0.0
            spy = None
            spy_path = OUT / f"relay-{meta['stamp']}-pyspy.txt"
            while True:
                msg = await recv()
                if msg[0] == "publish":
                    pub = sfu.join(room, "pub", lambda e: None)
                    peers.append(pub)
                    conn.send(await pub.answer(msg[1]))
                    track_id = pub.tracks[0].track_id
                elif msg[0] == "subscribe":
                    p = sfu.join(room, msg[1], lambda e: None)
                    peers.append(p)
                    p.subscribe(track_id)
                    conn.send(await p.offer())
                elif msg[0] == "answer":
                    p = next(x for x in peers if x.participant == msg[1])
                    await p.set_answer(msg[2])
                    conn.send("ok")
                elif msg == ("window", "open"):
                    psutil.cpu_percent()  # the machine-wide meter starts with the window
                    cpu0, t0 = me.cpu_times(), time.monotonic()
                    fwd0, in0 = _sfu_counts(peers)
                    if args.profile and idx == len(cases) - 1:
                        spy = profile.start(os.getpid(), args.duration, spy_path)
                elif msg == ("window", "closed"):
                    cpu1, elapsed = me.cpu_times(), time.monotonic() - t0
                    sfu_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / elapsed
                    fwd1, in1 = _sfu_counts(peers)
                    busy = psutil.cpu_percent()
                    sfu_fwd, sfu_in = (fwd1 - fwd0) / elapsed, (in1 - in0) / elapsed
                elif msg[0] == "result":
                    r = msg[1]
                    break
            unconnected = [p.participant for p in peers if p.state != "connected"]
            if unconnected:
                log(f"  not connected: {unconnected}")
            for p in peers:
                await p.leave()
            profile.finish(spy)
            if os.environ.get("RELAY_DEBUG"):
                log(f"  debug: {r['debug']} sent {r['sent']}")
                for p in peers:
                    t = p._transport
                    log(
                        f"  {p.participant} {p.state} ice={t._ice.state} dtls={t._dtls.state} "
                        f"{p.stats()} {t.dropped}"
                    )
            received = sum(s["received"] for s in r["subs"])
            losses = [
                1 - s["received"] / s["expected"] if s["expected"] else 1.0 for s in r["subs"]
            ]
            fwd = sfu_fwd
            row = {
                "subscribers": n,
                "publisher_pps": round(r["sent"] / r["elapsed"]),
                "publisher_mbps": round(
                    r["sent"] * (args.payload + 12) * 8 / r["elapsed"] / 1e6, 2
                ),
                "forwarded_pps": round(fwd),  # by the SFU in its window
                "sfu_received_pps": round(sfu_in),
                "subscribers_received_pps": round(received / r["elapsed"]),
                "sfu_cpu_pct": round(100 * sfu_cpu, 1),
                "pps_per_core": round(fwd / sfu_cpu) if sfu_cpu > 0 else None,
                "loss_mean_pct": round(100 * sum(losses) / len(losses), 3),
                "loss_max_pct": round(100 * max(losses), 3),
                "client_cpu_pct": round(100 * r["client_cpu"], 1),
                "machine_busy_pct": busy,
                # Everything else on the machine, in % of one core (the 2 cores are shared).
                "others_cpu_pct": round(
                    max(
                        0.0,
                        busy * (psutil.cpu_count() or 1) - 100 * sfu_cpu - 100 * r["client_cpu"],
                    ),
                    1,
                ),
            }
            results.append(row)
            log(
                f"  {n:>3} subs: publisher {row['publisher_mbps']} Mbit/s ({row['publisher_pps']}"
                f" pkt/s) → forwarded {row['forwarded_pps']:,} pkt/s; SFU CPU "
                f"{row['sfu_cpu_pct']}% → {row['pps_per_core']:,} pkt/s per core; loss mean "
                f"{row['loss_mean_pct']}% max {row['loss_max_pct']}%; clients CPU "
                f"{row['client_cpu_pct']}%; others {row['others_cpu_pct']}%"
            )
            if spy is not None and spy_path.exists():
                summary = profile.summarize(spy_path, args.duration)
                meta["profile"] = summary
                log(f"  py-spy: {spy_path}")
        conn.send(("quit",))
        nursery.cancel_scope.cancel()
    return results


def run_relay(args: argparse.Namespace, machine: dict[str, Any]) -> list[dict[str, Any]]:
    import trio

    OUT.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta: dict[str, Any] = {"stamp": stamp, "machine": machine, "command": " ".join(sys.argv)}
    log(
        f"relay: subscribers {args.subscribers}, {args.mbps} Mbit/s, payload {args.payload} B,"
        f" {args.duration}s per case"
    )
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_client_main, args=(child,), daemon=True)
    proc.start()
    child.close()
    psutil.cpu_percent()  # start the machine-wide meter
    try:
        results = trio.run(_serve_cases, args, parent, meta)
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    path = OUT / f"relay-{stamp}.json"
    report.write_json(path, {"mode": "relay", **meta, "args": vars(args), "results": results})
    log(f"results: {path}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.relay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    args = p.parse_args(argv)
    m = report.machine()
    log(f"machine: {report.machine_line(m)}")
    run_relay(args, m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
