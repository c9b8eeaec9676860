"""Float ONNX -> ``.tflite`` variants through the tool environment (onnx2tf, TensorFlow).

onnx2tf pins numpy 1.26, onnx 1.19, onnxruntime 1.23 and TensorFlow 2.19 exactly, which cannot
share the project's venv, so it lives in a tool environment of its own (``make tflite-env``)
and is called as a subprocess: ONNX bytes and calibration data in, ``.tflite`` bytes out
(:mod:`converters.onnx2tf_worker`). onnx2tf writes the model in TensorFlow's layout: an NCW
input becomes NWC and NCHW becomes NHWC, so calibration data is transposed here and the layout
is recorded for the manifest.
"""

from __future__ import annotations

import io
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from converters.errors import QuantisationError

#: Environment variable naming the tool environment's Python, when it is not the default.
TOOL_PYTHON_ENV = "EDGEFLEET_TFLITE_PYTHON"
#: Where ``make tflite-env`` creates the tool environment, relative to the repository.
DEFAULT_TOOL_ENV = Path(__file__).resolve().parent.parent / ".venv-tflite"
MAKE_TARGET = "make tflite-env"
WORKER = Path(__file__).resolve().parent / "onnx2tf_worker.py"
#: onnx2tf can take a while on a loaded machine; a conversion past this is a failure.
CONVERT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class TfliteKind:
    """One kind of ``.tflite`` file onnx2tf writes, in our vocabulary.

    Attributes:
        suffix: onnx2tf's file suffix.
        name: Variant name in reports.
        scheme: Manifest quantisation scheme.
        precision: Arithmetic precision.
    """

    suffix: str
    name: str
    scheme: str
    precision: str


#: The kinds a micro target may take (onnx2tf's float16 file has no TFLM kernels: left out).
KINDS = (
    TfliteKind("float32", "tflite-float32", "float32", "float32"),
    TfliteKind("dynamic_range_quant", "tflite-int8-dynamic", "int8-dynamic", "int8"),
    TfliteKind("integer_quant", "tflite-int8-float-io", "int8-static", "int8"),
    TfliteKind("full_integer_quant", "tflite-int8", "int8-static", "int8"),
    TfliteKind("integer_quant_with_int16_act", "tflite-int16x8-float-io", "int16x8", "int16"),
    TfliteKind("full_integer_quant_with_int16_act", "tflite-int16x8", "int16x8", "int16"),
)


class ToolEnvMissing(QuantisationError):
    """The tool environment with onnx2tf is not there."""


def tool_python() -> Path:
    """The tool environment's Python: ``$EDGEFLEET_TFLITE_PYTHON`` or ``.venv-tflite``.

    Raises:
        ToolEnvMissing: Naming the make target that creates it.
    """
    configured = os.environ.get(TOOL_PYTHON_ENV)
    python = Path(configured) if configured else DEFAULT_TOOL_ENV / "bin" / "python"
    if not python.is_file():
        where = f"${TOOL_PYTHON_ENV}={configured}" if configured else str(python)
        raise ToolEnvMissing(
            f"the TFLite tool environment (onnx2tf) is missing: no Python at {where};"
            f" run `{MAKE_TARGET}` to create it"
        )
    return python


def layout_of(input_shape: tuple[int, ...]) -> str:
    """The layout of the ``.tflite`` input for an ONNX input of ``input_shape`` (batch first)."""
    return {2: "NC", 3: "NWC", 4: "NHWC"}.get(len(input_shape), "N" + "?" * (len(input_shape) - 1))


#: Axis order from channels-first (NCW, NCHW) to the channels-last layout onnx2tf gives the
#: model, by the samples' rank.
_CHANNELS_LAST = {3: (0, 2, 1), 4: (0, 2, 3, 1)}


def to_tflite_layout(x: np.ndarray) -> np.ndarray:
    """Channels-first samples (NCW, NCHW) in the channels-last layout onnx2tf gives the model."""
    axes = _CHANNELS_LAST.get(x.ndim)
    return x if axes is None else np.ascontiguousarray(x.transpose(axes))


def from_tflite_layout(x: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_tflite_layout`."""
    axes = _CHANNELS_LAST.get(x.ndim)
    return x if axes is None else np.ascontiguousarray(x.transpose(np.argsort(axes)))


def convert(model: bytes, calibration: np.ndarray, input_name: str) -> dict[str, bytes]:
    """Every ``.tflite`` kind in :data:`KINDS` for the float ONNX ``model``, by variant name.

    Args:
        model: Float ONNX bytes with one input named ``input_name``, batch first.
        calibration: Float samples in the ONNX layout (NCW/NCHW); transposed here.
        input_name: The graph's input.

    Raises:
        ToolEnvMissing: If the tool environment is not installed.
        QuantisationError: If onnx2tf fails, with its reason.
    """
    python = tool_python()
    shape = [1, *to_tflite_layout(calibration[:1]).shape[1:]]
    request = io.BytesIO()
    np.savez(
        request,
        onnx=np.frombuffer(_batch_one(model), dtype=np.uint8),
        calibration=to_tflite_layout(np.asarray(calibration, dtype=np.float32)),
        input_name=np.asarray(input_name),
        input_shape=np.asarray(shape, dtype=np.int64),
    )
    try:
        done = subprocess.run(
            [str(python), str(WORKER)],
            input=request.getvalue(),
            capture_output=True,
            timeout=CONVERT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise QuantisationError(f"onnx2tf did not finish: {exc}") from exc
    if done.returncode != 0 or not done.stdout:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise QuantisationError(
            f"the TFLite tool environment failed (exit {done.returncode}): {' | '.join(tail)};"
            f" if it is broken, run `{MAKE_TARGET}` again"
        )
    answer = dict(np.load(io.BytesIO(done.stdout), allow_pickle=False))
    if "error" in answer:
        raise QuantisationError(f"onnx2tf could not convert the model: {answer['error']}")
    return {k.name: answer[k.suffix].tobytes() for k in KINDS if k.suffix in answer}


def _batch_one(model: bytes) -> bytes:
    """The model with a batch of 1 on inputs and outputs: a device runs one sample at a time."""
    proto = onnx.load_from_string(model)
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = 1
    return proto.SerializeToString(deterministic=True)
