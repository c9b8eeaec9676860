"""Shared fixtures: keys, a trusted root, a sample bundle built through the public API, and the
session's MLflow server with its logged models."""

from __future__ import annotations

import copy
import hashlib
import struct
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from firmware_bundles import SigningKey, build, new_root, sign_root
from firmware_bundles.reference import REFERENCE_FILE, ReferenceHistograms, encode
from firmware_bundles.root import Root
from firmware_bundles.signing import Envelope

if TYPE_CHECKING:
    from tests.mlflow_proc import MlflowRegistry

NOW = datetime(2026, 6, 1, tzinfo=UTC)
MODEL_BYTES = bytes(range(256)) * 40


#: Catalogue targets the tests build for: generation, platform and firmware range.
TARGETS: dict[str, tuple[str, str, dict[str, str]]] = {
    "phone-android": ("phone", "android", {"minimum": "10.0.0"}),
    "ring-gen3": ("ring-gen3", "nrf52840", {"minimum": "3.0.0", "below": "4.0.0"}),
    "ring-gen4": ("ring-gen4", "nrf5340", {"minimum": "4.0.0", "below": "5.0.0"}),
}


def target_entry(hardware_id: str) -> dict[str, Any]:
    """A manifest's ``targets`` entry for one of :data:`TARGETS`."""
    generation, platform, firmware = TARGETS[hardware_id]
    return {
        "target_id": hardware_id,
        "generation": generation,
        "platform": platform,
        "firmware": dict(firmware),
    }


def onnx_runtime(
    op_types: tuple[str, ...] = ("Add", "MatMul", "Softmax"),
    *,
    ram_bytes: int = 4096,
    method: str = "test",
) -> dict[str, Any]:
    """A manifest's ``runtime`` for a float32 ``model.onnx`` at opset 17."""
    return {
        "model_file": "model.onnx",
        "format": "onnx",
        "opset": 17,
        "op_types": list(op_types),
        "min_onnxruntime": "1.17.0",
        "precision": "float32",
        "ram_estimate": {"bytes": ram_bytes, "method": method},
    }


def classifier_draft(
    model: bytes,
    *,
    classes: list[str],
    features: int,
    vectors: list[tuple[list[list[float]], list[list[float]]]],
    input_histograms: list[dict[str, Any]],
    label_counts: list[int],
    name: str = "wrist-activity",
    version: str = "1.2.3",
    release_counter: int = 7,
    targets: list[dict[str, Any]] | None = None,
    runtime: dict[str, Any] | None = None,
    feature_names: list[str] | None = None,
    accuracy: float = 0.95,
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """A manifest draft (every field but files) for a float classifier ``input`` [N, features]
    -> ``probabilities`` [N, len(classes)]; ``vectors`` are (input rows, expected rows) pairs."""
    tensor: dict[str, Any] = {"name": "input", "dtype": "float32", "shape": [None, features]}
    if feature_names is not None:
        tensor["feature_names"] = feature_names
    draft = {
        "name": name,
        "version": version,
        "release_counter": release_counter,
        "created_at": "2026-01-01T00:00:00+00:00",
        "task": "classification",
        "targets": targets or [target_entry("phone-android")],
        "runtime": runtime or onnx_runtime(),
        "inputs": [tensor],
        "outputs": [
            {
                "name": "probabilities",
                "dtype": "float32",
                "shape": [None, len(classes)],
                "class_labels": classes,
            }
        ],
        "quantisation": {"scheme": "float32", "quantised_ops": 0},
        "metrics": {"accuracy": accuracy},
        "reference_histograms": {
            "inputs": input_histograms,
            "outputs": [
                {
                    "name": "label",
                    "kind": "categorical",
                    "categories": classes,
                    "counts": label_counts,
                }
            ],
        },
        "self_test": {
            "tolerance": tolerance,
            "vectors": [
                {"inputs": {"input": x}, "expected": {"probabilities": y}} for x, y in vectors
            ],
        },
        "provenance": {"source_model_sha256": hashlib.sha256(model).hexdigest()},
    }
    # A copy, so a test that edits one list (class labels, categories) edits only that one.
    return copy.deepcopy(draft)


def tflite_placeholder(
    draft: dict[str, Any], expected: tuple[float, ...], *, tolerance: float, tflm_version: str
) -> dict[str, bytes]:
    """Make ``draft`` (4 inputs) the manifest of a TFLite Micro bundle (format 2) for targets
    whose catalogue entry says tflite, and return its files: the server never runs the model, so
    a placeholder file with the manifest of one will do. The self-test vector expects
    ``expected`` (one probability per class) for an all-zero input."""
    classes = len(expected)
    draft["format"] = 2
    draft["runtime"] = {
        **draft["runtime"],
        "model_file": "model.tflite",
        "format": "tflite",
        "op_types": ["FULLY_CONNECTED", "SOFTMAX"],
        "min_onnxruntime": None,
        "tflite": {
            "tflm_version": tflm_version,
            "input": {"dtype": "float32", "shape": [1, 4], "layout": "NC"},
            "output": {"dtype": "float32", "shape": [1, classes]},
        },
    }
    draft["self_test"] = {
        "tolerance": tolerance,
        "file": "self_test.bin",
        "count": 1,
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, 4]}],
        "expected": [{"name": "probabilities", "dtype": "float32", "shape": [1, classes]}],
    }
    return tflite_files(expected)


