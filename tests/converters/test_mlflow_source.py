"""`edgefleet convert models:/...` against a real `mlflow server` (SQLite, artifacts over HTTP).

Models are trained here, logged with a signature and their datasets, registered and aliased
through MLflow's own API; the bundles must verify and their ``provenance.mlflow`` must hold what
MlflowClient reports for the version and its run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from firmware_bundles import SigningKey, TrustedRoot, verify
from firmware_bundles.manifest import Manifest
from tests.mlflow_models import FEATURES, MODEL, Trained
from tests.mlflow_proc import QUIET_ENV, MlflowRegistry, MlflowServer
from tests.procs import free_port

runner = CliRunner()


@dataclass
class Registry:
    """The session's MLflow registry, and the files `convert` takes here."""

    server: MlflowServer
    files: Path
    trained: Trained
    runs: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="module")
def registry(
    mlflow_registry: MlflowRegistry,
    tmp_path_factory: pytest.TempPathFactory,
    release_keys: list[SigningKey],
) -> Registry:
    reg = Registry(
        mlflow_registry.server,
        tmp_path_factory.mktemp("mlflow-source"),
        mlflow_registry.trained,
        mlflow_registry.runs,
    )
    trained = reg.trained
    # train.csv has the training table's columns in another order than the signature's: the
    # converter must put them in the signature's order.
    for name in ("train.csv", "eval.npz"):
        shutil.copy(mlflow_registry.files / name, reg.files / name)
    np.savez(reg.files / "eval-narrow.npz", X=trained.x_eval[:, :5], y=trained.y_eval)
    no_gyro_z = pd.DataFrame(trained.x_eval[:, :5], columns=FEATURES[:5])
    no_gyro_z.assign(label=trained.y_eval).to_csv(reg.files / "eval-no-gyro-z.csv", index=False)
    for i, key in enumerate(release_keys):
        (reg.files / f"release-{i}.pem").write_bytes(key.to_pem())
    return reg


def convert(
    reg: Registry, uri: str, out: str, *extra: str, env: dict[str, str | None] | None = None
) -> Any:
    args = ["convert", uri, "--name", "wrist-activity", "--version", "1.0.0"]
    args += ["--targets", "phone-android", "--train", str(reg.files / "train.csv")]
    args += ["--eval", str(reg.files / "eval.npz"), "--label-column", "label"]
    args += ["--key", str(reg.files / "release-0.pem"), "--key", str(reg.files / "release-1.pem")]
    args += ["--out", str(reg.files / out), "--json", *extra]
    return runner.invoke(app, args, env={**QUIET_ENV, **(env or {})})


def converted(
    reg: Registry, result: Any, trusted_root: TrustedRoot
) -> tuple[dict[str, Any], Manifest]:
    """The report, and the manifest of the verified phone bundle."""
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    target = report["targets"][0]
    assert target["ok"], target
    verified = verify(Path(target["bundle"]).read_bytes(), trusted_root.root)
    return report, verified.manifest


def expected(reg: Registry, run_id: str) -> dict[str, Any]:
    """What MlflowClient says about the run."""
    from mlflow import MlflowClient

    run = MlflowClient(reg.server.url).get_run(run_id)
    assert run.inputs is not None
    datasets = [
        (
            d.dataset.name,
            d.dataset.digest,
            next((t.value for t in d.tags if t.key == "mlflow.data.context"), None),
        )
        for d in run.inputs.dataset_inputs
    ]
    return {
        "params": run.data.params,
        "metrics": run.data.metrics,
        "datasets": sorted(datasets, key=str),
        "experiment_id": run.info.experiment_id,
    }


def recorded(manifest: Manifest) -> dict[str, Any]:
    source = manifest.provenance.mlflow
    assert source is not None
    return {
        "params": source.params,
        "metrics": source.metrics,
        "datasets": sorted(((d.name, d.digest, d.context) for d in source.datasets), key=str),
        "experiment_id": source.experiment_id,
    }


