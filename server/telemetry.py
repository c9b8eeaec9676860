"""Telemetry ingest: idempotent batches merged into rollups per version, generation, platform, day.

A batch's key (device, boot epoch, sequence) is unique, so a replay is a no-op; every merge adds
counts (see :mod:`firmware_bundles.telemetry`), so arrival order does not change the totals.
Sequence numbers start at 0 in each boot epoch; gaps give a device's completeness ratio.

What one device sends can never break the rollups others write or read: every window is checked
against the manifest of the bundle it names (published here, for the device's hardware id:
histogram names and bin counts, label classes) and against the sketch accuracy this server merges
at (``Settings.telemetry_relative_accuracy``), so a rollup's layout is fixed by the manifest, not
by whichever device wrote first. A stored row that fails these checks (an earlier bug may have let
it in) is skipped and counted by reads, and replaced, with a warning in the log, by the next
correct data for its key.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import func, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from firmware_bundles import telemetry as merge
from firmware_bundles.manifest import Manifest
from firmware_bundles.messages import Count, LatencySketch, TallyName, TelemetryBatch
from firmware_bundles.window_builder import TelemetryLayout
from server.errors import ApiError
from server.models import Bundle, Device, TelemetryBatchRecord, TelemetryRollup

log = logging.getLogger("edgefleet.server.telemetry")

#: Problems listed in one refusal (a batch of 1000 bad windows gets the first few, not a novel).
MAX_PROBLEMS_REPORTED = 10
#: Bundle layouts kept in memory (bundles are immutable, so a cached layout never goes stale).
MAX_CACHED_LAYOUTS = 4096
_layouts: dict[str, tuple[str, TelemetryLayout]] = {}


def ingest(
    *, session: Session, device: Device, batch: TelemetryBatch, relative_accuracy: float
) -> bool:
    """Merge a batch for ``device``; returns False when it was a replay.

    The batch's windows are first checked (:func:`check_windows`), then folded per rollup key
    (model, version, generation, platform, event-time day) in memory, so each key's rollup row is
    read and written once per batch, not once per window. The batch record and every rollup
    change commit in one transaction; a race with another worker (the same batch, or the first
    window of a new rollup) rolls back and retries.

    Args:
        session: The database session.
        device: The device the batch is for.
        batch: The parsed batch.
        relative_accuracy: The latency-sketch accuracy this server merges at.

    Raises:
        ApiError: 400 if the batch names another device; 422 naming each window and field that
            disagrees with its bundle's manifest or the server's sketch accuracy.
    """
    if batch.device_id != device.id:
        raise ApiError(400, f"batch is for {batch.device_id}, URL for {device.id}")
    check_windows(session, device, batch, relative_accuracy)
    parts = _fold_batch(batch, relative_accuracy)
    for attempt in range(3):
        seen = session.exec(
            select(TelemetryBatchRecord.id).where(
                TelemetryBatchRecord.device_id == device.id,
                TelemetryBatchRecord.boot_epoch == batch.boot_epoch,
                TelemetryBatchRecord.sequence == batch.sequence,
            )
        ).first()
        if seen is not None:
            return False
        session.add(
            TelemetryBatchRecord(
                device_id=device.id,
                boot_epoch=batch.boot_epoch,
                sequence=batch.sequence,
                window_count=len(batch.windows),
                dropped_windows=batch.dropped_windows,
                received_at=datetime.now(UTC),
            )
        )
        try:
            _merge_parts(session, device, parts, relative_accuracy)
            session.commit()
            return True
        except IntegrityError:
            session.rollback()
            if attempt == 2:
                raise
    return False


def check_windows(
    session: Session, device: Device, batch: TelemetryBatch, relative_accuracy: float
) -> None:
    """Check each window against its bundle's manifest and the server's sketch accuracy.

    A window naming a bundle this server has not published (for the device's hardware id) is
    refused: its histograms could not be checked, and a bundle the server never offered has no
    rollout for its figures to inform.

    Raises:
        ApiError: 422 naming each window and field that disagrees (the first few).
    """
    layouts = _bundle_layouts(session, {w.bundle_sha256 for w in batch.windows})
    problems: list[str] = []
    for i, window in enumerate(batch.windows):
        where = f"window {i} ({window.model} {window.version} at {window.window_start.isoformat()})"
        found = layouts.get(window.bundle_sha256)
        if found is None:
            problems.append(
                f"{where}: field 'bundle_sha256': {window.bundle_sha256} is not published on this"
                " server"
            )
            continue
        target_id, layout = found
        if target_id != device.hardware_id:
            problems.append(
                f"{where}: field 'bundle_sha256': the bundle is for hardware {target_id}, device"
                f" {device.id} is {device.hardware_id}"
            )
        accuracy = window.latency.relative_accuracy
        if not math.isclose(accuracy, relative_accuracy):
            problems.append(
                f"{where}: field 'latency.relative_accuracy': {accuracy}, but this server merges"
                f" sketches at {relative_accuracy}"
            )
        problems.extend(f"{where}: {problem}" for problem in layout.problems(window))
        if len(problems) >= MAX_PROBLEMS_REPORTED:
            break
    if problems:
        raise ApiError(422, "telemetry refused: " + "; ".join(problems[:MAX_PROBLEMS_REPORTED]))


def _bundle_layouts(session: Session, shas: set[str]) -> dict[str, tuple[str, TelemetryLayout]]:
    """Per published bundle among ``shas``: its target id and its windows' layout."""
    missing = shas - _layouts.keys()
    if missing:
        rows = session.exec(
            select(Bundle.sha256, Bundle.target_id, Bundle.manifest).where(
                col(Bundle.sha256).in_(missing)
            )
        ).all()
        if len(_layouts) + len(rows) > MAX_CACHED_LAYOUTS:
            _layouts.clear()
        for sha, target_id, manifest in rows:
            _layouts[sha] = (target_id, TelemetryLayout.of(Manifest.from_dict(manifest)))
    return {sha: _layouts[sha] for sha in shas if sha in _layouts}


_Key = tuple[str, str, str]  # model, version, day (generation and platform are the device's)


def _empty(relative_accuracy: float) -> dict[str, Any]:
    return {
        "inference_count": 0,
        "error_count": 0,
        "selftest_failure_count": 0,
        "window_count": 0,
        "latency": merge.new_sketch(relative_accuracy),
        "outputs": {},
        "inputs": {},
        "feedback": {},
        "labels": {},
    }


def _fold(into: dict[str, Any], part: dict[str, Any]) -> None:
    """Add one window's or one part's aggregates into ``into`` (in place).

    Raises:
        ValueError: If histograms or sketches do not line up.
    """
    for field in ("inference_count", "error_count", "selftest_failure_count", "window_count"):
        into[field] += part[field]
    merge.merge(into["latency"], part["latency"])
    merge.merge_named_counts(into["outputs"], part["outputs"].items())
    merge.merge_named_counts(into["inputs"], part["inputs"].items())
    merge.merge_tallies(into["feedback"], part["feedback"])
    for predicted, counts in part["labels"].items():
        merge.merge_tallies(into["labels"].setdefault(predicted, {}), counts)


def _fold_batch(batch: TelemetryBatch, relative_accuracy: float) -> dict[_Key, dict[str, Any]]:
    """The checked windows of ``batch`` added up per rollup key (they line up: each was checked
    against its bundle's layout and the server's accuracy)."""
    parts: dict[_Key, dict[str, Any]] = {}
    for w in batch.windows:
        key = (w.model, w.version, w.window_start.astimezone(UTC).date().isoformat())
        part = parts.get(key)
        if part is None:
            part = parts[key] = _empty(relative_accuracy)
        _fold(
            part,
            {
                "inference_count": w.inference_count,
                "error_count": w.error_count,
                "selftest_failure_count": w.selftest_failure_count,
                "window_count": 1,
                "latency": w.latency.model_dump(),
                "outputs": {h.name: h.counts for h in w.outputs},
                "inputs": {h.name: h.counts for h in w.inputs},
                "feedback": w.feedback,
                "labels": w.labels,
            },
        )
    return parts


class StoredRollup(BaseModel):
    """What a stored rollup row must hold to be read or merged into (the wire's rules)."""

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


def row_problem(row: TelemetryRollup, relative_accuracy: float) -> str | None:
    """Why a stored rollup row fails the checks every window passes, or None if it does not."""
    try:
        stored = StoredRollup.model_validate(row, from_attributes=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return f"{len(exc.errors())} invalid fields, first {loc!r}: {first['msg']}"
    if not math.isclose(stored.latency.relative_accuracy, relative_accuracy):
        return f"latency sketch at relative accuracy {stored.latency.relative_accuracy}"
    return None


def _row_values(rollup: TelemetryRollup) -> dict[str, Any]:
    # JSON columns are replaced, not mutated, so the ORM sees the change.
    current = {f: getattr(rollup, f) for f in _ROLLUP_FIELDS}
    current["latency"] = {**current["latency"], "bins": dict(current["latency"]["bins"])}
    current["outputs"] = {k: list(v) for k, v in current["outputs"].items()}
    current["inputs"] = {k: list(v) for k, v in current["inputs"].items()}
    current["feedback"] = dict(current["feedback"])
    current["labels"] = {k: dict(v) for k, v in current["labels"].items()}
    return current


def _merge_parts(
    session: Session, device: Device, parts: dict[_Key, dict[str, Any]], relative_accuracy: float
) -> None:
    """Read the batch's rollup rows once (locked) and add each part into its row.

    A row that fails the checks (which reads skip) is replaced by the part, so one bad row never
    makes correct devices' data bounce; what it held is logged.
    """
    if not parts:
        return
    rows = session.exec(
        select(TelemetryRollup)
        .where(
            col(TelemetryRollup.model).in_({k[0] for k in parts}),
            col(TelemetryRollup.day).in_({k[2] for k in parts}),
            TelemetryRollup.generation == device.generation,
            TelemetryRollup.platform == device.platform,
        )
        .with_for_update()
    ).all()
    existing = {(r.model, r.version, r.day): r for r in rows}
    for key, part in parts.items():
        rollup = existing.get(key)
        if rollup is None:
            rollup = TelemetryRollup(
                model=key[0],
                version=key[1],
                generation=device.generation,
                platform=device.platform,
                day=key[2],
                **{f: part[f] for f in _ROLLUP_FIELDS},
            )
            session.add(rollup)
            session.flush()  # IntegrityError if another worker created it first: ingest retries
            continue
        problem = row_problem(rollup, relative_accuracy)
        current = _row_values(rollup) if problem is None else None
        if current is not None:
            try:
                _fold(current, part)
            except ValueError as exc:  # a layout no manifest gives: written before the checks
                problem, current = str(exc), None
        if current is None:
            log.warning(
                "telemetry rollup %s %s fails its checks (%s); replaced by new data. It held: %s",
                rollup.id,
                key,
                problem,
                {f: getattr(rollup, f) for f in _ROLLUP_FIELDS},
            )
            current = part
        for field, value in current.items():
            setattr(rollup, field, value)
        session.add(rollup)


_ROLLUP_FIELDS = (
    "inference_count",
    "error_count",
    "selftest_failure_count",
    "window_count",
    "latency",
    "outputs",
    "inputs",
    "feedback",
    "labels",
)


class Rollups(NamedTuple):
    """Rollups as read: the rows that pass the checks, and how many were skipped."""

    rows: list[dict[str, Any]]
    skipped_rows: int


def rollups(session: Session, model: str | None = None, *, relative_accuracy: float) -> Rollups:
    """Rollups with latency quantiles, for the API and dashboard; a row that fails the checks
    is skipped, counted and logged, never an error."""
    query = select(TelemetryRollup)
    if model:
        query = query.where(TelemetryRollup.model == model)
    result = []
    skipped = 0
    for r in session.exec(
        query.order_by(
            TelemetryRollup.model,
            TelemetryRollup.version,
            TelemetryRollup.generation,
            TelemetryRollup.platform,
            TelemetryRollup.day,
        )
    ):
        problem = row_problem(r, relative_accuracy)
        if problem is not None:
            log.warning("telemetry rollup %s skipped: %s", r.id, problem)
            skipped += 1
            continue
        data = r.model_dump(exclude={"id"})
        data["latency_quantiles_s"] = {
            q: merge.quantile(r.latency, float(q)) for q in ("0.5", "0.9", "0.99")
        }
        result.append(data)
    return Rollups(result, skipped)


def completeness(session: Session, device_id: str) -> dict[str, Any]:
    """Batches received against those the sequence numbers say were sent.

    A batch record with a negative number (only an earlier bug could store one) is skipped and
    counted in ``skipped_rows``.
    """
    valid = (
        col(TelemetryBatchRecord.boot_epoch) >= 0,
        col(TelemetryBatchRecord.sequence) >= 0,
        col(TelemetryBatchRecord.dropped_windows) >= 0,
        col(TelemetryBatchRecord.window_count) >= 0,
    )
    rows = session.exec(
        select(
            TelemetryBatchRecord.boot_epoch,
            func.count(),
            func.max(TelemetryBatchRecord.sequence),
            func.sum(TelemetryBatchRecord.dropped_windows),
        )
        .where(TelemetryBatchRecord.device_id == device_id, *valid)
        .group_by(col(TelemetryBatchRecord.boot_epoch))
    ).all()
    skipped = session.exec(
        select(func.count())
        .select_from(TelemetryBatchRecord)
        .where(
            TelemetryBatchRecord.device_id == device_id,
            or_(*(~condition for condition in valid)),
        )
    ).one()
    received = sum(int(r[1]) for r in rows)
    expected = sum(int(r[2]) + 1 for r in rows)
    dropped = sum(int(r[3] or 0) for r in rows)
    return {
        "device_id": device_id,
        "batches_received": received,
        "batches_expected": expected,
        "completeness": (received / expected) if expected else None,
        "windows_dropped_on_device": dropped,
        "skipped_rows": int(skipped),
    }
