"""Telemetry batches per device and boot epoch (``telemetry_batch_count``): how many arrived and
the highest sequence number, so completeness over thousands of devices reads one row per device
instead of every batch record; each row carries its device's hardware id, so completeness per
hardware id reads this table alone (the Fleet page).

Kept where batch records are written (:mod:`server.ingest_store`, in the upload's transaction) and
erased with them (:func:`erase`); migration 0008 fills it from the stored records, 0011 gives
the stored rows their hardware ids."""

from __future__ import annotations

from sqlalchemy import delete, func
from sqlmodel import Session, col, select

from server import contributor_cache
from server.models import Device, TelemetryBatchCount, TelemetryBatchRecord

#: Devices named in one query (a longer list reads the whole table instead).
MAX_NAMED = 500


def counts(session: Session, devices: list[str]) -> dict[str, tuple[int, int]]:
    """Per device: batches received, and those its sequence numbers say were sent (over all its
    boot epochs); devices with no batch are left out."""
    wanted = set(devices)
    query = select(
        TelemetryBatchCount.device_id,
        func.sum(TelemetryBatchCount.received),
        func.sum(TelemetryBatchCount.top_sequence + 1),
    ).group_by(col(TelemetryBatchCount.device_id))
    found: dict[str, tuple[int, int]] = {}
    if len(wanted) > MAX_NAMED:
        rows = session.exec(query).all()
    else:
        rows = session.exec(query.where(col(TelemetryBatchCount.device_id).in_(wanted))).all()
    for device_id, received, expected in rows:
        if device_id in wanted:
            found[device_id] = (int(received), int(expected))
    return found


def erase(session: Session, device_id: str) -> None:
    """Delete the device's counts (and say so to remembered completeness figures)."""
    session.exec(delete(TelemetryBatchCount).where(col(TelemetryBatchCount.device_id) == device_id))
    contributor_cache.bump_generation(session)


def rebuild(session: Session) -> None:
    """Fill the table from the stored batch records (records with a negative number, which only
    an earlier bug could store, are left out as completeness leaves them out), each count with
    its device's hardware id (empty if the device row is missing, as migration 0011 fills it)."""
    session.exec(delete(TelemetryBatchCount))
    per_epoch = (
        select(
            TelemetryBatchRecord.device_id,
            TelemetryBatchRecord.boot_epoch,
            func.count().label("received"),
            func.max(TelemetryBatchRecord.sequence).label("top_sequence"),
        )
        .where(col(TelemetryBatchRecord.sequence) >= 0)
        .group_by(col(TelemetryBatchRecord.device_id), col(TelemetryBatchRecord.boot_epoch))
        .subquery()
    )
    hardware_id = (
        select(Device.hardware_id).where(col(Device.id) == per_epoch.c.device_id).scalar_subquery()
    )
    target = TelemetryBatchCount.__table__  # type: ignore[attr-defined]
    session.exec(
        target.insert().from_select(
            ["device_id", "boot_epoch", "hardware_id", "received", "top_sequence"],
            select(  # type: ignore[call-overload]
                per_epoch.c.device_id,
                per_epoch.c.boot_epoch,
                func.coalesce(hardware_id, ""),
                per_epoch.c.received,
                per_epoch.c.top_sequence,
            ),
        )
    )