def test_a_registered_version_converts_with_its_run_in_the_provenance(
    registry: Registry, trusted_root: TrustedRoot
) -> None:
    from mlflow import MlflowClient

    result = convert(registry, f"models:/{MODEL}/1", "v1", "--mlflow-uri", registry.server.url)
    report, manifest = converted(registry, result, trusted_root)
    source = manifest.provenance.mlflow
    assert source is not None
    version = MlflowClient(registry.server.url).get_model_version(MODEL, "1")
    assert (source.model_name, source.model_version, source.alias) == (MODEL, "1", None)
    assert source.run_id == version.run_id == registry.runs["v1"]
    assert source.flavour == "sklearn" and source.tracking_uri == registry.server.url
    assert source.registry_uri == registry.server.url
    assert recorded(manifest) == expected(registry, version.run_id)
    assert {d.context for d in source.datasets} == {"training", "eval"}
    # The signature's column order, not the training table's (which is reversed).
    assert manifest.inputs[0].feature_names == FEATURES
    # The float export scores what the model scored in MLflow, and the shipped variant holds it.
    assert report["float_metric"] == pytest.approx(registry.trained.accuracy("v1"), abs=1 / 200)
    assert report["targets"][0]["metric"] >= report["float_metric"] - 0.01


def test_an_alias_converts_the_version_it_names(
    registry: Registry, trusted_root: TrustedRoot
) -> None:
    result = convert(
        registry,
        f"models:/{MODEL}@champion",
        "champion",
        env={"MLFLOW_TRACKING_URI": registry.server.url},
    )
    report, manifest = converted(registry, result, trusted_root)
    source = manifest.provenance.mlflow
    assert source is not None
    assert (source.model_version, source.alias) == ("2", "champion")
    assert source.run_id == registry.runs["v2"] != registry.runs["v1"]
    assert source.params["C"] == "0.01"
    assert recorded(manifest) == expected(registry, registry.runs["v2"])
    assert report["float_metric"] == pytest.approx(registry.trained.accuracy("v2"), abs=1 / 200)


def test_a_run_path_converts_without_registry_names(
    registry: Registry, trusted_root: TrustedRoot
) -> None:
    uri = f"runs:/{registry.runs['v1']}/model"
    _, manifest = converted(
        registry, convert(registry, uri, "run", "--mlflow-uri", registry.server.url), trusted_root
    )
    source = manifest.provenance.mlflow
    assert source is not None
    assert (source.model_uri, source.model_name, source.model_version) == (uri, None, None)
    assert recorded(manifest) == expected(registry, registry.runs["v1"])


@pytest.mark.parametrize(("version", "fmt"), [("1", "pt2"), ("2", "pickle")], ids=["pt2", "pickle"])
def test_a_pytorch_model_converts_from_its_flavour(
    registry: Registry, trusted_root: TrustedRoot, version: str, fmt: str
) -> None:
    uri = f"models:/{MODEL}-torch/{version}"
    result = convert(registry, uri, f"torch-{fmt}", "--mlflow-uri", registry.server.url)
    report, manifest = converted(registry, result, trusted_root)
    source = manifest.provenance.mlflow
    assert source is not None and source.flavour == "pytorch"
    assert source.run_id == registry.runs[f"torch-{fmt}"] and source.params["format"] == fmt
    assert [(d.name, d.context) for d in source.datasets] == [("wrist-train-np", None)]
    assert report["float_metric"] == pytest.approx(registry.trained.accuracy("torch"), abs=1 / 200)


def test_an_onnx_model_converts_from_its_flavour(
    registry: Registry, trusted_root: TrustedRoot
) -> None:
    result = convert(
        registry, f"models:/{MODEL}-onnx/1", "onnx", "--mlflow-uri", registry.server.url
    )
    _, manifest = converted(registry, result, trusted_root)
    assert manifest.provenance.mlflow is not None and manifest.provenance.mlflow.flavour == "onnx"


