"""Models from an MLflow registry: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``,
``runs:/RUN_ID/PATH``, fetched with MLflow's own client and loaded from their flavour.

The result is the :class:`SourceModel` the pipeline takes from a file, plus the signature's input
schema and ``provenance.mlflow`` (registry, version, run, its parameters, metrics and datasets'
digests). Every MLflow error is mapped here, once, to a ``converters`` error naming what was tried.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from converters.errors import (
    ModelLoadError,
    RegistryError,
    RegistryLookupError,
    RegistryUnreachableError,
    UnsupportedFlavourError,
)
from converters.input_schema import NUMERIC_KINDS, InputSchema
from converters.sources import SourceModel, file_sha256, load_model

#: Flavours we convert, in the order we prefer them when a model has several.
FLAVOURS = ("onnx", "pytorch", "sklearn")
_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/@]+))/?$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9A-Za-z_-]+)/(?P<path>.+)$")
_NOT_FOUND = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}
_COLUMN_TYPES = {"boolean", "integer", "long", "float", "double"}
_PICKLE_FLAG = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
_USERINFO = re.compile(r"//[^/@\s]+@")


@dataclass(frozen=True)
class MlflowSettings:
    """How hard to try a tracking server (used unless the MLFLOW_HTTP_REQUEST_* variables are
    set). MLflow's own defaults retry for minutes before an unreachable server is reported."""

    max_retries: int = 2
    backoff_factor_s: int = 1
    request_timeout_s: int = 30


@dataclass(frozen=True)
class MlflowRef:
    """A parsed model URI: a registered version or alias, or a path in a run."""

    uri: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None


def is_mlflow_uri(text: str) -> bool:
    """Whether ``text`` names a model in MLflow rather than a file."""
    return text.startswith(("models:/", "runs:/"))


def parse_uri(text: str) -> MlflowRef:
    """Parse ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``runs:/RUN_ID/PATH``.

    Raises:
        ModelLoadError: For any other form (stages such as ``models:/NAME/Production`` too).
    """
    if m := _MODELS.match(text):
        return MlflowRef(text, name=m["name"], version=m["version"], alias=m["alias"])
    if m := _RUNS.match(text):
        return MlflowRef(text, run_id=m["run"])
    raise ModelLoadError(
        f"{text!r} is not an MLflow model URI we read; use models:/NAME/VERSION,"
        " models:/NAME@ALIAS or runs:/RUN_ID/PATH"
    )


def redact(uri: str) -> str:
    """``uri`` without credentials: no user or password, no query string, no fragment."""
    parts = urlsplit(uri)
    if not parts.scheme or not parts.netloc:
        return uri.split("?", 1)[0]
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def fetch(
    uri: str,
    tracking_uri: str | None,
    directory: Path,
    settings: MlflowSettings | None = None,
) -> SourceModel:
    """Download the model ``uri`` names into ``directory`` and load it from its flavour.

    Raises:
        RegistryUnreachableError: If the tracking server does not answer.
        RegistryLookupError: If the model, version, alias, run or path does not exist.
        RegistryError: If the server refuses otherwise, or no tracking URI is given.
        UnsupportedFlavourError: If the model has no sklearn, pytorch or onnx flavour.
        ModelLoadError: If the flavour cannot be loaded (or MLflow is not installed).
    """
    ref = parse_uri(uri)
    if not tracking_uri:
        raise RegistryError(
            f"{uri} is in an MLflow registry: pass --mlflow-uri or set MLFLOW_TRACKING_URI", ""
        )
    _http_defaults(settings or MlflowSettings())
    mlflow = _import_mlflow()
    registry_uri = os.environ.get("MLFLOW_REGISTRY_URI") or tracking_uri
    with _process_wide(mlflow, tracking_uri, registry_uri):
        found, run, local = _download(mlflow, ref, tracking_uri, registry_uri, directory)
    mlmodel = _mlmodel(local, uri)
    flavour, source = _load(local, mlmodel, uri)
    source.input_schema = input_schema(mlmodel.signature, f"the signature of {uri}")
    record: dict[str, Any] = {
        "tracking_uri": redact(tracking_uri),
        "registry_uri": redact(registry_uri),
        "model_uri": uri,
        "model_name": ref.name,
        "model_version": None if found is None else str(found.version),
        "alias": ref.alias,
        "run_id": ref.run_id if found is None else found.run_id,
        "logged_model_id": getattr(mlmodel, "model_id", None),
        "flavour": flavour,
    }
    if run is not None:
        record.update(_run_facts(run))
    source.provenance = {"mlflow": {k: v for k, v in record.items() if v is not None}}
    return source


