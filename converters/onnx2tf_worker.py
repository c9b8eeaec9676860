"""ONNX -> TFLite in the tool environment: one ``.npz`` in on stdin, one ``.npz`` out on stdout.

This file runs under the tool environment's Python (``make tflite-env``: onnx2tf with its exact
pins, TensorFlow 2.19), never in the project's venv, and imports nothing of ours. Input arrays:
``onnx`` (the model bytes as uint8), ``calibration`` (float32, already in the layout onnx2tf
gives the model: NWC / NHWC), ``input_name`` and ``input_shape`` (batch 1). Output arrays: one
uint8 array per ``.tflite`` file onnx2tf wrote, keyed by its variant suffix (``float32``,
``dynamic_range_quant``, ``full_integer_quant``, ...), or ``error`` with the reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np


def _convert(request: dict[str, np.ndarray], work: Path) -> dict[str, np.ndarray]:
    import onnx2tf  # heavy (TensorFlow): imported only when there is work to do

    model_path = work / "model.onnx"
    model_path.write_bytes(request["onnx"].tobytes())
    calibration_path = work / "calibration.npy"
    np.save(calibration_path, request["calibration"].astype(np.float32))
    name = str(request["input_name"])
    shape = ",".join(str(int(d)) for d in request["input_shape"])
    out = work / "out"
    onnx2tf.convert(
        input_onnx_file_path=str(model_path),
        output_folder_path=str(out),
        output_integer_quantized_tflite=True,
        # Zeros and ones: the calibration data is used as it is (no normalisation).
        custom_input_op_name_np_data_path=[[name, str(calibration_path), 0.0, 1.0]],
        overwrite_input_shape=[f"{name}:{shape}"],
        copy_onnx_input_output_names_to_tflite=True,
        non_verbose=True,
    )
    files = {}
    for path in sorted(out.glob("model_*.tflite")):
        files[path.stem.removeprefix("model_")] = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if not files:
        raise RuntimeError("onnx2tf wrote no .tflite file")
    return files


def main() -> int:
    """Read the request from stdin, write the answer to stdout; exit 0 even on a failed convert."""
    request = dict(np.load(io.BytesIO(sys.stdin.buffer.read()), allow_pickle=False))
    with tempfile.TemporaryDirectory() as tmp:
        # onnx2tf and TensorFlow print freely; stdout carries only the answer.
        real_stdout = os.dup(1)
        os.dup2(2, 1)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                answer = _convert(request, Path(tmp))
        except Exception as exc:  # report any failure of the foreign stack as data
            traceback.print_exc(file=sys.stderr)
            answer = {"error": np.asarray(f"{type(exc).__name__}: {exc}")}
        finally:
            sys.stdout.flush()
            os.dup2(real_stdout, 1)
    buffer = io.BytesIO()
    np.savez(buffer, **answer)  # type: ignore[arg-type]
    sys.stdout.buffer.write(buffer.getvalue())
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
