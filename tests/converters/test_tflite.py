"""Micro targets get .tflite bundles: onnx2tf in the tool environment, scored in real TFLM."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from converters.pipeline import ConvertOptions, ConvertReport, convert
from converters.tflite import ToolEnvMissing, tool_python
from firmware_bundles import SigningKey, TargetCatalogue, open_bundle
from hil.tflm_runtime import measure_arena
from tests.converters.conftest import EXAMPLES

BUILD_TIME = datetime(2026, 1, 1, tzinfo=UTC)


def _convert(
    example: str, directory: Path, keys: list[SigningKey], out: Path, targets: list[str]
) -> ConvertReport:
    options = ConvertOptions(
        name=example,
        version="1.0.0",
        targets=targets,
        keys=keys,
        out_dir=out,
        created_at=BUILD_TIME,
    )
    return convert(
        directory / EXAMPLES[example][1],
        directory / "train.npz",
        directory / "eval.npz",
        options,
        directory / "calibration.npz",
    )


@pytest.fixture(scope="module")
def digits(
    examples: dict[str, Path],
    release_keys: list[SigningKey],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[ConvertReport, ConvertReport]:
    first = _convert(
        "digits-mlp",
        examples["digits-mlp"],
        release_keys,
        tmp_path_factory.mktemp("a"),
        ["ring-gen3"],
    )
    second = _convert(
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
    assert manifest.format == 2 and manifest.runtime.format == "tflite"
    tflite = manifest.runtime.tflite
    assert tflite is not None and tflite.input.dtype == "int8"
    assert tflite.input.quantisation is not None and tflite.output.quantisation is not None
    model = bytes(contents.files["model.tflite"])
    # The recorded arena is what TFLM allocates for the bundled file, not an estimate.
    assert manifest.runtime.ram_estimate.bytes == measure_arena(model)
    assert "TFLM" in manifest.runtime.ram_estimate.method
    target = TargetCatalogue.load_default().get("ring-gen3")
    assert all(target.allows_op(op) for op in manifest.runtime.op_types)
    assert "FULLY_CONNECTED" in manifest.runtime.op_types


def test_converting_twice_gives_identical_tflite_bundles(
    digits: tuple[ConvertReport, ConvertReport],
) -> None:
    one, two = (Path(r.targets[0].bundle or "").read_bytes() for r in digits)
    assert one == two


def test_forest_reaches_ring_gen4_within_the_budget(
    examples: dict[str, Path], release_keys: list[SigningKey], tmp_path: Path
) -> None:
    report = _convert(
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
