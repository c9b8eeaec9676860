"""Micro targets get .tflite bundles: onnx2tf in the tool environment, scored in real TFLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from converters.reports import ConvertReport
from converters.tflite import ToolEnvMissing, tool_python
from firmware_bundles import SigningKey, TargetCatalogue, open_bundle
from firmware_bundles.manifest import SelfTestFile
from hil.tflm_runtime import TflmRuntime, measure_arena
from tests.converters.conftest import convert_example


@pytest.fixture(scope="module")
def digits(
    examples: dict[str, Path],
    release_keys: list[SigningKey],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ConvertReport, ConvertReport]:
    first = convert_example(
        "digits-mlp",
        examples["digits-mlp"],
        release_keys,
        tmp_path_factory.mktemp("a"),
        ["ring-gen3"],
    )
    second = convert_example(
        "digits-mlp",
        examples["digits-mlp"],
        release_keys,
        tmp_path_factory.mktemp("b"),
        ["ring-gen3"],
    )
    return first, second


def test_ring_bundle_is_full_integer_tflite_within_budget(
    digits: tuple[ConvertReport, ConvertReport],
) -> None:
    report = digits[0]
    ring = report.targets[0]
    assert ring.ok and ring.variant == "tflite-int8", ring.reason
    variants = {v.name: v for v in report.variants}
    assert ring.model_bytes is not None
    assert ring.model_bytes <= 0.42 * variants["tflite-float32"].model_bytes
    assert ring.metric is not None and report.float_metric - ring.metric <= 0.01
    contents = open_bundle(Path(ring.bundle or "").read_bytes())
    manifest = contents.manifest
    assert manifest.format == 3 and manifest.runtime.format == "tflite"
    tflite = manifest.runtime.tflite
    assert tflite is not None and tflite.input.dtype == "int8"
    assert tflite.input.quantisation is not None and tflite.output.quantisation is not None
    model = bytes(contents.files["model.tflite"])
    # The recorded arena is what TFLM allocates for the bundled file, not an estimate.
    assert manifest.runtime.ram_estimate.bytes == measure_arena(model)
    assert manifest.runtime.ram_estimate.method == "tflm-arena-allocation-total/1"
    target = TargetCatalogue.load_default().get("ring-gen3")
    assert all(target.allows_op(op) for op in manifest.runtime.op_types)
    assert "FULLY_CONNECTED" in manifest.runtime.op_types


def test_ring_self_test_is_in_the_file_in_the_models_input_type_with_float_outputs(
    digits: tuple[ConvertReport, ConvertReport],
) -> None:
    contents = open_bundle(Path(digits[0].targets[0].bundle or "").read_bytes())
    manifest = contents.manifest
    test, tflite = manifest.self_test, manifest.runtime.tflite
    assert isinstance(test, SelfTestFile) and tflite is not None
    assert tflite.input.quantisation is not None
    # Inputs stored as the .tflite's int8, with its own scale and zero point: a byte an element.
    stored = test.inputs[0]
    assert (stored.dtype, stored.shape) == ("int8", [1, 64])
    assert stored.scale == tflite.input.quantisation.scale
    assert stored.zero_point == tflite.input.quantisation.zero_point
    assert len(contents.files["self_test.bin"]) == 3 * (64 + 10 * 4 * 2)
    # The float original's outputs ride along, and the int8 model stays within float_tolerance.
    assert [t.name for t in test.float_outputs] == ["probabilities"]
    assert test.float_tolerance is not None and test.float_tolerance >= test.tolerance
    worst = max(
        float(np.abs(np.asarray(v.expected["probabilities"]) - f["probabilities"]).max())
        for v, f in zip(test.vectors, test.float_vectors, strict=True)
    )
    assert 0 < worst <= test.float_tolerance
    # The ring's TFLM reproduces the expected outputs exactly from the stored integers.
    runtime = TflmRuntime(manifest, bytes(contents.files["model.tflite"]), 65536)
    result = runtime.self_test()
    assert result.passed and result.worst_error == 0.0, result.detail


def test_converting_twice_gives_identical_tflite_bundles(
    digits: tuple[ConvertReport, ConvertReport],
) -> None:
    one, two = (Path(r.targets[0].bundle or "").read_bytes() for r in digits)
    assert one == two
    # And the reference histograms a ring bundle detaches, written beside it.
    one, two = (Path(r.targets[0].reference or "").read_bytes() for r in digits)
    assert one == two and one[:4] == b"EFRH"


def test_forest_reaches_ring_gen4_within_the_budget(
    examples: dict[str, Path], release_keys: list[SigningKey], tmp_path: Path
) -> None:
    report = convert_example(
        "cancer-trees", examples["cancer-trees"], release_keys, tmp_path, ["ring-gen4"]
    )
    ring = report.targets[0]
    assert ring.ok, ring.reason
    assert ring.metric is not None and report.float_metric - ring.metric <= 0.01
    manifest = open_bundle(Path(ring.bundle or "").read_bytes()).manifest
    assert "GATHER" in manifest.runtime.op_types
    assert manifest.runtime.ram_estimate.bytes <= 131072


def test_missing_tool_env_names_the_make_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_TFLITE_PYTHON", "/nonexistent/python")
    with pytest.raises(ToolEnvMissing, match="make tflite-env"):
        tool_python()
