"""Telemetry ingest and storage: idempotent batches, each device's windows kept, and rollups per
device, model version and event-time day derived from them.

A batch's key (device, boot epoch, sequence) is unique, so a replay is a no-op; every merge adds
counts (see :mod:`server.aggregate`), so arrival order does not change the totals. Sequence numbers
start at 0 in each boot epoch; gaps give a device's completeness ratio.

Each accepted window is appended with its device, bundle and event time (``telemetry_window``), and
the batch answered (:mod:`server.ingest_store` writes; this module checks a batch and says what it
stores, :class:`Upload`); a background job later folds windows into their device's rollup for that
version and day (``telemetry_rollup``, :mod:`server.fold`), and every reader adds the windows not
yet folded to the rollups, so figures are exact at any moment. Windows are kept for
``telemetry_retention_days`` (PostgreSQL: day partitions dropped whole, :mod:`server.partitions`),
rollups for good; erasing a device's telemetry deletes both, so every figure changes by exactly its
contribution. Fleet figures add rollups up (:mod:`server.metrics`).

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
from datetime import UTC, datetime, time, timedelta
from typing import Any, NamedTuple

from sqlalchemy import delete, func, or_
from sqlmodel import Session, col, select

from firmware_bundles import telemetry as sketch
from firmware_bundles.messages import TelemetryBatch, TelemetryWindow
from firmware_bundles.window_builder import TelemetryLayout
from server import aggregate, fleet_rollup, fold, partitions, references
from server import batch_counts as per_device_batches
from server.errors import ApiError
from server.models import (
    Bundle,
    TelemetryBatchRecord,
    TelemetryRollup,
    TelemetryWindowRecord,
)

_WINDOWS = TelemetryWindowRecord.__table__  # type: ignore[attr-defined]

log = logging.getLogger("edgefleet.server.telemetry")

#: Problems listed in one refusal (a batch of 1000 bad windows gets the first few, not a novel).
MAX_PROBLEMS_REPORTED = 10
#: Bundle layouts kept in memory (bundles are immutable, so a cached layout never goes stale).
MAX_CACHED_LAYOUTS = 4096
_layouts: dict[str, tuple[str, TelemetryLayout]] = {}


class Upload(NamedTuple):
    """A checked batch as it is stored: its record and its windows' rows (what
    :mod:`server.ingest_store` appends)."""

    device_id: str
    #: The device's: its batch count carries it (the Fleet page's completeness per hardware id).
    hardware_id: str
    boot_epoch: int
    sequence: int
    window_count: int
    dropped_windows: int
    received_at: datetime
    #: One dict per window: the ``telemetry_window`` columns but ``id`` and ``batch_id``, and
    #: the batch's ``boot_epoch`` and ``sequence``.
    windows: list[dict[str, Any]]

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.device_id, self.boot_epoch, self.sequence)


def upload_of(device_id: str, hardware_id: str, batch: TelemetryBatch) -> Upload:
    """What storing ``batch`` for the device writes (its windows checked by
    :func:`windows_problems` first).

    Raises:
        ApiError: 400 if the batch names another device.
    """
    if batch.device_id != device_id:
        raise ApiError(400, f"batch is for {batch.device_id}, URL for {device_id}")
    windows = [
        {
            "device_id": device_id,
            "hardware_id": hardware_id,
            "model": w.model,
            "version": w.version,
            "bundle_sha256": w.bundle_sha256,
            "window_start": w.window_start,
            "window_s": w.window_s,
            "aggregate": aggregate.of_window(w),
            "folded": False,
            # The batch's key, which PostgreSQL's append joins each window to its record by.
            "boot_epoch": batch.boot_epoch,
            "sequence": batch.sequence,
        }
        for w in batch.windows
    ]
    return Upload(
        device_id,
        hardware_id,
        batch.boot_epoch,
        batch.sequence,
        len(batch.windows),
        batch.dropped_windows,
        datetime.now(UTC),
        windows,
    )


def windows_problems(
    batch: TelemetryBatch,
    device_id: str,
    hardware_id: str,
    layouts: dict[str, tuple[str, TelemetryLayout]],
    relative_accuracy: float,
) -> list[str]:
    """What is wrong with each window against its bundle's manifest and the server's sketch
    accuracy (the first few problems; ``layouts`` from :func:`bundle_layouts`).

    A window naming a bundle this server has not published (for the device's hardware id) is
    refused: its histograms could not be checked, and a bundle the server never offered has no
    rollout for its figures to inform.
    """
    problems: list[str] = []
    for i, window in enumerate(batch.windows):
        found = layouts.get(window.bundle_sha256)
        if found is None:
            own = [f"field 'bundle_sha256': {window.bundle_sha256} is not published on this server"]
        else:
            bundle_hardware, layout = found
            own = []
            if bundle_hardware != hardware_id:
                own.append(
                    f"field 'bundle_sha256': the bundle is for hardware {bundle_hardware},"
                    f" device {device_id} is {hardware_id}"
                )
            own.extend(
                accuracy_problems(
                    "field 'latency.relative_accuracy':",
                    window.latency.relative_accuracy,
                    relative_accuracy,
                )
            )
            own.extend(layout.problems(window))
            own.extend(shadow_problems(window, layouts, hardware_id, relative_accuracy))
        if own:  # the window named only when it has problems (most have none)
            where = (
                f"window {i} ({window.model} {window.version} at {window.window_start.isoformat()})"
            )
            problems.extend(f"{where}: {problem}" for problem in own)
        if len(problems) >= MAX_PROBLEMS_REPORTED:
            break
    return problems[:MAX_PROBLEMS_REPORTED]


def refusal(problems: list[str]) -> ApiError:
    """The 422 for a batch whose windows have ``problems``."""
    return ApiError(422, "telemetry refused: " + "; ".join(problems))


def bundles_named(batch: TelemetryBatch) -> set[str]:
    """The bundles a batch's windows and their shadow entries name."""
    named = {w.bundle_sha256 for w in batch.windows}
    named |= {s.bundle_sha256 for w in batch.windows for s in w.shadow}
    return named


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
        found.extend(
            accuracy_problems(
                f"{field}: latency.relative_accuracy",
                entry.latency.relative_accuracy,
                relative_accuracy,
            )
        )
    return found


def accuracy_problems(what: str, accuracy: float, relative_accuracy: float) -> list[str]:
    """``what`` refused when a sketch's accuracy is not the one this server merges at."""
    if math.isclose(accuracy, relative_accuracy):
        return []
    return [f"{what} {accuracy}, but this server merges sketches at {relative_accuracy}"]


def cached_layouts(bundle_sha256s: set[str]) -> dict[str, tuple[str, TelemetryLayout]] | None:
    """:func:`bundle_layouts` without the database, if every bundle's layout is in memory."""
    try:
        return {s: _layouts[s] for s in bundle_sha256s}
    except KeyError:
        return None


def bundle_layouts(
    session: Session, bundle_sha256s: set[str]
) -> dict[str, tuple[str, TelemetryLayout]]:
    """Per published bundle among ``bundle_sha256s``: its hardware id and its windows' layout
    (kept in memory: bundles are immutable)."""
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


class Rollups(NamedTuple):
    """Fleet rollups as read: the rows that pass the checks, and how many stored rows were
    skipped."""

    rows: list[dict[str, Any]]
    skipped_rows: int


def rollups(session: Session, model: str | None = None, *, relative_accuracy: float) -> Rollups:
    """Rollups per model version x generation x platform x day (the devices' rollups and their
    windows not yet folded, added up), with latency quantiles; a stored row that fails the checks
    is skipped, counted and logged, never an error."""
    rows = list(fold.day_rows(session, model=model))
    platforms = fold.device_platforms(session, {r.device_id for r in rows if r.generation is None})
    groups: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}
    skipped = 0
    for r in rows:
        problem = aggregate.problem(r.values, relative_accuracy)
        if problem is not None:
            log.warning("telemetry of %s on %s skipped: %s", r.device_id, r.day, problem)
            skipped += 1
            continue
        generation, platform = (
            (r.generation, r.platform)
            if r.generation is not None and r.platform is not None
            else platforms.get(r.device_id, ("", ""))
        )
        key = (r.model, r.version, generation, platform, r.day)
        group = groups.get(key)
        if group is None:
            group = groups[key] = aggregate.empty(relative_accuracy)
        aggregate.add(group, r.values)
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
    """Drop the folded windows of each event-time day (UTC) that ended ``retention_days`` or more
    before ``now`` (their rollups stay); returns how many.

    PostgreSQL drops whole day partitions; a partition with windows still waiting to be folded
    stays until the fold job has taken them. SQLite deletes the same days' folded rows.
    """
    cutoff = (now - timedelta(days=retention_days)).astimezone(UTC).date()
    engine = session.get_bind()
    if partitions.is_partitioned(engine):  # type: ignore[arg-type]
        dropped, waiting = partitions.drop_before(engine, cutoff)  # type: ignore[arg-type]
        if waiting:
            log.info("kept telemetry partitions of %s: windows there wait to be folded", waiting)
        return dropped
    dropped_rows = session.exec(
        delete(TelemetryWindowRecord).where(
            col(TelemetryWindowRecord.window_start) < datetime.combine(cutoff, time(), UTC),
            col(TelemetryWindowRecord.folded),
        )
    ).rowcount
    session.commit()
    return int(dropped_rows)


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
