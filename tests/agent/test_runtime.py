"""ONNX Runtime on the device: schema checks, accepted input forms, session cache, self-test."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from device_agent.errors import InferenceError, InputError, InstallError
from device_agent.runtime import ModelRuntime
from tests.agent import onnx_models as m

X = np.array([[0.5, -1.0, 2.0, 7.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def classifier() -> Any:
    return m.load(m.classifier(), m.classifier_manifest())


@pytest.fixture(scope="module")
def channels() -> Any:
    manifest = m.manifest(
        m.channels(),
        inputs=[{"name": "window", "dtype": "float32", "shape": [None, 2, 8]}],
        outputs=[{"name": "prediction", "dtype": "float32", "shape": [None, 1]}],
        task="regression",
    )
    return m.load(m.channels(), manifest)


@pytest.fixture(scope="module")
def two_inputs() -> Any:
    manifest = m.manifest(
        m.two_inputs(),
        inputs=[
            {"name": "a", "dtype": "float32", "shape": [None, 3]},
            {"name": "b", "dtype": "int64", "shape": [None, 1]},
        ],
        outputs=[{"name": "total", "dtype": "float32", "shape": [None, 1]}],
        task="regression",
    )
    return m.load(m.two_inputs(), manifest)


A = np.ones((1, 3), np.float32)
B = np.ones((1, 1), np.int64)

#: (model fixture, inputs, input named in the error, expected says, got says)
BAD_INPUTS = [
    ("classifier", X.astype(np.float64), "input", "dtype float32", "dtype float64"),
    ("classifier", X.astype(np.int64), "input", "dtype float32", "dtype int64"),
    ("classifier", np.zeros((1, 10), np.float32), "input", "4 features", "10 features"),
    ("classifier", np.zeros(4, np.float32), "input", "add the batch axis", "shape (4,)"),
    ("classifier", np.zeros((1, 1, 4), np.float32), "input", "shape (N, 4)", "(1, 1, 4)"),
    ("classifier", [[1.0, 2.0, 3.0]], "input", "4 features", "3 features"),
    ("classifier", [[1.0, 2.0], [3.0]], "input", "rectangular", "ragged"),
    ("classifier", [["a", "b", "c", "d"]], "input", "float32 values", "<U1"),
    ("classifier", {"inputs": X}, "inputs", "one of the model's inputs (input)", "unknown"),
    ("classifier", None, "input", "a numpy array or nested lists", "NoneType"),
    ("channels", np.zeros((1, 2, 7), np.float32), "window", "8 on axis 2", "7 on axis 2"),
    ("channels", np.zeros((1, 3, 8), np.float32), "window", "2 on axis 1", "3 on axis 1"),
    ("two_inputs", {"a": A}, "b", "a value for every input (a, b)", "no value for 'b'"),
    ("two_inputs", {"a": A, "b": B, "c": B}, "c", "one of the model's inputs", "'c'"),
    ("two_inputs", {"a": A, "b": B.astype(np.int32)}, "b", "dtype int64", "dtype int32"),
    ("two_inputs", {"a": A, "b": [[1.5]]}, "b", "int64 values", "float64"),
    ("two_inputs", A, "a, b", "a mapping of input name to array", "ndarray"),
]


@pytest.mark.parametrize(
    ("fixture", "inputs", "name", "expected", "got"),
    BAD_INPUTS,
    ids=[
        "float64-array",
        "int64-array",
        "feature-count",
        "missing-batch-axis",
        "extra-axis",
        "feature-count-json",
        "ragged-json",
        "strings-for-floats",
        "unknown-name",
        "none",
        "channel-length",
        "channel-count",
        "missing-input",
        "unknown-input",
        "int32-for-int64",
        "floats-for-int64-json",
        "array-for-two-inputs",
    ],
)
def test_bad_inputs_name_the_input_and_what_was_expected(
    request: pytest.FixtureRequest,
    fixture: str,
    inputs: Any,
    name: str,
    expected: str,
    got: str,
) -> None:
    model = request.getfixturevalue(fixture)
    with pytest.raises(InputError) as caught:
        model.run(inputs)
    error = caught.value
    assert error.model == "gesture"
    assert error.input == name
    assert expected in error.expected
    assert got in error.got
    assert f"'{name}'" in str(error)


def test_the_feature_count_message_reads_as_a_sentence(classifier: Any) -> None:
    with pytest.raises(InputError, match="expected 4 features per row, got 10 features per row"):
        classifier.run(np.zeros((1, 10), np.float32))


def test_every_accepted_form_gives_the_bare_onnx_runtime_answer(
    classifier: Any, two_inputs: Any
) -> None:
    bare = m.ort_run(m.classifier(), {"input": X})[0]
    for form in (X, {"input": X}, X.tolist(), {"input": X.tolist()}, X[:, :].copy(order="F")):
        out = classifier.run(form)
        assert list(out) == ["probabilities"]
        np.testing.assert_array_equal(out["probabilities"], bare)
    assert np.argmax(bare) == 2  # softmax of the first three features
    # JSON integers are fine for a float input; int lists become int64.
    out = two_inputs.run({"a": [[1, 2, 3]], "b": [[4]]})
    np.testing.assert_array_equal(out["total"], [[10.0]])
    batch = np.repeat(X, 5, axis=0)
    np.testing.assert_array_equal(classifier.run(batch)["probabilities"], np.repeat(bare, 5, 0))


def test_string_inputs_take_lists_str_arrays_and_object_arrays() -> None:
    manifest = m.manifest(
        m.strings(),
        inputs=[{"name": "name", "dtype": "string", "shape": [None, 1]}],
        outputs=[{"name": "same", "dtype": "string", "shape": [None, 1]}],
    )
    model = m.load(m.strings(), manifest)
    for form in ([["walk"]], np.array([["walk"]]), np.array([["walk"]], dtype=object)):
        assert model.run(form)["same"].tolist() == [["walk"]]
    with pytest.raises(InputError, match="string values"):
        model.run([[1.5]])
    with pytest.raises(InputError, match="dtype float32"):
        model.run(np.zeros((1, 1), np.float32))


def test_nan_inputs_are_allowed_through(classifier: Any) -> None:
    """NaN is not checked (a model may handle it; checking costs more than a small model)."""
    out = classifier.run(np.array([[math.nan, 0.0, 0.0, 0.0]], np.float32))
    assert np.isnan(out["probabilities"]).all()


def test_onnx_runtime_failures_become_inference_errors() -> None:
    manifest = m.manifest(
        m.reshape_to_2x2(),
        inputs=[{"name": "input", "dtype": "float32", "shape": [None, 4]}],
        outputs=[{"name": "out", "dtype": "float32", "shape": [2, 2]}],
        task="regression",
    )
    model = m.load(m.reshape_to_2x2(), manifest)
    assert model.run(X)["out"].shape == (2, 2)
    with pytest.raises(InferenceError) as caught:
        model.run(np.zeros((3, 4), np.float32))
    assert caught.value.model == "gesture"
    assert "reshape" in caught.value.detail.lower()


def test_sessions_are_cached_per_bundle_with_one_thread() -> None:
    runtime = ModelRuntime()
    manifest = m.classifier_manifest()
    first = runtime.load("a" * 64, manifest, m.classifier())
    assert runtime.load("a" * 64, manifest, b"not even read") is first
    other = runtime.load("b" * 64, manifest, m.classifier())
    assert other is not first
    assert sorted(runtime.keys()) == ["a" * 64, "b" * 64]
    assert first.session.get_session_options().intra_op_num_threads == 1
    runtime.unload("a" * 64)
    assert runtime.get("a" * 64) is None
    assert runtime.load("a" * 64, manifest, m.classifier()) is not first
    assert (
        ModelRuntime(ort_threads=2)
        .load("c" * 64, manifest, m.classifier())
        .session.get_session_options()
        .intra_op_num_threads
        == 2
    )


BAD_MODELS = [
    (b"\x00not onnx", {}, "cannot load the model"),
    (m.classifier(), {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}]}, "'x'"),
    (
        m.classifier(),
        {"inputs": [{"name": "input", "dtype": "int64", "shape": [None, 4]}]},
        "tensor(float) in the graph, int64 in the manifest",
    ),
    (
        m.classifier(),
        {"outputs": [{"name": "scores", "dtype": "float32", "shape": [None, 3]}]},
        "output 'scores' is not in the graph",
    ),
]


@pytest.mark.parametrize(
    ("model", "overrides", "reason"),
    BAD_MODELS,
    ids=["not-onnx", "input-renamed", "input-dtype", "output-renamed"],
)
def test_a_model_that_disagrees_with_its_manifest_does_not_load(
    model: bytes, overrides: dict[str, Any], reason: str
) -> None:
    manifest = m.classifier_manifest(**overrides)
    with pytest.raises(InstallError, match="gesture") as caught:
        ModelRuntime().load("d" * 64, manifest, model)
    assert reason in str(caught.value)
    assert caught.value.model == "gesture"


def _vectors(shift: float = 0.0, shape_ok: bool = True) -> list[dict[str, Any]]:
    vectors = []
    for row in np.random.default_rng(3).normal(0, 1, (3, 1, 4)).astype(np.float32):
        expected = m.ort_run(m.classifier(), {"input": row})[0] + shift
        inputs = row.tolist() if shape_ok else row[:, :3].tolist()
        vectors.append(
            {"inputs": {"input": inputs}, "expected": {"probabilities": expected.tolist()}}
        )
    return vectors


def test_self_test_passes_on_the_vectors_onnx_runtime_gave() -> None:
    model = m.load(m.classifier(), m.classifier_manifest(vectors=_vectors()))
    result = model.self_test()
    assert result.passed, result.detail
    assert result.vectors == 3
    assert result.worst_error <= 1e-6


@pytest.mark.parametrize(
    ("vectors", "tolerance", "detail"),
    [
        (_vectors(shift=0.01), 1e-4, "differs by 0.01, over the tolerance 0.0001"),
        (_vectors(shape_ok=False), 1e-4, "vector 0: gesture: input 'input' expected 4 features"),
        (
            [{"inputs": {"input": [[0, 0, 0, 0]]}, "expected": {"scores": [[0, 0, 0]]}}],
            1e-4,
            "no output 'scores'",
        ),
        (
            [{"inputs": {"input": [[0, 0, 0, 0]]}, "expected": {"probabilities": [[0.3, 0.3]]}}],
            1e-4,
            "has shape (1, 3), the self-test expects (1, 2)",
        ),
    ],
    ids=["over-tolerance", "bad-vector-input", "unknown-output", "wrong-shape"],
)
def test_self_test_fails_and_says_why(
    vectors: list[dict[str, Any]], tolerance: float, detail: str
) -> None:
    model = m.load(m.classifier(), m.classifier_manifest(vectors=vectors, tolerance=tolerance))
    result = model.self_test()
    assert not result.passed
    assert detail in result.detail


def test_self_test_uses_the_tolerance_of_the_manifest_it_is_given() -> None:
    vectors = _vectors(shift=0.01)
    model = m.load(m.classifier(), m.classifier_manifest(vectors=vectors))
    assert not model.self_test().passed
    loose = m.classifier_manifest(vectors=vectors, tolerance=0.02)
    result = model.self_test(loose)
    assert result.passed
    assert 0.0099 < result.worst_error < 0.0101
