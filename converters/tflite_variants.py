"""TFLite variants for micro targets: made by onnx2tf, scored in TFLM, bundled as ``.tflite``.

From the float ONNX (or, for tree ensembles, the lowered graph of
:mod:`converters.tree_lowering`, parity-checked against the original), onnx2tf writes float32,
dynamic-range, integer and int16-activation ``.tflite`` files; each is run in the TFLM
interpreter one sample at a time on the held-out data, its arena measured and its ops listed,
so :func:`converters.fitting.choose` picks among them by the same rule as for ONNX variants.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from converters import bundling, evaluation, tflm, tree_lowering
from converters.errors import ConverterError, ParityError
from converters.fitting import VariantFacts
from converters.onnx_export import INPUT, Exported
from converters.sources import Dataset, SourceModel
from converters.tflite import KINDS, TfliteKind, convert
from firmware_bundles.catalogue import DeviceTarget
from firmware_bundles.manifest import SELF_TEST_FILE

MODEL_FILE = "model.tflite"
#: ``runtime.ram_estimate.method`` of a ``.tflite``: TFLM's recorded arena allocation total for
#: the file (the version is in ``runtime.tflite.tflm_version``); docs/bundle-format.md.
RAM_METHOD = "tflm-arena-allocation-total/1"
#: Self-test tolerance by precision. The device runs the same TFLM integer kernels as the host,
#: so the outputs should agree exactly; the margin covers float kernels on other FPUs.
SELF_TEST_TOLERANCE = {"float32": 1e-4, "int8": 2e-2, "int16": 2e-3}
#: Parity of the lowered tree graph with the original model (probabilities).
TREE_PARITY_TOLERANCE = 1e-4


@dataclass
class TfliteVariant:
    """One ``.tflite`` candidate and what TFLM measured of it."""

    kind: TfliteKind
    model: bytes = b""
    facts: VariantFacts | None = None
    tensors: dict[str, Any] = field(default_factory=dict)
    single_ms: float | None = None
    #: Worst absolute distance of its outputs from the float original's over the held-out data.
    float_distance: float = math.inf
    error: str | None = None


@dataclass
class TfliteSet:
    """Every variant of one conversion, and the float graph they were made from."""

    graph: bytes
    lowered_trees: bool
    variants: list[TfliteVariant]


def micro_graph(source: SourceModel, exported: Exported, held_out: Dataset) -> tuple[bytes, bool]:
    """The float ONNX graph to hand to onnx2tf, and whether trees were lowered for it.

    Raises:
        ParityError: If the lowered trees disagree with the original model.
    """
    domains = {n.domain for n in onnx.load_from_string(exported.model).graph.node}
    if not domains & {"ai.onnx.ml"} or source.kind != "sklearn":
        return exported.model, False
    if not tree_lowering.supports(source.obj):
        return exported.model, False
    lowered = tree_lowering.lower(source.obj)
    ours = evaluation.predict(lowered, held_out.x)
    theirs = np.asarray(exported.reference(held_out.x), dtype=np.float64).reshape(ours.shape)
    worst = float(np.abs(ours - theirs).max())
    if worst > TREE_PARITY_TOLERANCE:
        row = int(np.abs(ours - theirs).max(axis=1).argmax())
        raise ParityError(
            f"trees lowered to tensor ops disagree with the original on eval row {row}:"
            f" {worst:.3g} > {TREE_PARITY_TOLERANCE:g}",
            row,
            worst,
        )
    return lowered, True


def make(
    source: SourceModel,
    exported: Exported,
    calibration: np.ndarray,
    held_out: Dataset,
) -> TfliteSet:
    """Convert, then score every variant in TFLM (a variant TFLM cannot run carries its error).

    Raises:
        ToolEnvMissing: If the tool environment is not installed.
        QuantisationError: If onnx2tf fails.
        ParityError: If lowered trees disagree with the original.
    """
    graph, lowered = micro_graph(source, exported, held_out)
    files = convert(graph, calibration, INPUT)
    variants = []
    for kind in KINDS:
        variant = TfliteVariant(kind, files.get(kind.name, b""))
        if not variant.model:
            variant.error = "onnx2tf wrote no such file"
        else:
            _score(variant, exported, held_out)
        variants.append(variant)
    return TfliteSet(graph, lowered, variants)


def _score(variant: TfliteVariant, exported: Exported, held_out: Dataset) -> None:
    try:
        started = time.perf_counter()
        outputs = tflm.predict(variant.model, held_out.x)
        elapsed = time.perf_counter() - started
        arena = tflm.measure_arena(variant.model)
        ops = tflm.op_types(variant.model)
        variant.tensors = tflm.tensor_io(variant.model, held_out.x.shape)
    except ConverterError as exc:
        variant.error = str(exc)
        return
    outputs = outputs.reshape(len(held_out.x), -1)
    original = np.asarray(exported.reference(held_out.x), dtype=np.float64)
    variant.float_distance = float(np.abs(outputs - original.reshape(outputs.shape)).max())
    metric = evaluation.quality(exported.task, outputs, held_out.y, exported.class_labels)
    variant.single_ms = elapsed * 1e3 / max(1, len(held_out.x))
    variant.facts = VariantFacts(
        variant.kind.name,
        variant.kind.scheme,
        variant.kind.precision,
        len(variant.model),
        tuple(ops),
        arena,
        metric,
        elapsed / max(1, len(held_out.x)),
    )


def self_test(
    variant: TfliteVariant,
    exported: Exported,
    x_eval: np.ndarray,
    output_name: str,
    count: int = 3,
) -> tuple[dict[str, Any], bytes]:
    """Self-test vectors of a ``.tflite`` bundle: the manifest's ``self_test`` and its file.

    Inputs are stored in the manifest's layout and, where the ``.tflite`` input is an integer,
    in that type with its scale and zero point (what the device feeds TFLM); the expected outputs
    are TFLM's dequantised outputs on exactly the values those integers stand for, and the float
    outputs are the original model's on the held-out rows they were quantised from.
    ``float_tolerance`` is the larger of the precision's self-test tolerance and the variant's
    worst distance from the original over the held-out data (rounded up), so it states how far
    this quantised model strays.

    Raises:
        QuantisationError: If TFLM cannot run the model.
        ConverterError: If there are no held-out rows.
    """
    assert variant.facts is not None
    rows = min(count, len(x_eval))
    if rows == 0:
        raise ConverterError("no held-out rows to make self-test vectors from")
    spec = variant.tensors["input"]
    dtype = np.dtype(spec["dtype"])
    quant = spec["quantisation"]
    samples = np.ascontiguousarray(x_eval[:rows], dtype=np.float32)
    stored, values = samples, samples
    if quant is not None:
        # The manifest's layout, the .tflite's integers: quantisation is per tensor, so it
        # commutes with the transpose the device makes to the .tflite layout.
        stored = tflm.quantise(samples, dtype, quant)
        scale, zero = np.float32(quant["scale"]), np.float32(quant["zero_point"])
        values = ((stored.astype(np.float32) - zero) * scale).astype(np.float32)
    expected = tflm.predict(variant.model, values).reshape(rows, -1).astype(np.float32)
    # The original on the held-out rows themselves (before the input is quantised): the pair
    # float_distance measured, so these vectors are within float_tolerance on the host.
    original = np.asarray(exported.reference(samples), dtype=np.float32).reshape(expected.shape)
    chunks = [
        np.ascontiguousarray(a[i : i + 1]).astype(a.dtype.newbyteorder("<")).tobytes()
        for i in range(rows)
        for a in (stored, expected, original)
    ]
    input_layout: dict[str, Any] = {
        "name": INPUT,
        "dtype": stored.dtype.name,
        "shape": [1, *samples.shape[1:]],
    }
    if quant is not None:
        input_layout.update(scale=quant["scale"], zero_point=quant["zero_point"])
    output_layout = {"name": output_name, "dtype": "float32", "shape": [1, expected.shape[1]]}
    manifest = {
        "tolerance": SELF_TEST_TOLERANCE[variant.kind.precision],
        "file": SELF_TEST_FILE,
        "count": rows,
        "inputs": [input_layout],
        "expected": [output_layout],
        "float_outputs": [output_layout],
        "float_tolerance": max(
            SELF_TEST_TOLERANCE[variant.kind.precision], _round_up(variant.float_distance)
        ),
    }
    return manifest, b"".join(chunks)


def _round_up(value: float, digits: int = 2) -> float:
    """``value`` rounded up to ``digits`` significant digits (a bound, never below it)."""
    if value <= 0 or not math.isfinite(value):
        return value
    step = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    return float(f"{math.ceil(value / step) * step:.{digits}g}")


def manifest_fields(
    shared: dict[str, Any],
    exported: Exported,
    tflite_set: TfliteSet,
    variant: TfliteVariant,
    float_metric: float,
    held_out: Dataset,
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Every manifest field of a ``.tflite`` bundle but targets, created_at and files, and the
    files beside the model (the self-test file).

    Raises:
        QuantisationError: If TFLM cannot run the model.
    """
    facts = variant.facts
    assert facts is not None
    graph = onnx.load_from_string(tflite_set.graph)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 17)
    inputs, outputs = bundling.tensor_specs(
        tflite_set.graph,
        feature_names=shared["_feature_names"],
        class_labels=exported.class_labels,
    )
    tests, test_file = self_test(variant, exported, held_out.x, outputs[0]["name"])
    metric_name = "accuracy" if exported.task == "classification" else "mae"
    kind = variant.kind
    notes = f"onnx2tf {kind.suffix}, scored in TFLM"
    if tflite_set.lowered_trees:
        notes += "; tree ensemble lowered to tensor ops (converters.tree_lowering)"
    quant: dict[str, Any] = {
        "scheme": kind.scheme,
        "per_channel": kind.scheme in ("int8-static", "int16x8"),
        "quantised_ops": 0 if kind.precision == "float32" else len(facts.op_types),
        "notes": notes,
    }
    if kind.scheme in ("int8-static", "int16x8"):
        quant["calibration"] = {"method": "minmax", **shared["_calibration"]}
    fields = {k: v for k, v in shared.items() if not k.startswith("_")}
    fields.update(
        {
            "runtime": {
                "model_file": MODEL_FILE,
                "format": "tflite",
                "opset": opset,
                "op_types": list(facts.op_types),
                "precision": facts.precision,
                "ram_estimate": {"bytes": facts.ram_bytes, "method": RAM_METHOD},
                "tflite": {"tflm_version": tflm.tflm_version(), **variant.tensors},
            },
            "inputs": inputs,
            "outputs": outputs,
            "quantisation": quant,
            "metrics": {
                metric_name: round(facts.metric, 6),
                f"float_{metric_name}": round(float_metric, 6),
                "float_model_bytes": float(len(shared["_float_model"])),
            },
            "self_test": tests,
        }
    )
    return fields, {SELF_TEST_FILE: test_file}


def candidates(tflite_set: TfliteSet) -> list[VariantFacts]:
    """The facts of every variant TFLM could run."""
    return [v.facts for v in tflite_set.variants if v.facts is not None]


def by_name(tflite_set: TfliteSet, name: str) -> TfliteVariant:
    """The variant called ``name``."""
    return next(v for v in tflite_set.variants if v.kind.name == name)


def overhead_bytes(
    shared: dict[str, Any],
    exported: Exported,
    tflite_set: TfliteSet,
    float_metric: float,
    held_out: Dataset,
    build: Any,
    target: DeviceTarget,
) -> int:
    """Bytes a ``.tflite`` bundle adds around its model (manifest, self-test, archive)."""
    runnable = next(v for v in tflite_set.variants if v.facts is not None)
    fields, files = manifest_fields(shared, exported, tflite_set, runnable, float_metric, held_out)
    return len(build(fields, files, target, b"").bundle) + 512
