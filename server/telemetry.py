"""Telemetry ingest and storage: idempotent batches, each device's windows kept, and rollups per
device, model version and event-time day derived from them.

A batch's key (device, boot epoch, sequence) is unique, so a replay is a no-op; every merge adds
counts (see :mod:`server.aggregate`), so arrival order does not change the totals. Sequence numbers
start at 0 in each boot epoch; gaps give a device's completeness ratio.

Each accepted window is stored with its device, bundle and event time (``telemetry_window``), and
added into its device's rollup for that version and day (``telemetry_rollup``). Windows are kept
for ``telemetry_retention_days``, rollups for good; erasing a device's telemetry deletes both, so
every figure changes by exactly its contribution. Fleet figures add rollups up
(:mod:`server.metrics`).

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
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import delete, func, or_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from firmware_bundles import telemetry as sketch
from firmware_bundles.messages import TelemetryBatch, TelemetryWindow
from firmware_bundles.window_builder import TelemetryLayout
from server import aggregate, fleet_rollup, references
from server import batch_counts as per_device_batches
from server.errors import ApiError
from server.models import (
    Bundle,
    Device,
    TelemetryBatchRecord,
    TelemetryRollup,
    TelemetryWindowRecord,
)

log = logging.getLogger("edgefleet.server.telemetry")

#: Problems listed in one refusal (a batch of 1000 bad windows gets the first few, not a novel).
MAX_PROBLEMS_REPORTED = 10
#: Bundle layouts kept in memory (bundles are immutable, so a cached layout never goes stale).
MAX_CACHED_LAYOUTS = 4096
_layouts: dict[str, tuple[str, TelemetryLayout]] = {}

#: A device's rollup key: model, version, event-time day (UTC, ISO date).
_Key = tuple[str, str, str]


def ingest(
    *, session: Session, device: Device, batch: TelemetryBatch, relative_accuracy: float
) -> bool:
    """Store a batch for ``device``; returns False when it was a replay.

    The batch's windows are checked (:func:`check_windows`), stored, and added per key (model,
    version, event-time day) into the device's rollups, each row read and written once per batch.
    The batch record, its windows and the rollup changes commit in one transaction. Only the
    device's own rows are locked, so devices never wait on each other; a race with another upload
    of the same device (the same batch, or the first window of a new rollup) rolls back and
    retries.

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
    parts = _add_up(batch, relative_accuracy)
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
        record = TelemetryBatchRecord(
            device_id=device.id,
            boot_epoch=batch.boot_epoch,
            sequence=batch.sequence,
            window_count=len(batch.windows),
            dropped_windows=batch.dropped_windows,
            received_at=datetime.now(UTC),
        )
        try:
            session.add(record)
            session.flush()
            assert record.id is not None
            per_device_batches.count(session, device.id, batch.boot_epoch, batch.sequence)
            _store_windows(session, device, batch, record.id)
            _add_into_rollups(session, device, parts, relative_accuracy)
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
    named = {w.bundle_sha256 for w in batch.windows}
    named |= {s.bundle_sha256 for w in batch.windows for s in w.shadow}
    layouts = _bundle_layouts(session, named)
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
        hardware_id, layout = found
        if hardware_id != device.hardware_id:
            problems.append(
                f"{where}: field 'bundle_sha256': the bundle is for hardware {hardware_id}, device"
                f" {device.id} is {device.hardware_id}"
            )
        accuracy = window.latency.relative_accuracy
        if not math.isclose(accuracy, relative_accuracy):
            problems.append(
                f"{where}: field 'latency.relative_accuracy': {accuracy}, but this server merges"
                f" sketches at {relative_accuracy}"
            )
        problems.extend(f"{where}: {problem}" for problem in layout.problems(window))
        problems.extend(
            f"{where}: {problem}"
            for problem in shadow_problems(window, layouts, device.hardware_id, relative_accuracy)
        )
        if len(problems) >= MAX_PROBLEMS_REPORTED:
            break
    if problems:
        raise ApiError(422, "telemetry refused: " + "; ".join(problems[:MAX_PROBLEMS_REPORTED]))


