"""The conversion pipeline: trained model and data in, one signed bundle per target out.

load -> export float ONNX (preprocessing inside) -> parity check -> variants -> evaluate each ->
per target: fit limits and accuracy budget, pick the smallest -> manifest (histograms, self-test,
provenance) -> signed deterministic bundle. Latency goes to the build report only.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import onnx

from converters import bundling, evaluation, reference, tflite_target, tflite_variants
from converters.errors import ConverterError, DataError
from converters.fitting import VariantFacts
from converters.input_schema import conform
from converters.onnx_export import Exported, check_parity, export
from converters.quantise import Variant, make_variants, op_types
from converters.reports import ConvertReport, TargetReport, VariantReport
from converters.sources import Dataset, SourceModel, load_data, load_model
from converters.target_build import choose_variant, write_chosen
from firmware_bundles import SigningKey, TargetCatalogue
from firmware_bundles.manifest import check_semver

Progress = Callable[[str], None]
#: Minimum ONNX Runtime per default-domain opset (ORT's compatibility table).
_ORT_FOR_OPSET = {
    17: "1.13.0",
    18: "1.14.0",
    19: "1.16.0",
    20: "1.17.0",
    21: "1.20.0",
    22: "1.20.0",
    23: "1.22.0",
}


@dataclass
class ConvertOptions:
    """What the engineer asked for."""

    name: str
    version: str
    hardware_ids: list[str]
    keys: list[SigningKey]
    out_dir: Path
    created_at: datetime
    release_counter: int = 0
    budget: float = 0.01
    label_column: str | None = None
    catalogue: TargetCatalogue = field(default_factory=TargetCatalogue.load_default)


def validate_options(options: ConvertOptions) -> None:
    """Cheap checks before any heavy work.

    Raises:
        ConverterError: On a version that is not semantic, an unknown target, no key, or a
            budget outside [0, 1).
    """
    try:
        check_semver(options.version)
    except ValueError as exc:
        raise ConverterError(f"--version: {exc}") from None
    for hardware_id in options.hardware_ids:
        options.catalogue.get(hardware_id)  # raises CatalogueError naming the known ids
    if not options.hardware_ids:
        raise ConverterError("no targets given")
    if not options.keys:
        raise ConverterError("no release key given; pass --key")
    if not 0.0 <= options.budget < 1.0:
        raise ConverterError(f"--accuracy-budget {options.budget} must be in [0, 1)")


def convert(
    model: Path | SourceModel,
    train_path: Path,
    eval_path: Path,
    options: ConvertOptions,
    calibration_path: Path | None = None,
    progress: Progress = lambda _: None,
) -> ConvertReport:
    """Run the whole pipeline; write bundles and ``build-report.json`` into ``options.out_dir``.

    ``model`` is a model file, or a model already loaded (``converters.mlflow_source.fetch``),
    whose input schema the data must then match and whose provenance the manifest records.
    Targets that nothing fits are reported with the reason per variant; the others still build.

    Raises:
        ConverterError: (a subclass) on bad model, data or options, or a failed parity check.
        CatalogueError: On an unknown target.
    """
    validate_options(options)
    progress("loading model and data")
    source = model if isinstance(model, SourceModel) else load_model(model)
    train = load_data(train_path, options.label_column)
    held_out = load_data(eval_path, options.label_column)
    calib = load_data(calibration_path, options.label_column) if calibration_path else train
    if source.input_schema is not None:
        train, held_out = (
            conform(train, source.input_schema),
            conform(held_out, source.input_schema),
        )
        calib = conform(calib, source.input_schema) if calibration_path else train
    progress(f"exporting {source.kind} model to ONNX")
    exported = export(source, train)
    for data in (held_out, calib):
        if data.x.shape[1:] != train.x.shape[1:]:
            raise DataError(
                f"{data.path} rows have shape {data.x.shape[1:]}, training data {train.x.shape[1:]}"
            )
    if exported.class_labels is not None:
        from converters.onnx_export import _check_labels

        _check_labels(held_out.y, exported.class_labels, held_out)
    progress("checking parity of float ONNX against the original")
    parity = check_parity(exported, held_out)
    progress("building variants (fp16, int8 dynamic, int8 static QDQ)")
    variants = make_variants(exported.model, calib.x[:512])
    facts, reports, outputs = _evaluate(variants, exported, held_out, progress)
    float_metric = next(f.metric for f in facts if f.name == "float32")
    shared = _shared_manifest(options, exported, source, train, held_out, calib, calibration_path)
    shared["_float_model"] = variants[0].model
    tflite_set = None
    if any(options.catalogue.get(t).format == "tflite" for t in options.hardware_ids):
        progress("building .tflite variants (onnx2tf) and scoring them in TFLite Micro")
        tflite_set = tflite_variants.make(source, exported, calib.x[:512], held_out)
        reports += tflite_target.variant_reports(tflite_set)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    targets = []
    for hardware_id in options.hardware_ids:
        progress(f"fitting {hardware_id}")
        if options.catalogue.get(hardware_id).format == "tflite":
            assert tflite_set is not None
            targets.append(
                tflite_target.build_target(
                    hardware_id, options, exported, tflite_set, float_metric, shared, held_out
                )
            )
            continue
        targets.append(
            _build_target(
                hardware_id, options, exported, variants, facts, float_metric, shared, held_out
            )
        )
    report = ConvertReport(
        name=options.name,
        version=options.version,
        task=exported.task,
        metric_name="accuracy" if exported.task == "classification" else "mae",
        float_metric=float_metric,
        float_bytes=len(variants[0].model),
        parity_max_diff=parity,
        variants=reports,
        targets=targets,
    )
    import json

    (options.out_dir / "build-report.json").write_text(json.dumps(report.to_dict(), indent=2))
    del outputs
    return report


def _evaluate(
    variants: list[Variant], exported: Exported, held_out: Dataset, progress: Progress
) -> tuple[list[VariantFacts], list[VariantReport], dict[str, Any]]:
    facts, reports, outputs = [], [], {}
    for v in variants:
        if v.error:
            reports.append(
                VariantReport(
                    v.name,
                    v.scheme,
                    0,
                    0,
                    False,
                    None,
                    None,
                    None,
                    None,
                    v.notes,
                    v.error,
                    v.detail,
                )
            )
            continue
        progress(f"evaluating {v.name}")
        out = evaluation.predict(v.model, held_out.x)
        metric = evaluation.quality(exported.task, out, held_out.y, exported.class_labels)
        ram = evaluation.ram_estimate(v.model)
        lat = evaluation.latency(v.model, held_out.x, repeats=30)
        facts.append(
            VariantFacts(
                v.name,
                v.scheme,
                v.precision,
                len(v.model),
                tuple(op_types(v.model)),
                ram,
                metric,
                lat.single_ms / 1e3,
                v.same_as_float,
            )
        )
        reports.append(
            VariantReport(
                v.name,
                v.scheme,
                len(v.model),
                v.quantised_ops,
                v.same_as_float,
                metric,
                ram,
                lat.single_ms,
                lat.batch_ms,
                v.notes,
                None,
            )
        )
        outputs[v.name] = out
    return facts, reports, outputs


def _versions(kind: str, mlflow: bool = False) -> dict[str, str]:
    names = ["onnx", "onnxruntime", "numpy", "tflite-micro"]
    names += ["scikit-learn", "skl2onnx"] if kind == "sklearn" else []
    names += ["torch", "onnxscript"] if kind.startswith("torch") else []
    names += ["mlflow-skinny"] if mlflow else []
    versions = {}
    for n in names:
        try:
            versions[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _shared_manifest(
    options: ConvertOptions,
    exported: Exported,
    source: SourceModel,
    train: Dataset,
    held_out: Dataset,
    calib: Dataset,
    calibration_path: Path | None,
) -> dict[str, Any]:
    train_out = evaluation.predict(exported.model, train.x)
    data_sha = {"train": train.sha256, "eval": held_out.sha256}
    if calibration_path:
        data_sha["calibration"] = calib.sha256
    return {
        "name": options.name,
        "version": options.version,
        "release_counter": options.release_counter,
        "task": exported.task,
        "provenance": {
            "source_model_sha256": source.sha256,
            "data_sha256": data_sha,
            "tool_versions": _versions(source.kind, "mlflow" in source.provenance),
            "builder": "edgefleet convert",
            **source.provenance,
        },
        "_calibration": {"samples": int(min(len(calib.x), 512)), "data_sha256": calib.sha256},
        "_feature_names": train.feature_names,
        "_reference": reference.encoded(
            reference.input_histograms(train.x, train.feature_names),
            reference.output_histograms(
                exported.task, train_out, exported.class_labels, exported.output_name
            ),
        ),
    }


def _build_target(
    hardware_id: str,
    options: ConvertOptions,
    exported: Exported,
    variants: list[Variant],
    facts: list[VariantFacts],
    float_metric: float,
    shared: dict[str, Any],
    held_out: Dataset,
) -> TargetReport:
    target = options.catalogue.get(hardware_id)
    by_name = {v.name: v for v in variants}
    files: dict[str, bytes] = {}
    target_facts = []
    for f in facts:
        model = by_name[f.name].model
        if target.format == "ort":
            try:
                model = bundling.to_ort_format(model)
            except ConverterError:
                continue
        metric = f.metric
        if target.format == "ort":  # score the bytes that ship, as ORT runs them
            out = evaluation.predict(model, held_out.x)
            metric = evaluation.quality(exported.task, out, held_out.y, exported.class_labels)
        files[f.name] = model
        target_facts.append(
            VariantFacts(
                f.name,
                f.scheme,
                f.precision,
                len(model),
                f.op_types,
                f.ram_bytes,
                metric,
                f.latency_s,
                f.same_as_float,
            )
        )
    overhead = _overhead(options, exported, shared, target, held_out)
    choice = choose_variant(target, target_facts, options, exported, float_metric, overhead)
    if isinstance(choice, TargetReport):
        return choice
    chosen = choice.chosen
    assert chosen is not None
    variant = by_name[chosen.name]
    built = _bundle(
        options,
        exported,
        shared,
        target,
        variant,
        chosen,
        files[chosen.name],
        float_metric,
        held_out,
    )
    return write_chosen(options, choice, built, len(files[chosen.name]))


def _overhead(
    options: ConvertOptions,
    exported: Exported,
    shared: dict[str, Any],
    target: Any,
    held_out: Dataset,
) -> int:
    """Bytes a bundle adds around its model: manifest (histograms, self-test) and archive."""
    tiny = Variant("float32", "float32", "float32", exported.model)
    facts = VariantFacts("float32", "float32", "float32", len(exported.model), (), 0, 0.0)
    built = _bundle(options, exported, shared, target, tiny, facts, b"", 0.0, held_out)
    return len(built.bundle) + 512


def _bundle(
    options: ConvertOptions,
    exported: Exported,
    shared: dict[str, Any],
    target: Any,
    variant: Variant,
    chosen: VariantFacts,
    model_file: bytes,
    float_metric: float,
    held_out: Dataset,
) -> bundling.Built:
    filename = "model.ort" if target.format == "ort" else "model.onnx"
    graph_model = variant.model
    opset = next(
        (
            o.version
            for o in onnx.load_from_string(graph_model).opset_import
            if o.domain in ("", "ai.onnx")
        ),
        17,
    )
    inputs, outputs = bundling.tensor_specs(
        graph_model, feature_names=shared["_feature_names"], class_labels=exported.class_labels
    )
    metric_name = "accuracy" if exported.task == "classification" else "mae"
    quant: dict[str, Any] = {
        "scheme": variant.scheme,
        "per_channel": variant.per_channel,
        "quantised_ops": variant.quantised_ops,
        "notes": variant.notes,
    }
    if variant.scheme == "int8-static":
        quant["calibration"] = {"method": variant.calibration, **shared["_calibration"]}
    fields = {k: v for k, v in shared.items() if not k.startswith("_")}
    fields.update(
        {
            "runtime": {
                "model_file": filename,
                "format": target.format,
                "opset": opset,
                "op_types": list(chosen.op_types) or ["Identity"],
                "min_onnxruntime": _ORT_FOR_OPSET.get(opset, "1.20.0"),
                "precision": chosen.precision,
                "ram_estimate": {"bytes": chosen.ram_bytes, "method": evaluation.RAM_METHOD},
            },
            "inputs": inputs,
            "outputs": outputs,
            "quantisation": quant,
            "metrics": {
                metric_name: round(chosen.metric, 6),
                f"float_{metric_name}": round(float_metric, 6),
                "float_model_bytes": float(len(shared["_float_model"])),
            },
        }
    )
    test, test_file = bundling.self_test(
        model_file or graph_model,
        held_out.x,
        chosen.precision,
        quantised=bundling.input_quantisation(graph_model),
    )
    fields["self_test"] = test
    return bundling.build_bundle(
        manifest_fields=fields,
        target=target,
        model_file=filename,
        model=model_file,
        created_at=options.created_at,
        keys=options.keys,
        reference=shared["_reference"],
        extra_files={test["file"]: test_file},
    )
