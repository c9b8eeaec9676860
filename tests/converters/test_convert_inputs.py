"""The other model and data kinds: regression, CSV tables, ONNX files, TorchScript."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import joblib
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from converters.onnx_export import export
from converters.pipeline import ConvertOptions, convert
from converters.sources import load_data, load_model
from firmware_bundles import SigningKey, TrustedRoot, verify

BUILD_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def options(out: Path, keys: list[SigningKey], **kw: object) -> ConvertOptions:
    return ConvertOptions(
        name="m",
        version="2.0.0",
        hardware_ids=["phone-android"],
        keys=keys,
        out_dir=out,
        created_at=BUILD_TIME,
        **kw,
    )  # type: ignore[arg-type]


def test_regression_keeps_relative_mae_within_budget(
    tmp_path: Path, release_keys: list[SigningKey], trusted_root: TrustedRoot
) -> None:
    x, y = load_diabetes(return_X_y=True)
    x = x.astype(np.float32)
    model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(x[:300], y[:300])
    joblib.dump(model, tmp_path / "ridge.joblib")
    np.savez(tmp_path / "train.npz", X=x[:300], y=y[:300])
    np.savez(tmp_path / "eval.npz", X=x[300:], y=y[300:])
    report = convert(
        tmp_path / "ridge.joblib",
        tmp_path / "train.npz",
        tmp_path / "eval.npz",
        options(tmp_path / "out", release_keys),
    )
    assert report.task == "regression" and report.metric_name == "mae"
    target = report.targets[0]
    assert target.ok, target.reason
    bundle = verify(Path(target.bundle).read_bytes(), trusted_root.root)
    session = ort.InferenceSession(bundle.file(bundle.manifest.runtime.model_file))
    predicted = np.concatenate([session.run(None, {"input": row[None]})[0] for row in x[300:]])
    mae = float(np.mean(np.abs(predicted.ravel() - y[300:])))
    reference = float(np.mean(np.abs(model.predict(x[300:]) - y[300:])))
    assert mae <= reference * 1.01 + 1e-6
    assert bundle.manifest.outputs[0].name == "prediction"
    assert bundle.manifest.reference_histograms.outputs[0].kind == "numeric"


def test_csv_with_label_column_names_features(
    tmp_path: Path, examples: dict[str, Path], release_keys: list[SigningKey]
) -> None:
    digits = examples["digits-mlp"]
    for split in ("train", "eval"):
        data = np.load(digits / f"{split}.npz")
        frame = pd.DataFrame(data["X"], columns=[f"px{i}" for i in range(64)])
        frame["digit"] = data["y"]
        frame.to_csv(tmp_path / f"{split}.csv", index=False)
    report = convert(
        digits / "model.joblib",
        tmp_path / "train.csv",
        tmp_path / "eval.csv",
        options(tmp_path / "out", release_keys, label_column="digit"),
    )
    assert report.targets[0].ok
    from firmware_bundles import open_bundle

    manifest = open_bundle(Path(report.targets[0].bundle or "").read_bytes()).manifest
    assert manifest.inputs[0].feature_names == [f"px{i}" for i in range(64)]
    assert manifest.reference_histograms.inputs[0].name == "px0"


def test_csv_without_label_column_is_refused(tmp_path: Path) -> None:
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_csv(tmp_path / "d.csv", index=False)
    from converters.errors import DataError

    with pytest.raises(DataError, match="--label-column"):
        load_data(tmp_path / "d.csv")


def test_onnx_file_converts_like_its_source(
    tmp_path: Path, examples: dict[str, Path], release_keys: list[SigningKey]
) -> None:
    digits = examples["digits-mlp"]
    exported = export(load_model(digits / "model.joblib"), load_data(digits / "train.npz"))
    (tmp_path / "digits.onnx").write_bytes(exported.model)
    report = convert(
        tmp_path / "digits.onnx",
        digits / "train.npz",
        digits / "eval.npz",
        options(tmp_path / "out", release_keys),
    )
    assert report.task == "classification"
    assert report.targets[0].ok and report.parity_max_diff == 0.0


def test_torchscript_module_converts(
    tmp_path: Path, examples: dict[str, Path], release_keys: list[SigningKey]
) -> None:
    import torch

    cnn = examples["wearable-cnn"]
    module = torch.export.load(str(cnn / "model.pt2")).module()
    sample = torch.from_numpy(np.load(cnn / "train.npz")["X"][:2])
    traced = torch.jit.trace(module, (sample,))
    traced.save(str(tmp_path / "cnn.torchscript"))
    report = convert(
        tmp_path / "cnn.torchscript",
        cnn / "train.npz",
        cnn / "eval.npz",
        options(tmp_path / "out", release_keys),
    )
    assert report.targets[0].ok, report.targets[0].reason
    assert report.parity_max_diff < 1e-4
