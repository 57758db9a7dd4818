"""Fixed-bucket histograms the broker publishes in its state block.

Prometheus histograms are cumulative bucket counts plus a sum; the broker keeps
them in exactly that shape so an exporter reading the block at scrape time only
converts units. The buckets are fixed (part of the block's layout): a reader
never has to learn them from the writer.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Final

#: Upper bounds of each histogram's buckets, in the unit its name ends with; +Inf is implicit.
BOUNDS: Final[dict[str, tuple[int, ...]]] = {
    "queue_wait_ms": (1, 5, 10, 25, 50, 100, 250, 1000, 5000, 30000, 300000),
    "preempt_signal_us": (50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000, 250000, 1000000),
    "handoff_us": (50, 100, 200, 500, 1000, 2000, 5000, 10000, 50000, 250000, 1000000),
    "turn_ms": (10, 50, 100, 250, 1000, 5000, 10000, 30000, 60000, 300000, 1800000),
}
NAMES: Final = tuple(BOUNDS)
#: Words per histogram in the block: one cumulative count per bound, the +Inf count (the total), the sum.
WORDS: Final = len(next(iter(BOUNDS.values()))) + 2
assert all(len(b) + 2 == WORDS for b in BOUNDS.values())

UNIT_SECONDS: Final = {"ms": 1e-3, "us": 1e-6}


def unit_seconds(name: str) -> float:
    """Seconds per unit of histogram ``name`` (its suffix: ``_ms`` or ``_us``)."""
    return UNIT_SECONDS[name.rsplit("_", 1)[1]]


@dataclass
class Histogram:
    """Cumulative bucket counts (``buckets[-1]`` is the +Inf bucket, i.e. the count) and the sum."""

    name: str
    buckets: list[int] = field(default_factory=list)
    total: int = 0

    def __post_init__(self) -> None:
        if not self.buckets:
            self.buckets = [0] * (len(BOUNDS[self.name]) + 1)

    @property
    def count(self) -> int:
        """How many values were observed."""
        return self.buckets[-1]

    def observe(self, value: float) -> None:
        """Count one value (in the histogram's unit; negative values count as 0)."""
        v = max(0, round(value))
        # Every bucket whose bound is >= v counts it (cumulative, as Prometheus wants).
        for i in range(bisect.bisect_left(BOUNDS[self.name], v), len(self.buckets)):
            self.buckets[i] += 1
        self.total += v

    def words(self) -> list[int]:
        """The histogram as it is laid out in the block."""
        return [*self.buckets, self.total]

    @classmethod
    def from_words(cls, name: str, words: list[int]) -> Histogram:
        """The inverse of :meth:`words`."""
        return cls(name, buckets=list(words[:-1]), total=words[-1])


def empty() -> dict[str, Histogram]:
    """One empty histogram per name."""
    return {name: Histogram(name) for name in NAMES}
