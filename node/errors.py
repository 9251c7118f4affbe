"""The project's one error type, with the protocol's error codes.

Adapters translate their library's exceptions into `GB6Error` at their edge; the gateway and the
HTTP layer turn a `GB6Error` into the protocol's error frame or JSON body. Nothing else is sent
to clients, so an unexpected exception becomes `internal` without leaking details.
"""

from __future__ import annotations

from typing import Final

INVALID: Final = "invalid"
UNAUTHORIZED: Final = "unauthorized"
FORBIDDEN: Final = "forbidden"
NOT_FOUND: Final = "not_found"
CONFLICT: Final = "conflict"
RATE_LIMITED: Final = "rate_limited"
QUOTA_EXCEEDED: Final = "quota_exceeded"
TOO_LARGE: Final = "too_large"
UNAVAILABLE: Final = "unavailable"
# The message of an `unauthorized` for a token nobody issued (a guess, not an expired or a
# revoked one): what the per-address limits of user tokens count (node/auth_failures.py).
UNKNOWN_TOKEN: Final = "unknown token"
INTERNAL: Final = "internal"

HTTP_STATUS: Final[dict[str, int]] = {
    INVALID: 400,
    UNAUTHORIZED: 401,
    FORBIDDEN: 403,
    QUOTA_EXCEEDED: 403,
    NOT_FOUND: 404,
    CONFLICT: 409,
    TOO_LARGE: 413,
    RATE_LIMITED: 429,
    UNAVAILABLE: 503,
    INTERNAL: 500,
}


class GB6Error(Exception):
    """A failure the client is told about: a protocol error code and a human message."""

    def __init__(self, code: str, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    def __repr__(self) -> str:
        return f"GB6Error({self.code!r}, {self.message!r})"

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def to_json(self) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message}}


def invalid(message: str) -> GB6Error:
    return GB6Error(INVALID, message)


def forbidden(message: str = "not allowed") -> GB6Error:
    return GB6Error(FORBIDDEN, message)


def not_found(message: str = "not found") -> GB6Error:
    return GB6Error(NOT_FOUND, message)


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions of a (nested) group, flattened: what a nursery's failure was made of."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out
