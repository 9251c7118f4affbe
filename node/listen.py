"""Listening sockets, the one way every `gb6` process opens them."""

from __future__ import annotations

import socket

from node.errors import invalid


def bind(host: str, port: int, what: str, *, backlog: int = 1024) -> socket.socket:
    """A listening TCP socket; `invalid` naming `what` and the address if it cannot be had
    (the port in use, an address not of this host)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise invalid(f"cannot listen for {what} on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock
