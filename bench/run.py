"""GB6 benchmark harness: prints figures, never pass/fail.

    python -m bench.run load   [--clients 1000 --rooms 100 --rate 2000 --duration 30]
    python -m bench.run fanout [--clients 500 --senders 4 --window 16 | --rate R]
    python -m bench.run idle   [--connections 10000]
    python -m bench.run appends [--clients 200 --room-size 2 --window 16]  (closed loop)
    python -m bench.run relay  [--subscribers 1,5,10,20 --mbps 15]  (the SFU, bench/relay.py)
    add --cluster [--store sqlite|postgres|kafka --origins 1 --edges 2]: gb6 origin/edge processes

By default it starts its own `gb6 run` on a temporary data directory; `--ws/--http/--admin-token`
attach to a running node instead (`--server-pid` for its CPU and memory, else found by port).
Results go to stdout and, as JSON plus a PNG plot, to `bench/out/`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import jvm, profile, report, speed
from bench.bootstrap import Tenant, bootstrap, create_rooms
from bench.cluster import Cluster
from bench.pool import open_pool
from bench.server import CpuMeter, ProcWatch, Server, gc_pauses
from bench.speed import SpeedProbe
from bench.worker import ClientSpec, WorkerConfig, raise_nofile

OUT = Path(__file__).resolve().parent / "out"
MiB = 2**20


def log(msg: str) -> None:
    print(msg, flush=True)


# --- worker pool ------------------------------------------------------------------------------


def split(items: list[ClientSpec], n: int) -> list[list[ClientSpec]]:
    """Round-robin, so every worker holds members of every room."""
    return [items[i::n] for i in range(n)]


def mb(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


# --- server ------------------------------------------------------------------------------------


Target = Server | Cluster


def open_server(args: argparse.Namespace) -> Target:
    if getattr(args, "cluster", False):
        if args.ws:
            sys.exit("--cluster starts its own processes: no --ws")
        c = Cluster.start(
            OUT,
            origins=args.origins,
            edges=args.edges,
            store=args.store,
            extra={
                "keep_data": args.keep_data,
                "switch_interval_ms": args.server_switch_interval_ms,
                "gc_log": args.server_gc_log,
                "prelude": args.server_prelude or "",
            },
        )
        for name, srv in c.named:
            log(f"cluster: {name} pid {srv.pid} {srv.ws or srv.link}; log {srv.log_path}")
        return c
    if args.ws:
        if not (args.http and args.admin_token):
            sys.exit("--ws needs --http and --admin-token")
        s = Server.attach(args.ws, args.http, args.admin_token, args.server_pid)
        log(f"server: attached to {s.ws} (pid {s.pid or 'unknown: no CPU/RSS figures'})")
        return s
    s = Server.start(
        OUT,
        args.server_arg or [],
        keep_data=args.keep_data,
        switch_interval_ms=args.server_switch_interval_ms,
        gc_log=args.server_gc_log,
        prelude=args.server_prelude or "",
    )
    shown = ["<prelude>" if "\n" in a else a for a in s.command]
    log(f"server: started {' '.join(shown)} pid {s.pid}; log {s.log_path}")
    return s


def profiled_pid(args: argparse.Namespace, server: Target) -> int | None:
    """The process --profile samples: the server, or in a cluster --profile-process."""
    if not isinstance(server, Cluster):
        return server.pid
    names = dict(server.named)
    if args.profile_process not in names:
        sys.exit(f"--profile-process must be one of {sorted(names)}")
    return names[args.profile_process].pid


def server_info(server: Target) -> dict[str, Any]:
    if isinstance(server, Cluster):
        return server.info()
    return {
        "ws": server.ws,
        "http": server.http,
        "pid": server.pid,
        "command": server.command or None,
        "log": str(server.log_path) if server.log_path else None,
        "nofile": _nofile_of(server.pid),
    }


def _nofile_of(pid: int | None) -> list[int] | None:
    if pid is None:
        return None
    with contextlib.suppress(psutil.Error, AttributeError):
        return list(psutil.Process(pid).rlimit(psutil.RLIMIT_NOFILE))
    return None


# --- load and fanout -----------------------------------------------------------------------------


def traffic(
    args: argparse.Namespace,
    server: Target,
    *,
    mode: str,
    tenant: Tenant,
    rooms: list[str],
    room_size: int,
    senders: set[int],
    rate: float,
    params: dict[str, Any],
    meta: dict[str, Any],
) -> dict[str, Any]:
    n = len(tenant.users)
    nw = max(1, min(args.workers, n))
    # Cluster: client i on edge i % edges, so consecutive members of a room sit on different edges.
    urls = server.ws_urls if isinstance(server, Cluster) else [""]
    specs = [
        ClientSpec(
            token=tenant.users[i].token,
            room=rooms[i // room_size],
            sender=i in senders,
            # every worker gets its share of sampled clients (workers take i % nw)
            sampled=(i // nw) % args.sample == 0,
            ws_url=urls[i % len(urls)],
        )
        for i in range(n)
    ]
    parts = split(specs, nw)
    n_senders = max(1, len(senders))
    cfgs = [
        WorkerConfig(
            index=w,
            ws_url=server.ws,
            clients=part,
            rate=rate * sum(1 for s in part if s.sender) / n_senders if rate > 0 else 0.0,
            window=args.window if mode in ("fanout", "appends") else 8,
            text=args.text,
            drain_s=args.drain,
            progress_s=1.0,
            read_interval_s=args.read_interval_ms / 1000,
        )
        for w, part in enumerate(parts)
    ]
    if isinstance(server, Cluster):
        srv: ProcWatch | None = ProcWatch(server.pids)
        named = [(name, ProcWatch([s.pid])) for name, s in server.named if s.pid]
        services = server.service_pids()
        named += [(name, ProcWatch([pid])) for name, pid in services]
        service_names = {name for name, _ in services}
        server_pids = set(server.pids)
        broker = next((pid for name, pid in services if name.startswith("kafka broker")), None)
    else:
        srv = ProcWatch([server.pid]) if server.pid else None
        named = []
        services = []
        service_names = set()
        server_pids = {server.pid or -1}
        broker = None
    jit: dict[str, float] = {}  # "warm"/"end": CPU seconds of the broker's JIT compiler
    proc_cpu: dict[str, list[float]] = {}  # "warm"/"end": CPU seconds of each named process
    proc_rss_max = [0] * len(named)
    t_conn = time.monotonic()
    pool = open_pool(cfgs, args.generator)
    probe = SpeedProbe(OUT / f"{mode}-{meta['stamp']}-speed.txt")
    try:
        probe.start()
        last = [0.0]

        def connecting(k: int) -> None:
            if time.monotonic() - last[0] > 3:
                last[0] = time.monotonic()
                log(f"  connecting: {k}/{n} ready")

        summaries = pool.wait_ready(connecting)
        connect_s = time.monotonic() - t_conn
        ready = sum(s["ready"] for s in summaries)
        failed = sum(s["failed"] for s in summaries)
        log(f"connected {ready}/{n} in {connect_s:.1f} s ({failed} failed)")
        for s in summaries:
            for e in s["connect_errors"][:3]:
                log(f"  connect error: {e}")
        if ready == 0:
            raise RuntimeError("no client connected")
        time.sleep(1.0)
        gen = ProcWatch([os.getpid(), *pool.pids], children=False)
        per_worker = [ProcWatch([p], children=False) for p in pool.pids]
        rss_before = srv.rss() if srv else 0

        prof: Any = None
        prof_path = OUT / f"{mode}-{meta['stamp']}-pyspy.txt"
        t0 = time.time_ns() + 500_000_000
        duration, warmup = args.duration, args.warmup
        pool.send_all(("go", t0, duration, warmup))
        t_warm = t0 + int(warmup * 1e9)
        t_end = t0 + int(duration * 1e9)
        srv_meter = CpuMeter(srv) if srv else None
        gen_meter = CpuMeter(gen)
        # Per cluster process and service, per progress line (JSON only): `--progress 1` lines up
        # each second's latency with who had the CPU (a broker's JIT burst, a PostgreSQL spike).
        proc_meters = [(name, CpuMeter(w)) for name, w in named]
        marks: dict[str, Any] = {}
        others: list[str] = []
        threads_warm: dict[str, float] = {}
        threads_end: dict[str, float] = {}
        progress: dict[int, dict[str, int]] = {}
        results: dict[int, dict[str, Any]] = {}
        timeline: list[dict[str, Any]] = []
        rss_max = rss_before
        last_print = time.monotonic()
        last_counts = {"sent": 0, "acked": 0, "delivered": 0}
        last_print_t = time.monotonic()
        last_sys = psutil.cpu_times()  # the machine's CPU between progress lines
        # The host's steal per second of the run (% of all cores), to line a slow second up with
        # it: [second, pct]. Second boundaries are as exact as this loop's 0.1 s wake-ups.
        steal_by_second: list[list[float]] = []
        second_mark: tuple[int, Any] | None = None
        wal = WalWatch(server.data_dir / "gb6.db-wal" if server.data_dir else None)
        while len(results) < nw:
            if now_ns() < t_end + 1_000_000_000:
                wal.sample((now_ns() - t0) / 1e9)
            for i, msg in pool.recv_any(0.1):
                if msg[0] == "progress":
                    progress[i] = msg[1]
                elif msg[0] == "result":
                    results[i] = msg[1]
            now = time.time_ns()
            if t0 <= now < t_end + 1_000_000_000:
                second = (now - t0) // 1_000_000_000
                if second_mark is None or second > second_mark[0]:
                    times = psutil.cpu_times()
                    if second_mark is not None:
                        steal_by_second.append(
                            [second_mark[0], speed.steal_share(second_mark[1], times)]
                        )
                    second_mark = (second, times)
            if "warm" not in marks and now >= t_warm:
                list(psutil.process_iter(["cpu_percent"]))  # prime per-process CPU counters
                threads_warm = srv.thread_cpu() if srv else {}
                proc_cpu["warm"] = [w.cpu_s() for _, w in named]
                if broker is not None:
                    jit["warm"] = jvm.jit_cpu_s(broker)
                prof_pid = profiled_pid(args, server)
                if args.profile and prof_pid:
                    prof = profile.start(prof_pid, duration - warmup, prof_path, args.profile_rate)
                marks["warm"] = (
                    time.monotonic(),
                    srv.cpu_s() if srv else 0.0,
                    gen.cpu_s(),
                    [w.cpu_s() for w in per_worker],
                    psutil.cpu_times(),
                )
            if "end" not in marks and now >= t_end:
                others = top_others({*server_pids, os.getpid(), *pool.pids})
                threads_end = srv.thread_cpu() if srv else {}
                proc_cpu["end"] = [w.cpu_s() for _, w in named]
                if broker is not None:
                    jit["end"] = jvm.jit_cpu_s(broker)
                marks["end"] = (
                    time.monotonic(),
                    srv.cpu_s() if srv else 0.0,
                    gen.cpu_s(),
                    [w.cpu_s() for w in per_worker],
                    psutil.cpu_times(),
                )
            mono = time.monotonic()
            if mono - last_print >= args.progress and progress and now < t_end + 1e9:
                last_print = mono
                tot = {k: sum(p.get(k, 0) for p in progress.values()) for k in last_counts}
                dt_s = mono - last_print_t
                last_print_t = mono
                rates = {k: (tot[k] - last_counts[k]) / dt_s for k in tot}
                last_counts = tot
                rss = srv.rss() if srv else 0
                rss_max = max(rss_max, rss)
                proc_rss_max = [
                    max(m, w.rss()) for m, (_, w) in zip(proc_rss_max, named, strict=True)
                ]
                scpu = srv_meter.mark() if srv_meter else float("nan")
                gcpu = gen_meter.mark()
                # Everything else on the machine in this interval (% of one core), so that
                # a run on a shared machine shows which of its seconds were contended.
                sys_now = psutil.cpu_times()
                sys_dt = sum(sys_now) - sum(last_sys)
                busy_dt = sys_dt - (sys_now.idle - last_sys.idle)
                busy_dt -= getattr(sys_now, "iowait", 0.0) - getattr(last_sys, "iowait", 0.0)
                steal_dt = speed.stolen_s(sys_now) - speed.stolen_s(last_sys)
                busy_dt -= steal_dt
                last_sys = sys_now
                ocpu = 100 * busy_dt / dt_s - (0.0 if scpu != scpu else scpu) - gcpu
                errs = sum(p.get("errors", 0) for p in progress.values())
                closed = sum(p.get("closed", 0) for p in progress.values())
                t_rel = (now - t0) / 1e9
                timeline.append(
                    {
                        "t": round(t_rel, 1),
                        **{f"{k}_per_s": round(v) for k, v in rates.items()},
                        "server_cpu_pct": round(scpu, 1),
                        "gen_cpu_pct": round(gcpu, 1),
                        "others_cpu_pct": round(ocpu, 1),
                        "server_rss": rss,
                        "processes_cpu_pct": {name: round(m.mark(), 1) for name, m in proc_meters},
                        "host_speed_probe_ms": probe.latest(),
                        "steal_pct": round(100 * steal_dt / dt_s, 1),
                    }
                )
                log(
                    f"  t={t_rel:5.1f}s  sends/s {rates['sent']:8.0f}  acks/s {rates['acked']:8.0f}"
                    f"  deliveries/s {rates['delivered']:9.0f}  server CPU {scpu:5.1f}%"
                    f" RSS {mb(rss)}  generator CPU {gcpu:5.1f}%  others {ocpu:5.1f}%"
                    f"  stolen {100 * steal_dt / dt_s:4.1f}%"
                    f"  errors {errs} closed {closed}"
                )
            if not server.alive():
                if isinstance(server, Cluster):
                    raise RuntimeError(f"cluster process exited: {server.dead()}")
                raise RuntimeError(f"server exited: {server.proc and server.proc.returncode}")
        rss_after = srv.rss() if srv else 0
        gc_list: list[dict[str, float]] = []
        if args.server_gc_log and server.log_path:
            gc_list = gc_pauses(server.log_path, t_warm / 1e9, t_end / 1e9)
        broker_gc = None
        for name, pid in services:
            with contextlib.suppress(psutil.Error):
                gc_log = jvm.log_path(psutil.Process(pid).cmdline())
                if name.startswith("kafka broker") and gc_log is not None:
                    found = jvm.pauses(gc_log, t_warm / 1e9, t_end / 1e9)
                    broker_gc = jvm.summary(found, t0 / 1e9)
        rss_max = max(rss_max, rss_after)
        if "end" not in marks:
            marks["end"] = (
                time.monotonic(),
                srv.cpu_s() if srv else 0.0,
                gen.cpu_s(),
                [],
                psutil.cpu_times(),
            )
        if "warm" not in marks:
            marks["warm"] = marks["end"]
        if "end" not in marks or not others:
            others = top_others({*server_pids, os.getpid(), *pool.pids})
        mw, sw, gw, ww, sys_w = marks["warm"]
        me, se, ge, we, sys_e = marks["end"]
        sys_all = sum(sys_e) - sum(sys_w)
        sys_idle = sys_e.idle - sys_w.idle
        sys_io = getattr(sys_e, "iowait", 0.0) - getattr(sys_w, "iowait", 0.0)
        sys_steal = speed.stolen_s(sys_e) - speed.stolen_s(sys_w)
        sys_busy = sys_all - sys_idle - sys_io - sys_steal
        span = max(1e-9, me - mw)
        p_warm = proc_cpu.get("warm", [])
        p_end = proc_cpu.get("end", [])
        processes = {
            name: {
                "cpu_pct": round(100 * (b - a) / span, 1) if p_end and p_warm else None,
                "rss": w.rss(),
                "rss_max": max(proc_rss_max[k], w.rss()),
            }
            for k, ((name, w), a, b) in enumerate(
                zip(named, p_warm or [0.0] * len(named), p_end or [0.0] * len(named), strict=True)
            )
        }
        window_cpu = {
            "processes": processes,
            "server_cpu_pct": round(100 * (se - sw) / span, 1) if srv else None,
            "generator_cpu_pct": round(100 * (ge - gw) / span, 1),
            "machine_busy_pct": round(100 * sys_busy / max(1e-9, sys_all), 1),
            # A service the cluster stores into (PostgreSQL) is listed in `processes`, not here.
            "others_cpu_pct": round(
                100 * (sys_busy - (se - sw) - (ge - gw)) / span
                - sum(p["cpu_pct"] or 0.0 for n, p in processes.items() if n in service_names),
                1,
            ),
            "machine_iowait_pct": round(100 * sys_io / max(1e-9, sys_all), 1),
            "machine_steal_pct": round(100 * sys_steal / max(1e-9, sys_all), 1),
            "steal_by_second": steal_by_second,
            "t0_unix_ns": t0,
            "others_top": others,
            "gc": gc_summary(gc_list, t0) if args.server_gc_log else None,
            "broker_gc": broker_gc,
            "broker_jit_cpu_pct": (
                round(100 * max(0.0, jit["end"] - jit["warm"]) / span, 1)
                if "warm" in jit and "end" in jit
                else None
            ),
            "wal_checkpoints": wal.events,
            "server_threads_cpu_pct": {
                k: round(100 * (v - threads_warm.get(k, 0.0)) / span, 1)
                for k, v in sorted(threads_end.items(), key=lambda kv: -kv[1])
                if v - threads_warm.get(k, 0.0) > 0.005 * span
            },
            "worker_cpu_pct": [
                round(100 * (b - a) / span, 1) for a, b in zip(ww, we, strict=False)
            ],
            "host_speed_probe_ms": speed.summarize(probe.between(mw, me)),
        }
    finally:
        probe.stop()
        pool.stop()
        profile.finish(prof)

    if prof is not None and prof_path.exists():
        meta["profile"] = profile.summarize(prof_path, duration - warmup, args.profile_rate)
    res = [results[i] for i in range(nw)]
    return summarize_traffic(
        args,
        mode,
        res,
        window_cpu,
        rooms,
        specs,
        rss_before,
        rss_after,
        rss_max,
        connect_s,
        ready,
        failed,
        timeline,
        params,
        meta,
        server,
    )


def _cat(res: list[dict[str, Any]], key: str) -> np.ndarray[Any, Any]:
    arrays = [np.frombuffer(r[key], dtype=np.int64) for r in res if len(r[key])]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def _sum_series(res: list[dict[str, Any]], key: str) -> list[int]:
    n = max((len(r[key]) for r in res), default=0)
    out = [0] * n
    for r in res:
        for i, v in enumerate(r[key]):
            out[i] += v
    return out


def summarize_traffic(
    args: argparse.Namespace,
    mode: str,
    res: list[dict[str, Any]],
    cpu: dict[str, Any],
    rooms: list[str],
    specs: list[ClientSpec],
    rss_before: int,
    rss_after: int,
    rss_max: int,
    connect_s: float,
    ready: int,
    failed: int,
    timeline: list[dict[str, Any]],
    params: dict[str, Any],
    meta: dict[str, Any],
    server: Target,
) -> dict[str, Any]:
    duration, warmup = args.duration, args.warmup
    warm_ms = int(warmup * 1000)
    dl_at, dl_lat = _cat(res, "dl_at_ms"), _cat(res, "dl_lat_us")
    # To the kernel's receive time at the client's socket (worker.py): the generator's own wait
    # for a CPU left out. Absent from results of workers older than it.
    dl_rx = _cat(res, "dl_rx_lat_us") if all("dl_rx_lat_us" in r for r in res) else dl_lat[:0]
    has_rx = dl_rx.size == dl_lat.size
    ack_at, ack_lat = _cat(res, "ack_at_ms"), _cat(res, "ack_lat_us")
    lag, lag_at = _cat(res, "send_lag_us"), _cat(res, "send_lag_at_ms")
    sel_dl = dl_at >= warm_ms
    sel_ack = ack_at >= warm_ms
    dl_sum = report.summarize_us(dl_lat[sel_dl])
    ack_sum = report.summarize_us(ack_lat[sel_ack])
    per_sec_dl = _sum_series(res, "per_sec_deliveries")
    per_sec_sends = _sum_series(res, "per_sec_sends")
    per_sec_acks = _sum_series(res, "per_sec_acks")
    a, b = math.ceil(warmup), max(math.ceil(warmup) + 1, math.floor(duration))
    win = per_sec_dl[a:b]
    dl_rate = sum(win) / max(1, len(win))
    sends_rate = sum(per_sec_sends[a:b]) / max(1, len(per_sec_sends[a:b]))
    acks_rate = sum(per_sec_acks[a:b]) / max(1, len(per_sec_acks[a:b]))
    sent = sum(r["sent"] for r in res)
    acked = sum(r["acked"] for r in res)
    send_errors = sum(r["send_errors"] for r in res)
    delivered = sum(r["delivered"] for r in res)
    sent_by_room: dict[str, int] = {}
    for r in res:
        for room, k in r["sent_by_room"].items():
            sent_by_room[room] = sent_by_room.get(room, 0) + k
    members: dict[str, int] = {}
    for s in specs:
        if s.room is not None:
            members[s.room] = members.get(s.room, 0) + 1
    expected = sum(k * members.get(room, 0) for room, k in sent_by_room.items())
    close_codes: dict[str, int] = {}
    for r in res:
        for code, k in r["close_codes"].items():
            close_codes[code] = close_codes.get(code, 0) + k
    errors = [e for r in res for e in r["error_samples"]][:10]
    result: dict[str, Any] = {
        "mode": mode,
        "machine": meta["machine"],
        "command": meta["command"],
        "params": params,
        "server": server_info(server),
        "connect": {"ready": ready, "failed": failed, "seconds": round(connect_s, 2)},
        "sent": sent,
        "acked": acked,
        "send_errors": send_errors,
        "errors_total": sum(r["errors"] for r in res),
        "error_samples": errors,
        "delivered": delivered,
        "delivered_expected": expected,
        "closed": sum(r["closed"] for r in res),
        "close_codes": close_codes,
        "window_s": [a, b],
        "sends_per_s": round(sends_rate, 1),
        "acks_per_s": round(acks_rate, 1),
        "deliveries_per_s": round(dl_rate, 1),
        "deliveries_per_s_peak": max(win, default=0),
        "send_to_ack_ms": ack_sum,
        "send_to_deliver_ms": dl_sum,
        "send_to_socket_ms": report.summarize_us(dl_rx[sel_dl]) if has_rx else {"n": 0},
        "send_lag_ms": report.summarize_us(lag[lag >= 0]) if lag.size else {"n": 0},
        "server_cpu_pct": cpu.get("server_cpu_pct"),
        "processes": cpu.get("processes") or None,
        "server_rss_before": rss_before,
        "server_rss_after": rss_after,
        "server_rss_max": rss_max,
        "generator_cpu_pct": cpu.get("generator_cpu_pct"),
        "worker_cpu_pct": cpu.get("worker_cpu_pct"),
        "machine_busy_pct": cpu.get("machine_busy_pct"),
        "machine_iowait_pct": cpu.get("machine_iowait_pct"),
        "machine_steal_pct": cpu.get("machine_steal_pct"),
        "host_speed_probe_ms": cpu.get("host_speed_probe_ms"),
        "others_cpu_pct": cpu.get("others_cpu_pct"),
        "others_top": cpu.get("others_top"),
        "server_gc": cpu.get("gc"),
        # The Kafka broker's GC pauses in the window, from its GC log (bench/jvm.py).
        "broker_gc": cpu.get("broker_gc"),
        # CPU of the broker's JIT compiler in the window (% of one core): high while it is cold.
        "broker_jit_cpu_pct": cpu.get("broker_jit_cpu_pct"),
        "wal_checkpoints_at_s": cpu.get("wal_checkpoints"),
        "server_threads_cpu_pct": cpu.get("server_threads_cpu_pct"),
        "worker_frames": sum(r["frames"] for r in res),
        "worker_recvs": sum(r["recvs"] for r in res),
        "timeline": timeline,
        # Second 0 of `per_second` starts here (wall clock), to line it up with other processes'
        # logs (a broker's GC pauses).
        "t0_unix_ns": cpu.get("t0_unix_ns"),
        "per_second": {
            "deliveries": per_sec_dl,
            "sends": per_sec_sends,
            "acks": per_sec_acks,
            "send_to_deliver_ms": report.per_second(dl_at, dl_lat),
            "send_to_socket_ms": report.per_second(dl_at, dl_rx) if has_rx else [],
            "send_to_ack_ms": report.per_second(ack_at, ack_lat),
            "send_lag_ms": report.per_second(lag_at, lag),
            "steal_pct": cpu.get("steal_by_second") or [],
        },
        "profile": meta.get("profile"),
    }
    stamp = meta["stamp"]
    json_path = OUT / f"{mode}-{stamp}.json"
    png_path = OUT / f"{mode}-{stamp}.png"
    result["files"] = {"json": str(json_path), "png": str(png_path)}
    title = f"GB6 {mode}: {meta['command']}\n{report.machine_line(meta['machine'])}"
    report.write_json(json_path, result)
    report.plot_latency(
        png_path, title, (dl_at, dl_lat), (ack_at, ack_lat), per_sec_dl, per_sec_sends, warmup
    )
    print_traffic(result)
    return result


def print_traffic(r: dict[str, Any]) -> None:
    log("")
    log(f"== {r['mode']}: {r['command']}")
    log(f"   {report.machine_line(r['machine'])}")
    p = r["params"]
    log("   " + "  ".join(f"{k}={v}" for k, v in p.items()))
    a, b = r["window_s"]
    log(f"measured window: seconds {a}..{b} after start (warm-up and drain excluded)")
    pct = 100 * r["delivered"] / r["delivered_expected"] if r["delivered_expected"] else 0
    log(
        f"sent {r['sent']:,}  acked {r['acked']:,}  send errors {r['send_errors']:,}  "
        f"all errors {r['errors_total']:,}  closed {r['closed']} {r['close_codes'] or ''}"
    )
    unacked = r["sent"] - r["acked"] - r["send_errors"]
    log(
        f"delivered {r['delivered']:,} of {r['delivered_expected']:,} expected ({pct:.2f}%)"
        + (
            f"; {unacked:,} sends still unacknowledged when the {r['params'].get('drain_s')} s"
            " drain ended (backlog, not necessarily loss)"
            if unacked > 0
            else ""
        )
    )
    log(
        f"rates in window: sends/s {r['sends_per_s']:,.0f}  acks/s {r['acks_per_s']:,.0f}  "
        f"deliveries/s {r['deliveries_per_s']:,.0f} (peak second {r['deliveries_per_s_peak']:,})"
    )
    log(report.fmt_lat("send→ack", r["send_to_ack_ms"]))
    log(report.fmt_lat("send→deliver", r["send_to_deliver_ms"]))
    if (r.get("send_to_socket_ms") or {}).get("n"):
        log(report.fmt_lat("send→socket", r["send_to_socket_ms"]))
        log("  (to the kernel's receive time at the client's socket, before the generator reads)")
    per_sec = (r.get("per_second") or {}).get("send_to_deliver_ms")
    if per_sec:
        steal = r["per_second"].get("steal_pct")
        log(f"send→deliver p99 per second: {report.fmt_seconds(per_sec, (a, b), steal)}")
    lag = r["send_lag_ms"]
    if lag.get("n"):
        log(f"generator send lag behind schedule: p99 {lag['p99']:.2f} ms  max {lag['max']:.2f} ms")
    scpu = r["server_cpu_pct"]
    who = "cluster (all processes)" if r.get("processes") else "server"
    log(
        f"{who}: CPU {scpu if scpu is not None else '?'}% of one core  "
        f"RSS {mb(r['server_rss_before'])} → {mb(r['server_rss_after'])} "
        f"(max {mb(r['server_rss_max'])})"
    )
    for name, pr in (r.get("processes") or {}).items():
        log(
            f"  {name}: CPU {pr['cpu_pct']}% of one core  RSS {mb(pr['rss'])} "
            f"(max {mb(pr['rss_max'])})"
        )
    if r.get("server_threads_cpu_pct"):
        th = ", ".join(f"{k} {v}%" for k, v in r["server_threads_cpu_pct"].items())
        who = "origin s1" if r.get("processes") else "server"
        log(f"{who} threads (CPU % of one core): {th}")
    log(
        f"generator: CPU {r['generator_cpu_pct']}% of one core in total "
        f"(workers {', '.join(f'{x}%' for x in r['worker_cpu_pct'])}); "
        f"{r['worker_frames']:,} frames in {r['worker_recvs']:,} reads"
    )
    log(
        f"machine: {r['machine_busy_pct']}% of all {r['machine']['cores_logical']} cores busy, "
        f"{r['machine_iowait_pct']}% iowait, {r.get('machine_steal_pct')}% stolen by the host; "
        f"other processes {r['others_cpu_pct']}% of one core"
    )
    if r.get("others_top"):
        log(f"  busiest other processes: {'; '.join(r['others_top'])}")
    log(speed.fmt(r.get("host_speed_probe_ms") or {}))
    if r.get("server_gc"):
        g = r["server_gc"]
        log(
            f"server GC pauses >= 2 ms in the window: {g['count']} totalling {g['total_ms']} ms, "
            f"max {g['max_ms']} ms; longest at s {g['longest']}"
        )
    if r.get("broker_gc"):
        g = r["broker_gc"]
        at = ", ".join(f"s {sec} {ms:g} ms" for sec, _, ms in g["at"])
        log(f"broker GC pauses in the window: {g['count']} totalling {g['total_ms']} ms ({at})")
    if cold := jvm.cold_warning(r.get("broker_jit_cpu_pct")):
        log(cold)
    if r.get("wal_checkpoints_at_s"):
        log(f"WAL restarts after checkpoints at s: {r['wal_checkpoints_at_s']}")
    if (r.get("others_cpu_pct") or 0) > 20:
        log(
            f"WARNING: other processes used {r['others_cpu_pct']}% of a core during the window; "
            "these figures describe a shared machine"
        )
    for e in r["error_samples"][:5]:
        log(f"  error sample: {e}")
    if r.get("profile"):
        profile.print_summary(r["profile"])
    log(f"results: {r['files']['json']}\nplot:    {r['files']['png']}")


def meta_for(args: argparse.Namespace, m: dict[str, Any]) -> dict[str, Any]:
    return {
        "machine": m,
        "command": "python -m bench.run " + " ".join(sys.argv[1:]),
        "stamp": time.strftime("%Y%m%d-%H%M%S"),
    }


def bootstrap_target(server: Target, rooms: int, size: int, *, label: str) -> Tenant:
    """One tenant, or in a cluster one per origin shard (an instance lives on the shard that
    created it) with `rooms / origins` rooms each: users come back in room order, so the
    members of a room are always of one tenant."""
    n = rooms * size
    t = time.monotonic()
    if not isinstance(server, Cluster):
        tenant = bootstrap(server.http, server.admin_token, n, label=label)
    else:
        k = len(server.origins)
        if rooms % k:
            sys.exit(f"--rooms ({rooms}) must be a multiple of --origins ({k})")
        parts = [
            bootstrap(o.http, o.admin_token, n // k, label=f"{label}-s{j + 1}")
            for j, o in enumerate(server.origins)
        ]
        tenant = Tenant(parts[0].org, parts[0].instance, [u for p in parts for u in p.users])
    log(f"bootstrap: {n} users with tokens in {time.monotonic() - t:.1f} s")
    return tenant


def cluster_params(server: Target) -> dict[str, Any]:
    if not isinstance(server, Cluster):
        return {}
    return {"origins": len(server.origins), "edges": len(server.edges), "store": server.store}


def run_load(args: argparse.Namespace, server: Target, m: dict[str, Any]) -> dict[str, Any]:
    n, k = args.clients, args.rooms
    size = n // k
    n = size * k
    log(f"load: {n} clients in {k} rooms of {size}, {args.rate:g} sends/s for {args.duration:g} s")
    tenant = bootstrap_target(server, k, size, label="load")
    t = time.monotonic()
    groups = [tenant.users[r * size : (r + 1) * size] for r in range(k)]
    rooms = create_rooms(server.ws, groups, label="load")
    log(f"rooms: {k} created in {time.monotonic() - t:.1f} s")
    params = {
        "clients": n,
        "rooms": k,
        "room_size": size,
        "rate": args.rate,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "drain_s": args.drain,
        "workers": args.workers,
        "sample_every": args.sample,
        "read_interval_ms": args.read_interval_ms,
        "text_bytes": len(args.text.encode()),
        **cluster_params(server),
    }
    return traffic(
        args,
        server,
        mode="load",
        tenant=tenant,
        rooms=rooms,
        room_size=size,
        senders=set(range(n)),
        rate=args.rate,
        params=params,
        meta=meta_for(args, m),
    )


def run_fanout(args: argparse.Namespace, server: Target, m: dict[str, Any]) -> dict[str, Any]:
    n = args.clients
    log(
        f"fanout: {n} clients in one room, {args.senders} senders, "
        + (f"{args.rate:g} sends/s" if args.rate > 0 else f"closed loop, window {args.window}")
    )
    if isinstance(server, Cluster) and len(server.origins) != 1:
        sys.exit("fanout is one room: use --origins 1")
    tenant = bootstrap_target(server, 1, n, label="fanout")
    rooms = create_rooms(server.ws, [tenant.users], label="fanout")
    params = {
        "clients": n,
        "rooms": 1,
        "senders": args.senders,
        "rate": args.rate if args.rate > 0 else "max",
        "window": args.window,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "drain_s": args.drain,
        "workers": args.workers,
        "sample_every": args.sample,
        "read_interval_ms": args.read_interval_ms,
        "text_bytes": len(args.text.encode()),
        **cluster_params(server),
    }
    # Senders spread over workers by the round-robin split (clients 0..senders-1).
    return traffic(
        args,
        server,
        mode="fanout",
        tenant=tenant,
        rooms=rooms,
        room_size=n,
        senders=set(range(min(args.senders, n))),
        rate=args.rate,
        params=params,
        meta=meta_for(args, m),
    )


def run_appends(args: argparse.Namespace, server: Target, m: dict[str, Any]) -> dict[str, Any]:
    """Closed loop: every client sends with `--window` unacknowledged sends, in rooms of
    `--room-size`. An ack comes once the append is durable, so acks/s is durable appends/s;
    divided by the origin shards it is the per-shard figure."""
    size = args.room_size
    if not 1 <= size <= args.clients:
        sys.exit(f"--room-size must be 1..--clients ({args.clients})")
    k = args.clients // size
    n = k * size
    shards = len(server.origins) if isinstance(server, Cluster) else 1
    log(
        f"appends: {n} senders in {k} rooms of {size}, closed loop with {args.window} "
        f"unacknowledged sends each, {args.duration:g} s, {shards} origin shard(s)"
    )
    tenant = bootstrap_target(server, k, size, label="appends")
    t = time.monotonic()
    groups = [tenant.users[r * size : (r + 1) * size] for r in range(k)]
    rooms = create_rooms(server.ws, groups, label="appends")
    log(f"rooms: {k} created in {time.monotonic() - t:.1f} s")
    params = {
        "clients": n,
        "rooms": k,
        "room_size": size,
        "rate": "max",
        "window": args.window,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "drain_s": args.drain,
        "workers": args.workers,
        "sample_every": args.sample,
        "read_interval_ms": args.read_interval_ms,
        "text_bytes": len(args.text.encode()),
        **cluster_params(server),
    }
    r = traffic(
        args,
        server,
        mode="appends",
        tenant=tenant,
        rooms=rooms,
        room_size=size,
        senders=set(range(n)),
        rate=0.0,
        params=params,
        meta=meta_for(args, m),
    )
    per_shard = r["acks_per_s"] / shards
    r["durable_appends_per_s_per_shard"] = round(per_shard, 1)
    report.write_json(Path(r["files"]["json"]), r)
    log(
        f"durable appends/s per origin shard: {per_shard:,.0f} "
        f"({r['acks_per_s']:,.0f} acks/s over {shards} shard(s), {n} senders, window "
        f"{args.window}); latency is queueing by construction (Little's law)"
    )
    return r


# --- idle -----------------------------------------------------------------------------------------


def run_idle(args: argparse.Namespace, server: Server, m: dict[str, Any]) -> dict[str, Any]:
    c = args.connections
    u = min(args.users, c)
    log(f"idle: {c} connections (hello only) for {u} users")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t = time.monotonic()
    tenant = bootstrap(server.http, server.admin_token, u, label="idle")
    log(f"bootstrap: {u} users with tokens in {time.monotonic() - t:.1f} s")
    if not server.pid:
        raise RuntimeError("idle mode needs the server's pid (--server-pid)")
    srv = ProcWatch([server.pid])
    time.sleep(2.0)
    rss0, uss0 = srv.rss(), srv.uss()
    fds0 = srv.fds()
    log(f"server before: RSS {mb(rss0)} USS {mb(uss0)} fds {fds0}")
    specs = [ClientSpec(token=tenant.users[i % u].token, room=None) for i in range(c)]
    nw = max(1, min(args.workers, c))
    cfgs = [
        WorkerConfig(
            index=w,
            ws_url=server.ws,
            clients=part,
            connect_concurrency=args.connect_concurrency,
            ping_fraction=args.ping_fraction,
            nofile=len(part) + 256,
        )
        for w, part in enumerate(split(specs, nw))
    ]
    points: list[tuple[int, int]] = [(0, rss0)]
    t_conn = time.monotonic()
    srv_meter = CpuMeter(srv)
    pool = open_pool(cfgs, args.generator)
    try:
        last = [0.0, -1]

        def connecting(k: int) -> None:
            mono = time.monotonic()
            if k != last[1] and mono - last[0] > 0.5:
                points.append((k, srv.rss()))
                last[1] = k
            if mono - last[0] > 3:
                last[0] = mono
                log(f"  connecting: {k}/{c} ready, server RSS {mb(srv.rss())}")

        summaries = pool.wait_ready(connecting)
        connect_s = time.monotonic() - t_conn
        connect_cpu = srv_meter.mark()
        heartbeat_s = summaries[0]["heartbeat_ms"] / 1000
        ready = sum(s["ready"] for s in summaries)
        failed = sum(s["failed"] for s in summaries)
        log(
            f"connected {ready}/{c} in {connect_s:.1f} s ({failed} failed), "
            f"server CPU {connect_cpu:.0f}% while connecting"
        )
        for s in summaries:
            for e in s["connect_errors"][:3]:
                log(f"  connect error: {e}")
        time.sleep(args.settle)
        rss1, uss1 = srv.rss(), srv.uss()
        fds1 = srv.fds()
        points.append((ready, rss1))
        srv_meter.mark()
        gen = ProcWatch([os.getpid(), *pool.pids], children=False)
        gen_meter = CpuMeter(gen)
        sys0 = psutil.cpu_times()
        list(psutil.process_iter(["cpu_percent"]))  # prime per-process CPU counters
        prof_path = OUT / f"idle-{stamp}-pyspy.txt"
        prof = profile.start(server.pid, args.hold, prof_path, 200) if args.profile else None
        time.sleep(args.hold)
        hold_cpu = srv_meter.mark()
        gen_cpu = gen_meter.mark()
        sys1 = psutil.cpu_times()
        others = top_others({server.pid, os.getpid(), *pool.pids})
        profile.finish(prof)
        busy_s = (sum(sys1) - sum(sys0)) - (sys1.idle - sys0.idle)
        busy_s -= getattr(sys1, "iowait", 0.0) - getattr(sys0, "iowait", 0.0)
        busy_s -= speed.stolen_s(sys1) - speed.stolen_s(sys0)
        others_pct = 100 * busy_s / args.hold - hold_cpu - gen_cpu
        rss2 = srv.rss()
        threads = srv.threads()
    finally:
        pool.stop()
    time.sleep(2.0)
    rss3 = srv.rss()
    per_conn = (rss1 - rss0) / max(1, ready)
    per_conn_uss = (uss1 - uss0) / max(1, ready)
    xs = np.array([p[0] for p in points], dtype=float)
    ys = np.array([p[1] for p in points], dtype=float)
    slope = float(np.polyfit(xs, ys, 1)[0]) if len(set(xs.tolist())) >= 3 else None
    result: dict[str, Any] = {
        "mode": "idle",
        "machine": m,
        "command": meta_for(args, m)["command"],
        "params": {
            "connections": c,
            "users": u,
            "workers": nw,
            "settle_s": args.settle,
            "hold_s": args.hold,
        },
        "server": server_info(server),
        "connect": {
            "ready": ready,
            "failed": failed,
            "seconds": round(connect_s, 2),
            "per_s": round(ready / max(1e-9, connect_s), 1),
            "server_cpu_pct": round(connect_cpu, 1),
        },
        "server_rss_before": rss0,
        "server_rss_connected": rss1,
        "server_rss_after_hold": rss2,
        "server_rss_after_close": rss3,
        "server_uss_before": uss0,
        "server_uss_connected": uss1,
        "server_fds": [fds0, fds1],
        "server_threads": threads,
        "rss_per_connection_bytes": round(per_conn),
        "uss_per_connection_bytes": round(per_conn_uss),
        "rss_slope_bytes_per_connection": round(slope) if slope is not None else None,
        "server_idle_cpu_pct": round(hold_cpu, 1),
        "generator_cpu_pct_hold": round(gen_cpu, 1),
        "others_cpu_pct_hold": round(others_pct, 1),
        "others_top": others,
        "ping_every_s": round(heartbeat_s * args.ping_fraction, 1),
        "profile": (
            profile.summarize(prof_path, args.hold, 200)
            if prof is not None and prof_path.exists()
            else None
        ),
        "rss_points": points,
    }
    json_path = OUT / f"idle-{stamp}.json"
    png_path = OUT / f"idle-{stamp}.png"
    result["files"] = {"json": str(json_path), "png": str(png_path)}
    report.write_json(json_path, result)
    report.plot_idle(png_path, f"GB6 idle: {result['command']}\n{report.machine_line(m)}", points)
    log("")
    log(f"== idle: {result['command']}")
    log(f"   {report.machine_line(m)}")
    log(
        f"connections: {ready} ready, {failed} failed, {ready / max(1e-9, connect_s):.0f}/s; "
        f"server fds {fds0} → {fds1}; server nofile {result['server']['nofile']}"
    )
    log(
        f"server RSS {mb(rss0)} → {mb(rss1)} with {ready} connections: "
        f"{per_conn / 1024:.1f} KiB/connection (USS {per_conn_uss / 1024:.1f} KiB"
        + (f", slope {slope / 1024:.1f} KiB" if slope is not None else "")
        + ")"
    )
    log(
        f"server idle CPU with {ready} connections, each pinging every "
        f"{result['ping_every_s']} s: {hold_cpu:.1f}% of one core; "
        f"RSS after hold {mb(rss2)}, after closing all {mb(rss3)}"
    )
    log(
        f"generator CPU during the hold {gen_cpu:.1f}%; other processes {others_pct:.1f}%"
        + (f" ({'; '.join(others)})" if others else "")
    )
    if result["profile"]:
        profile.print_summary(result["profile"])
    log(f"results: {json_path}\nplot:    {png_path}")
    return result


def now_ns() -> int:
    return time.time_ns()


class WalWatch:
    """Notices SQLite WAL restarts (after a checkpoint): the checkpoint sequence number in the
    WAL header (bytes 12..16) goes up. Sampled a few times per second from outside."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.seq: int | None = None
        self.events: list[float] = []
        self.last = 0.0

    def sample(self, t_rel: float) -> None:
        if self.path is None or time.monotonic() - self.last < 0.2:
            return
        self.last = time.monotonic()
        try:
            with self.path.open("rb") as f:
                head = f.read(16)
        except OSError:
            return
        if len(head) < 16:
            return
        seq = int.from_bytes(head[12:16], "big")
        if self.seq is not None and seq != self.seq:
            self.events.append(round(t_rel, 1))
        self.seq = seq


