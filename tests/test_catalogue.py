"""The device target catalogue: the shipped file, operator files, and fit checks."""

from __future__ import annotations

import pytest

from firmware_bundles import CatalogueError, TargetCatalogue
from firmware_bundles.bundle import file_entries
from firmware_bundles.manifest import Manifest
from tests.conftest import MODEL_BYTES, manifest_draft

REQUIRED = [
    "ring-gen3",
    "ring-gen4",
    "phone-android",
    "phone-ios",
    "devboard-nrf52840",
    "devboard-rpi4",
]


def test_default_catalogue_has_required_targets_with_plausible_budgets() -> None:
    cat = TargetCatalogue.load_default()
    assert set(REQUIRED) <= set(cat.targets)
    nrf = cat.get("devboard-nrf52840")
    assert nrf.max_bundle_bytes < 1024 * 1024 and nrf.ram_arena_bytes < 256 * 1024
    assert cat.get("ring-gen3").links == ["ble"]
    assert not cat.get("ring-gen3").allows_op("TreeEnsembleClassifier")
    assert cat.get("phone-android").allows_op("TreeEnsembleClassifier")


def test_unknown_target_lists_known_ids() -> None:
    with pytest.raises(CatalogueError, match="unknown target 'ring-gen9'; known: devboard"):
        TargetCatalogue.load_default().get("ring-gen9")


def test_operator_catalogue_replaces_default() -> None:
    data = b"""
[[target]]
id = "watch-x"
generation = "watch"
platform = "wearos"
max_bundle_bytes = 1000
ram_arena_bytes = 1000
allowed_ops = "*"
precisions = ["int8"]
format = "onnx"
links = ["ble"]
firmware_minimum = "1.0.0"
"""
    cat = TargetCatalogue.from_bytes(data)
    assert list(cat.targets) == ["watch-x"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not = [toml", "not valid TOML"),
        (b"", r"no \[\[target\]\]"),
        (b'[[target]]\nid = "x"\n', "missing field"),
        (b'[[target]]\nid = "x"\nallowed_ops = "tiny"\n', "unknown op set 'tiny'"),
    ],
    ids=["not-toml", "empty", "missing-fields", "unknown-op-set"],
)
def test_bad_catalogue_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(CatalogueError, match=message):
        TargetCatalogue.from_bytes(data)


def test_fit_reasons_are_all_reported() -> None:
    draft = manifest_draft(
        targets=[
            {
                "target_id": "ring-gen3",
                "generation": "ring-gen3",
                "platform": "nrf52840",
                "firmware": {"minimum": "3.0.0"},
            }
        ]
    )
    draft["runtime"] = {
        **draft["runtime"],
        "op_types": ["Add", "TreeEnsembleClassifier"],
        "format": "ort",
        "ram_estimate": {"bytes": 10**6, "method": "t"},
    }
    manifest = Manifest.from_dict({**draft, "files": file_entries({"model.onnx": MODEL_BYTES})})
    with pytest.raises(CatalogueError) as info:
        TargetCatalogue.load_default().check_fits(manifest, "ring-gen3", 200_000)
    text = str(info.value)
    for reason in (
        "over the 163840 byte budget by 36160",
        "RAM",
        "TreeEnsembleClassifier",
        "format ort, target wants tflite",
    ):
        assert reason in text