def test_credentials_in_the_tracking_uri_never_reach_the_bundle(
    registry: Registry, trusted_root: TrustedRoot
) -> None:
    with_password = registry.server.url.replace("http://", "http://alice:s3cret@")
    result = convert(registry, f"models:/{MODEL}/1", "creds", "--mlflow-uri", with_password)
    report, manifest = converted(registry, result, trusted_root)
    assert manifest.provenance.mlflow is not None
    assert manifest.provenance.mlflow.tracking_uri == registry.server.url
    assert b"s3cret" not in Path(report["targets"][0]["bundle"]).read_bytes()


def _dead_uri() -> str:
    return f"http://127.0.0.1:{free_port()}"


BAD = [
    (
        "unreachable",
        "models:/wrist-activity/1",
        {"uri": "dead"},
        [
            "cannot reach the MLflow tracking server at http://127.0.0.1:",
            "looking up model wrist-activity version 1",
            "Connection refused",
        ],
    ),
    (
        "unreachable-no-credentials-shown",
        "models:/wrist-activity/1",
        {"uri": "dead-with-password"},
        ["cannot reach", "http://127.0.0.1:"],
    ),
    (
        "unknown-model",
        "models:/no-such-model/1",
        {},
        ["no such thing (looking up model no-such-model version 1)", "no-such-model"],
    ),
    (
        "unknown-version",
        "models:/wrist-activity/99",
        {},
        ["looking up model wrist-activity version 99", "version=99"],
    ),
    (
        "unknown-alias",
        "models:/wrist-activity@nope",
        {},
        ["looking up model wrist-activity alias @nope", "alias nope not found"],
    ),
    (
        "unknown-run",
        "runs:/0123456789abcdef0123456789abcdef/model",
        {},
        ["reading run 0123456789abcdef0123456789abcdef"],
    ),
    ("missing-run-path", "runs:/{v1}/nope", {}, ["downloading runs:/", "/nope"]),
    (
        "unsupported-flavour",
        "models:/echo/1",
        {},
        ["models:/echo/1 has flavours python_function; edgefleet converts onnx, pytorch, sklearn"],
    ),
    (
        "stage-uri",
        "models:/wrist-activity/Production",
        {},
        ["is not an MLflow model URI we read; use models:/NAME/VERSION"],
    ),
    (
        "no-tracking-uri",
        "models:/wrist-activity/1",
        {"uri": None},
        ["pass --mlflow-uri or set MLFLOW_TRACKING_URI"],
    ),
    (
        "pickle-refused",
        "models:/wrist-activity/1",
        {"trust": "false"},
        ["saved as skops", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION forbids here"],
    ),
    (
        "signature-tensor-shape",
        "models:/wrist-activity-torch/1",
        {"eval": "eval-narrow.npz"},
        [
            "eval-narrow.npz rows have shape (5,); the signature of"
            " models:/wrist-activity-torch/1 expects rows of shape (6,)"
        ],
    ),
    (
        "signature-columns",
        "models:/wrist-activity/1",
        {"eval": "eval-no-gyro-z.csv"},
        ["lacks columns ['gyro_z'] that the signature of models:/wrist-activity/1 names"],
    ),
]


@pytest.mark.parametrize(("uri", "how", "messages"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_mlflow_input_is_named(
    registry: Registry, uri: str, how: dict[str, Any], messages: list[str]
) -> None:
    uri = uri.format(v1=registry.runs["v1"])
    extra: list[str] = []
    env: dict[str, str | None] = {"MLFLOW_TRACKING_URI": registry.server.url}
    if "uri" in how:
        dead = _dead_uri()
        env["MLFLOW_TRACKING_URI"] = {
            "dead": dead,
            "dead-with-password": dead.replace("http://", "http://alice:s3cret@"),
            None: None,
        }[how["uri"]]
    if "trust" in how:
        env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = how["trust"]
    if "eval" in how:
        extra = ["--eval", str(registry.files / how["eval"])]
    result = convert(registry, uri, "bad", *extra, env=env)
    assert result.exit_code == 1, result.output
    for message in messages:
        assert message in result.output, result.output
    assert "Traceback" not in result.output and "s3cret" not in result.output
