"""Fleet rollups (server/fleet_rollup.py) change no answer: the metrics and drift API answer the
same with and without them, over whole and cut days, per hardware id, after a device is erased,
after retention, when a device's stored row fails its checks, and while windows wait to be folded
(server/fold.py); and the stored fleet rows always equal the devices' rows added up again. On
SQLite and PostgreSQL. The fleet's fold job does not run on its own: the tests fold."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import update
from sqlmodel import Session, col, select

from firmware_bundles import build
from server import batch_counts, fleet_rollup, fold, metrics, telemetry
from server.models import FleetRollup, TelemetryBatchCount, TelemetryRollup
from tests.conftest import MODEL_BYTES, target_entry
from tests.server.conftest import Fleet
from tests.server.test_metrics import (
    DAY0,
    Uploader,
    _same_figures,
    _uploads_in_order,
    draft,
    get,
    make_raw,
    window,
)

MODEL = "wrist"
#: Devices per hardware id; the figures need at least ``min_devices_shown`` (5) for viewers.
HARDWARE = {"phone-android": [f"p-{i}" for i in range(6)], "phone-ios": ["i-0", "i-1", "i-2"]}
#: The iPhone target (the tests' catalogue entries name Android phones and rings only).
IOS = {"target_id": "phone-ios", "generation": "phone", "platform": "ios"}
IOS_CAPS = {"hardware_id": "phone-ios", "platform": "ios", "firmware_version": "17.2.0"}
DAYS = 4


def _publish(fleet: Fleet) -> dict[str, str]:
    shas = {}
    for hardware_id in HARDWARE:
        d = draft(MODEL, "1.0.0")
        d["targets"] = [
            target_entry(hardware_id)
            if hardware_id == "phone-android"
            else {**IOS, "firmware": {"minimum": "16.0.0"}}
        ]
        data = build(d, {"model.onnx": MODEL_BYTES}, [fleet.release_key])
        shas[hardware_id] = str(fleet.publish(data)["sha256"])
    return shas


@dataclass
class Seeded:
    fleet: Fleet
    up: Uploader
    shas: dict[str, str]


def _fold_all(fleet: Fleet) -> int:
    with Session(fleet.state.engine) as session:
        accuracy = fleet.state.settings.telemetry_relative_accuracy
        return fold.fold(session, relative_accuracy=accuracy, limit=10**6).windows


@pytest.fixture()
def seeded(unfolded_fleet: Fleet) -> Iterator[Seeded]:
    """Nine devices on two hardware ids, four days, three windows a day each; one device
    reports self-test failures on two days. Every window folded."""
    fleet = unfolded_fleet
    shas = _publish(fleet)
    up = Uploader(fleet)
    rng = np.random.default_rng(13)
    for hardware_id, devices in HARDWARE.items():
        for d in devices:
            up.creds[d] = fleet.enroll(
                d, **({} if hardware_id == "phone-android" else {**IOS_CAPS})
            )
            up.sequence[d] = 0
        for device, raws in _uploads_in_order(make_raw(rng, devices, DAYS)):
            windows = [window(r, MODEL, "1.0.0", shas[hardware_id]) for r in raws]
            if device == "p-1" and raws[0].start.day == DAY0.day + 1:
                windows[0]["selftest_failure_count"] = 2
            up.send(device, windows)
    assert _fold_all(fleet) > 0
    # A later upload into p-1's first day, whose row had no self-test failure until now.
    late = make_raw(rng, ["p-1"], 1)[0]
    late_window = window(late, MODEL, "1.0.0", shas["phone-android"])
    # Folded apart: the late window is added into a fleet rollup that exists.
    up.send("p-1", [{**late_window, "selftest_failure_count": 1}])
    assert _fold_all(fleet) > 0
    yield Seeded(fleet, up, shas)


def _answers(fleet: Fleet, role: str = "viewer") -> dict[str, Any]:
    """Metrics and drift over whole days, a span with a cut day, and per hardware id."""
    last = (DAY0 + timedelta(days=DAYS - 1)).date().isoformat()
    second = (DAY0 + timedelta(days=1)).date().isoformat()
    spans = {
        "whole": {"from": DAY0.date().isoformat(), "to": last},
        "cut": {"from": (DAY0 + timedelta(hours=10)).isoformat(), "to": last},
        "one day": {"from": second, "to": second},
        "phone": {"from": DAY0.date().isoformat(), "to": last, "hardware_id": "phone-android"},
        "ios": {"from": DAY0.date().isoformat(), "to": last, "hardware_id": "phone-ios"},
    }
    path = f"/v1/models/{MODEL}/versions/1.0.0"
    return {
        f"{what} {name}": get(fleet, f"{path}/{what}", role, **params)
        for name, params in spans.items()
        for what in ("metrics", "drift")
    }


def _same_with_and_without(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    answers = {}
    for use in (True, False):
        monkeypatch.setattr(metrics, "USE_FLEET_ROLLUPS", use)
        answers[use] = {role: _answers(fleet, role) for role in ("viewer", "operator")}
    _same_figures(answers[True], answers[False])
    return answers[True]


def _rows(session: Session, table: Any, key: tuple[str, ...]) -> dict[tuple[Any, ...], Any]:
    """A table's rows as dicts (no ids), by ``key``; the latency sums apart (float order)."""
    found = {}
    for row in session.exec(select(table)):
        values = row.model_dump(exclude={"id"})
        if "latency" in values:
            values["latency"] = dict(values["latency"])
            values["latency sum"] = values["latency"].pop("sum")
        found[tuple(values[k] for k in key)] = values
    return found


