"""Manifest, root and message schemas: unknown or missing fields are errors naming the field."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from firmware_bundles import SchemaError, build
from firmware_bundles.bundle import file_entries
from firmware_bundles.errors import (
    ExpiredError,
    ReplayError,
    RollbackError,
    ThresholdError,
    WrongDeviceError,
    WrongHardwareError,
)
from firmware_bundles.manifest import Manifest, semver_key
from firmware_bundles.messages import AssignmentSet, TelemetryBatch, verify_assignments
from tests.cases import named_cases
from tests.conftest import MODEL_BYTES, NOW, Keys, manifest_draft

FILES = {"model.onnx": MODEL_BYTES}


def full(**changes: Any) -> dict[str, Any]:
    return {**manifest_draft(), "files": file_entries(FILES), **changes}


def without(key: str) -> dict[str, Any]:
    doc = full()
    del doc[key]
    return doc


SCHEMA_CASES = [
    ("unknown-top-level", {**full(), "colour": "red"}, "unknown field 'colour'"),
    ("missing-release-counter", without("release_counter"), "missing field 'release_counter'"),
    ("missing-created-at", without("created_at"), "missing field 'created_at'"),
    ("not-semver", full(version="1.2"), "not a semantic version"),
    ("negative-counter", full(release_counter=-1), "release_counter"),
    ("naive-created-at", full(created_at="2026-01-01T00:00:00"), "timezone"),
    (
        "bad-format",
        full(runtime={**manifest_draft()["runtime"], "format": "tensorrt"}),
        "runtime.format",
    ),
    (
        "unsorted-ops",
        full(runtime={**manifest_draft()["runtime"], "op_types": ["MatMul", "Add"]}),
        "sorted",
    ),
    (
        "histogram-count-mismatch",
        full(
            reference_histograms={
                "inputs": [{"name": "x", "kind": "numeric", "edges": [0.0, 1.0], "counts": [1, 2]}],
                "outputs": [],
            }
        ),
        "needs 3 counts",
    ),
    (
        "nested-unknown",
        full(quantisation={"scheme": "float32", "quantised_ops": 0, "bits": 8}),
        "unknown field 'quantisation.bits'",
    ),
    (
        "bad-sha",
        full(files=[{"path": "model.onnx", "sha256": "xyz", "length": 1}]),
        "files.0.sha256",
    ),
    ("model-file-not-listed", full(files=[]), "model_file 'model.onnx' is not in files"),
]


@named_cases(("doc", "message"), SCHEMA_CASES)
def test_bad_manifest_names_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        Manifest.from_dict(doc)


def test_manifest_round_trips_bytes() -> None:
    m = Manifest.from_dict(full())
    assert Manifest.from_bytes(m.to_bytes()) == m


def test_build_refuses_draft_with_files(keys: Keys) -> None:
    with pytest.raises(SchemaError, match="files"):
        build(full(), FILES, keys.release)


def test_semver_ordering() -> None:
    assert semver_key("1.0.0-rc.1") < semver_key("1.0.0") < semver_key("1.10.0")


# -- the signed director assignment set ---------------------------------------------------------

NONCE = "ab" * 16


def entry(model: str = "wrist-activity", counter: int = 7) -> dict[str, Any]:
    return {
        "model": model,
        "version": "1.2.3",
        "bundle_sha256": "0" * 64,
        "bundle_length": 1234,
        "release_counter": counter,
        "download_url": "/v1/bundles/" + "0" * 64,
    }


def assignment_set(**changes: Any) -> AssignmentSet:
    doc = {
        "device_id": "ring-0001",
        "hardware_id": "ring-gen3",
        "nonce": NONCE,
        "issued_at": NOW.isoformat(),
        "expires_at": (NOW + timedelta(hours=1)).isoformat(),
        "bundles": [entry(), entry("sleep-stage", counter=2)],
    }
    doc.update(changes)
    return AssignmentSet.from_dict(doc)


def check(keys: Keys, signed_by: Any = None, **expect: Any) -> Any:
    root, _ = keys.make_root()
    env = assignment_set().sign(signed_by or keys.director[0])
    args: dict[str, Any] = {
        "device_id": "ring-0001",
        "hardware_id": "ring-gen3",
        "nonce": NONCE,
        "now": NOW,
        "min_release_counters": {},
    }
    args.update(expect)
    return verify_assignments(env.to_bytes(), root, **args)


ASSIGNMENT_CASES = [
    ("release-key-not-director", {"signed_by": "release"}, ThresholdError, "role director"),
    ("wrong-device", {"device_id": "ring-0002"}, WrongDeviceError, "addressed to device"),
    ("wrong-hardware", {"hardware_id": "ring-gen4"}, WrongHardwareError, "for hardware"),
    ("replayed-nonce", {"nonce": "cd" * 16}, ReplayError, "nonce"),
    ("expired", {"now": NOW + timedelta(hours=2)}, ExpiredError, "expired"),
]


@named_cases(("kwargs", "error", "message"), ASSIGNMENT_CASES)
def test_bad_assignment_set_is_refused(
    keys: Keys, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    if kwargs.get("signed_by") == "release":
        kwargs = {**kwargs, "signed_by": keys.release[0]}
    with pytest.raises(error, match=message):
        check(keys, **kwargs)


def test_good_assignment_set_verifies_into_one_assignment_per_model(keys: Keys) -> None:
    verified = check(keys, min_release_counters={"wrist-activity": 7})
    assert [(a.model, a.release_counter) for a in verified.assignments] == [
        ("wrist-activity", 7),
        ("sleep-stage", 2),
    ]
    assert all(a.nonce == NONCE and a.device_id == "ring-0001" for a in verified.assignments)
    assert verified.refused == []


@pytest.mark.parametrize(
    ("floors", "refused", "kept"),
    [
        ({"wrist-activity": 8}, "wrist-activity", "sleep-stage"),
        ({"sleep-stage": 3}, "sleep-stage", "wrist-activity"),
    ],
    ids=["first-model", "second-model"],
)
def test_an_entry_below_its_floor_is_refused_alone(
    keys: Keys, floors: dict[str, int], refused: str, kept: str
) -> None:
    verified = check(keys, min_release_counters=floors)
    assert [a.model for a in verified.assignments] == [kept]
    ((entry, error),) = [(r.assignment, r.error) for r in verified.refused]
    assert entry.model == refused and isinstance(error, RollbackError)
    assert (error.model, error.floor, error.offered) == (
        refused,
        floors[refused],
        entry.release_counter,
    )
    assert f"below {floors[refused]}, the floor for {refused}" in str(error)


def test_an_entry_changed_after_signing_breaks_the_signature(keys: Keys) -> None:
    root, _ = keys.make_root()
    env = assignment_set().sign(keys.director[0])
    env.signed["bundles"][0]["release_counter"] = 99
    with pytest.raises(ThresholdError, match="role director"):
        verify_assignments(
            env.to_bytes(),
            root,
            device_id="ring-0001",
            hardware_id="ring-gen3",
            nonce=NONCE,
            now=NOW,
        )


def test_a_model_may_appear_once_in_a_set() -> None:
    with pytest.raises(SchemaError, match="once"):
        assignment_set(bundles=[entry(), entry()])


def test_telemetry_batch_refuses_foreign_windows() -> None:
    window = {
        "device_id": "ring-0002",
        "model": "m",
        "version": "1.0.0",
        "bundle_sha256": "0" * 64,
        "window_start": NOW.isoformat(),
        "window_s": 3600,
        "inference_count": 3,
        "latency": {"relative_accuracy": 0.01},
    }
    with pytest.raises(SchemaError, match="batch's device"):
        TelemetryBatch.from_dict(
            {"device_id": "ring-0001", "boot_epoch": 1, "sequence": 1, "windows": [window]}
        )


@pytest.mark.parametrize("field", ["boot_epoch", "sequence"])
def test_telemetry_batch_keys_fit_32_bits(field: str) -> None:
    batch = {"device_id": "ring-0001", "boot_epoch": 1, "sequence": 1, "windows": []}
    assert TelemetryBatch.from_dict({**batch, field: 2**31 - 1}).idempotency_key
    with pytest.raises(SchemaError, match=field):
        TelemetryBatch.from_dict({**batch, field: 2**31})
