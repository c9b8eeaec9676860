"""The fleet bench/seed_fleet.py writes: who the devices are, what each ran on each day, and the
telemetry aggregates their windows and rollups hold. Pure and deterministic for a seed.

Event time spans the ``days`` up to now (UTC). Hardware ids and firmware follow a mix of phones,
rings and dev boards; rings are paired with phones; some devices fall silent for days; a share
enroll during the span. Every device runs ``wrist-activity`` (1.0.0, then 1.1.0 from its
release, then 1.2.0 when a rollout's arm takes it); phones and the Raspberry Pi also run
``gait``. Window aggregates come from a pool per (model, version, device class): a device's
windows of one model on one day share one pool entry, so its day rollup is that entry times
the window count (exact, and cheap to write).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from firmware_bundles import telemetry as sketch
from server.arms import in_treatment

#: (hardware id, share of the fleet, generation, platform, firmware versions)
HARDWARE = (
    ("phone-android", 0.35, "phone", "android", ("12.0.0", "13.0.0", "14.0.0")),
    ("phone-ios", 0.25, "phone", "ios", ("16.4.0", "17.2.0", "17.5.0")),
    ("ring-gen3", 0.20, "ring-gen3", "nrf52840", ("3.1.0", "3.2.0", "3.3.0")),
    ("ring-gen4", 0.15, "ring-gen4", "nrf5340", ("4.0.0", "4.1.0")),
    ("devboard-rpi4", 0.03, "devboard", "rpi4", ("1.0.0", "1.1.0")),
    ("devboard-nrf52840", 0.02, "devboard", "nrf52840", ("1.0.0", "1.2.0")),
)
RINGS = {"ring-gen3", "ring-gen4"}
#: Models, their versions and the day (index into the span) each version was released.
WRIST = "wrist-activity"
GAIT = "gait"
RELEASES = {(WRIST, "1.0.0"): -40, (WRIST, "1.1.0"): 12, (GAIT, "2.0.0"): 2}
ROLLOUT_VERSION = (WRIST, "1.2.0")
ROLLOUT_HARDWARE = ("phone-android", "ring-gen3")
#: Rollout stages (percent) and the day each began; the rollout is at the last one listed.
ROLLOUT_STAGES = ((5.0, 24), (25.0, 27))
GAIT_HARDWARE = {"phone-android", "phone-ios", "devboard-rpi4"}
CLASSES = ("rest", "move", "run")
EDGES = (-2.0, -1.0, 0.0, 1.0, 2.0)
POOL = 48
RELATIVE_ACCURACY = 0.01


@dataclass
class DevicePlan:
    """One device: what it is, when it enrolled and fell silent, what it ran each day."""

    index: int
    id: str
    hardware_id: str
    generation: str
    platform: str
    firmware: str
    enrolled_at: datetime
    #: First day of the span it reports (0 if enrolled before the span).
    first_day: int
    #: Day from which it reports nothing (``days`` if it still reports).
    silent_from: int
    relay_id: str | None = None
    #: Day it took 1.1.0, and 1.2.0 (None: never); a failed 1.2.0 self-test keeps it on 1.1.0.
    took_110: int = 0
    took_120: int | None = None
    selftest_failed_120: bool = False
    reverted_120: bool = False
    firmware_update_day: int | None = None
    events: list[tuple[datetime, str, dict[str, Any]]] = field(default_factory=list)


class Plan:
    """The whole fleet, deterministic for ``seed``."""

    def __init__(self, devices: int, windows: int, days: int, seed: int, now: datetime) -> None:
        self.days = days
        self.now = now
        self.start = (now - timedelta(days=days - 1)).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        self.rng = random.Random(seed)
        self.rollout_id = 1
        self.devices = [self._device(i) for i in range(devices)]
        self._pair_rings()
        device_days = sum(max(0, d.silent_from - d.first_day) for d in self.devices)
        #: Mean windows per device per reporting day, for ``windows`` in all.
        self.per_day = windows / max(1, device_days * 0.98)

    def day(self, index: int) -> date:
        return (self.start + timedelta(days=index)).date()

    def _device(self, i: int) -> DevicePlan:
        rng = self.rng
        hw, _, generation, platform, firmware = _pick_hardware(rng.random())
        enrolled_day = -rng.randint(1, 60) if rng.random() < 0.75 else rng.randint(0, self.days - 2)
        enrolled_at = self.start + timedelta(days=enrolled_day, seconds=rng.randint(0, 86_399))
        silent_from = self.days
        if rng.random() < 0.08:  # silent for days: last reported 2 to 20 days ago
            silent_from = max(max(enrolled_day, 0) + 1, self.days - rng.randint(2, 20))
        plan = DevicePlan(
            index=i,
            id=f"dev-{i:06d}",
            hardware_id=hw,
            generation=generation,
            platform=platform,
            firmware=rng.choice(firmware),
            enrolled_at=enrolled_at,
            first_day=max(enrolled_day, 0),
            silent_from=silent_from,
        )
        plan.took_110 = max(RELEASES[(WRIST, "1.1.0")] + rng.randint(0, 3), plan.first_day)
        if hw in ROLLOUT_HARDWARE:
            for percent, began in ROLLOUT_STAGES:
                if in_treatment(self.rollout_id, plan.id, percent):
                    plan.took_120 = max(began + rng.randint(0, 1), plan.first_day)
                    break
            if plan.took_120 is not None:
                plan.selftest_failed_120 = rng.random() < 0.03
                plan.reverted_120 = not plan.selftest_failed_120 and rng.random() < 0.01
        if rng.random() < 0.1:
            plan.firmware_update_day = rng.randint(plan.first_day, self.days - 1)
        return plan

    def _pair_rings(self) -> None:
        phones = [d.id for d in self.devices if d.generation == "phone"]
        for device in self.devices:
            if device.hardware_id in RINGS and phones:
                device.relay_id = self.rng.choice(phones)

    def wrist_version(self, device: DevicePlan, day: int) -> str:
        if (
            device.took_120 is not None
            and day >= device.took_120
            and not device.selftest_failed_120
            and not device.reverted_120
        ):
            return "1.2.0"
        return "1.1.0" if day >= device.took_110 else "1.0.0"

    def models_on(self, device: DevicePlan, day: int) -> list[tuple[str, str]]:
        """(model, version) the device runs on ``day``."""
        running = [(WRIST, self.wrist_version(device, day))]
        if device.hardware_id in GAIT_HARDWARE and day >= RELEASES[(GAIT, "2.0.0")]:
            running.append((GAIT, "2.0.0"))
        return running

    def reporting_days(self, device: DevicePlan) -> Iterator[tuple[int, bool]]:
        """Each day the device reports: (day, whether its upload arrived)."""
        for day in range(device.first_day, device.silent_from):
            yield day, self.rng.random() >= 0.02

    def windows_on(self, models: int) -> int:
        k = round(self.rng.gauss(self.per_day, self.per_day**0.5))
        return max(1, min(24 * models, k))

    def last_seen(self, device: DevicePlan) -> datetime:
        if device.silent_from < self.days:
            end = self.start + timedelta(days=device.silent_from)
            return end - timedelta(seconds=self.rng.randint(0, 86_399))
        return self.now - timedelta(seconds=self.rng.randint(0, 7_200))


def _pick_hardware(pick: float) -> tuple[str, float, str, str, tuple[str, ...]]:
    """The :data:`HARDWARE` entry whose share covers ``pick`` in ``[0, 1)``."""
    acc = 0.0
    for entry in HARDWARE:
        acc += entry[1]
        if pick < acc:
            return entry
    return HARDWARE[-1]


def device_class(hardware_id: str) -> str:
    return "ring" if hardware_id in RINGS or "nrf" in hardware_id else "phone"


@dataclass(frozen=True)
class PoolEntry:
    """One window's aggregate as JSON, and its rollup columns for ``k`` windows."""

    window_json: str
    #: k -> (inference, error, self-test failure counts, and latency, outputs, inputs, feedback,
    #: labels as JSON), for k = 1 .. the most windows a day can hold.
    rollups: list[tuple[int, int, int, str, str, str, str, str]]


def make_pool(rng: random.Random, model: str, version: str, klass: str) -> list[PoolEntry]:
    """Window aggregates of one (model, version, device class): latency by class (rings are
    slower), outputs and inputs drifting a little with the version."""
    shift = {"1.0.0": 0.0, "1.1.0": 0.1, "1.2.0": 0.35, "2.0.0": 0.0}[version]
    base_ms = 3.0 if klass == "phone" else 18.0
    entries = []
    for _ in range(POOL):
        n = rng.randint(20, 200)
        latency = sketch.new_sketch(RELATIVE_ACCURACY)
        for _ in range(min(n, 24)):
            sketch.add(latency, rng.lognormvariate(0, 0.25) * base_ms / 1000)
        scale = n / latency["count"]
        latency["bins"] = {k: max(1, round(v * scale)) for k, v in latency["bins"].items()}
        latency["count"] = sum(latency["bins"].values())
        latency["sum"] *= latency["count"] / min(n, 24)
        inputs = [0] * (len(EDGES) + 1)
        for _ in range(n):
            x = rng.gauss(shift, 1.0)
            inputs[sum(1 for e in EDGES if x >= e)] += 1
        weights = (0.5 - shift / 4, 0.3, 0.2 + shift / 4)
        outputs = [0, 0, 0, 0]
        for _ in range(n):
            outputs[rng.choices(range(3), weights)[0]] += 1
        errors = 1 if rng.random() < 0.05 else 0
        selftest = 1 if version == "1.2.0" and klass == "ring" and rng.random() < 0.02 else 0
        feedback = {"thumbs_down": rng.randint(0, 3)} if rng.random() < 0.3 else {}
        labels: dict[str, dict[str, int]] = {}
        for _ in range(rng.randint(0, 6)):
            predicted, true = rng.choice(CLASSES), rng.choice(CLASSES)
            labels.setdefault(predicted, {})
            labels[predicted][true] = labels[predicted].get(true, 0) + 1
        window = {
            "inference_count": latency["count"],
            "error_count": errors,
            "selftest_failure_count": selftest,
            "window_count": 1,
            "latency": latency,
            "outputs": {"label": outputs},
            "inputs": {"x0": inputs},
            "feedback": feedback,
            "labels": labels,
        }
        entries.append(PoolEntry(_json(window), [_times(window, k) for k in range(0, 49)]))
    return entries


def _times(window: dict[str, Any], k: int) -> tuple[int, int, int, str, str, str, str, str]:
    lat = window["latency"]
    latency = {
        **lat,
        "bins": {b: c * k for b, c in lat["bins"].items()},
        "zero_count": lat["zero_count"] * k,
        "count": lat["count"] * k,
        "sum": lat["sum"] * k,
    }
    return (
        window["inference_count"] * k,
        window["error_count"] * k,
        window["selftest_failure_count"] * k,
        _json(latency),
        _json({n: [c * k for c in v] for n, v in window["outputs"].items()}),
        _json({n: [c * k for c in v] for n, v in window["inputs"].items()}),
        _json({n: c * k for n, c in window["feedback"].items()}),
        _json({p: {t: c * k for t, c in v.items()} for p, v in window["labels"].items()}),
    )


def _json(value: Any) -> str:
    """Compact JSON, escaped for COPY's text format (backslashes doubled)."""
    return json.dumps(value, separators=(",", ":")).replace("\\", "\\\\")


def utc(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()
