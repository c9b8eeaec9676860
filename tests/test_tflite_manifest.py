"""Manifest format 2 for ``.tflite`` bundles: self-test vectors in ``self_test.bin``, with the
float original's outputs beside the model's own, read back by TFLM on the emulated ring.

Real TFLM (tflite-micro) runs the sample's float32 ``.tflite``; the quantised inputs are checked
with an int16 layout, the type of an int16x8 ``.tflite`` input.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from firmware_bundles import SchemaError, build, open_bundle
from firmware_bundles.manifest import SelfTestFile
from firmware_bundles.selftest import decode_tensor
from hil.samples import (
    float_original,
    heldout,
    sample_bundle,
    sample_draft,
    sample_model,
    sample_tflite,
)
from hil.samples import sample_self_test as make_self_test
from hil.tflm_runtime import TflmRuntime
from tests.conftest import Keys

RING = ["ring-gen3"]


def test_ring_sample_is_format_2_with_the_float_originals_outputs(keys: Keys) -> None:
    contents = open_bundle(sample_bundle(keys.release, RING))
    manifest = contents.manifest
    test = manifest.self_test
    assert manifest.format == 2 and manifest.runtime.format == "tflite"
    assert isinstance(test, SelfTestFile) and "self_test.bin" in contents.files
    assert [t.name for t in test.float_outputs] == ["probabilities"]
    assert test.float_tolerance == 1e-5
    # 3 vectors of 4 input floats, 3 expected and 3 float-original probabilities.
    assert len(contents.files["self_test.bin"]) == 3 * (4 + 3 + 3) * 4
    model = sample_model(0)
    x = heldout(400, seed=7)[0][:3]
    want = float_original(model, x)
    got = np.asarray([v["probabilities"][0] for v in test.float_vectors], np.float32)
    np.testing.assert_array_equal(got, want)
    # The expected outputs are TFLM's, and the device's TFLM gives them exactly.
    runtime = TflmRuntime(manifest, sample_tflite(model), 65536)
    result = runtime.self_test()
    assert result.passed and result.worst_error == 0.0, result.detail


def test_manifest_text_leaves_out_float_fields_it_does_not_use(keys: Keys) -> None:
    draft = sample_draft(sample_model(0), ["phone-android"])
    assert draft["format"] == 1 and "float_outputs" not in draft["self_test"]
    onnx_sample = open_bundle(sample_bundle(keys.release, ["phone-android"]))
    assert b"float_" not in onnx_sample.envelope.to_bytes()


def test_int16_input_decodes_with_its_scale() -> None:
    layout = SelfTestFile.from_dict(
        {
            "tolerance": 0.002,
            "file": "self_test.bin",
            "count": 1,
            "inputs": [
                {"name": "input", "dtype": "int16", "shape": [1, 2], "scale": 0.5, "zero_point": 0}
            ],
            "expected": [{"name": "p", "dtype": "float32", "shape": [1, 1]}],
        }
    )
    raw = np.asarray([[-3, 7]], "<i2").tobytes()
    assert decode_tensor(layout.inputs[0], raw) == [[-1.5, 3.5]]
    assert layout.vector_bytes == 4 + 4


def _ring_draft(**self_test: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    model = sample_model(0)
    draft = sample_draft(model, RING)
    test, data = make_self_test(model)
    draft["self_test"] = {**test, **self_test}
    return draft, {"model.tflite": sample_tflite(model), "self_test.bin": data}


BAD_SELF_TESTS: list[tuple[str, dict[str, Any], str]] = [
    ("float-outputs-without-tolerance", {"float_tolerance": None}, "come together"),
    ("tolerance-without-float-outputs", {"float_outputs": []}, "come together"),
    (
        "float-output-not-an-output",
        {"float_outputs": [{"name": "logits", "dtype": "float32", "shape": [1, 3]}]},
        "float output 'logits' is not an expected output",
    ),
    (
        "file-without-room-for-float-outputs",
        {"count": 4},
        "self_test.file 'self_test.bin' is 120 bytes; 4 vectors of 40 bytes need 160",
    ),
    (
        "scale-on-a-float-tensor",
        {"inputs": [{"name": "input", "dtype": "float32", "shape": [1, 4], "scale": 0.1}]},
        "only int8, uint8 and int16 tensors take a scale",
    ),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_SELF_TESTS, ids=lambda c: str(c)[:40])
def test_bad_tflite_self_test_is_refused_naming_it(
    keys: Keys, case: str, change: dict[str, Any], message: str
) -> None:
    draft, files = _ring_draft(**change)
    with pytest.raises(SchemaError, match=re.escape(message)):
        build(draft, files, keys.release)


def test_a_tflite_runtime_needs_manifest_format_2(keys: Keys) -> None:
    draft, files = _ring_draft()
    draft["format"] = 1
    message = 'runtime.format "tflite" needs manifest format 2'
    with pytest.raises(SchemaError, match=re.escape(message)):
        build(draft, files, keys.release)
