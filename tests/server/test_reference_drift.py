"""The server reads format-3 reference files as it reads format-2 JSON ones (SQLite and
PostgreSQL): the same drift for the same data, and detached files uploaded beside their bundle.

Three versions carry the same reference: format 2 (JSON in the manifest, as converters wrote it
before format 3), format 3 with ``reference.bin`` in the bundle, and format 3 detached (a ring's
layout: its devices count outputs only).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from firmware_bundles import build
from firmware_bundles import telemetry as sketch
from tests.conftest import MODEL_BYTES, format_3, manifest_draft
from tests.server.conftest import Fleet
from tests.server.test_metrics import Uploader, get

EDGES = [-2.0, -1.0, 0.0, 1.0, 2.0]
CLASSES = ["rest", "move", "run"]
REFERENCE = {
    "inputs": [{"name": "x0", "kind": "numeric", "edges": EDGES, "counts": [5, 10, 35, 35, 10, 5]}],
    "outputs": [
        {
            "name": "probabilities",
            "kind": "categorical",
            "categories": CLASSES,
            "counts": [50, 30, 20, 0],
        }
    ],
}
DAY0 = datetime(2026, 3, 2, tzinfo=UTC)
SPAN = {"from": DAY0.isoformat(), "to": (DAY0 + timedelta(days=1)).isoformat()}


def _base(version: str, counter: int) -> dict[str, Any]:
    draft = manifest_draft(name="gait", version=version, release_counter=counter)
    draft["outputs"][0].update(class_labels=CLASSES, shape=[None, 3])
    draft["self_test"]["vectors"][0]["expected"] = {"probabilities": [[0.2, 0.3, 0.5]]}
    draft["reference_histograms"] = REFERENCE
    return draft


def publish_three(fleet: Fleet) -> tuple[dict[str, str], bytes]:
    """Versions 1 (format 2), 2 (format 3, file inside) and 3 (format 3, detached) of "gait";
    their SHA-256s by version, and the detached reference file."""
    key = [fleet.release_key]
    inside, files, _ = format_3(_base("2.0.0", 2), {"model.onnx": MODEL_BYTES})
    old = {**format_3(_base("1.0.0", 1), {})[0], "format": 2, "reference_histograms": REFERENCE}
    old_files = {k: v for k, v in files.items() if k != "reference.bin"}
    detached, beside, reference = format_3(
        _base("3.0.0", 3), {"model.onnx": MODEL_BYTES}, detached=True
    )
    shas = {}
    for version, data in (
        ("1.0.0", build(old, old_files, key)),
        ("2.0.0", build(inside, files, key)),
        ("3.0.0", build(detached, beside, key)),
    ):
        shas[version] = str(fleet.publish(data)["sha256"])
    return shas, reference


def window(
    start: datetime, sha: str, version: str, x0: np.ndarray, predicted: np.ndarray
) -> dict[str, Any]:
    latency = sketch.new_sketch(0.01)
    sketch.add(latency, 0.002)
    body: dict[str, Any] = {
        "device_id": "",
        "model": "gait",
        "version": version,
        "bundle_sha256": sha,
        "window_start": start.isoformat(),
        "window_s": 3600,
        "inference_count": len(predicted),
        "error_count": 0,
        "latency": latency,
        "outputs": [
            {"name": "probabilities", "counts": [*np.bincount(predicted, minlength=3).tolist(), 0]}
        ],
        "inputs": [],
        "feedback": {},
        "labels": {},
    }
    if len(x0):
        counts = np.bincount(np.searchsorted(EDGES, x0, side="right"), minlength=len(EDGES) + 1)
        body["inputs"] = [{"name": "x0", "counts": counts.tolist()}]
    return body


def upload_the_same_data(fleet: Fleet, shas: dict[str, str]) -> None:
    """Five devices per version see the same values; the detached version's count no inputs."""
    up = Uploader(fleet)
    rng = np.random.default_rng(5)
    for d in range(5):
        x0, predicted = rng.normal(0.3, 1.0, 40), rng.choice(3, 40, p=[0.4, 0.4, 0.2])
        for version, sha in shas.items():
            seen = x0 if version != "3.0.0" else np.zeros(0)
            device = f"phone-{version}-{d}"
            w = window(DAY0 + timedelta(hours=d), sha, version, seen, predicted)
            up.send(device, [{**w, "device_id": device}])


