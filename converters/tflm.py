"""``.tflite`` variants evaluated in TensorFlow Lite Micro, one sample at a time as a device runs.

The converter scores each variant in the TFLM interpreter of the installed ``tflite-micro``
(the runtime rings and Cortex-M boards run), measures the tensor arena TFLM allocates (its
"Arena allocation total"), and reads the quantisation of the input and output tensors that the
manifest records. Inputs come in the ONNX layout (NCW/NCHW, float); this module transposes them
to the ``.tflite`` layout and quantises them where the model takes integers, and dequantises
integer outputs, so every variant is compared with the float model on the same footing.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from converters.errors import QuantisationError
from converters.tflite import from_tflite_layout, layout_of, to_tflite_layout

#: Arena the converter gives a variant while scoring it (the target's arena is checked later).
SCORING_ARENA_BYTES = 16 * 1024 * 1024
_ARENA_TOTAL = re.compile(rb"Arena allocation total (\d+) bytes")
_STDOUT_LOCK = threading.Lock()


def tflm_version() -> str:
    """The installed ``tflite-micro`` version (the interpreter's build)."""
    return importlib.metadata.version("tflite-micro")


def _runtime() -> Any:
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError as exc:
        raise QuantisationError(
            "tflite-micro is not installed; install the 'device' extra (pip install -e .[device])"
        ) from exc
    return runtime


def interpreter(model: bytes, arena_bytes: int = SCORING_ARENA_BYTES) -> Any:
    """A TFLM interpreter with its tensors allocated in an arena of ``arena_bytes``.

    Raises:
        QuantisationError: If TFLM cannot load the model or allocate its tensors.
    """
    runtime = _runtime()
    # TFLM prints why a kernel refused the model; that text belongs in the error.
    with _captured_stdout() as printed:
        try:
            return runtime.Interpreter.from_bytes(model, arena_size=arena_bytes)
        except (RuntimeError, ValueError) as exc:
            failure = exc
    said = b"".join(printed).decode(errors="replace").strip().replace("\n", "; ")
    raise QuantisationError(f"TFLM cannot run the model: {failure} ({said})") from failure


@contextlib.contextmanager
def _captured_stdout() -> Iterator[list[bytes]]:
    """What C code prints on file descriptor 2 while inside (TFLM's MicroPrintf writes there)."""
    libc = ctypes.CDLL(None)
    got: list[bytes] = []
    with _STDOUT_LOCK, tempfile.TemporaryFile() as sink:
        libc.fflush(None)
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield got
        finally:
            libc.fflush(None)
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            got.append(sink.read())


def measure_arena(model: bytes) -> int:
    """The tensor arena TFLM allocates for ``model``: its recorded allocation total, bytes.

    Raises:
        QuantisationError: If TFLM cannot load the model or reports no total.
    """
    it = interpreter(model)
    with _captured_stdout() as printed:
        it.print_allocations()
    found = _ARENA_TOTAL.search(b"".join(printed))
    if found is None:
        raise QuantisationError("TFLM printed no arena allocation total")
    return int(found.group(1))


def op_types(model: bytes) -> list[str]:
    """Builtin operator names the ``.tflite`` uses (``FULLY_CONNECTED``, ...), sorted.

    Raises:
        QuantisationError: If an operator is custom (no TFLM builtin kernel).
    """
    runtime = _runtime()
    schema = runtime.schema_fb
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if k.isupper()}
    parsed = runtime.convert_bytearray_to_object(bytearray(model))
    used = set()
    for subgraph in parsed.subgraphs:
        for op in subgraph.operators or []:
            code = parsed.operatorCodes[op.opcodeIndex]
            builtin = runtime.get_builtin_code_from_operator_code(code)
            if builtin == schema.BuiltinOperator.CUSTOM:
                raise QuantisationError(f"custom op {code.customCode!r} has no TFLM kernel")
            used.add(names[builtin])
    return sorted(used)


def _quantisation(details: dict[str, Any]) -> dict[str, Any] | None:
    params = details["quantization_parameters"]
    if len(params["scales"]) == 0:
        return None
    return {"scale": float(params["scales"][0]), "zero_point": int(params["zero_points"][0])}


def tensor_io(model: bytes, onnx_input_shape: tuple[int, ...]) -> dict[str, Any]:
    """The manifest's ``runtime.tflite`` input/output facts: layout, dtypes, shapes, quantisation.

    Raises:
        QuantisationError: If TFLM cannot load the model.
    """
    it = interpreter(model)
    tensors: dict[str, Any] = {}
    for side, get in (("input", it.get_input_details), ("output", it.get_output_details)):
        d = get(0)
        tensors[side] = {
            "dtype": np.dtype(d["dtype"]).name,
            "shape": [int(s) for s in d["shape"]],
            "quantisation": _quantisation(d),
        }
    tensors["input"]["layout"] = layout_of(onnx_input_shape)
    return tensors


def quantise(x: np.ndarray, dtype: np.dtype[Any], q: dict[str, Any] | None) -> np.ndarray:
    """Float ``x`` as the tensor's ``dtype``: ``round(x / scale + zero_point)``, clipped."""
    if q is None:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    scaled = np.round(x.astype(np.float64) / q["scale"] + q["zero_point"])
    return np.clip(scaled, info.min, info.max).astype(dtype)


def dequantise(y: np.ndarray, q: dict[str, Any] | None) -> np.ndarray:
    """Integer ``y`` back to float32: ``(y - zero_point) * scale``."""
    if q is None:
        return y.astype(np.float32)
    return ((y.astype(np.float64) - q["zero_point"]) * q["scale"]).astype(np.float32)


def predict(model: bytes, x: np.ndarray) -> np.ndarray:
    """Float outputs of ``model`` for ``x`` (ONNX layout), one sample per invoke.

    Raises:
        QuantisationError: If TFLM cannot load or run the model.
    """
    it = interpreter(model)
    inp, out = it.get_input_details(0), it.get_output_details(0)
    q_in, q_out = _quantisation(inp), _quantisation(out)
    dtype = np.dtype(inp["dtype"])
    samples = to_tflite_layout(np.asarray(x, dtype=np.float32))
    rows = []
    try:
        for sample in samples:
            it.set_input(quantise(sample[None, ...], dtype, q_in), 0)
            it.invoke()
            rows.append(dequantise(np.asarray(it.get_output(0)), q_out))
    except (RuntimeError, ValueError) as exc:
        raise QuantisationError(f"TFLM failed to run the model: {exc}") from exc
    result = np.concatenate(rows)
    return from_tflite_layout(result) if result.ndim > 2 else result
