"""Per-version field figures and drift, computed exactly from what devices uploaded.

A query names a model version, optionally a hardware id, and an event-time span ``[start, end)``
in UTC. Whole days inside the span are read from the devices' day rollups plus their windows not
yet folded into them (:func:`server.fold.day_rows`); a day the span cuts is read from the stored
windows whose start falls inside it, so any span is exact. Each device
contributes its own aggregates, so a figure knows how many devices it rests on: below the
server's ``min_devices_shown`` it is withheld from viewers (health data) and shown, with its
device count, to operators and to the rollout gates.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlmodel import Session, col, select

from firmware_bundles import telemetry as sketch
from firmware_bundles.manifest import Histogram, Manifest
from firmware_bundles.window_builder import UNKNOWN_PREDICTION
from server import aggregate, drift, fleet_reads, fold, quality, references
from server.errors import ApiError
from server.models import Bundle, TelemetryWindowRecord
from server.registry import get_version
from server.telemetry import batch_counts

#: The span a query covers when it names none: the last seven days.
DEFAULT_SPAN = timedelta(days=7)
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
#: Whole days are read from the fleet rollups (:mod:`server.fleet_rollup`); tests turn it off to
#: compare the answers with those from the devices' rows.
USE_FLEET_ROLLUPS = True


@dataclass(frozen=True)
class Span:
    """What a query covers: one model version (on one hardware id, or all) over event time
    ``[start, end)``, UTC."""

    model: str
    version: str
    hardware_id: str | None
    start: datetime
    end: datetime


def parse_time(value: str | None, *, end: bool) -> datetime | None:
    """An ISO 8601 date or time as a UTC instant; a date as ``to`` means the end of that day.

    Raises:
        ApiError: 400 naming the value if it is neither.
    """
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime.combine(day + timedelta(days=1) if end else day, time(), UTC)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError as exc:
        which = "to" if end else "from"
        raise ApiError(
            400, f"{which!r} must be an ISO 8601 date or time (UTC), not {value!r}"
        ) from exc
    return moment.astimezone(UTC)


def make_span(
    model: str,
    version: str,
    hardware_id: str | None,
    start: str | None,
    end: str | None,
    *,
    now: datetime,
) -> Span:
    """A span from the API's query parameters (default: the seven days up to ``now``).

    Raises:
        ApiError: 400 for a bad time or an empty span.
    """
    stop = parse_time(end, end=True) or now
    begin = parse_time(start, end=False) or stop - DEFAULT_SPAN
    if begin >= stop:
        raise ApiError(
            400, f"'from' ({begin.isoformat()}) must be before 'to' ({stop.isoformat()})"
        )
    return Span(model, version, hardware_id, begin, stop)


@dataclass
class Group:
    """Aggregates of a set of devices, with who contributed (listed, or ``counted``)."""

    aggregate: dict[str, Any]
    devices: set[str] = field(default_factory=set)
    #: Devices that reported at least one self-test failure.
    selftest_failed_devices: set[str] = field(default_factory=set)
    counted: fleet_reads.Counted | None = None

    def add(self, device_id: str, values: dict[str, Any]) -> None:
        aggregate.add(self.aggregate, values)
        self.devices.add(device_id)
        if values["selftest_failure_count"]:
            self.selftest_failed_devices.add(device_id)

    @property
    def device_count(self) -> int:
        return self.counted.devices if self.counted else len(self.devices)

    @property
    def selftest_failed_count(self) -> int:
        return self.counted.selftest_failed if self.counted else len(self.selftest_failed_devices)


@dataclass
class Collected:
    """A span's data: the total, per event-time day, and stored rows skipped as corrupt."""

    total: Group
    days: dict[str, Group]
    relative_accuracy: float
    skipped_rows: int = 0

    def day(self, day: str) -> Group:
        """The group of ``day`` (made empty when it has none yet)."""
        group = self.days.get(day)
        if group is None:
            group = self.days[day] = Group(aggregate.empty(self.relative_accuracy))
        return group


def _whole_and_cut_days(span: Span) -> tuple[list[str], list[str]]:
    whole: list[str] = []
    cut: list[str] = []
    day = span.start.date()
    while datetime.combine(day, time(), UTC) < span.end:
        begins = datetime.combine(day, time(), UTC)
        ends = begins + timedelta(days=1)
        (whole if begins >= span.start and ends <= span.end else cut).append(day.isoformat())
        day += timedelta(days=1)
    return whole, cut


