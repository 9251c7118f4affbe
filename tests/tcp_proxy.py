"""A TCP proxy that can cut the connections through it: what a network partition between two
processes looks like to both (their connections end; new ones are refused until it heals).

Threads, not Trio tasks, as tests/pg_proxy.py (whose socket helpers it shares)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tests.pg_proxy import _recv, _send, _shut


class TcpProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host.strip("[]"), int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._cut = False
        self._closed = False
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.cuts = 0  # connections ended by `cut`

    def cut(self) -> None:
        """End every connection through the proxy; refuse new ones until `heal`."""
        with self._lock:
            self._cut = True
            socks, self._socks = self._socks, []
            self.cuts += len(socks) // 2
        for s in socks:
            _shut(s)

    def heal(self) -> None:
        with self._lock:
            self._cut = False

    def start(self) -> None:
        self._spawn(self._accept)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = [self._listener, *self._socks], []
        for s in socks:
            _shut(s)
        for t in self._threads:
            t.join(10)

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut or self._closed
            if refused:
                _shut(client)
                continue
            try:
                server = socket.create_connection(self._upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                _shut(client)
                continue
            with self._lock:
                if self._cut or self._closed:
                    _shut(client)
                    _shut(server)
                    continue
                self._socks += [client, server]
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        while (chunk := _recv(source)) and _send(sink, chunk):
            pass
        _shut(source)
        _shut(sink)


@contextmanager
def tcp_proxy(upstream: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
