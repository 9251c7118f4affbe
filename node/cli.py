"""`gb6`: the command. `gb6 run` starts an all-in-one node (edge + origin) on embedded storage."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from node import config as cfg
from node.errors import GB6Error, leaves


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gb6", description="GB6 real-time platform")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="all-in-one node (edge + origin shard), embedded storage")
    run.add_argument("--data", type=Path, help="state directory (created if missing)")
    run.add_argument("--ws-port", type=int, help="client WebSocket port (0 picks a free one)")
    run.add_argument("--http-port", type=int, help="HTTP port (0 picks a free one)")
    run.add_argument("--host", help="address to bind and announce (default 127.0.0.1)")
    run.add_argument("--config", type=Path, help="TOML configuration file")
    origin = sub.add_parser(
        "origin", help="one origin shard of a cluster (see configs/cluster.toml)"
    )
    origin.add_argument("--data", type=Path, help="state directory (created if missing)")
    origin.add_argument("--link-port", type=int, help="port edges connect to (0 picks one)")
    origin.add_argument("--http-port", type=int, help="admin HTTP port (0 picks a free one)")
    origin.add_argument("--host", help="address to bind and announce (default 127.0.0.1)")
    origin.add_argument("--shard", help="this shard's name")
    origin.add_argument("--config", type=Path, help="TOML configuration file")
    edge = sub.add_parser("edge", help="an edge of a cluster: client WebSocket, fan-out")
    edge.add_argument("--ws-port", type=int, help="client WebSocket port (0 picks a free one)")
    edge.add_argument("--http-port", type=int, help="HTTP port (0 picks a free one)")
    edge.add_argument("--host", help="address to bind and announce (default 127.0.0.1)")
    edge.add_argument(
        "--origin", action="append", help="an origin shard's link address host:port (repeat)"
    )
    edge.add_argument("--config", type=Path, help="TOML configuration file")
    audit = sub.add_parser("audit", help="the audit log (origin/audit_log.py)")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify",
        help="check the hash chain and its anchor: exit 0 if intact, 1 naming the"
        " first bad record (reads GB6_AUDIT_KEY for the anchor's MAC)",
    )
    verify.add_argument("--data", type=Path, help="the origin's state directory")
    verify.add_argument("--config", type=Path, help="TOML configuration file (store backend)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    flags = {
        key: getattr(args, attr, None)
        for key, attr in (
            ("data_dir", "data"),
            ("ws_port", "ws_port"),
            ("http_port", "http_port"),
            ("host", "host"),
            ("link_port", "link_port"),
            ("shard", "shard"),
        )
    }
    if getattr(args, "origin", None):
        flags["origins"] = tuple(args.origin)
    try:
        config = cfg.load(args.config, flags)
        if args.command == "audit":
            return _audit_verify(config)
        if args.command == "run":
            from node.standalone import run_node

            trio.run(run_node, config)
        elif args.command == "origin":
            from node.cluster import link_secret
            from node.origin_process import run_origin

            link_secret(config, listening=True)
            trio.run(run_origin, config)
        else:
            from node.cluster import link_secret
            from node.edge_process import run_edge

            link_secret(config)
            trio.run(run_edge, config)
    except BaseException as exc:
        error = _command_error(exc)
        if error is None:
            raise
        print(f"gb6: {error.message}", file=sys.stderr)
        return 2
    return 0


def _command_error(exc: BaseException) -> GB6Error | None:
    """The GB6Error a command failed with (a dependency down at start, a port in use), out of
    the exception groups trio's nurseries wrap it in; None for anything else, a bug, whose
    traceback is shown."""
    found = leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    errors = [e for e in found if isinstance(e, GB6Error)]
    if errors and all(isinstance(e, GB6Error | trio.Cancelled) for e in found):
        return errors[0]
    return None


def _audit_verify(config: cfg.Config) -> int:
    """`gb6 audit verify`: one summary line on stdout; exit 0 if the log is intact, 1 if not
    (2, as for every command, when it could not be checked: a `GB6Error`)."""
    import trio_asyncio

    from origin.audit_log import verify_config

    async def check() -> bool:
        async with trio_asyncio.open_loop():
            report = await verify_config(config)
        print(report.summary())
        return report.ok

    return 0 if trio.run(check) else 1


if __name__ == "__main__":
    sys.exit(main())
