"""How deep a decoded JSON value nests: bounded on the way in, since orjson encodes at most 254
levels, and a value stored deeper than what every later reply wraps it in could never be sent."""

from __future__ import annotations

from typing import Any, Final

# Objects and arrays inside one another, the outermost included: rich-text formats nest a few
# levels per indent, and what a reply wraps a stored body in stays far below orjson's 254.
MAX_JSON_DEPTH: Final = 128


def deeper_than(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` nests objects and arrays more than `limit` levels (iterative: no
    recursion however deep)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
