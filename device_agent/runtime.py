"""ONNX Runtime inference on the device: sessions cached per bundle, inputs checked on the schema.

The manifest's input schema is compiled once per loaded model into plain tuples (numpy dtype,
rank, fixed dimensions), so the per-call check is a few identity and tuple comparisons; pydantic
never runs on the hot path. Inputs may be one ndarray (single-input models), a mapping of input
name to ndarray, or nested lists (JSON); lists are converted to the declared dtype, arrays must
already have it.

NaN and infinities are allowed through: sensors emit them and models may handle them (an imputer
in the graph); checking every value would cost more than the model on small inputs. Telemetry
counts a NaN input or regression output in the histogram's overflow bin.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from device_agent.errors import InferenceError, InputError, InstallError
from firmware_bundles.manifest import Manifest, TensorSpec

_NP_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "string": np.dtype(object),
}
#: ONNX Runtime's type strings for the manifest's dtypes (to check a manifest against its graph).
_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
    "int8": "tensor(int8)",
    "uint8": "tensor(uint8)",
    "bool": "tensor(bool)",
    "string": "tensor(string)",
}
#: Which numpy kinds of a JSON-derived array may be converted to each declared dtype kind.
_JSON_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b", "O": "UO"}
#: Accepted shapes are remembered per input so the usual call is one set lookup; bounded so a
#: caller varying the batch size cannot grow it without end.
_MAX_REMEMBERED_SHAPES = 32


class SelfTestResult(NamedTuple):
    """Outcome of running a manifest's self-test vectors."""

    passed: bool
    vectors: int
    worst_error: float
    detail: str


@dataclass(frozen=True)
class ModelIdentity:
    """Which model version telemetry is about."""

    name: str
    version: str
    bundle_sha256: str


