"""Listening sockets, the one way every `gb6` process opens them, and who is on loopback."""

from __future__ import annotations

import ipaddress
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


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or "localhost") is this machine's loopback; an IPv4 client
    of a dual-stack listener (`::ffff:127.0.0.1`) too. Anything else (a name, a Unix socket)
    is not."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback
