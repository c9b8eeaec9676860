"""The runtime of an emulated ring or board: TFLite Micro for ``.tflite`` bundles.

Rings and Cortex-M boards run models in TensorFlow Lite Micro; a ``format = "tflite"`` bundle
runs in the real TFLM interpreter (:mod:`hil.tflm_runtime`) with the target's arena. A bundle of
another format (an operator's own catalogue may still send ONNX to a board) runs in ONNX
Runtime (one thread, through the agent's :mod:`device_agent.runtime`) with its arena planned
the way such an interpreter does: weights stay in flash, and the arena must hold every
activation that is alive at once, in graph order, with batch 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time

import numpy as np
import onnx
from onnx import helper

from device_agent.errors import InferenceError, InputError, InstallError
from device_agent.link.model_group import ModelRc
from device_agent.runtime import ModelRuntime, SelfTestResult
from firmware_bundles import Manifest
from hil.errors import Refusal
from hil.tflm_runtime import TflmRuntime


def ort_version() -> str:
    """The installed onnxruntime version."""
    import onnxruntime

    return str(onnxruntime.__version__)


def plan_arena_bytes(model: onnx.ModelProto) -> int:
    """Peak bytes of live activations (inputs included, weights excluded), batch 1.

    Unknown dimensions count as 1; a tensor lives from the node that makes it to its last
    consumer.
    """
    # Without inferred shapes the plan uses whatever shapes the file declares.
    with contextlib.suppress(onnx.shape_inference.InferenceError, ValueError):
        model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    weights = {init.name for init in graph.initializer}
    sizes: dict[str, int] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        sizes[info.name] = _tensor_bytes(info)
    outputs = {o.name for o in graph.output}
    last_use: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = index
    live = {i.name for i in graph.input if i.name not in weights}
    current = sum(sizes.get(name, 0) for name in live)
    peak = current
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name and name not in live:
                live.add(name)
                current += sizes.get(name, 0)
        peak = max(peak, current)
        for name in set(node.input):
            if name in live and last_use.get(name) == index and name not in outputs:
                live.discard(name)
                current -= sizes.get(name, 0)
    return peak


def _tensor_bytes(info: onnx.ValueInfoProto) -> int:
    tensor = info.type.tensor_type
    if not tensor.elem_type:
        return 0
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
    except (KeyError, TypeError):
        itemsize = 4
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in tensor.shape.dim]
    return itemsize * math.prod(dims)


def load_runtime(
    manifest: Manifest, model_bytes: bytes, ram_arena_bytes: int
) -> TflmRuntime | MicroRuntime:
    """The runtime for the bundle's format: TFLM for ``tflite``, else ONNX Runtime.

    Raises:
        Refusal: BUNDLE_INVALID if the runtime cannot load the model, DOES_NOT_FIT if TFLM
            needs more arena than ``ram_arena_bytes``.
    """
    if manifest.runtime.format == "tflite":
        return TflmRuntime(manifest, model_bytes, ram_arena_bytes)
    return MicroRuntime(manifest, model_bytes)


class MicroRuntime:
    """One loaded ONNX model, its inputs checked on the manifest's schema (the agent's runtime).

    Raises:
        Refusal: BUNDLE_INVALID if ONNX Runtime cannot load the model or its graph disagrees
            with the manifest.
    """

    name = "ONNX Runtime (stand-in)"

    def __init__(self, manifest: Manifest, model_bytes: bytes) -> None:
        self.manifest = manifest
        self.version = ort_version()
        try:
            self.arena_bytes = plan_arena_bytes(onnx.load_from_string(model_bytes))
        except Exception as exc:  # protobuf and onnx raise many unrelated types
            raise Refusal(ModelRc.BUNDLE_INVALID, f"model is not ONNX: {exc}") from exc
        key = hashlib.sha256(model_bytes).hexdigest()
        try:
            self._model = ModelRuntime(ort_threads=1).load(key, manifest, model_bytes)
        except InstallError as exc:
            raise Refusal(ModelRc.BUNDLE_INVALID, str(exc)) from exc

    def run(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """Outputs by name, and the inference's latency in seconds.

        Raises:
            Refusal: BAD_INPUT naming the input and what was expected, or ONNX Runtime's error.
        """
        try:
            feed = self._model.check(inputs)
            started = time.perf_counter()
            values = self._model.run_checked(feed)
        except (InputError, InferenceError) as exc:
            raise Refusal(ModelRc.BAD_INPUT, str(exc)) from exc
        latency = time.perf_counter() - started
        return dict(zip(self._model.output_names, values, strict=True)), latency

    def self_test(self) -> SelfTestResult:
        """Run the manifest's self-test vectors within its tolerance."""
        return self._model.self_test()
