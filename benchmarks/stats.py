"""Summaries of latency samples, and ratios to the floor measured in the same run.

Samples are integers in nanoseconds; summaries are in microseconds. Percentiles
use the nearest-rank definition (the value at rank ceil(q·n)), so p99.9 of
20,000 samples is the 20th largest and max is a real sample, never an
interpolation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

N = TypeVar("N", int, float)

QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))
#: The columns the results table shows (p90 is kept in the JSON and the plots).
SHOWN = ("p50", "p99", "p999", "max")


def percentile(sorted_values: Sequence[N], q: float) -> N:
    """Nearest-rank percentile of already sorted samples (the one definition in the benchmarks)."""
    if not sorted_values:
        raise ValueError("no samples")
    # Rank = ceil(q * n), with q * n rounded to 1/1000 first: in floating point
    # 0.07 * 100 is 7.000000000000001, whose ceil would pick the 8th sample.
    rank = max(1, -(-int(q * len(sorted_values) * 1000) // 1000))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Summary:
    """A latency distribution, in microseconds."""

    n: int
    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    mean: float
    min: float

    def get(self, name: str) -> float:
        """A percentile by column name (``p50``, ``p99``, ``p999``, ``max``)."""
        return float(getattr(self, name))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def summarize(samples_ns: Sequence[int]) -> Summary:
    """Summarize nanosecond samples into microsecond percentiles."""
    s = sorted(samples_ns)
    vals = {name: percentile(s, q) / 1000 for name, q in QUANTILES}
    return Summary(n=len(s), mean=statistics.fmean(s) / 1000, min=s[0] / 1000, **vals)


def summarize_us(samples_us: Sequence[float]) -> Summary:
    """Summarize samples already in microseconds (the broker's own figures)."""
    return summarize([round(x * 1000) for x in samples_us])


def ratios(s: Summary, floor: Summary) -> dict[str, float]:
    """Each shown percentile divided by the same percentile of the floor."""
    return {name: s.get(name) / floor.get(name) if floor.get(name) else math.nan for name in SHOWN}


def fmt_us(us: float) -> str:
    """A latency for the table: µs below 10 ms, else ms."""
    if math.isnan(us):
        return "-"
    if us >= 10_000:
        return f"{us / 1000:.1f} ms"
    if us >= 100:
        return f"{us:.0f} µs"
    return f"{us:.1f} µs"


def fmt_ratio(r: float) -> str:
    """A ratio for the table."""
    if math.isnan(r):
        return "-"
    if r < 0.1:
        return f"{r:.2f}×"
    return f"{r:.1f}×" if r < 100 else f"{r:.0f}×"


# ---------------------------------------------------------------- one run's results


@dataclass
class Latency:
    """A measured latency distribution."""

    key: str
    label: str
    summary: Summary
    samples_ns: list[int]
    #: Key of the floor latency this one is divided by (None: it is a floor itself).
    floor: str | None = "floor.queue_rtt"
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (without the raw samples)."""
        return {"label": self.label, "floor": self.floor, "note": self.note, **self.summary.as_dict()}


@dataclass
class Scalar:
    """A single measured value (a rate, a size, a ratio)."""

    key: str
    label: str
    value: float
    unit: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"label": self.label, "value": self.value, "unit": self.unit, "note": self.note}


class Results:
    """Everything one run measured, in the order it was measured."""

    def __init__(self) -> None:
        self.latencies: dict[str, Latency] = {}
        self.scalars: dict[str, Scalar] = {}
        #: Extra series for plots (scale curves): name -> list of points.
        self.series: dict[str, list[dict[str, Any]]] = {}
        self.errors: dict[str, str] = {}
        self.durations_s: dict[str, float] = {}

    def add_latency(self, key: str, label: str, samples_ns: Sequence[int], *, floor: str | None = "floor.queue_rtt",
                    note: str = "") -> Latency:
        """Record a distribution (nanosecond samples)."""
        if not samples_ns:
            raise ValueError(f"{key}: no samples")
        lat = Latency(key, label, summarize(samples_ns), list(samples_ns), floor, note)
        self.latencies[key] = lat
        return lat

    def add_summary(self, key: str, label: str, summary: Summary, *, floor: str | None = "floor.queue_rtt",
                    note: str = "") -> Latency:
        """Record a distribution measured elsewhere (summary only: no raw samples, no CDF)."""
        lat = Latency(key, label, summary, [], floor, note)
        self.latencies[key] = lat
        return lat

    def add_scalar(self, key: str, label: str, value: float, unit: str, note: str = "") -> Scalar:
        """Record a single value."""
        sc = Scalar(key, label, float(value), unit, note)
        self.scalars[key] = sc
        return sc

    def ratio(self, key: str, col: str = "p50") -> float:
        """A latency's percentile over its floor's same percentile (nan if either is missing)."""
        lat = self.latencies.get(key)
        if lat is None or lat.floor is None or lat.floor not in self.latencies:
            return math.nan
        return ratios(lat.summary, self.latencies[lat.floor].summary)[col]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "latencies_us": {k: v.as_dict() for k, v in self.latencies.items()},
            "scalars": {k: v.as_dict() for k, v in self.scalars.items()},
            "series": self.series,
            "errors": self.errors,
            "durations_s": self.durations_s,
        }
