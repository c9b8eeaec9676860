"""Telemetry ingest: idempotent batches merged into rollups per version, generation, platform, day.

A batch's key (device, boot epoch, sequence) is unique, so a replay is a no-op; every merge adds
counts (see :mod:`firmware_bundles.telemetry`), so arrival order does not change the totals.
Sequence numbers start at 0 in each boot epoch; gaps give a device's completeness ratio.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from firmware_bundles import telemetry as merge
from firmware_bundles.messages import TelemetryBatch
from server.errors import ApiError
from server.models import Device, TelemetryBatchRecord, TelemetryRollup


def ingest(*, session: Session, device: Device, batch: TelemetryBatch) -> bool:
    """Merge a batch for ``device``; returns False when it was a replay.

    The batch's windows are first folded per rollup key (model, version, generation, platform,
    event-time day) in memory, so each key's rollup row is read and written once per batch, not
    once per window. The batch record and every rollup change commit in one transaction; a race
    with another worker (the same batch, or the first window of a new rollup) rolls back and
    retries.

    Raises:
        ApiError: 400 if the batch names another device, or its histograms disagree in bins.
    """
    if batch.device_id != device.id:
        raise ApiError(400, f"batch is for {batch.device_id}, URL for {device.id}")
    try:
        parts = _fold_batch(device, batch)
    except ValueError as exc:
        raise ApiError(400, f"telemetry refused: {exc}") from exc
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
            _merge_parts(session, device, parts)
            session.commit()
            return True
        except ValueError as exc:
            session.rollback()
            raise ApiError(400, f"telemetry refused: {exc}") from exc
        except IntegrityError:
            session.rollback()
            if attempt == 2:
                raise
    return False


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


def _fold_batch(device: Device, batch: TelemetryBatch) -> dict[_Key, dict[str, Any]]:
    parts: dict[_Key, dict[str, Any]] = {}
    for w in batch.windows:
        key = (w.model, w.version, w.window_start.astimezone(UTC).date().isoformat())
        latency = w.latency.model_dump()
        part = parts.get(key)
        if part is None:
            part = parts[key] = _empty(latency["relative_accuracy"])
        _fold(
            part,
            {
                "inference_count": w.inference_count,
                "error_count": w.error_count,
                "selftest_failure_count": w.selftest_failure_count,
                "window_count": 1,
                "latency": latency,
                "outputs": {h.name: h.counts for h in w.outputs},
                "inputs": {h.name: h.counts for h in w.inputs},
                "feedback": w.feedback,
                "labels": w.labels,
            },
        )
    return parts


def _merge_parts(session: Session, device: Device, parts: dict[_Key, dict[str, Any]]) -> None:
    """Read the batch's rollup rows once (locked) and add each part into its row."""
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
                latency=part["latency"],
                **{f: part[f] for f in _ROLLUP_FIELDS if f != "latency"},
            )
            session.add(rollup)
            session.flush()  # IntegrityError if another worker created it first: ingest retries
            continue
        current = {f: getattr(rollup, f) for f in _ROLLUP_FIELDS}
        # JSON columns are replaced, not mutated, so the ORM sees the change.
        current["latency"] = {**current["latency"], "bins": dict(current["latency"]["bins"])}
        current["outputs"] = {k: list(v) for k, v in current["outputs"].items()}
        current["inputs"] = {k: list(v) for k, v in current["inputs"].items()}
        current["feedback"] = dict(current["feedback"])
        current["labels"] = {k: dict(v) for k, v in current["labels"].items()}
        _fold(current, part)
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


def rollups(session: Session, model: str | None = None) -> list[dict[str, Any]]:
    """Rollups with latency quantiles, for the API and dashboard."""
    query = select(TelemetryRollup)
    if model:
        query = query.where(TelemetryRollup.model == model)
    result = []
    for r in session.exec(
        query.order_by(
            TelemetryRollup.model,
            TelemetryRollup.version,
            TelemetryRollup.generation,
            TelemetryRollup.platform,
            TelemetryRollup.day,
        )
    ):
        data = r.model_dump(exclude={"id"})
        data["latency_quantiles_s"] = {
            q: merge.quantile(r.latency, float(q)) for q in ("0.5", "0.9", "0.99")
        }
        result.append(data)
    return result


def completeness(session: Session, device_id: str) -> dict[str, Any]:
    """Batches received against those the sequence numbers say were sent."""
    rows = session.exec(
        select(
            TelemetryBatchRecord.boot_epoch,
            func.count(),
            func.max(TelemetryBatchRecord.sequence),
            func.sum(TelemetryBatchRecord.dropped_windows),
        )
        .where(TelemetryBatchRecord.device_id == device_id)
        .group_by(col(TelemetryBatchRecord.boot_epoch))
    ).all()
    received = sum(int(r[1]) for r in rows)
    expected = sum(int(r[2]) + 1 for r in rows)
    dropped = sum(int(r[3] or 0) for r in rows)
    return {
        "device_id": device_id,
        "batches_received": received,
        "batches_expected": expected,
        "completeness": (received / expected) if expected else None,
        "windows_dropped_on_device": dropped,
    }