def collect(session: Session, span: Span, relative_accuracy: float) -> Collected:
    """Every device's contribution to ``span``, added up in total and per day.

    Raises:
        ApiError: 404 for an unknown model or version.
    """
    get_version(session, span.model, span.version)
    found = Collected(Group(aggregate.empty(relative_accuracy)), {}, relative_accuracy)

    def take(device_id: str, day: str, values: dict[str, Any]) -> None:
        """Add one stored row (a device's day, or one window) in, unless it fails its checks."""
        if aggregate.problem(values, relative_accuracy) is not None:
            found.skipped_rows += 1
            return
        found.day(day).add(device_id, values)
        found.total.add(device_id, values)

    whole, cut = _whole_and_cut_days(span)
    # (hardware id, day) pairs read from the devices' rows: all of them without fleet rollups.
    per_device: set[tuple[str, str]] | None = None
    if whole and USE_FLEET_ROLLUPS:
        per_device = fleet_reads.take(session, span, whole, found, listed=bool(cut))
    if whole and per_device != set():
        # The devices' day rollups plus their windows not yet folded (read together).
        for row in fold.day_rows(
            session,
            model=span.model,
            version=span.version,
            hardware_id=span.hardware_id,
            days=whole,
        ):
            if per_device is None or (row.hardware_id, row.day) in per_device:
                take(row.device_id, row.day, row.values)
    for day in cut:
        # Only the part of a cut day inside the span: its whole-day rollup cannot be used.
        begins = datetime.combine(date.fromisoformat(day), time(), UTC)
        windows = select(TelemetryWindowRecord.device_id, TelemetryWindowRecord.aggregate).where(
            TelemetryWindowRecord.model == span.model,
            TelemetryWindowRecord.version == span.version,
            col(TelemetryWindowRecord.window_start) >= max(span.start, begins),
            col(TelemetryWindowRecord.window_start) < min(span.end, begins + timedelta(days=1)),
        )
        if span.hardware_id:
            windows = windows.where(TelemetryWindowRecord.hardware_id == span.hardware_id)
        for device_id, stored in session.exec(windows.order_by(col(TelemetryWindowRecord.id))):
            take(device_id, day, dict(stored))
    return found


