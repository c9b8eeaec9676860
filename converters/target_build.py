"""The steps a target's bundle goes through whatever its variants' format (ONNX or ``.tflite``):
choose the variant or report why none fits; write the chosen bundle and report it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from converters.bundling import Built, write_bundle
from converters.fitting import TargetChoice, VariantFacts, choose
from converters.onnx_export import Exported
from converters.reports import TargetReport
from firmware_bundles import hash_bundle
from firmware_bundles.catalogue import DeviceTarget

if TYPE_CHECKING:  # the pipeline imports this module; only its options type is needed here
    from converters.pipeline import ConvertOptions


def choose_variant(
    target: DeviceTarget,
    facts: list[VariantFacts],
    options: ConvertOptions,
    exported: Exported,
    float_metric: float,
    overhead_bytes: int,
    unrunnable: Mapping[str, list[str]] | None = None,
) -> TargetChoice | TargetReport:
    """The choice among ``facts`` for ``target`` (see :func:`converters.fitting.choose`), or the
    failed target's report naming every variant's reasons, ``unrunnable`` ones included."""
    choice = choose(
        target,
        facts,
        task=exported.task,
        float_metric=float_metric,
        budget=options.budget,
        bundle_overhead_bytes=overhead_bytes,
    )
    choice.rejected.update(unrunnable or {})
    if choice.chosen is None:
        return TargetReport(
            target.hardware_id,
            ok=False,
            reason=f"nothing fits {target.hardware_id}: {choice.reason()}",
            rejected=choice.rejected,
        )
    return choice


def write_chosen(
    options: ConvertOptions, choice: TargetChoice, built: Built, model_bytes: int
) -> TargetReport:
    """Write the chosen variant's bundle (and its detached reference, if any) to the output
    folder and report them."""
    assert choice.chosen is not None, "only a chosen variant's bundle is written"
    name = f"{options.name}-{options.version}-{choice.hardware_id}.efb"
    path, reference = write_bundle(options.out_dir, name, built)
    return TargetReport(
        choice.hardware_id,
        ok=True,
        variant=choice.chosen.name,
        bundle=str(path),
        reference=None if reference is None else str(reference),
        sha256=hash_bundle(built.bundle),
        bundle_bytes=len(built.bundle),
        model_bytes=model_bytes,
        metric=choice.chosen.metric,
        rejected=choice.rejected,
    )
