"""The registry side of bench/seed_fleet.py: signed bundles published through the server's
registry, releases and confirmations back-dated over the span, a rollout created by the server's
rollout code and back-dated with an hourly decision log, cohorts; and the device-side rows that
follow from the plan (recorded states, device events, cohort members, enrolment tokens)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from bench import seed_plan as sp
from bench.seed_rollout import seed_rollout
from firmware_bundles import SigningKey, build
from firmware_bundles.catalogue import DeviceTarget
from firmware_bundles.messages import InstalledModel
from server.device_events import state_hash
from tests.conftest import MODEL_BYTES, manifest_draft, tflite_files, tflite_placeholder

MICRO = {"ring-gen3", "ring-gen4", "devboard-nrf52840"}
#: What the micro targets' self-test vector expects of their placeholder model.
EXPECTED = (0.2, 0.3, 0.5)
VERSIONS = (
    (sp.WRIST, "1.0.0", 1),
    (sp.WRIST, "1.1.0", 2),
    (sp.WRIST, "1.2.0", 3),
    (sp.GAIT, "2.0.0", 1),
)
ALL_HARDWARE = tuple(h[0] for h in sp.HARDWARE)


def draft(model: str, version: str, counter: int, target: DeviceTarget) -> dict[str, Any]:
    """A manifest draft with the layout the windows use (x0 on EDGES, three classes), the
    converter's choice and figures, and provenance with data hashes."""
    hardware_id = target.hardware_id
    entry = {
        "target_id": hardware_id,
        "generation": target.generation,
        "platform": target.platform,
        "firmware": target.firmware.to_dict(),
    }
    d = manifest_draft(name=model, version=version, release_counter=counter, targets=[entry])
    d["outputs"][0]["class_labels"] = list(sp.CLASSES)
    d["outputs"][0]["shape"] = [None, 3]
    d["self_test"]["vectors"][0]["expected"] = {"probabilities": [[0.2, 0.3, 0.5]]}
    d["reference_histograms"] = {
        "inputs": [
            {
                "name": "x0",
                "kind": "numeric",
                "edges": list(sp.EDGES),
                "counts": [5, 10, 35, 35, 10, 5],
            }
        ],
        "outputs": [
            {
                "name": "label",
                "kind": "categorical",
                "categories": list(sp.CLASSES),
                "counts": [50, 30, 20, 0],
            }
        ],
    }
    digest = {v: f"{i:x}" * 64 for i, v in enumerate(("1.0.0", "1.1.0", "1.2.0", "2.0.0"), 1)}
    d["provenance"] = {
        **d["provenance"],
        "data_sha256": {"train": digest[version], "held_out": digest[version][::-1]},
        "tool_versions": {"onnx": "1.17.0", "onnxruntime": "1.20.0", "edgefleet": "0.1.0"},
        "builder": "ci@seed",
    }
    accuracy = {"1.0.0": 0.91, "1.1.0": 0.925, "1.2.0": 0.94, "2.0.0": 0.88}[version]
    d["metrics"] = {"accuracy": accuracy, "float_accuracy": accuracy + 0.004}
    if hardware_id in MICRO:
        tflite_placeholder(d, EXPECTED, tolerance=1e-2, tflm_version="seed")
        d["runtime"]["precision"] = "int8"
        d["quantisation"] = {
            "scheme": "int8-static",
            "quantised_ops": 2,
            "calibration": {"method": "minmax", "samples": 256, "data_sha256": digest[version]},
        }
    return d


def files(hardware_id: str) -> dict[str, bytes]:
    if hardware_id not in MICRO:
        return {"model.onnx": MODEL_BYTES}
    return tflite_files(EXPECTED)


def _copy_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")).replace("\\", "\\\\")


