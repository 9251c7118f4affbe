"""The Kafka store's persister process (origin/persister_main.py, origin/persister_process.py):
what its parent relies on when the child cannot start. The child at work, killed and
restarted, is in test_store_contract.py; dying with a killed origin, in test_cluster.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trio
import trio_asyncio

from node.errors import INVALID, UNAVAILABLE, GB6Error
from origin.persister_main import Settings
from origin.persister_process import PersisterProcess, restart_pause


def test_settings_round_trip_and_refuse_what_is_not_theirs() -> None:
    s = Settings("postgresql://u:p@127.0.0.1:5432/db", "gb6", "127.0.0.1:9092", "gb6-log-s1")
    assert Settings.decode(s.encode()) == s
    for bad in (b"", b"{}\n", b"[1]\n", b"nonsense\n", b'{"dsn": "x"}\n', s.encode()[:-1]):
        with pytest.raises(GB6Error) as info:
            Settings.decode(bad)
        assert info.value.code == INVALID and "persister settings" in info.value.message


def test_the_child_refuses_bad_settings_with_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "origin.persister_main"],
        input=b'{"dsn": 1}\n',
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert b"persister_failed" in done.stderr and b"dsn must be a non-empty string" in done.stderr
    assert done.stdout == b""  # never ready


async def test_a_child_that_cannot_start_stops_the_parent_with_its_reason() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    bad = Settings("postgresql://gb6:gb6@127.0.0.1:1/gb6", "gb6", "127.0.0.1:1", "gb6-log-x")
    persisted: list[object] = []
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        process = PersisterProcess(bad, persisted.append)
        with trio.fail_after(60), pytest.raises(GB6Error) as info:
            await nursery.start(process.run)
    assert info.value.code == UNAVAILABLE
    assert "the persister did not start: exited at start with 1" in info.value.message
    assert process.pid is None and process.restarts == 0 and persisted == []


async def test_a_child_the_system_cannot_start_is_a_failed_start_not_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fork or its pipes fail (EAGAIN, ENOMEM, EMFILE): that is a child that did not start,
    said as one (and, after a first child ran, tried again with the restarts' pauses), not an
    OSError out of the origin's nursery."""
    settings = Settings("postgresql://gb6:gb6@127.0.0.1:1/gb6", "gb6", "127.0.0.1:1", "gb6-log-x")

    async def no_fork(*args: object, **kwargs: object) -> trio.Process:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(trio.lowlevel, "open_process", no_fork)
    async with trio.open_nursery() as nursery:
        process = PersisterProcess(settings, lambda heads: None)
        with trio.fail_after(10), pytest.raises(GB6Error) as info:
            await nursery.start(process.run)
    assert info.value.code == UNAVAILABLE
    assert "the persister did not start: could not be started" in info.value.message
    assert "Resource temporarily unavailable" in info.value.message


def test_restarts_back_off_while_children_die_young() -> None:
    pauses = [restart_pause(0.0, 0.5)]
    for _ in range(7):
        pauses.append(restart_pause(pauses[-1], 2.0))
    assert pauses == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert restart_pause(30.0, 61.0) == 1.0  # one lived long enough: quick again