def _shape_text(shape: Sequence[int | None]) -> str:
    dims = ", ".join("N" if d is None else str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


class _InputCheck:
    """One input's schema, compiled for a fast check."""

    __slots__ = ("dtype", "fixed", "model", "name", "ok_shapes", "rank", "shape", "spec_dtype")

    def __init__(self, model: str, spec: TensorSpec) -> None:
        self.model = model
        self.name = spec.name
        self.spec_dtype = spec.dtype
        self.dtype = _NP_DTYPES[spec.dtype]
        self.shape = tuple(spec.shape)
        self.rank = len(spec.shape)
        self.fixed = tuple((axis, d) for axis, d in enumerate(spec.shape) if d is not None)
        self.ok_shapes: set[tuple[int, ...]] = set()

    def error(self, expected: str, got: str) -> InputError:
        return InputError(self.model, self.name, expected, got)

    def array(self, value: Any) -> np.ndarray:
        """``value`` as an array of this input's dtype and shape.

        Raises:
            InputError: Naming what was expected and what came.
        """
        if isinstance(value, np.ndarray):
            array = value
            if value.dtype is not self.dtype and value.dtype != self.dtype:
                if self.dtype.kind != "O" or value.dtype.kind != "U":
                    raise self.error(f"dtype {self.spec_dtype}", f"dtype {value.dtype}")
                array = value.astype(object)  # numpy str arrays for a string input
        else:
            array = self._from_json(value)
        if array.shape not in self.ok_shapes:
            self._check_shape(array.shape)
        return array

    def _from_json(self, value: Any) -> np.ndarray:
        if not isinstance(value, list | tuple | int | float | bool | str):
            raise self.error(
                "a numpy array or nested lists", f"a value of type {type(value).__name__}"
            )
        try:
            raw = np.asarray(value)
        except ValueError as exc:  # ragged nested lists
            raise self.error(
                f"a rectangular array of shape {_shape_text(self.shape)}", "ragged nested lists"
            ) from exc
        allowed = _JSON_KINDS[self.dtype.kind]
        if raw.size and raw.dtype.kind not in allowed:
            raise self.error(f"{self.spec_dtype} values", f"values of numpy dtype {raw.dtype}")
        if self.dtype.kind in "iu" and raw.size:
            info = np.iinfo(self.dtype)
            if raw.min() < info.min or raw.max() > info.max:
                raise self.error(
                    f"{self.spec_dtype} values in [{info.min}, {info.max}]",
                    f"values in [{raw.min()}, {raw.max()}]",
                )
        return raw.astype(self.dtype, copy=False)

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        expected = _shape_text(self.shape)
        if len(shape) != self.rank:
            hint = " (add the batch axis)" if len(shape) == self.rank - 1 else ""
            raise self.error(f"shape {expected}{hint}", f"shape {_shape_text(shape)}")
        for axis, size in self.fixed:
            if shape[axis] != size:
                if self.rank == 2 and axis == 1:
                    raise self.error(f"{size} features per row", f"{shape[1]} features per row")
                raise self.error(
                    f"shape {expected} ({size} on axis {axis})",
                    f"shape {_shape_text(shape)} ({shape[axis]} on axis {axis})",
                )
        if len(self.ok_shapes) < _MAX_REMEMBERED_SHAPES:
            self.ok_shapes.add(shape)


class LoadedModel:
    """One bundle's model in an ONNX Runtime session, with its compiled input schema.

    Thread-safe: ONNX Runtime sessions accept concurrent ``run`` calls, and the schema check only
    adds to a set of accepted shapes.
    """

    def __init__(
        self, bundle_sha256: str, manifest: Manifest, session: ort.InferenceSession
    ) -> None:
        self.bundle_sha256 = bundle_sha256
        self.manifest = manifest
        self.name = manifest.name
        self.identity = ModelIdentity(manifest.name, manifest.version, bundle_sha256)
        self.session = session
        self._checks = [_InputCheck(manifest.name, spec) for spec in manifest.inputs]
        self._by_name = {check.name: check for check in self._checks}
        self._single = self._checks[0] if len(self._checks) == 1 else None
        self.input_names: tuple[str, ...] = tuple(self._by_name)
        self.output_names: tuple[str, ...] = tuple(o.name for o in session.get_outputs())
        names = list(self.output_names)
        # ONNX Runtime's Python ``run`` re-validates the feed (input names, OrtValue ownership,
        # graph capture) before calling its C++ session; ``check`` already did stricter checks on
        # numpy feeds, so the C++ call is made directly (about 0.8 us of a 16 us inference).
        binding = getattr(session, "_sess", None)
        run = binding.run if binding is not None and hasattr(binding, "run") else session.run
        #: ``run_feed(feed, None)`` runs a feed from :meth:`check` (outputs in
        #: :attr:`output_names` order) and raises ONNX Runtime's own errors; a C-level partial,
        #: so the hot path adds no Python frame.
        self.run_feed: Callable[[dict[str, np.ndarray], None], list[Any]] = functools.partial(
            run, names
        )
        #: The output's name when there is exactly one (the usual case), else None.
        self.single_output = self.output_names[0] if len(self.output_names) == 1 else None

    def check(self, inputs: Any) -> dict[str, np.ndarray]:
        """The ONNX Runtime feed for ``inputs``, checked against the manifest's input schema.

        Args:
            inputs: One ndarray or nested lists (single-input models), or a mapping of input
                name to ndarray or nested lists.

        Raises:
            InputError: Naming the input, what the model expects and what came: wrong dtype,
                shape or feature count, a missing or unknown input name, ragged lists.
        """
        single = self._single
        if single is not None and isinstance(inputs, np.ndarray):
            if inputs.dtype is single.dtype and inputs.shape in single.ok_shapes:
                return {single.name: inputs}
            return {single.name: single.array(inputs)}
        if isinstance(inputs, Mapping):
            return self._check_mapping(inputs)
        if single is not None:
            return {single.name: single.array(inputs)}
        names = ", ".join(self.input_names)
        raise InputError(
            self.name,
            names,
            f"a mapping of input name to array for inputs {names}",
            f"a value of type {type(inputs).__name__}",
        )

    def _check_mapping(self, inputs: Mapping[Any, Any]) -> dict[str, np.ndarray]:
        for key in inputs:
            if key not in self._by_name:
                raise InputError(
                    self.name,
                    str(key),
                    f"one of the model's inputs ({', '.join(self.input_names)})",
                    f"unknown input {key!r}",
                )
        feed = {}
        for check in self._checks:
            if check.name not in inputs:
                raise InputError(
                    self.name,
                    check.name,
                    f"a value for every input ({', '.join(self.input_names)})",
                    f"no value for {check.name!r}",
                )
            feed[check.name] = check.array(inputs[check.name])
        return feed

    def run_checked(self, feed: dict[str, np.ndarray]) -> list[Any]:
        """Run a feed returned by :meth:`check`; outputs in :attr:`output_names` order.

        Raises:
            InferenceError: If ONNX Runtime fails.
        """
        try:
            return self.run_feed(feed, None)
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InferenceError(self.name, str(exc)) from exc

    def run(self, inputs: Any) -> dict[str, np.ndarray]:
        """Check ``inputs`` (see :meth:`check`) and run the model.

        Raises:
            InputError: If the inputs do not match the schema.
            InferenceError: If ONNX Runtime fails.
        """
        return dict(zip(self.output_names, self.run_checked(self.check(inputs)), strict=True))

    def self_test(self, manifest: Manifest | None = None) -> SelfTestResult:
        """Run the manifest's self-test vectors and compare within its tolerance.

        Float outputs pass when every value is within the tolerance (absolute; NaN matches only
        NaN); other outputs must be equal. Never raises for a failing model: the result says why.
        """
        manifest = manifest or self.manifest
        tolerance = manifest.self_test.tolerance
        vectors = manifest.self_test.vectors
        if not vectors:
            return SelfTestResult(True, 0, 0.0, "the manifest has no self-test vectors")
        worst = 0.0
        for index, vector in enumerate(vectors):
            try:
                outputs = self.run(vector.inputs)
            except (InputError, InferenceError) as exc:
                return SelfTestResult(False, len(vectors), float("inf"), f"vector {index}: {exc}")
            for name, expected_list in vector.expected.items():
                problem, error = _compare(outputs.get(name), expected_list, name)
                worst = max(worst, error)
                if problem is None and error > tolerance:
                    problem = (
                        f"output {name!r} differs by {error:.3g}, over the tolerance {tolerance:g}"
                    )
                if problem is not None:
                    return SelfTestResult(False, len(vectors), worst, f"vector {index}: {problem}")
        return SelfTestResult(
            True, len(vectors), worst, f"{len(vectors)} vectors within {tolerance:g}"
        )


def _compare(
    actual: np.ndarray | None, expected_list: list[Any], name: str
) -> tuple[str | None, float]:
    """(problem or None, worst absolute error) of one output against its expected values."""
    if actual is None:
        return f"the model has no output {name!r}", float("inf")
    actual = np.asarray(actual)
    expected = np.asarray(expected_list)
    if expected.shape != actual.shape:
        return (
            f"output {name!r} has shape {actual.shape}, the self-test expects {expected.shape}",
            float("inf"),
        )
    if actual.dtype.kind in "fc" and expected.dtype.kind in "iufc":
        a, e = actual.astype(np.float64), expected.astype(np.float64)
        both_nan = np.isnan(a) & np.isnan(e)
        diff = np.where(both_nan, 0.0, np.abs(a - e))
        diff = np.where(np.isnan(diff), np.inf, diff)
        return None, float(diff.max()) if diff.size else 0.0
    if actual.tolist() != expected.tolist():
        return f"output {name!r} is {actual.tolist()}, expected {expected.tolist()}", float("inf")
    return None, 0.0


class ModelRuntime:
    """ONNX Runtime sessions, one per bundle (keyed by the bundle's SHA-256), made on first use."""

    def __init__(self, ort_threads: int = 1) -> None:
        if ort_threads < 1:
            raise ValueError("ort_threads must be at least 1")
        self.ort_threads = ort_threads
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def load(self, bundle_sha256: str, manifest: Manifest, model_bytes: bytes) -> LoadedModel:
        """The model of bundle ``bundle_sha256``, from the cache or from ``model_bytes``.

        Raises:
            InstallError: If ONNX Runtime cannot load the model, or its graph's inputs and
                outputs disagree with the manifest.
        """
        with self._lock:
            cached = self._models.get(bundle_sha256)
            if cached is not None:
                return cached
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.ort_threads
        options.inter_op_num_threads = 1
        if manifest.runtime.format == "ort":
            options.add_session_config_entry("session.load_model_format", "ORT")
        try:
            session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise InstallError(
                f"{manifest.name} {manifest.version}: ONNX Runtime cannot load the model: {exc}",
                manifest.name,
            ) from exc
        _check_graph_matches(manifest, session)
        model = LoadedModel(bundle_sha256, manifest, session)
        with self._lock:
            return self._models.setdefault(bundle_sha256, model)

    def get(self, bundle_sha256: str) -> LoadedModel | None:
        """The loaded model of bundle ``bundle_sha256``, if any."""
        return self._models.get(bundle_sha256)

    def unload(self, bundle_sha256: str) -> None:
        """Forget bundle ``bundle_sha256``'s session (after its slot was replaced)."""
        with self._lock:
            self._models.pop(bundle_sha256, None)

    def keys(self) -> list[str]:
        """Bundle hashes with a session."""
        return list(self._models)


def _check_graph_matches(manifest: Manifest, session: ort.InferenceSession) -> None:
    graph_inputs = {i.name: i.type for i in session.get_inputs()}
    graph_outputs = {o.name for o in session.get_outputs()}
    problems = []
    for spec in manifest.inputs:
        if spec.name not in graph_inputs:
            problems.append(f"input {spec.name!r} is not in the graph ({', '.join(graph_inputs)})")
        elif graph_inputs[spec.name] != _ORT_TYPES[spec.dtype]:
            problems.append(
                f"input {spec.name!r} is {graph_inputs[spec.name]} in the graph,"
                f" {spec.dtype} in the manifest"
            )
    declared = {spec.name for spec in manifest.inputs}
    problems += [
        f"graph input {n!r} is not in the manifest" for n in graph_inputs if n not in declared
    ]
    problems += [
        f"output {o.name!r} is not in the graph"
        for o in manifest.outputs
        if o.name not in graph_outputs
    ]
    if problems:
        raise InstallError(
            f"{manifest.name} {manifest.version}: manifest and model disagree: "
            + "; ".join(problems),
            manifest.name,
        )