def gc_summary(pauses: list[dict[str, float]], t0: int) -> dict[str, Any]:
    longest = sorted(pauses, key=lambda p: -p["ms"])[:5]
    return {
        "count": len(pauses),
        "total_ms": round(sum(p["ms"] for p in pauses), 1),
        "max_ms": max((p["ms"] for p in pauses), default=0.0),
        "by_generation": {
            str(g): sum(1 for p in pauses if p["gen"] == g)
            for g in sorted({p["gen"] for p in pauses})
        },
        "longest": [[round(p["at"] - t0 / 1e9, 1), p["ms"], p["gen"]] for p in longest],
    }


def top_others(exclude: set[int], n: int = 4) -> list[str]:
    """The busiest processes outside the benchmark since the last process_iter() call."""
    procs = [
        p
        for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_percent"])
        if p.info["pid"] not in exclude and (p.info["cpu_percent"] or 0) >= 1.0
    ]
    procs.sort(key=lambda p: p.info["cpu_percent"] or 0.0, reverse=True)
    return [
        f"{p.info['cpu_percent']:.0f}% {' '.join(p.info['cmdline'] or [p.info['name']])[:80]}"
        for p in procs[:n]
    ]


def wait_quiet(max_s: float, busy_pct: float = 15.0) -> None:
    """Wait (bounded) until the machine is mostly idle: other work skews every figure."""
    deadline = time.monotonic() + max_s
    while True:
        list(psutil.process_iter(["cpu_percent"]))  # prime per-process counters
        pct = psutil.cpu_times_percent(interval=2.0)
        stolen = speed.stolen_s(pct)
        busy = 100.0 - pct.idle - getattr(pct, "iowait", 0.0) - stolen
        if busy < busy_pct:
            log(f"machine quiet: {busy:.0f}% busy over 2 s ({stolen:.0f}% stolen by the host)")
            return
        if time.monotonic() > deadline:
            log(f"WARNING: machine still {busy:.0f}% busy after {max_s:.0f} s; going on anyway")
            return
        procs = sorted(
            psutil.process_iter(["pid", "cmdline", "cpu_percent"]),
            key=lambda p: p.info["cpu_percent"] or 0.0,
            reverse=True,
        )[:3]
        names = "; ".join(
            f"{p.info['cpu_percent']:.0f}% {' '.join(p.info['cmdline'] or [])[:70]}" for p in procs
        )
        log(f"machine {busy:.0f}% busy ({names}); waiting")


