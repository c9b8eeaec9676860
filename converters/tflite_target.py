"""A micro target's bundle: choose among the ``.tflite`` variants and write it.

The same rule as for ONNX variants (:func:`converters.fitting.choose`: smallest inside the
accuracy budget and the target's limits), with sizes, ops and arenas that TFLM measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from converters import bundling, tflite_variants
from converters.onnx_export import Exported
from converters.reports import TargetReport, VariantReport
from converters.sources import Dataset
from converters.target_build import choose_variant, write_chosen

if TYPE_CHECKING:  # the pipeline imports this module; only its options type is needed here
    from converters.pipeline import ConvertOptions


def variant_reports(tflite_set: tflite_variants.TfliteSet) -> list[VariantReport]:
    """One report row per ``.tflite`` variant (TFLM runs one sample per invoke: no batch)."""
    reports = []
    for v in tflite_set.variants:
        f = v.facts
        reports.append(
            VariantReport(
                v.kind.name,
                v.kind.scheme,
                len(v.model),
                0,
                False,
                None if f is None else f.metric,
                None if f is None else f.ram_bytes,
                v.single_ms,
                None,
                f"onnx2tf {v.kind.suffix}; TFLM arena measured",
                v.error,
            )
        )
    return reports


def build_target(
    hardware_id: str,
    options: ConvertOptions,
    exported: Exported,
    tflite_set: tflite_variants.TfliteSet,
    float_metric: float,
    shared: dict[str, Any],
    held_out: Dataset,
) -> TargetReport:
    """Choose among the ``.tflite`` variants for a TFLM target and write its bundle."""
    target = options.catalogue.get(hardware_id)

    def build(
        fields: dict[str, Any], files: dict[str, bytes], target: Any, model: bytes
    ) -> bundling.Built:
        return bundling.build_bundle(
            manifest_fields=fields,
            target=target,
            model_file=tflite_variants.MODEL_FILE,
            model=model,
            created_at=options.created_at,
            keys=options.keys,
            reference=shared["_reference"],
            extra_files=files,
        )

    candidates = tflite_variants.candidates(tflite_set)
    if not candidates:
        reasons = {v.kind.name: [v.error or "not scored"] for v in tflite_set.variants}
        return TargetReport(
            hardware_id,
            ok=False,
            reason=f"TFLM ran no .tflite variant: {reasons}",
            rejected=reasons,
        )
    overhead = tflite_variants.overhead_bytes(
        shared, exported, tflite_set, float_metric, held_out, build, target
    )
    unrunnable = {
        v.kind.name: [f"TFLM cannot run it: {v.error}"] for v in tflite_set.variants if v.error
    }
    choice = choose_variant(
        target, candidates, options, exported, float_metric, overhead, unrunnable
    )
    if isinstance(choice, TargetReport):
        return choice
    assert choice.chosen is not None
    variant = tflite_variants.by_name(tflite_set, choice.chosen.name)
    fields, files = tflite_variants.manifest_fields(
        shared, exported, tflite_set, variant, float_metric, held_out
    )
    built = build(fields, files, target, variant.model)
    return write_chosen(options, choice, built, len(variant.model))
