"""From a chosen variant to a signed bundle: ORT format, tensor specs, self-test, manifest.

Everything here is deterministic: the same model bytes, data and build time give the same bundle.
Self-test vectors go into the bundle as binary tensors (manifest format 2, docs/bundle-format.md):
a quantised model's inputs in its own input type, everything else raw little-endian.
"""

from __future__ import annotations

import hashlib
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from converters.errors import ConverterError
from firmware_bundles import SigningKey, build
from firmware_bundles.catalogue import DeviceTarget
from firmware_bundles.manifest import (
    MANIFEST_FORMAT,
    REFERENCE_FILE,
    SELF_TEST_FILE,
    TENSOR_ITEMSIZE,
)
from firmware_bundles.reference import detached_name

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


class InputQuantisation(NamedTuple):
    """How a quantised graph turns its float input into integers (its input QuantizeLinear)."""

    scale: float
    zero_point: int
    dtype: str


def input_quantisation(model: bytes) -> InputQuantisation | None:
    """The graph input's quantisation, if every consumer of the input is one QuantizeLinear
    with a constant scalar scale and zero point (static QDQ models); else None."""
    graph = onnx.load_from_string(model).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    name = next(i.name for i in graph.input if i.name not in inits)
    consumers = [n for n in graph.node if name in n.input]
    if not consumers or any(n.op_type != "QuantizeLinear" for n in consumers):
        return None
    found = set()
    for node in consumers:
        if node.input[0] != name or len(node.input) < 3:
            return None
        scale, zero = inits.get(node.input[1]), inits.get(node.input[2])
        if scale is None or zero is None or scale.size != 1 or zero.size != 1:
            return None
        if zero.dtype not in (np.int8, np.uint8):
            return None
        found.add((float(scale.reshape(())), int(zero.reshape(())), zero.dtype.name))
    if len(found) != 1:
        return None
    return InputQuantisation(*found.pop())


def _layout(name: str, array: np.ndarray) -> dict[str, Any]:
    dtype = array.dtype.name
    if dtype not in TENSOR_ITEMSIZE:
        raise ConverterError(f"self-test tensor {name!r} has dtype {dtype}, not storable")
    return {"name": name, "dtype": dtype, "shape": list(array.shape)}


def self_test(
    model: bytes,
    x_eval: np.ndarray,
    precision: str,
    count: int = 3,
    quantised: InputQuantisation | None = None,
) -> tuple[dict[str, Any], bytes]:
    """Self-test vectors: the first ``count`` eval inputs and the model's own outputs for them.

    Returns the manifest's ``self_test`` (format 2) and the file's bytes. Given ``quantised``,
    inputs are stored as the model's input QuantizeLinear would make them, and the expected
    outputs are the model's outputs on exactly the values those integers stand for.

    Raises:
        ConverterError: If the model does not run or an output cannot be stored.
    """
    session = ort.InferenceSession(model, _one_thread(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    chunks: list[bytes] = []
    inputs: list[dict[str, Any]] = []
    expected: list[dict[str, Any]] = []
    rows = min(count, len(x_eval))
    if rows == 0:
        raise ConverterError("no held-out rows to make self-test vectors from")
    for i in range(rows):
        stored = np.ascontiguousarray(x_eval[i : i + 1])
        sample = stored
        if quantised is not None:
            stored, sample = _quantise(stored, quantised)
        try:
            outs = session.run(None, {name: sample})
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ConverterError(f"model failed on eval sample {i}: {exc}") from exc
        arrays = [(name, stored)] + [
            (o.name, np.ascontiguousarray(v))
            for o, v in zip(session.get_outputs(), outs, strict=True)
        ]
        if i == 0:
            inputs = [_layout(name, stored)]
            if quantised is not None:
                inputs[0].update(scale=quantised.scale, zero_point=quantised.zero_point)
            expected = [_layout(n, a) for n, a in arrays[1:]]
        chunks += [a.astype(a.dtype.newbyteorder("<")).tobytes() for _, a in arrays]
    manifest = {
        "tolerance": SELF_TEST_TOLERANCE[precision],
        "file": SELF_TEST_FILE,
        "count": rows,
        "inputs": inputs,
        "expected": expected,
    }
    return manifest, b"".join(chunks)


def _quantise(x: np.ndarray, q: InputQuantisation) -> tuple[np.ndarray, np.ndarray]:
    """(the integers stored, the float32 values they stand for), as QuantizeLinear rounds."""
    info = np.iinfo(np.dtype(q.dtype))
    scale = np.float32(q.scale)
    ints = np.clip(np.rint(x / scale) + q.zero_point, info.min, info.max).astype(q.dtype)
    values = (ints.astype(np.float32) - np.float32(q.zero_point)) * scale
    return ints, values.astype(np.float32)


def _one_thread() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return options


def target_ref(target: DeviceTarget) -> dict[str, Any]:
    """The manifest's entry for a catalogue target."""
    return {
        "target_id": target.hardware_id,
        "generation": target.generation,
        "platform": target.platform,
        "firmware": target.firmware.to_dict(),
    }


class Built(NamedTuple):
    """One target's signed bundle, and its reference file when that is detached."""

    bundle: bytes
    detached_reference: bytes | None


def build_bundle(
    *,
    manifest_fields: dict[str, Any],
    target: DeviceTarget,
    model_file: str,
    model: bytes,
    created_at: datetime,
    keys: list[SigningKey],
    reference: bytes,
    extra_files: dict[str, bytes] | None = None,
) -> Built:
    """Sign and pack one target's bundle (manifest format 3).

    ``manifest_fields`` carries every manifest field except ``format``, ``targets``,
    ``created_at``, ``reference_histograms`` and ``files``, which this fills in. ``reference``
    (the reference file) goes into the bundle beside the model and ``extra_files`` (the
    self-test file), unless the target detaches it: then the manifest pins its SHA-256 and
    length, and it comes back beside the bundle, to be published with it.

    Raises:
        SchemaError: If the manifest would be invalid.
    """
    files = {**(extra_files or {}), model_file: model}
    pointer: dict[str, Any] = {"file": REFERENCE_FILE}
    if target.reference == "detached":
        pointer.update(sha256=hashlib.sha256(reference).hexdigest(), length=len(reference))
    else:
        files[REFERENCE_FILE] = reference
    draft = {
        **manifest_fields,
        "format": MANIFEST_FORMAT,
        "targets": [target_ref(target)],
        "created_at": created_at.isoformat(),
        "reference_histograms": pointer,
    }
    data = build(draft, files, keys)
    return Built(data, reference if target.reference == "detached" else None)


def write_bundle(out_dir: Path, name: str, built: Built) -> tuple[Path, Path | None]:
    """Write a bundle as ``out_dir/name`` and a detached reference beside it (same stem,
    ``.reference.bin``); returns both paths (the second None when the reference is inside)."""
    path = out_dir / name
    path.write_bytes(built.bundle)
    if built.detached_reference is None:
        return path, None
    reference = out_dir / detached_name(name)
    reference.write_bytes(built.detached_reference)
    return path, reference
