"""Active speakers from RFC 6464 audio levels. No I/O.

Rules: each interval, every audio track's mean loudness (0 = silence, 1 = 0 dBov; 0 for a track
that sent nothing or is muted) is smoothed exponentially; tracks above `threshold` are active;
the loudest `top_n`, loudest first, are the speakers. `update` returns the new list only when
the participants in it (or their order) changed, so listeners are not flooded with levels.
"""

from __future__ import annotations

from edge.sfu._events import Speaker


class SpeakerDetector:
    def __init__(self, top_n: int, threshold: float = 0.45, smoothing: float = 0.5) -> None:
        self.top_n = top_n
        self.threshold = threshold
        self.smoothing = smoothing
        self._smoothed: dict[tuple[str, str], float] = {}
        self._current: tuple[str, ...] = ()

    def update(self, levels: dict[tuple[str, str], float | None]) -> tuple[Speaker, ...] | None:
        """`levels`: (participant, track_id) -> this interval's loudness, for every audio track."""
        a = self.smoothing
        smoothed = {
            key: self._smoothed.get(key, 0.0) * a + (level or 0.0) * (1.0 - a)
            for key, level in levels.items()
        }
        self._smoothed = smoothed
        best: dict[str, tuple[float, str]] = {}
        for (participant, track_id), value in smoothed.items():
            if value > self.threshold and value > best.get(participant, (0.0, ""))[0]:
                best[participant] = (value, track_id)
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])[: self.top_n]
        names = tuple(p for p, _ in ranked)
        if names == self._current:
            return None
        self._current = names
        return tuple(Speaker(p, t, round(v, 3)) for p, (v, t) in ranked)
