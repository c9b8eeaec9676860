"""Devices not revoked per group of what they report running (``device_installed``), counted as
all of them minus the revoked ones: one grouped pass over ``device_installed`` alone and a few
rows through the partial index of revoked devices (``ix_device_revoked``), instead of joining every
row to the ``device`` table (the Fleet and Model pages at 100,000 devices; docs/dashboard.md)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func
from sqlmodel import Session, col, select

from server.models import Device, DeviceInstalled


def active(session: Session, keys: list[Any], *where: Any) -> Counter[tuple[Any, ...]]:
    """Per value of ``keys`` (``device_installed`` columns): rows of devices not revoked, among
    the rows ``where`` picks; groups with none are left out."""
    grouped = select(*keys, func.count()).where(*where).group_by(*keys)  # type: ignore[call-overload]
    found: Counter[tuple[Any, ...]] = Counter()
    for *key, n in session.exec(grouped):
        found[tuple(key)] += int(n)
    revoked = grouped.join(Device, col(Device.id) == col(DeviceInstalled.device_id)).where(
        col(Device.revoked)
    )
    for *key, n in session.exec(revoked):
        found[tuple(key)] -= int(n)
    return Counter({key: n for key, n in found.items() if n > 0})
