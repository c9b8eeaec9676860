"""Sample bundles and held-out data for the rig, its tests and its bench.

A small linear classifier built with ``onnx.helper`` (MatMul, Add, Softmax: ops every micro
runtime in the catalogue implements; for TFLM targets the same weights as a float32
``.tflite``), signed into a bundle for the asked targets, with self-test vectors computed by the
bundle's runtime (and, for ``.tflite``, the float original's outputs) and held-out data whose
labels come from a slightly different "true" model, so accuracy is a real figure.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from firmware_bundles import SigningKey, TargetCatalogue, build
from firmware_bundles.manifest import SELF_TEST_FILE
from hil.micro_runtime import plan_arena_bytes
from hil.sample_tflite import linear_softmax_tflite
from hil.tflm_runtime import invoke, measure_arena, tflm_version

FEATURES = 4
CLASSES = 3
CLASS_LABELS = ["rest", "walk", "run"]
OPSET = 17
#: Self-test tolerance of the float32 sample, against its own outputs and the float original.
TOLERANCE = 1e-5
SELF_TEST_VECTORS = 3


@dataclass(frozen=True)
class SampleModel:
    """A sample classifier: the ONNX bytes and the weights that made it."""

    onnx_bytes: bytes
    weights: np.ndarray
    bias: np.ndarray


def sample_model(seed: int = 0) -> SampleModel:
    """A ``[N, 4] -> [N, 3]`` softmax classifier with seeded weights."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=(CLASSES,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "sample_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, CLASSES])],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return SampleModel(model.SerializeToString(), weights, bias)