@dataclass
class Registry:
    """What the telemetry and device rows need from the registry."""

    shas: dict[tuple[str, str, str], str]
    #: Each device's last report, made once (three tables are written from it).
    _reported: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    def sha(self, model: str, version: str, hardware_id: str) -> str:
        return self.shas[(model, version, hardware_id)]

    def firmware(self, plan: sp.Plan, d: sp.DevicePlan) -> str:
        """The device's firmware now (a patch release if it updated during the span)."""
        if d.firmware_update_day is None:
            return d.firmware
        major, minor, patch = d.firmware.split(".")
        return f"{major}.{minor}.{int(patch) + 1}"

    def reported(self, plan: sp.Plan, d: sp.DevicePlan) -> list[dict[str, Any]]:
        """What the device reported last (its last reporting day)."""
        if d.index not in self._reported:
            self._reported[d.index] = self._report(plan, d)
        return self._reported[d.index]

    def _report(self, plan: sp.Plan, d: sp.DevicePlan) -> list[dict[str, Any]]:
        last = max(d.first_day, d.silent_from - 1)
        entries = []
        for model, version in plan.models_on(d, last):
            failed = model == sp.WRIST and d.selftest_failed_120 and version == "1.1.0"
            entries.append(
                InstalledModel(
                    model=model,
                    version=version,
                    bundle_sha256=self.sha(model, version, d.hardware_id),
                    release_counter={"1.0.0": 1, "1.1.0": 2, "1.2.0": 3, "2.0.0": 1}[version],
                    active_slot="a",
                    slots={"a": "active", "b": "failed" if failed else "standby"},
                    last_install="self-test-failed" if failed else "ok",
                    last_error="self-test vector 0 differs by 0.31" if failed else None,
                ).to_dict()
            )
        return entries

    def installed_json(self, plan: sp.Plan, d: sp.DevicePlan) -> str:
        return _copy_json(self.reported(plan, d))

    def small_tables(self, plan: sp.Plan) -> Iterator[tuple[str, str, Iterator[str]]]:
        """(table, columns, COPY lines) for each of the smaller device-side tables."""
        yield (
            "device_state",
            "device_id, state_hash, firmware_version, installed, recorded_at",
            (self._state_line(plan, d) for d in plan.devices),
        )
        yield (
            "device_installed",
            "device_id, model, hardware_id, version, bundle_sha256, last_install",
            (
                f"{d.id}\t{m['model']}\t{d.hardware_id}\t{m['version']}\t{m['bundle_sha256']}"
                f"\t{m['last_install']}\n"
                for d in plan.devices
                for m in self.reported(plan, d)
            ),
        )
        yield (
            "device_event",
            "id, device_id, at, kind, model, version, bundle_sha256, outcome, details",
            self._event_lines(plan),
        )
        yield (
            "cohort_member",
            "cohort, device_id",
            (f"beta\t{d.id}\n" for d in plan.devices if d.index % 100 == 0),
        )

    def _state_line(self, plan: sp.Plan, d: sp.DevicePlan) -> str:
        reported = self.reported(plan, d)
        firmware = self.firmware(plan, d)
        digest = state_hash(firmware, reported)
        return (
            f"{d.id}\t{digest}\t{firmware}\t{_copy_json(reported)}\t{sp.utc(plan.last_seen(d))}\n"
        )

    def _event_lines(self, plan: sp.Plan) -> Iterator[str]:
        next_id = 0
        for d in plan.devices:
            for at, kind, fields in self._events(plan, d):
                next_id += 1
                details = fields.pop("details", {})
                yield (
                    f"{next_id}\t{fields.get('device_id', d.id)}\t{sp.utc(at)}\t{kind}"
                    f"\t{_n(fields.get('model'))}\t{_n(fields.get('version'))}"
                    f"\t{_n(fields.get('bundle_sha256'))}\t{_n(fields.get('outcome'))}"
                    f"\t{_copy_json(details)}\n"
                )

    def _events(
        self, plan: sp.Plan, d: sp.DevicePlan
    ) -> Iterator[tuple[datetime, str, dict[str, Any]]]:
        rng = plan.rng

        def on(day: int) -> datetime:
            return max(
                plan.start + timedelta(days=day, seconds=rng.randint(0, 80_000)), d.enrolled_at
            )

        yield (
            d.enrolled_at,
            "enrolled",
            {
                "details": {
                    "hardware_id": d.hardware_id,
                    "firmware_version": d.firmware,
                    "relay_id": d.relay_id,
                }
            },
        )
        if d.relay_id is not None:
            yield (
                d.enrolled_at,
                "paired",
                {"device_id": d.relay_id, "details": {"relayed_device_id": d.id}},
            )

        def install(
            day: int, model: str, version: str, before: str | None, outcome: str = "ok"
        ) -> tuple[datetime, str, dict[str, Any]]:
            details: dict[str, Any] = {"slot": "a", "from_version": before}
            if outcome != "ok":
                details = {"error": "self-test vector 0 differs by 0.31", "running_version": before}
            return (
                on(day),
                "install",
                {
                    "model": model,
                    "version": version,
                    "bundle_sha256": self.sha(model, version, d.hardware_id),
                    "outcome": outcome,
                    "details": {k: v for k, v in details.items() if v is not None},
                },
            )

        first = "1.1.0" if d.first_day >= d.took_110 else "1.0.0"
        yield install(d.first_day, sp.WRIST, first, None)
        if first == "1.0.0" and d.took_110 < d.silent_from:
            yield install(d.took_110, sp.WRIST, "1.1.0", "1.0.0")
        if d.took_120 is not None and d.took_120 < d.silent_from:
            if d.selftest_failed_120:
                yield install(d.took_120, sp.WRIST, "1.2.0", "1.1.0", "self-test-failed")
            else:
                yield install(d.took_120, sp.WRIST, "1.2.0", "1.1.0")
                if d.reverted_120 and d.took_120 + 1 < d.silent_from:
                    yield (
                        on(d.took_120 + 1),
                        "revert",
                        {
                            "model": sp.WRIST,
                            "version": "1.1.0",
                            "bundle_sha256": self.sha(sp.WRIST, "1.1.0", d.hardware_id),
                            "details": {"slot": "b", "from_version": "1.2.0", "from_slot": "a"},
                        },
                    )
        gait_day = max(d.first_day, sp.RELEASES[(sp.GAIT, "2.0.0")])
        if d.hardware_id in sp.GAIT_HARDWARE and gait_day < d.silent_from:
            yield install(gait_day, sp.GAIT, "2.0.0", None)
        if d.firmware_update_day is not None and d.firmware_update_day < d.silent_from:
            yield (
                on(d.firmware_update_day),
                "firmware",
                {"details": {"from_firmware": d.firmware, "to_firmware": self.firmware(plan, d)}},
            )


