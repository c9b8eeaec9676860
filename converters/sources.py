"""Reading what engineers hand over: a trained model file and data files.

Models: scikit-learn estimators or Pipelines (joblib/pickle), PyTorch (``torch.export`` programs
``.pt2`` or TorchScript), ONNX files; ``converters.mlflow_source`` builds the same
:class:`SourceModel` from an MLflow registry (adding PyTorch modules as MLflow pickles them).
Data: ``.npz`` with ``X`` and ``y``, or CSV/Parquet with a label column. Pickled models run code
when loaded: convert only models you trust.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converters.errors import DataError, ModelLoadError
from converters.input_schema import InputSchema

#: ``torch-module`` is an eager ``nn.Module`` (MLflow's pickled PyTorch format); it exports the
#: way TorchScript does.
ModelKind = Literal["sklearn", "torch-export", "torchscript", "torch-module", "onnx"]
_SKLEARN_SUFFIXES = {".joblib", ".pkl", ".pickle"}
_TORCHSCRIPT_SUFFIXES = {".pt", ".pth", ".ts", ".torchscript"}


@dataclass
class SourceModel:
    """A loaded model and the facts the pipeline needs about it.

    ``input_schema`` (from an MLflow signature) is what the data must match; ``provenance`` is
    added to the manifest's ``provenance`` as it is (e.g. ``{"mlflow": {...}}``).
    """

    kind: ModelKind
    obj: Any
    path: Path
    sha256: str
    input_schema: InputSchema | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Dataset:
    """Features and labels, plus where they came from."""

    x: np.ndarray
    y: np.ndarray
    path: Path
    sha256: str
    feature_names: list[str] | None = None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_model(path: Path) -> SourceModel:
    """Load a model file, choosing the reader by suffix and then by content.

    Raises:
        ModelLoadError: If the file is missing or no reader accepts it.
    """
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    suffix = path.suffix.lower()
    sha256 = file_sha256(path)
    attempts: list[tuple[ModelKind, Any]] = []
    if suffix == ".onnx":
        attempts = [("onnx", _load_onnx)]
    elif suffix == ".pt2":
        attempts = [("torch-export", _load_torch_export)]
    elif suffix in _TORCHSCRIPT_SUFFIXES:
        attempts = [("torchscript", _load_torchscript)]
    elif suffix in _SKLEARN_SUFFIXES:
        attempts = [("sklearn", _load_sklearn)]
    else:
        attempts = [("onnx", _load_onnx), ("sklearn", _load_sklearn)]
        if zipfile.is_zipfile(path):
            attempts = [("torch-export", _load_torch_export), ("torchscript", _load_torchscript)]
    problems = []
    for kind, loader in attempts:
        try:
            return SourceModel(kind=kind, obj=loader(path), path=path, sha256=sha256)
        except ModelLoadError as exc:
            problems.append(f"as {kind}: {exc}")
    raise ModelLoadError(f"{path} is not a model we can read (" + "; ".join(problems) + ")")


def _load_onnx(path: Path) -> Any:
    import onnx

    try:
        model = onnx.load_model(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
        raise ModelLoadError(f"not a valid ONNX model: {exc}") from exc
    if not model.graph.node:
        raise ModelLoadError("ONNX graph has no nodes")
    return model


def _load_sklearn(path: Path) -> Any:
    import joblib

    try:
        obj = joblib.load(path)
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        ModuleNotFoundError,
        OSError,
    ) as exc:
        raise ModelLoadError(f"not a joblib/pickle file: {exc}") from exc
    if not (hasattr(obj, "predict") and hasattr(obj, "fit")):
        raise ModelLoadError(f"unpickled a {type(obj).__name__}, not a scikit-learn estimator")
    return obj


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ModelLoadError(
            "PyTorch models need the 'torch' extra: pip install edgefleet[torch]"
        ) from exc
    return torch


def _load_torch_export(path: Path) -> Any:
    torch = _torch()
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # torch raises many kinds on a bad archive
        raise ModelLoadError(f"not a torch.export program: {exc}") from exc


def _load_torchscript(path: Path) -> Any:
    torch = _torch()
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # torch raises RuntimeError and others on a bad archive
        raise ModelLoadError(f"not a TorchScript module: {exc}") from exc


def load_data(path: Path, label_column: str | None = None) -> Dataset:
    """Load ``.npz`` (``X``, ``y``) or CSV/Parquet with ``label_column``.

    Raises:
        DataError: If the file is missing, unreadable, or lacks X/y or the label column.
    """
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    names: list[str] | None = None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "X" not in npz or "y" not in npz:
                    raise DataError(f"{path}: .npz must hold arrays 'X' and 'y', has {sorted(npz)}")
                x, y = npz["X"], npz["y"]
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: not a readable .npz file: {exc}") from exc
    elif suffix in (".csv", ".parquet", ".pq"):
        x, y, names = _load_table(path, label_column)
    else:
        raise DataError(f"{path}: unsupported data format {suffix!r}; use .npz, .csv or .parquet")
    if len(x) != len(y):
        raise DataError(f"{path}: X has {len(x)} rows but y has {len(y)}")
    if len(x) == 0:
        raise DataError(f"{path}: no rows")
    if x.dtype.kind not in "fiub":
        raise DataError(f"{path}: features must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: features contain NaN or infinity")
    return Dataset(x=x, y=y, path=path, sha256=file_sha256(path), feature_names=names)


def _load_table(path: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import pandas as pd

    if not label_column:
        raise DataError(f"{path}: tables need --label-column to say which column is the label")
    try:
        frame = pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except (ValueError, OSError, ImportError) as exc:
        raise DataError(f"{path}: cannot read table: {exc}") from exc
    if label_column not in frame.columns:
        raise DataError(f"{path}: no column {label_column!r}; columns are {list(frame.columns)}")
    y = frame[label_column].to_numpy()
    features = frame.drop(columns=[label_column])
    non_numeric = [c for c in features.columns if features[c].dtype.kind not in "fiub"]
    if non_numeric:
        raise DataError(f"{path}: non-numeric feature columns {non_numeric}")
    return features.to_numpy(), y, [str(c) for c in features.columns]
