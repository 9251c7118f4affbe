"""The embedded store's group commit: one batch holding many kinds of ops at once.

One writer batch gets everything at once (the writer is held by a slow job while the ops queue
up): 300 plain sends spread over rooms, with repeated cids inside the batch and against earlier
batches, a thread reply and an edit of a message from the same batch.
Every op gets the answer it would get alone, seqs stay gapless, nothing is written twice, and it
all survives a reopen.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import trio
import trio_asyncio
from test_store_contract import LIMITS, Recorder, item, room, seqs, submit, tenant

from origin.sqlite_store import SqliteStore


async def test_one_batch_of_plain_sends_repeats_threads_and_edits(tmp_path: Path) -> None:
    rec = Recorder()
    store = SqliteStore(tmp_path / "gb6.db", LIMITS, rec)
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(store.run)
        t = await tenant(store)
        rooms = [await room(store, t) for _ in range(3)]
        first = await submit(store, item(rooms[0], t.alice, "early"))
        with trio.fail_after(10):
            await store.wait_idle()
        assert first().unwrap().event.seq == 1

        running = threading.Event()

        def slow(_conn: object) -> None:
            running.set()
            time.sleep(0.3)

        nursery.start_soon(store.write, slow)  # holds the writer thread for a moment
        await trio.to_thread.run_sync(running.wait)  # what follows queues behind it
        commits = store.commits
        ops = [item(rooms[i % 3], (t.alice, t.bob)[i % 2], f"m{i}") for i in range(300)]
        pending = [await submit(store, op) for op in ops]
        again = await submit(store, item(rooms[1], t.bob, "m1"))  # m1 twice in one batch
        old = await submit(store, item(rooms[0], t.alice, "early"))  # from an earlier batch
        reply = await submit(store, item(rooms[0], t.bob, "r", thread=2))
        edit = await submit(
            store, item(rooms[0], t.alice, "e", type="edit", target=2, body={"text": "x"})
        )
        after = await submit(store, item(rooms[0], t.alice, "last"))
        with trio.fail_after(10):
            await store.wait_idle()
        assert store.commits - commits == 2  # the slow job's batch, then all of these

        got = [p().unwrap() for p in pending]
        assert not any(a.duplicate for a in got)
        repeat = again().unwrap()
        assert repeat.duplicate and repeat.event == got[1].event
        early = old().unwrap()
        assert early.duplicate and early.event == first().unwrap().event
        assert reply().unwrap().event.thread == 2
        assert edit().unwrap().event.target == 2
        counts = [1 + 100, 100, 100]  # "early" and m0, m3, ... in rooms[0]
        assert after().unwrap().event.seq == counts[0] + 3
        for r, n in zip(rooms, counts, strict=True):
            extra = 3 if r == rooms[0] else 0  # reply, edit, last
            assert seqs(await store.events_after(r, 0, 1000)) == list(range(1, n + extra + 1))
        # What was answered is what is stored, and the callback saw each new event once.
        assert len(rec.fresh()) == 1 + 300 + 3
        assert (await store.events_after(rooms[1], 0, 1000))[:2] == [got[1].event, got[4].event]
        nursery.cancel_scope.cancel()

    reopened = SqliteStore(tmp_path / "gb6.db", LIMITS, Recorder())
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        await nursery.start(reopened.run)
        again2 = await submit(reopened, item(rooms[2], t.alice, "m2"))
        nxt = await submit(reopened, item(rooms[2], t.alice, "new"))
        with trio.fail_after(10):
            await reopened.wait_idle()
        assert again2().unwrap().duplicate and again2().unwrap().event == got[2].event
        assert nxt().unwrap().event.seq == 101
        nursery.cancel_scope.cancel()