def _stored_equal_added_up_again(fleet: Fleet) -> None:
    """The fleet rollups and batch counts equal those built again from the devices' rows."""
    accuracy = fleet.state.settings.telemetry_relative_accuracy
    fleet_key = ("model", "version", "day", "hardware_id")
    with Session(fleet.state.engine) as session:
        kept_counts = _rows(session, TelemetryBatchCount, ("device_id", "boot_epoch"))
        kept = _rows(session, FleetRollup, fleet_key)
        for values in kept.values():
            values["latency sum"] = pytest.approx(values["latency sum"])
        batch_counts.rebuild(session)
        fleet_rollup.rebuild(session, accuracy)
        assert _rows(session, TelemetryBatchCount, ("device_id", "boot_epoch")) == kept_counts
        assert _rows(session, FleetRollup, fleet_key) == kept
        assert kept and kept_counts
        session.rollback()


def test_answers_are_the_same_with_and_without_fleet_rollups(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = _same_with_and_without(seeded.fleet, monkeypatch)
    whole = answers["operator"]["metrics whole"]
    assert whole["total"]["devices_reporting"] == 9
    assert [d["devices_reporting"] for d in whole["days"]] == [9] * DAYS
    assert whole["total"]["selftest_failure_rate"] == pytest.approx(1 / 9)
    assert answers["operator"]["metrics ios"]["total"]["devices_reporting"] == 3
    one_day = answers["operator"]["metrics one day"]["total"]
    assert one_day["devices_reporting"] == 9 and one_day["selftest_failures"] == 2
    assert answers["viewer"]["metrics ios"]["total"]["withheld"]  # 3 < min_devices_shown
    assert answers["operator"]["metrics cut"]["days"][0]["windows"] == 9 * 2  # 11:00 and 19:00
    _stored_equal_added_up_again(seeded.fleet)


def test_erase_and_retention_keep_fleet_rollups_exact(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet = seeded.fleet
    before = _same_with_and_without(fleet, monkeypatch)["operator"]["metrics whole"]
    r = fleet.client.delete("/v1/devices/p-1/telemetry", headers=fleet.auth(fleet.admin))
    assert r.status_code == 200, r.text
    after = _same_with_and_without(fleet, monkeypatch)["operator"]["metrics whole"]
    assert after["total"]["devices_reporting"] == 8
    assert after["total"]["selftest_failures"] == 0 < before["total"]["selftest_failures"]
    _stored_equal_added_up_again(fleet)
    retention = fleet.state.settings.telemetry_retention_days
    with Session(fleet.state.engine) as session:
        now = DAY0 + timedelta(days=retention + 2)
        assert telemetry.drop_expired_windows(session, now=now, retention_days=retention) > 0
    kept = _same_with_and_without(fleet, monkeypatch)["operator"]["metrics whole"]
    assert kept == after
    _stored_equal_added_up_again(fleet)


def test_a_device_row_failing_its_checks_is_read_as_before(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row an earlier bug left (a sketch at another accuracy) is skipped by both paths; once
    the device's next upload replaces it, the fleet rollup counts the device again."""
    fleet = seeded.fleet
    accuracy = fleet.state.settings.telemetry_relative_accuracy
    day = DAY0.date().isoformat()
    with Session(fleet.state.engine) as session:
        row = session.exec(
            select(TelemetryRollup).where(
                TelemetryRollup.device_id == "p-2", TelemetryRollup.day == day
            )
        ).one()
        bad = {**row.latency, "relative_accuracy": 0.05}
        session.exec(
            update(TelemetryRollup).where(col(TelemetryRollup.id) == row.id).values(latency=bad)
        )
        fleet_rollup.recompute(session, [(MODEL, "1.0.0", day, "phone-android")], accuracy)
        session.commit()
    answers = _same_with_and_without(fleet, monkeypatch)["operator"]
    assert answers["metrics whole"]["skipped_rows"] == 1
    assert answers["metrics whole"]["days"][0]["devices_reporting"] == 8
    _stored_equal_added_up_again(fleet)
    raw = make_raw(np.random.default_rng(2), ["p-2"], 1)[0]
    seeded.up.send("p-2", [window(raw, MODEL, "1.0.0", seeded.shas["phone-android"])])
    waiting = _same_with_and_without(fleet, monkeypatch)["operator"]
    assert waiting["metrics whole"]["skipped_rows"] == 1  # not replaced until folded
    assert _fold_all(fleet) == 1
    answers = _same_with_and_without(fleet, monkeypatch)["operator"]
    assert answers["metrics whole"]["skipped_rows"] == 0
    assert answers["metrics whole"]["days"][0]["devices_reporting"] == 9
    _stored_equal_added_up_again(fleet)


def test_windows_waiting_to_be_folded_are_counted_with_and_without(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key with windows not yet folded is read from the devices' rows plus those windows: a
    device whose only data for a day still waits counts as reporting (and in completeness), and
    a day no fleet rollup has yet is read whole; folding then changes no answer."""
    fleet, up = seeded.fleet, seeded.up
    before = _same_with_and_without(fleet, monkeypatch)["operator"]["metrics whole"]
    up.creds["p-new"] = fleet.enroll("p-new")
    up.sequence["p-new"] = 0
    rng = np.random.default_rng(5)
    new_days = make_raw(rng, ["p-new"], DAYS)  # windows on each day: p-new is in no rollup
    up.send("p-new", [window(r, MODEL, "1.0.0", seeded.shas["phone-android"]) for r in new_days])
    more = make_raw(rng, ["p-0"], 1)[0]  # and a window into a rollup that exists
    up.send("p-0", [window(more, MODEL, "1.0.0", seeded.shas["phone-android"])])
    waiting = _same_with_and_without(fleet, monkeypatch)["operator"]
    whole = waiting["metrics whole"]
    assert whole["total"]["devices_reporting"] == before["total"]["devices_reporting"] + 1 == 10
    assert [d["devices_reporting"] for d in whole["days"]] == [10] * DAYS
    assert whole["total"]["inferences"] == before["total"]["inferences"] + sum(
        len(r.x0) for r in [*new_days, more]
    )
    received = before["total"]["completeness"]["batches_received"]
    assert whole["total"]["completeness"]["batches_received"] == received + 2
    assert waiting["metrics one day"]["total"]["devices_reporting"] == 10
    assert _fold_all(fleet) == len(new_days) + 1
    folded = _same_with_and_without(fleet, monkeypatch)["operator"]
    _same_figures(folded, waiting)
    _stored_equal_added_up_again(fleet)
