"""Converter results per example and target: size, accuracy and latency against the float model.

Trains the three examples, converts each for the micro targets (ring-gen3, ring-gen4,
devboard-nrf52840) and for phone-android and devboard-rpi4, and prints float size, chosen variant
and size, ratio, float and chosen accuracy, and single-sample and batch latency (ONNX Runtime,
one thread; TFLM one sample per invoke for a micro target's .tflite), with the float model
measured in the same run as baseline. Then the bytes of each bundle beyond its model in every
reference layout, against the format-2 layout of the same bundle built in the same run
(reference histograms as JSON in the manifest), every byte of each micro-target bundle beyond
its model by what it is, and the .tflite rows of the micro targets.

    python bench/bench_convert.py [--out build/bench]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from converters.pipeline import ConvertOptions, convert  # noqa: E402
from converters.relayout import Layout, relayout  # noqa: E402
from converters.reports import ConvertReport, TargetReport  # noqa: E402
from firmware_bundles import SigningKey, TargetCatalogue  # noqa: E402

EXAMPLES = {
    "digits-mlp": ("train_digits_mlp.py", "model.joblib"),
    "cancer-trees": ("train_breast_cancer_trees.py", "model.joblib"),
    "wearable-cnn": ("train_wearable_cnn.py", "model.pt2"),
}
MICRO_TARGETS = ["ring-gen3", "ring-gen4", "devboard-nrf52840"]
TARGETS = [*MICRO_TARGETS, "phone-android", "devboard-rpi4"]
#: Target for a micro target's bundle (issues 10 and 14): bundle bytes minus model bytes.
RING_OVERHEAD_MAX = 8 * 1024
#: The layouts measured: format 2 (the baseline) and format 3 with the file in or beside it.
LAYOUTS: dict[str, Layout] = {
    "format 2, JSON in manifest": "inline",
    "format 3, reference.bin in bundle": "bundle",
    "format 3, reference.bin detached": "detached",
}


def _json_bytes(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _member(key: str, value: object) -> int:
    """Bytes of ``"key":value`` in canonical JSON."""
    return _json_bytes(key) + 1 + _json_bytes(value)


def breakdown(bundle: bytes) -> dict[str, int]:
    """Every byte of a bundle by what it is: the model, each top-level manifest field, the
    signatures, the other files, and the tar structure."""
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        members = tar.getmembers()
        manifest_member = tar.extractfile("manifest.json")
        assert manifest_member is not None
        envelope = json.loads(manifest_member.read())
    signed = envelope["signed"]
    sizes = {m.name: m.size for m in members}
    parts = {"model": sizes.pop(signed["runtime"]["model_file"])}
    for key in sorted(signed):
        parts[f"manifest: {key}"] = _member(key, signed[key])
    parts["manifest: signatures"] = _member("signatures", envelope["signatures"])
    manifest_bytes = sizes.pop("manifest.json")
    parts["manifest: braces, commas, envelope keys"] = manifest_bytes - sum(
        v for k, v in parts.items() if k.startswith("manifest")
    )
    for name, size in sorted(sizes.items()):
        parts[f"file {name}"] = size
    data_end = max(m.offset_data + m.size for m in members)
    parts["tar: headers"] = 512 * len(members)
    parts["tar: padding to 512-byte blocks"] = sum(-m.size % 512 for m in members)
    parts["tar: end of archive"] = len(bundle) - data_end - (-data_end % 512)
    assert sum(parts.values()) == len(bundle), (parts, len(bundle))
    return parts


def overhead(bundle: bytes) -> int:
    """Bundle bytes minus model bytes."""
    return len(bundle) - breakdown(bundle)["model"]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench")
    args = parser.parse_args()
    key = SigningKey.generate()
    table = Table(title="edgefleet convert: chosen variant per target vs float32 (same run)")
    for col in (
        "example",
        "target",
        "float B",
        "chosen",
        "chosen B",
        "ratio",
        "float acc",
        "chosen acc",
        "1-sample ms float/chosen",
        "batch-256 ms float/chosen",
    ):
        table.add_column(col, justify="left" if col in ("example", "target", "chosen") else "right")
    built: dict[tuple[str, str], TargetReport] = {}
    reports: dict[str, ConvertReport] = {}
    for name, (script, model_file) in EXAMPLES.items():
        data = args.out / name
        subprocess.run(
            [sys.executable, str(REPO / "examples" / script), "--out", str(data)],
            check=True,
            capture_output=True,
        )
        report = convert(
            data / model_file,
            data / "train.npz",
            data / "eval.npz",
            ConvertOptions(
                name=name,
                version="1.0.0",
                hardware_ids=TARGETS,
                keys=[key],
                out_dir=data / "bundles",
                created_at=datetime(2026, 1, 1, tzinfo=UTC),
            ),
            data / "calibration.npz",
        )
        reports[name] = report
        variants = {v.name: v for v in report.variants}
        base = variants["float32"]
        for target in report.targets:
            if not target.ok:
                table.add_row(
                    name,
                    target.target_id,
                    str(report.float_bytes),
                    "[red]none[/]",
                    "-",
                    "-",
                    f"{report.float_metric:.4f}",
                    "-",
                    "-",
                    (target.reason or "")[:40],
                )
                continue
            chosen = variants[target.variant or ""]
            built[(name, target.target_id)] = target
            table.add_row(
                name,
                target.target_id,
                str(report.float_bytes),
                chosen.name,
                str(chosen.model_bytes),
                f"{chosen.model_bytes / report.float_bytes:.3f}",
                f"{report.float_metric:.4f}",
                f"{target.metric:.4f}",
                f"{base.single_ms:.3f}/{chosen.single_ms:.3f}",
                # TFLM runs one sample per invoke: a .tflite has no batch figure.
                f"{base.batch_ms:.2f}/{_ms(chosen.batch_ms)}",
            )
    console = Console(width=200)
    console.print(table)
    layouts = _layouts(built, key)
    console.print(_sizes_table(layouts))
    console.print(tflite_table(reports))
    for (name, target_id), target in built.items():
        if target_id in MICRO_TARGETS:
            console.print(_breakdown_table(name, target_id, target))


def _layouts(
    built: dict[tuple[str, str], TargetReport], key: SigningKey
) -> dict[tuple[str, str], dict[str, bytes]]:
    """Each bundle in every layout, re-signed in this run, and as the catalogue places it."""
    result = {}
    for pair, target in built.items():
        bundle = Path(target.bundle or "").read_bytes()
        reference = Path(target.reference).read_bytes() if target.reference else None
        result[pair] = {
            label: relayout(bundle, reference, [key], layout)[0]
            for label, layout in LAYOUTS.items()
        }
        result[pair]["chosen"] = bundle
    return result


def _sizes_table(layouts: dict[tuple[str, str], dict[str, bytes]]) -> Table:
    catalogue = TargetCatalogue.load_default()
    table = Table(
        title="bytes beyond the model per reference layout; baseline: format 2, same run"
        f" (micro targets: at most {RING_OVERHEAD_MAX})"
    )
    for col in ("example", "target", "model B", *LAYOUTS, "catalogue places it", "chosen/format 2"):
        table.add_column(col, justify="left" if col in ("example", "target") else "right")
    for (name, target_id), bundles in layouts.items():
        micro = target_id in MICRO_TARGETS

        def cell(data: bytes, micro: bool = micro) -> str:
            over = overhead(data)
            if not micro:
                return str(over)
            return f"{over} ok" if over <= RING_OVERHEAD_MAX else f"[red]{over} over[/]"

        baseline = overhead(bundles["format 2, JSON in manifest"])
        table.add_row(
            name,
            target_id,
            str(breakdown(bundles["chosen"])["model"]),
            *(cell(bundles[label]) for label in LAYOUTS),
            catalogue.get(target_id).reference,
            f"{overhead(bundles['chosen']) / baseline:.3f}",
        )
    return table


def _breakdown_table(name: str, target_id: str, target: TargetReport) -> Table:
    parts = breakdown(Path(target.bundle or "").read_bytes())
    table = Table(title=f"{name} on {target_id}: every byte beyond the model")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    for what, size in parts.items():
        if what != "model":
            table.add_row(what, str(size))
    table.add_row("total beyond the model", str(sum(parts.values()) - parts["model"]))
    if target.reference:
        size = Path(target.reference).stat().st_size
        table.add_row("(beside the bundle, never sent to the device: reference.bin)", str(size))
    return table


#: TFLite rows: (example, micro target) pairs of the same run.
TFLITE_ROWS = [
    ("digits-mlp", "ring-gen3"),
    ("wearable-cnn", "ring-gen3"),
    ("cancer-trees", "ring-gen4"),
]


def tflite_table(reports: dict[str, ConvertReport]) -> Table:
    """Chosen .tflite per micro target: size vs float .tflite, TFLM accuracy, measured arena."""
    table = Table(title="edgefleet convert: .tflite for micro targets, scored in TFLM (same run)")
    for col in (
        "example",
        "target",
        "chosen",
        "float .tflite B",
        "chosen B",
        "ratio (<= 0.42)",
        "float acc",
        "TFLM acc",
        "points lost (<= 1)",
        "TFLM arena B",
        "old ONNX estimate B",
    ):
        table.add_column(col, justify="left" if col in ("example", "target", "chosen") else "right")
    for name, target_id in TFLITE_ROWS:
        report = reports[name]
        variants = {v.name: v for v in report.variants}
        target = next(t for t in report.targets if t.target_id == target_id)
        chosen = variants.get(target.variant or "")
        flt = variants["tflite-float32"]
        onnx_int8 = variants.get("int8-static-per-channel-minmax")
        if chosen is None or target.metric is None:
            table.add_row(name, target_id, "[red]none[/]", *["-"] * 7, (target.reason or "")[:60])
            continue
        table.add_row(
            name,
            target_id,
            chosen.name,
            str(flt.model_bytes),
            str(chosen.model_bytes),
            f"{chosen.model_bytes / flt.model_bytes:.3f}",
            f"{report.float_metric:.4f}",
            f"{target.metric:.4f}",
            f"{(report.float_metric - target.metric) * 100:.2f}",
            str(chosen.ram_bytes),
            str(onnx_int8.ram_bytes) if onnx_int8 and onnx_int8.ram_bytes else "-",
        )
    return table


if __name__ == "__main__":
    main()
