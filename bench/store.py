"""The embedded log of record alone: `origin.sqlite_store.SqliteStore` appends in this process.

Separates the storage cost from the gateway's: appends/s, submit→durable latency, group-commit
batch sizes and the CPU of the trio thread and of the writer thread. `--burn PCT` keeps the trio
thread busy with pure-Python work for PCT% of the time (as the gateway's fan-out does in a real
node), which shows how much the writer thread suffers from sharing the GIL with it.

    python -m bench.run store [--rate 2000 | --rate 0 --inflight 2000] [--burn 60]
                              [--switch-interval-ms 0.5]

`--switch-interval-ms` sets `sys.setswitchinterval` (CPython's default is 5 ms): how long a
thread that wants the GIL back (say, the writer after a sqlite call) waits for a busy holder.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import trio

from bench import report


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads: `main` and `writer` (the store's thread)."""
    me = psutil.Process()
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for t in me.threads():
        name = "main" if t.id == me.pid else names.get(t.id, f"tid {t.id}")
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out


async def _run(args: Any, data: Path) -> dict[str, Any]:
    from node.config import Limits
    from node.errors import GB6Error
    from origin.sqlite_store import AppendItem, SqliteStore

    lat_us: list[int] = []
    batches: list[int] = []
    rooms = [f"room-{i}" for i in range(args.rooms)]
    text = args.text
    state = {"acked": 0, "inflight": 0}
    more = trio.Event()

    def on_appended(results: list[tuple[Any, Any]]) -> None:
        now = time.perf_counter_ns()
        batches.append(len(results))
        for item, res in results:
            if isinstance(res, GB6Error):
                raise res
            lat_us.append((now - item.reply) // 1000)
        state["acked"] += len(results)
        state["inflight"] -= len(results)
        more.set()

    store = SqliteStore(data / "gb6.db", Limits(), on_appended)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        cpu0: dict[str, float] = {}
        t_start = 0.0

        async def burner(frac: float) -> None:
            # busy for frac of every 10 ms, pure Python (holds the GIL)
            while True:
                end = time.perf_counter() + 0.01 * frac
                x = 0
                while time.perf_counter() < end:
                    x += 1
                await trio.sleep(0.01 * (1 - frac))

        if args.burn > 0:
            nursery.start_soon(burner, args.burn / 100)
        await trio.sleep(0.5)
        cpu0 = _thread_cpu()
        t_start = time.perf_counter()
        deadline = t_start + args.duration
        sent = 0
        seq = 0
        while time.perf_counter() < deadline:
            if args.rate > 0:
                due = int((time.perf_counter() - t_start) * args.rate) + 1
                while sent < due:
                    seq += 1
                    room = rooms[seq % len(rooms)]
                    item = AppendItem(
                        room=room,
                        sender=f"u{seq % 1000}",
                        type="message",
                        cid=str(seq),
                        body={"text": text, "t": seq},
                        reply=time.perf_counter_ns(),
                    )
                    state["inflight"] += 1
                    await store.submit_append(item)
                    sent += 1
                await trio.sleep(max(0.0, t_start + (sent / args.rate) - time.perf_counter()))
            else:
                while state["inflight"] < args.inflight:
                    seq += 1
                    item = AppendItem(
                        room=rooms[seq % len(rooms)],
                        sender=f"u{seq % 1000}",
                        type="message",
                        cid=str(seq),
                        body={"text": text, "t": seq},
                        reply=time.perf_counter_ns(),
                    )
                    state["inflight"] += 1
                    await store.submit_append(item)
                    sent += 1
                more = trio.Event()
                with trio.move_on_after(0.05):
                    await more.wait()
        elapsed = time.perf_counter() - t_start
        acked_in_window = state["acked"]
        cpu1 = _thread_cpu()
        await store.wait_idle()
        nursery.cancel_scope.cancel()
    lat = np.array(lat_us, dtype=np.int64)
    cpu = {
        k: round(100 * (v - cpu0.get(k, 0.0)) / elapsed, 1)
        for k, v in cpu1.items()
        if v - cpu0.get(k, 0.0) > 0.005 * elapsed
    }
    return {
        "appends_per_s": round(acked_in_window / elapsed, 1),
        "submitted": sent,
        "submit_to_durable_ms": report.summarize_us(lat),
        "commits": len(batches),
        "batch_mean": round(float(np.mean(batches)), 1) if batches else 0,
        "batch_max": max(batches, default=0),
        "thread_cpu_pct": cpu,
    }


def run_store(args: Any, m: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    with tempfile.TemporaryDirectory(prefix="gb6-bench-store-") as tmp:
        res = trio.run(_run, args, Path(tmp))
    result = {
        "mode": "store",
        "machine": m,
        "command": meta["command"],
        "params": {
            "rate": args.rate or "max",
            "inflight": args.inflight,
            "rooms": args.rooms,
            "duration_s": args.duration,
            "burn_pct": args.burn,
            "switch_interval_ms": sys.getswitchinterval() * 1000,
        },
        **res,
    }
    path = Path(__file__).resolve().parent / "out" / f"store-{meta['stamp']}.json"
    report.write_json(path, result)
    print(f"\n== store: {result['command']}\n   {report.machine_line(m)}")
    print("   " + "  ".join(f"{k}={v}" for k, v in result["params"].items()))
    print(
        f"appends/s {res['appends_per_s']:,.0f} ({res['submitted']:,} submitted); "
        f"{res['commits']:,} commits, batch mean {res['batch_mean']} max {res['batch_max']}"
    )
    print(report.fmt_lat("submit→durable", res["submit_to_durable_ms"]))
    th = ", ".join(f"{k} {v}%" for k, v in res["thread_cpu_pct"].items())
    print(f"threads (CPU % of one core): {th}")
    print(f"results: {path}", flush=True)
    return result