def heldout(n: int = 200, seed: int = 1, model_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out features and labels; labels follow the model's weights plus noise."""
    model = sample_model(model_seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype(np.float32)
    logits = x @ model.weights + model.bias + rng.normal(scale=0.5, size=(n, CLASSES))
    return x, logits.argmax(axis=1).astype(np.int64)


def run_reference(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """The model's outputs on the host, one row at a time as a device runs it."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    rows = [session.run(["probabilities"], {"input": x[i : i + 1]})[0] for i in range(len(x))]
    return np.concatenate(rows)


def sample_draft(
    model: SampleModel,
    target_ids: list[str],
    *,
    name: str = "wrist-activity",
    version: str = "1.0.0",
    release_counter: int = 1,
    catalogue: TargetCatalogue | None = None,
) -> dict[str, Any]:
    """A manifest draft for the sample model on ``target_ids``."""
    catalogue = catalogue or TargetCatalogue.load_default()
    x, y = heldout(400, seed=7)
    outputs = run_reference(model.onnx_bytes, x)
    vectors = [
        {
            "inputs": {"input": x[i : i + 1].tolist()},
            "expected": {"probabilities": outputs[i : i + 1].tolist()},
        }
        for i in range(SELF_TEST_VECTORS)
    ]
    predicted = np.bincount(outputs.argmax(axis=1), minlength=CLASSES)
    targets = [catalogue.get(i) for i in target_ids]
    tflite = all(t.format == "tflite" for t in targets)
    runtime = _runtime(model, tflite=tflite)
    self_test: dict[str, Any] = {"tolerance": TOLERANCE, "vectors": vectors}
    if tflite:
        self_test = sample_self_test(model)[0]
    return {
        # Format 2 for .tflite (and its self-test file); ONNX samples stay format 1.
        "format": 2 if tflite else 1,
        "name": name,
        "version": version,
        "release_counter": release_counter,
        "created_at": "2026-01-01T00:00:00+00:00",
        "task": "classification",
        "targets": [
            {
                "target_id": t.hardware_id,
                "generation": t.generation,
                "platform": t.platform,
                "firmware": t.firmware.to_dict(),
            }
            for t in targets
        ],
        "runtime": runtime,
        "inputs": [{"name": "input", "dtype": "float32", "shape": [None, FEATURES]}],
        "outputs": [
            {
                "name": "probabilities",
                "dtype": "float32",
                "shape": [None, CLASSES],
                "class_labels": CLASS_LABELS,
            }
        ],
        "quantisation": {"scheme": "float32", "quantised_ops": 0},
        "metrics": {"accuracy": float((outputs.argmax(axis=1) == y).mean())},
        "reference_histograms": {
            "inputs": [_input_histogram(f"feature_{i}", x[:, i]) for i in range(FEATURES)],
            "outputs": [
                {
                    "name": "probabilities",
                    "kind": "categorical",
                    "categories": CLASS_LABELS,
                    "counts": [*map(int, predicted), 0],
                }
            ],
        },
        "self_test": self_test,
        "provenance": {"source_model_sha256": hashlib.sha256(model.onnx_bytes).hexdigest()},
    }


def _runtime(model: SampleModel, *, tflite: bool) -> dict[str, Any]:
    """The manifest's runtime block: ``.tflite`` for TFLM targets, else ONNX."""
    if not tflite:
        return {
            "model_file": "model.onnx",
            "format": "onnx",
            "opset": OPSET,
            "op_types": ["Add", "MatMul", "Softmax"],
            "min_onnxruntime": "1.17.0",
            "precision": "float32",
            "ram_estimate": {
                "bytes": plan_arena_bytes(onnx.load_from_string(model.onnx_bytes)),
                "method": "activation liveness, batch 1",
            },
        }
    tensor = {"dtype": "float32", "quantisation": None}
    return {
        "model_file": "model.tflite",
        "format": "tflite",
        "opset": OPSET,
        "op_types": ["FULLY_CONNECTED", "SOFTMAX"],
        "precision": "float32",
        "ram_estimate": {
            "bytes": measure_arena(sample_tflite(model)),
            "method": "tflm-arena-allocation-total/1",
        },
        "tflite": {
            "tflm_version": tflm_version(),
            "input": {**tensor, "shape": [1, FEATURES], "layout": "NC"},
            "output": {**tensor, "shape": [1, CLASSES]},
        },
    }


def sample_tflite(model: SampleModel) -> bytes:
    """The sample model as a float32 ``.tflite``."""
    return linear_softmax_tflite(model.weights, model.bias, "input", "probabilities")


def float_original(model: SampleModel, x: np.ndarray) -> np.ndarray:
    """The sample model's own math in float64: what every runtime's outputs stand for."""
    logits = x.astype(np.float64) @ model.weights.astype(np.float64) + model.bias
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(exp / exp.sum(axis=1, keepdims=True), dtype=np.float32)


def sample_self_test(model: SampleModel) -> tuple[dict[str, Any], bytes]:
    """The ``.tflite`` sample's self-test (manifest format 2) and its file's bytes.

    Three held-out inputs, TFLM's outputs for them (what the device must give) and the float
    original's (what the rig holds the device to within ``float_tolerance``).
    """
    x = heldout(400, seed=7)[0][:SELF_TEST_VECTORS]
    expected = invoke(sample_tflite(model), x)
    original = float_original(model, x)
    chunks = [
        a[i : i + 1].astype("<f4").tobytes() for i in range(len(x)) for a in (x, expected, original)
    ]
    output = {"name": "probabilities", "dtype": "float32", "shape": [1, CLASSES]}
    layout = {
        "tolerance": TOLERANCE,
        "file": SELF_TEST_FILE,
        "count": len(x),
        "inputs": [{"name": "input", "dtype": "float32", "shape": [1, FEATURES]}],
        "expected": [output],
        "float_outputs": [output],
        "float_tolerance": TOLERANCE,
    }
    return layout, b"".join(chunks)


def _input_histogram(name: str, values: np.ndarray) -> dict[str, Any]:
    edges = sorted({float(e) for e in np.quantile(values, [0.25, 0.5, 0.75])})
    index = np.searchsorted(np.asarray(edges), values, side="right")
    counts = np.bincount(index, minlength=len(edges) + 1)
    return {"name": name, "kind": "numeric", "edges": edges, "counts": [int(c) for c in counts]}


def sample_bundle(
    keys: list[SigningKey],
    target_ids: list[str],
    *,
    version: str = "1.0.0",
    release_counter: int = 1,
    seed: int = 0,
    padding_bytes: int = 0,
    draft_overrides: dict[str, Any] | None = None,
    file_overrides: dict[str, bytes] | None = None,
) -> bytes:
    """A signed sample bundle for ``target_ids``; ``padding_bytes`` adds a file to grow it.

    ``draft_overrides`` replace manifest fields and ``file_overrides`` files (tests that build
    a broken bundle on purpose).
    """
    model = sample_model(seed)
    draft = sample_draft(model, target_ids, version=version, release_counter=release_counter)
    draft.update(draft_overrides or {})
    runtime = draft["runtime"]
    model_bytes = sample_tflite(model) if runtime["format"] == "tflite" else model.onnx_bytes
    files = {runtime["model_file"]: model_bytes}
    if draft["format"] == 2:
        files[SELF_TEST_FILE] = sample_self_test(model)[1]
    files.update(file_overrides or {})
    if padding_bytes:
        files["padding.bin"] = bytes(padding_bytes)
    return build(draft, files, keys)
