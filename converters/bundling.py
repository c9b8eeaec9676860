"""From a chosen variant to a signed bundle: ORT format, tensor specs, self-test, manifest.

Everything here is deterministic: the same model bytes, data and build time give the same bundle.
"""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from converters.errors import ConverterError
from firmware_bundles import SigningKey, build
from firmware_bundles.catalogue import DeviceTarget

_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.STRING: "string",
}
#: Self-test tolerance by precision: int8 kernels differ slightly across CPUs (x86 vs Arm).
SELF_TEST_TOLERANCE = {"float32": 1e-4, "float16": 5e-3, "int8": 2e-2}


def to_ort_format(model: bytes) -> bytes:
    """Convert ONNX bytes to ORT format with graph optimisations off.

    Optimisations stay off so the saved graph holds exactly the ops that were checked against the
    target's op list (no fused kernels the device's runtime may lack); the conversion is
    deterministic.

    Raises:
        ConverterError: If ONNX Runtime cannot load or save the model.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.ort"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.optimized_model_filepath = str(out)
        options.add_session_config_entry("session.save_model_format", "ORT")
        try:
            ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConverterError(f"ONNX Runtime could not convert to ORT format: {exc}") from exc
        return out.read_bytes()


def _shape(value_info: onnx.ValueInfoProto) -> list[int | None]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def tensor_specs(
    model: bytes,
    *,
    feature_names: list[str] | None = None,
    class_labels: list[Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Manifest input and output specs read from an ONNX graph.

    Raises:
        ConverterError: If a tensor has a type the manifest cannot express.
    """
    graph = onnx.load_from_string(model).graph
    initializers = {i.name for i in graph.initializer}
    inputs, outputs = [], []
    for vi in graph.input:
        if vi.name in initializers:
            continue
        spec: dict[str, Any] = {"name": vi.name, "dtype": _dtype(vi), "shape": _shape(vi)}
        if feature_names is not None:
            spec["feature_names"] = feature_names
        inputs.append(spec)
    for vi in graph.output:
        spec = {"name": vi.name, "dtype": _dtype(vi), "shape": _shape(vi)}
        if class_labels is not None:
            spec["class_labels"] = class_labels
        outputs.append(spec)
    return inputs, outputs


def _dtype(vi: onnx.ValueInfoProto) -> str:
    elem = vi.type.tensor_type.elem_type
    name = _DTYPES.get(elem)  # type: ignore[call-overload]
    if name is None:
        raise ConverterError(f"tensor {vi.name!r} has ONNX element type {elem}, not supported")
    return str(name)


def self_test(model: bytes, x_eval: np.ndarray, precision: str, count: int = 3) -> dict[str, Any]:
    """Self-test vectors: the first ``count`` eval inputs and the model's own outputs for them.

    Raises:
        ConverterError: If the model does not run.
    """
    session = ort.InferenceSession(model, _one_thread(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    vectors = []
    for i in range(min(count, len(x_eval))):
        sample = x_eval[i : i + 1]
        try:
            outs = session.run(None, {name: sample})
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConverterError(f"model failed on eval sample {i}: {exc}") from exc
        expected = {
            o.name: compact(np.asarray(v)) for o, v in zip(session.get_outputs(), outs, strict=True)
        }
        vectors.append({"inputs": {name: compact(sample)}, "expected": expected})
    return {"tolerance": SELF_TEST_TOLERANCE[precision], "vectors": vectors}


def compact(array: np.ndarray) -> list[Any]:
    """Nested lists; float32 values in their shortest decimal form, which reads back to the same
    float32 (about half the JSON of float64 reprs, which matters on a 160 KiB ring budget)."""
    if array.dtype != np.float32:
        return array.tolist()
    flat = [float(np.format_float_positional(v, unique=True, trim="-")) for v in array.ravel()]
    return np.asarray(flat, dtype=object).reshape(array.shape).tolist()


def _one_thread() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return options


def target_ref(target: DeviceTarget) -> dict[str, Any]:
    """The manifest's entry for a catalogue target."""
    return {
        "target_id": target.id,
        "generation": target.generation,
        "platform": target.platform,
        "firmware": target.firmware.to_dict(),
    }


def build_bundle(
    *,
    manifest_fields: dict[str, Any],
    target: DeviceTarget,
    model_file: str,
    model: bytes,
    created_at: datetime,
    keys: list[SigningKey],
) -> bytes:
    """Sign and pack one target's bundle.

    ``manifest_fields`` carries every manifest field except ``targets``, ``created_at`` and
    ``files``, which this fills in.

    Raises:
        SchemaError: If the manifest would be invalid.
    """
    draft = {
        **manifest_fields,
        "targets": [target_ref(target)],
        "created_at": created_at.isoformat(),
    }
    return build(draft, {model_file: model}, keys)
