"""Percentiles for the measurement scripts (latency.py, code_interpreter_latency.py,
ports_latency.py): one definition, so their numbers compare."""

from __future__ import annotations

import statistics


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of the samples at or below it."""
    ordered = sorted(values)
    rank = max(1, int(-(-p * len(ordered) // 100)))
    return ordered[rank - 1]


def summary(values_ms: list[float], digits: int = 3) -> dict[str, float]:
    """n, min, p50, p90, p99, max and mean of samples in milliseconds, rounded to `digits`."""
    return {
        "n": len(values_ms),
        "min": round(min(values_ms), digits),
        "p50": round(percentile(values_ms, 50), digits),
        "p90": round(percentile(values_ms, 90), digits),
        "p99": round(percentile(values_ms, 99), digits),
        "max": round(max(values_ms), digits),
        "mean": round(statistics.fmean(values_ms), digits),
    }
