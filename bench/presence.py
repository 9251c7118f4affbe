"""Presence across edges in Redis: what each edge's sweep costs (`edge.shared_signals`).

Every `SWEEP_S` (10 s) an edge settles the users it shows online or away and those connected to
it, and reads the change feed of each instance it follows. This measures, on the Redis of
`GB6_REDIS_URL` (`scripts/services up`), with U users connected to one edge across I instances:
the sessions' adds (sessions/s through the registry's batching writer), then the sweep's wall
time and the Redis CPU it takes (from `INFO cpu`), as a fraction of the sweep interval.

    python -m bench.run presence [--users 10000] [--instances 10] [--sweeps 5]

Keys go under a prefix of their own, deleted afterwards.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import trio
import trio_asyncio
from trio_asyncio import aio_as_trio

from bench import report


def add_arguments(p: Any) -> None:
    p.add_argument("--users", type=int, default=10_000, help="users connected to the edge")
    p.add_argument("--instances", type=int, default=10, help="instances they belong to")
    p.add_argument("--sweeps", type=int, default=5)


async def _redis_cpu_s(client: Any) -> float:
    """asyncio side: Redis's CPU seconds so far (user + system, its main thread included)."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _delete_prefixed(client: Any, prefix: str) -> None:
    """asyncio side: delete the run's keys."""
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=1000)]
    for i in range(0, len(keys), 1000):
        await client.delete(*keys[i : i + 1000])


async def _run(args: Any, url: str) -> dict[str, Any]:
    from edge.bus import MAX_LOCATE_USERS
    from edge.redis_bus import RedisPubSub, RedisSessions, open_redis
    from edge.shared_signals import SWEEP_S, SharedSignals

    prefix = f"gb6bench:{uuid.uuid4().hex[:8]}:"
    users = {f"u{i}": f"ins_{i % args.instances}" for i in range(args.users)}
    async with trio_asyncio.open_loop(), open_redis(url) as client:
        try:
            async with trio.open_nursery() as nursery:
                sessions = RedisSessions(client, "bench-edge", prefix=prefix, ttl=60.0)
                pubsub = RedisPubSub(client, prefix=prefix)
                await nursery.start(sessions.run)
                await nursery.start(pubsub.run)
                shared = SharedSignals(pubsub, sessions, "bench-edge")
                shared.users_here = lambda: users
                await nursery.start(shared.run)
                for instance in sorted(set(users.values())):
                    await shared.follow_instance(instance)
                t0 = time.perf_counter()
                async with trio.open_nursery() as adding:
                    limit = trio.CapacityLimiter(512)

                    async def add(user: str, instance: str) -> None:
                        async with limit:
                            shared.announce(
                                instance, await sessions.add(user, f"ses_{user}", instance)
                            )

                    for user, instance in users.items():
                        adding.start_soon(add, user, instance)
                add_s = time.perf_counter() - t0
                walls: list[float] = []
                cpus: list[float] = []
                for _ in range(args.sweeps):
                    cpu0 = await aio_as_trio(_redis_cpu_s)(client)
                    t = time.perf_counter()
                    await shared.sweep()
                    walls.append(time.perf_counter() - t)
                    cpus.append(await aio_as_trio(_redis_cpu_s)(client) - cpu0)
                nursery.cancel_scope.cancel()
        finally:
            await aio_as_trio(_delete_prefixed)(client, prefix)
    walls.sort()
    cpus.sort()
    return {
        "sessions_added_per_s": round(args.users / add_s),
        "settle_calls_per_sweep": -(-args.users // MAX_LOCATE_USERS),
        "sweep_wall_ms": {
            "median": round(walls[len(walls) // 2] * 1000, 1),
            "max": round(walls[-1] * 1000, 1),
        },
        "sweep_redis_cpu_ms": {
            "median": round(cpus[len(cpus) // 2] * 1000, 1),
            "max": round(cpus[-1] * 1000, 1),
        },
        "redis_cpu_pct_of_interval": round(100 * cpus[len(cpus) // 2] / SWEEP_S, 2),
    }


def run_presence(args: Any, m: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    url = os.environ.get("GB6_REDIS_URL")
    if not url:
        raise SystemExit('presence needs GB6_REDIS_URL: eval "$(scripts/services up redis)"')
    res = trio.run(_run, args, url)
    result = {
        "mode": "presence",
        "machine": m,
        "command": meta["command"],
        "params": {"users": args.users, "instances": args.instances, "sweeps": args.sweeps},
        **res,
    }
    path = Path(__file__).resolve().parent / "out" / f"presence-{meta['stamp']}.json"
    report.write_json(path, result)
    print(f"\n== presence: {result['command']}\n   {report.machine_line(m)}")
    print("   " + "  ".join(f"{k}={v}" for k, v in result["params"].items()))
    print(f"sessions added/s {res['sessions_added_per_s']:,}")
    print(
        f"sweep: {res['settle_calls_per_sweep']} settle calls; wall ms {res['sweep_wall_ms']};"
        f" Redis CPU ms {res['sweep_redis_cpu_ms']}"
        f" = {res['redis_cpu_pct_of_interval']}% of the sweep interval"
    )
    print(f"results: {path}", flush=True)
    return result
