"""Telemetry aggregates as plain dicts: an empty one, one window's, adding one into another, and
the checks a stored one must pass before it is read or added to. Pure: no database, no I/O.

An aggregate holds what windows add up to: counts, a latency sketch (see
:mod:`firmware_bundles.telemetry`), named histograms, feedback and label tallies, data-quality
tallies (``quality``: ``missing`` per input histogram, ``refused`` per input) and, per candidate
version run in shadow beside it, the shadow counts with the candidate's latency sketch
(``shadow``). Stored aggregates written before the last two existed read as empty ones. Adding is
associative and commutative in everything but the float ``latency.sum``, so any order of arrival
gives the same counts and quantiles.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from firmware_bundles import telemetry as sketch
from firmware_bundles.messages import Count, LatencySketch, TallyName, TelemetryWindow

COUNT_FIELDS = ("inference_count", "error_count", "selftest_failure_count", "window_count")
#: Every field of an aggregate (the columns of a stored rollup).
FIELDS = (*COUNT_FIELDS, "latency", "outputs", "inputs", "feedback", "labels", "quality", "shadow")
#: A shadow entry's counts (besides its latency sketch).
SHADOW_COUNTS = ("sampled", "dropped", "compared", "agreed", "errors")


def empty(relative_accuracy: float) -> dict[str, Any]:
    """An aggregate of nothing, at the server's sketch accuracy."""
    return {
        "inference_count": 0,
        "error_count": 0,
        "selftest_failure_count": 0,
        "window_count": 0,
        "latency": sketch.new_sketch(relative_accuracy),
        "outputs": {},
        "inputs": {},
        "feedback": {},
        "labels": {},
        "quality": {"missing": {}, "refused": {}},
        "shadow": {},
    }


def of_window(window: TelemetryWindow) -> dict[str, Any]:
    """One checked window as an aggregate (``window_count`` 1)."""
    return {
        "inference_count": window.inference_count,
        "error_count": window.error_count,
        "selftest_failure_count": window.selftest_failure_count,
        "window_count": 1,
        "latency": sketch_of(window.latency),
        "outputs": {h.name: list(h.counts) for h in window.outputs},
        "inputs": {h.name: list(h.counts) for h in window.inputs},
        "feedback": dict(window.feedback),
        "labels": {k: dict(v) for k, v in window.labels.items()},
        "quality": {
            "missing": dict(window.quality.missing),
            "refused": dict(window.quality.refused),
        },
        "shadow": {
            s.version: {
                **{f: getattr(s, f) for f in SHADOW_COUNTS},
                "latency": sketch_of(s.latency),
            }
            for s in window.shadow
        },
    }


def sketch_of(latency: LatencySketch) -> dict[str, Any]:
    """A window's latency sketch as an aggregate holds it: ``model_dump()``'s dict, read field
    by field (a fifth of its cost, once per window on the ingest path)."""
    return {
        "relative_accuracy": latency.relative_accuracy,
        "bins": dict(latency.bins),
        "zero_count": latency.zero_count,
        "count": latency.count,
        "sum": latency.sum,
        "min": latency.min,
        "max": latency.max,
    }


def add(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Add ``part`` into ``into`` in place (``into`` must be a copy the caller owns).

    Raises:
        ValueError: If histograms or sketches do not line up.
    """
    into["inference_count"] += part["inference_count"]
    into["error_count"] += part["error_count"]
    into["selftest_failure_count"] += part["selftest_failure_count"]
    into["window_count"] += part["window_count"]
    sketch.merge(into["latency"], part["latency"])
    # (Each merge below only when there is something to merge: the fold adds every window.)
    if part["outputs"]:
        sketch.merge_named_counts(into["outputs"], part["outputs"].items())
    if part["inputs"]:
        sketch.merge_named_counts(into["inputs"], part["inputs"].items())
    if part["feedback"]:
        sketch.merge_tallies(into["feedback"], part["feedback"])
    for predicted, counts in part["labels"].items():
        sketch.merge_tallies(into["labels"].setdefault(predicted, {}), counts)
    quality = part.get("quality")
    if quality:
        for kind in ("missing", "refused"):
            if quality.get(kind):
                sketch.merge_tallies(into["quality"][kind], quality[kind])
    shadow = part.get("shadow")
    if not shadow:
        return
    for version, theirs in shadow.items():
        ours = into["shadow"].get(version)
        if ours is None:
            ours = into["shadow"][version] = {
                **dict.fromkeys(SHADOW_COUNTS, 0),
                "latency": sketch.new_sketch(float(theirs["latency"]["relative_accuracy"])),
            }
        for field in SHADOW_COUNTS:
            ours[field] += theirs[field]
        sketch.merge(ours["latency"], theirs["latency"])


def copy(values: dict[str, Any]) -> dict[str, Any]:
    """A copy deep enough for :func:`add` (JSON columns are replaced, not mutated, so the ORM
    sees a change)."""
    return {
        **{f: values[f] for f in COUNT_FIELDS},
        "latency": {**values["latency"], "bins": dict(values["latency"]["bins"])},
        "outputs": {k: list(v) for k, v in values["outputs"].items()},
        "inputs": {k: list(v) for k, v in values["inputs"].items()},
        "feedback": dict(values["feedback"]),
        "labels": {k: dict(v) for k, v in values["labels"].items()},
        "quality": {
            kind: dict((values.get("quality") or {}).get(kind) or {})
            for kind in ("missing", "refused")
        },
        "shadow": {
            version: {
                **entry,
                "latency": {**entry["latency"], "bins": dict(entry["latency"]["bins"])},
            }
            for version, entry in (values.get("shadow") or {}).items()
        },
    }


class StoredQuality(BaseModel):
    """A stored aggregate's data-quality tallies."""

    missing: dict[str, Count] = {}
    refused: dict[str, Count] = {}


class StoredShadow(BaseModel):
    """A stored aggregate's counts of one candidate in shadow."""

    sampled: Count
    dropped: Count
    compared: Count
    agreed: Count
    errors: Count
    latency: LatencySketch


class StoredAggregate(BaseModel):
    """What a stored aggregate must hold to be read or added to (the wire's rules)."""

    model_config = ConfigDict(extra="ignore")

    inference_count: Count
    error_count: Count
    selftest_failure_count: Count
    window_count: Count
    latency: LatencySketch
    outputs: dict[str, list[Count]]
    inputs: dict[str, list[Count]]
    feedback: dict[TallyName, Count]
    labels: dict[TallyName, dict[TallyName, Count]]
    #: None: written before these fields existed (read as empty).
    quality: StoredQuality | None = None
    shadow: dict[str, StoredShadow] | None = None


def problem(stored: Any, relative_accuracy: float) -> str | None:
    """Why a stored aggregate (a row, or a dict) fails the checks every window passes, or None.

    An earlier bug may have let such a row in; readers skip and count it rather than fail.
    """
    try:
        if isinstance(stored, dict):
            checked = StoredAggregate.model_validate(stored)
        else:
            checked = StoredAggregate.model_validate(stored, from_attributes=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return f"{len(exc.errors())} invalid fields, first {loc!r}: {first['msg']}"
    if not math.isclose(checked.latency.relative_accuracy, relative_accuracy):
        return f"latency sketch at relative accuracy {checked.latency.relative_accuracy}"
    return None


def values(row: Any) -> dict[str, Any]:
    """The aggregate fields of a stored row, as a dict."""
    return {f: getattr(row, f) for f in FIELDS}
