"""``provenance.mlflow``: optional in every manifest format, checked field by field, and bundles
written before it existed still verify and read back byte for byte."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from firmware_bundles import SchemaError, build, new_root, open_bundle, verify
from firmware_bundles.bundle import file_entries
from firmware_bundles.manifest import Manifest
from firmware_bundles.signing import PublicKey
from tests.conftest import MODEL_BYTES, Keys, manifest_draft

FILES = {"model.onnx": MODEL_BYTES}
#: Bundles that main wrote at 11caf1d, before provenance.mlflow (tests/data/pre-mlflow/).
PRE_MLFLOW = Path(__file__).parent / "data" / "pre-mlflow"
SHA = "ab" * 32

MLFLOW: dict[str, Any] = {
    "tracking_uri": "http://127.0.0.1:5000",
    "registry_uri": "http://127.0.0.1:5000",
    "model_uri": "models:/wrist-activity@champion",
    "model_name": "wrist-activity",
    "model_version": "2",
    "alias": "champion",
    "run_id": "552b1903905b4407ba24cc767fbab5de",
    "experiment_id": "1",
    "logged_model_id": "m-67bbc4a2379542318da7fab32319af19",
    "flavour": "sklearn",
    "params": {"C": "1.0", "model": "logreg"},
    "metrics": {"accuracy": 0.93},
    "datasets": [
        {"name": "wrist-train", "digest": "fd072151", "context": "training", "source_type": "code"}
    ],
}


def with_mlflow(fmt: int, **changes: Any) -> dict[str, Any]:
    provenance = {"source_model_sha256": SHA, "mlflow": {**MLFLOW, **changes}}
    return {
        **manifest_draft(format=fmt, provenance=provenance),
        "files": file_entries(FILES),
    }


def test_provenance_mlflow_reads_back_the_same_in_format_1() -> None:
    manifest = Manifest.from_dict(with_mlflow(1))
    assert manifest.provenance.mlflow is not None
    assert manifest.provenance.mlflow.datasets[0].digest == "fd072151"
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest
    assert manifest.to_dict()["provenance"]["mlflow"]["run_id"] == MLFLOW["run_id"]


def test_a_bundle_with_provenance_mlflow_verifies(keys: Keys, root: Any) -> None:
    draft = with_mlflow(1)
    del draft["files"]
    verified = verify(build(draft, FILES, keys.release), root)
    assert verified.manifest.provenance.mlflow is not None
    assert verified.manifest.provenance.mlflow.params == MLFLOW["params"]


def test_without_it_provenance_serialises_as_before() -> None:
    manifest = Manifest.from_dict({**manifest_draft(), "files": file_entries(FILES)})
    assert manifest.provenance.mlflow is None
    assert "mlflow" not in manifest.to_dict()["provenance"]


@pytest.mark.parametrize("name", ["format1.efb", "format2.efb"])
def test_bundles_written_before_provenance_mlflow_still_verify(name: str) -> None:
    data = (PRE_MLFLOW / name).read_bytes()
    release = [
        PublicKey.from_dict(k) for k in json.loads((PRE_MLFLOW / "release-keys.json").read_text())
    ]
    root = new_root(
        version=1,
        expires=datetime(2100, 1, 1, tzinfo=UTC),
        role_keys={"root": release, "release": release, "director": release, "hil": release},
        thresholds={"root": 1, "release": 2, "director": 1, "hil": 1},
    )
    verified = verify(data, root)
    assert verified.manifest.provenance.mlflow is None
    signed = open_bundle(data).envelope.signed
    # The manifest as parsed now serialises to exactly what was signed then.
    assert verified.manifest.to_dict() == signed


BAD = [
    (
        "password-in-uri",
        {"tracking_uri": "https://alice:s3cret@mlflow.example"},
        "provenance.mlflow.tracking_uri",
    ),
    ("token-in-query", {"registry_uri": "https://mlflow.example/?token=x"}, "credentials"),
    ("nan-metric", {"metrics": {"loss": float("nan")}}, "provenance.mlflow.metrics.loss"),
    ("version-without-name", {"model_name": None}, "model_name and model_version come together"),
    ("alias-without-version", {"model_name": None, "model_version": None}, "an alias needs"),
    ("unknown-flavour", {"flavour": "xgboost"}, "provenance.mlflow.flavour"),
    ("unknown-field", {"colour": "red"}, "unknown field 'provenance.mlflow.colour'"),
    ("empty-digest", {"datasets": [{"name": "d", "digest": ""}]}, "datasets.0.digest"),
]


@pytest.mark.parametrize(("changes", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_provenance_mlflow_names_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        Manifest.from_dict(with_mlflow(1, **changes))
