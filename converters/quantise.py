"""Variants of a float ONNX model: fp16, int8 dynamic (MatMul/Gemm), int8 static QDQ.

Quantised ops are counted in every result, so a variant whose quantisation changed nothing (tree
ensembles and other ai.onnx.ml ops, which ONNX Runtime never quantises) says so instead of being
passed off as quantised.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from converters.errors import QuantisationError
from converters.onnx_export import INPUT, serialise

QUANTISED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
}
#: Calibration settings that really differ (the default Entropy histogram of 128 bins gives the
#: same ranges as MinMax on small models; see shared/notes/onnx-pitfalls.md).
CALIBRATIONS: dict[str, dict[str, Any]] = {
    "minmax": {"method": "MinMax", "extra": {}},
    "entropy": {"method": "Entropy", "extra": {"CalibNumBins": 2048}},
    "percentile": {
        "method": "Percentile",
        "extra": {"CalibPercentile": 99.99, "CalibNumBins": 2048},
    },
}


@dataclass
class Variant:
    """One candidate model for the targets.

    Attributes:
        name: Unique name, e.g. ``int8-static-per-channel-entropy``.
        scheme: Manifest scheme: ``float32``, ``fp16``, ``int8-dynamic`` or ``int8-static``.
        precision: ``float32``, ``float16`` or ``int8``.
        model: ONNX bytes.
        quantised_ops: How many nodes are quantisation ops.
        per_channel: Per-channel weight scales (static only).
        calibration: Calibration method name (static only).
        notes: What happened, in words (e.g. why it is the same as float).
        error: Why the variant could not be made, in our words (shown in the convert table).
        detail: The quantiser's own message, whole (kept for the build report).
    """

    name: str
    scheme: str
    precision: str
    model: bytes
    quantised_ops: int = 0
    per_channel: bool = False
    calibration: str | None = None
    notes: str = ""
    same_as_float: bool = False
    error: str | None = None
    detail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: ONNX Runtime's messages that we can explain, and what they mean for the variant.
_KNOWN_FAILURES = {
    # Entropy and Percentile calibration fail this way when no tensor was collected at all.
    "Histogram has not been collected": (
        "nothing to calibrate: the graph has no float tensor that {method} calibration can"
        " collect (ai.onnx.ml ops such as tree ensembles are never quantised)"
    ),
}


def explain(exc: Exception, what: str, method: str = "") -> tuple[str, str]:
    """(our words, the quantiser's own message) for a failure of ``what``.

    onnxruntime and its converters raise untyped errors whose messages address their own API
    ("Please run collect() first"); the convert table shows what happened to the variant instead.
    """
    detail = f"{type(exc).__name__}: {exc}".strip()
    for marker, words in _KNOWN_FAILURES.items():
        if marker in str(exc):
            return words.format(method=method or "the"), detail
    return f"{what} failed in ONNX Runtime ({type(exc).__name__}); see build-report.json", detail


def count_quantised_ops(model: bytes) -> int:
    """Number of nodes that are quantisation ops."""
    return sum(n.op_type in QUANTISED_OPS for n in onnx.load_from_string(model).graph.node)


def op_types(model: bytes) -> list[str]:
    """Sorted distinct op types of a graph."""
    return sorted({n.op_type for n in onnx.load_from_string(model).graph.node})


class _Reader:
    """Feeds calibration rows one batch at a time (onnxruntime's CalibrationDataReader)."""

    def __init__(self, x: np.ndarray, batch: int = 32) -> None:
        self._batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        self._iter = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {INPUT: batch}

    def rewind(self) -> None:
        self._iter = iter(self._batches)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """onnxruntime.quantization prints progress and logs advice on the root logger."""
    import onnxruntime as ort

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)
        ort.set_default_logger_severity(2)


def fp16(model: bytes) -> Variant:
    """Weights and arithmetic in float16, float32 inputs and outputs kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        converted = convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True)
        data = compact(serialise(converted))
        _loads(data)
    except Exception as exc:  # the converter and ORT raise many kinds
        error, detail = explain(exc, "fp16 conversion")
        return Variant("fp16", "fp16", "float16", b"", error=error, detail=detail)
    variant = Variant("fp16", "fp16", "float16", data, notes="onnxruntime.transformers.float16")
    halves = [
        i
        for i in onnx.load_from_string(data).graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT16
    ]
    if not halves:
        variant.same_as_float = True
        variant.notes = "no weight became float16 (ops without a float16 kernel stay float32)"
    return variant


@contextlib.contextmanager
def _model_files(model: bytes) -> Iterator[tuple[Path, Path]]:
    """The float model in a temporary file, and the path the quantiser writes its result to
    (onnxruntime.quantization takes paths, not bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(model)
        yield src, dst


def int8_dynamic(model: bytes) -> Variant:
    """Dynamic int8 on MatMul/Gemm only (dynamic ConvInteger is slower than float)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _model_files(model) as (src, dst):
        try:
            with quiet():
                quantize_dynamic(
                    src, dst, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8
                )
        except Exception as exc:  # onnxruntime.quantization raises many kinds
            error, detail = explain(exc, "dynamic int8 quantisation")
            return Variant("int8-dynamic", "int8-dynamic", "int8", b"", error=error, detail=detail)
        data = _normalise(dst.read_bytes())
    return _mark(Variant("int8-dynamic", "int8-dynamic", "int8", data))


def int8_static(
    model: bytes, calibration: np.ndarray, *, per_channel: bool, method: str
) -> Variant:
    """Static int8 QDQ: int8 weights and activations, ranges from calibration data."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    granularity = "per-channel" if per_channel else "per-tensor"
    name = f"int8-static-{granularity}-{method}"
    settings = CALIBRATIONS[method]
    with _model_files(model) as (src, dst):
        try:
            with quiet():
                quantize_static(
                    src,
                    dst,
                    _Reader(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, settings["method"]),
                    extra_options=dict(settings["extra"]),
                )
        except Exception as exc:  # e.g. "Histogram has not been collected" for ai.onnx.ml graphs
            error, detail = explain(exc, "static int8 quantisation", settings["method"])
            return Variant(
                name,
                "int8-static",
                "int8",
                b"",
                per_channel=per_channel,
                calibration=settings["method"],
                error=error,
                detail=detail,
            )
        data = _normalise(dst.read_bytes())
    variant = Variant(
        name, "int8-static", "int8", data, per_channel=per_channel, calibration=settings["method"]
    )
    return _mark(variant)


def _normalise(model: bytes) -> bytes:
    return compact(model)


def compact(model: bytes) -> bytes:
    """Shrink graph overhead without touching the maths.

    Short tensor names (graph inputs and outputs keep theirs); no node names, doc strings,
    value_info or node metadata (torch's exporter stores stack traces per node). On a
    5k-parameter int8 model the names alone were as large as the weights.
    """
    proto = onnx.load_from_string(model)
    graph = proto.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = format(len(names), "x")
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(i) for i in node.input]
        node.output[:] = [short(o) for o in node.output]
        node.name = ""
        node.doc_string = ""
        del node.metadata_props[:]  # torch's exporter stores stack traces per node
    del graph.value_info[:]
    graph.doc_string = ""
    proto.doc_string = ""
    proto.producer_name = "edgefleet"
    proto.producer_version = ""
    del proto.metadata_props[:]
    return serialise(proto)


def _mark(variant: Variant) -> Variant:
    variant.quantised_ops = count_quantised_ops(variant.model)
    if variant.quantised_ops == 0:
        variant.same_as_float = True
        variant.notes = (
            "no op was quantised (ai.onnx.ml ops such as tree ensembles are never"
            " quantised by ONNX Runtime); this is the float model"
        )
    return variant


def _loads(model: bytes) -> None:
    import onnxruntime as ort

    ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def make_variants(model: bytes, calibration: np.ndarray) -> list[Variant]:
    """Every variant of ``model``: float32, fp16, int8 dynamic, and int8 static QDQ per-tensor
    (MinMax) and per-channel (MinMax, Entropy, Percentile).

    Raises:
        QuantisationError: If calibration data is empty.
    """
    if len(calibration) == 0:
        raise QuantisationError("calibration data has no rows")
    model = compact(model)
    variants = [Variant("float32", "float32", "float32", model), fp16(model), int8_dynamic(model)]
    variants.append(int8_static(model, calibration, per_channel=False, method="minmax"))
    for method in ("minmax", "entropy", "percentile"):
        variants.append(int8_static(model, calibration, per_channel=True, method=method))
    seen: dict[bytes, str] = {}
    for v in variants:
        if v.error or not v.model:
            continue
        if v.model in seen and not v.same_as_float:
            v.same_as_float = seen[v.model] == "float32"
            v.error = f"identical to {seen[v.model]} (calibration chose the same ranges)"
        seen.setdefault(v.model, v.name)
    return variants
