"""The telemetry formats' own checks: counts, floats, sketch bin keys, and a window's layout
against its manifest; and the shared window builder's round trip."""

from __future__ import annotations

import json
import math
from copy import deepcopy
from typing import Any

import pytest

from firmware_bundles import telemetry as sketch
from firmware_bundles.bundle import file_entries
from firmware_bundles.errors import SchemaError
from firmware_bundles.manifest import Manifest
from firmware_bundles.messages import LatencySketch, TelemetryBatch, TelemetryWindow
from firmware_bundles.signing import parse_json
from firmware_bundles.window_builder import TelemetryLayout, TelemetryWindowBuilder
from tests.conftest import MODEL_BYTES, manifest_draft


def builder() -> TelemetryWindowBuilder:
    window = TelemetryWindowBuilder(
        "dev-1", "wrist-activity", "1.2.3", "a" * 64, 1_772_323_200, 3600
    )
    for value in (0.001, 0.002, 0.0, 0.5):
        window.count_inference(value)
    window.count_error()
    window.add_counts("outputs", "label", [2, 1, 1])
    window.add_counts("inputs", "x0", [0, 4, 0])
    window.count_feedback("thumbs_up")
    window.count_label("move", "rest")
    window.count_label("rest")
    return window


def good() -> dict[str, Any]:
    return builder().to_dict()


def _set(path: str, value: Any) -> Any:
    def change(window: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = window
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return change


BAD: list[tuple[Any, str]] = [
    (_set("inference_count", -1), "inference_count"),
    (_set("inference_count", True), "inference_count"),
    (_set("inference_count", 2.0), "inference_count"),
    (_set("inference_count", "5"), "inference_count"),
    (_set("error_count", 2**31), "error_count"),
    (_set("latency/bins", {"-345": -1}), "latency.bins.-345"),
    (_set("latency/bins", {str(10**6): 1}), "latency.bins.1000000.[key]"),
    (_set("latency/bins", {"-2000": 1}), "latency"),  # in the type's range, not at 1%
    (_set("latency/zero_count", 7), "latency"),  # count is no longer the bins' total
    (_set("latency/sum", math.inf), "latency.sum"),
    (_set("latency/sum", math.nan), "latency.sum"),
    (_set("latency/sum", -1.0), "latency.sum"),
    (_set("latency/max", 1e300), "latency.max"),
    (_set("latency/min", None), "latency"),
    (_set("latency/relative_accuracy", 1e-6), "latency.relative_accuracy"),
    (_set("outputs/0/counts", [1, -1, 0]), "outputs.0.counts.1"),
    (lambda w: w["outputs"].append({"name": "label", "counts": [0, 0, 0]}), "(document)"),
    (_set("feedback", {"thumbs_up": -1}), "feedback.thumbs_up"),
    (_set("feedback", {"two words": 1}), "feedback.two words.[key]"),
    (_set("labels", {"rest": {"move": -1}}), "labels.rest.move"),
]


@pytest.mark.parametrize(
    ("change", "field"),
    BAD,
    ids=[
        "negative-count",
        "bool-count",
        "float-count",
        "string-count",
        "count-over-32-bit",
        "negative-bin-count",
        "bin-key-10**6",
        "bin-key-out-of-range-for-accuracy",
        "sketch-count-mismatch",
        "inf-sum",
        "nan-sum",
        "negative-sum",
        "huge-max",
        "min-missing",
        "accuracy-too-fine",
        "negative-histogram-count",
        "duplicate-histogram",
        "negative-feedback",
        "feedback-kind-not-a-name",
        "negative-label-tally",
    ],
)
def test_a_bad_window_is_refused_naming_the_field(change: Any, field: str) -> None:
    window = deepcopy(good())
    change(window)
    with pytest.raises(SchemaError) as caught:
        TelemetryWindow.from_dict(window)
    assert any(f == field or f.endswith(field) for f in caught.value.fields), caught.value.fields


def test_1e999_in_json_text_is_refused_as_not_finite() -> None:
    batch = {"device_id": "dev-1", "boot_epoch": 0, "sequence": 0, "windows": [good()]}
    text = json.dumps(batch).replace('"sum": 0.503', '"sum": 1e999')
    assert math.isinf(parse_json(text.encode(), "x")["windows"][0]["latency"]["sum"])
    with pytest.raises(SchemaError) as caught:
        TelemetryBatch.from_bytes(text.encode())
    assert "windows.0.latency.sum" in caught.value.fields
    assert "finite" in str(caught.value)


def test_bin_key_bounds_keep_every_representative_value_finite() -> None:
    for accuracy in (sketch.MIN_RELATIVE_ACCURACY, 0.01, 0.5):
        low, high = sketch.bin_key_bounds(accuracy)
        assert low >= sketch.BIN_KEY_MIN and high <= sketch.BIN_KEY_MAX
        assert sketch.bucket(sketch.MAX_LATENCY_S, accuracy) == high
        assert sketch.bucket(sketch.MIN_POSITIVE * (1 + 1e-12), accuracy) >= low
        gamma = (1 + accuracy) / (1 - accuracy)
        for key in (low, high):
            assert 0 < 2 * gamma**key / (gamma + 1) < math.inf
    # A huge latency is clamped, so even it lands inside the bounds and reads back.
    huge = sketch.new_sketch()
    sketch.add(huge, 1e300)
    assert LatencySketch.from_dict(huge).max == sketch.MAX_LATENCY_S
    assert sketch.quantile(huge, 0.5) == pytest.approx(sketch.MAX_LATENCY_S, rel=0.01)
    with pytest.raises(ValueError, match="NaN"):
        sketch.add(huge, math.nan)


def test_the_builder_round_trips_through_the_validated_message() -> None:
    built = builder()
    window = built.to_window()
    assert window.inference_count == 5 and window.error_count == 1
    assert window.latency.count == 4 and window.latency.zero_count == 1
    assert window.labels == {"rest": {"move": 1}, "unknown": {"rest": 1}}
    again = TelemetryWindowBuilder.from_window(window)
    assert again.to_dict() == built.to_dict()
    assert TelemetryWindow.from_bytes(window.to_bytes()) == window


def layout(**overrides: Any) -> TelemetryLayout:
    draft = manifest_draft(**overrides)
    return TelemetryLayout.of(
        Manifest.from_dict({**draft, "files": file_entries({"model.onnx": MODEL_BYTES})})
    )


def test_a_window_is_checked_against_its_manifest_layout() -> None:
    checked = layout()
    assert checked.outputs == {"label": 3} and checked.inputs == {"x0": 3}
    assert checked.classes == frozenset({"rest", "move"})
    assert checked.problems(builder().to_window()) == []
    wrong = builder()
    wrong.outputs["label"] = [1, 1, 1, 1]
    wrong.inputs["x9"] = [1]
    wrong.count_label("jump", "fly")
    wrong.version = "9.9.9"
    problems = " | ".join(checked.problems(wrong.to_window()))
    assert "has 4 counts, the bundle's manifest gives it 3" in problems
    assert "no histogram 'x9'" in problems
    assert "'fly' is not a class" in problems and "'jump' is not a class" in problems
    assert "9.9.9" in problems
    # Without reference output histograms, a float output with class labels is counted by argmax.
    fallback = layout(reference_histograms={"inputs": [], "outputs": []})
    assert fallback.outputs == {"probabilities": 3}
