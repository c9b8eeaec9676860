"""TensorFlow Lite Micro on the emulated ring and board: the runtime their firmware has.

The ``.tflite`` is loaded into a TFLM interpreter whose tensor arena is the target's
``ram_arena_bytes``: a model that needs more is refused as a ring would refuse it (TFLM's
``AllocateTensors`` fails). Inputs arrive as the manifest declares them (float32, ONNX layout);
they are transposed to the ``.tflite`` layout (``runtime.tflite.input.layout``) and quantised
with the input's scale and zero point; integer outputs are dequantised, so replies and
telemetry look exactly like the ONNX Runtime path's.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from device_agent.link.model_group import ModelRc
from device_agent.runtime import SelfTestResult
from firmware_bundles import Manifest
from firmware_bundles.manifest import TensorQuantisation
from hil.errors import Refusal

RUNTIME_NAME = "TFLM"
#: The arena the host gives a model to measure what it allocates (never a device's limit).
_MEASURING_ARENA_BYTES = 16 * 1024 * 1024
_ARENA_TOTAL = re.compile(rb"Arena allocation total (\d+) bytes")
_STDERR_LOCK = threading.Lock()


def tflm_version() -> str:
    """The installed ``tflite-micro`` version."""
    return importlib.metadata.version("tflite-micro")


@contextlib.contextmanager
def _tflm_printout() -> Iterator[list[bytes]]:
    """What TFLM prints (MicroPrintf writes to file descriptor 2) while inside."""
    libc = ctypes.CDLL(None)
    got: list[bytes] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
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


def _interpreter(model: bytes, arena_bytes: int) -> tuple[Any | None, str]:
    from tflite_micro.python.tflite_micro import runtime

    with _tflm_printout() as printed:
        try:
            it = runtime.Interpreter.from_bytes(model, arena_size=arena_bytes)
        except (RuntimeError, ValueError) as exc:
            it, reason = None, str(exc)
        else:
            reason = ""
    said = b"".join(printed).decode(errors="replace").strip().replace("\n", "; ")
    return it, f"{reason} ({said})" if said else reason


def measure_arena(model: bytes) -> int:
    """TFLM's arena allocation total for ``model``, bytes.

    Raises:
        Refusal: BUNDLE_INVALID if TFLM cannot load the model at all.
    """
    it, reason = _interpreter(model, _MEASURING_ARENA_BYTES)
    if it is None:
        raise Refusal(ModelRc.BUNDLE_INVALID, f"TFLM cannot load the model: {reason}")
    with _tflm_printout() as printed:
        it.print_allocations()
    found = _ARENA_TOTAL.search(b"".join(printed))
    if found is None:
        raise Refusal(ModelRc.BUNDLE_INVALID, "TFLM reported no arena allocation total")
    return int(found.group(1))


def _quantise(x: np.ndarray, dtype: np.dtype[Any], q: TensorQuantisation | None) -> np.ndarray:
    if q is None:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    scaled = np.round(x.astype(np.float64) / q.scale + q.zero_point)
    return np.clip(scaled, info.min, info.max).astype(dtype)


def _dequantise(y: np.ndarray, q: TensorQuantisation | None) -> np.ndarray:
    if q is None:
        return y.astype(np.float32)
    return ((y.astype(np.float64) - q.zero_point) * q.scale).astype(np.float32)


def invoke(model: bytes, x: np.ndarray) -> np.ndarray:
    """Outputs of a float-I/O ``.tflite`` for the rows of ``x``, one invoke per row (host side:
    sample bundles and their self-test vectors).

    Raises:
        Refusal: BUNDLE_INVALID if TFLM cannot load the model.
    """
    it, reason = _interpreter(model, _MEASURING_ARENA_BYTES)
    if it is None:
        raise Refusal(ModelRc.BUNDLE_INVALID, f"TFLM cannot load the model: {reason}")
    rows = []
    for row in np.asarray(x, dtype=np.float32):
        it.set_input(row[None, ...], 0)
        it.invoke()
        rows.append(np.asarray(it.get_output(0), dtype=np.float32))
    return np.concatenate(rows)


_TO_LAYOUT = {"NWC": (0, 2, 1), "NHWC": (0, 2, 3, 1)}


class TflmRuntime:
    """One ``.tflite`` loaded in TFLM with the target's arena.

    Attributes:
        arena_bytes: The arena TFLM allocated (its recorded total).
        name: ``TFLM``; version: the tflite-micro version.

    Raises:
        Refusal: BUNDLE_INVALID if TFLM cannot load it, DOES_NOT_FIT if it needs more arena
            than ``ram_arena_bytes``.
    """

    def __init__(self, manifest: Manifest, model: bytes, ram_arena_bytes: int) -> None:
        spec = manifest.runtime.tflite
        if spec is None:
            raise Refusal(ModelRc.BUNDLE_INVALID, "manifest has no runtime.tflite block")
        self.manifest = manifest
        self.spec = spec
        self.name = RUNTIME_NAME
        self.version = tflm_version()
        self.arena_bytes = measure_arena(model)
        if self.arena_bytes > ram_arena_bytes:
            raise Refusal(
                ModelRc.DOES_NOT_FIT,
                f"TFLM needs a {self.arena_bytes} byte arena, the device has {ram_arena_bytes}",
            )
        it, reason = _interpreter(model, ram_arena_bytes)
        if it is None:
            raise Refusal(ModelRc.DOES_NOT_FIT, f"TFLM cannot allocate the model: {reason}")
        self._it = it
        self._input_dtype = np.dtype(spec.input.dtype)

    def _feed(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        declared = self.manifest.inputs[0]
        unknown = sorted(set(inputs) - {declared.name})
        if unknown:
            raise Refusal(
                ModelRc.BAD_INPUT,
                f"unknown input {unknown[0]!r}; the model takes {declared.name!r}",
            )
        if declared.name not in inputs:
            raise Refusal(ModelRc.BAD_INPUT, f"no value for input {declared.name!r}")
        x = np.asarray(inputs[declared.name])
        want = [1 if d is None else d for d in declared.shape]
        if x.dtype != np.dtype(declared.dtype) or list(x.shape) != want:
            raise Refusal(
                ModelRc.BAD_INPUT,
                f"input {declared.name!r} expected {declared.dtype} {want} (one sample), got"
                f" {x.dtype} {list(x.shape)}",
            )
        order = _TO_LAYOUT.get(self.spec.input.layout or "")
        if order is not None:
            x = np.ascontiguousarray(x.transpose(order))
        return _quantise(x, self._input_dtype, self.spec.input.quantisation)

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """Outputs by manifest name (float32, dequantised) and the invoke's latency, seconds.

        Raises:
            Refusal: BAD_INPUT naming the input and what was expected.
        """
        feed = self._feed(inputs)
        started = time.perf_counter()
        try:
            self._it.set_input(feed, 0)
            self._it.invoke()
            raw = np.asarray(self._it.get_output(0))
        except (RuntimeError, ValueError) as exc:
            raise Refusal(ModelRc.BAD_INPUT, f"TFLM failed: {exc}") from exc
        latency = time.perf_counter() - started
        output = self.manifest.outputs[0]
        value = _dequantise(raw, self.spec.output.quantisation)
        shape = [1 if d is None else d for d in output.shape]
        return {output.name: value.reshape(shape)}, latency

    def self_test(self) -> SelfTestResult:
        """Run the manifest's self-test vectors within its tolerance (never raises)."""
        tolerance = self.manifest.self_test.tolerance
        vectors = self.manifest.self_test.vectors
        worst = 0.0
        for index, vector in enumerate(vectors):
            try:
                inputs = {
                    k: np.asarray(v, dtype=self.manifest.inputs[0].dtype)
                    for k, v in vector.inputs.items()
                }
                outputs, _ = self.run(inputs)
            except Refusal as exc:
                return SelfTestResult(False, len(vectors), float("inf"), f"vector {index}: {exc}")
            for name, expected in vector.expected.items():
                got = outputs.get(name)
                want = np.asarray(expected, dtype=np.float64)
                if got is None or got.shape != want.shape:
                    return SelfTestResult(
                        False, len(vectors), float("inf"), f"vector {index}: output {name!r}"
                    )
                error = float(np.abs(got.astype(np.float64) - want).max())
                worst = max(worst, error)
                if not error <= tolerance:
                    return SelfTestResult(
                        False,
                        len(vectors),
                        worst,
                        f"vector {index}: output {name!r} differs by {error:.3g}, over the"
                        f" tolerance {tolerance:g}",
                    )
        return SelfTestResult(True, len(vectors), worst, f"{len(vectors)} vectors within tolerance")
