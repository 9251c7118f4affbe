"""`gb6`: the command. `gb6 run` starts an all-in-one node (edge + origin) on embedded storage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from node import config as cfg
from node.errors import GB6Error


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gb6", description="GB6 real-time platform")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="all-in-one node (edge + origin shard), embedded storage")
    run.add_argument("--data", type=Path, help="state directory (created if missing)")
    run.add_argument("--ws-port", type=int, help="client WebSocket port (0 picks a free one)")
    run.add_argument("--http-port", type=int, help="HTTP port (0 picks a free one)")
    run.add_argument("--host", help="address to bind and announce (default 127.0.0.1)")
    run.add_argument("--config", type=Path, help="TOML configuration file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        from node.supervisor import run_node

        try:
            config = cfg.load(
                args.config,
                {
                    "data_dir": args.data,
                    "ws_port": args.ws_port,
                    "http_port": args.http_port,
                    "host": args.host,
                },
            )
        except GB6Error as exc:
            print(f"gb6: {exc.message}", file=sys.stderr)
            return 2
        trio.run(run_node, config)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
