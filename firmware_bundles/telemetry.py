"""Mergeable telemetry aggregates: a DDSketch-style latency sketch and histogram counts.

Pure functions on plain dicts (the JSON form of :class:`~firmware_bundles.messages.LatencySketch`).
Every merge adds integer counts, so merging is associative and commutative: late, duplicated
(once deduplicated by idempotency key) and shuffled uploads give the same totals and the same
quantiles; only the float ``sum`` depends on order, within rounding.

Mapping (DDSketch's logarithmic mapping): ``gamma = (1 + a) / (1 - a)``; a value ``v > 0`` goes to
bucket ``ceil(log(v) / log(gamma))``; bucket ``i`` stands for ``2 * gamma**i / (gamma + 1)``, within
relative error ``a`` of every value in it.

Limits (why a sketch from a device can be trusted to merge and read back): latencies are clamped
to ``(MIN_POSITIVE, MAX_LATENCY_S]`` (at or below ``MIN_POSITIVE`` they count as zero), so every
bucket key lies in :func:`bin_key_bounds` of the sketch's accuracy, far inside the range where
``gamma ** key`` is a finite, non-zero float (a key of 10**6 at 1% would overflow it); relative
accuracies finer than ``MIN_RELATIVE_ACCURACY`` are refused so that range has a fixed outer bound
(``BIN_KEY_MIN``..``BIN_KEY_MAX``) for the wire type; counts fit a signed 32-bit counter
(``MAX_COUNT``), as firmware keeps them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

DEFAULT_RELATIVE_ACCURACY = 0.01
#: The finest relative accuracy a sketch may have (0.1%: ten times finer than the default).
MIN_RELATIVE_ACCURACY = 0.001
#: Values at or below this count as zero (sub-nanosecond latencies are timer noise).
MIN_POSITIVE = 1e-9
#: Latencies above this (one day, the longest window) are recorded as this: no inference that
#: slow is still one, and the bound keeps every sum of counts times latencies finite.
MAX_LATENCY_S = 86400.0
#: Largest count on the wire: firmware keeps counts as signed 32-bit integers.
MAX_COUNT = 2**31 - 1


def _log_gamma(relative_accuracy: float) -> float:
    return math.log((1 + relative_accuracy) / (1 - relative_accuracy))


@functools.lru_cache(maxsize=64)
def bin_key_bounds(relative_accuracy: float) -> tuple[int, int]:
    """The lowest and highest bucket key a latency in ``(MIN_POSITIVE, MAX_LATENCY_S]`` can have
    at ``relative_accuracy`` (the low end one wider, for rounding in ``log``)."""
    log_gamma = _log_gamma(relative_accuracy)
    return (
        math.floor(math.log(MIN_POSITIVE) / log_gamma),
        math.ceil(math.log(MAX_LATENCY_S) / log_gamma),
    )


#: Bounds on any bucket key at any accepted relative accuracy (the wire type's bounds).
BIN_KEY_MIN, BIN_KEY_MAX = bin_key_bounds(MIN_RELATIVE_ACCURACY)


def new_sketch(relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> dict[str, Any]:
    """An empty sketch."""
    return {
        "relative_accuracy": relative_accuracy,
        "bins": {},
        "zero_count": 0,
        "count": 0,
        "sum": 0.0,
        "min": None,
        "max": None,
    }


def _gamma(sketch: dict[str, Any]) -> float:
    a = float(sketch["relative_accuracy"])
    return (1 + a) / (1 - a)


def bucket(value: float, relative_accuracy: float) -> int:
    """The bucket index of a positive value."""
    return math.ceil(math.log(value) / _log_gamma(relative_accuracy))


def add(sketch: dict[str, Any], value: float, count: int = 1) -> None:
    """Record ``value`` (seconds, clamped to ``[0, MAX_LATENCY_S]``) ``count`` times, in place.

    Raises:
        ValueError: If ``value`` is NaN.
    """
    value = float(value)
    if math.isnan(value):
        raise ValueError("a latency cannot be NaN")
    value = min(max(value, 0.0), MAX_LATENCY_S)
    if value <= MIN_POSITIVE:
        sketch["zero_count"] += count
    else:
        key = str(bucket(value, float(sketch["relative_accuracy"])))
        sketch["bins"][key] = sketch["bins"].get(key, 0) + count
    sketch["count"] += count
    sketch["sum"] += value * count
    sketch["min"] = value if sketch["min"] is None else min(sketch["min"], value)
    sketch["max"] = value if sketch["max"] is None else max(sketch["max"], value)


def merge(into: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Add ``other`` into ``into`` (in place, also returned).

    Raises:
        ValueError: If the two sketches use different relative accuracies.
    """
    ours, theirs = into["relative_accuracy"], other["relative_accuracy"]
    if ours != theirs and not math.isclose(float(ours), float(theirs)):
        raise ValueError("cannot merge sketches of different relative accuracy")
    bins = into["bins"]
    for key, count in other.get("bins", {}).items():
        k = key if type(key) is str else str(key)
        bins[k] = bins.get(k, 0) + int(count)
    into["zero_count"] += int(other.get("zero_count", 0))
    into["count"] += int(other.get("count", 0))
    into["sum"] += float(other.get("sum", 0.0))
    low, high = other.get("min"), other.get("max")
    if low is not None:
        into["min"] = low if into["min"] is None else min(into["min"], low)
    if high is not None:
        into["max"] = high if into["max"] is None else max(into["max"], high)
    return into


def quantile(sketch: dict[str, Any], q: float) -> float | None:
    """The ``q`` quantile (0..1), within the sketch's relative accuracy; None when empty."""
    total = int(sketch["count"])
    if total == 0:
        return None
    rank = q * (total - 1)
    seen = int(sketch["zero_count"])
    if rank < seen:
        return 0.0
    gamma = _gamma(sketch)
    for key in sorted(sketch["bins"], key=int):
        seen += int(sketch["bins"][key])
        if seen > rank:
            return 2 * gamma ** int(key) / (gamma + 1)
    return float(sketch["max"])


def merge_counts(into: list[int], other: Iterable[int]) -> list[int]:
    """Element-wise sum of two histograms on the same bins.

    Raises:
        ValueError: If the bin counts differ (different bin edges).
    """
    other = list(other)
    if into and len(into) != len(other):
        raise ValueError(f"histograms have {len(into)} and {len(other)} bins")
    if not into:
        return [int(c) for c in other]
    return [a + int(b) for a, b in zip(into, other, strict=True)]


def merge_named_counts(into: dict[str, list[int]], items: Iterable[tuple[str, list[int]]]) -> None:
    """Merge ``(name, counts)`` histograms into a name-keyed dict, in place."""
    for name, counts in items:
        into[name] = merge_counts(into.get(name, []), counts)


def merge_tallies(into: dict[str, int], other: dict[str, int]) -> None:
    """Add integer tallies by key (feedback kinds), in place."""
    for key, count in other.items():
        into[key] = into.get(key, 0) + int(count)