def completeness(
    session: Session,
    devices: Iterable[str],
    known: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """Batches received against those the devices' sequence numbers say were sent, added over
    ``devices`` (all of each device's uploads: batches are per device, not per version).

    ``known``: batch counts already read for a superset of ``devices`` (a span's total, when
    its days are figured too), so they are read once per request, not once per day.
    """
    wanted = sorted(devices)
    if known is None:
        known = batch_counts(session, wanted)
    counts = [known[d] for d in wanted if d in known]
    received = sum(got for got, _ in counts)
    expected = sum(want for _, want in counts)
    return {
        "batches_received": received,
        "batches_expected": expected,
        "ratio": received / expected if expected else None,
    }


def bin_labels(histogram: Histogram) -> list[str]:
    """Names of a manifest histogram's bins, under/overflow and unseen included."""
    if histogram.kind == "categorical":
        return [str(c) for c in histogram.categories] + ["(unseen)"]
    edges = [f"{e:g}" for e in histogram.edges]
    inner = [f"[{a}, {b})" for a, b in itertools.pairwise(edges)]
    return [f"< {edges[0]}", *inner, f">= {edges[-1]}"]


def reference(session: Session, span: Span) -> Manifest:
    """The manifest of the version's bundle for the span's hardware id (or its first bundle):
    bin edges, class names and the reference histograms.

    Raises:
        ApiError: 404 if the version has no bundle (for that hardware id).
    """
    version = get_version(session, span.model, span.version)
    query = select(Bundle).where(Bundle.version_id == version.id)
    if span.hardware_id:
        query = query.where(Bundle.target_id == span.hardware_id)
    bundle = session.exec(query.order_by(col(Bundle.target_id))).first()
    if bundle is None:
        on = f" for {span.hardware_id}" if span.hardware_id else ""
        raise ApiError(404, f"{span.model} {span.version} has no bundle{on}")
    return references.bundle_manifest(bundle)


def figures(
    session: Session,
    group: Group,
    manifest: Manifest,
    *,
    min_devices: int,
    privileged: bool,
    known_batches: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """The figures of one group, or why they are withheld.

    Rates are per inference, except the self-test failure rate: the share of reporting devices
    that reported a self-test failure. Accuracy counts labels whose prediction is known.
    """
    devices = group.device_count
    if devices < min_devices and not privileged:
        return {"withheld": f"too few devices (fewer than {min_devices})"}
    agg = group.aggregate
    n = agg["inference_count"]
    latency = agg["latency"]
    labels = {p: c for p, c in agg["labels"].items() if p != UNKNOWN_PREDICTION}
    labelled = sum(sum(c.values()) for c in labels.values())
    correct = sum(c.get(p, 0) for p, c in labels.items())
    shown = references.bins(manifest)
    outputs = {h.name: h for h in shown.outputs}
    return {
        "withheld": None,
        "devices_reporting": devices,
        "windows": agg["window_count"],
        "inferences": n,
        "errors": agg["error_count"],
        "error_rate": agg["error_count"] / n if n else None,
        "selftest_failures": agg["selftest_failure_count"],
        "selftest_failure_rate": group.selftest_failed_count / devices if devices else None,
        "latency_s": {
            "count": latency["count"],
            "mean": latency["sum"] / latency["count"] if latency["count"] else None,
            **{name: sketch.quantile(latency, q) for name, q in QUANTILES.items()},
        },
        "outputs": [
            {
                "name": name,
                "bins": bin_labels(outputs[name]) if name in outputs else None,
                "counts": counts,
                "proportions": [c / sum(counts) for c in counts] if sum(counts) else None,
            }
            for name, counts in sorted(agg["outputs"].items())
        ],
        "feedback": {
            kind: {"count": count, "rate": count / n if n else None}
            for kind, count in sorted(agg["feedback"].items())
        },
        "accuracy": {
            "value": correct / labelled if labelled else None,
            "labels": labelled,
            "labels_without_prediction": sum(agg["labels"].get(UNKNOWN_PREDICTION, {}).values()),
        },
        "completeness": group.counted.completeness(session)
        if group.counted
        else completeness(session, group.devices, known_batches),
        "data_quality": quality.data_quality(agg, {h.name: h for h in shown.inputs}),
        "shadow": quality.shadow(agg),
    }


def drift_figures(
    current: Group,
    baseline_counts: dict[str, dict[str, list[int]]],
    manifest: Manifest,
    *,
    min_devices: int,
    privileged: bool,
) -> dict[str, Any]:
    """Drift of each input feature and output of ``current`` against ``baseline_counts``
    (``{"inputs": {name: counts}, "outputs": {...}}``), on the manifest's bins.

    Raises:
        ApiError: 409 when the two sides' bins differ for a feature (another layout).
    """
    if current.device_count < min_devices and not privileged:
        return {"withheld": f"too few devices (fewer than {min_devices})"}
    result: dict[str, Any] = {"withheld": None, "devices_reporting": current.device_count}
    shown = references.bins(manifest)
    named = {
        "inputs": {h.name: h for h in shown.inputs},
        "outputs": {h.name: h for h in shown.outputs},
    }
    missing = (current.aggregate.get("quality") or {}).get("missing") or {}
    for side in ("inputs", "outputs"):
        rows = []
        for name, histogram in sorted(named[side].items()):
            bins = len(histogram.counts)
            ours = current.aggregate[side].get(name) or [0] * bins
            theirs = baseline_counts[side].get(name) or [0] * bins
            if len(ours) != bins or len(theirs) != bins:
                raise ApiError(
                    409,
                    f"{side[:-1]} {name!r}: bins differ ({len(ours)} against {len(theirs)});"
                    " drift needs the same bin edges on both sides",
                )
            rows.append(
                {
                    "name": name,
                    "bins": bin_labels(histogram),
                    "counts": ours,
                    "baseline_counts": theirs,
                    **drift.drift(ours, theirs).to_dict(),
                    **(
                        {"data_quality": _feature_quality(name, ours, missing, histogram)}
                        if side == "inputs"
                        else {}
                    ),
                }
            )
        result[side] = rows
    return result


def _feature_quality(
    name: str, counts: list[int], missing: dict[str, int], histogram: Histogram
) -> dict[str, Any]:
    figures = quality.feature_quality(name, counts, int(missing.get(name, 0)), histogram)
    return {k: v for k, v in figures.items() if k not in ("name", "kind")}


def reference_counts(manifest: Manifest) -> dict[str, dict[str, list[int]]]:
    """The manifest's reference histograms as drift's baseline.

    Raises:
        ApiError: 409 if the bundle detaches its reference and it was not uploaded.
    """
    refs = references.reference(manifest)
    return {
        "inputs": {h.name: list(h.counts) for h in refs.inputs},
        "outputs": {h.name: list(h.counts) for h in refs.outputs},
    }
