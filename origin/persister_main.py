"""The Kafka store's persister as a process of its own: `python -m origin.persister_main`.

Why a process: the persister's work per event (reading the log, decoding, building rows,
asyncpg) ran on the origin's one busy thread and took about a quarter of it at full load
(bench/RESULTS.md, 2026-11-27). Here it has a core of its own; its parent
(origin/persister_process.py) starts, watches and restarts it.

The contract with the parent, on the child's standard streams:
- stdin: ONE line, the JSON settings (`Settings`: they hold the PostgreSQL DSN, so never on
  the command line), then nothing. Its end (EOF) means the parent is gone or wants us gone:
  the batch being written is finished, then the process exits 0.
- stdout: JSON lines. `{"ready": {partition: next offset}}` once the persister reads from its
  stored offsets, then `{"heads": {room: seq}}` after writes: the highest seq written per room,
  merged over the writes the parent has not read yet (a slow parent gets fewer, larger lines).
- stderr: structured logs (node/log.py). Exit 0 on EOF, 1 on an error, which is logged.

The persister itself is pg_persister.py's: idempotent on its offsets, so a successor that
starts while this one finishes its last batch does no harm.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Final

import attrs
import orjson
import trio
import trio_asyncio

from node.errors import INVALID, GB6Error, leaves
from node.log import log
from origin.kafka_consumer import GATHERED, KafkaLogConsumer
from origin.pg_errors import DB_ERRORS, translate
from origin.pg_persister import PgPersister, prepare
from origin.pg_store import open_pool

POOL_SIZE: Final = 2  # the persister's writes; one spare for a partition's creation
MAX_SETTINGS_BYTES: Final = 64 << 10


@attrs.frozen
class Settings:
    """What the child needs to persist one shard's log."""

    dsn: str
    schema: str
    bootstrap: str
    topic: str

    def encode(self) -> bytes:
        return orjson.dumps(attrs.asdict(self)) + b"\n"

    @classmethod
    def decode(cls, line: bytes) -> Settings:
        if len(line) > MAX_SETTINGS_BYTES or not line.endswith(b"\n"):
            raise GB6Error(INVALID, "persister settings: one JSON line expected on stdin")
        try:
            raw = orjson.loads(line)
            return cls(**{f.name: _text(raw, f.name) for f in attrs.fields(cls)})
        except (orjson.JSONDecodeError, TypeError, AttributeError) as exc:
            raise GB6Error(INVALID, f"persister settings: {exc}") from None


def _text(raw: dict[str, object], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise TypeError(f"{name} must be a non-empty string")
    return value


class _Heads:
    """Heads written and not yet sent to the parent, merged; one writer task sends them."""

    def __init__(self, out: trio.abc.SendStream) -> None:
        self._out = out
        self._pending: dict[str, int] = {}
        self._wake = trio.Event()

    def add(self, heads: Mapping[str, int]) -> None:
        pending = self._pending
        for room, seq in heads.items():
            if seq > pending.get(room, 0):
                pending[room] = seq
        self._wake.set()

    async def send_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            pending, self._pending = self._pending, {}
            if pending:
                await self._out.send_all(orjson.dumps({"heads": pending}) + b"\n")


async def _until_eof(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some(4096):
        pass  # nothing more is expected after the settings; only the end matters


async def serve(
    settings: Settings, stdin: trio.abc.ReceiveStream, out: trio.abc.SendStream
) -> None:
    """Persist until `stdin` ends (inside `trio_asyncio.open_loop()`)."""
    pool = await open_pool(settings.dsn, settings.schema, "gb6-persister", POOL_SIZE)
    try:
        async with trio.open_nursery() as nursery:
            try:
                offsets = await trio_asyncio.aio_as_trio(prepare)(pool, settings.topic, "persister")
            except DB_ERRORS as exc:
                raise translate(exc, "reading the persister's offsets") from exc
            consumer = KafkaLogConsumer(
                settings.bootstrap, settings.topic, offsets, name="persister", config=GATHERED
            )
            await nursery.start(consumer.run)
            heads = _Heads(out)
            persister = PgPersister(pool, settings.schema, settings.topic, consumer, heads.add)
            ready = {str(p): n for p, n in sorted(offsets.items())}
            await out.send_all(orjson.dumps({"ready": ready}) + b"\n")
            log("persister_started", topic=settings.topic, offsets=ready, pid=os.getpid())
            nursery.start_soon(heads.send_forever)
            nursery.start_soon(persister.run_forever)
            await _until_eof(stdin)  # a write under way is shielded: it completes first
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(pool.close)()


async def _main(settings: Settings) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    out = trio.lowlevel.FdStream(os.dup(sys.stdout.fileno()))
    async with trio_asyncio.open_loop():
        await serve(settings, stdin, out)


def main() -> int:
    failures: list[BaseException] = []
    try:
        settings = Settings.decode(sys.stdin.buffer.readline(MAX_SETTINGS_BYTES + 1))
        trio.run(_main, settings)
    except* GB6Error as group:  # bad settings, PostgreSQL or Kafka refusing: said in one line
        failures += leaves(group)
    except* trio.BrokenResourceError:
        pass  # the parent closed our stdout: it is gone, and so are we
    for exc in failures:
        log("persister_failed", error=str(exc))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
