"""Identifiers: short, URL-safe, roughly time-ordered strings with a type prefix."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import time


def new_id(prefix: str) -> str:
    """`prefix_` + 48 bits of milliseconds + 64 random bits, base32 (lowercase, no padding)."""
    raw = (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(8)
    return prefix + "_" + base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def new_secret(nbytes: int = 32) -> str:
    return secrets.token_urlsafe(nbytes)


def secret_digest(secret: str) -> str:
    """Tokens are stored as digests; they are long random strings, so a fast hash is enough."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()
