"""A TCP proxy in front of PostgreSQL: a server that answers from some moment on (it listens on
the port asked), and that can lose the answer of one committed batch of events: what a client
sees when the server crashes between making a commit durable and telling it so.

Threads, not Trio tasks: the cluster's processes start from blocking calls in the test's thread.
It reads the wire protocol only as far as it must: each server message is a type byte and a
length; a connection is the store writer's once the client has sent the events insert (its
statement text names the event-id lock)."""

from __future__ import annotations

import socket
import struct
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

from tests.tcp_proxy import ThreadedProxy, recv, send, shut

_EVENTS_INSERT = b"gb6.event_ids."  # in the text of the store's events insert (pg_append)
_ONE_BYTE_ANSWERS = (80877103, 80877104)  # SSLRequest, GSSENCRequest: answered by one byte


class PgProxy(ThreadedProxy):
    def __init__(self, upstream_dsn: str, port: int = 0) -> None:
        url = urllib.parse.urlsplit(upstream_dsn)
        super().__init__((url.hostname or "127.0.0.1", url.port or 5432), port)
        netloc = url.netloc.rsplit("@", 1)
        where = f"127.0.0.1:{self.port}"
        self.dsn = urllib.parse.urlunsplit(
            url._replace(netloc=f"{netloc[0]}@{where}" if len(netloc) == 2 else where)
        )
        self._arm = threading.Event()  # lose the answer of the next committed events insert
        self.cut = threading.Event()  # set once it did

    def lose_next_commit_answer(self) -> None:
        self.cut.clear()
        self._arm.set()

    def _serve(self, client: socket.socket, server: socket.socket) -> None:
        pair = _Pair(client, server)
        self._spawn(self._client_to_server, pair)
        self._spawn(self._server_to_client, pair)

    def _client_to_server(self, pair: _Pair) -> None:
        tail = b""
        first = True
        while chunk := recv(pair.client):
            if first and len(chunk) >= 8:
                (code,) = struct.unpack_from("!I", chunk, 4)
                pair.raw_bytes = 1 if code in _ONE_BYTE_ANSWERS else 0
            first = False
            if _EVENTS_INSERT in tail + chunk:
                pair.writer = True
            tail = chunk[-len(_EVENTS_INSERT) :]
            if not send(pair.server, chunk):
                break
        pair.end()

    def _server_to_client(self, pair: _Pair) -> None:
        buf = b""
        while chunk := recv(pair.server):
            buf += chunk
            out = b""
            while True:
                if pair.raw_bytes and buf:  # the answer to an SSL or GSS request
                    out, buf = out + buf[:1], buf[1:]
                    pair.raw_bytes = 0
                    continue
                if len(buf) < 5:
                    break
                (length,) = struct.unpack_from("!I", buf, 1)
                if len(buf) < 1 + length:
                    break
                msg, buf = buf[: 1 + length], buf[1 + length :]
                verdict = self._verdict(pair, msg)
                if verdict == "cut":
                    send(pair.client, out)
                    self.cut.set()
                    pair.end()
                    return
                if verdict == "hold":
                    pair.held += msg
                    continue
                out += pair.held + msg
                pair.held = b""
            if out and not send(pair.client, out):
                break
        pair.end()

    def _verdict(self, pair: _Pair, msg: bytes) -> str:
        """`cut` where the connection dies: once the armed insert is committed, before the
        client hears so. An insert that is a transaction of its own commits at the Sync that
        follows it (asyncpg's extended protocol), before `ReadyForQuery`: its answers are held
        until `ReadyForQuery` says whether a transaction stays open (then its COMMIT's answer is
        the one lost). Else `hold` or `pass`."""
        if not (pair.writer and self._arm.is_set()):
            return "pass"
        kind, text = msg[:1], msg[5:]
        if kind == b"C" and text.startswith(b"INSERT"):
            pair.inserted = True
            return "hold"
        if kind == b"C" and text.startswith(b"COMMIT") and pair.inserted:
            self._arm.clear()
            return "cut"
        if kind == b"Z":
            if pair.held and text[:1] == b"I":  # committed by itself
                self._arm.clear()
                return "cut"
            if text[:1] == b"I":
                pair.inserted = False
            return "pass"
        return "hold" if pair.held else "pass"


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.raw_bytes = 0
        self.writer = False
        self.inserted = False
        self.held = b""

    def end(self) -> None:
        shut(self.client)
        shut(self.server)


@contextmanager
def pg_proxy(upstream_dsn: str, port: int = 0) -> Iterator[PgProxy]:
    proxy = PgProxy(upstream_dsn, port)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
