"""One device cannot break fleet telemetry: each hostile batch is refused with a 4xx naming the
problem, the rollups stay readable for every model, and a correct device's batch afterwards is
accepted and counted exactly. Also: a corrupt rollup row already in the database is skipped and
counted by the read, never a 500. Run on SQLite and PostgreSQL (the ``fleet`` fixture)."""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlmodel import Session

from firmware_bundles import telemetry as sketch
from server import fold
from server.models import TelemetryBatchRecord, TelemetryRollup
from tests.server.conftest import Fleet
from tests.server.windows import batch_text

MODELS = ("wrist-activity", "tap-detect")
DAY = "2026-03-01"


def good_window(device_id: str, bundle_sha256: str, n: int, model: str = MODELS[0]) -> dict:
    """A window that matches the test manifest (``x0``: 3 counts, ``label``: 3, classes
    rest/move) at the server's relative accuracy."""
    latency = sketch.new_sketch(0.01)
    for i in range(n):
        sketch.add(latency, 0.001 * (1 + i % 5))
    return {
        "device_id": device_id,
        "model": model,
        "version": "1.0.0",
        "bundle_sha256": bundle_sha256,
        "window_start": f"{DAY}T10:00:00+00:00",
        "window_s": 3600,
        "inference_count": n,
        "error_count": 0,
        "latency": latency,
        "outputs": [{"name": "label", "counts": [n - 1, 1, 0]}],
        "inputs": [{"name": "x0", "counts": [0, n, 0]}],
        "feedback": {"thumbs_up": 1},
        "labels": {"rest": {"move": 1}},
    }


def _edit(change: Callable[[dict], None]) -> Callable[[dict], str]:
    def make(window: dict) -> str:
        bad = deepcopy(window)
        change(bad)
        return batch_text(bad["device_id"], [bad])

    return make


def _overflowing_sum(window: dict) -> str:
    # json.dumps would write inf as Infinity, which the parser already refuses; 1e999 is a plain
    # number literal that Python's parser turns into inf.
    text = batch_text(window["device_id"], [window])
    return text.replace(f'"sum": {window["latency"]["sum"]!r}', '"sum": 1e999', 1)


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def change(window: dict) -> None:
        *parents, last = path.split("/")
        node: Any = window
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return change


def _big_key(window: dict) -> None:
    window["latency"]["bins"] = {str(10**6): 1}
    window["latency"]["count"] = 1
    window["inference_count"] = 1


HOSTILE: list[tuple[Callable[[dict], str], tuple[str, ...]]] = [
    (_edit(_set("latency/bins", {"-345": -5})), ("latency.bins", "greater than or equal to 0")),
    (_edit(_set("outputs/0/counts", [3, -1, 0])), ("outputs.0.counts", "greater than or equal")),
    (_edit(_set("feedback", {"thumbs_up": -7})), ("feedback.thumbs_up", "greater than or equal")),
    (_edit(_set("labels", {"rest": {"move": -2}})), ("labels.rest.move", "greater than or equal")),
    (_overflowing_sum, ("latency.sum", "finite")),
    (_edit(_big_key), ("latency.bins.1000000", "less than or equal")),
    (_edit(_set("outputs/0/counts", [1, 1, 1, 1])), ("outputs", "label", "4 counts", "3")),
    (_edit(_set("latency/relative_accuracy", 0.02)), ("relative_accuracy", "0.02", "0.01")),
    (_edit(_set("bundle_sha256", "f" * 64)), ("bundle_sha256", "f" * 64, "not published")),
]
IDS = [
    "negative-latency-bin-count",
    "negative-histogram-count",
    "negative-feedback",
    "negative-label-tally",
    "float-1e999",
    "sketch-bin-key-10**6",
    "histogram-bins-vs-manifest",
    "relative-accuracy",
    "unknown-bundle",
]


def rollups(fleet: Fleet, model: str | None = None) -> Any:
    return fleet.client.get(
        "/v1/telemetry/rollups",
        params={} if model is None else {"model": model},
        headers=fleet.auth(fleet.token("viewer")),
    )


def publish_models(fleet: Fleet) -> dict[str, str]:
    return {m: fleet.publish(fleet.bundle(name=m))["sha256"] for m in MODELS}


