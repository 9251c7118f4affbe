"""TCP proxies for tests, in threads (the cluster's processes start from blocking calls in the
test's thread, so no Trio task of the test's could serve them meanwhile).

`ThreadedProxy` accepts on a port of its own and connects each client to the upstream;
subclasses say what flows between them. `TcpProxy` passes bytes as they are and can cut every
connection through it: what a network partition between two processes looks like to both
(their connections end; new ones are refused until it heals). tests/pg_proxy.py reads
PostgreSQL's protocol on its way through."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ThreadedProxy:
    def __init__(self, upstream: tuple[str, int], port: int = 0) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._closed = False
        self._refusing = False  # new connections are closed at once
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._spawn(self._accept)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, self._socks = [self._listener, *self._socks], []
        for s in socks:
            shut(s)
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
                refused = self._refusing or self._closed
            if refused:
                shut(client)
                continue
            try:
                server = socket.create_connection(self._upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                shut(client)
                continue
            with self._lock:
                if self._refusing or self._closed:
                    shut(client)
                    shut(server)
                    continue
                self._socks += [client, server]
            self._serve(client, server)

    def _serve(self, client: socket.socket, server: socket.socket) -> None:
        """Start what carries this connection's bytes (threads: `_spawn`)."""
        raise NotImplementedError


class TcpProxy(ThreadedProxy):
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        super().__init__((host.strip("[]"), int(port)))
        self.address = f"127.0.0.1:{self.port}"
        self.cuts = 0  # connections ended by `cut`
        self._held = False

    def cut(self) -> None:
        """End every connection through the proxy; refuse new ones until `heal`."""
        with self._lock:
            self._refusing = True
            socks, self._socks = self._socks, []
            self.cuts += len(socks) // 2
        for s in socks:
            shut(s)

    def hold(self) -> None:
        """Pass no more bytes on (they are dropped) until `heal`: with `cut` next, a request
        on its way when the network fails."""
        with self._lock:
            self._held = True

    def heal(self) -> None:
        with self._lock:
            self._refusing = self._held = False

    def _serve(self, client: socket.socket, server: socket.socket) -> None:
        self._spawn(self._pump, client, server)
        self._spawn(self._pump, server, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while (chunk := recv(source)) and (self._held or send(sink, chunk)):
            pass
        shut(source)
        shut(sink)


def recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


def send(s: socket.socket, data: bytes) -> bool:
    try:
        s.sendall(data)
        return True
    except OSError:
        return False


def shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@contextmanager
def tcp_proxy(upstream: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
