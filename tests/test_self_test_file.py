"""Manifest format 2: self-test vectors as binary tensors in the bundle, read by every runtime.

Real ONNX models (one of them a QDQ graph whose input a QuantizeLinear takes, as a static int8
model's does), real ONNX Runtime through the agent's runtime and the emulated ring's.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.bundling import input_quantisation, self_test
from device_agent.runtime import ModelRuntime
from firmware_bundles import (
    HashMismatchError,
    MissingFileError,
    SchemaError,
    build,
    open_bundle,
    verify,
)
from firmware_bundles.manifest import Manifest
from firmware_bundles.signing import Envelope
from hil.micro_runtime import MicroRuntime
from tests.agent.onnx_models import _model, classifier
from tests.conftest import Keys, manifest_draft

SCALE, ZERO = 0.05, 3


def qdq_classifier() -> bytes:
    """input [N, 4] -> QuantizeLinear -> DequantizeLinear -> MatMul -> Softmax [N, 3]."""
    weights = np.zeros((4, 3), np.float32)
    weights[0, 0] = weights[1, 1] = weights[2, 2] = 1.0
    return _model(
        [
            helper.make_node("QuantizeLinear", ["input", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"]),
            helper.make_node("MatMul", ["x", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3])],
        [
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(np.array(SCALE, np.float32), "s"),
            numpy_helper.from_array(np.array(ZERO, np.int8), "z"),
        ],
    )


X = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)


def v2_bundle(keys: Keys, model: bytes, *, tamper: bool = False) -> bytes:
    """A format-2 bundle of ``model`` with the converter's own self-test vectors."""
    test, data = self_test(model, X, "float32", quantised=input_quantisation(model))
    if tamper:  # the last expected value, changed, and signed as if it were right
        data = data[:-4] + np.float32(0.123).tobytes()
    draft = manifest_draft(
        {"model.onnx": model},
        format=2,
        self_test=test,
        outputs=[
            {
                "name": "probabilities",
                "dtype": "float32",
                "shape": [None, 3],
                "class_labels": ["rest", "walk", "run"],
            }
        ],
    )
    return build(draft, {"model.onnx": model, test["file"]: data}, keys.release)


def test_quantised_input_is_stored_in_the_models_input_type(keys: Keys) -> None:
    model = qdq_classifier()
    quantised = input_quantisation(model)
    assert quantised is not None and quantised.dtype == "int8" and quantised.zero_point == ZERO
    assert input_quantisation(classifier()) is None  # a float input stays float32
    manifest = open_bundle(v2_bundle(keys, model)).manifest
    layout = manifest.self_test.inputs[0]  # type: ignore[union-attr]
    assert (layout.dtype, layout.scale, layout.zero_point) == ("int8", pytest.approx(SCALE), ZERO)
    assert manifest.file("self_test.bin").length == 3 * (4 * 1 + 3 * 4)


@pytest.mark.parametrize("make", [classifier, qdq_classifier], ids=["float", "qdq-int8"])
def test_agent_and_ring_runtimes_pass_the_vectors_exactly(keys: Keys, root: Any, make: Any) -> None:
    model = make()
    bundle = verify(v2_bundle(keys, model), root)
    manifest = bundle.manifest
    assert manifest.format == 2 and len(manifest.self_test.vectors) == 3
    agent = ModelRuntime().load("k", manifest, model).self_test(manifest)
    assert agent.passed and agent.vectors == 3 and agent.worst_error == 0.0, agent.detail
    ring = MicroRuntime(manifest, model).self_test()
    assert ring.passed and ring.worst_error == 0.0, ring.detail


def test_a_wrong_expected_value_fails_the_self_test(keys: Keys, root: Any) -> None:
    model = qdq_classifier()
    manifest = verify(v2_bundle(keys, model, tamper=True), root).manifest
    result = ModelRuntime().load("k", manifest, model).self_test(manifest)
    assert not result.passed and "vector 2" in result.detail


def test_a_changed_self_test_file_is_refused_by_its_hash(keys: Keys, root: Any) -> None:
    data = bytearray(v2_bundle(keys, qdq_classifier()))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        data[tar.getmember("self_test.bin").offset_data] ^= 1
    with pytest.raises(HashMismatchError, match=r"self_test\.bin"):
        verify(bytes(data), root)


def test_vectors_are_only_read_from_the_bundle(keys: Keys) -> None:
    contents = open_bundle(v2_bundle(keys, classifier()))
    alone = Manifest.from_dict(contents.envelope.signed)
    with pytest.raises(MissingFileError, match="read the bundle"):
        _ = alone.self_test.vectors
    assert alone == contents.manifest  # decoded vectors do not change what the manifest is


def _draft_v2(**changes: Any) -> dict[str, Any]:
    test, data = self_test(classifier(), X, "float32")
    draft = manifest_draft(format=2, self_test=test)
    files = {"model.onnx": b"m", "self_test.bin": data}
    from firmware_bundles.bundle import file_entries

    return {**draft, "files": file_entries(files), **changes}


BAD_MANIFESTS = [
    ("v2-with-json-vectors", {"self_test": manifest_draft()["self_test"]}, "in a file"),
    ("v1-with-a-file", {"format": 1}, "format 1 keeps"),
    (
        "file-length-disagrees",
        {
            "files": [
                {"path": "model.onnx", "sha256": "0" * 64, "length": 1},
                {"path": "self_test.bin", "sha256": "0" * 64, "length": 7},
            ]
        },
        "7 bytes",
    ),
    ("format-4", {"format": 4}, "format"),
]


@pytest.mark.parametrize(
    ("changes", "message"), [b[1:] for b in BAD_MANIFESTS], ids=[b[0] for b in BAD_MANIFESTS]
)
def test_inconsistent_self_test_is_a_schema_error(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        Manifest.from_dict(_draft_v2(**changes))


def test_format_2_manifest_leaves_defaults_out_and_reads_back_the_same(keys: Keys) -> None:
    contents = open_bundle(v2_bundle(keys, classifier()))
    signed = contents.envelope.signed
    assert "feature_names" not in str(signed) and "categories" not in str(
        signed["reference_histograms"]["inputs"]
    )
    assert Manifest.from_dict(signed).to_dict() == signed
    assert isinstance(Envelope.from_bytes(contents.envelope.to_bytes()), Envelope)