@pytest.mark.parametrize(("make", "named"), HOSTILE, ids=IDS)
def test_a_hostile_batch_is_refused_and_hurts_nobody(
    fleet: Fleet, make: Callable[[dict], str], named: tuple[str, ...]
) -> None:
    shas = publish_models(fleet)
    creds = {d: fleet.enroll(d) for d in ("bad", "good", "other")}
    # Another model already has a rollup for the day: it must stay readable too.
    other = good_window("other", shas[MODELS[1]], 4, model=MODELS[1])
    r = fleet.client.post(
        "/v1/devices/other/telemetry",
        content=batch_text("other", [other]),
        headers=fleet.auth(creds["other"]),
    )
    assert r.status_code == 200, r.text

    hostile = make(good_window("bad", shas[MODELS[0]], 9))
    r = fleet.client.post(
        "/v1/devices/bad/telemetry", content=hostile, headers=fleet.auth(creds["bad"])
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    detail = r.json()["detail"]
    for part in named:
        assert part in detail, (part, detail)
    assert "window 0" in detail or "windows.0" in detail, detail

    for model in (None, *MODELS):
        assert rollups(fleet, model).status_code == 200, model

    good = good_window("good", shas[MODELS[0]], 7)
    r = fleet.client.post(
        "/v1/devices/good/telemetry",
        content=batch_text("good", [good]),
        headers=fleet.auth(creds["good"]),
    )
    assert r.status_code == 200, r.text
    assert r.json()["accepted"] is True
    r = rollups(fleet, MODELS[0])
    assert r.status_code == 200
    [row] = r.json()
    assert row["inference_count"] == 7 and row["window_count"] == 1
    assert row["outputs"] == {"label": [6, 1, 0]} and row["inputs"] == {"x0": [0, 7, 0]}
    assert row["feedback"] == {"thumbs_up": 1} and row["labels"] == {"rest": {"move": 1}}
    assert row["latency"]["count"] == 7 and row["latency"]["relative_accuracy"] == 0.01
    # The median of 1, 1, 2, 2, 3, 4, 5 ms.
    assert row["latency_quantiles_s"]["0.5"] == pytest.approx(0.002, rel=0.01)


CORRUPT: list[dict[str, Any]] = [
    {"inference_count": -5},
    {"latency": {**sketch.new_sketch(0.01), "bins": {str(10**6): 1}, "count": 1}},
    {"latency": {**sketch.new_sketch(0.02)}},
    {"outputs": {"label": [1, -1, 0]}},
    {"feedback": {"thumbs_up": 1.5}},
]


def test_a_corrupt_stored_rollup_is_skipped_and_counted(unfolded_fleet: Fleet) -> None:
    fleet = unfolded_fleet
    shas = publish_models(fleet)
    cred = fleet.enroll("good")
    good = good_window("good", shas[MODELS[0]], 3)
    r = fleet.client.post(
        "/v1/devices/good/telemetry",
        content=batch_text("good", [good]),
        headers=fleet.auth(cred),
    )
    assert r.status_code == 200, r.text
    clean = {
        "inference_count": 1,
        "window_count": 1,
        "latency": sketch.new_sketch(0.01),
        "outputs": {},
        "inputs": {},
        "feedback": {},
        "labels": {},
    }
    with Session(fleet.state.engine) as session:
        for i, damage in enumerate(CORRUPT):
            session.add(
                TelemetryRollup(
                    device_id="good",
                    hardware_id="phone-android",
                    model=MODELS[0],
                    version="1.0.0",
                    generation="phone",
                    platform="android",
                    day=f"2026-02-{i + 1:02d}",
                    **{**clean, **damage},
                )
            )
        # A batch record with a negative sequence: completeness skips and counts it.
        session.add(
            TelemetryBatchRecord(
                device_id="good",
                boot_epoch=1,
                sequence=-3,
                window_count=1,
                received_at=datetime.now(UTC),
            )
        )
        session.commit()
    info = fleet.client.get("/v1/devices/good", headers=fleet.auth(fleet.token("viewer")))
    assert info.status_code == 200, info.text
    assert info.json()["telemetry"]["skipped_rows"] == 1
    assert info.json()["telemetry"]["batches_expected"] == 1
    for model in (None, MODELS[0]):
        r = rollups(fleet, model)
        assert r.status_code == 200, r.text
        assert r.headers["Edgefleet-Skipped-Rows"] == str(len(CORRUPT))
        assert [row["day"] for row in r.json()] == [DAY]
    # A correct device writing onto a corrupt row's day is accepted, and its data is read back:
    # while it waits to be folded beside the corrupt row, and once the fold has replaced the row.
    late = {**good_window("good", shas[MODELS[0]], 2), "window_start": "2026-02-01T05:00:00+00:00"}
    r = fleet.client.post(
        "/v1/devices/good/telemetry",
        content=batch_text("good", [late], sequence=1),
        headers=fleet.auth(cred),
    )
    assert r.status_code == 200, r.text
    expected = {"2026-02-01": 2, DAY: 3}
    r = rollups(fleet, MODELS[0])
    assert r.headers["Edgefleet-Skipped-Rows"] == str(len(CORRUPT))
    assert {row["day"]: row["inference_count"] for row in r.json()} == expected
    with Session(fleet.state.engine) as session:
        assert fold.fold(session, relative_accuracy=0.01, limit=100).windows == 2
    r = rollups(fleet, MODELS[0])
    assert r.headers["Edgefleet-Skipped-Rows"] == str(len(CORRUPT) - 1)
    assert {row["day"]: row["inference_count"] for row in r.json()} == expected
