"""The Fleet, Device and Lineage pages' JSON twins on SQLite and PostgreSQL (the app in process,
real databases): install outcomes per day equal the fleet summary's and the event log's, the
Device twin is the history and events API's answer, the Lineage twin the lineage API's."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.server.conftest import (  # noqa: F401 (fixtures used by name)
    Fleet,
    database_url,
    postgres_available,
    running_fleet,
)
from tests.server.test_device_events import check_in, installed

MODEL = "wrist-activity"


def _get(app: Fleet, path: str, **params: Any) -> Any:
    r = app.client.get(path, params=params, headers=app.auth(app.token("viewer")))
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
    return r.json()


def test_fleet_device_and_lineage_twins_equal_the_api(
    database_url: str,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    with running_fleet(database_url, tmp_path) as app:
        sha = app.publish(app.bundle())["sha256"]
        app.release(MODEL, "1.0.0")
        ok, failed, reverted = app.enroll("p-ok"), app.enroll("p-fail"), app.enroll("p-back")
        check_in(app, "p-ok", ok, [installed(sha)])
        check_in(app, "p-fail", failed, [installed(sha, last_install="self-test-failed")])
        check_in(app, "p-back", reverted, [installed(sha)])
        # p-back's slot a is interrupted in its trial: a revert.
        check_in(app, "p-back", reverted, [installed(sha, slots={"a": "reverted"})])

        twin = _get(app, "/ui/index.json")
        today = datetime.now(UTC).date().isoformat()
        assert twin["install_outcomes"] == [
            {"day": today, "installed": 3, "failed": 1, "reverted": 1}
        ]
        summary = _get(app, "/v1/fleet/summary")["install_outcomes"]
        by_outcome = Counter({r["outcome"]: r["count"] for r in summary if r["day"] == today})
        assert by_outcome == {"ok": 3, "self-test-failed": 1}
        chart = twin["charts"]["install_outcomes"]
        assert chart["labels"] == ["installed", "failed", "reverted"]
        assert [series[-1] for series in chart["data"][1:]] == [3, 1, 1]
        assert {r["device_id"] for r in twin["trouble"]} == {"p-fail", "p-back"}

        device = _get(app, "/ui/devices/p-back.json")
        assert device["device"] == _get(app, "/v1/devices/p-back/history")
        assert device["events"] == _get(app, "/v1/devices/p-back/events", limit=1000)["events"]
        assert [e["kind"] for e in device["events"]] == ["revert", "install", "enrolled"]
        assert device["charts"]["events"]["x_text"] == [today]

        lineage = _get(app, f"/ui/models/{MODEL}/versions/1.0.0/lineage.json")["lineage"]
        answer = _get(app, f"/v1/models/{MODEL}/versions/1.0.0/lineage")
        # The field figures' span ends at the moment of each request.
        for found in (lineage, answer):
            found["field"].pop("span")
        assert lineage == answer


def test_fleet_twin_counts_completeness_per_hardware_id_of_devices_not_revoked(
    database_url: str,  # noqa: F811 (the fixture imported above)
    tmp_path: Path,
) -> None:
    """Batches received against those sent, per hardware id, over the devices not revoked: each
    batch count carries its hardware id, and the revoked devices' counts are taken out."""
    with running_fleet(database_url, tmp_path) as app:
        sent = {  # device -> (hardware id, sequence numbers that arrive)
            "p-1": ("phone-android", [0, 1, 3]),  # 3 of 4
            "p-2": ("phone-android", [0, 1]),  # 2 of 2
            "p-gone": ("phone-android", [5]),  # 1 of 6, then revoked
            "r-1": ("ring-gen3", [0, 2]),  # 2 of 3
        }
        for device, (hardware_id, sequences) in sent.items():
            credential = app.enroll(device, target=hardware_id)
            for sequence in sequences:
                body = {"device_id": device, "boot_epoch": 1, "sequence": sequence, "windows": []}
                r = app.client.post(
                    f"/v1/devices/{device}/telemetry", json=body, headers=app.auth(credential)
                )
                assert r.status_code == 200, r.text
        r = app.client.post("/v1/devices/p-gone/revoke", headers=app.auth(app.token("operator")))
        assert r.status_code == 200, r.text

        twin = _get(app, "/ui/index.json")
        found = {row["hardware_id"]: row["completeness"] for row in twin["by_hardware"]}
        assert found == {
            "phone-android": {"batches_received": 5, "batches_expected": 6, "ratio": 5 / 6},
            "ring-gen3": {"batches_received": 2, "batches_expected": 3, "ratio": 2 / 3},
        }
        assert twin["devices"]["revoked"] == 1