def drift(fleet: Fleet, version: str, expect: int = 200) -> Any:
    r = fleet.client.get(
        f"/v1/models/gait/versions/{version}/drift",
        params=SPAN,
        headers=fleet.auth(fleet.token("operator")),
    )
    assert r.status_code == expect, r.text
    return r.json()


def upload_reference(fleet: Fleet, sha: str, data: bytes, expect: int) -> Any:
    r = fleet.client.post(
        f"/v1/bundles/{sha}/reference",
        content=data,
        headers={
            **fleet.auth(fleet.token("publisher")),
            "Content-Type": "application/octet-stream",
        },
    )
    assert r.status_code == expect, r.text
    return r.json()


def test_drift_against_a_reference_file_equals_drift_against_the_json_one(fleet: Fleet) -> None:
    shas, reference = publish_three(fleet)
    upload_the_same_data(fleet, shas)
    old, inside = drift(fleet, "1.0.0")["drift"], drift(fleet, "2.0.0")["drift"]
    assert old["inputs"][0]["status"] == "ok" and old["inputs"][0]["baseline_counts"] == [
        5,
        10,
        35,
        35,
        10,
        5,
    ]
    assert inside == old
    # The detached version: refused (saying why) until its file is uploaded beside the bundle.
    refused = drift(fleet, "3.0.0", expect=409)
    assert "detached and were not uploaded" in refused["detail"]
    attached = upload_reference(fleet, shas["3.0.0"], reference, 200)
    assert (attached["inputs"], attached["outputs"]) == (1, 1)
    beside = drift(fleet, "3.0.0")["drift"]
    assert beside["outputs"] == old["outputs"]
    # Its devices had no bins to count inputs on: no data, against the same baseline.
    [x0] = beside["inputs"]
    assert (
        x0["status"] == "no-data" and x0["baseline_counts"] == old["inputs"][0]["baseline_counts"]
    )
    for version in shas:  # bins are named from the reference, whichever its layout
        path = f"/v1/models/gait/versions/{version}/metrics"
        [outputs] = get(fleet, path, **SPAN)["total"]["outputs"]
        assert outputs["bins"] == [*CLASSES, "(unseen)"], version


def test_a_detached_bundles_windows_hold_what_its_devices_count(fleet: Fleet) -> None:
    shas, _ = publish_three(fleet)
    device = "phone-1"
    credential = fleet.enroll(device)
    w = window(DAY0, shas["3.0.0"], "3.0.0", np.array([0.5]), np.array([1]))
    body = {
        "device_id": device,
        "boot_epoch": 1,
        "sequence": 0,
        "windows": [{**w, "device_id": device}],
    }
    r = fleet.client.post(
        f"/v1/devices/{device}/telemetry", content=json.dumps(body), headers=fleet.auth(credential)
    )
    assert r.status_code == 422 and "no histogram 'x0'" in r.text


@pytest.mark.parametrize(
    ("version", "change", "expect", "message"),
    [
        ("3.0.0", lambda ref: ref + b"\x00", 400, "the manifest pins"),
        ("3.0.0", lambda ref: ref[:-1] + bytes([ref[-1] ^ 1]), 400, "SHA-256"),
        ("2.0.0", lambda ref: ref, 409, "in the bundle"),
        ("1.0.0", lambda ref: ref, 409, "in its manifest"),
        ("unknown", lambda ref: ref, 404, "no bundle"),
    ],
    ids=["longer", "changed", "file-in-bundle", "format-2", "unknown-bundle"],
)
def test_a_reference_upload_that_is_not_the_pinned_file_is_refused(
    fleet: Fleet, version: str, change: Any, expect: int, message: str
) -> None:
    shas, reference = publish_three(fleet)
    answer = upload_reference(fleet, shas.get(version, "f" * 64), change(reference), expect)
    assert message in answer["detail"]
