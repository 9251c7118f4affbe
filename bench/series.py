"""A series of `load` runs in one table, and the figures of the runs the host left alone.

    .venv/bin/python -m bench.series bench/out/load-20261127-*.json [--max-steal 1.5] [--target 30]

One run's p99 on this kind of machine says little: the host takes CPU away (up to 40% of both
cores in some runs, `stolen by the host`), and its speed changes from run to run (the probe).
This prints each run's figures, sets aside runs with more than `--max-steal` percent stolen,
and gives, per store, rate and commit, the median and range of the rest and how many met
`--target` (p99 send→deliver, ms). `sock` is the p99 send→socket (to the kernel's receive time
at the client's socket: the generator's own wait for a CPU left out; `bench/README.md`), `bgc`
the Kafka broker's longest GC pause in the window (ms). It reads the JSON the runs wrote; it
runs nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _row(path: Path, run: dict[str, Any]) -> dict[str, Any]:
    lat = run.get("send_to_deliver_ms") or {}
    params = run.get("params") or {}
    window = run.get("window_s") or [0, 0]
    per_sec = (run.get("per_second") or {}).get("send_to_deliver_ms") or []
    inside = sorted(r[2] for r in per_sec if window[0] <= r[0] < window[1])
    return {
        "file": path.name,
        "date": (run.get("machine") or {}).get("date", "?"),
        "commit": (run.get("machine") or {}).get("git_commit", "?"),
        "store": params.get("store", "?"),
        "rate": params.get("rate"),
        "probe": (run.get("host_speed_probe_ms") or {}).get("p50"),
        "steal": run.get("machine_steal_pct"),
        "busy": run.get("machine_busy_pct"),
        "p50": lat.get("p50"),
        "p99": lat.get("p99"),
        "socket_p99": (run.get("send_to_socket_ms") or {}).get("p99"),
        "median_second_p99": inside[len(inside) // 2] if inside else None,
        "broker_gc_max": (run.get("broker_gc") or {}).get("max_ms"),
        "lost": (run.get("delivered_expected") or 0) - (run.get("delivered") or 0),
    }


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def summarize(rows: list[dict[str, Any]], max_steal: float, target: float | None) -> list[str]:
    """The table's lines: one per run, then the quiet runs' figures."""
    out = [
        f"{'date':25} {'commit':8} {'store':8} {'rate':>6} {'probe':>5} {'stolen':>6} "
        f"{'busy':>5} {'p50':>6} {'p99':>7} {'sock':>6} {'med.s':>6} {'bgc':>5} {'lost':>4}"
    ]
    for r in rows:
        quiet = r["steal"] is not None and r["steal"] <= max_steal
        out.append(
            f"{r['date']:25} {r['commit']:8} {r['store']:8} {_fmt(r['rate'], '.0f'):>6} "
            f"{_fmt(r['probe'], '.2f'):>5} {_fmt(r['steal']):>5}% {_fmt(r['busy']):>4}% "
            f"{_fmt(r['p50']):>6} {_fmt(r['p99']):>7} {_fmt(r['socket_p99']):>6} "
            f"{_fmt(r['median_second_p99']):>6} "
            f"{_fmt(r['broker_gc_max']):>5} {r['lost']:>4}"
            f"{'' if quiet else '  (set aside: stolen)'}"
        )
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["store"], r["rate"], r["commit"]), []).append(r)
    for (store, rate, commit), runs in groups.items():
        quiet = [
            r
            for r in runs
            if r["steal"] is not None and r["steal"] <= max_steal and r["p99"] is not None
        ]
        line = (
            f"{store} at {_fmt(rate, '.0f')} sends/s, {commit}: {len(runs)} runs, "
            f"{len(quiet)} with at most {max_steal}% stolen"
        )
        if quiet:
            p99s = [r["p99"] for r in quiet]
            line += (
                f": p99 send→deliver median {statistics.median(p99s):.1f} ms "
                f"(min {min(p99s):.1f}, max {max(p99s):.1f}), "
                f"p50 median {statistics.median(r['p50'] for r in quiet):.1f} ms"
            )
            if target is not None:
                met = sum(1 for p in p99s if p <= target)
                line += f"; p99 ≤ {target:g} ms in {met} of {len(p99s)}"
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.series", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="JSON results of `load` runs")
    p.add_argument("--max-steal", type=float, default=1.5, help="percent stolen (default 1.5)")
    p.add_argument("--target", type=float, help="a p99 send→deliver target, ms")
    args = p.parse_args(argv)
    rows = []
    for path in args.files:
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"{path}: not read ({exc})", file=sys.stderr)
            continue
        if run.get("mode") != "load":
            print(f"{path}: not a load run, left out", file=sys.stderr)
            continue
        rows.append(_row(path, run))
    rows.sort(key=lambda r: r["date"])
    print("\n".join(summarize(rows, args.max_steal, args.target)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