def shadow_problems(
    window: TelemetryWindow,
    layouts: dict[str, tuple[str, TelemetryLayout]],
    hardware_id: str,
    relative_accuracy: float,
) -> list[str]:
    """What is wrong with a window's shadow entries: each must name a bundle published here for
    the device's hardware id, of the same model, under its own version, with its sketch at the
    server's accuracy."""
    found = []
    for i, entry in enumerate(window.shadow):
        field = f"field 'shadow.{i}'"
        published = layouts.get(entry.bundle_sha256)
        if published is None:
            found.append(f"{field}: bundle {entry.bundle_sha256} is not published on this server")
            continue
        target, candidate = published
        if target != hardware_id:
            found.append(f"{field}: the bundle is for hardware {target}, not {hardware_id}")
        if (candidate.model, candidate.version) != (window.model, entry.version):
            found.append(
                f"{field}: names {window.model} {entry.version}, but the bundle is"
                f" {candidate.model} {candidate.version}"
            )
        accuracy = entry.latency.relative_accuracy
        if not math.isclose(accuracy, relative_accuracy):
            found.append(
                f"{field}: latency.relative_accuracy {accuracy}, but this server merges"
                f" sketches at {relative_accuracy}"
            )
    return found


def _bundle_layouts(
    session: Session, bundle_sha256s: set[str]
) -> dict[str, tuple[str, TelemetryLayout]]:
    """Per published bundle among ``bundle_sha256s``: its hardware id and its windows' layout."""
    missing = bundle_sha256s - _layouts.keys()
    if missing:
        rows = session.exec(
            select(Bundle.sha256, Bundle.target_id, Bundle.manifest, Bundle.reference).where(
                col(Bundle.sha256).in_(missing)
            )
        ).all()
        if len(_layouts) + len(rows) > MAX_CACHED_LAYOUTS:
            _layouts.clear()
        for bundle_sha256, hardware_id, manifest, reference in rows:
            layout = TelemetryLayout.of(references.manifest_of(manifest, reference))
            _layouts[bundle_sha256] = (hardware_id, layout)
    return {s: _layouts[s] for s in bundle_sha256s if s in _layouts}


def _add_up(batch: TelemetryBatch, relative_accuracy: float) -> dict[_Key, dict[str, Any]]:
    """The checked windows of ``batch`` added up per rollup key (they line up: each was checked
    against its bundle's layout and the server's accuracy)."""
    parts: dict[_Key, dict[str, Any]] = {}
    for w in batch.windows:
        key = (w.model, w.version, w.window_start.astimezone(UTC).date().isoformat())
        part = parts.get(key)
        if part is None:
            part = parts[key] = aggregate.empty(relative_accuracy)
        aggregate.add(part, aggregate.of_window(w))
    return parts


def _store_windows(session: Session, device: Device, batch: TelemetryBatch, batch_id: int) -> None:
    session.bulk_insert_mappings(
        TelemetryWindowRecord,
        [
            {
                "batch_id": batch_id,
                "device_id": device.id,
                "hardware_id": device.hardware_id,
                "model": w.model,
                "version": w.version,
                "bundle_sha256": w.bundle_sha256,
                "window_start": w.window_start.astimezone(UTC),
                "window_s": w.window_s,
                "aggregate": aggregate.of_window(w),
            }
            for w in batch.windows
        ],
    )


def _add_into_rollups(
    session: Session, device: Device, parts: dict[_Key, dict[str, Any]], relative_accuracy: float
) -> None:
    """Read the device's rollup rows for the batch's keys once (locked) and add each part in.

    A row that fails the checks (which reads skip) is replaced by the part, so one bad row never
    makes correct data bounce; what it held is logged.
    """
    if not parts:
        return
    rows = session.exec(
        select(TelemetryRollup)
        .where(
            TelemetryRollup.device_id == device.id,
            col(TelemetryRollup.model).in_({k[0] for k in parts}),
            col(TelemetryRollup.day).in_({k[2] for k in parts}),
        )
        .order_by(col(TelemetryRollup.id))
        .with_for_update()
    ).all()
    existing = {(r.model, r.version, r.day): r for r in rows}
    changes: list[fleet_rollup.Change] = []
    for key in sorted(parts):
        part = parts[key]
        rollup = existing.get(key)
        if rollup is None:
            changes.append(fleet_rollup.Change((*key, device.hardware_id), part, "new", False))
            session.add(
                TelemetryRollup(
                    device_id=device.id,
                    hardware_id=device.hardware_id,
                    generation=device.generation,
                    platform=device.platform,
                    model=key[0],
                    version=key[1],
                    day=key[2],
                    **part,
                )
            )
            session.flush()  # IntegrityError if another upload created it first: ingest retries
            continue
        problem = aggregate.problem(rollup, relative_accuracy)
        current = aggregate.copy(aggregate.values(rollup)) if problem is None else None
        was: fleet_rollup.Was = "valid" if problem is None else "skipped"
        failed_before = current is not None and current["selftest_failure_count"] > 0
        if current is not None:
            try:
                aggregate.add(current, part)
            except ValueError as exc:  # a layout no manifest gives: written before the checks
                problem, current, was = str(exc), None, "replaced"
        changes.append(fleet_rollup.Change((*key, rollup.hardware_id), part, was, failed_before))
        if current is None:
            log.warning(
                "telemetry rollup %s %s fails its checks (%s); replaced by new data. It held: %s",
                rollup.id,
                key,
                problem,
                aggregate.values(rollup),
            )
            current = part
        for field, value in current.items():
            setattr(rollup, field, value)
        session.add(rollup)
    session.flush()
    fleet_rollup.add_changes(session, changes, relative_accuracy)