def _n(value: object) -> str:
    return "\\N" if value is None else str(value)


def seed_registry(database_url: str, data_dir: Path, plan: sp.Plan) -> Registry:
    """Publish, release, confirm and roll out; returns the bundles' SHA-256s.

    Raises:
        SystemExit: If the database already holds devices.
    """
    from sqlmodel import Session, select

    from edgefleet.server_cli import init_trust
    from server import registry
    from server.app import build_state
    from server.config import Settings
    from server.confirmations import confirmation
    from server.db import upgrade
    from server.models import Cohort, Device, ModelVersion, Release

    url = database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    init_trust(data_dir)
    upgrade(url)
    state = build_state(Settings(data_dir=data_dir, database_url=url))
    key = SigningKey.from_pem((data_dir / "keys" / "release.pem").read_bytes())
    shas: dict[tuple[str, str, str], str] = {}
    with Session(state.engine) as session:
        if session.exec(select(Device.id).limit(1)).first() is not None:
            raise SystemExit("the database already holds devices: seed an empty one")
        for model, version, counter in VERSIONS:
            hardware = sp.GAIT_HARDWARE if model == sp.GAIT else ALL_HARDWARE
            for hw in sorted(hardware):
                target = state.catalogue.targets[hw]
                data = build(draft(model, version, counter, target), files(hw), [key])
                bundle = registry.publish_bytes(
                    session=session, state=state, data=data, publisher="ci"
                )
                shas[(model, version, hw)] = bundle.sha256
        versions = {(v.model_name, v.version): v for v in session.exec(select(ModelVersion))}
        for (model, version), day in sp.RELEASES.items():
            v = versions[(model, version)]
            assert v.id is not None
            at = plan.start + timedelta(days=day, hours=9)
            v.published_at = at - timedelta(days=1)
            session.add(v)
            hardware = sp.GAIT_HARDWARE if model == sp.GAIT else ALL_HARDWARE
            for hw in sorted(hardware):
                session.add(
                    Release(
                        model_name=model,
                        target_id=hw,
                        version_id=v.id,
                        released_at=at,
                        released_by="operator:seed",
                    )
                )
                if version == "1.1.0":
                    confirmed_at = at + timedelta(days=5)
                    session.add(confirmation(v, hw, at=confirmed_at, by="operator:seed"))
        rollout_version = versions[sp.ROLLOUT_VERSION]
        rollout_version.published_at = plan.start + timedelta(days=sp.ROLLOUT_STAGES[0][1] - 1)
        session.add(rollout_version)
        session.add(Cohort(name="beta", filter=None, created_at=plan.start))
        session.add(
            Cohort(
                name="android-14",
                filter={"platform": "android", "firmware_min": "14.0.0"},
                created_at=plan.start,
            )
        )
        session.commit()
        seed_rollout(session, state, plan)
    state.engine.dispose()
    return Registry(shas)
