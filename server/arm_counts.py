"""How many devices a rollout selects, and how many of them its current stage takes: the Rollout
page's and ``GET /v1/rollouts/{id}``'s arm counts.

A device's arm is a SHA-256 of (rollout, device) (:func:`server.arms.bucket`). On PostgreSQL the
database computes the same bucket for each selected device (its ``sha256``, the digest's first 8
bytes as an unsigned big-endian number, modulo :data:`server.arms.BUCKETS`) and counts per
firmware version, so tens of thousands of devices never travel to Python; elsewhere the selected
devices are read and their remembered buckets counted (:func:`server.arms.buckets`).
"""

from __future__ import annotations

from sqlalchemy import text
from sqlmodel import Session

from firmware_bundles.manifest import FirmwareRange
from server.arms import BUCKETS, buckets, treatment_buckets
from server.evaluator import selected_ids
from server.fleet import cohorts_members
from server.models import Rollout

#: Per firmware version of the selected devices: how many, and how many have a bucket below
#: ``:taken``. ``('x' || hex)::bit(64)::bigint`` reads the 8 bytes as a signed number; adding
#: 2^64 modulo 2^64 makes it the unsigned one Python's ``int.from_bytes`` gives.
_COUNTS = f"""
SELECT firmware_version, count(*) AS selected,
    count(*) FILTER (WHERE mod(mod(
        ('x' || encode(substring(sha256(convert_to(:prefix || id, 'UTF8')) from 1 for 8), 'hex'))
            ::bit(64)::bigint::numeric + 18446744073709551616, 18446744073709551616),
        {BUCKETS}) < :taken) AS treated
FROM device
WHERE hardware_id = ANY(:hardware_ids) AND NOT revoked {{members}}
GROUP BY firmware_version
"""


def arm_counts(session: Session, rollout: Rollout) -> tuple[int, int]:
    """The rollout's selected devices (its selector's hardware ids, firmware range and cohorts;
    revoked devices left out), and how many of them the current stage's percent takes."""
    assert rollout.id is not None
    taken = treatment_buckets(rollout.stages[rollout.stage]["percent"])
    if session.get_bind().dialect.name != "postgresql":
        devices = selected_ids(session, rollout)
        return len(devices), sum(1 for b in buckets(rollout.id, devices) if b < taken)
    selector = rollout.selector
    members = cohorts_members(session, selector.get("cohorts") or [])
    params: dict[str, object] = {
        "prefix": f"{rollout.id}:",
        "taken": taken,
        "hardware_ids": list(selector["hardware_ids"]),
    }
    if members is not None:
        params["members"] = sorted(members)
    statement = _COUNTS.format(members="" if members is None else "AND id = ANY(:members)")
    firmware = FirmwareRange(
        minimum=selector.get("firmware_min", "0.0.0"), below=selector.get("firmware_below")
    )
    selected = treated = 0
    for version, n, t in session.connection().execute(text(statement), params):
        if firmware.contains(version):
            selected += int(n)
            treated += int(t)
    return selected, treated