# --- main -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="mode", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group("server")
        g.add_argument("--ws", help="attach to this ws:// URL instead of starting gb6")
        g.add_argument("--http", help="the attached node's http:// URL")
        g.add_argument("--admin-token", help="the attached node's admin token")
        g.add_argument("--server-pid", type=int, help="the attached node's pid")
        g.add_argument(
            "--server-arg",
            action="append",
            help="extra argument for `gb6 run` (repeatable), e.g. --server-arg=--config",
        )
        g.add_argument("--keep-data", action="store_true", help="keep the server's data dir")
        g.add_argument(
            "--server-prelude",
            help="experiment: Python to run in the server process before gb6 starts "
            "(e.g. 'import gc; gc.set_threshold(50000, 50, 100)'); the server code is unchanged",
        )
        g.add_argument(
            "--server-gc-log",
            action="store_true",
            help="log the server's garbage-collector pauses (a gc.callbacks hook, via python -c)",
        )
        g.add_argument(
            "--server-switch-interval-ms",
            type=float,
            default=0.0,
            help="experiment: start gb6 after sys.setswitchinterval(X ms) (CPython default 5)",
        )
        c = sp.add_argument_group("cluster (instead of one `gb6 run`)")
        c.add_argument(
            "--cluster",
            action="store_true",
            help="start `gb6 origin` x --origins and `gb6 edge` x --edges; clients round-robin "
            "over the edges",
        )
        c.add_argument("--origins", type=int, default=1, help="origin shards (default 1)")
        c.add_argument("--edges", type=int, default=2, help="edges (default 2)")
        c.add_argument(
            "--store",
            choices=["sqlite", "postgres", "kafka"],
            default="sqlite",
            help="the origins' store; postgres: GB6_PG_DSN, a fresh schema per origin, dropped "
            "afterwards; kafka: log of record on GB6_KAFKA_BOOTSTRAP (default 127.0.0.1:59092), "
            "a fresh topic per origin, deleted afterwards, and PostgreSQL as for postgres",
        )
        sp.add_argument(
            "--quiet-wait",
            type=float,
            default=60.0,
            help="first wait up to this many seconds for an idle machine (0: don't)",
        )
        sp.add_argument(
            "--workers",
            type=int,
            default=max(1, os.cpu_count() or 1),
            help="load-generator processes (default: one per core)",
        )
        sp.add_argument(
            "--generator",
            choices=("auto", "go", "python"),
            default="auto",
            help="load-generator workers: Go (bench/gen/, far less CPU) or Python "
            "(bench/worker.py); auto: Go where `go` is installed",
        )

    def traffic_opts(sp: argparse.ArgumentParser, clients: int, duration: float) -> None:
        common(sp)
        sp.add_argument("--clients", type=int, default=clients)
        sp.add_argument("--duration", type=float, default=duration, help="seconds of sending")
        sp.add_argument(
            "--warmup", type=float, default=3.0, help="seconds at the start left out of the figures"
        )
        sp.add_argument(
            "--drain",
            type=float,
            default=5.0,
            help="max seconds to wait for acks and deliveries after sending stops",
        )
        sp.add_argument(
            "--sample",
            type=int,
            default=1,
            help="extract send→deliver latency on 1 client in N (all count)",
        )
        sp.add_argument(
            "--read-interval-ms",
            type=float,
            default=0.0,
            help="workers poll at most this often: cheaper reads, up to this much added latency",
        )
        sp.add_argument("--text", default="hello from the GB6 bench", help="body.text")
        sp.add_argument("--progress", type=float, default=5.0, help="seconds between lines")
        sp.add_argument(
            "--profile",
            action="store_true",
            help="sample the server with py-spy during the measured window",
        )
        sp.add_argument("--profile-rate", type=int, default=200, help="py-spy samples/s")
        sp.add_argument(
            "--profile-process",
            default="origin s1",
            help="with --cluster --profile: which process ('origin s1', 'edge e2', ...)",
        )
        sp.add_argument(
            "--profile-gil",
            action="store_true",
            help="with --profile: sample only the thread holding the GIL",
        )
        sp.add_argument(
            "--profile-native",
            action="store_true",
            help="with --profile: C frames too (sqlite, take_gil, syscalls); pauses the server",
        )

    lp = sub.add_parser("load", help="N clients in M rooms at an aggregate send rate")
    traffic_opts(lp, 1000, 30.0)
    lp.add_argument("--rooms", type=int, default=100)
    lp.add_argument("--rate", type=float, default=2000.0, help="sends/s, all clients together")

    fp = sub.add_parser("fanout", help="one big room; deliveries/s from one edge")
    traffic_opts(fp, 500, 15.0)
    fp.add_argument("--senders", type=int, default=4)
    fp.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="sends/s all senders together; 0 = as fast as acks allow (--window)",
    )
    fp.add_argument("--window", type=int, default=16, help="unacknowledged sends per sender")
    fp.set_defaults(sample=10)

    ap = sub.add_parser("appends", help="closed loop: durable appends/s per origin shard")
    traffic_opts(ap, 200, 15.0)
    ap.add_argument("--room-size", type=int, default=2, help="members per room")
    ap.add_argument("--window", type=int, default=16, help="unacknowledged sends per client")

    sp = sub.add_parser("store", help="the embedded log of record alone, in this process")
    sp.add_argument("--rate", type=float, default=2000.0, help="appends/s; 0 = closed loop")
    sp.add_argument("--inflight", type=int, default=2000, help="closed loop: appends in flight")
    sp.add_argument("--rooms", type=int, default=100)
    sp.add_argument("--duration", type=float, default=10.0)
    sp.add_argument("--burn", type=float, default=0.0, help="keep the trio thread PCT%% busy")
    sp.add_argument("--text", default="hello from the GB6 bench")
    sp.add_argument(
        "--switch-interval-ms", type=float, default=0.0, help="sys.setswitchinterval (0: keep)"
    )

    from bench.linkload import add_arguments as links_arguments

    links_help = "one origin shard loaded over the edge-origin link: durable appends/s per shard"
    links_arguments(sub.add_parser("links", help=links_help))

    from bench.relay import add_arguments as relay_arguments

    relay_help = "the SFU: forwarded RTP packets/s, CPU and loss vs subscribers"
    relay_arguments(sub.add_parser("relay", help=relay_help))
    from bench.presence import add_arguments as presence_arguments

    presence_help = "presence across edges in Redis: what an edge's sweep costs"
    presence_arguments(sub.add_parser("presence", help=presence_help))
    ip = sub.add_parser("idle", help="C idle connections: server RSS per connection")
    common(ip)
    ip.add_argument("--connections", type=int, default=10_000)
    ip.add_argument(
        "--users",
        type=int,
        default=1000,
        help="users whose tokens the connections share round-robin",
    )
    ip.add_argument(
        "--connect-concurrency", type=int, default=200, help="handshakes in flight per worker"
    )
    ip.add_argument("--settle", type=float, default=3.0)
    ip.add_argument("--hold", type=float, default=10.0)
    ip.add_argument(
        "--ping-fraction",
        type=float,
        default=0.5,
        help="each connection pings every heartbeat_ms * this (the protocol needs <= 1)",
    )
    ip.add_argument(
        "--profile", action="store_true", help="sample the server with py-spy during the hold"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    m = report.machine()
    log(f"machine: {report.machine_line(m)}")
    if args.mode == "relay":
        from bench.relay import run_relay

        run_relay(args, m)
        return 0
    if args.mode == "links":
        from bench.linkload import run_links

        run_links(args, m, meta_for(args, m))
        return 0
    if args.mode == "presence":
        from bench.presence import run_presence

        run_presence(args, m, meta_for(args, m))
        return 0
    if args.mode == "store":
        from bench.store import run_store

        run_store(args, m, meta_for(args, m))
        return 0
    want = (args.connections if args.mode == "idle" else args.clients) * 2 + 1024
    nofile = raise_nofile(want)
    log(f"RLIMIT_NOFILE raised to {nofile} (wanted {want}); the server inherits it")
    if args.quiet_wait > 0:
        wait_quiet(args.quiet_wait)
    if args.mode == "idle" and args.cluster:
        sys.exit("idle measures one process: no --cluster")
    if args.mode != "idle" and args.cluster:
        # Each origin's tenant gets an equal share of the rooms (fanout: one room, one origin).
        if args.mode == "load":
            k = args.rooms
        elif args.mode == "appends":
            k = args.clients // max(1, args.room_size)
        else:
            k = 1
        if k % args.origins:
            sys.exit(f"{k} rooms must be a multiple of --origins ({args.origins})")
    server = open_server(args)
    try:
        if args.mode == "load":
            run_load(args, server, m)
        elif args.mode == "fanout":
            run_fanout(args, server, m)
        elif args.mode == "appends":
            run_appends(args, server, m)
        else:
            assert isinstance(server, Server)
            run_idle(args, server, m)
    finally:
        rc = server.stop()
        if rc is not None:
            log(f"server stopped (exit {rc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