def tflite_files(expected: tuple[float, ...]) -> dict[str, bytes]:
    """The files of a :func:`tflite_placeholder` bundle."""
    vector = struct.pack("<4f", 0, 0, 0, 0) + struct.pack(f"<{len(expected)}f", *expected)
    return {"model.tflite": b"TFL3" + MODEL_BYTES, "self_test.bin": vector}


def manifest_draft(files: dict[str, bytes] | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid manifest draft (every field but files) for a tiny float model."""
    model = (files or {"model.onnx": MODEL_BYTES}).get("model.onnx", MODEL_BYTES)
    draft = classifier_draft(
        model,
        classes=["rest", "move"],
        features=4,
        vectors=[([[0.0, 0.0, 0.0, 0.0]], [[0.5, 0.5]])],
        input_histograms=[
            {"name": "x0", "kind": "numeric", "edges": [0.0, 1.0], "counts": [1, 2, 3]}
        ],
        label_counts=[5, 5, 0],
    )
    draft.update(overrides)
    return draft


def _flat(value: Any) -> list[float]:
    return [x for item in value for x in _flat(item)] if isinstance(value, list) else [value]


def _shape(value: Any) -> list[int]:
    return [len(value), *_shape(value[0])] if isinstance(value, list) else []


def format_3(
    draft: dict[str, Any], files: dict[str, bytes], *, detached: bool = False
) -> tuple[dict[str, Any], dict[str, bytes], bytes]:
    """A format-1 draft (float32 JSON vectors, JSON reference) as format 3: vectors in
    ``self_test.bin``, the reference in ``reference.bin`` or, ``detached``, pinned beside.

    Returns the draft, the files, and the reference file's bytes.
    """
    draft = copy.deepcopy(draft)
    vectors = draft["self_test"]["vectors"]
    layouts = {
        part: [
            {"name": n, "dtype": "float32", "shape": _shape(v)} for n, v in vectors[0][part].items()
        ]
        for part in ("inputs", "expected")
    }
    blob = b"".join(
        struct.pack(f"<{len(_flat(v))}f", *_flat(v))
        for vector in vectors
        for part in ("inputs", "expected")
        for v in vector[part].values()
    )
    draft["self_test"] = {
        "tolerance": draft["self_test"]["tolerance"],
        "file": "self_test.bin",
        "count": len(vectors),
        **layouts,
    }
    reference = encode(ReferenceHistograms.from_dict(draft["reference_histograms"]))
    files = {**files, "self_test.bin": blob}
    pointer: dict[str, Any] = {"file": REFERENCE_FILE}
    if detached:
        pointer.update(sha256=hashlib.sha256(reference).hexdigest(), length=len(reference))
    else:
        files[REFERENCE_FILE] = reference
    draft.update(format=3, reference_histograms=pointer)
    return draft, files, reference


@dataclass
class Keys:
    root: list[SigningKey]
    release: list[SigningKey]
    director: list[SigningKey]
    hil: list[SigningKey]

    def make_root(
        self,
        *,
        version: int = 1,
        expires: datetime | None = None,
        thresholds: dict[str, int] | None = None,
        signers: list[SigningKey] | None = None,
    ) -> tuple[Root, Envelope]:
        root = new_root(
            version=version,
            expires=expires or NOW + timedelta(days=365),
            role_keys={
                r: [k.public for k in getattr(self, r)]
                for r in ("root", "release", "director", "hil")
            },
            thresholds=thresholds or {"root": 1, "release": 2, "director": 1, "hil": 1},
        )
        return root, sign_root(root, self.root if signers is None else signers)


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        root=[SigningKey.generate(), SigningKey.generate()],
        release=[SigningKey.generate(), SigningKey.generate()],
        director=[SigningKey.generate()],
        hil=[SigningKey.generate()],
    )


@pytest.fixture(scope="session")
def root(keys: Keys) -> Root:
    return keys.make_root()[0]


@pytest.fixture(scope="session")
def bundle_bytes(keys: Keys) -> bytes:
    return build(manifest_draft(), {"model.onnx": MODEL_BYTES}, keys.release)


@pytest.fixture(scope="session")
def mlflow_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowRegistry]:
    """One real `mlflow server` for the session, with small models trained, logged and
    registered (tests/mlflow_proc.py); every test that uses it runs on one xdist worker."""
    from tests.mlflow_proc import logged_registry

    with logged_registry(tmp_path_factory.mktemp("mlflow")) as registry:
        yield registry


#: Test directories whose session fixtures are costly (converting every example, one browser and
#: a seeded fleet): under pytest-xdist (``make test`` runs two workers) each such directory runs
#: on one worker, so its fixtures are built once.
_ONE_WORKER_DIRS = ("converters", "ui")
#: Tests that use it (directly or through another fixture) share one worker, whatever their
#: directory, so one MLflow server starts.
_MLFLOW = "mlflow_registry"
#: The longest single test (the live demo, 7 minutes alone and more beside other tests): given
#: to a worker first, so the run never ends with one worker waiting for it alone.
_FIRST = "test_live_demo.py"


def _group(item: pytest.Item, name: str) -> None:
    """Run ``item`` on the worker of group ``name`` under ``--dist loadgroup``.

    pytest-xdist 3.8 tells its scheduler an item's group by appending ``@name`` to the item's
    node id through ``item._nodeid``, which pytest 9.2's structured node ids no longer read
    (pytest-xdist issue 1386): every group was silently spread over both workers. The suffix is
    written here the way pytest 9.2 reads node ids.
    """
    item.add_marker(pytest.mark.xdist_group(name))
    if not getattr(item.config.option, "loadgroup", False) or not hasattr(item, "_id"):
        return  # not an xdist worker, or a pytest where xdist's own suffix works
    from _pytest.nodeid import NodeId

    if not item.nodeid.endswith(f"@{name}"):
        item._id = NodeId.parse(f"{item.nodeid}@{name}")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        if _MLFLOW in getattr(item, "fixturenames", ()):
            _group(item, "mlflow")
            continue
        where = item.path.relative_to(tests).parts
        if len(where) > 1 and where[0] in _ONE_WORKER_DIRS:
            _group(item, where[0])
    _schedule_longest_first(items)


def _schedule_longest_first(items: list[pytest.Item]) -> None:
    """Order ``items`` as ``make test``'s scheduler hands out their work units: the live demo,
    then the groups, largest first, then the other tests as collected.

    ``make test`` passes ``--no-loadscope-reorder``, so pytest-xdist hands out work units in
    this order (its own reordering would put a one-test unit like the demo last).
    """
    groups = Counter(m.args[0] for item in items for m in item.iter_markers("xdist_group"))

    def rank(indexed: tuple[int, pytest.Item]) -> tuple[int, int, int]:
        index, item = indexed
        group = next((m.args[0] for m in item.iter_markers("xdist_group")), None)
        return (item.path.name != _FIRST, -groups[group] if group else 0, index)

    items[:] = [item for _, item in sorted(enumerate(items), key=rank)]
