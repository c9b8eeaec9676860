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

    The batch record and every rollup change commit in one transaction; a race with another
    worker (the same batch, or the first window of a new rollup) rolls back and retries.

    Raises:
        ApiError: 400 if the batch names another device, or its histograms disagree in bins.
    """
    if batch.device_id != device.id:
        raise ApiError(400, f"batch is for {batch.device_id}, URL for {device.id}")
    windows = [w.model_dump(mode="json") for w in batch.windows]
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
                window_count=len(windows),
                dropped_windows=batch.dropped_windows,
                received_at=datetime.now(UTC),
            )
        )
        try:
            for window in windows:
                _merge_window(session, device, window)
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


def _merge_window(session: Session, device: Device, window: dict[str, Any]) -> None:
    day = window["window_start"][:10]
    key = (window["model"], window["version"], device.generation, device.platform, day)
    query = (
        select(TelemetryRollup)
        .where(
            TelemetryRollup.model == key[0],
            TelemetryRollup.version == key[1],
            TelemetryRollup.generation == key[2],
            TelemetryRollup.platform == key[3],
            TelemetryRollup.day == key[4],
        )
        .with_for_update()
    )
    rollup = session.exec(query).first()
    if rollup is None:
        rollup = TelemetryRollup(
            model=key[0],
            version=key[1],
            generation=key[2],
            platform=key[3],
            day=key[4],
            latency=merge.new_sketch(window["latency"]["relative_accuracy"]),
            outputs={},
            inputs={},
            feedback={},
            labels={},
        )
        session.add(rollup)
        session.flush()  # IntegrityError if another worker created it first: ingest retries
    rollup.inference_count += window["inference_count"]
    rollup.error_count += window["error_count"]
    rollup.selftest_failure_count += window["selftest_failure_count"]
    rollup.window_count += 1
    latency = dict(rollup.latency)
    latency["bins"] = dict(latency["bins"])
    rollup.latency = merge.merge(latency, window["latency"])
    outputs = {k: list(v) for k, v in rollup.outputs.items()}
    merge.merge_named_counts(outputs, ((h["name"], h["counts"]) for h in window["outputs"]))
    rollup.outputs = outputs
    inputs = {k: list(v) for k, v in rollup.inputs.items()}
    merge.merge_named_counts(inputs, ((h["name"], h["counts"]) for h in window["inputs"]))
    rollup.inputs = inputs
    feedback = dict(rollup.feedback)
    merge.merge_tallies(feedback, window["feedback"])
    rollup.feedback = feedback
    labels = {k: dict(v) for k, v in rollup.labels.items()}
    for predicted, counts in window["labels"].items():
        labels.setdefault(predicted, {})
        merge.merge_tallies(labels[predicted], counts)
    rollup.labels = labels
    session.add(rollup)


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