def _download(
    mlflow: Any, ref: MlflowRef, tracking_uri: str, registry_uri: str, directory: Path
) -> tuple[Any, Any, Path]:
    """The registered version (None for ``runs:/``), its run (None if it has none), and where
    the model was downloaded."""
    shown = redact(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    found, run_id, download = None, ref.run_id, ref.uri
    if ref.name is not None:
        what = f"model {ref.name} " + (
            f"alias @{ref.alias}" if ref.alias else f"version {ref.version}"
        )
        with _mapped(f"looking up {what}", shown):
            if ref.alias:
                found = client.get_model_version_by_alias(ref.name, ref.alias)
            else:
                found = client.get_model_version(ref.name, ref.version)
        run_id = found.run_id
        # Download the version the alias named when we looked, even if the alias moves meanwhile.
        download = f"models:/{ref.name}/{found.version}"
    run = None
    if run_id:
        with _mapped(f"reading run {run_id}", shown):
            run = client.get_run(run_id)
    with _mapped(f"downloading {download}", shown):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=download,
            dst_path=str(directory),
            tracking_uri=tracking_uri,
            registry_uri=registry_uri,
        )
    return found, run, Path(local)


@contextmanager
def _process_wide(mlflow: Any, tracking_uri: str, registry_uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs pointed at the server while we fetch.

    MLflow 3.17 resolves a registered version's logged model (``models:/m-...``) with a client
    of its own that reads these rather than the URIs passed to ``download_artifacts``. Afterwards
    they are unset again and the environment restored.
    """
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_facts(run: Any) -> dict[str, Any]:
    """Experiment, parameters, latest metrics (finite ones: JSON has no NaN) and datasets."""
    datasets = []
    for entry in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in entry.tags if t.key == "mlflow.data.context"), None)
        item = {
            "name": entry.dataset.name,
            "digest": entry.dataset.digest,
            "context": context,
            "source_type": entry.dataset.source_type or None,
        }
        datasets.append({k: v for k, v in item.items() if v is not None})
    datasets.sort(key=lambda d: (d.get("context", ""), d["name"], d["digest"]))
    return {
        "experiment_id": run.info.experiment_id,
        "params": dict(sorted(run.data.params.items())),
        "metrics": {k: float(v) for k, v in sorted(run.data.metrics.items()) if np.isfinite(v)},
        "datasets": datasets,
    }


def _http_defaults(settings: MlflowSettings) -> None:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(settings.backoff_factor_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.request_timeout_s))


def _import_mlflow() -> Any:
    try:
        import mlflow
        import mlflow.artifacts
    except ImportError as exc:
        raise ModelLoadError(
            "models in an MLflow registry need the 'mlflow' extra: pip install edgefleet[mlflow]"
        ) from exc
    return mlflow


@contextmanager
def _mapped(action: str, shown: str) -> Iterator[None]:
    """Turn MLflow's and requests' errors into ours, naming ``action`` and the server."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        message = _USERINFO.sub("//", exc.message)
        cause = _connection_failure(exc)
        if cause is not None:
            raise RegistryUnreachableError(
                f"cannot reach the MLflow tracking server at {shown} ({action}): {cause}", shown
            ) from None
        if exc.error_code in _NOT_FOUND:
            raise RegistryLookupError(
                f"MLflow at {shown} has no such thing ({action}): {message}", shown
            ) from None
        raise RegistryError(f"MLflow at {shown} refused {action}: {message}", shown) from None
    except OSError as exc:  # a file or sqlite store the tracking URI points at directly
        raise RegistryError(f"MLflow at {shown}: {action} failed: {exc}", shown) from None


def _connection_failure(exc: BaseException) -> str | None:
    """Why, if ``exc`` comes from a connection that failed or timed out: its innermost cause."""
    import requests

    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    broken = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    if not any(isinstance(e, broken) for e in chain):
        return None
    return _USERINFO.sub("//", str(chain[-1]))


def _mlmodel(local: Path, uri: str) -> Any:
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    if not (local / "MLmodel").is_file():
        raise ModelLoadError(f"{uri} is not an MLflow model: it has no MLmodel file")
    try:
        return Model.load(str(local))
    except (MlflowException, OSError, ValueError) as exc:
        raise ModelLoadError(f"{uri}: cannot read its MLmodel file: {exc}") from None


def _load(local: Path, mlmodel: Any, uri: str) -> tuple[str, SourceModel]:
    """The model loaded from the first flavour of :data:`FLAVOURS` it has."""
    flavours = sorted(mlmodel.flavors)
    flavour = next((f for f in FLAVOURS if f in mlmodel.flavors), None)
    if flavour is None:
        raise UnsupportedFlavourError(
            f"{uri} has flavours {', '.join(flavours)}; edgefleet converts {', '.join(FLAVOURS)}"
        )
    conf = mlmodel.flavors[flavour]
    if flavour == "onnx":
        return flavour, load_model(local / conf["data"])
    if flavour == "pytorch":
        exported = local / conf.get("model_data", "data") / "model.pt2"
        if exported.is_file():
            return flavour, load_model(exported)
        module = _mlflow_load("pytorch", local, uri, conf, map_location="cpu")
        path = local / conf.get("model_data", "data") / "model.pth"
        return flavour, SourceModel("torch-module", module.eval(), path, _sha256(path))
    estimator = _mlflow_load("sklearn", local, uri, conf)
    if not (hasattr(estimator, "predict") and hasattr(estimator, "fit")):
        raise ModelLoadError(f"{uri}: its sklearn flavour holds a {type(estimator).__name__}")
    path = local / conf.get("pickled_model", "model.pkl")
    return flavour, SourceModel("sklearn", estimator, path, _sha256(path))


def _mlflow_load(flavour: str, local: Path, uri: str, conf: dict[str, Any], **kwargs: Any) -> Any:
    """Load with MLflow's own flavour loader, which refuses pickles unless told otherwise."""
    from mlflow.exceptions import MlflowException

    fmt = conf.get("serialization_format", "pickle")
    try:
        if flavour == "pytorch":
            import mlflow.pytorch

            return mlflow.pytorch.load_model(str(local), **kwargs)
        import mlflow.sklearn

        return mlflow.sklearn.load_model(str(local))
    except ImportError as exc:
        extra = "torch" if flavour == "pytorch" else "convert"
        raise ModelLoadError(
            f"{uri} is a {flavour} model: it needs the '{extra}' extra ({exc})"
        ) from None
    except MlflowException as exc:
        if _PICKLE_FLAG in str(exc):
            raise ModelLoadError(
                f"{uri} is a {flavour} model saved as {fmt}; loading it runs code from the"
                f" artifact, which {_PICKLE_FLAG} forbids here: set it to true to convert a model"
                " you trust"
            ) from None
        raise ModelLoadError(f"MLflow cannot load the {flavour} flavour of {uri}: {exc}") from None
    except Exception as exc:  # unpickling raises whatever the pickle holds
        raise ModelLoadError(f"cannot load the {flavour} flavour of {uri}: {exc}") from None


def _sha256(path: Path) -> str:
    """The file's SHA-256, or one over a directory's files (path and contents, sorted)."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(item.relative_to(path).as_posix().encode() + b"\0")
        digest.update(bytes.fromhex(file_sha256(item)))
    return digest.hexdigest()


def input_schema(signature: Any, origin: str) -> InputSchema | None:
    """The input half of an MLflow ``ModelSignature`` (None without one).

    Raises:
        ModelLoadError: If it declares several tensors or a feature that is not a number.
    """
    if signature is None or signature.inputs is None:
        return None
    inputs = signature.inputs
    if inputs.is_tensor_spec():
        specs = inputs.inputs
        if len(specs) != 1:
            raise ModelLoadError(f"{origin} declares {len(specs)} input tensors; we convert one")
        dtype = np.dtype(specs[0].type)
        if dtype.kind not in NUMERIC_KINDS:
            raise ModelLoadError(f"{origin} declares a {dtype} input tensor; we convert numbers")
        shape = tuple(None if d == -1 else int(d) for d in specs[0].shape[1:])
        return InputSchema(origin, row_shape=shape, dtypes=(dtype.name,))
    names, dtypes = [], []
    for spec in inputs.inputs:
        kind = getattr(spec.type, "name", str(spec.type))
        if kind not in _COLUMN_TYPES:
            raise ModelLoadError(
                f"{origin} declares column {spec.name!r} of type {kind}; we convert numeric"
                f" columns ({', '.join(sorted(_COLUMN_TYPES))})"
            )
        names.append(spec.name)
        dtypes.append(np.dtype(spec.type.to_numpy()).name)
    if any(n is None for n in names):
        return InputSchema(origin, row_shape=(len(names),), dtypes=tuple(dtypes))
    return InputSchema(origin, feature_names=tuple(names), dtypes=tuple(dtypes))
