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
    value: float


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    for m in metrics:
        lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", f"{m.name} {m.value:g}"]
    return "\n".join(lines) + "\n"
