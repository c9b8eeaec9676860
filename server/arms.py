"""Rollout arms: which devices a rollout's stage takes, and what each arm is offered.

Membership is a stable hash of (rollout, device): a device's bucket in ``0..9999`` never changes,
and a stage at ``p`` percent takes the buckets below ``p * 100``, so a device in at 5% stays in at
25%, and a device enrolled later joins by the same rule (hawkBit #1548). Pure, but
for a memo of the buckets already computed (:func:`buckets`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from firmware_bundles.manifest import FirmwareRange

if TYPE_CHECKING:
    from server.offers import Offer

BUCKETS = 10_000

#: States in which a rollout decides what its devices are offered.
OFFERING = frozenset(
    {"running", "paused", "waiting-for-approval", "halted", "rolled-back", "completed"}
)
#: States in which a rollout still owns its model on its hardware ids (release and withdraw of
#: that model there are refused; another rollout of it on them too).
OWNING = frozenset({"draft", "running", "paused", "waiting-for-approval", "halted"})


def bucket(rollout_id: int, device_id: str) -> int:
    """The device's bucket in this rollout, ``0..BUCKETS-1``."""
    digest = hashlib.sha256(f"{rollout_id}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_treatment(rollout_id: int, device_id: str, percent: float) -> bool:
    """Whether the stage at ``percent`` takes the device (given it is in the selector)."""
    return bucket(rollout_id, device_id) < treatment_buckets(percent)


def treatment_buckets(percent: float) -> int:
    """How many buckets (from 0) the stage at ``percent`` takes."""
    return round(percent * BUCKETS / 100)


#: Rollouts whose devices' buckets :func:`buckets` remembers (the most recently asked); a
#: rollout's map holds one entry per device asked about (about 10 MB per 100,000 devices).
KEPT_ROLLOUTS = 4
_kept: OrderedDict[int, dict[str, int]] = OrderedDict()
_kept_lock = threading.Lock()


def buckets(rollout_id: int, device_ids: Iterable[str]) -> list[int]:
    """:func:`bucket` of each device, remembered per rollout: a device's bucket in a rollout
    never changes, so a remembered one is never stale; only devices not asked about before are
    hashed (the Rollout page counts the arms of every selected device at each view)."""
    with _kept_lock:
        known = _kept.pop(rollout_id, None) or {}
        _kept[rollout_id] = known
        while len(_kept) > KEPT_ROLLOUTS:
            _kept.popitem(last=False)
    found = []
    for device_id in device_ids:
        value = known.get(device_id)
        if value is None:
            value = known[device_id] = bucket(rollout_id, device_id)
        found.append(value)
    return found


@dataclass(frozen=True)
class ArmRule:
    """What one rollout decides for the devices of one hardware id it covers."""

    rollout_id: int
    model: str
    state: str
    percent: float
    #: Devices the selector's cohorts name; None when the selector names no cohort (all).
    cohort_devices: frozenset[str] | None
    firmware_min: str
    firmware_below: str | None
    new: Offer
    #: What the control arm runs (the release when the rollout started); None if nothing was.
    previous: Offer | None
    #: A shadow rollout's sampling: the treatment arm keeps ``previous`` answering and runs
    #: ``new`` in shadow on this share of the calls. None for a normal rollout.
    shadow_fraction: float | None = None

    def selects(self, device_id: str, firmware: str) -> bool:
        if self.cohort_devices is not None and device_id not in self.cohort_devices:
            return False
        return FirmwareRange(minimum=self.firmware_min, below=self.firmware_below).contains(
            firmware
        )

    def offer(self, device_id: str, firmware: str, running: str | None) -> Offer | None:
        """What this rollout offers the device, or None to leave the release in force.

        Args:
            device_id: The device.
            firmware: Its firmware version.
            running: The version of this model it reports running, if any.
        """
        if self.state not in OFFERING or not self.selects(device_id, firmware):
            return None
        if not in_treatment(self.rollout_id, device_id, self.percent):
            return self.previous
        if self.shadow_fraction is not None:
            if self.previous is None or self.state in ("halted", "rolled-back"):
                return self.previous
            return replace(self.previous, shadow=self.new, shadow_fraction=self.shadow_fraction)
        if self.state == "rolled-back":
            return self.previous
        if self.state == "halted" and running != self.new.version:
            # Halted: nothing new; a device that switched keeps what it runs.
            return self.previous
        return self.new


def apply_rules(
    offers: Mapping[str, Offer],
    rules: list[ArmRule],
    device_id: str,
    firmware: str,
    running: Mapping[str, str],
) -> dict[str, Offer]:
    """``offers`` with each rollout's decision for the device applied."""
    result = dict(offers)
    for rule in rules:
        chosen = rule.offer(device_id, firmware, running.get(rule.model))
        if chosen is not None:
            result[rule.model] = chosen
        elif rule.state in OFFERING and rule.selects(device_id, firmware):
            result.pop(rule.model, None)  # no previous version: control runs nothing new
    return result
