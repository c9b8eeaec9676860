"""A micro target's bundle: choose among the ``.tflite`` variants and write it.

The same rule as for ONNX variants (:func:`converters.fitting.choose`: smallest inside the
accuracy budget and the target's limits), with sizes, ops and arenas that TFLM measured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from converters import bundling, tflite_variants
from converters.fitting import choose
from converters.onnx_export import Exported
from converters.reports import TargetReport, VariantReport
from converters.sources import Dataset
from firmware_bundles import bundle_id

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
    target_id: str,
    options: ConvertOptions,
    exported: Exported,
    tflite_set: tflite_variants.TfliteSet,
    float_metric: float,
    shared: dict[str, Any],
    held_out: Dataset,
) -> TargetReport:
    """Choose among the ``.tflite`` variants for a TFLM target and write its bundle."""
    target = options.catalogue.get(target_id)

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
            target_id, ok=False, reason=f"TFLM ran no .tflite variant: {reasons}", rejected=reasons
        )
    overhead = tflite_variants.overhead_bytes(
        shared, exported, tflite_set, float_metric, held_out, build, target
    )
    choice = choose(
        target,
        candidates,
        task=exported.task,
        float_metric=float_metric,
        budget=options.budget,
        bundle_overhead_bytes=overhead,
    )
    for v in tflite_set.variants:
        if v.error:
            choice.rejected[v.kind.name] = [f"TFLM cannot run it: {v.error}"]
    if choice.chosen is None:
        return TargetReport(
            target_id,
            ok=False,
            reason=f"nothing fits {target_id}: {choice.reason()}",
            rejected=choice.rejected,
        )
    variant = tflite_variants.by_name(tflite_set, choice.chosen.name)
    fields, files = tflite_variants.manifest_fields(
        shared, exported, tflite_set, variant, float_metric, held_out
    )
    built = build(fields, files, target, variant.model)
    path, reference = bundling.write_bundle(
        options.out_dir, f"{options.name}-{options.version}-{target_id}.efb", built
    )
    return TargetReport(
        target_id,
        ok=True,
        variant=variant.kind.name,
        bundle=str(path),
        reference=None if reference is None else str(reference),
        sha256=bundle_id(built.bundle),
        bundle_bytes=len(built.bundle),
        model_bytes=len(variant.model),
        metric=choice.chosen.metric,
        rejected=choice.rejected,
    )
