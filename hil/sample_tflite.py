"""The sample classifier as a float32 ``.tflite`` (FULLY_CONNECTED, SOFTMAX), written directly.

The rig's sample bundles for rings and boards need a ``.tflite`` without the onnx2tf tool
environment; the model is two ops, so it is built with the flatbuffer object API that the
``tflite-micro`` package ships (its copy of the TFLite schema). The bytes depend only on the
weights, so sample bundles stay byte-reproducible.
"""

from __future__ import annotations

from typing import Any

import flatbuffers
import numpy as np
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema


def _tensor(name: str, shape: list[int], buffer: int) -> Any:
    tensor = schema.TensorT()
    tensor.name = name
    tensor.shape = shape
    tensor.type = schema.TensorType.FLOAT32
    tensor.buffer = buffer
    return tensor


def _code(builtin: int) -> Any:
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    return code


def _buffer(data: np.ndarray | None) -> Any:
    buffer = schema.BufferT()
    if data is not None:
        buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
    return buffer


def linear_softmax_tflite(
    weights: np.ndarray, bias: np.ndarray, input_name: str, output_name: str
) -> bytes:
    """``softmax(x @ weights + bias)`` for one sample ``[1, features]`` as ``.tflite`` bytes."""
    features, classes = weights.shape
    fc = schema.OperatorT()
    fc.opcodeIndex = 0
    fc.inputs, fc.outputs = [0, 1, 2], [3]
    fc.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    fc.builtinOptions = schema.FullyConnectedOptionsT()
    softmax = schema.OperatorT()
    softmax.opcodeIndex = 1
    softmax.inputs, softmax.outputs = [3], [4]
    softmax.builtinOptionsType = schema.BuiltinOptions.SoftmaxOptions
    softmax.builtinOptions = schema.SoftmaxOptionsT()
    softmax.builtinOptions.beta = 1.0
    graph = schema.SubGraphT()
    graph.tensors = [
        _tensor(input_name, [1, features], 0),
        _tensor("weights", [classes, features], 1),  # FULLY_CONNECTED wants [out, in]
        _tensor("bias", [classes], 2),
        _tensor("logits", [1, classes], 0),
        _tensor(output_name, [1, classes], 0),
    ]
    graph.inputs, graph.outputs = [0], [4]
    graph.operators = [fc, softmax]
    graph.name = "sample_classifier"
    model = schema.ModelT()
    model.version = 3
    model.description = "edgefleet sample"
    model.operatorCodes = [
        _code(schema.BuiltinOperator.FULLY_CONNECTED),
        _code(schema.BuiltinOperator.SOFTMAX),
    ]
    model.subgraphs = [graph]
    model.buffers = [
        _buffer(None),
        _buffer(weights.T.astype("<f4")),
        _buffer(bias.astype("<f4")),
    ]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
