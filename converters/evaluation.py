"""Measuring a variant: quality on held-out data, ops, RAM estimate and latency.

Quality and RAM are machine-independent and go into manifests; latency depends on this machine
and only goes into the build report.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from converters.onnx_export import INPUT

#: Named in every manifest; the method is described once, in docs/bundle-format.md: initializer
#: and node-attribute bytes at stored precision + peak of live activation bytes at batch 1,
#: walking nodes in graph order with shapes from onnx.shape_inference (a tensor is live from its
#: producer to its last consumer); DequantizeLinear of a constant weight counts as the weight
#: (runtimes fuse it), not as a float activation.
RAM_METHOD = "edgefleet-weights+peak-live-activations/1"
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8}


def session(model: bytes) -> ort.InferenceSession:
    """A one-thread CPU session (the way a small device runs)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # ORT warns about unused initializers in quantised graphs
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def predict(model: bytes, x: np.ndarray) -> np.ndarray:
    """Model outputs for every row of ``x``, one row per run, shape ``[N, width]``.

    One row at a time, as a device runs it: with dynamic quantisation a row's result depends on
    the other rows of its batch (activation scales are computed per batch).
    """
    sess = session(model)
    outs = [np.asarray(sess.run(None, {INPUT: x[i : i + 1]})[0]) for i in range(len(x))]
    return np.concatenate(outs).reshape(len(x), -1)


def quality(task: str, outputs: np.ndarray, y: np.ndarray, class_labels: list[Any] | None) -> float:
    """Accuracy for classification, mean absolute error for regression."""
    if task == "classification":
        assert class_labels is not None
        predicted = np.asarray(class_labels, dtype=object)[outputs.argmax(axis=1)]
        return float(np.mean(predicted == np.asarray(y, dtype=object)))
    return float(np.mean(np.abs(outputs.reshape(len(y)) - np.asarray(y, dtype=np.float64))))


def ram_estimate(model: bytes) -> int:
    """Peak RAM estimate in bytes (see :data:`RAM_METHOD`)."""
    proto = onnx.load_from_string(model)
    for vi in proto.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    proto = onnx.shape_inference.infer_shapes(proto)
    graph = proto.graph
    sizes: dict[str, int] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        tensor = vi.type.tensor_type
        count = 1
        for d in tensor.shape.dim:
            count *= d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
        sizes[vi.name] = count * _ITEMSIZE.get(tensor.elem_type, 4)
    weights = sum(
        _ITEMSIZE.get(i.data_type, 4) * int(np.prod(i.dims or [1])) for i in graph.initializer
    )
    init_names = {i.name for i in graph.initializer}
    # Outputs of DequantizeLinear on constants are fused weights, not activations.
    constant = set(init_names)
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in constant:
            constant.update(node.output)
    last_use: dict[str, int] = {}
    for step, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = step
    outputs = {o.name for o in graph.output}
    live: dict[str, int] = {
        vi.name: sizes.get(vi.name, 0) for vi in graph.input if vi.name not in init_names
    }
    peak = sum(live.values())
    for step, node in enumerate(graph.node):
        for name in node.output:
            if name not in constant:
                live[name] = sizes.get(name, 0)
        peak = max(peak, sum(live.values()))
        for name in list(live):
            if last_use.get(name, -1) <= step and name not in outputs:
                del live[name]
    return int(weights + peak)


@dataclass
class Latency:
    """Median latencies on this machine, one ORT thread."""

    single_ms: float
    batch_ms: float
    batch_size: int


def latency(model: bytes, x: np.ndarray, repeats: int = 50, batch: int = 256) -> Latency:
    """Median single-sample and batch latency."""
    sess = session(model)
    one = x[:1]
    many = x[:batch]
    for _ in range(5):
        sess.run(None, {INPUT: one})
    singles = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, {INPUT: one})
        singles.append(time.perf_counter() - start)
    batches = []
    for _ in range(max(3, repeats // 10)):
        start = time.perf_counter()
        sess.run(None, {INPUT: many})
        batches.append(time.perf_counter() - start)
    return Latency(statistics.median(singles) * 1e3, statistics.median(batches) * 1e3, len(many))
