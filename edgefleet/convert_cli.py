"""``edgefleet convert``: a trained model in, one signed bundle per device target out."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefleet.bundle_cli import load_catalogue
from edgefleet.common import bundle_errors, console, fail, literal, load_signing_key, print_json
from edgefleet.renamed import OldTargetsOpt, renamed
from firmware_bundles import BundleError, created_at_from_env


def convert_command(
    model: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="sklearn .joblib/.pkl, PyTorch .pt2/TorchScript, or .onnx file; or an MLflow"
            " model: models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH.",
        ),
    ],
    name: Annotated[str, typer.Option(help="Model name, e.g. wrist-activity.")],
    version: Annotated[str, typer.Option(help="Semantic version X.Y.Z of this build.")],
    train: Annotated[Path, typer.Option(help="Training data (.npz X/y, or CSV/Parquet).")],
    eval_data: Annotated[Path, typer.Option("--eval", help="Held-out data for accuracy checks.")],
    key: Annotated[list[Path], typer.Option(help="Release signing key. Repeatable.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for bundles and report.")],
    hardware_ids: Annotated[
        str | None,
        typer.Option(help="Comma-separated hardware ids, e.g. ring-gen3,phone-android. Required."),
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="Calibration data for static int8 (default: training data).")
    ] = None,
    release_counter: Annotated[
        int, typer.Option(min=0, help="Anti-rollback floor for this model name.")
    ] = 0,
    accuracy_budget: Annotated[
        float,
        typer.Option(
            help="Allowed loss: accuracy fraction (0.01 = 1 point) or relative MAE increase."
        ),
    ] = 0.01,
    label_column: Annotated[str | None, typer.Option(help="Label column for CSV/Parquet.")] = None,
    catalogue: Annotated[
        Path | None, typer.Option(envvar="EDGEFLEET_CATALOGUE", help="Target catalogue TOML.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Machine-readable report on stdout.")
    ] = False,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            "--mlflow-uri",
            envvar="MLFLOW_TRACKING_URI",
            show_envvar=True,
            help="MLflow tracking server for models:/ and runs:/ models.",
        ),
    ] = None,
    targets: OldTargetsOpt = None,
) -> None:
    """Convert a trained model into the smallest signed bundle per target that holds its accuracy.

    Exports to ONNX with preprocessing inside, checks parity with the original, builds float32,
    fp16, int8 dynamic and int8 static variants, evaluates each on --eval, and picks per target the
    smallest variant inside the target's limits and the accuracy budget. The build time comes from
    SOURCE_DATE_EPOCH (else now); the same inputs and SOURCE_DATE_EPOCH give identical bundles.
    Exits 1 if any target could not be built (the others are still written).

    An MLflow model is downloaded with MLflow's client and converted from its sklearn, pytorch or
    onnx flavour; its signature's columns or tensor shape must match the data, and the manifest
    records the registry, version, run, the run's parameters and metrics, and its datasets'
    digests (provenance.mlflow).
    """
    from converters.errors import ConverterError
    from converters.pipeline import ConvertOptions, convert, validate_options

    hardware_ids = renamed(hardware_ids, targets, "--hardware-ids", "--targets")
    if hardware_ids is None:
        fail("missing option --hardware-ids", 2)
    keys = [load_signing_key(p) for p in key]
    with bundle_errors():
        created = created_at_from_env(os.environ) or datetime.now(UTC).replace(microsecond=0)
    options = ConvertOptions(
        name=name,
        version=version,
        hardware_ids=[h.strip() for h in hardware_ids.split(",") if h.strip()],
        keys=keys,
        out_dir=out,
        created_at=created,
        release_counter=release_counter,
        budget=accuracy_budget,
        label_column=label_column,
        catalogue=load_catalogue(catalogue),
    )
    try:
        validate_options(options)  # before any download
        with (
            tempfile.TemporaryDirectory(prefix="edgefleet-mlflow-") as scratch,
            Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
                disable=json_out,
            ) as bar,
        ):
            task = bar.add_task("starting", total=None)
            source = _source(
                model, mlflow_uri, Path(scratch), lambda m: bar.update(task, description=m)
            )
            report = convert(
                source,
                train,
                eval_data,
                options,
                calibration,
                progress=lambda msg: bar.update(task, description=msg),
            )
    except (ConverterError, BundleError) as exc:
        fail(str(exc))
    if json_out:
        print_json(report.to_dict())
    else:
        _print(report)
    if not report.ok:
        raise typer.Exit(1)


def _source(
    model: str, mlflow_uri: str | None, scratch: Path, progress: Callable[[str], object]
) -> Any:
    """The model file's path, or the MLflow model fetched into ``scratch`` and loaded."""
    from converters.mlflow_source import fetch, is_mlflow_uri

    if not is_mlflow_uri(model):
        return Path(model)
    progress(f"fetching {model} from MLflow")
    return fetch(model, mlflow_uri, scratch)


def _print(report: object) -> None:
    from converters.reports import ConvertReport

    assert isinstance(report, ConvertReport)
    metric = report.metric_name
    title = f"{report.name} {report.version}: variants on held-out data ({metric})"
    table = Table(title=literal(title))
    for col in (
        "variant",
        "bytes",
        "ratio",
        metric,
        "q-ops",
        "RAM est.",
        "1-sample ms",
        "batch ms",
        "note",
    ):
        table.add_column(
            col,
            justify="left" if col in ("variant", "note") else "right",
            overflow="fold" if col == "note" else "ellipsis",
        )
    for v in report.variants:
        if v.error:
            # Our words, whole; the quantiser's own message is in build-report.json.
            table.add_row(
                literal(v.name), "-", "-", "-", "-", "-", "-", "-", literal(f"skipped: {v.error}")
            )
            continue
        table.add_row(
            literal(v.name),
            str(v.model_bytes),
            f"{v.model_bytes / report.float_bytes:.2f}",
            f"{v.metric:.4f}",
            str(v.quantised_ops),
            str(v.ram_bytes),
            f"{v.single_ms:.3f}",
            # TFLM runs one sample per invoke: .tflite variants have no batch figure.
            "-" if v.batch_ms is None else f"{v.batch_ms:.2f}",
            "same as float" if v.same_as_float else "",
        )
    console.print(table)
    targets = Table(title="Bundles per target")
    for col in ("target", "variant", "bundle bytes", metric, "sha256 / reason"):
        targets.add_column(col, overflow="fold")
    for t in report.targets:
        if t.ok:
            targets.add_row(
                literal(t.target_id),
                literal(t.variant or ""),
                str(t.bundle_bytes),
                f"{t.metric:.4f}",
                literal(t.sha256 or ""),
            )
        else:
            targets.add_row(literal(t.target_id), "[red]none[/]", "-", "-", literal(t.reason or ""))
    console.print(targets)
    detached = [t.target_id for t in report.targets if t.reference]
    if detached:
        console.print(
            f"reference histograms detached for {literal(', '.join(detached))}: each"
            " *.reference.bin beside its bundle is published with it (edgefleet publish)"
        )
    console.print(
        f"parity of float ONNX vs original: max diff {report.parity_max_diff:.2e};"
        f" report: build-report.json beside the bundles"
    )
