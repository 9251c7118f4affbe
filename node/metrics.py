"""`/metrics` samples and their Prometheus text form (exposition format 0.0.4)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import attrs


@attrs.frozen
class Metric:
    """One sample without labels: a counter's name ends in `_total`."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    value: int | float


def render(metrics: Iterable[Metric]) -> str:
    """Every digit of a value: `repr` of an int or a float (`%g` would round 1,234,567)."""
    lines: list[str] = []
    for m in metrics:
        lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", f"{m.name} {m.value!r}"]
    return "\n".join(lines) + "\n"