class Rollups(NamedTuple):
    """Fleet rollups as read: the rows that pass the checks, and how many stored rows were
    skipped."""

    rows: list[dict[str, Any]]
    skipped_rows: int


def rollups(session: Session, model: str | None = None, *, relative_accuracy: float) -> Rollups:
    """Rollups per model version x generation x platform x day (the devices' rollups added up),
    with latency quantiles; a stored row that fails the checks is skipped, counted and logged,
    never an error."""
    query = select(TelemetryRollup)
    if model:
        query = query.where(TelemetryRollup.model == model)
    groups: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}
    skipped = 0
    for r in session.exec(query.order_by(col(TelemetryRollup.id))):
        problem = aggregate.problem(r, relative_accuracy)
        if problem is not None:
            log.warning("telemetry rollup %s skipped: %s", r.id, problem)
            skipped += 1
            continue
        key = (r.model, r.version, r.generation, r.platform, r.day)
        group = groups.get(key)
        if group is None:
            group = groups[key] = aggregate.empty(relative_accuracy)
        aggregate.add(group, aggregate.values(r))
    result = []
    for (model_name, version, generation, platform, day), group in sorted(groups.items()):
        result.append(
            {
                "model": model_name,
                "version": version,
                "generation": generation,
                "platform": platform,
                "day": day,
                **group,
                "latency_quantiles_s": {
                    q: sketch.quantile(group["latency"], float(q)) for q in ("0.5", "0.9", "0.99")
                },
            }
        )
    return Rollups(result, skipped)


class Erased(NamedTuple):
    """What erasing one device's telemetry removed."""

    windows: int
    rollups: int
    batches: int


def erase_device(session: Session, device_id: str, *, relative_accuracy: float) -> Erased:
    """Delete every window, rollup and batch record of ``device_id`` (health data), in one
    transaction: every aggregate then changes by exactly its contribution (the fleet rollups it
    counted in are added up again without it).

    The batch records go too, so a batch the device still holds and sends again is taken as new.
    """
    fleet_keys = fleet_rollup.device_keys(session, device_id)
    windows = session.exec(
        delete(TelemetryWindowRecord).where(col(TelemetryWindowRecord.device_id) == device_id)
    ).rowcount
    rollup_rows = session.exec(
        delete(TelemetryRollup).where(col(TelemetryRollup.device_id) == device_id)
    ).rowcount
    batches = session.exec(
        delete(TelemetryBatchRecord).where(col(TelemetryBatchRecord.device_id) == device_id)
    ).rowcount
    per_device_batches.erase(session, device_id)
    fleet_rollup.recompute(session, fleet_keys, relative_accuracy)
    session.commit()
    return Erased(int(windows), int(rollup_rows), int(batches))


def drop_expired_windows(session: Session, *, now: datetime, retention_days: int) -> int:
    """Delete windows whose event time is older than ``retention_days`` before ``now`` (their
    rollups stay); returns how many."""
    cutoff = now - timedelta(days=retention_days)
    dropped = session.exec(
        delete(TelemetryWindowRecord).where(col(TelemetryWindowRecord.window_start) < cutoff)
    ).rowcount
    session.commit()
    return int(dropped)


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


def batch_counts(session: Session, devices: list[str]) -> dict[str, tuple[int, int]]:
    """Per device: telemetry batches received, and those its sequence numbers say were sent
    (over all its boot epochs; a record with a negative sequence is left out)."""
    return per_device_batches.counts(session, devices)
