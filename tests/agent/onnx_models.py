"""Small real ONNX models, built with onnx.helper, whose outputs a test can work out by hand,
and manifests describing them (for the runtime and telemetry tests).

- ``classifier``: input [N, 4] -> probabilities [N, 3] = softmax of the first three features
  (so the predicted class is the argmax of x[:, :3]).
- ``channels``: window [N, 2, 8] -> prediction [N, 1] = mean of all values (a regressor).
- ``two_inputs``: a float32 [N, 3], b int64 [N, 1] -> total [N, 1] = sum of a and b.
- ``labeller``: input [N, 4] -> label int64 [N] = argmax of x[:, :3] (a label output).
- ``reshape_to_2x2``: input [N, 4] -> out [2, 2]; ONNX Runtime fails for any batch but 1.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from device_agent.runtime import LoadedModel, ModelRuntime
from firmware_bundles.bundle import file_entries
from firmware_bundles.manifest import Manifest
from tests.conftest import manifest_draft

CLASSES = ["rest", "walk", "run"]
FLOAT = TensorProto.FLOAT


def _model(
    nodes: list[Any], inputs: list[Any], outputs: list[Any], init: list[Any], name: str = "test"
) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString(deterministic=True)


def classifier() -> bytes:
    weights = np.zeros((4, 3), np.float32)
    weights[0, 0] = weights[1, 1] = weights[2, 2] = 1.0
    return _model(
        [
            helper.make_node("MatMul", ["input", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        [helper.make_tensor_value_info("input", FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probabilities", FLOAT, [None, 3])],
        [numpy_helper.from_array(weights, "W")],
    )


def dense_softmax(layers: list[tuple[np.ndarray, np.ndarray]], name: str) -> bytes:
    """input [N, features] -> (MatMul -> Add, with Relu between layers) -> Softmax ->
    probabilities [N, classes], from each layer's weights and bias."""
    nodes, init = [], []
    x = "input"
    for i, (weights, bias) in enumerate(layers, start=1):
        init += [numpy_helper.from_array(weights, f"W{i}"), numpy_helper.from_array(bias, f"B{i}")]
        nodes += [
            helper.make_node("MatMul", [x, f"W{i}"], [f"z{i}"]),
            helper.make_node("Add", [f"z{i}", f"B{i}"], [f"a{i}"]),
        ]
        x = f"a{i}"
        if i < len(layers):
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
            x = f"h{i}"
    nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
    features, classes = layers[0][0].shape[0], layers[-1][1].shape[0]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", FLOAT, [None, features])],
        [helper.make_tensor_value_info("probabilities", FLOAT, [None, classes])],
        init,
        name,
    )


def channels() -> bytes:
    return _model(
        [
            helper.make_node("ReduceMean", ["window"], ["per_channel"], axes=[2], keepdims=0),
            helper.make_node("ReduceMean", ["per_channel"], ["prediction"], axes=[1], keepdims=1),
        ],
        [helper.make_tensor_value_info("window", FLOAT, [None, 2, 8])],
        [helper.make_tensor_value_info("prediction", FLOAT, [None, 1])],
        [],
    )


def two_inputs() -> bytes:
    return _model(
        [
            helper.make_node("Cast", ["b"], ["b_float"], to=FLOAT),
            helper.make_node("Concat", ["a", "b_float"], ["both"], axis=1),
            helper.make_node("ReduceSum", ["both", "axis"], ["total"], keepdims=1),
        ],
        [
            helper.make_tensor_value_info("a", FLOAT, [None, 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, [None, 1]),
        ],
        [helper.make_tensor_value_info("total", FLOAT, [None, 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axis")],
    )


def labeller() -> bytes:
    weights = np.zeros((4, 3), np.float32)
    weights[0, 0] = weights[1, 1] = weights[2, 2] = 1.0
    return _model(
        [
            helper.make_node("MatMul", ["input", "W"], ["scores"]),
            helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
        ],
        [helper.make_tensor_value_info("input", FLOAT, [None, 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None])],
        [numpy_helper.from_array(weights, "W")],
    )


def strings() -> bytes:
    """name string [N, 1] -> same string [N, 1]."""
    return _model(
        [helper.make_node("Identity", ["name"], ["same"])],
        [helper.make_tensor_value_info("name", TensorProto.STRING, [None, 1])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, [None, 1])],
        [],
    )


def reshape_to_2x2() -> bytes:
    return _model(
        [helper.make_node("Reshape", ["input", "shape"], ["out"])],
        [helper.make_tensor_value_info("input", FLOAT, [None, 4])],
        [helper.make_tensor_value_info("out", FLOAT, [2, 2])],
        [numpy_helper.from_array(np.array([2, 2], np.int64), "shape")],
    )


def ort_run(model: bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The bare ONNX Runtime answer, to compare with."""
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(None, feed)]


def numeric(name: str, edges: list[float]) -> dict[str, Any]:
    return {"name": name, "kind": "numeric", "edges": edges, "counts": [0] * (len(edges) + 1)}


def categorical(name: str, categories: list[Any]) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "categorical",
        "categories": categories,
        "counts": [0] * (len(categories) + 1),
    }


def manifest(
    model: bytes,
    *,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    input_histograms: list[dict[str, Any]] | None = None,
    output_histograms: list[dict[str, Any]] | None = None,
    task: str = "classification",
    vectors: list[dict[str, Any]] | None = None,
    tolerance: float = 1e-4,
    name: str = "gesture",
    version: str = "1.0.0",
) -> Manifest:
    """A valid manifest for ``model`` (not signed: the runtime trusts what the agent verified)."""
    draft = manifest_draft(
        files={"model.onnx": model},
        name=name,
        version=version,
        task=task,
        inputs=inputs,
        outputs=outputs,
        reference_histograms={
            "inputs": input_histograms or [],
            "outputs": output_histograms or [],
        },
        self_test={"tolerance": tolerance, "vectors": vectors or []},
    )
    return Manifest.from_dict({**draft, "files": file_entries({"model.onnx": model})})


def classifier_manifest(**overrides: Any) -> Manifest:
    """The classifier with feature histograms on edges [-1, 0, 1] and class counts."""
    fields: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "dtype": "float32",
                "shape": [None, 4],
                "feature_names": ["f0", "f1", "f2", "f3"],
            }
        ],
        "outputs": [
            {
                "name": "probabilities",
                "dtype": "float32",
                "shape": [None, 3],
                "class_labels": CLASSES,
            }
        ],
        "input_histograms": [numeric(f"f{i}", [-1.0, 0.0, 1.0]) for i in range(4)],
        "output_histograms": [categorical("probabilities", CLASSES)],
    }
    fields.update(overrides)
    return manifest(classifier(), **fields)


def load(model: bytes, manifest: Manifest, runtime: ModelRuntime | None = None) -> LoadedModel:
    """Load ``model`` under a bundle hash made from it and the manifest's version (64 hex)."""
    made_up = model + manifest.version.encode() + manifest.name.encode()
    bundle_sha256 = hashlib.sha256(made_up).hexdigest()
    return (runtime or ModelRuntime()).load(bundle_sha256, manifest, model)
